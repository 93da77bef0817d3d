"""Consumers: take claim commands off RabbitMQ and apply them to PostgreSQL."""
