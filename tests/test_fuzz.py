"""Fuzzing (hypothesis) of every public front and of the nodes' internal services, on a real 1P1D cluster with
API keys: malformed and oversized JSON, invalid UTF-8, wrong types, random protobuf messages and random bytes,
bogus secrets. No answer is INTERNAL, UNKNOWN or HTTP 5xx, no process dies, and every KV block is free after.

Examples are derived from a fixed seed (`derandomize`): CI sees the same inputs each run. To explore, set
BATON_FUZZ_EXAMPLES=N: N random examples per test."""

from __future__ import annotations

import http.client
import json
import os
import time

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster_harness import BatonUp
from test_keys import closed_cluster, new_key

from baton.common.keys import read_secret
from baton.common.members import MEMBER_METADATA, member_token
from baton.v1 import baton_pb2 as pb
from baton.v1 import kserve_pb2 as ks
from baton.v1 import node_pb2

MODEL = "stories260K"
FUZZ = settings(max_examples=int(os.environ.get("BATON_FUZZ_EXAMPLES", "200")), deadline=None,
                derandomize=not os.environ.get("BATON_FUZZ_EXAMPLES"), database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
BAD_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE}


@pytest.fixture(scope="module")
def cluster(stories_path, tmp_path_factory):
    with closed_cluster(stories_path, tmp_path_factory.mktemp("fuzz")) as (up, secret, http_port):
        key = new_key(up, secret, "fuzzer")
        with grpc.insecure_channel(up.address) as channel:
            yield up, secret, http_port, key, channel


# -- values ------------------------------------------------------------------------------------------------------

TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)  # protobuf strings: no lone surrogates
JSON_SCALARS = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | TEXT
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner,
                                                                                                max_size=4),
                    max_leaves=12)
OPENAI_FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                 "top_k", "n", "stop", "stream", "stream_options", "seed", "logprobs", "top_logprobs",
                 "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "ignore_eos", "user",
                 "stop_token_ids", "echo", "best_of", "logit_bias", "response_format", "tools"]
HUGE = st.just("Once upon a time " * 200_000)  # 3.4 MB of text


@st.composite
def openai_bodies(draw) -> bytes:
    """A request body: a JSON object of OpenAI's fields (and others) with values of any type, or not JSON."""
    kind = draw(st.sampled_from(["object", "object", "object", "any json", "raw"]))
    if kind == "raw":
        return draw(st.binary(max_size=200))  # invalid UTF-8 and not JSON, mostly
    if kind == "any json":
        return json.dumps(draw(JSON)).encode()
    body = draw(st.dictionaries(st.sampled_from(OPENAI_FIELDS) | TEXT, JSON | HUGE, max_size=8))
    if draw(st.booleans()):  # often a request that passes the first checks
        body.setdefault("model", MODEL)
        body.setdefault("prompt", "Once upon a time")
        body.setdefault("messages", [{"role": "user", "content": "Hi"}])
        if isinstance(body.get("max_tokens"), int):
            body["max_tokens"] = body["max_tokens"] % 40
    return json.dumps(body, allow_nan=True).encode()


def scalar(field) -> st.SearchStrategy:
    t = field.type
    if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        return st.integers(-2**31, 2**31 - 1)
    if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return st.integers(-2**63, 2**63 - 1)
    if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if t == F.TYPE_FLOAT:
        return st.floats(width=32)
    if t == F.TYPE_DOUBLE:
        return st.floats()
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_STRING:
        return TEXT
    if t == F.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == F.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values]) | st.integers(-5, 100)
    raise AssertionError(t)


@st.composite
def messages(draw, cls, depth: int = 0):
    """A message of `cls` with a random subset of its fields set to random values of their types."""
    message = cls()
    for field in cls.DESCRIPTOR.fields:
        if not draw(st.integers(0, 2)):  # about a third of the fields stay unset
            continue
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == F.LABEL_REPEATED
        if field.type == F.TYPE_MESSAGE:
            if depth >= 2 or field.message_type.GetOptions().map_entry:
                continue
            sub = field.message_type._concrete_class
            if repeated:
                for item in draw(st.lists(messages(sub, depth + 1), max_size=3)):
                    getattr(message, field.name).add().CopyFrom(item)
            else:
                getattr(message, field.name).CopyFrom(draw(messages(sub, depth + 1)))
        elif repeated:
            getattr(message, field.name).extend(draw(st.lists(scalar(field), max_size=20)))
        else:
            setattr(message, field.name, draw(scalar(field)))
    return message


def generate_requests() -> st.SearchStrategy:
    """Random GenerateRequests, a share of them made servable (a short prompt, few tokens)."""
    def servable(r: pb.GenerateRequest) -> pb.GenerateRequest:
        r.sampling.max_tokens %= 24
        return r
    return messages(pb.GenerateRequest) | messages(pb.GenerateRequest).map(servable)


# -- calls -------------------------------------------------------------------------------------------------------

def call(channel, method: str, data: bytes, metadata, streaming: bool) -> grpc.StatusCode:
    """One call of `method` with raw request bytes: its status code (responses read to the end)."""
    identity = (lambda b: b), (lambda b: b)
    try:
        if streaming:
            for _ in channel.unary_stream(method, *identity)(data, timeout=60, metadata=metadata):
                pass
        else:
            channel.unary_unary(method, *identity)(data, timeout=60, metadata=metadata)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def post(port: int, path: str, body: bytes, key: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body, {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()  # a stream, to its end
        return response.status
    finally:
        conn.close()


# -- tests -------------------------------------------------------------------------------------------------------

def test_the_openai_front_answers_any_body_without_a_server_error(cluster):
    up, secret, http_port, key, _ = cluster
    seen: list[int] = []

    @FUZZ
    @given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=openai_bodies())
    def check(path: str, body: bytes) -> None:
        status = post(http_port, path, body, key)
        seen.append(status)
        assert status < 500, (status, body[:300])

    check()
    assert 200 in seen and 400 in seen, sorted(set(seen))  # some served, some refused
    assert_intact(up, secret)


def test_the_grpc_fronts_answer_any_message_or_bytes_without_internal_or_unknown(cluster):
    up, secret, _, key, channel = cluster
    auth = (("authorization", f"Bearer {key}"),)
    codes: list[grpc.StatusCode] = []
    methods = [("/baton.v1.Baton/Generate", generate_requests(), True),
               ("/baton.v1.Baton/Tokenize", messages(pb.TokenizeRequest), False),
               ("/inference.GRPCInferenceService/ModelInfer", messages(ks.ModelInferRequest), False)]

    @FUZZ
    @given(choice=st.integers(0, len(methods) - 1), raw=st.booleans(), data=st.data())
    def check(choice: int, raw: bool, data) -> None:
        method, strategy, streaming = methods[choice]
        body = data.draw(st.binary(max_size=300)) if raw else data.draw(strategy).SerializeToString()
        code = call(channel, method, body, auth, streaming)
        codes.append(code)
        assert code not in BAD_CODES, (method, code, body[:200])

    check()
    assert grpc.StatusCode.OK in codes and grpc.StatusCode.INVALID_ARGUMENT in codes, set(codes)
    assert_intact(up, secret)


def test_internal_services_refuse_bogus_secrets_and_survive_bad_messages(cluster):
    up, secret, _, _, _ = cluster
    [decode], [prefill] = up.nodes("decode"), up.nodes("prefill")
    token = member_token(read_secret(secret))
    targets = [(decode.address, "/baton.v1.DecodeNode/GetStats", node_pb2.GetStatsRequest),
               (decode.address, "/baton.v1.DecodeNode/Release", node_pb2.ReleaseRequest),
               (decode.address, "/baton.v1.DecodeNode/Reserve", node_pb2.ReserveRequest),
               (prefill.address, "/baton.v1.PrefillNode/GetStats", node_pb2.GetStatsRequest),
               (prefill.address, "/baton.v1.PrefillNode/Prefill", node_pb2.PrefillRequest)]
    channels = {address: grpc.insecure_channel(address) for address in (decode.address, prefill.address)}
    try:
        @FUZZ
        @given(choice=st.integers(0, len(targets) - 1), bogus=st.one_of(st.none(), TEXT.filter(lambda s: s != token)),
               data=st.data())
        def bogus_secret(choice: int, bogus: str | None, data) -> None:
            address, method, cls = targets[choice]
            # What a client can send: printable ASCII (grpc refuses other metadata values before sending)
            metadata = ((MEMBER_METADATA, bogus),) if bogus and bogus.isascii() and bogus.isprintable() else None
            code = call(channels[address], method, data.draw(messages(cls)).SerializeToString(), metadata, False)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (method, code)

        bogus_secret()

        @FUZZ
        @given(choice=st.sampled_from([0, 1, 3]), raw=st.booleans(), data=st.data())
        def member(choice: int, raw: bool, data) -> None:  # no Reserve or Prefill: they would hold blocks
            address, method, cls = targets[choice]
            body = data.draw(st.binary(max_size=200)) if raw else data.draw(messages(cls)).SerializeToString()
            code = call(channels[address], method, body, ((MEMBER_METADATA, token),), False)
            assert code not in BAD_CODES, (method, code)

        member()
    finally:
        for channel in channels.values():
            channel.close()
    assert_intact(up, secret)


def assert_intact(up: BatonUp, secret) -> None:
    """Every process of the cluster alive, and every KV block free on every node (within a bound: a
    cancelled request's release is on its way)."""
    assert up.proc.poll() is None, "baton up stopped"
    member = ((MEMBER_METADATA, member_token(read_secret(secret))),)
    assert len(up.nodes("decode")) == len(up.nodes("prefill")) == 1, "a node left"
    deadline = time.monotonic() + 30
    while True:
        stats = [up.stats(n, member) for n in up.nodes("decode") + up.nodes("prefill")]
        busy = [(s.node_id, s.free_blocks, s.total_blocks, s.running, s.reserved) for s in stats
                if (s.free_blocks, s.running, s.waiting, s.reserved) != (s.total_blocks, 0, 0, 0)]
        if not busy:
            return
        assert time.monotonic() < deadline, f"blocks still held: {busy}"
        time.sleep(0.1)  # polling nodes from outside: they signal nothing
