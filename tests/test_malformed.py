"""Input no parser or validator should let through: request bytes that do not parse (INVALID_ARGUMENT on
every service, the router's and the nodes'), non-finite floats, and prompts too large for any context
(refused before they are tokenized). On a real cluster (`baton up`: etcd, one prefill and one decode node,
the router), over raw gRPC calls on loopback."""

from __future__ import annotations

import math
import random

import grpc
import pytest
from cluster_harness import BatonUp
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from baton.engine.tokenizer import Tokenizer
from baton.router.admission import with_prompt_bound
from baton.router.client import BatonClient, InvalidArgument
from baton.router.models import model_card
from baton.v1 import baton_pb2 as pb
from baton.v1 import node_pb2, node_pb2_grpc

WAIT = 30  # seconds: a deadline that only a hung call reaches

# (server, method, whether it streams responses, a valid request). Field 1 of every request message with
# fields is a string, which the bad-UTF-8 payload below relies on.
METHODS = [
    ("router", "/baton.v1.Baton/Generate", True, pb.GenerateRequest(request_id="r", text="Once upon a time")),
    ("router", "/baton.v1.Baton/Tokenize", False, pb.TokenizeRequest(model="", text="Once upon a time")),
    ("router", "/baton.v1.Baton/ListModels", False, pb.ListModelsRequest()),
    ("router", "/grpc.health.v1.Health/Check", False, health_pb2.HealthCheckRequest(service="baton.v1.Baton")),
    ("decode", "/baton.v1.DecodeNode/Reserve", False,
     node_pb2.ReserveRequest(request_id="r", prompt_tokens=4, max_tokens=4, lease_ms=1000)),
    ("decode", "/baton.v1.DecodeNode/Continue", True,
     node_pb2.ContinueRequest(request_id="r", prompt_token_ids=[1, 403, 407], first_token=5)),
    ("decode", "/baton.v1.DecodeNode/KVWritten", False,
     node_pb2.KVWrittenRequest(request_id="r", prefill_node_id="p", ok=True, bytes_written=64)),
    ("prefill", "/baton.v1.PrefillNode/Prefill", True,
     node_pb2.PrefillRequest(request_id="r", prompt_token_ids=[1, 403, 407])),
]


def random_bytes(valid) -> bytes:
    return random.Random(1).randbytes(64)


def truncated(valid) -> bytes:
    # Cutting a message's last byte always leaves its last field incomplete. ListModelsRequest has no
    # field: a field it does not know (a newer client's) stands in, with 3 of its 5 bytes.
    data = valid.SerializeToString()
    return data[:-1] if data else b"\x0a\x05abc"


def bad_utf8(valid) -> bytes:
    # The valid message, then field 1 (a string, which proto3 requires to be UTF-8) again: the last wins.
    return valid.SerializeToString() + b"\x0a\x02\xff\xfe"


@pytest.fixture(scope="module")
def cluster(stories_path, tmp_path_factory):
    with BatonUp(tmp_path_factory.mktemp("malformed"), "--model", str(stories_path)) as up:
        up.addresses = {"router": up.address, "decode": up.nodes("decode")[0].address,
                        "prefill": up.nodes("prefill")[0].address}
        yield up


def raw_call(address: str, method: str, streaming: bool, data: bytes) -> grpc.RpcError | None:
    """Sends `data` as the request's bytes, as they are; returns how the call failed (None: it did not)."""
    with grpc.insecure_channel(address) as channel:
        try:
            if streaming:
                list(channel.unary_stream(method)(data, timeout=WAIT))
            else:
                channel.unary_unary(method)(data, timeout=WAIT)
        except grpc.RpcError as e:
            return e
    return None


@pytest.mark.parametrize("server, method, streaming, valid", METHODS, ids=[m[1].rsplit("/", 1)[1] for m in METHODS])
@pytest.mark.parametrize("payload", [random_bytes, truncated, bad_utf8])
def test_bytes_that_do_not_parse_are_invalid_argument(cluster, server, method, streaming, valid, payload):
    if payload is bad_utf8 and not valid.DESCRIPTOR.fields:
        pytest.skip("no string field: a field the message does not know is kept as bytes, UTF-8 or not")
    data = payload(valid)
    with pytest.raises(DecodeError):  # the premise: protobuf itself refuses these bytes
        type(valid).FromString(data)
    error = raw_call(cluster.addresses[server], method, streaming, data)
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.details().startswith(f"request: cannot be parsed as {valid.DESCRIPTOR.full_name}")


def test_a_bad_message_on_a_client_stream_is_invalid_argument(cluster):
    # Reflection is the one client-streaming method: its first message is answered, the second refused.
    method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    good = b"\x3a\x00"  # ServerReflectionRequest(list_services="")
    with grpc.insecure_channel(cluster.address) as channel:
        answers = channel.stream_stream(method)(iter([good, random_bytes(None)]), timeout=WAIT)
        assert b"baton.v1.Baton" in next(answers)
        with pytest.raises(grpc.RpcError) as e:
            next(answers)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_every_server_still_serves_after_malformed_requests(cluster):
    for server, method, streaming, valid in METHODS:
        raw_call(cluster.addresses[server], method, streaming, random_bytes(valid))
    with BatonClient(cluster.address, timeout=WAIT) as client:
        assert client.complete("Once upon a time", max_tokens=3, temperature=0).finished.completion_tokens == 3
        assert client.tokenize("Once") and client.list_models()
    with grpc.insecure_channel(cluster.addresses["decode"]) as channel:
        stub = node_pb2_grpc.DecodeNodeStub(channel)
        assert stub.Reserve(node_pb2.ReserveRequest(request_id="after", prompt_tokens=4, max_tokens=4),
                            timeout=WAIT).target.block_ids
        stub.Release(node_pb2.ReleaseRequest(request_id="after"), timeout=WAIT)
    with grpc.insecure_channel(cluster.addresses["prefill"]) as channel:
        assert node_pb2_grpc.PrefillNodeStub(channel).GetStats(node_pb2.GetStatsRequest(), timeout=WAIT).node_id


@pytest.mark.parametrize("field, value", [("temperature", math.inf), ("temperature", -math.inf),
                                          ("temperature", math.nan), ("top_p", math.nan), ("top_p", math.inf)])
def test_non_finite_floats_are_refused_naming_the_field(cluster, field, value):
    with BatonClient(cluster.address, timeout=WAIT) as client, pytest.raises(InvalidArgument) as e:
        client.complete("Once upon a time", max_tokens=3, **{field: value})
    assert e.value.field == field


@pytest.fixture(scope="module")
def prompt_bound(stories_path) -> int:
    """The router's bound on a prompt's bytes, derived as the router derives it."""
    return with_prompt_bound(model_card(stories_path), Tokenizer.from_folder(stories_path)).max_prompt_bytes


def test_a_prompt_over_the_byte_bound_is_refused_before_tokenizing(cluster, prompt_bound):
    # 3 MB would cost the router seconds of tokenizing; refused at once (gRPC's own cap is 4 MB).
    with BatonClient(cluster.address, timeout=WAIT) as client:
        for prompt in ["a" * (prompt_bound + 1), "Once upon a time. " * 170_000]:
            with pytest.raises(InvalidArgument) as e:
                client.complete(prompt, max_tokens=3)
            assert e.value.field == "prompt" and f"the {prompt_bound} bytes" in e.value.details
        with pytest.raises(InvalidArgument) as e:
            client.tokenize("Once upon a time. " * 170_000)
        assert e.value.field == "text"


def test_a_long_prompt_under_the_bound_that_fits_is_served(cluster, prompt_bound, stories_path):
    prompt = "Once upon a time, there was a little girl named Lily. She liked to play outside. " * 18
    n = len(Tokenizer.from_folder(stories_path).encode(prompt))
    assert 300 < n < 500 and len(prompt.encode()) < prompt_bound
    with BatonClient(cluster.address, timeout=WAIT) as client:
        done = client.complete(prompt, max_tokens=4, temperature=0, ignore_eos=True)
    assert done.finished.prompt_tokens == n and done.finished.completion_tokens == 4
