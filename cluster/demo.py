"""`make run`: start a local cluster, stream one continuation through its router, stop the cluster."""

from __future__ import annotations

import sys

from baton.cluster.launch import ClusterSpec, LocalCluster
from baton.router.client import BatonClient, Delta


def main(prompt: str) -> int:
    print("baton: starting etcd, a prefill node, a decode node and the router ...", file=sys.stderr, flush=True)
    with LocalCluster(ClusterSpec()) as cluster:
        print(f"baton: router on {cluster.address}; generating through it\n", file=sys.stderr, flush=True)
        print(prompt, end="", flush=True)
        with BatonClient(cluster.address, timeout=120) as client:
            for item in client.generate(prompt, max_tokens=200, temperature=0):
                if isinstance(item, Delta):
                    print(item.text, end="", flush=True)
                else:
                    print(f"\n\nbaton: {item.completion_tokens} tokens, finish {item.finish_reason}, TTFT "
                          f"{item.ttft_ms:.1f} ms, prefill on {item.prefill_node}, decode on {item.decode_node}",
                          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "Once upon a time"))
