"""The committed gRPC stubs: in step with the .proto files, importable, and usable."""

from __future__ import annotations

import importlib.util
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parents[1] / "proto"


def _generate_module():
    spec = importlib.util.spec_from_file_location("_baton_proto_generate", PROTO_DIR / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_the_protos(tmp_path):
    gen = _generate_module()
    fresh = gen.generate(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in fresh) == sorted(gen.GENERATED)
    committed = {rel: PROTO_DIR / rel for rel in gen.GENERATED}
    stale = [rel for rel, path in committed.items()
             if not path.is_file() or path.read_bytes() != (tmp_path / rel).read_bytes()]
    assert not stale, (f"generated stubs are stale or missing: {', '.join(stale)}; "
                       "run `python proto/generate.py` and commit the result")


def test_stubs_import_and_a_request_round_trips():
    from baton.v1 import baton_pb2, baton_pb2_grpc, node_pb2, node_pb2_grpc

    assert baton_pb2_grpc.BatonStub and node_pb2_grpc.DecodeNodeStub and node_pb2_grpc.PrefillNodeStub
    req = baton_pb2.GenerateRequest(
        request_id="r1", model="m", token_ids=baton_pb2.TokenIds(ids=[1, 2, 3]),
        sampling=baton_pb2.SamplingParams(max_tokens=8, temperature=0.0, top_k=5, seed=42, stop=["\n"],
                                          logprobs=True))
    back = baton_pb2.GenerateRequest.FromString(req.SerializeToString())
    assert back == req
    assert back.WhichOneof("prompt") == "token_ids" and list(back.token_ids.ids) == [1, 2, 3]
    # Optional fields keep "set to zero" apart from "unset" across the wire.
    assert back.sampling.HasField("temperature") and back.sampling.temperature == 0.0
    assert not back.sampling.HasField("top_p")
    # node.proto reuses baton.proto's messages.
    cont = node_pb2.ContinueRequest(request_id="r1", sampling=back.sampling)
    assert node_pb2.ContinueRequest.FromString(cont.SerializeToString()).sampling.seed == 42
