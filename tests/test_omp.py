"""One OpenMP team per process (engine/omp.py): threads set serial run torch's ops without a team of their own,
and a node's engine is built on the thread that runs it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading

import pytest

from baton.engine.async_engine import AsyncEngine
from baton.engine.omp import _runtime

pytestmark = pytest.mark.skipif(_runtime() is None, reason="no OpenMP runtime found in this process")

# Counts the process's threads after each kind of thread has run one parallel op (1M elements: far above torch's
# grain). A team of two threads adds one worker to its thread; a serial thread adds none.
SCRIPT = textwrap.dedent("""
    import os, sys, threading
    from concurrent.futures import ThreadPoolExecutor
    import torch
    from baton.engine.omp import serial_torch

    serial = sys.argv[1] == "serial"
    torch.set_num_threads(2)
    def count():
        return len(os.listdir("/proc/self/task"))
    before = count()
    if serial:
        serial_torch()
    x = torch.ones(1 << 20)
    (x + x).sum()
    after_main = count()
    done, engine_threads = threading.Event(), []
    def engine():
        (x + x).sum()
        engine_threads.append(torch.get_num_threads())
        done.set()
        threading.Event().wait()  # alive, as an engine thread is, while the others are counted
    threading.Thread(target=engine, daemon=True).start()
    done.wait()
    after_engine = count()
    pool = ThreadPoolExecutor(1, initializer=serial_torch if serial else None)
    pool.submit(lambda: (x + x).sum()).result()
    print(after_main - before, after_engine - after_main, count() - after_engine, engine_threads[0])
""")


def thread_counts(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    return [int(n) for n in out.split()]


def test_serial_threads_leave_the_engine_thread_the_only_team():
    # Without serial_torch, the main thread and the executor's thread each start a worker of their own.
    assert thread_counts("teams") == [1, 2, 2, 2]
    # With it: the main thread and the executor's thread run alone; only the "engine" thread has a team, and
    # the main thread's setting did not change what other threads are given (the engine's count stays 2).
    assert thread_counts("serial") == [0, 2, 1, 2]


def test_an_engine_started_with_start_is_built_on_its_own_thread(stories_path):
    from baton.engine import EngineConfig, LLMEngine

    async def main():
        built_on = []

        def build():
            built_on.append(threading.get_ident())
            return LLMEngine(EngineConfig(model=str(stories_path), num_kv_blocks=16))

        engine = await AsyncEngine.start(build, asyncio.get_running_loop())
        try:
            ran_on = await engine.call(threading.get_ident)
        finally:
            await engine.close()
        assert built_on == [ran_on] and ran_on != threading.get_ident()

    asyncio.run(main())


def test_a_failed_build_is_raised_by_start():
    async def main():
        def build():
            raise ValueError("no such model")

        with pytest.raises(ValueError, match="no such model"):
            await AsyncEngine.start(build, asyncio.get_running_loop())

    asyncio.run(main())
