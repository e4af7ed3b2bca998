"""Baton's packages form layers, each importing only those below it (imports inside functions count):
kvtransfer and engine (neither imports the other), common, then router / prefill / decode, then cluster (the
launchers), then bench."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Each package and the packages it may import.
LAYERS = {
    "kvtransfer": set(),
    "engine": set(),  # its tensor-parallel workers reach KV transfer through the KVSink they are given
    "common": {"engine", "kvtransfer"},
    "router": {"common", "engine"},
    "prefill": {"common", "engine", "kvtransfer"},
    "decode": {"common", "engine", "kvtransfer"},
    "cluster": {"common", "engine", "kvtransfer", "router", "prefill", "decode"},
    "bench": {"common", "engine", "kvtransfer", "router", "prefill", "decode", "cluster"},
}


def imported_packages(package: str) -> dict[str, list[str]]:
    """Every Baton package a package's modules import -> where (module:line)."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / package).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "baton" and len(parts) > 1 and parts[1] in LAYERS and parts[1] != package:
                    found.setdefault(parts[1], []).append(f"{path.name}:{node.lineno}")
    return found


def test_every_package_imports_only_the_layers_below_it():
    wrong = {}
    for package, allowed in LAYERS.items():
        for imported, where in imported_packages(package).items():
            if imported not in allowed:
                wrong[f"{package} -> {imported}"] = where
    assert wrong == {}


def test_the_checker_sees_imports_inside_functions():
    # cluster/cli.py starts the router inside a function: the walk must find it, or the test above is blind.
    assert "router" in imported_packages("cluster")
    assert any(where.startswith("cli.py") for where in imported_packages("cluster")["router"])


def test_the_router_and_its_fronts_load_without_torch():
    import subprocess
    import sys

    code = ("import sys, baton.router.main, baton.router.openai_http, baton.router.kserve, baton.cluster.cli; "
            "baton.cluster.cli.build_parser().parse_args(['router', '--etcd', 'http://127.0.0.1:1']); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
