"""Several routers over one cluster, and a client that resumes its streams on another router when its router
dies: no token lost, none repeated, the tokens of an undisturbed run."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster_harness import BATON, BatonUp, cluster_pids
from test_migration import Progress, _params, _stream
from test_stories import PROMPTS

from baton.cluster.etcd_server import free_port
from baton.engine import LLM, SamplingParams
from baton.router.client import AsyncBatonClient, BatonClient, Delta, Finished, InvalidArgument
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc

STREAMS = 24
# Long streams: the router must die with tokens still to send. At 120 an idle machine once had every stream's
# tokens generated and sent before the kill landed, and nothing was left to resume.
TOKENS = 400
_RESUMED = re.compile(r"request (?P<id>\S+): resumed by its client after (?P<tokens>\d+) tokens")


class Router:
    """A second `baton router` process on a cluster's etcd: `with Router(up, model) as address:`. It logs
    straight to a file (each line flushed as written), so what a test reads there is never behind."""

    def __init__(self, up: BatonUp, model: Path, *options: str) -> None:
        self.port = free_port()
        self.args = [BATON, "router", "--etcd", up.etcd, "--cluster", up.cluster, "--model", str(model),
                     "--port", str(self.port), "--parent-pid", str(os.getpid()), *options]
        self.log = up.log_dir / "router-b.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> str:
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        address = f"127.0.0.1:{self.port}"
        cert = self.args[self.args.index("--tls-cert") + 1] if "--tls-cert" in self.args else None
        try:
            # serving once it sees the cluster's nodes (over TLS if it has a certificate: its own is the issuer)
            with (grpc.secure_channel(address, grpc.ssl_channel_credentials(Path(cert).read_bytes())) if cert
                  else grpc.insecure_channel(address)) as channel:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60,
                                                          wait_for_ready=True)
        except grpc.RpcError:
            self.__exit__()
            raise RuntimeError(f"the second router did not start:\n{self.log.read_text()}") from None
        return address

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _router_pid(up: BatonUp) -> int:
    """`baton up`'s router (the one listening on up.address)."""
    port = up.address.rsplit(":", 1)[1].encode()
    args = {p: Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0") for p in cluster_pids(up.cluster)}
    [pid] = [p for p, a in args.items() if b"router" in a and port in a]
    return pid


def test_streams_resume_on_another_router_when_theirs_is_killed(stories_path, stories_llm: LLM, tmp_path):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(STREAMS)]
    options = [{**_params(i), "max_tokens": TOKENS} for i in range(STREAMS)]
    undisturbed = stories_llm.generate(prompts, [SamplingParams(**o) for o in options])
    ids = [f"stream-{i}" for i in range(STREAMS)]
    with BatonUp(tmp_path, "--model", str(stories_path), "--prefill", "1", "--decode", "2") as up, \
            Router(up, stories_path) as second:
        victim = _router_pid(up)
        decodes = up.nodes("decode")

        async def run():
            progress = Progress(STREAMS)
            async with AsyncBatonClient([up.address, second], timeout=300) as client:
                tasks = [asyncio.ensure_future(_stream(client, p, {**options[i], "request_id": ids[i]}, progress, i))
                         for i, p in enumerate(prompts)]
                await progress.every_stream_has(2, tasks)  # every stream is decoding, through the first router
                os.kill(victim, signal.SIGKILL)
                at_kill.extend(progress.counts)
                return await asyncio.gather(*tasks)

        at_kill: list[int] = []

        results = asyncio.run(run())
        for i, (deltas, finish) in enumerate(results):
            indices = [d.index + k for d in deltas for k in range(len(d.token_ids))]
            assert indices == list(range(TOKENS)), f"stream {i}: a token lost or repeated"
            assert [t for d in deltas for t in d.token_ids] == undisturbed[i].token_ids, f"stream {i}"
            assert "".join(d.text for d in deltas) == undisturbed[i].text, f"stream {i}"
            assert finish is not None and finish.finish_reason == "length" and finish.completion_tokens == TOKENS
        resumed = [_RESUMED.search(line) for line in (up.log_dir / "router-b.log").read_text().splitlines()]
        after = {m["id"]: int(m["tokens"]) for m in resumed if m}
        # Some streams moved, each once, from at least what its client had when the router died. Which ones
        # cannot be told from the client's count then: what the router had sent before it died still arrives.
        assert after, "no stream was resumed: they all ended before the router died"
        assert len(after) == sum(1 for m in resumed if m), "a stream resumed twice"
        assert set(after) <= set(ids)
        for rid, tokens in after.items():
            assert at_kill[ids.index(rid)] <= tokens <= TOKENS, rid
        # The dead router's calls ended on the nodes with its connections: nothing is left held.
        for node in decodes:
            up.wait_until(lambda: (s := up.stats(node)).free_blocks == s.total_blocks and not s.running
                          and not s.reserved, timeout=10)


@pytest.fixture(scope="module")
def cluster(stories_path, tmp_path_factory):
    with BatonUp(tmp_path_factory.mktemp("resume"), "--model", str(stories_path), "--prefill", "1",
                 "--decode", "1") as up:
        yield up


def test_a_resumed_request_goes_on_from_the_next_index(cluster, stories_llm: LLM):
    """What the client library sends when its router fails, sent by hand: the stream's rest, from the index
    after what the client has, its text included (a stop string holding text back, seeded sampling)."""
    prompt = PROMPTS[3]
    for params in (dict(max_tokens=30, temperature=0.0), dict(max_tokens=30, temperature=0.9, seed=11),
                   dict(max_tokens=30, temperature=0.0, stop=["zzz"])):
        [full] = stories_llm.generate([prompt], SamplingParams(**params))
        with BatonClient(cluster.address, timeout=60) as client:
            for cut in (1, 7, 29, 30):
                head = full.token_ids[:cut]
                head_text = stories_llm.engine.tokenizer.decode(full.prompt_token_ids + head)[len(prompt):]
                if params.get("stop"):
                    head_text = head_text[:max(0, len(head_text) - 2)]  # as if "zz" were held back
                request = pb.GenerateRequest(text=prompt, sampling=pb.SamplingParams(**params),
                                             resume=pb.Resume(token_ids=head, text_chars=len(head_text)))
                responses = list(baton_pb2_grpc.BatonStub(client._channels[0]).Generate(request, timeout=60))
                chunks = [r.chunk for r in responses if r.HasField("chunk")]
                assert [t for c in chunks for t in c.token_ids] == full.token_ids[cut:], (params, cut)
                assert chunks == [] or chunks[0].index == cut
                assert head_text + "".join(c.text for c in chunks) == full.text, (params, cut)
                finish = responses[-1].finish
                assert finish.reason == pb.FINISH_REASON_LENGTH and finish.usage.completion_tokens == 30


@pytest.mark.parametrize("resume, sampling, field", [
    (pb.Resume(token_ids=[1] * 9), dict(max_tokens=8, temperature=0.0), "resume.token_ids"),
    (pb.Resume(token_ids=[1, 10**6]), dict(max_tokens=8, temperature=0.0), "resume.token_ids"),
    (pb.Resume(token_ids=[1, 2]), dict(max_tokens=8, temperature=0.7), "resume"),
    (pb.Resume(token_ids=[300, 301], text_chars=10**4), dict(max_tokens=8, temperature=0.0), "resume.text_chars"),
])
def test_a_bad_resume_names_its_field(cluster, resume, sampling, field):
    with BatonClient(cluster.address, timeout=30) as client:
        stub = baton_pb2_grpc.BatonStub(client._channels[0])
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(pb.GenerateRequest(text="Once", sampling=pb.SamplingParams(**sampling),
                                                  resume=resume), timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert InvalidArgument(e.value.code(), e.value.details()).field == field, e.value.details()


def test_a_client_with_one_dead_router_fails_over_to_the_live_one(cluster, stories_llm: LLM):
    """A router that cannot be reached at all: the request goes to the next one from the start."""
    with BatonClient(["127.0.0.1:9", cluster.address], timeout=60) as client:
        items = list(client.generate(PROMPTS[0], max_tokens=12, temperature=0))
    [want] = stories_llm.generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0))
    assert [t for d in items if isinstance(d, Delta) for t in d.token_ids] == want.token_ids
    assert isinstance(items[-1], Finished) and items[-1].completion_tokens == 12


def _greedy_with_ends(llm: LLM, prompt: str, tokens: int):
    """A greedy completion, and where each of its tokens' text ends in its text (characters)."""
    tokenizer = llm.engine.tokenizer
    [full] = llm.generate([prompt], SamplingParams(max_tokens=tokens, temperature=0.0))
    base = len(tokenizer.decode(full.prompt_token_ids))
    return full, [len(tokenizer.decode(full.prompt_token_ids + full.token_ids[:i + 1])) - base
                  for i in range(tokens)]


def test_a_stream_ended_before_its_finish_ignores_stop_strings_before_min_tokens(stories_llm: LLM):
    """`router/resume.end` (the stream's last tokens were delivered, its Finish was not): a stop string held
    back in the text but completed before min_tokens was reached does not end the stream, as in the engine."""
    from baton.router import resume

    tokenizer = stories_llm.engine.tokenizer
    prompt = PROMPTS[0]
    full, ends = _greedy_with_ends(stories_llm, prompt, 12)
    prompt_ids = full.prompt_token_ids
    # A stop string completed by token 9, long enough to lie in the text held back at the end.
    size = len(full.text) - ends[9] + 2
    stop = full.text[ends[9] - size:ends[9]]
    assert full.text.count(stop) == 1
    params = SamplingParams(max_tokens=12, temperature=0.0, stop=[stop], min_tokens=12)
    [engine] = stories_llm.generate([prompt], params)
    assert engine.text == full.text and engine.finish_reason.value == "length"  # the engine goes on
    chars = len(full.text) - (size - 1)  # what its client had: the rest was held back
    eos = stories_llm.engine.model_config.eos_token_ids
    responses = resume.end(tokenizer, prompt_ids, full.token_ids, chars, params, eos, "r")
    assert full.text[:chars] + "".join(r.chunk.text for r in responses if r.HasField("chunk")) == full.text
    assert responses[-1].finish.reason == pb.FINISH_REASON_LENGTH
    assert resume.end(tokenizer, prompt_ids, full.token_ids[:11], chars, params, eos, "r") is None  # goes on


def test_a_stream_ended_on_a_stop_string_before_its_finish_is_ended_by_the_router(stories_llm: LLM):
    """The tokens reached the client, the Finish did not, and the last token completed a stop string: the
    router ends the stream there (held-back text up to the stop, then STOP), as the engine did; sent on to a
    node, it would go on past the stop."""
    from baton.router import resume

    tokenizer = stories_llm.engine.tokenizer
    prompt = PROMPTS[0]
    full, ends = _greedy_with_ends(stories_llm, prompt, 12)
    prompt_ids = full.prompt_token_ids
    stop = full.text[ends[8]:ends[9]]  # what token 9 adds: it completes the stop string
    assert stop and full.text.find(stop) == ends[8]
    params = SamplingParams(max_tokens=12, temperature=0.0, stop=[stop])
    [engine] = stories_llm.generate([prompt], params)
    assert engine.finish_reason.value == "stop" and engine.token_ids == full.token_ids[:10]
    chars = max(0, ends[9] - len(stop) - (len(stop) - 1))  # the client's text: the rest was held back
    eos = stories_llm.engine.model_config.eos_token_ids
    responses = resume.end(tokenizer, prompt_ids, engine.token_ids, chars, params, eos, "r")
    assert full.text[:chars] + "".join(r.chunk.text for r in responses if r.HasField("chunk")) == engine.text
    assert responses[-1].finish.reason == pb.FINISH_REASON_STOP
