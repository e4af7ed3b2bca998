"""Decode nodes: reserve KV blocks, receive prefilled KV, continue sequences with continuous batching."""
