"""Operators' tools: the dead-letter CLI and HTTP API, and the database audit."""
