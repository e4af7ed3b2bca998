"""Baton's model runtime, shared by prefill and decode nodes."""

from .config import EngineConfig, ModelConfig
from .engine import LLMEngine
from .errors import ConfigError, FieldError, InvalidRequest, NoCapacity
from .llm import LLM
from .request import Completion, FinishReason, RequestOutput, Resumed, SamplingParams

__all__ = [
    "LLM", "LLMEngine", "EngineConfig", "ModelConfig", "SamplingParams", "RequestOutput", "Completion", "Resumed",
    "FinishReason", "FieldError", "ConfigError", "InvalidRequest", "NoCapacity",
]
