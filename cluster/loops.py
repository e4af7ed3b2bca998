"""Background loops that outlive their own failures.

A loop that keeps a node correct (lease expiry, load reports, the router's readiness) must not stop for good
on its first exception: each pass is tried, a failure is logged with its traceback, and the loop goes on
after its interval. Only cancellation ends it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def every(seconds: float, step: Callable[[], Awaitable[object]], name: str) -> None:
    """Runs `step()` now and then every `seconds` until cancelled; an exception is logged and the next pass
    runs. A `step` that loops by itself is restarted `seconds` after it fails."""
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - logged; the loop must go on
            log.exception("%s failed; retrying in %.1f s", name, seconds)
        await asyncio.sleep(seconds)
