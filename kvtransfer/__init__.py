"""KV-cache transfer between a prefill node and a decode node over a torch.distributed pair channel."""
