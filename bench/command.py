"""`baton bench`, registered by this package itself (the `baton.commands` entry point in pyproject.toml):
the CLI in `cluster/` finds its commands there and never imports `bench/`, which sits above it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# What `pip install 'baton-llm[bench]'` adds: `baton bench` alone needs them, so they are imported only there.
BENCH_EXTRAS = frozenset({"matplotlib", "yaml", "tqdm"})


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="load-test routers (or local clusters it launches) from a config")
    bench.add_argument("--config", required=True, metavar="FILE", help="a YAML or JSON bench config")
    bench.add_argument("--output", required=True, metavar="DIR",
                       help="where summary.json, raw.json, the plots (and the default model) go")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    bench.set_defaults(run=_bench)


def _bench(args: argparse.Namespace) -> int:
    try:
        from baton.bench.runner import run_command

        return run_command(Path(args.config), Path(args.output), progress=not args.no_progress)
    except ModuleNotFoundError as e:
        if e.name not in BENCH_EXTRAS:
            raise
        print(f"baton bench: error: it needs {e.name}, an optional dependency: pip install 'baton-llm[bench]'",
              file=sys.stderr)
        return 2
