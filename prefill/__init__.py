"""Prefill nodes: compute prompts and send their KV cache to decode nodes."""
