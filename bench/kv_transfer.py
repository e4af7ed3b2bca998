"""KV transfer throughput: Baton's pair channel (kvtransfer over gloo) against a raw loopback TCP socket.

Two spawned processes, a decode side (hosts the KV store, receives into its pool) and a prefill side (sends
from its pool). For each payload (1, 4, 16, 64 MiB), as one run of 64 KiB bf16 blocks of one layer, in the
same run and interleaved repetition by repetition:
  - tcp:        `socket.sendall` of the source blocks / `recv_into` straight into the destination blocks;
  - kv:         `KVSender.send_layer` + `wait` / `receive` (the layer's blocks packed into one buffer, a copy);
  - gloo:       one bare `pg.send` / `pg.recv` of the same blocks (what kv costs above gloo itself);
  - kv ahead:   kv with the sender made (its header posted) 2 ms before the clock starts, as in a prefill
                where the header is checked while layer 0 is computed: the data path alone;
  - kv gather:  kv with scattered source blocks (gathered by `index_select` before sending).
Each repetition starts when the receiver says "go" over a pipe and ends when the receiver has every byte, so
both methods pay the same start-up signal. Median (and best) of the repetitions after a warm-up.
Also the time to set up a pair group: the first (store connection + gloo rendezvous) and re-created under a
new generation, measured on the side that arrives second.

    python bench/kv_transfer.py [--reps 15] [--warmup 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import queue
import socket
import statistics
import threading
import time
from pathlib import Path

import torch

from baton.bench.engine_throughput import machine
from baton.kvtransfer.channel import DECODE_RANK, PREFILL_RANK, KVStoreHost, PairChannels
from baton.kvtransfer.receiver import receive
from baton.kvtransfer.sender import KVSender, Staging

SIZES_MIB = (1, 4, 16, 64)
BLOCK = (2, 16, 8, 128)  # [K/V, block_size, kv_heads, head_dim]
DTYPE = torch.bfloat16
BLOCK_BYTES = 2 * 16 * 8 * 128 * 2  # 64 KiB
MAX_BLOCKS = max(SIZES_MIB) * (1 << 20) // BLOCK_BYTES
GENERATIONS = 6  # generation 0 is the first set-up, 1.. are re-creations
TIMEOUT = 60.0


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


def _bytes_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def _tune(sock: socket.socket, bufsize: int) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if bufsize:  # what gloo asks for (32 MiB, capped by net.core.[rw]mem_max); 0 keeps the kernel's autotuning
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)


def decode_main(conn, out, reps: int, warmup: int, bufsize: int) -> None:
    torch.set_num_threads(1)
    host = KVStoreHost("127.0.0.1", 0)
    channels = PairChannels("decode", local_store=host)
    lsock = socket.create_server(("127.0.0.1", 0))
    _tune(lsock, bufsize)
    conn.send((host.address, lsock.getsockname()[1]))
    sock, _ = lsock.accept()
    _tune(sock, bufsize)
    setup: list[float] = []
    pg = None
    for gen in range(GENERATIONS):
        holder: dict = {}
        th = threading.Thread(target=lambda g=gen: holder.setdefault(
            "pg", channels.get("prefill", g, host.address, DECODE_RANK, TIMEOUT)))
        th.start()
        time.sleep(0.05)  # in the rendezvous already: the prefill side's time is then the set-up cost
        conn.send("go")
        th.join()
        pg = holder["pg"]
        setup.append(conn.recv())
    pool = torch.zeros((MAX_BLOCKS + 8, *BLOCK), dtype=DTYPE)
    tag = 0
    results = []
    for mib in SIZES_MIB:
        n = mib * (1 << 20) // BLOCK_BYTES
        runs = [(8, n)]  # destination: one run, not at the start of the pool
        dst_view = _bytes_view(pool[8:8 + n])
        times: dict[str, list[float]] = {"tcp": [], "gloo": [], "kv": [], "kv_ahead": [], "kv_gather": []}
        for rep in range(warmup + reps):
            for method in times:
                tag += 1
                if method == "kv_ahead":
                    # As in a prefill: the sender is made (header posted) before layer 0 is computed; the
                    # clock starts when layer 0 is ready to go.
                    conn.send(("prepare", method, mib, tag))
                    done: dict = {}

                    def recv_ahead(tag=tag) -> None:
                        done["bytes"] = receive(pg, PREFILL_RANK, tag, [pool], runs, TIMEOUT)
                        done["at"] = time.perf_counter()

                    th = threading.Thread(target=recv_ahead)
                    th.start()
                    time.sleep(0.002)  # "computing layer 0"
                    t0 = time.perf_counter()
                    conn.send(("go", method, mib, tag))
                    th.join()
                    assert done["bytes"] == n * BLOCK_BYTES
                    if rep >= warmup:
                        times[method].append(done["at"] - t0)
                    continue
                t0 = time.perf_counter()
                conn.send(("go", method, mib, tag))
                if method == "tcp":
                    _recv_exact(sock, dst_view)
                    nbytes = len(dst_view)
                elif method == "gloo":
                    pg.recv([pool[8:8 + n]], PREFILL_RANK, tag).wait(datetime.timedelta(seconds=TIMEOUT))
                    nbytes = len(dst_view)
                else:
                    nbytes = receive(pg, PREFILL_RANK, tag, [pool], runs, TIMEOUT)
                dt = time.perf_counter() - t0
                assert nbytes == n * BLOCK_BYTES
                if rep >= warmup:
                    times[method].append(dt)
        row = {"mib": mib, "bytes": n * BLOCK_BYTES}
        for method, ts in times.items():
            row[f"{method}_median_gb_s"] = n * BLOCK_BYTES / statistics.median(ts) / 1e9
            row[f"{method}_best_gb_s"] = n * BLOCK_BYTES / min(ts) / 1e9
        row["ratio_median"] = row["kv_median_gb_s"] / row["tcp_median_gb_s"]
        row["ratio_best"] = row["kv_best_gb_s"] / row["tcp_best_gb_s"]
        row["ahead_ratio_median"] = row["kv_ahead_median_gb_s"] / row["tcp_median_gb_s"]
        row["gloo_ratio_median"] = row["gloo_median_gb_s"] / row["tcp_median_gb_s"]
        row["gather_ratio_median"] = row["kv_gather_median_gb_s"] / row["tcp_median_gb_s"]
        results.append(row)
    conn.send(None)
    conn.recv()  # the prefill side is done with the group
    out.put({"setup_s": setup, "results": results})
    sock.close()
    lsock.close()
    channels.close()
    host.close()


def prefill_main(conn, bufsize: int) -> None:
    torch.set_num_threads(1)
    channels = PairChannels("prefill")
    store_address, tcp_port = conn.recv()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    _tune(sock, bufsize)
    sock.connect(("127.0.0.1", tcp_port))
    pg = None
    for gen in range(GENERATIONS):
        conn.recv()
        t0 = time.perf_counter()
        new = channels.get("decode", gen, store_address, PREFILL_RANK, TIMEOUT)
        conn.send(time.perf_counter() - t0)
        pg = new  # the old generation goes here, untimed (destroying a gloo group takes ~10 ms)
    gen_ = torch.Generator().manual_seed(0)
    pool = torch.randn((2 * MAX_BLOCKS + 8, *BLOCK), generator=gen_).to(DTYPE)
    ahead: KVSender | None = None
    staging = Staging()  # as a prefill node reuses its packed-layer buffers
    while (msg := conn.recv()) is not None:
        what, method, mib, tag = msg
        n = mib * (1 << 20) // BLOCK_BYTES
        if what == "prepare":
            ahead = KVSender(pg, DECODE_RANK, tag, list(range(n)), [(8, n)], num_layers=1, pool=pool, staging=staging)
            continue
        if method == "kv_ahead":
            ahead.send_layer(0, pool)
            ahead.wait(TIMEOUT)
            ahead = None
            continue
        if method == "tcp":
            sock.sendall(_bytes_view(pool[:n]))
            continue
        if method == "gloo":
            pg.send([pool[:n]], DECODE_RANK, tag).wait(datetime.timedelta(seconds=TIMEOUT))
            continue
        src = list(range(n)) if method == "kv" else list(range(2 * n - 2, -1, -2))  # scattered, reversed
        sender = KVSender(pg, DECODE_RANK, tag, src, [(8, n)], num_layers=1, staging=staging)
        sender.send_layer(0, pool)
        sender.wait(TIMEOUT)
    del pg
    conn.send("done")
    sock.close()
    channels.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tcp-bufsize", type=int, default=0,
                    help="SO_SNDBUF/SO_RCVBUF for the TCP baseline; 0 (default) keeps the kernel's autotuning")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    out = ctx.Queue()
    procs = [ctx.Process(target=decode_main, args=(a, out, args.reps, args.warmup, args.tcp_bufsize)),
             ctx.Process(target=prefill_main, args=(b, args.tcp_bufsize))]
    try:
        for p in procs:
            p.start()
        figures = None
        deadline = time.monotonic() + 600
        while figures is None:
            try:
                figures = out.get(timeout=1)
            except queue.Empty:
                if not all(p.is_alive() for p in procs) or time.monotonic() > deadline:
                    raise SystemExit("a benchmark process died or hung; see its traceback above") from None
        for p in procs:
            p.join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()

    setup = figures["setup_s"]
    first, again = setup[0], statistics.median(setup[1:])
    where = machine("1 thread per process")
    print(f"machine: {where}")
    print(f"pair group set-up: first {first * 1e3:.1f} ms, re-created under a new generation "
          f"{again * 1e3:.2f} ms (median of {len(setup) - 1})")
    print(f"payload: one run of 64 KiB bf16 blocks, one layer; median (best) of {args.reps} after "
          f"{args.warmup} warm-up")
    print(f"{'MiB':>4} {'TCP GB/s':>14} {'gloo GB/s':>14} {'kv GB/s':>14} {'kv/TCP':>12} "
          f"{'kv ahead GB/s':>14} {'ahead/TCP':>9} {'kv gather GB/s':>14}")
    for r in figures["results"]:
        print(f"{r['mib']:>4} {r['tcp_median_gb_s']:>6.2f} ({r['tcp_best_gb_s']:>5.2f}) "
              f"{r['gloo_median_gb_s']:>6.2f} ({r['gloo_best_gb_s']:>5.2f}) "
              f"{r['kv_median_gb_s']:>6.2f} ({r['kv_best_gb_s']:>5.2f}) "
              f"{r['ratio_median']:>5.2f} ({r['ratio_best']:>4.2f}) "
              f"{r['kv_ahead_median_gb_s']:>6.2f} ({r['kv_ahead_best_gb_s']:>5.2f}) "
              f"{r['ahead_ratio_median']:>9.2f} "
              f"{r['kv_gather_median_gb_s']:>6.2f} ({r['kv_gather_best_gb_s']:>5.2f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(
            machine=where, reps=args.reps, warmup=args.warmup, block_bytes=BLOCK_BYTES, dtype=str(DTYPE),
            setup_first_s=first, setup_recreate_median_s=again, setup_all_s=setup,
            results=figures["results"]), indent=2) + "\n")


if __name__ == "__main__":
    main()
