"""The KServe v2 gRPC front, driven by Triton's own Python client (`tritonclient[grpc]`), unary and streaming:
the same text as baton.v1, errors with the field named, and the protocol's messages as tritonclient defines
them (names and field numbers).

tritonclient registers the protocol's messages (package `inference`) in protobuf's default pool, and so does
the router's copy (`baton.v1.kserve_pb2`): the two cannot be loaded in one process. The client therefore runs
in a child process (`_triton`), which prints its results as JSON; this process never loads tritonclient.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import grpc
import pytest

from cluster_harness import BatonUp
from test_stories import PROMPTS

from baton.engine import LLM, SamplingParams
from baton.router.client import BatonClient
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc

if importlib.util.find_spec("tritonclient") is None:  # found, never imported here (see above)
    pytest.skip("tritonclient is not installed", allow_module_level=True)

MODEL = "stories260K"

PRELUDE = """
import json, queue, sys
import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

address, model = sys.argv[1], sys.argv[2]
client = triton.InferenceServerClient(address)

def inputs(prompt, **settings):
    out = []
    t = triton.InferInput("text_input", [1], "BYTES")
    t.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    out.append(t)
    for name, (kind, value) in settings.items():
        dtype = {"INT32": np.int32, "FP32": np.float32, "BOOL": bool, "UINT64": np.uint64,
                 "BYTES": np.object_}[kind]
        t = triton.InferInput(name, [len(value)] if isinstance(value, list) else [1], kind)
        data = value if isinstance(value, list) else [value]
        if kind == "BYTES":
            data = [v.encode() for v in data]
        t.set_data_from_numpy(np.array(data, dtype=dtype))
        out.append(t)
    return out
"""


def _triton(address: str, body: str) -> dict:
    # The script ends with os._exit: tritonclient closes its gRPC channel from __del__ at interpreter exit, and
    # that close can wait forever on a lock (seen once in a suite run: the test sat out the 180 s timeout after
    # every answer was in). Nothing the test reads comes after the print.
    code = PRELUDE + textwrap.dedent(body) + "\nsys.stdout.flush()\nimport os\nos._exit(0)\n"
    done = subprocess.run([sys.executable, "-c", code, address, MODEL], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def up(stories_path, tmp_path_factory):
    with BatonUp(tmp_path_factory.mktemp("kserve"), "--model", str(stories_path), "--prefill", "1",
                 "--decode", "1", "--log-format", "json") as up:
        yield up


def _offline(llm: LLM, prompt: str, **params) -> str:
    [out] = llm.generate([prompt], SamplingParams(**params))
    return out.text


def test_server_and_model_metadata(up):
    got = _triton(up.address, """
        meta = client.get_model_metadata(model, as_json=True)
        try:
            client.get_model_metadata("gpt-4")
            unknown = None
        except InferenceServerException as e:
            unknown = e.status()
        print(json.dumps(dict(live=client.is_server_live(), ready=client.is_server_ready(),
                              model_ready=client.is_model_ready(model), server=client.get_server_metadata(as_json=True),
                              inputs=[i["name"] for i in meta["inputs"]], outputs=[o["name"] for o in meta["outputs"]],
                              unknown=unknown)))
    """)
    assert got["live"] and got["ready"] and got["model_ready"]
    assert got["server"]["name"] == "baton"
    assert "text_input" in got["inputs"] and got["outputs"] == ["text_output"]
    assert got["unknown"] == "StatusCode.NOT_FOUND"


def test_unary_and_streaming_inference_give_the_grpc_apis_text(up, stories_llm: LLM):
    prompts = PROMPTS[:3]
    want = [_offline(stories_llm, p, max_tokens=24, temperature=0.0) for p in prompts]
    with BatonClient(up.address, timeout=60) as client:
        assert [client.complete(p, max_tokens=24, temperature=0.0).text for p in prompts] == want
    got = _triton(up.address, f"""
        prompts = {prompts!r}
        unary = []
        for p in prompts:
            result = client.infer(model, inputs(p, max_tokens=("INT32", 24), temperature=("FP32", 0.0)))
            unary.append(result.as_numpy("text_output")[0].decode())
        responses = queue.Queue()
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        for i, p in enumerate(prompts):
            client.async_stream_infer(model, inputs(p, stream=("BOOL", True)), request_id=f"s{{i}}",
                                      parameters={{"max_tokens": 24, "temperature": 0.0}})
        streamed, finals = {{}}, {{}}
        while len(finals) < len(prompts):
            result, error = responses.get(timeout=120)
            assert error is None, error
            response = result.get_response()
            streamed.setdefault(response.id, []).append(result.as_numpy("text_output")[0].decode())
            if response.parameters["triton_final_response"].bool_param:
                finals[response.id] = response.parameters["finish_reason"].string_param
        client.stop_stream()
        print(json.dumps(dict(unary=unary, streamed=[streamed[f"s{{i}}"] for i in range(len(prompts))],
                              finals=[finals[f"s{{i}}"] for i in range(len(prompts))])))
    """)
    assert got["unary"] == want
    assert ["".join(parts) for parts in got["streamed"]] == want
    assert all(len(parts) > 1 for parts in got["streamed"])  # streamed as it came, not in one piece
    assert set(got["finals"]) <= {"length", "stop"}


def test_bad_requests_name_the_field(up):
    got = _triton(up.address, """
        errors = {}
        for name, settings in [("temperature", {"temperature": ("FP32", -1.0)}),
                               ("max_tokens", {"max_tokens": ("INT32", 0)})]:
            try:
                client.infer(model, inputs("Once", **settings))
                errors[name] = None
            except InferenceServerException as e:
                errors[name] = [e.status(), e.message()]
        try:
            client.infer(model, inputs("Once", max_tokens=("INT32", 4))[1:])  # no text_input
            errors["text_input"] = None
        except InferenceServerException as e:
            errors["text_input"] = [e.status(), e.message()]
        responses = queue.Queue()
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(model, inputs("Once", top_p=("FP32", 0.0)), request_id="bad")
        result, error = responses.get(timeout=60)
        client.stop_stream()
        errors["stream"] = str(error)
        print(json.dumps(errors))
    """)
    for name in ("temperature", "max_tokens", "text_input"):
        status, message = got[name]
        assert status == "StatusCode.INVALID_ARGUMENT" and message.startswith(f"{name}:"), (name, got[name])
    assert "top_p:" in got["stream"]


def test_the_protocol_matches_tritonclients_definition():
    """Every message and method tritonclient defines for what Baton serves has the same fields (name, number,
    type) in Baton's copy (each side read in its own process)."""
    dump = textwrap.dedent("""
        import json, sys
        def fields(d):
            return {f.name: [f.number, f.type, f.label if hasattr(f, "label") else 0] for f in d.fields}
        def walk(d, out):
            out[d.full_name] = fields(d)
            for n in d.nested_types:
                walk(n, out)
        if sys.argv[1] == "triton":
            import tritonclient.grpc.service_pb2 as m
        else:
            from baton.v1 import kserve_pb2 as m
        out = {}
        for d in m.DESCRIPTOR.message_types_by_name.values():
            walk(d, out)
        s = m.DESCRIPTOR.services_by_name["GRPCInferenceService"]
        out["methods"] = {x.name: [x.input_type.full_name, x.output_type.full_name, x.client_streaming,
                                   x.server_streaming] for x in s.methods}
        print(json.dumps(out))
    """)
    sides = {}
    for side in ("triton", "baton"):
        done = subprocess.run([sys.executable, "-c", dump, side], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        sides[side] = json.loads(done.stdout)
    ours, theirs = sides["baton"], sides["triton"]
    for name, fields in ours.items():
        if name != "methods":
            assert theirs[name] == fields, name
    for method, signature in ours["methods"].items():
        assert theirs["methods"][method] == signature, method
    assert {"ModelInfer", "ModelStreamInfer", "ModelMetadata", "ServerReady"} <= set(ours["methods"])


def test_logs_are_json_lines_that_carry_the_request_id(up):
    """`--log-format json` (this module's cluster): every line of every process is one JSON object, and a line
    about a request (here the router's note that a client resumed it) carries its id."""
    with BatonClient(up.address, timeout=60) as client:
        first = client.complete(PROMPTS[0], max_tokens=6, temperature=0.0)
    request = pb.GenerateRequest(request_id="trace-me-42", text=PROMPTS[0],
                                 sampling=pb.SamplingParams(max_tokens=6, temperature=0.0),
                                 resume=pb.Resume(token_ids=first.token_ids[:2]))
    with grpc.insecure_channel(up.address) as channel:
        list(baton_pb2_grpc.BatonStub(channel).Generate(request, timeout=60))
    lines = {log.name: [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
             for log in up.log_dir.glob("*.log") if log.name.startswith(("router", "prefill", "decode"))}
    assert {"router.log", "prefill-0.log", "decode-0.log"} <= set(lines)
    for name, records in lines.items():
        assert records and all({"time", "process", "level", "message"} <= set(r) for r in records), name
    resumed = [r for r in lines["router.log"] if "resumed by its client" in r["message"]]
    assert resumed and all(r["request_id"] == "trace-me-42" for r in resumed)


def test_a_cancelled_stream_frees_its_blocks(up):
    """tritonclient cancels its stream after two responses of a long request: the request ends on every node."""
    got = _triton(up.address, """
        responses = queue.Queue()
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(model, inputs("Once upon a time", stream=("BOOL", True), ignore_eos=("BOOL", True),
                                                max_tokens=("INT32", 400)), request_id="long")
        seen = [responses.get(timeout=60) for _ in range(2)]
        client.stop_stream(cancel_requests=True)
        print(json.dumps(dict(seen=[error is None for _, error in seen])))
    """)
    assert got["seen"] == [True, True]
    [decode] = up.nodes("decode")
    up.wait_until(lambda: (s := up.stats(decode)).free_blocks == s.total_blocks and not s.running
                  and not s.reserved, timeout=15)
