"""A node's memory stays bounded under prompts of every length (issue 29): oneDNN kept memory for each row
count a packed matmul saw, and the send buffers were kept one per prompt shape, so a prefill node grew by
gigabytes. Now the row counts are rounded (engine/linear.py) and the send buffers shared and bounded
(kvtransfer/sender.py `Staging`)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cluster_harness import BatonUp

from baton.router.client import BatonClient

pytest.importorskip("transformers")
from test_architectures import Variant, write_checkpoint  # noqa: E402

# Wide enough that oneDNN's per-shape memory shows (the benchmarks' 51M Llama, two layers of it).
WIDE = Variant("LlamaForCausalLM", dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
                                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024))
SLACK = 48 << 20  # the allocator's own: arenas, thread caches, a step's activations at their largest


def _resident(pid: int) -> int:
    """A process's resident memory, as /proc has it now."""
    [kib] = [line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
             if line.startswith("VmRSS:")]
    return int(kib) << 10


def test_a_prefill_node_under_prompts_of_every_length_stays_within_its_bound(tmp_path):
    """After a warm-up of 120 prompts, 100 more of lengths it has not seen (16 to 1,000 tokens) grow the prefill
    node by no more than its send buffers' bound (two steps' K/V) and the allocator's slack (64 MiB). Before the
    fix it grew by 3.2 MiB a prompt (517 MiB over 160 prompts after a warm-up of 40); with it, by about 60 MiB
    over the first 120 prompts (the rounded row counts' first sightings), then within ±20 MiB."""
    folder = write_checkpoint(tmp_path / "ckpt", WIDE)
    rng = random.Random(29)
    lengths = rng.sample(range(16, 1001), 220)
    layers, kv_heads, head_dim, block = 2, 2, 64, 16
    blocks = 4096 // block  # transfer tokens: max(max_num_batched_tokens (4096), context)
    bound = 2 * layers * blocks * (2 * block * kv_heads * head_dim * 4) + SLACK
    with BatonUp(tmp_path / "logs", "--model", str(folder), "--prefill", "1", "--decode", "1") as up:
        pid = up.node_pid("prefill-0")
        with BatonClient(up.address, timeout=120) as client:
            def run(some: list[int]) -> None:
                for n in some:
                    out = client.complete([rng.randrange(3, 512) for _ in range(n)], max_tokens=1,
                                          temperature=0)
                    assert len(out.token_ids) == 1

            run(lengths[:120])
            before = _resident(pid)
            run(lengths[120:])
            after = _resident(pid)
    assert after - before <= bound, f"grew {(after - before) / 2**20:.0f} MiB over 100 prompts (bound " \
                                    f"{bound / 2**20:.0f} MiB; {before / 2**20:.0f} MiB after the warm-up)"
