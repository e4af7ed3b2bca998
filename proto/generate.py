"""Regenerates the committed Python stubs of Baton's protos (needs grpcio-tools, pinned in the `test` extra).

Run from anywhere:  .venv/bin/python proto/generate.py

Equivalent to, from the repository root:
    python -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto --grpc_python_out=proto \
        proto/baton/v1/*.proto
The include root is proto/, so the stubs import each other as `from baton.v1 import baton_pb2`, which
resolves through the `baton.v1` package mapping in pyproject.toml.

Only grpcio-tools 1.78.0 may write them: its gencode (protobuf 6.31) loads under protobuf 6.31+ and 7.x,
while a newer grpcio-tools would make every user of the stubs need a newer protobuf and grpcio.
"""

from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
GRPCIO_TOOLS = "1.78.0"  # keep in step with pyproject.toml's `test` extra
PROTO_FILES = ("baton/v1/baton.proto", "baton/v1/node.proto", "baton/v1/kserve.proto")
GENERATED = tuple(
    f"baton/v1/{stem}{suffix}"
    for stem in ("baton", "node", "kserve")
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
)


def generate(out_dir: Path | str = PROTO_ROOT) -> list[Path]:
    """Writes the stubs under out_dir (as baton/v1/*_pb2*.py[i]) and returns their paths."""
    if (installed := version("grpcio-tools")) != GRPCIO_TOOLS:
        raise RuntimeError(f"the stubs are generated with grpcio-tools=={GRPCIO_TOOLS}, not {installed}: "
                           f"pip install 'grpcio-tools=={GRPCIO_TOOLS}'")
    from grpc_tools import protoc

    out = Path(out_dir)
    (out / "baton" / "v1").mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(PROTO_ROOT / p) for p in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return [out / g for g in GENERATED]


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT):
        print(path)
