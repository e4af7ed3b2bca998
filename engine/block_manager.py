"""Owns every KV block: one block table per sequence, a reference count per block (a forked sequence shares its
parent's prompt blocks), and, with prefix caching, the blocks kept for their contents. Nothing else allocates
or frees.

A block is, at any time, in exactly one of these states:

    FREE ──grow──▶ HELD (refs > 0) ──last holder goes, block unnamed──▶ FREE
                      │  ▲
     commit names it  │  │ attach (a prompt that names it)
                      ▼  │
                   HELD, named ──last holder goes──▶ CACHED (refs 0, named) ──evict, when grow needs room──▶ FREE

A block is named (`prefix.block_names`) once its K/V are final: it is full and its tokens are computed
(`commit`). Only full blocks are named, so a partly filled block is never shared. A cached block keeps its K/V
for the next prompt that starts the same way; it counts as available (`num_free`), and is evicted least
recently released first, and of one sequence's blocks its last (the leaf) first, so that a cached prefix stays
whole for as long as possible. A name maps to one block: a second block computed with the same contents (two
requests prefilled at once) stays unnamed and is freed as usual.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .prefix import block_names

if TYPE_CHECKING:
    from .offload import OffloadTier


@dataclass(frozen=True, slots=True)
class Match:
    """The cached blocks a sequence's tokens start with: their ids and names, in order."""

    blocks: list[int] = field(default_factory=list)
    names: list[bytes] = field(default_factory=list)
    reclaimed: int = 0  # how many of them are cached (nobody holds them): attaching takes them off `num_free`


NO_MATCH = Match()


@dataclass(frozen=True, slots=True)
class CacheChanges:
    """The prefix cache's changes since the batch before (`seq` numbers the batches), or, `snapshot`, every
    named block at batch `seq`: (name, parent name, b"" for a prompt's first block) stored, names removed."""

    seq: int
    stored: list[tuple[bytes, bytes]]
    removed: list[bytes]
    snapshot: bool = False


@dataclass(slots=True)
class CacheCounters:
    """What prefix caching did, in tokens and blocks (counters, for metrics)."""

    queries: int = 0  # tokens of the sequences looked up
    hits: int = 0  # of them, tokens found cached
    evictions: int = 0  # cached blocks reused for other contents
    restored: int = 0  # tokens of blocks copied back from the second tier (`offload.OffloadTier`)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, seed: bytes | None = None) -> None:
        """`seed`: the model's identity (`prefix.model_seed`); None: no prefix caching."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.seed = seed
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[str, list[int]] = {}
        self._refs = [0] * num_blocks  # how many tables hold each block
        self._names: dict[str, list[bytes]] = {}  # per sequence, the names of its first full blocks
        self._block_of: dict[bytes, int] = {}  # name -> the block that holds it
        self._name_of: dict[int, bytes] = {}  # block -> its name
        self._cached: OrderedDict[int, None] = OrderedDict()  # named blocks nobody holds, eviction order first
        self._parent: dict[bytes, bytes] = {}  # name -> its parent's name (b"": a prompt's first block)
        self.counters = CacheCounters()
        # The second tier (`offload.OffloadTier`, set by the engine once its pool exists): evicted blocks go there,
        # and a match copies them back.
        self.tier: OffloadTier | None = None
        # Names stored and removed since `take_changes` (kept only once someone takes them: `record_changes`).
        self._stored: list[tuple[bytes, bytes]] | None = None
        self._removed: list[bytes] = []

    def record_changes(self) -> None:
        """From now on names stored and removed are kept for `take_changes` (call it after every operation:
        nothing else bounds them)."""
        self._stored = []

    def take_changes(self) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
        """The names stored (with their parents) and removed since the last call, in order."""
        stored, removed = self._stored or [], self._removed
        if self._stored is not None:
            self._stored, self._removed = [], []
        return stored, removed

    def named(self) -> list[tuple[bytes, bytes]]:
        """Every named block, (name, parent), in the order they were named."""
        return list(self._parent.items())

    @property
    def caching(self) -> bool:
        return self.seed is not None

    @property
    def num_free(self) -> int:
        """Blocks a request may take: free ones and cached ones (evicted when taken)."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached(self) -> int:
        """Blocks named for their contents, held or not."""
        return len(self._block_of)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, seq_id: str) -> list[int]:
        return self._tables.get(seq_id, [])

    def refs(self, block: int) -> int:
        """How many sequences (or reservations) hold `block`."""
        return self._refs[block]

    def can_hold(self, seq_id: str, num_tokens: int, match: Match = NO_MATCH) -> bool:
        """Whether the sequence could grow to hold `num_tokens` tokens with the blocks available now, after
        attaching `match` (a forked sequence's shared blocks are in its table, so they count as held)."""
        held = len(self.table(seq_id)) + len(match.blocks)
        return self.blocks_for(num_tokens) - held <= self.num_free - match.reclaimed

    def match(self, token_ids: list[int], limit: int | None = None) -> Match:
        """The longest run of cached blocks `token_ids` start with, short of its last token (whose logits the
        sequence needs: it is always computed), and of `limit` blocks when given."""
        if self.seed is None:
            return NO_MATCH
        blocks: list[int] = []
        names: list[bytes] = []
        most = (len(token_ids) - 1) // self.block_size
        if limit is not None:
            most = min(most, limit)
        parent = b""
        for name in block_names(self.seed, token_ids, self.block_size, limit=most):
            block = self._block_of.get(name)
            if block is None and self.tier is not None and name in self.tier:
                block = self._restore(name, parent, blocks)
            if block is None:
                break
            blocks.append(block)
            names.append(name)
            parent = name
        return Match(blocks, names, sum(1 for b in blocks if b in self._cached))

    def _restore(self, name: bytes, parent: bytes, keep: list[int]) -> int | None:
        """A block named `name` again, its K/V copied back from the second tier, cached (nobody holds it yet);
        None when no block is free or evictable but those of `keep` (the match so far)."""
        block = self._take(exclude=keep)
        if block is None:
            return None
        self.tier.load(name, block)
        self._refs[block] = 0
        self._block_of[name] = block
        self._name_of[block] = name
        self._parent[name] = parent
        if self._stored is not None:
            self._stored.append((name, parent))
        self._cached[block] = None
        self.counters.restored += self.block_size
        return block

    def attach(self, seq_id: str, match: Match, num_tokens: int, count: bool = True) -> None:
        """Starts `seq_id`'s table with the matched blocks (their K/V are its first tokens'), and counts the
        lookup of its `num_tokens` tokens (unless not `count`: a hold that is not a request's lookup)."""
        if self._tables.get(seq_id):
            raise ValueError(f"{seq_id}: already holds blocks")
        if count:
            self.counters.queries += num_tokens
            self.counters.hits += len(match.blocks) * self.block_size
        for block in match.blocks:
            if not self._refs[block]:
                del self._cached[block]
            self._refs[block] += 1
        self._tables[seq_id] = list(match.blocks)
        self._names[seq_id] = list(match.names)

    def cached_tokens(self, seq_id: str) -> int:
        """The tokens of `seq_id`'s named blocks: those whose K/V it attached or has computed."""
        return len(self._names.get(seq_id, ())) * self.block_size

    def holds_prefix(self, seq_id: str, token_ids: list[int]) -> bool:
        """Whether `token_ids` start with the tokens of the named blocks `seq_id` holds (the cached blocks a
        reservation attached hold some prompt's K/V: only that prompt may be decoded from them)."""
        names = self._names.get(seq_id)
        if not names or self.seed is None:
            return True
        return block_names(self.seed, token_ids, self.block_size, limit=len(names)) == names

    def commit(self, seq_id: str, token_ids: list[int], num_computed: int) -> None:
        """Names the sequence's full blocks whose tokens are all computed (`num_computed` of `token_ids`): from
        now on a prompt that starts with those tokens may attach them."""
        if self.seed is None:
            return
        table = self._tables.get(seq_id)
        if not table:
            return
        known = self._names.setdefault(seq_id, [])
        full = min(num_computed // self.block_size, len(table))
        if full <= len(known):
            return
        names = block_names(self.seed, token_ids, self.block_size, start=known, limit=full)
        for i in range(len(known), full):
            block, name = table[i], names[i]
            if name not in self._block_of and block not in self._name_of:
                self._block_of[name] = block
                self._name_of[block] = name
                parent = names[i - 1] if i else b""
                self._parent[name] = parent
                if self._stored is not None:
                    self._stored.append((name, parent))
        self._names[seq_id] = names

    def grow(self, seq_id: str, num_tokens: int) -> None:
        table = self._tables.setdefault(seq_id, [])
        missing = self.blocks_for(num_tokens) - len(table)
        if missing > self.num_free:
            raise RuntimeError(f"{seq_id}: {missing} blocks needed, {self.num_free} free (check can_hold first)")
        for _ in range(missing):
            block = self._take()
            self._refs[block] = 1
            table.append(block)

    def fork(self, parent_id: str, child_id: str, num_blocks: int) -> None:
        """Starts `child_id`'s table with the parent's first `num_blocks` blocks, shared: neither may write
        into them afterwards (the caller shares only full blocks whose K/V are final)."""
        if self._tables.get(child_id):
            raise ValueError(f"{child_id}: already holds blocks")
        parent = self._tables.get(parent_id, [])
        if not 0 <= num_blocks <= len(parent):
            raise ValueError(f"{parent_id}: holds {len(parent)} blocks, {num_blocks} to share")
        shared = parent[:num_blocks]
        for block in shared:
            self._refs[block] += 1
        self._tables[child_id] = shared
        self._names[child_id] = self._names.get(parent_id, [])[:num_blocks]

    def free(self, seq_id: str) -> int:
        """Drops the sequence's hold on its blocks; freeing twice is harmless. Blocks no one else holds become
        available again (cached, if named). Returns how many did."""
        table = self._tables.pop(seq_id, [])
        self._names.pop(seq_id, None)
        before = self.num_free
        for block in reversed(table):  # the leaf first: evicted first
            self._refs[block] -= 1
            if not self._refs[block]:
                if block in self._name_of:
                    self._cached[block] = None
                else:
                    self._free.append(block)
        return self.num_free - before

    def flush(self) -> int:
        """Forgets every cached block nobody holds (they become free), and the second tier; returns how many
        blocks of the pool."""
        if self.tier is not None:
            self.tier.clear()
        n = len(self._cached)
        while self._cached:
            block, _ = self._cached.popitem(last=False)
            self._forget(block)
            self._free.append(block)
        return n

    def _take(self, exclude: list[int] | None = None) -> int | None:
        """A free block, else the least recently released cached one (its K/V to the second tier, if any),
        other than those of `exclude`: None if there is none (with no `exclude`, callers checked first)."""
        if self._free:
            return self._free.popleft()
        block = next((b for b in self._cached if not exclude or b not in exclude), None)
        if block is None:
            if exclude is None:
                raise RuntimeError("no block free or cached (check can_hold first)")
            return None
        del self._cached[block]
        if self.tier is not None:
            name = self._name_of[block]
            self.tier.store(name, self._parent[name], block)
        self._forget(block)
        self.counters.evictions += 1
        return block

    def _forget(self, block: int) -> None:
        name = self._name_of.pop(block)
        del self._block_of[name]
        del self._parent[name]
        if self._stored is not None:
            self._removed.append(name)
