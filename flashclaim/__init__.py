"""flashclaim: a queue-first claim processor for flash-sale coupons."""

__version__ = "0.1.0"
