"""Background loops that outlive their own failures.

A loop that keeps a node correct (lease expiry, load reports, the router's readiness) must not stop for good
on its first exception: each pass is tried, a failure is logged with its traceback, and the loop goes on
after its interval. Only cancellation ends it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


async def every(seconds: float, step: Callable[[], Awaitable[object]], name: str,
                transient: tuple[type[BaseException], ...] = ()) -> None:
    """Runs `step()` now and then every `seconds` until cancelled; an exception is logged and the next pass
    runs. A `step` that loops by itself is restarted `seconds` after it fails. `transient`: errors expected
    now and then (etcd slow to answer on a loaded machine), logged in one line rather than with a traceback."""
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except transient as e:
            log.warning("%s failed (%s: %s); retrying in %.1f s", name, type(e).__name__, e, seconds)
        except Exception:  # noqa: BLE001 - logged; the loop must go on
            log.exception("%s failed; retrying in %.1f s", name, seconds)
        await asyncio.sleep(seconds)


async def retrying(attempt: Callable[[], Awaitable[T]], errors: tuple[type[BaseException], ...], timeout: float,
                   what: str) -> T:
    """`await attempt()`, tried again on `errors` (with a short backoff) until `timeout` seconds have passed:
    for start-up steps against a service that was started a moment ago on a busy machine (etcd)."""
    deadline = time.monotonic() + timeout
    delay = 0.1
    while True:
        try:
            return await attempt()
        except errors as e:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s failed (%s); retrying", what, e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
