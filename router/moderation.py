"""An external moderation service behind the content-filter interface (rules.py, `ContentFilter`): each prompt is
sent to it before anything else is done with the request, in the shape of OpenAI's moderation API (POST
`{"input": text}`, answer `{"results": [{"flagged": bool, "categories": {name: bool}}]}`), which most
moderation servers and gateways speak. A flagged prompt is refused INVALID_ARGUMENT naming the service and the
categories. When the service cannot answer (down, slow past its timeout, an answer that does not parse), the
router does what `fail_open` says: admit the prompt unscreened, or refuse it UNAVAILABLE. Output is not sent to
it (a call per streamed chunk would cost more than the generation); output rules are rules.py's."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiohttp

from baton.common.keys import KeyRecord

from .rules import Blocked, FilterUnavailable, OutputScreen

log = logging.getLogger(__name__)


class HttpModeration:
    def __init__(self, url: str, *, fail_open: bool = False, timeout: float = 2.0) -> None:
        self.url = url
        self.fail_open = fail_open
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def check_prompt(self, text: Callable[[], str], key: KeyRecord | None) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            async with self._session.post(self.url, json={"input": text()}) as response:
                response.raise_for_status()
                body = await response.json(content_type=None)
            result = body["results"][0]
            flagged = result["flagged"]
            if not isinstance(flagged, bool):
                raise ValueError(f"'flagged' is {flagged!r}")
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, IndexError, TypeError) as e:
            if self.fail_open:
                log.warning("moderation service %s: %s; the prompt goes unscreened (fail open)", self.url, e)
                return
            raise FilterUnavailable(f"the moderation service cannot screen the prompt now ({type(e).__name__})") \
                from None
        if flagged:
            categories = sorted(name for name, on in (result.get("categories") or {}).items() if on is True)
            raise Blocked("moderation", ", ".join(categories))

    def screen(self, key: KeyRecord | None) -> OutputScreen | None:
        return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class Filters:
    """Several content filters as one: a prompt passes each in turn; the output goes through the first screen
    any of them gives (only the rules screen output)."""

    def __init__(self, filters: list) -> None:
        self.filters = filters

    async def check_prompt(self, text: Callable[[], str], key: KeyRecord | None) -> None:
        for f in self.filters:
            await f.check_prompt(text, key)

    def screen(self, key: KeyRecord | None) -> OutputScreen | None:
        return next((s for f in self.filters if (s := f.screen(key)) is not None), None)
