"""The HTTP gateway: validates requests and turns each claim into a command on RabbitMQ."""
