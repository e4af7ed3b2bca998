"""The OpenAI-compatible HTTP front, driven by the official `openai` client (sync and async) and by aiohttp's,
against `baton up`: the same tokens as baton.v1 and the offline engine, OpenAI's streaming format, its error
objects, and requests that a client abandons freed on every node."""

from __future__ import annotations

import asyncio
import json
import shutil

import aiohttp
import pytest

from cluster_harness import BatonUp
from test_node_metrics import Scrape, idle
from test_stories import PROMPTS

from baton.cluster.etcd_server import free_port
from baton.engine import LLM, SamplingParams
from baton.engine.config import ModelConfig
from baton.router.client import BatonClient

openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")

MODEL = "stories260K"


@pytest.fixture(scope="module")
def up(stories_path, tmp_path_factory):
    with BatonUp(tmp_path_factory.mktemp("openai"), "--model", str(stories_path), "--prefill", "1", "--decode", "1",
                 "--http-port", str(free_port())) as up:
        yield up


@pytest.fixture(scope="module")
def client(up):
    with openai.OpenAI(base_url=up.http, api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def _offline(llm: LLM, prompt: str, **params):
    [out] = llm.generate([prompt], SamplingParams(**params))
    return out


def test_completions_equal_the_grpc_api_and_the_offline_engine(up, client, stories_llm: LLM):
    prompt = PROMPTS[0]
    want = _offline(stories_llm, prompt, max_tokens=40, temperature=0.0)
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0)
    assert got.object == "text_completion" and got.model == MODEL
    [choice] = got.choices
    assert choice.text == want.text and choice.index == 0
    assert choice.finish_reason == ("length" if want.finish_reason.value == "length" else "stop")
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    with BatonClient(up.address, timeout=60) as grpc_client:
        assert grpc_client.complete(prompt, max_tokens=40, temperature=0.0).text == want.text


def test_streamed_completions_follow_openais_format(client, stories_llm: LLM):
    prompt = PROMPTS[1]
    want = _offline(stories_llm, prompt, max_tokens=30, temperature=0.0, ignore_eos=True)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    *tokens, last, usage = chunks
    assert len({c.id for c in chunks}) == 1 and all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in tokens + [last]) == want.text
    assert all(c.choices[0].finish_reason is None for c in tokens) and last.choices[0].finish_reason == "length"
    assert usage.choices == [] and usage.usage.completion_tokens == 30
    assert usage.usage.prompt_tokens == len(want.prompt_token_ids)


def _prefill_once(up, calls: int, prompt_tokens: int):
    """A context whose body's calls must compute each of their prompts once, whatever their n: the prefill
    node's request and prompt-token counters move by exactly that (and every block comes back)."""
    [prefill], [decode] = up.nodes("prefill"), up.nodes("decode")
    up.wait_until(lambda: idle(prefill) and idle(decode), 10)
    before = Scrape(prefill.metrics_address)

    class Check:
        def __enter__(self):
            return self

        def __exit__(self, *failed):
            if failed[0] is None:
                up.wait_until(lambda: idle(prefill) and idle(decode), 10)
                after = Scrape(prefill.metrics_address)
                moved = {name: after.value(name) - before.value(name)
                         for name in ("baton_requests_total", "baton_prompt_tokens_total")}
                assert moved == {"baton_requests_total": calls, "baton_prompt_tokens_total": prompt_tokens}

    return Check()


def test_async_client_streams_and_sampled_choices_are_reproducible(up, stories_llm: LLM):
    prompts = [PROMPTS[2], PROMPTS[3]]
    lengths = [len(stories_llm.engine.tokenizer.encode(p)) for p in prompts]

    async def run():
        async with openai.AsyncOpenAI(base_url=up.http, api_key="unused", max_retries=0, timeout=120) as client:
            stream = await client.completions.create(model=MODEL, prompt=prompts, n=3, seed=7, temperature=0.8,
                                                     max_tokens=12, stream=True)
            texts = [""] * 6
            finishes = [None] * 6
            async for chunk in stream:
                for c in chunk.choices:
                    texts[c.index] += c.text
                    finishes[c.index] = c.finish_reason or finishes[c.index]
            whole = await client.completions.create(model=MODEL, prompt=prompts, n=3, seed=7, temperature=0.8,
                                                    max_tokens=12)
            return texts, finishes, whole

    with _prefill_once(up, calls=2 * len(prompts), prompt_tokens=2 * sum(lengths)):  # not n times over
        texts, finishes, whole = asyncio.run(run())
    assert [c.text for c in sorted(whole.choices, key=lambda c: c.index)] == texts  # the same, streamed or not
    assert all(finishes)
    for p, prompt in enumerate(prompts):  # prompt-major; choice j takes seed + j
        for j in range(3):
            want = _offline(stories_llm, prompt, max_tokens=12, temperature=0.8, seed=7 + j)
            assert texts[p * 3 + j] == want.text, (p, j)
    assert len(set(texts[:3])) > 1  # the choices differ


@pytest.mark.parametrize("length", [21, 32])  # a prompt that ends in a partly filled block, and one that does not
def test_choices_fork_from_one_prefill_token_for_token(up, client, stories_llm: LLM, length: int):
    """n choices of one prompt: prefilled once, the choices forked from its blocks on the decode node (each
    computes the prompt's tail past the full blocks it shares, and samples its own first token); greedy and
    seeded choices each equal the offline engine's run of that choice."""
    ids = stories_llm.engine.tokenizer.encode(" ".join(PROMPTS))[:length]
    greedy = _offline(stories_llm, ids, max_tokens=16, temperature=0.0, ignore_eos=True)
    with _prefill_once(up, calls=2, prompt_tokens=2 * length):
        same = client.completions.create(model=MODEL, prompt=ids, n=4, max_tokens=16, temperature=0, extra_body={
            "ignore_eos": True})
        seeded = client.completions.create(model=MODEL, prompt=ids, n=3, max_tokens=16, temperature=0.9, seed=11,
                                           extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(same.choices, key=lambda c: c.index)] == [greedy.text] * 4
    assert same.usage.completion_tokens == 4 * 16 and same.usage.prompt_tokens == length
    for c in seeded.choices:
        want = _offline(stories_llm, ids, max_tokens=16, temperature=0.9, seed=11 + c.index, ignore_eos=True)
        assert c.text == want.text, c.index


def test_penalties_and_vllms_extensions_equal_the_offline_engine(client, stories_llm: LLM):
    options = dict(max_tokens=30, temperature=0.0, presence_penalty=0.5, frequency_penalty=0.7,
                   repetition_penalty=1.3, min_tokens=12)
    want = _offline(stories_llm, PROMPTS[1], **options)
    plain = _offline(stories_llm, PROMPTS[1], max_tokens=30, temperature=0.0)
    assert want.text != plain.text  # the penalties change this output: the test shows they are applied
    got = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=30, temperature=0,
                                    presence_penalty=0.5, frequency_penalty=0.7,
                                    extra_body={"repetition_penalty": 1.3, "min_tokens": 12})
    assert got.choices[0].text == want.text
    sampled = dict(max_tokens=20, temperature=0.9, min_p=0.2, top_k=40, seed=3)
    got = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=20, temperature=0.9, seed=3,
                                    extra_body={"min_p": 0.2, "top_k": 40})
    assert got.choices[0].text == _offline(stories_llm, PROMPTS[1], **sampled).text


def test_logprobs_and_top_alternatives_equal_transformers(client, hf_stories, stories_llm: LLM):
    """logprobs=3: each token's log-probability and its three most likely alternatives, the model's own
    (transformers' log-softmax of the same checkpoint's logits at each step), whole and streamed."""
    import torch

    prompt = PROMPTS[3]
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    ids = stories_llm.engine.tokenizer.encode(prompt)
    generated = stories_llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0))[0].token_ids
    with torch.no_grad():
        logits = hf_stories(torch.tensor([ids + generated])).logits[0, len(ids) - 1:-1].float()
    want = torch.log_softmax(logits, dim=-1)
    decode = stories_llm.engine.tokenizer.decode
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(generated)
    for step, (token, chosen, top) in enumerate(zip(generated, lp.token_logprobs, lp.top_logprobs)):
        values, best = want[step].topk(3)
        assert list(top) == [decode([t], skip_special_tokens=False) for t in best.tolist()], step
        assert list(top.values()) == pytest.approx(values.tolist(), abs=1e-3)
        assert chosen == pytest.approx(want[step, token].item(), abs=1e-3)
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                              logprobs=3, stream=True))
    tops = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.top_logprobs]
    assert tops == lp.top_logprobs


def test_token_prompts_and_models(client, stories_llm: LLM, stories_path):
    ids = stories_llm.engine.tokenizer.encode(PROMPTS[4])
    want = _offline(stories_llm, PROMPTS[4], max_tokens=10, temperature=0.0)
    got = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0)
    assert got.choices[0].text == want.text
    [model] = client.models.list().data
    assert model.id == MODEL and model.model_extra["max_model_len"] == ModelConfig.from_folder(stories_path).max_model_len


@pytest.mark.parametrize("kwargs, status, param", [
    (dict(temperature=-1), 400, "temperature"),
    (dict(top_p=0), 400, "top_p"),
    (dict(max_tokens=0), 400, "max_tokens"),
    (dict(max_tokens=100_000), 400, "max_tokens"),
    (dict(prompt=""), 400, "prompt"),
    (dict(prompt=[]), 400, "prompt"),
    (dict(extra_body={"stop": 3}), 400, "stop"),
    (dict(extra_body={"echo": True}), 400, "echo"),
    (dict(model="gpt-4"), 404, "model"),
    (dict(presence_penalty=2.5), 400, "presence_penalty"),
    (dict(frequency_penalty="a lot"), 400, "frequency_penalty"),
    (dict(extra_body={"min_p": 1.5}), 400, "min_p"),
    (dict(extra_body={"repetition_penalty": 0}), 400, "repetition_penalty"),
    (dict(extra_body={"min_tokens": 9}), 400, "min_tokens"),
    (dict(n=0), 400, "n"),
    (dict(logprobs=21), 400, "logprobs"),
])
def test_bad_fields_get_openais_error_object(client, kwargs, status, param):
    args = dict(model=MODEL, prompt="Once", max_tokens=4) | kwargs
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(**args)
    e = caught.value
    assert e.status_code == status
    assert e.body["param"] == param and e.body["message"].startswith(f"{param}:")
    if status == 404:
        assert MODEL in e.body["message"] and e.body["code"] == "model_not_found"


def test_chat_without_a_template_is_a_400_that_says_so(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert "no chat template" in caught.value.body["message"] and caught.value.body["param"] == "messages"


def _http(method: str, url: str, **kwargs) -> tuple[int, dict | str]:
    async def call():
        async with aiohttp.ClientSession() as session, session.request(method, url, **kwargs) as response:
            body = await response.text()
            try:
                return response.status, json.loads(body)
            except ValueError:
                return response.status, body

    return asyncio.run(call())


def test_tokenize_and_detokenize(up, stories_llm: LLM):
    base = up.http.removesuffix("/v1")
    status, tokens = _http("POST", f"{base}/tokenize", json={"model": MODEL, "prompt": PROMPTS[0]})
    assert status == 200 and tokens["tokens"] == stories_llm.engine.tokenizer.encode(PROMPTS[0])
    assert tokens["count"] == len(tokens["tokens"])
    status, text = _http("POST", f"{base}/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]})
    assert status == 200 and text["prompt"] == PROMPTS[0]
    status, bad = _http("POST", f"{base}/detokenize", json={"tokens": [10**9]})
    assert status == 400 and bad["error"]["param"] == "tokens"
    assert _http("POST", f"{base}/tokenize", data=b"{not json")[0] == 400
    assert _http("GET", f"{base}/health")[0] == 200


def test_the_request_id_is_the_clients_and_comes_back(up, client):
    """x-request-id: the client's id names the completion and comes back in the response's header."""
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="Once", max_tokens=3,
                                                      extra_headers={"x-request-id": "trace-77"})
    assert raw.headers["x-request-id"] == "trace-77" and raw.parse().id == "cmpl-trace-77"
    generated = client.completions.with_raw_response.create(model=MODEL, prompt="Once", max_tokens=3)
    assert generated.parse().id == f"cmpl-{generated.headers['x-request-id']}"


def test_a_client_that_leaves_frees_its_blocks(up):
    """A streamed completion abandoned after two events: its sequence ends on the decode node."""
    [decode] = up.nodes("decode")
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True}

    async def leave_early():
        async with aiohttp.ClientSession() as session, session.post(f"{up.http}/completions", json=body) as response:
            seen = 0
            async for line in response.content:
                if line.startswith(b"data: "):
                    seen += 1
                    if seen == 2:
                        return seen

    assert asyncio.run(leave_early()) == 2
    up.wait_until(lambda: (s := up.stats(decode)).free_blocks == s.total_blocks and not s.running, timeout=15)


def _scrape(up) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    status, text = _http("GET", f"{up.http.removesuffix('/v1')}/metrics")
    assert status == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_router_metrics_move_by_exactly_what_was_sent(up, client):
    def get(samples, name, **labels):
        return samples.get((name, tuple(sorted(({"model": MODEL} | labels).items()))), 0.0)

    before = _scrape(up)
    lengths = [5, 9, 13]
    for n in lengths:
        client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=n, extra_body={"ignore_eos": True})
    with BatonClient(up.address, timeout=60) as grpc_client:
        grpc_client.complete(PROMPTS[1], max_tokens=7, ignore_eos=True)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=-2)
    after = _scrape(up)

    def moved(name, **labels):
        return get(after, name, **labels) - get(before, name, **labels)

    assert moved("baton_router_requests_total", front="openai", status="ok") == 3
    assert moved("baton_router_requests_total", front="grpc", status="ok") == 1
    assert moved("baton_router_requests_total", front="openai", status="INVALID_ARGUMENT") == 1
    assert moved("baton_router_completion_tokens_total", front="openai") == sum(lengths)
    assert moved("baton_router_completion_tokens_total", front="grpc") == 7
    status, ids = _http("POST", f"{up.http.removesuffix('/v1')}/tokenize", json={"prompt": PROMPTS[0]})
    assert moved("baton_router_prompt_tokens_total", front="openai") == 3 * ids["count"]
    assert moved("baton_router_time_to_first_token_seconds_count", front="openai") == 3
    assert moved("baton_router_e2e_request_latency_seconds_count", front="openai") == 3
    assert moved("baton_router_time_per_output_token_seconds_count", front="openai") == 3
    assert moved("baton_router_inter_token_latency_seconds_count", front="openai") == sum(n - 1 for n in lengths)
    assert get(after, "baton_router_running_requests", front="openai") == 0
    live = {dict(labels)["role"]: value for (name, labels) in after if name == "baton_router_live_nodes"
            for value in [after[(name, labels)]]}
    assert live["prefill"] == 1 and live["decode"] == 1


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYS] {{ m['content'] }}\n"
                 "{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """A tiny random Llama with the stories tokenizer and a chat template in its tokenizer_config.json."""
    from test_architectures import VARIANTS, write_checkpoint

    folder = write_checkpoint(tmp_path_factory.mktemp("chat-model"), VARIANTS["llama-gqa2"])
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_chat_completions_equal_transformers(chat_checkpoint, tmp_path):
    import torch

    messages = [{"role": "system", "content": "You tell short stories."},
                {"role": "user", "content": [{"type": "text", "text": "Once upon a time, "},
                                             {"type": "text", "text": "there was a cat."}]}]
    hf_messages = [messages[0], {"role": "user", "content": "Once upon a time, there was a cat."}]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(chat_checkpoint))
    ids = tokenizer.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(chat_checkpoint), dtype=torch.float32).eval()
    out = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    want = tokenizer.decode(out, skip_special_tokens=True)
    assert len(want) > 10  # a test that could fail: the model says something
    # No prefix cache: the n > 1 check below counts what the prompt and its fork compute.
    with BatonUp(tmp_path, "--model", str(chat_checkpoint), "--prefill", "0", "--decode", "0", "--colocated", "1",
                 "--http-port", str(free_port()), "--no-enable-prefix-caching") as cluster, \
            openai.OpenAI(base_url=cluster.http, api_key="unused", max_retries=0, timeout=120) as client:
        got = client.chat.completions.create(model=chat_checkpoint.name, messages=messages, max_tokens=20,
                                             temperature=0)
        assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
        assert got.choices[0].message.content == want
        assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == len(out)
        streamed = list(client.chat.completions.create(model=chat_checkpoint.name, messages=messages,
                                                       max_completion_tokens=20, temperature=0, stream=True))
        assert streamed[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == want
        assert streamed[-1].choices[0].finish_reason in ("length", "stop")
        assert all(c.object == "chat.completion.chunk" for c in streamed)
        # n > 1 on a colocated node: the prompt computed once, the second choice forked from its full blocks.
        [node] = cluster.nodes("colocated")
        before = Scrape(node.metrics_address).value("baton_prefill_batch_tokens_sum")
        both = client.chat.completions.create(model=chat_checkpoint.name, messages=messages, max_tokens=20,
                                              temperature=0, n=2)
        computed = Scrape(node.metrics_address).value("baton_prefill_batch_tokens_sum") - before
        assert [c.message.content for c in sorted(both.choices, key=lambda c: c.index)] == [want, want]
        assert len(ids) > 16 and computed == len(ids) + len(ids) - (len(ids) - 1) // 16 * 16  # not 2 x len(ids)
        scored = client.chat.completions.create(model=chat_checkpoint.name, messages=messages, max_tokens=5,
                                                temperature=0, logprobs=True, top_logprobs=2)
        content = scored.choices[0].logprobs.content
        assert len(content) == 5 and all(len(c.top_logprobs) == 2 for c in content)
        assert all(c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content)  # greedy: the best
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=chat_checkpoint.name, messages=[{"role": "wizard", "content": "x"}])
        assert caught.value.body["param"] == "messages[0].role"
    shutil.rmtree(tmp_path, ignore_errors=True)


_SERIES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"), "info": ("_info",),
           "summary": ("_sum", "_count"), "unknown": ("",)}


def test_service_discovery_and_the_dashboard_name_metrics_that_exist(up):
    """GET /sd lists every live node's metrics target (what examples/monitoring/prometheus.yml reads), and
    every metric the example Grafana dashboard queries is served by the router or a node."""
    import re
    from pathlib import Path

    from prometheus_client.parser import text_string_to_metric_families

    base = up.http.removesuffix("/v1")
    status, targets = _http("GET", f"{base}/sd")
    nodes = up.nodes()
    assert status == 200
    # Every node, and the router itself (its metrics on its HTTP port, registered in etcd like the nodes').
    assert sorted((t["targets"][0], t["labels"]["node"], t["labels"]["role"]) for t in targets) == \
        sorted([(n.metrics_address, n.node_id, n.role) for n in nodes] +
               [(base.removeprefix("http://"), f"router-{up.address}", "router")])
    served = set()
    for url in [f"{base}/metrics"] + [f"http://{n.metrics_address}/metrics" for n in nodes]:
        status, text = _http("GET", url)
        assert status == 200
        for family in text_string_to_metric_families(text):  # a labelled metric may have no sample yet
            served |= {s.name for s in family.samples} | {family.name + suffix for suffix in _SERIES[family.type]}
    dashboard = Path(__file__).parents[1] / "examples" / "monitoring" / "grafana-dashboard.json"
    queries = [t["expr"] for p in json.loads(dashboard.read_text())["panels"] for t in p["targets"]]
    # The planner's own (baton_planner_*) come from `baton planner`: test_planner_run checks those.
    wanted = {m for q in queries for m in re.findall(r"\bbaton_[a-z0-9_]+", q) if not m.startswith("baton_planner_")}
    assert wanted and wanted <= served, sorted(wanted - served)
