"""Cluster membership, launch and the `baton` command line."""
