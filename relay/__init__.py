"""The outbox relay: publish the events written to the outbox, then mark them sent."""
