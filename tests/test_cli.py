"""`baton generate` as a user runs it: a real process, its stdout and its exit status."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from baton.engine import SamplingParams

BATON = [str(Path(sys.executable).with_name("baton"))]


def run_baton(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(BATON + list(args), capture_output=True, text=True, timeout=120, env=env)


def test_generate_streams_the_continuation(stories_llm, stories_path):
    proc = run_baton("generate", "--model", str(stories_path), "--max-tokens", "40", "Once upon a time")
    assert proc.returncode == 0, proc.stderr
    expected = stories_llm.generate(["Once upon a time"], SamplingParams(max_tokens=40, temperature=0))[0]
    assert proc.stdout == expected.text + "\n"
    assert not proc.stdout.startswith("Once upon a time")


def test_generate_with_the_bundled_default_model_and_sampling_flags():
    args = ["generate", "--max-tokens", "20", "--temperature", "0.8", "--top-p", "0.9", "--top-k", "40",
            "--seed", "5", "The dog"]
    first, second = run_baton(*args), run_baton(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and len(first.stdout.strip()) > 0


def test_generate_rejects_bad_values_naming_the_field():
    proc = run_baton("generate", "--top-p", "1.5", "hello")
    assert proc.returncode == 2
    assert "top_p" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_baton("generate", "--model", "/nonexistent/model", "hello")
    assert proc.returncode == 2
    assert "model" in proc.stderr and "/nonexistent/model" in proc.stderr


def test_device_flag(stories_llm, stories_path):
    proc = run_baton("generate", "--model", str(stories_path), "--device", "auto", "--max-tokens", "8", "Once")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == stories_llm.generate(["Once"], SamplingParams(max_tokens=8, temperature=0))[0].text + "\n"
    for bad in ["tpu", "cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"]):
        for cmd in (["generate", "--device", bad, "hi"], ["up", "--device", bad]):
            proc = run_baton(*cmd)
            assert proc.returncode == 2 and proc.stderr.startswith("baton: error: device:"), (cmd, proc.stderr)
