"""What every Baton process shares: etcd membership, wire-message conversions, gRPC server helpers, metrics,
logs and retry loops. Router, prefill and decode build on it; `cluster/` (the launchers) sits above them all."""
