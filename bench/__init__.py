"""Benchmarks and `baton bench`, the load generator that drives any Baton router."""
