"""Cluster membership, quorum and fencing: the agreed, numbered views the DLM consumes."""
