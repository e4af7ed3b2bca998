"""presence / frequency / repetition penalties, min_p and min_tokens: the batched sampler against a plain
per-row implementation of each definition and against transformers' logits processors, the engine against
transformers' `generate`, and the properties sampling keeps (batch independence, resumed and handed-over
streams going on with the undisturbed run's tokens), the wire included."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from baton.common.messages import sampling_from_proto
from baton.engine import LLM, FinishReason, InvalidRequest, Resumed, SamplingParams
from baton.engine.sampler import _shape, sample, uniform
from baton.router.client import BatonClient
from baton.v1 import baton_pb2 as pb

from cluster_harness import BatonUp
from test_handoff import handoff
from test_stories import PROMPTS

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    MinNewTokensLengthLogitsProcessor, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
    TopKLogitsWarper, TopPLogitsWarper,
)

from test_architectures import PROMPTS as RANDOM_PROMPTS, VARIANTS, load_hf, write_checkpoint  # noqa: E402

VOCAB = 96
EOS = (2,)


# -- the definitions, plainly, one row at a time -----------------------------------------------------------


def reference_shape(row: torch.Tensor, p: SamplingParams, history: list[int], n: int) -> torch.Tensor:
    """min_tokens, then the repetition penalty, then frequency and presence (vLLM's order), on one row."""
    x = row.clone()
    prompt, output = history[: len(history) - n], history[len(history) - n :]
    if n < p.min_tokens:
        for t in {*EOS, *p.stop_token_ids}:
            x[t] = -math.inf
    for t in set(prompt) | set(output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, count in Counter(output).items():
        x[t] -= p.frequency_penalty * count + p.presence_penalty
    return x


def reference_pick(x: torch.Tensor, p: SamplingParams, u: float) -> int:
    """Greedy: the argmax. Sampled, on the temperature-scaled distribution: top-k keeps the k most probable;
    top-p keeps, of those, a token while the mass of the more probable ones is below top_p of their mass;
    min_p keeps a token at least min_p times the top one's probability. Invert the kept CDF at u, going from
    the most probable token down."""
    if p.greedy:
        return int(x.argmax())
    probs = torch.softmax(x.double() / p.temperature, dim=-1)
    top = float(probs.max())
    ranked = sorted(range(len(probs)), key=lambda t: -float(probs[t]))[: p.top_k or len(probs)]
    mass = sum(float(probs[t]) for t in ranked)
    kept, before = [], 0.0
    for t in ranked:
        q = float(probs[t])
        if q > 0 and before < p.top_p * mass and q >= p.min_p * top:
            kept.append((t, q))
        before += q
    target, cum = u * sum(q for _, q in kept), 0.0
    for t, q in kept:
        cum += q
        if cum > target:
            return t
    return kept[-1][0]


def random_history(g: torch.Generator, n_prompt: int, n_output: int, logits: torch.Tensor) -> list[int]:
    """A prompt and `n_output` generated tokens that hold the row's most likely tokens, one of them twice
    (so that each penalty changes the choice), and random others."""
    top = logits.topk(4).indices.tolist()
    prompt = torch.randint(0, VOCAB, (n_prompt,), generator=g).tolist() + top[:2]
    output = (top[1:4] + top[2:3] + torch.randint(0, VOCAB, (n_output,), generator=g).tolist())[:n_output]
    return prompt + output


# Each batch mixes rows with and without each option, greedy and seeded; (params, tokens generated so far).
ROWS = [
    (SamplingParams(temperature=0), 3),
    (SamplingParams(temperature=0, repetition_penalty=1.8), 5),
    (SamplingParams(temperature=0, presence_penalty=1.5, frequency_penalty=0.7), 6),
    (SamplingParams(temperature=0, repetition_penalty=0.6, frequency_penalty=-0.5), 4),
    (SamplingParams(temperature=0, min_tokens=9, stop_token_ids=[7, 11]), 4),
    (SamplingParams(temperature=0, min_tokens=4, stop_token_ids=[7]), 4),  # reached: nothing held any more
    (SamplingParams(temperature=0, min_tokens=5, stop_token_ids=[7], repetition_penalty=1.4), 5),  # reached too
    (SamplingParams(temperature=0.9, seed=1), 4),
    (SamplingParams(temperature=0.9, seed=2, min_p=0.2), 4),
    (SamplingParams(temperature=1.3, seed=3, min_p=0.05, top_k=12, top_p=0.8), 5),
    (SamplingParams(max_tokens=32, temperature=0.7, seed=4, presence_penalty=-2, frequency_penalty=2,
                    repetition_penalty=1.3, min_p=0.1, min_tokens=20, stop_token_ids=[5]), 7),
    (SamplingParams(temperature=1.0, seed=5, repetition_penalty=2.0, top_p=0.9), 4),
    (SamplingParams(temperature=0.8, seed=6, min_tokens=8), 4),
]


def random_batch(trial: int):
    torch.manual_seed(trial)
    logits = torch.randn(len(ROWS), VOCAB) * 3
    # Make the held ids likely winners, so that min_tokens shows.
    logits[:, 7] += 6
    logits[:, EOS[0]] += 5
    g = torch.Generator().manual_seed(1000 + trial)
    histories = [random_history(g, 3 + trial % 7, n, logits[i]) for i, (_, n) in enumerate(ROWS)]
    return logits, histories


@pytest.mark.parametrize("trial", range(12))
def test_batched_sampler_equals_the_plain_definitions(trial):
    logits, histories = random_batch(trial)
    params = [p for p, _ in ROWS]
    indices = [n for _, n in ROWS]
    seeds = [None if p.greedy else p.seed + 100 * trial for p in params]
    tokens, logprobs = sample(logits.clone(), params, seeds, indices, histories, EOS)
    raw = torch.log_softmax(logits, dim=-1)
    changed = 0
    for i, (p, n) in enumerate(ROWS):
        x = reference_shape(logits[i], p, histories[i], n)
        u = uniform(seeds[i], n) if seeds[i] is not None else 0.0
        assert tokens[i] == reference_pick(x, p, u), (trial, i)
        assert logprobs[i] == pytest.approx(float(raw[i, tokens[i]]), abs=1e-5)  # the model's, unpenalised
        changed += tokens[i] != reference_pick(logits[i], SamplingParams(temperature=p.temperature), u)
        if n < p.min_tokens:
            assert tokens[i] not in {*EOS, *p.stop_token_ids}
    assert changed >= 2  # the options do change choices on these logits


def test_shaped_logits_equal_the_plain_definitions():
    """Every logit of every row, not only the chosen token: rows without an option are left bit for bit."""
    for trial in range(6):
        logits, histories = random_batch(trial)
        shaped = [i for i, (p, n) in enumerate(ROWS) if p.penalised or n < p.min_tokens]
        work = logits.clone()
        _shape(work, shaped, [ROWS[i][0] for i in shaped], [ROWS[i][1] for i in shaped],
               [histories[i] for i in shaped if ROWS[i][0].penalised], EOS)
        for i, (p, n) in enumerate(ROWS):
            want = reference_shape(logits[i], p, histories[i], n)
            assert torch.equal(torch.isinf(work[i]), torch.isinf(want))
            torch.testing.assert_close(work[i], want, rtol=0, atol=1e-5)
            if i not in shaped:
                assert torch.equal(work[i], logits[i])


def test_rows_without_options_need_no_histories():
    """Without penalties (min_tokens reached, min_p off) the sampler reads no history: none is given here."""
    logits = torch.randn(3, VOCAB)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.9, seed=1, top_k=5),
              SamplingParams(temperature=0, min_tokens=2)]
    tokens, _ = sample(logits, params, [None, 1, None], [0, 0, 2])
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == int(logits[2].argmax())
    assert tokens[1] == reference_pick(logits[1], params[1], uniform(1, 0))


# -- against transformers' logits processors, where the definitions coincide ---------------------------------


def test_repetition_penalty_equals_transformers():
    for trial in range(8):
        torch.manual_seed(trial)
        logits = torch.randn(1, VOCAB) * 4
        history = torch.randint(0, VOCAB, (30,)).tolist()
        for penalty in (1.3, 0.7, 2.0):
            p = SamplingParams(temperature=0, repetition_penalty=penalty)
            ours = logits.clone()
            _shape(ours, [0], [p], [10], [history], EOS)
            theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([history]), logits.clone())
            assert torch.equal(ours, theirs)
            assert sample(logits, [p], [None], [10], [history])[0] == [int(theirs.argmax())]


def test_min_new_tokens_equals_transformers():
    logits = torch.randn(1, VOCAB)
    prompt = [5, 6, 7]
    eos = [2, 40]
    for generated in range(6):
        history = prompt + list(range(10, 10 + generated))
        p = SamplingParams(temperature=0, min_tokens=3, ignore_eos=True)  # held whatever ignore_eos says
        ours = logits.clone()
        _shape(ours, [0], [p], [generated], [], eos)
        theirs = MinNewTokensLengthLogitsProcessor(len(prompt), 3, eos)(torch.tensor([history]), logits.clone())
        assert torch.equal(ours, theirs), generated


def _draws_equal(logits: torch.Tensor, warped: torch.Tensor, p: SamplingParams, seed: int, label: tuple) -> None:
    """At each of 20 draws, the row samples what inverting transformers' warped distribution (most probable
    token first) at the row's uniform number gives, and never a token transformers masked."""
    probs = torch.softmax(warped[0].double(), dim=-1)
    order = probs.argsort(descending=True, stable=True).tolist()
    cum = torch.cumsum(probs[order], 0)
    for index in range(20):
        u = uniform(seed, index)
        want = order[int(torch.searchsorted(cum, u * float(cum[-1]), right=True).clamp(max=len(order) - 1))]
        assert sample(logits, [p], [seed], [index])[0] == [want], (*label, index)
        assert math.isfinite(float(warped[0, want]))


def test_min_p_equals_transformers():
    """A seeded min_p row samples from transformers' temperature + min-p distribution: inverting its CDF (most
    probable token first) at the row's uniform number gives the same token, over many draws."""
    for trial in range(10):
        torch.manual_seed(trial)
        logits = torch.randn(1, VOCAB) * 3
        for min_p, temperature in ((0.1, 1.0), (0.3, 0.7), (0.02, 1.5), (1.0, 1.0)):
            p = SamplingParams(temperature=temperature, min_p=min_p, seed=trial)
            ids = torch.tensor([[1]])
            warped = MinPLogitsWarper(min_p)(ids, TemperatureLogitsWarper(temperature)(ids, logits.clone()))
            _draws_equal(logits, warped, p, trial, (trial, min_p))


def test_top_k_top_p_and_min_p_together_equal_transformers():
    """Rows with top-k, top-p and min-p at once sample from transformers' temperature, top-k, top-p, min-p
    distribution (top-p judged on what top-k kept, renormalised): the same token at each draw."""
    for trial in range(10):
        torch.manual_seed(100 + trial)
        logits = torch.randn(1, VOCAB) * 2
        for top_k, top_p, min_p, temperature in ((12, 0.8, 0.05, 1.3), (5, 0.6, 0.0, 1.0), (40, 0.95, 0.1, 0.8),
                                                 (0, 0.7, 0.2, 1.0), (3, 1.0, 0.0, 2.0)):
            p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=trial)
            ids, warped = torch.tensor([[1]]), TemperatureLogitsWarper(temperature)(torch.tensor([[1]]), logits.clone())
            for warper in ([TopKLogitsWarper(top_k)] if top_k else []) + [TopPLogitsWarper(top_p)] + \
                    ([MinPLogitsWarper(min_p)] if min_p else []):
                warped = warper(ids, warped)
            _draws_equal(logits, warped, p, trial, (trial, top_k, top_p, min_p))


# -- the engine -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_pair(tmp_path_factory):
    folder = write_checkpoint(tmp_path_factory.mktemp("llama-gqa2"), VARIANTS["llama-gqa2"])
    return load_hf(folder), LLM(str(folder))


@torch.inference_mode()
def hf_generate(model, prompt: list[int], new_tokens: int, **kw) -> list[int]:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=new_tokens, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


def test_repetition_penalty_greedy_equals_transformers_generate(random_pair):
    hf, llm = random_pair
    plain = llm.generate(RANDOM_PROMPTS, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    for penalty in (1.3, 1.8, 0.8):
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, repetition_penalty=penalty)
        outs = llm.generate(RANDOM_PROMPTS, params)
        for prompt, out in zip(RANDOM_PROMPTS, outs):
            assert out.token_ids == hf_generate(hf, prompt, 24, repetition_penalty=penalty), penalty
        assert any(out.token_ids != before.token_ids for out, before in zip(outs, plain))  # it did change runs


def test_min_tokens_equals_transformers_min_new_tokens(random_pair):
    """A stop id the greedy run emits early is held back until min_tokens, then ends the run, as transformers'
    `min_new_tokens` does with that id (and the checkpoint's EOS) as its EOS."""
    hf, llm = random_pair
    eos = sorted(llm.engine.eos_token_ids)
    for prompt in RANDOM_PROMPTS:
        free = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].token_ids
        stop = free[2]
        params = SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop], min_tokens=6)
        out = llm.generate([prompt], params)[0]
        assert out.token_ids == hf_generate(hf, prompt, 24, min_new_tokens=6, eos_token_id=[stop, *eos])
        assert len(out.token_ids) >= 6 and stop not in out.token_ids[:6]


PENALISED = [
    SamplingParams(max_tokens=40, temperature=0, presence_penalty=0.6, frequency_penalty=0.4),
    SamplingParams(max_tokens=40, temperature=0.9, seed=17, presence_penalty=1.0, frequency_penalty=0.5,
                   repetition_penalty=1.2, min_p=0.05, min_tokens=30),
    SamplingParams(max_tokens=40, temperature=0.8, seed=3, frequency_penalty=1.5, top_k=20),
]


def test_penalised_requests_are_batch_independent(stories_llm):
    others = [SamplingParams(max_tokens=30, temperature=0), SamplingParams(max_tokens=25, temperature=1.0, seed=9),
              SamplingParams(max_tokens=35, temperature=0.7, seed=1, repetition_penalty=1.5)]
    for params in PENALISED:
        alone = stories_llm.generate([PROMPTS[1]], params)[0]
        batch = stories_llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3]],
                                     [others[0], params, others[1], others[2]])
        assert batch[1].token_ids == alone.token_ids
        assert batch[1].logprobs == pytest.approx(alone.logprobs, abs=1e-5)
    plain = stories_llm.generate([PROMPTS[1]], SamplingParams(max_tokens=40, temperature=0))[0]
    assert stories_llm.generate([PROMPTS[1]], PENALISED[0])[0].token_ids != plain.token_ids


def test_min_tokens_holds_back_eos_and_stop_strings(stories_llm):
    frees = stories_llm.generate(PROMPTS, SamplingParams(max_tokens=200, temperature=0))
    prompt, free = next((p, f) for p, f in zip(PROMPTS, frees) if f.finish_reason is FinishReason.EOS)
    n = len(free.token_ids)
    held = stories_llm.generate([prompt], SamplingParams(max_tokens=200, temperature=0, min_tokens=n + 5))[0]
    assert held.token_ids[: n - 1] == free.token_ids[: n - 1] and len(held.token_ids) >= n + 5
    assert not set(held.token_ids[: n + 5]) & stories_llm.engine.eos_token_ids
    # A stop string the free run meets early is not looked for before min_tokens tokens.
    word = " " + free.text.split()[4]
    cut = stories_llm.generate([prompt], SamplingParams(max_tokens=60, temperature=0, stop=[word]))[0]
    assert cut.finish_reason is FinishReason.STOP
    late = stories_llm.generate([prompt], SamplingParams(max_tokens=60, temperature=0, stop=[word],
                                                         min_tokens=len(cut.token_ids) + 1))[0]
    assert len(late.token_ids) > len(cut.token_ids) and late.text.startswith(cut.text + word)


def test_a_resumed_penalised_stream_goes_on_with_the_undisturbed_tokens(stories_llm):
    """Resumed after k delivered tokens (their text partly held back by a stop string), a penalised stream
    goes on with the undisturbed run's tokens and text: the delivered tokens count as generated ones."""
    engine = stories_llm.engine
    prompt = engine.tokenizer.encode(PROMPTS[1])
    cases = [*PENALISED, SamplingParams(max_tokens=30, temperature=0, frequency_penalty=1.0, stop=["zzz"])]
    for params in cases:
        engine.add_request("first", prompt, params)
        tokens, text, chars = [], "", {}  # chars[k]: the text a client had once it had k tokens
        while engine.has_unfinished():
            for out in engine.step():
                tokens += out.token_ids
                text += out.text
                chars.update({k: len(text) for k in range(len(tokens) - len(out.token_ids) + 1, len(tokens) + 1)})
        assert tokens == stories_llm.generate([prompt], params)[0].token_ids
        for k in (1, 4, 13):
            engine.add_request("again", prompt, params, resumed=Resumed(tuple(tokens[:k]), chars[k]))
            rest, rest_text = [], ""
            while engine.has_unfinished():
                for out in engine.step():
                    assert out.first_index >= k
                    rest += out.token_ids
                    rest_text += out.text
            assert tokens[:k] + rest == tokens, (params, k)
            assert text[: chars[k]] + rest_text == text, (params, k)


def test_prefill_here_decode_there_with_penalties(stories_path, stories_llm):
    """The prefill node samples the first token (min_tokens holding it), the decode node goes on from the
    adopted sequence's history: the one-engine run's tokens."""
    prefill, decode = LLM(str(stories_path)), LLM(str(stories_path))
    for i, params in enumerate(PENALISED):
        want = stories_llm.generate([PROMPTS[3]], params)[0]
        tokens, text, reason = handoff(prefill, decode, f"h{i}", PROMPTS[3], params)
        assert (tokens, text, reason) == (want.token_ids, want.text, want.finish_reason)


# -- validation and the wire ------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("presence_penalty", math.nan),
    ("frequency_penalty", -3.0), ("frequency_penalty", math.inf), ("frequency_penalty", "1"),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("min_p", -0.1), ("min_p", 1.5), ("min_p", math.nan),
    ("min_tokens", -1), ("min_tokens", 17), ("min_tokens", 2.0),
])
def test_bad_values_name_their_field(field, value):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(max_tokens=16, **{field: value})
    assert e.value.field == field


def test_the_wire_carries_every_new_field():
    msg = pb.SamplingParams(max_tokens=20, presence_penalty=-1.5, frequency_penalty=0.25, repetition_penalty=1.25,
                            min_p=0.125, min_tokens=7)
    p = sampling_from_proto(pb.SamplingParams.FromString(msg.SerializeToString()))
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p, p.min_tokens) == (
        -1.5, 0.25, 1.25, 0.125, 7)
    unset = sampling_from_proto(pb.SamplingParams())
    assert (unset.presence_penalty, unset.frequency_penalty, unset.repetition_penalty, unset.min_p,
            unset.min_tokens) == (0.0, 0.0, 1.0, 0.0, 0)
    assert not unset.penalised
    for field, value in (("repetition_penalty", 0.0), ("min_tokens", -2), ("min_p", 2.0), ("min_tokens", 17)):
        with pytest.raises(InvalidRequest) as e:
            sampling_from_proto(pb.SamplingParams(**{field: value}))
        assert e.value.field == field


def test_penalised_requests_through_the_cluster_equal_the_offline_engine(stories_path, stories_llm, tmp_path):
    options = [dict(max_tokens=40, temperature=0, repetition_penalty=1.3, presence_penalty=0.5, min_tokens=10),
               dict(max_tokens=40, temperature=0.9, seed=17, frequency_penalty=0.7, min_p=0.1, min_tokens=30)]
    with BatonUp(tmp_path, "--model", str(stories_path)) as up, BatonClient(up.address, timeout=60) as client:
        for opts in options:
            want = stories_llm.generate([PROMPTS[1]], SamplingParams(**opts))[0]
            got = client.complete(PROMPTS[1], **opts)
            assert got.token_ids == want.token_ids and got.text == want.text
    assert not up.hung and up.leftovers == []
