from __future__ import annotations

from pathlib import Path

import pytest

from baton.engine import LLM
from baton.engine.checkpoint import DEFAULT_MODEL

SHARED_STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` are skipped, visibly, where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (make gpu-check runs it on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def stories_path() -> Path:
    """The real trained stories260K checkpoint: ../shared's copy when present, else the bundled one."""
    return SHARED_STORIES if SHARED_STORIES.is_dir() else DEFAULT_MODEL


@pytest.fixture(scope="session")
def stories_llm(stories_path: Path) -> LLM:
    return LLM(str(stories_path))


@pytest.fixture(scope="session")
def hf_stories(stories_path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(stories_path), dtype=torch.float32).eval()
