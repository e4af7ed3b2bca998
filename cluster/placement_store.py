"""The placement in etcd, its history, and a watch on it.

    /baton/<cluster>/placement                      the placement (Placement.to_json); `baton launch` watches it
    /baton/<cluster>/placement-history/<seq:08d>    one record per `baton place` or `--remove`: when (UTC), by whom,
                                                    what changed against the placement it replaced

A write is one transaction that also checks that nothing moved since it was read (the placement's mod revision,
a free sequence number): two operators placing at once both get a record, in order, each against the placement
it really replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import getpass
import json
import logging
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import aetcd

# One etcd client configuration for all of Baton (reconnect backoff, keepalives): membership's.
from baton.common.membership import close_quietly, etcd_client
from baton.cluster.placement import Placement, PlacementError

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 5.0
_WRITE_TRIES = 20  # transactions that lost a race with another writer before giving up


def placement_key(cluster: str) -> bytes:
    return f"/baton/{cluster}/placement".encode()


def history_prefix(cluster: str) -> bytes:
    return f"/baton/{cluster}/placement-history/".encode()


@dataclass(frozen=True, slots=True)
class HistoryRecord:
    seq: int
    time: str  # UTC, ISO 8601
    action: str  # "place" or "remove"
    by: str  # user@host of the writer
    changes: tuple[str, ...]
    reason: str = ""  # why (the planner says what it saw and decided)

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> HistoryRecord:
        obj = json.loads(data)
        return cls(seq=int(obj["seq"]), time=str(obj["time"]), action=str(obj["action"]), by=str(obj["by"]),
                   changes=tuple(obj["changes"]), reason=str(obj.get("reason", "")))

    def lines(self) -> list[str]:
        return [f"{self.seq:>4}  {self.time}  {self.action} by {self.by}"] + [f"      {c}" for c in self.changes] + \
            ([f"      why: {self.reason}"] if self.reason else [])


def who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return f"{user}@{socket.gethostname()}"


class PlacementChanged(RuntimeError):
    """The placement is no longer the one a change was computed from (`place(..., based_on=...)`)."""


async def place(etcd_url: str, placement: Placement, by: str = "", reason: str = "",
                based_on: Placement | None = None) -> HistoryRecord:
    """Stores `placement` as its cluster's and records the change (and `reason`, when given). With `based_on`,
    only if the stored placement is still that one (PlacementChanged otherwise): a change computed from a
    placement never overwrites another made meanwhile."""
    return await _write(etcd_url, placement.cluster, placement, by or who(), reason, based_on)


async def remove(etcd_url: str, cluster: str, by: str = "") -> HistoryRecord | None:
    """Deletes the cluster's placement (every `baton launch` of it stops its processes); None if there was none."""
    return await _write(etcd_url, cluster, None, by or who())


async def read(etcd_url: str, cluster: str) -> Placement | None:
    client = etcd_client(etcd_url, RPC_TIMEOUT_S)
    try:
        got = await client.get(placement_key(cluster))
        return Placement.from_json(got.value) if got is not None else None
    finally:
        await close_quietly(client)


async def history(etcd_url: str, cluster: str) -> list[HistoryRecord]:
    client = etcd_client(etcd_url, RPC_TIMEOUT_S)
    try:
        result = await client.get_prefix(history_prefix(cluster))
        return sorted((HistoryRecord.from_json(kv.value) for kv in result), key=lambda r: r.seq)
    finally:
        await close_quietly(client)


async def _write(etcd_url: str, cluster: str, new: Placement | None, by: str, reason: str = "",
                 based_on: Placement | None = None) -> HistoryRecord | None:
    key = placement_key(cluster)
    client = etcd_client(etcd_url, RPC_TIMEOUT_S)
    tx = client.transactions
    try:
        for _ in range(_WRITE_TRIES):
            current = await client.get(key)
            if current is None and new is None:
                return None
            old = _readable(current.value) if current is not None else None
            if based_on is not None and old != based_on:
                raise PlacementChanged(f"the placement of {cluster} changed since it was read")
            taken = await client.get_prefix(history_prefix(cluster), keys_only=True)
            seq = 1 + max((int(kv.key.rpartition(b"/")[2]) for kv in taken), default=0)
            note = [] if current is None or old is not None else ["(the placement replaced could not be read)"]
            record = HistoryRecord(seq=seq, time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                   action="place" if new is not None else "remove", by=by,
                                   changes=tuple(note + changes(old, new)), reason=reason)
            record_key = history_prefix(cluster) + f"{seq:08d}".encode()
            unchanged = tx.mod(key) == current.mod_revision if current is not None else tx.version(key) == 0
            write = tx.put(key, new.to_json()) if new is not None else tx.delete(key)
            ok, _ = await client.transaction(compare=[unchanged, tx.version(record_key) == 0],
                                             success=[write, tx.put(record_key, record.to_json())], failure=[])
            if ok:
                return record
        raise RuntimeError(f"the placement of {cluster} kept changing under {_WRITE_TRIES} tries to write it")
    finally:
        await close_quietly(client)


def _readable(value: bytes) -> Placement | None:
    try:
        return Placement.from_json(value)
    except PlacementError as e:
        log.warning("the stored placement cannot be read: %s", e)
        return None


class PlacementWatch:
    """The placement key's value, kept current in the background: `await w.newer(version)` returns the next
    (version, value) after `version`, value None while there is no placement (only the latest counts: a
    caller that was busy skips what it missed). Like MembershipWatcher, it reconnects when the watch ends or
    fails; it then re-reads the key, so a compacted revision costs nothing."""

    def __init__(self, etcd_url: str, cluster: str) -> None:
        self._url = etcd_url
        self._key = placement_key(cluster)
        self.value: bytes | None = None
        self.version = 0  # bumped when the value changes
        self._changed = asyncio.Condition()
        self._task: asyncio.Task | None = None

    @classmethod
    async def start(cls, etcd_url: str, cluster: str) -> PlacementWatch:
        """Reads the key (raises aetcd.ClientError if etcd cannot be reached), then follows it."""
        w = cls(etcd_url, cluster)
        client = etcd_client(etcd_url, RPC_TIMEOUT_S)
        try:
            revision = await w._read(client)
        except BaseException:
            await close_quietly(client)
            raise
        w._task = asyncio.get_running_loop().create_task(w._run(client, revision), name="watch:placement")
        return w

    async def newer(self, version: int) -> tuple[int, bytes | None]:
        async with self._changed:
            await self._changed.wait_for(lambda: self.version > version)
            return self.version, self.value

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _read(self, client: aetcd.Client) -> int:
        # A range read of the one key: unlike get(), it carries the store's revision when the key is absent.
        result = await client.get_range(self._key, self._key + b"\0")
        await self._set(result[0].value if len(result) else None)
        return result.header.revision

    async def _set(self, value: bytes | None) -> None:
        # Every write counts, the same value too (and every re-read after a reconnect): placing a spec again
        # makes each launcher reconcile, which starts again the nodes that died since.
        async with self._changed:
            self.value = value
            self.version += 1
            self._changed.notify_all()

    async def _run(self, client: aetcd.Client, revision: int) -> None:
        backoff = 0.05
        while True:
            try:
                if revision == 0:
                    revision = await self._read(client)
                watch = await client.watch(self._key, start_revision=revision + 1)
                backoff = 0.05
                async for event in watch:
                    await self._set(event.kv.value if event.kind == aetcd.EventKind.PUT else None)
                    revision = event.kv.mod_revision
                log.warning("etcd watch on %s ended; reconnecting", self._key.decode())
            except asyncio.CancelledError:
                await close_quietly(client)
                raise
            except Exception as e:  # noqa: BLE001 - etcd down or restarting: retried below
                log.warning("etcd watch on %s failed (%s: %s); reconnecting", self._key.decode(), type(e).__name__, e)
            revision = 0  # re-read on the new connection: the store may have been compacted or replaced
            await close_quietly(client)
            await asyncio.sleep(backoff)  # pacing retries while etcd is down
            backoff = min(backoff * 2, 1.0)
            client = etcd_client(self._url, RPC_TIMEOUT_S)



# -- what changed, for the history ------------------------------------------------------------------
def changes(old: Placement | None, new: Placement | None) -> list[str]:
    """What a history record says about a new placement against the one before it, one line per change:
    `added decode-1 (decode on b, tp 4)`, `prefill-1: prefill -> decode`, `prefill-1: gpus [0, 1] -> [2, 3]`."""
    if new is None:
        return ["removed the placement" + (f" ({len(old.nodes())} nodes)" if old is not None else "")]
    before = old.nodes() if old is not None else {}
    after = new.nodes()
    out = []
    for name, (m, n) in after.items():
        if name not in before:
            out.append(f"added {name} ({n.role} on {m.name}, tp {n.tp})")
            continue
        (om, on) = before[name]
        if on.role != n.role:
            out.append(f"{name}: {on.role} -> {n.role}")
        if om.name != m.name:
            out.append(f"{name}: machine {om.name} -> {m.name}")
        out += [f"{name}: {line}" for line in _field_changes(on, n, skip=("name", "role"))]
    out += [f"removed {name} ({n.role} on {m.name})" for name, (m, n) in before.items() if name not in after]
    old_machines = {m.name: m for m in old.machines} if old is not None else {}
    for m in new.machines:
        om = old_machines.get(m.name)
        router = om.router if om is not None else None
        if m.router and not router:
            out.append(f"router on {m.name} (port {m.router.port})")
        elif router and not m.router:
            out.append(f"no router on {m.name}")
        elif router and m.router:
            out += [f"router on {m.name}: {line}" for line in _field_changes(router, m.router)]
        if om is not None:
            out += [f"machine {m.name}: {line}" for line in _field_changes(om, m, skip=("name", "router", "nodes"))]
    names = {m.name for m in new.machines}
    out += [f"removed machine {name}" for name in old_machines if name not in names]
    if old is not None:
        out += [f"model.{line}" for line in _field_changes(old.model, new.model)]
        out += [f"options.{line}" for line in _field_changes(old.options, new.options)]
        out += [f"etcd: {list(old.etcd)} -> {list(new.etcd)}"] if old.etcd != new.etcd else []
    return out or ["no change"]


def _field_changes(old: Any, new: Any, skip: tuple[str, ...] = ()) -> list[str]:
    return [f"{f.name} {_text(getattr(old, f.name))} -> {_text(getattr(new, f.name))}"
            for f in dataclasses.fields(new) if f.name not in skip and getattr(old, f.name) != getattr(new, f.name)]


def _text(value: Any) -> str:
    if isinstance(value, tuple):
        return str(list(value))
    return repr(value) if isinstance(value, str) else str(value)
