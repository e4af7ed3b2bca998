"""Streams that survive the loss of their decode node: the router resumes each one on live nodes from what its
client already has (prompt and delivered tokens prefilled again, decoding from the next index with the same
sampler state), so the client sees one stream, token for token the undisturbed run's."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest

from cluster_harness import BatonUp
from test_stories import PROMPTS

from baton.cluster.etcd_server import free_port
from baton.engine import LLM, Resumed, SamplingParams
from baton.router.client import AsyncBatonClient, BatonClient, BatonError, Delta, Finished

STREAMS = 64
TOKENS = 160
LONG = 460  # as long as stories260K's context (512) allows after the prompts


def _params(i: int) -> dict:
    """Greedy and seeded streams, half each."""
    return dict(max_tokens=TOKENS, ignore_eos=True, temperature=0.0) if i % 2 else \
        dict(max_tokens=TOKENS, ignore_eos=True, temperature=0.9, top_p=0.95, seed=100 + i)


class Progress:
    """Each stream's token count so far (`counts`), and a wait for every stream to reach a count that fails,
    naming the stream, as soon as one ends short of it (a dead stream would otherwise be waited for forever)."""

    def __init__(self, streams: int) -> None:
        self.counts = [0] * streams
        self._changed = asyncio.Event()  # set on every token counted and every stream's end

    def add(self, i: int, tokens: int) -> None:
        self.counts[i] += tokens
        self._changed.set()

    async def every_stream_has(self, tokens: int, tasks: list[asyncio.Task]) -> None:
        """Returns once every stream has `tokens` tokens. Each stream's own deadline bounds the wait: a stream
        that stalls ends by it, and then this fails."""
        for task in tasks:
            task.add_done_callback(lambda _: self._changed.set())
        while min(self.counts) < tokens:
            short = [i for i, t in enumerate(tasks) if t.done() and self.counts[i] < tokens]
            if short:
                i = short[0]
                end = "was cancelled" if tasks[i].cancelled() else \
                    f"failed: {tasks[i].exception()!r}" if tasks[i].exception() else "finished"
                raise AssertionError(f"stream {i} ended after {self.counts[i]} tokens ({end}), before every stream "
                                     f"had {tokens}; counts: {self.counts}")
            self._changed.clear()
            await self._changed.wait()


async def _stream(client: AsyncBatonClient, prompt: str, options: dict, progress: Progress, i: int):
    deltas, finish = [], None
    async for item in client.generate(prompt, **options):
        if isinstance(item, Delta):
            deltas.append(item)
            progress.add(i, len(item.token_ids))
        elif isinstance(item, Finished):
            finish = item
    return deltas, finish


def _through_faults(up: BatonUp, prompts: list[str], params: list[dict], faults) -> tuple[list, list]:
    """Runs the streams; each (tokens, fault) in `faults` fires once every stream has that many tokens.
    Returns each stream's (deltas, finish), and each stream's token count as each fault fired (a stream may
    have had all its tokens, and its Finish, before: on a loaded machine streams go at uneven paces)."""
    at_faults: list[list[int]] = []

    async def run():
        progress = Progress(len(prompts))
        async with AsyncBatonClient(up.address, timeout=300) as client:
            tasks = [asyncio.ensure_future(_stream(client, p, params[i], progress, i)) for i, p in enumerate(prompts)]
            for tokens, fault in faults:
                await progress.every_stream_has(tokens, tasks)  # every stream is decoding (wherever it is)
                at_faults.append(list(progress.counts))
                fault()
            return await asyncio.gather(*tasks)

    return asyncio.run(run()), at_faults


class StopBusiest:
    """A fault: `sig` to the decode node running the most streams at that moment (where the router put the
    streams is its business; one suite run put all eight on one node). `victim`: its node id and pid, after."""

    def __init__(self, up: BatonUp, sig: int) -> None:
        self.up, self.sig = up, sig
        self.decodes = up.nodes("decode")
        self.victim: tuple[str, int] | None = None

    def __call__(self) -> None:
        busiest = max(self.decodes, key=lambda d: self.up.stats(d).running)
        self.victim = (busiest.node_id, self.up.node_pid(busiest.node_id))
        os.kill(self.victim[1], self.sig)

    def other(self) -> str:
        return ({d.node_id for d in self.decodes} - {self.victim[0]}).pop()


def _migrations(up: BatonUp) -> dict[str, float]:
    """The router's baton_router_migrations_total by cause, from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{up.http.removesuffix('/v1')}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {sample.labels["cause"]: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "baton_router_migrations_total"}


def _moved_to(results: list, moved: list[str], node: str) -> None:
    """Every stream the router logged as moving (`moved`: its log lines) ended on `node`. (Which streams move
    cannot be told from the clients' counts at the fault: a stream may have had its last tokens and its
    Finish in flight from the old node then.)"""
    ids = {line.split()[5].rstrip(":") for line in moved}
    assert ids, "no stream moved: nothing was shown"
    ended = {finish.request_id: finish.decode_node for _, finish in results}
    assert ids <= set(ended) and {ended[i] for i in ids} == {node}


def _assert_whole(results: list, want: list[list[int]], tokens: int) -> None:
    """Every stream has every index once, the undisturbed run's tokens, and a Finish counting them."""
    for i, (deltas, finish) in enumerate(results):
        indices = [d.index + k for d in deltas for k in range(len(d.token_ids))]
        assert indices == list(range(tokens)), f"stream {i}: a token lost or repeated"
        assert [t for d in deltas for t in d.token_ids] == want[i], f"stream {i}"
        assert finish is not None and finish.completion_tokens == tokens, f"stream {i}"


def test_streams_survive_two_decode_nodes_killed_one_after_the_other(stories_path, stories_llm: LLM, tmp_path):
    """64 streams over three decode nodes; the busiest is SIGKILLed once every stream is decoding, and the
    busier of the two others once every stream has 20 tokens (some of its streams came from the first: they move
    a second time). The streams are as long as the context allows and the faults come early: a node runs far
    ahead of its clients (one CI run saw a node finish its 160-token streams before the slowest had 10)."""
    tokens = LONG
    params = [{**_params(i), "max_tokens": tokens} for i in range(STREAMS)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(STREAMS)]
    undisturbed = stories_llm.generate(prompts, [SamplingParams(**p) for p in params])
    want, want_text = [o.token_ids for o in undisturbed], [o.text for o in undisturbed]
    with BatonUp(tmp_path, "--model", str(stories_path), "--prefill", "1", "--decode", "3",
                 "--http-port", str(free_port())) as up:
        nodes = {n.node_id: n for n in up.nodes("decode")}
        pids = {node_id: up.node_pid(node_id) for node_id in nodes}
        victims: list[str] = []

        def kill_the_busiest() -> None:
            # Streams go at uneven paces on a loaded machine: when the slowest has 10 tokens, a node whose streams
            # were computed first may have finished all of its own (one CI run: decode-0).
            busiest = max((n for n in nodes if n not in victims), key=lambda n: up.stats(nodes[n]).running)
            victims.append(busiest)
            os.kill(pids[busiest], signal.SIGKILL)

        faults = [(1, kill_the_busiest), (20, kill_the_busiest)]
        results, _ = _through_faults(up, prompts, params, faults)
        _assert_whole(results, want, tokens)
        for i, (deltas, finish) in enumerate(results):
            assert "".join(d.text for d in deltas) == want_text[i], f"stream {i}"
            assert finish.finish_reason == "length"
        log = (up.log_dir / "router.log").read_text().splitlines()
        for node in victims:
            moved = [line for line in log if f"{node} failed" in line and "resuming on other nodes" in line]
            assert moved, f"no stream was on {node} when it was killed: nothing was shown"
            assert len({line.split()[5] for line in moved}) == len(moved) <= STREAMS  # each stream moved once
        # Every move is counted where operators look, by its cause.
        assert sum(_migrations(up).values()) == sum("resuming on other nodes" in line for line in log)
        [survivor] = [nodes[n] for n in nodes if n not in victims]
        up.wait_until(lambda: (s := up.stats(survivor)).free_blocks == s.total_blocks and not s.running, timeout=10)
    assert not up.hung


def test_a_stream_that_ends_short_of_a_faults_count_fails_the_wait_instead_of_hanging(stories_path, tmp_path):
    """`_through_faults` itself: a stream that ends before the count a fault waits for (here by its own
    max_tokens, as a stream that dies early would) fails the test at once, naming the stream; the fault never
    fires. (Waiting on `min(counts) < 10` alone would wait forever.)"""
    fired: list[bool] = []
    params = [dict(max_tokens=4, temperature=0.0, ignore_eos=True),
              dict(max_tokens=40, temperature=0.0, ignore_eos=True)]
    with BatonUp(tmp_path, "--model", str(stories_path), "--prefill", "1", "--decode", "1") as up:
        with pytest.raises(AssertionError, match=r"stream 0 ended after 4 tokens \(finished\), before every "
                                                 r"stream had 10"):
            _through_faults(up, [PROMPTS[0], PROMPTS[1]], params, [(10, lambda: fired.append(True))])
    assert not fired
    assert not up.hung and not up.leftovers


def test_an_engine_resumes_a_stream_token_for_token_from_what_was_delivered(stories_llm: LLM):
    """The engine side of a resumed stream, alone: after any number of delivered tokens, with or without stop
    strings holding text back, greedy or seeded, the rest is the undisturbed run's, text included."""
    engine = stories_llm.engine
    prompt = engine.tokenizer.encode(PROMPTS[1])
    cases = [SamplingParams(max_tokens=30, temperature=0), SamplingParams(max_tokens=30, temperature=0.9, seed=7),
             SamplingParams(max_tokens=30, temperature=0, stop=["zzz", "Lily and"])]
    for params in cases:
        [full] = stories_llm.generate([prompt], params)
        for k in (1, 4, 13):
            if k >= len(full.token_ids):
                continue
            engine.add_request("first", prompt, params)
            tokens, text, chars = [], "", None
            while engine.has_unfinished():
                for out in engine.step():
                    tokens += out.token_ids
                    text += out.text
                    if chars is None and len(tokens) >= k:
                        chars = len(text)  # what the client had when the node failed
            engine.add_request("again", prompt, params, resumed=Resumed(tuple(tokens[:k]), chars))
            rest, rest_text = [], ""
            while engine.has_unfinished():
                for out in engine.step():
                    assert out.first_index >= k
                    rest += out.token_ids
                    rest_text += out.text
            assert tokens[:k] + rest == full.token_ids, (params, k)
            assert text[:chars] + rest_text == full.text, (params, k)


def test_requests_survive_a_prefill_node_killed_while_it_prefills(stories_path, stories_llm: LLM, tmp_path):
    """2P1D; a prefill node is SIGKILLed while prompts are being computed and sent: every request completes on
    the other one, token for token, and the decode node is left holding nothing, at the latest once the
    transfers that were waiting for the dead node to join their channel time out (5 s here; gloo's own connect
    attempts, when it died in the middle of a rendezvous, took 25 s in one run)."""
    prompt = "Once upon a time, there was a little girl named Lily. She liked to play outside. " * 4
    params = dict(max_tokens=24, temperature=0.0, ignore_eos=True)
    [want] = stories_llm.generate([prompt], SamplingParams(**params))
    with BatonUp(tmp_path, "--model", str(stories_path), "--prefill", "2", "--decode", "1",
                 "--transfer-timeout", "5") as up:
        victim = up.node_pid("prefill-0")
        [decode] = up.nodes("decode")
        baseline = up.stats(decode).total_blocks

        async def one(client, i, first):
            tokens = []
            async for item in client.generate(prompt, **params):
                if isinstance(item, Delta):
                    tokens += item.token_ids
                    if not first.is_set():
                        first.set()
                        os.kill(victim, signal.SIGKILL)  # the others are queued, prefilling or in transfer
            return tokens

        async def run():
            first = asyncio.Event()
            async with AsyncBatonClient(up.address, timeout=120) as client:
                return await asyncio.gather(*(one(client, i, first) for i in range(24)))

        results = asyncio.run(run())
        assert all(tokens == want.token_ids for tokens in results)
        log = (up.log_dir / "router.log").read_text()
        assert "prefill-0 failed" in log, "no request was on the killed node: nothing was shown"
        up.wait_until(lambda: (s := up.stats(decode)).free_blocks == baseline and not s.running, timeout=60)
    assert not up.hung


def test_streams_move_off_a_stopped_decode_node_and_nothing_it_sends_later_reaches_a_client(stories_path,
                                                                                            stories_llm: LLM,
                                                                                            tmp_path):
    """SIGSTOP a decode node mid-stream (the one with the most streams then): its streams move once no token has come for the inactivity deadline
    (2 s here), and complete token for token; after SIGCONT, the stopped node's calls were cancelled, so what
    it sends goes nowhere (the clients' streams are whole, without a repeated index). Streams as long as the
    model's context allows: a node may run far ahead of its clients, and CI saw it finish 160-token streams
    before the stop, moving none."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(8)]
    params = [{**_params(i), "max_tokens": 460} for i in range(8)]
    want = [o.token_ids for o in stories_llm.generate(prompts, [SamplingParams(**p) for p in params])]
    with BatonUp(tmp_path, "--model", str(stories_path), "--prefill", "1", "--decode", "2",
                 "--stream-inactivity-timeout", "2", "--http-port", str(free_port())) as up:
        stop = StopBusiest(up, signal.SIGSTOP)
        try:
            results, _ = _through_faults(up, prompts, params, [(1, stop)])
        finally:
            if stop.victim is not None:
                os.kill(stop.victim[1], signal.SIGCONT)
        _assert_whole(results, want, 460)
        moved = [line for line in (up.log_dir / "router.log").read_text().splitlines()
                 if f"{stop.victim[0]} failed" in line and "no token within 2 s" in line]
        _moved_to(results, moved, stop.other())
        assert _migrations(up).get("silent") == len(moved)  # each stream fenced off the stopped node is counted


def test_requests_waiting_on_a_stopped_prefill_node_move_once_it_leaves_the_membership(stories_path,
                                                                                     stories_llm: LLM, tmp_path):
    """SIGSTOP a prefill node, then send requests: those picked for it wait for a first token that will not
    come (nothing times the prompt's computation: a long prompt in a long queue may rightly take minutes).
    Once the node's lease runs out and it leaves the membership, they move to the other prefill node, token
    for token; without that they hung until their deadline (a chaos run had one hang for 120 s). After
    SIGCONT, what the stopped node does with the calls it was given goes nowhere, and every block is free."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(6)]
    options = [dict(max_tokens=16, temperature=0.0, ignore_eos=True) for _ in prompts]
    want = [o.token_ids for o in stories_llm.generate(prompts, [SamplingParams(**p) for p in options])]
    # Every prompt through a prefill node (the decode node would compute a repeated one itself).
    with BatonUp(tmp_path, "--model", str(stories_path), "--prefill", "2", "--decode", "1",
                 "--stream-inactivity-timeout", "1", "--http-port", str(free_port()),
                 "--max-local-prefill-tokens", "0") as up:
        async def run():
            async with AsyncBatonClient(up.address, timeout=90) as client:
                return await asyncio.gather(*(_stream(client, p, options[i], Progress(len(prompts)), i)
                                              for i, p in enumerate(prompts)))

        # First with both nodes up: the router's channel to each is connected (a call to a stopped node on a
        # channel still connecting fails by itself, once the connection attempt times out).
        assert {finish.prefill_node for _, finish in asyncio.run(run())} == {"prefill-0", "prefill-1"}
        victim = up.node_pid("prefill-0")
        os.kill(victim, signal.SIGSTOP)
        try:
            results = asyncio.run(run())
        finally:
            os.kill(victim, signal.SIGCONT)
        _assert_whole(results, want, 16)
        moved = [line for line in (up.log_dir / "router.log").read_text().splitlines()
                 if "prefill-0 failed" in line and "left the membership" in line]
        assert moved, "no request was sent to the stopped node: nothing was shown"
        assert _migrations(up).get("left") == len(moved)
        assert {finish.prefill_node for _, finish in results} == {"prefill-1"}
        [decode] = up.nodes("decode")
        up.wait_until(lambda: (s := up.stats(decode)).free_blocks == s.total_blocks and not s.reserved, 30)


def test_the_picker_keeps_new_requests_off_a_node_that_just_failed_while_there_is_another():
    """A dead node stays in the membership until its lease runs out: new requests sent to it meanwhile each
    failed once before moving on (the migration benchmark showed 12 of 16 moves were such requests)."""
    from types import SimpleNamespace

    from baton.common.membership import NodeInfo
    from baton.router.picker import Picker

    nodes = [NodeInfo(node_id=f"decode-{i}", role="decode", model="m", address=f"h:{i}", capacity=8,
                      free_blocks=8 - 4 * i) for i in range(2)]
    now = [0.0]
    picker = Picker(SimpleNamespace(nodes=lambda role=None: list(nodes)), suspect_seconds=5, clock=lambda: now[0])
    assert picker.pick("decode").node_id == "decode-0"  # the least loaded
    picker.suspect("decode-0")
    assert picker.pick("decode").node_id == "decode-1"
    nodes.pop()  # the only one left is the suspect: still better than none
    assert picker.pick("decode").node_id == "decode-0"
    nodes.append(NodeInfo(node_id="decode-1", role="decode", model="m", address="h:1", capacity=8))
    now[0] = 5.0  # suspicion ends
    assert picker.pick("decode").node_id == "decode-0" and not picker.suspects


def test_a_decode_node_stopped_with_sigterm_hands_over_what_it_cannot_finish(stories_path, stories_llm: LLM,
                                                                            tmp_path):
    """SIGTERM: the node leaves etcd and finishes what it can within --drain-timeout (0.05 s here, for streams
    of 460 tokens that take longer); then each stream it still has ends at its next token, naming the node, and
    the router resumes it on the other decode node. The clients see whole streams; the node exits cleanly.
    A node may run well ahead of its clients (one CI run saw it finish every stream within 0.3 s of a stop at 10
    tokens; an idle run, before the stop at the first token): so each decode node decodes two streams at a
    time (--max-num-seqs 2) and holds the others waiting (--slots-per-seq 4 admits them all, --num-kv-blocks
    holds their K/V), which cannot be done by the stop, however fast the machine."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(12)]
    params = [{**_params(i), "max_tokens": 460} for i in range(12)]
    want = [o.token_ids for o in stories_llm.generate(prompts, [SamplingParams(**p) for p in params])]
    with BatonUp(tmp_path, "--model", str(stories_path), "--prefill", "1", "--decode", "2",
                 "--drain-timeout", "0.05", "--max-num-seqs", "2", "--slots-per-seq", "4",
                 "--num-kv-blocks", "512") as up:
        stop = StopBusiest(up, signal.SIGTERM)
        results, _ = _through_faults(up, prompts, params, [(1, stop)])
        _assert_whole(results, want, 460)
        (name, victim) = stop.victim
        moved = [line for line in (up.log_dir / "router.log").read_text().splitlines()
                 if f"{name} failed" in line and "handed over" in line]
        _moved_to(results, moved, stop.other())
        up.wait_until(lambda: not os.path.exists(f"/proc/{victim}") or
                      open(f"/proc/{victim}/stat").read().split()[2] == "Z", timeout=30)
        assert "handing over the streams still running" in (up.log_dir / f"{name}.log").read_text()


def test_choices_of_a_shared_prefill_go_on_alone_when_their_decode_node_dies(stories_path, stories_llm: LLM,
                                                                            tmp_path):
    """OpenAI n=4 (one prefill, the choices forked on one decode node): that node SIGKILLed once every choice
    has its first token (and long streams: a node runs far ahead of its clients). Each choice resumes alone on
    the other decode node from what its client has, token for token its undisturbed run (seed + its index),
    and each move is counted."""
    openai = pytest.importorskip("openai")
    prompt, n, tokens = PROMPTS[1], 4, LONG
    want = [stories_llm.generate([prompt], SamplingParams(max_tokens=tokens, temperature=0.9, seed=5 + j,
                                                          ignore_eos=True))[0].text for j in range(n)]
    with BatonUp(tmp_path, "--model", str(stories_path), "--prefill", "1", "--decode", "2",
                 "--http-port", str(free_port())) as up:
        decodes = up.nodes("decode")
        texts, counts, victims = [""] * n, [0] * n, []
        with openai.OpenAI(base_url=up.http, api_key="unused", max_retries=0, timeout=120) as client:
            for chunk in client.completions.create(model="stories260K", prompt=prompt, n=n, max_tokens=tokens,
                                                   temperature=0.9, seed=5, stream=True,
                                                   extra_body={"ignore_eos": True}):
                for c in chunk.choices:
                    texts[c.index] += c.text
                    counts[c.index] += 1
                if not victims and min(counts) >= 1:
                    [busy] = [d for d in decodes if up.stats(d).running]  # all four choices are on one node
                    victims.append(busy.node_id)
                    os.kill(up.node_pid(busy.node_id), signal.SIGKILL)
        assert victims, "the fault was never injected"
        assert texts == want
        log = (up.log_dir / "router.log").read_text()
        assert f"{victims[0]} failed under its {n} choices" in log
        alone = log.count("goes on alone")
        assert 1 <= alone <= n and sum(_migrations(up).values()) == alone  # the choices that had not finished


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGTERM"])
def test_colocated_streams_move_to_another_colocated_node(fault: str, stories_path, stories_llm: LLM, tmp_path):
    """Colocated nodes (each does the whole request): a node killed, or stopped with SIGTERM and no drain time,
    mid-stream; its streams go on on the other node (the prompt and the delivered tokens computed again there),
    token for token the undisturbed run. (No drain time, and streams as long as the model's context allows: the
    node may run far ahead of its clients, and a drain would let it finish them, moving nothing: CI saw that
    with a 0.3 s drain and 300 tokens.)"""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(12)]
    params = [{**_params(i), "max_tokens": 460} for i in range(12)]
    want = [o.token_ids for o in stories_llm.generate(prompts, [SamplingParams(**p) for p in params])]
    with BatonUp(tmp_path, "--model", str(stories_path), "--prefill", "0", "--decode", "0", "--colocated", "2",
                 "--drain-timeout", "0") as up:
        victim = up.node_pid("colocated-0")
        results, _ = _through_faults(up, prompts, params, [(1, lambda: os.kill(victim, getattr(signal, fault)))])
        _assert_whole(results, want, 460)
        moved = [line for line in (up.log_dir / "router.log").read_text().splitlines()
                 if "colocated-0 failed" in line and "resuming on other nodes" in line]
        assert moved, "no stream was on the node that went: nothing was shown"


def _command_of(pid: int) -> tuple[list[str], dict[str, str], str]:
    """A process's command line, environment and folder: what restarting it as it was takes."""
    argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]
    env = dict(e.decode().split("=", 1) for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in e)
    return argv, env, os.readlink(f"/proc/{pid}/cwd")


def test_a_node_restarted_on_its_address_is_served_at_once(stories_path, stories_llm: LLM, tmp_path):
    """A prefill node killed, refused for a while (between reconnects the router's channel to it backs off,
    by grpc's default up to 2 minutes), then started again on the same address, as a supervisor would: once it
    is registered, requests reach it at once (a channel that failed is replaced; reconnects are at most 1 s
    apart)."""
    [want] = stories_llm.generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0))
    with BatonUp(tmp_path, "--model", str(stories_path), "--prefill", "1", "--decode", "1") as up:
        [prefill] = up.nodes("prefill")
        with BatonClient(up.address, timeout=30) as client:
            assert client.complete(PROMPTS[0], max_tokens=8, temperature=0).token_ids == want.token_ids
        pid = up.node_pid("prefill-0")
        argv, env, cwd = _command_of(pid)
        argv[argv.index("--parent-pid") + 1] = str(os.getpid())
        argv += ["--port", prefill.address.rpartition(":")[2]]  # `baton up` let it take a free one
        os.kill(pid, signal.SIGKILL)
        with BatonClient(up.address, timeout=1.0) as client:  # refused while it is down: the backoff grows
            for _ in range(6):
                with pytest.raises(BatonError):
                    client.complete(PROMPTS[0], max_tokens=8, temperature=0)
        with open(up.log_dir / "prefill-0.restart.log", "wb") as log:
            restarted = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        try:
            up.wait_until(lambda: [n.address for n in up.nodes("prefill")] == [prefill.address], timeout=60,
                          interval=0.05)
            with BatonClient(up.address, timeout=30) as client:
                done = client.complete(PROMPTS[0], max_tokens=8, temperature=0)
            assert done.token_ids == want.token_ids and done.finished.prefill_node == "prefill-0"
        finally:
            restarted.terminate()
            restarted.wait(30)


def test_a_prefill_call_that_fails_before_the_decode_streams_first_message_ends_the_wait_at_once():
    """A prefill node killed after its first token but before its K/V were all in: the decode node may not
    learn of it for a whole lease, so the router watches the prefill call (the stream's `feeder`) until the
    decode node's first message, and moves the request at once instead of after the inactivity deadline (the
    10-minute chaos run had a stream wait 10 s here). After that message, the feeder no longer matters. A
    stream given up either way, or for silence, is cancelled on its node (fenced off)."""
    from baton.router.streams import FeederFailed, NodeStream
    from baton.v1 import baton_pb2 as pb

    class Node:  # what a NodeStream tells its node (NodeStreams, over the Streams call)
        def __init__(self) -> None:
            self.cancelled: list[str] = []

        def cancel(self, request_id: str) -> None:
            self.cancelled.append(request_id)

    async def run():
        loop = asyncio.get_running_loop()
        node, feeder = Node(), loop.create_future()
        stream = NodeStream(node, "a", None, 60.0, feeder)
        loop.call_soon(feeder.set_exception, RuntimeError("prefill node gone"))
        with pytest.raises(FeederFailed) as failed:
            async for _ in stream:
                pass
        assert str(failed.value.error) == "prefill node gone" and node.cancelled == ["a"]
        # The feeder failing after the first message changes nothing.
        feeder = loop.create_future()
        stream, got = NodeStream(node, "b", None, 60.0, feeder), []
        stream.put(pb.GenerateResponse(request_id="b", chunk=pb.TokenChunk(index=0, token_ids=[1])))
        async for message in stream:
            got.append(message.chunk.index)
            if len(got) == 1:
                feeder.set_exception(RuntimeError("late"))
                loop.call_later(0.05, stream.put, pb.GenerateResponse(request_id="b",
                                                                      chunk=pb.TokenChunk(index=1, token_ids=[2])))
                loop.call_later(0.1, stream.end, None)
        assert got == [0, 1] and str(feeder.exception()) == "late" and node.cancelled == ["a"]
        # Silence: only the consumer's wait counts. A consumer slower than the silence loses nothing; a wait
        # that long ends the stream.
        stream = NodeStream(node, "c", None, 0.2)
        loop.call_later(0.1, stream.put, pb.GenerateResponse(request_id="c", chunk=pb.TokenChunk(index=0)))
        loop.call_later(0.15, stream.put, pb.GenerateResponse(request_id="c", chunk=pb.TokenChunk(index=1)))
        first = await stream.__anext__()
        await asyncio.sleep(0.5)  # busy with it, longer than the silence: the next one is there
        assert first.chunk.index == 0 and (await stream.__anext__()).chunk.index == 1
        with pytest.raises(TimeoutError):
            await stream.__anext__()
        assert node.cancelled == ["a", "c"]
        assert asyncio.current_task().cancelling() == 0  # nothing left cancelled behind

    asyncio.run(asyncio.wait_for(run(), 30))
