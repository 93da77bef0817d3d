"""What every flashclaim process shares, and all that the gateway and the consumer import
from outside themselves: settings, errors, the message format, the broker's topology and
policies, connections, the result store, retry rules, logs, signals and the dead-letter
format. It imports nothing from the services or the tools."""
