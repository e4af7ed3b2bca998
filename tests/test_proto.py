"""The committed gRPC stubs: in step with the .proto files, importable, and usable."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2

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


def _declared_services(tmp_path) -> list[tuple[str, descriptor_pb2.ServiceDescriptorProto]]:
    """(proto file stem, service) for every service the .proto files declare, as protoc reads the sources now
    (a descriptor set compiled fresh, not the copy embedded in the committed modules)."""
    from grpc_tools import protoc

    gen = _generate_module()
    out = tmp_path / "protos.pb"
    args = ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"--descriptor_set_out={out}",
            *(str(PROTO_DIR / p) for p in gen.PROTO_FILES)]
    assert protoc.main(args) == 0, args
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return [(Path(f.name).stem, s) for f in files for s in f.service]


_KINDS = {(False, False): grpc.UnaryUnaryMultiCallable, (False, True): grpc.UnaryStreamMultiCallable,
          (True, False): grpc.StreamUnaryMultiCallable, (True, True): grpc.StreamStreamMultiCallable}


def test_every_rpc_the_protos_declare_is_called_and_served_through_the_committed_stubs(tmp_path):
    """Each rpc of the .proto sources, through a real gRPC server that registers the committed servicers
    (`add_<Service>Servicer_to_server` with the generated base class), called with the committed `<Service>Stub`:
    the stub has a method of the declared shape (unary or streaming, each way), called with the declared request
    type, and the server has a handler on its path (the base class answers 'Method not implemented!'; a path
    with no handler would get 'Method not found!'). Tokenize (unary) and Generate (a server
    stream) also carry real answers both ways."""
    import importlib
    from concurrent.futures import ThreadPoolExecutor

    from google.protobuf import descriptor_pool, message_factory

    from baton.v1 import baton_pb2, baton_pb2_grpc

    services = _declared_services(tmp_path)
    assert {s.name for _, s in services} >= {"Baton", "DecodeNode", "PrefillNode"}

    class Answering(baton_pb2_grpc.BatonServicer):
        def Tokenize(self, request, context):
            return baton_pb2.TokenizeResponse(token_ids=[len(request.text), 7])

        def Generate(self, request, context):
            for i in range(3):
                yield baton_pb2.GenerateResponse(request_id=request.request_id,
                                                 chunk=baton_pb2.TokenChunk(index=i, token_ids=[i]))

    server = grpc.server(ThreadPoolExecutor(4))
    modules = {}
    for stem, service in services:
        module = modules[stem] = importlib.import_module(f"baton.v1.{stem}_pb2_grpc")
        servicer = Answering() if service.name == "Baton" else getattr(module, f"{service.name}Servicer")()
        getattr(module, f"add_{service.name}Servicer_to_server")(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            for stem, module in modules.items():  # no stub for a service the protos no longer declare
                declared = {f"{s.name}Stub" for st, s in services if st == stem}
                assert {n for n in dir(module) if n.endswith("Stub")} == declared, stem
            checked = []
            for stem, service in services:
                stub = getattr(modules[stem], f"{service.name}Stub")(channel)
                for method in service.method:
                    where = f"{service.name}.{method.name}"
                    call = getattr(stub, method.name, None)
                    kind = _KINDS[method.client_streaming, method.server_streaming]
                    assert isinstance(call, kind), f"{where}: the stub's method is {call!r}, not a {kind.__name__}"
                    if service.name == "Baton" and method.name in ("Tokenize", "Generate"):
                        continue  # answered below
                    request = message_factory.GetMessageClass(
                        descriptor_pool.Default().FindMessageTypeByName(method.input_type.lstrip(".")))()
                    with pytest.raises(grpc.RpcError) as e:
                        answer = call(iter([request]) if method.client_streaming else request, timeout=30)
                        if method.server_streaming:
                            list(answer)
                    assert (e.value.code(), e.value.details()) == \
                        (grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!"), f"{where}: {e.value}"
                    checked.append(where)
            assert len(checked) == sum(len(s.method) for _, s in services) - 2
            baton = baton_pb2_grpc.BatonStub(channel)
            assert list(baton.Tokenize(baton_pb2.TokenizeRequest(text="abc"), timeout=30).token_ids) == [3, 7]
            stream = list(baton.Generate(baton_pb2.GenerateRequest(request_id="r9", text="x"), timeout=30))
            assert [(r.request_id, r.chunk.index, list(r.chunk.token_ids)) for r in stream] == \
                [("r9", 0, [0]), ("r9", 1, [1]), ("r9", 2, [2])]
    finally:
        server.stop(None)


def test_a_request_round_trips_through_its_bytes():
    from baton.v1 import baton_pb2, node_pb2

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
