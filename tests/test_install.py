"""A plain install, as a service that only needs Baton's client or a node would do it: a fresh virtualenv, a
non-editable `pip install` of this checkout with no extras and no test tools. Every command but `baton bench`
must run on the base dependencies; `baton bench` says which extra to install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_harness import BatonUp

from baton.engine import SamplingParams

ROOT = Path(__file__).resolve().parents[1]


def _run(*cmd: str | Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd="/")


@pytest.fixture(scope="module")
def plain_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("plain") / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    proc = _run(base, "-m", "venv", venv)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _torch_beside(venv)
    proc = _run(venv / "bin/python", "-m", "pip", "install", "-q", ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return venv


def _torch_beside(venv: Path) -> None:
    """This interpreter's torch (the CPU build: a bare `torch` requirement could fetch a CUDA one), within the
    venv's reach through a .pth naming a folder of links to its files and nothing else: pip sees it installed
    and installs the rest as a user's install would. Unpacking the 700 MB wheel again took most of this
    module's time."""
    from importlib.metadata import distribution

    torch = distribution("torch")
    site = Path(torch.locate_file(""))
    links = venv.parent / "torch-only"
    links.mkdir()
    for top in sorted({f.parts[0] for f in torch.files if f.parts[0] != ".."}):
        (links / top).symlink_to(site / top)
    proc = _run(venv / "bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    (Path(proc.stdout.strip()) / "torch-only.pth").write_text(f"{links}\n")


def test_the_plain_install_has_no_extras(plain_venv):
    for module in ("matplotlib", "transformers", "pytest"):  # (yaml and tqdm come with base dependencies)
        proc = _run(plain_venv / "bin/python", "-c", f"import {module}")
        assert proc.returncode == 1 and "ModuleNotFoundError" in proc.stderr, module
    # Non-editable: the package lives in the venv, not in this checkout.
    proc = _run(plain_venv / "bin/python", "-c", "import baton.engine; print(baton.engine.__file__)")
    assert proc.returncode == 0 and proc.stdout.startswith(str(plain_venv)), proc.stdout + proc.stderr


def test_generate_offline_gives_the_stories_text(plain_venv, stories_llm, stories_path):
    proc = _run(plain_venv / "bin/baton", "generate", "--model", stories_path, "--max-tokens", "30",
                "Once upon a time")
    assert proc.returncode == 0, proc.stderr
    expected = stories_llm.generate(["Once upon a time"], SamplingParams(max_tokens=30, temperature=0))[0].text
    assert proc.stdout == expected + "\n"


def test_up_serves_a_request(plain_venv, stories_llm, tmp_path):
    expected = stories_llm.generate(["The dog"], SamplingParams(max_tokens=12, temperature=0))[0].text
    with BatonUp(tmp_path, baton=str(plain_venv / "bin/baton")) as up:
        proc = _run(plain_venv / "bin/baton", "generate", "--router", up.address, "--timeout", "60",
                    "--max-tokens", "12", "The dog", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"
    assert not up.leftovers and not up.hung and up.returncode == 0


def test_bench_without_its_extra_says_what_to_install(plain_venv, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("configurations: []\n")
    proc = _run(plain_venv / "bin/baton", "bench", "--config", config, "--output", tmp_path / "out")
    assert proc.returncode == 2
    assert "pip install 'baton-llm[bench]'" in proc.stderr and "Traceback" not in proc.stderr
