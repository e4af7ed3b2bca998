"""Names of full KV blocks, for prefix caching: a block is named by a hash chained over its parent's name and
its own token ids, from a seed that is the model's identity. Two blocks with one name hold the same K/V: the
same tokens after the same prefix, under the same model. Torch-free: a router names a prompt's blocks too.

The hash is BLAKE2b (hashlib, 16-byte digests). A cached block is handed to any request whose prompt names it,
so a prompt crafted to collide with another tenant's block would read that tenant's K/V: the hash must resist
collisions, which fast non-cryptographic hashes (xxHash, Python's hash()) do not (vLLM moved off hash() for this
reason). BLAKE2b is the fastest collision-resistant hash in the standard library (no dependency to keep), and a
block's name costs about a microsecond: a 1,000-token prompt is named in 70 µs (bench/README.md).
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Sequence
from pathlib import Path

DIGEST_BYTES = 16
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def model_seed(folder: str | Path, name: str = "") -> bytes:
    """The model's identity, the root of every block name: its config, the names and sizes of its weight files,
    and the name it is served under. Two checkpoints of one architecture and shape differ in it by their
    weights' files (a random re-initialisation saved anew differs in size only by chance: `name` tells them
    apart where that matters)."""
    folder = Path(folder)
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"baton-model")
    config = folder / "config.json"
    h.update(json.dumps(json.loads(config.read_text()), sort_keys=True).encode() if config.exists() else b"")
    for f in sorted(folder.iterdir()):
        if f.suffix in WEIGHT_SUFFIXES:
            h.update(f"{f.name}:{f.stat().st_size};".encode())
    h.update(name.encode())
    return h.digest()


def block_names(seed: bytes, token_ids: Sequence[int], block_size: int, start: Sequence[bytes] = (),
                limit: int | None = None) -> list[bytes]:
    """The names of the full blocks of `token_ids`, first to last (at most `limit` of them): `start`, the names
    of the first blocks when already known, is extended, not recomputed."""
    full = len(token_ids) // block_size
    if limit is not None:
        full = min(full, limit)
    names = list(start[:full])
    parent = names[-1] if names else seed
    for i in range(len(names), full):
        parent = block_name(parent, token_ids[i * block_size:(i + 1) * block_size])
        names.append(parent)
    return names


def block_name(parent: bytes, tokens: Sequence[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=DIGEST_BYTES)
    h.update(array("q", tokens).tobytes())
    return h.digest()
