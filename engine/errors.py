"""Errors that name what was wrong, so a server can map them to a status and a field."""

from __future__ import annotations


class FieldError(ValueError):
    """A value that cannot be used; `field` names it (a request field, a config key or a file)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class ConfigError(FieldError):
    """A checkpoint or engine setting Baton cannot use (raised at load time, never mid-run)."""


class InvalidRequest(FieldError):
    """A request field that is out of range, or a request that can never fit this engine."""


class NoCapacity(RuntimeError):
    """Not enough free KV blocks right now (the request may fit later, or on another node)."""
