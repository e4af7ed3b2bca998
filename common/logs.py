"""Log lines of every Baton process: text (the default) or JSON lines, each with the id of the request it is
about when there is one.

The request id is carried by a context variable (`REQUEST_ID`): a server sets it where a request's handling
starts (the router from the client's id, a node from the id the router sent), and every line logged in that
task, and in the tasks it starts, carries it. A context variable is per task, so concurrent requests never
see each other's.
"""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar

REQUEST_ID: ContextVar[str] = ContextVar("baton_request_id", default="")
FORMATS = ("text", "json")


def client_request_id(internal_id: str) -> str:
    """The client's request id in the id a node sees ("<client id>#<attempt>", see router/admission.py)."""
    return internal_id.partition("#")[0]


class _WithRequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonLines(logging.Formatter):
    """One JSON object per line: time (RFC 3339, UTC), process, level, logger, message, request_id (when set),
    and the exception's traceback (when there is one)."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = {"time": f"{seconds}.{int(record.msecs):03d}Z", "process": self.process, "level": record.levelname,
                "logger": record.name, "message": record.getMessage()}
        if getattr(record, "request_id", ""):
            line["request_id"] = record.request_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(process: str, fmt: str = "text", level: int = logging.INFO) -> None:
    """The process's logging, once, at its start: `fmt` is "text" (a line with time, process, level, and the
    request id in brackets when set) or "json"."""
    if fmt not in FORMATS:
        raise ValueError(f"log_format: must be one of {FORMATS}, got {fmt!r}")
    handler = logging.StreamHandler()
    handler.addFilter(_WithRequestId())
    if fmt == "json":
        handler.setFormatter(JsonLines(process))
    else:
        handler.setFormatter(_Text(process))
    logging.basicConfig(level=level, handlers=[handler], force=True)


class _Text(logging.Formatter):
    def __init__(self, process: str) -> None:
        super().__init__(f"%(asctime)s {process} %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", "")
        return line if not rid or rid in record.getMessage() else f"{line} [request {rid}]"
