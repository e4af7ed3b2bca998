"""A KV-transfer peer SIGKILLed mid-send, again and again: how soon the decode side's receive fails, and
whether another pair, transferring all along on the same decode side, notices anything.

Each round a fresh "prefill" process takes a new generation of its pair channel with the decode side (this
process), sends the first layers of a transfer and is SIGKILLed while the rest are on their way; the decode
side's receive must fail (a broken channel, never a hang until the transfer timeout), drop that generation,
and the next round's process must get a channel under a newer one. A second prefill process sends complete
transfers to the same decode side throughout; every one of them must land, byte for byte.

    python bench/peer_kill.py [--kills 100] [--layers 8] [--blocks 32] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch

from baton.bench.engine_throughput import machine
from baton.bench.runner import git_commit
from baton.engine.model_runner import KVCache
from baton.kvtransfer.channel import DECODE_RANK, PREFILL_RANK, KVStoreHost, KVTransferError, PairChannels
from baton.kvtransfer.receiver import receive
from baton.kvtransfer.sender import KVSender, coalesce

DECODE_ID = "decode-0"
TIMEOUT = 60.0  # the transfer timeout: every detection below should come far sooner
BLOCK_SIZE, KV_HEADS, HEAD_DIM = 16, 8, 64  # 64 KiB per block and layer in float32


def cache(layers: int, blocks: int, seed: int) -> KVCache:
    kv = KVCache(SimpleNamespace(num_layers=layers, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM), blocks, BLOCK_SIZE,
                 torch.float32, "cpu")
    kv.storage.copy_(torch.randn(kv.storage.shape, generator=torch.Generator().manual_seed(seed)))
    return kv


def prefill_main(node_id: str, store: str, layers: int, blocks: int, conn) -> None:
    """A prefill node's sending side. Commands: ("send", generation, transfer id, stall): sends every block
    of every layer, or (stall) layer 0 and then says so and waits to be killed."""
    torch.set_num_threads(1)
    channels, kv = PairChannels(node_id), cache(layers, blocks, seed=7)
    runs = coalesce(list(range(blocks)))
    while (msg := conn.recv()) is not None:
        _, generation, transfer, stall = msg
        try:
            pg = channels.get(DECODE_ID, generation, store, PREFILL_RANK, TIMEOUT)
            sender = KVSender(pg, DECODE_RANK, transfer, list(range(blocks)), runs, num_layers=layers)
            for layer in range(layers):
                sender.send_layer(layer, kv.pools[layer])
                if stall and layer == 0:
                    conn.send(("sending", None))
                    time.sleep(3600)  # killed here, with the other layers still to come
            conn.send(("sent", sender.wait(TIMEOUT)))
        except Exception as e:  # noqa: BLE001 - the parent reports it
            conn.send(("error", f"{type(e).__name__}: {e}"))
    channels.close()


class Prefill:
    def __init__(self, node_id: str, store: str, args) -> None:
        ctx = mp.get_context("spawn")
        self.node_id = node_id
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=prefill_main, args=(node_id, store, args.layers, args.blocks, child),
                                daemon=True)
        self.proc.start()
        child.close()

    def reply(self) -> tuple[str, object]:
        if not self.conn.poll(TIMEOUT):
            raise TimeoutError(f"{self.node_id} did not answer in {TIMEOUT:.0f} s")
        return self.conn.recv()

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def stop(self) -> None:
        try:
            self.conn.send(None)
            self.proc.join(10)
        except OSError:
            pass
        self.kill()


@dataclass(slots=True)
class Round:
    generation: int
    detected_ms: float  # SIGKILL to the failed receive
    error: str


def receive_one(channels: PairChannels, store: str, peer: str, generation: int, transfer: str, kv: KVCache,
                blocks: int) -> int:
    pg = channels.get(peer, generation, store, DECODE_RANK, TIMEOUT)
    return receive(pg, PREFILL_RANK, transfer, kv.pools, coalesce(list(range(blocks))), TIMEOUT)


def steady_loop(channels: PairChannels, store: KVStoreHost, args, stop: threading.Event, counts: dict) -> None:
    """The undisturbed pair: complete transfers, one after another, each checked against the sender's blocks."""
    peer = Prefill("prefill-steady", store.address, args)
    kv, want = cache(args.layers, args.blocks, seed=0), cache(args.layers, args.blocks, seed=7)
    generation = channels.next_generation("prefill-steady", store.address, TIMEOUT)
    try:
        while not stop.is_set():
            transfer = f"steady-{counts['ok'] + counts['failed']}"
            peer.conn.send(("send", generation, transfer, False))
            try:
                receive_one(channels, store.address, "prefill-steady", generation, transfer, kv, args.blocks)
                status, value = peer.reply()
                landed = torch.equal(kv.storage, want.storage)
                counts["ok" if status == "sent" and landed else "failed"] += 1
                kv.storage.zero_()
            except (KVTransferError, TimeoutError) as e:
                counts["failed"] += 1
                counts.setdefault("errors", []).append(str(e))
                return
    finally:
        peer.stop()


def run(args) -> dict:
    torch.set_num_threads(1)
    with KVStoreHost("127.0.0.1", 0) as store:
        channels = PairChannels(DECODE_ID, local_store=store)
        stop, counts = threading.Event(), {"ok": 0, "failed": 0}
        steady = threading.Thread(target=steady_loop, args=(channels, store, args, stop, counts), daemon=True)
        steady.start()
        rounds: list[Round] = []
        kv = cache(args.layers, args.blocks, seed=0)
        victim = Prefill("prefill-victim", store.address, args)
        try:
            for i in range(args.kills):
                generation = channels.next_generation("prefill-victim", store.address, TIMEOUT)
                victim.conn.send(("send", generation, f"victim-{i}", True))
                outcome: dict = {}

                def receiving() -> None:
                    try:
                        receive_one(channels, store.address, "prefill-victim", generation, f"victim-{i}", kv,
                                    args.blocks)
                        outcome["error"] = ""
                    except KVTransferError as e:
                        outcome["error"] = str(e)
                    outcome["at"] = time.monotonic()

                thread = threading.Thread(target=receiving, daemon=True)
                thread.start()
                status, detail = victim.reply()
                if status != "sending":
                    raise RuntimeError(f"round {i}: the victim did not start sending: {detail}")
                killed = time.monotonic()
                victim.kill()
                thread.join(TIMEOUT + 5)
                if thread.is_alive() or not outcome.get("error"):
                    raise RuntimeError(f"round {i}: the receive did not fail ({outcome})")
                channels.drop("prefill-victim", generation)  # what the decode node does on a failed route
                rounds.append(Round(generation, (outcome["at"] - killed) * 1e3, outcome["error"][:160]))
                victim = Prefill("prefill-victim", store.address, args)  # the node restarted, same id
                print(f"round {i + 1}/{args.kills}: detected in {rounds[-1].detected_ms:.1f} ms", flush=True)
        finally:
            victim.stop()
            stop.set()
            steady.join(TIMEOUT)
            channels.close()
    detected = sorted(r.detected_ms for r in rounds)
    return {
        "machine": machine(), "commit": git_commit(), "options": vars(args),
        "kills": len(rounds),
        "detected_ms": {"p50": statistics.median(detected), "p99": detected[min(len(detected) - 1,
                                                                                  int(0.99 * len(detected)))],
                        "max": detected[-1]},
        "generations_increase": all(a.generation < b.generation for a, b in zip(rounds, rounds[1:])),
        "steady_pair": counts,
        "rounds": [asdict(r) for r in rounds],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=32, help="blocks per transfer (64 KiB per layer each)")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    result = run(args)
    d = result["detected_ms"]
    print(f"{result['kills']} kills: receive failed {d['p50']:.1f} ms (p50), {d['p99']:.1f} ms (p99), "
          f"{d['max']:.1f} ms (max) after the SIGKILL; generations always newer: {result['generations_increase']}; "
          f"the other pair: {result['steady_pair']['ok']} transfers landed, {result['steady_pair']['failed']} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
