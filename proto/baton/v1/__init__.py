"""Baton gRPC API v1: generated stubs (committed) and the messages they define."""
