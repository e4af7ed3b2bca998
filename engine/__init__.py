"""Baton's model runtime, shared by prefill and decode nodes.

The names below load on first use (PEP 562): a router imports this package's torch-free modules (`errors`,
`request`, `checkpoint`, `tokenizer`, `detokenizer`, `stops`, `output`; the planner `profile`) and must not load
torch by doing so."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOMES = {
    "LLM": "llm", "LLMEngine": "engine", "EngineConfig": "config", "ModelConfig": "checkpoint",
    "SamplingParams": "request", "RequestOutput": "request", "Completion": "request", "Resumed": "request",
    "FinishReason": "request", "FieldError": "errors", "ConfigError": "errors", "InvalidRequest": "errors",
    "NoCapacity": "errors",
}
__all__ = [
    "LLM", "LLMEngine", "EngineConfig", "ModelConfig", "SamplingParams", "RequestOutput", "Completion", "Resumed",
    "FinishReason", "FieldError", "ConfigError", "InvalidRequest", "NoCapacity",
]

if TYPE_CHECKING:
    from .checkpoint import ModelConfig
    from .config import EngineConfig
    from .engine import LLMEngine
    from .errors import ConfigError, FieldError, InvalidRequest, NoCapacity
    from .llm import LLM
    from .request import Completion, FinishReason, RequestOutput, Resumed, SamplingParams


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{home}", __name__), name)
