"""Developers' and load testers' tools: the local stack, the load generator and its
report, the scenarios and the claim client they share. The load generator and its
report need the ``loadtest`` extra, the local stack the ``devstack`` extra."""
