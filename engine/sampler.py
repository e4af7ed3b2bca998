"""Where a token is chosen: greedy, or temperature / min-p / top-k / top-p sampling by inverse CDF, after
min_tokens and the repetition, frequency and presence penalties have shaped the logits.

A sampled token's randomness is a function of (the request's seed, the token's index) only: one uniform
number from a counter-based hash (`uniform`), no generator object that carries state from step to step.
Every other operation is row-wise, and the penalties read only the request's own prompt and generated tokens
(those of a resumed stream include the ones it delivered before). So a seeded request gets the same tokens
whatever else shares its batch, on any device, and a sequence continued elsewhere (a decode node adopting a
prefill node's request, a stream resumed after a node failed) goes on with exactly the tokens it would have
produced: it needs only the seed, the next index and the tokens so far.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from .request import SamplingParams

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # Steele, Lea and Flood's SplitMix64 finaliser: a bijection on 64-bit words with strong avalanche.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(seed: int, index: int) -> float:
    """The uniform number in [0, 1) that sampling uses for token `index` of a request seeded `seed`."""
    return (_splitmix64(_splitmix64(seed & _MASK64) ^ (index & _MASK64)) >> 11) * 2.0**-53


def sample(
    logits: torch.Tensor,  # [B, V] float32
    params: list[SamplingParams],
    seeds: list[int | None],
    indices: list[int],
    histories: Sequence[Sequence[int]] = (),
    eos_token_ids: Collection[int] = (),
) -> tuple[list[int], list[float]]:
    """Returns the chosen token of each row and its log-probability under the model's distribution.
    `seeds[i]` (None for a greedy row) and `indices[i]` (the token's index among the request's generated
    tokens) give row i's randomness. `histories[i]`: row i's prompt then its generated tokens (the last
    `indices[i]` of them), read only for a row with a penalty; `eos_token_ids`: what `min_tokens` holds back
    besides the request's stop ids."""
    # One pass for the greedy choice and its logit, one for the normaliser: argmax + log_softmax read the
    # logits three times and write a copy (2.7 ms against 1.9 ms at batch 64 x 32k vocabulary on one core).
    best, tokens = logits.max(dim=-1)
    shaped = [i for i, p in enumerate(params) if p.penalised or indices[i] < p.min_tokens]
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if shaped or rows:
        # The rows to work on, copied once: every sampled row, and the greedy rows whose logits change.
        work_rows = sorted({*shaped, *rows})
        at = {row: k for k, row in enumerate(work_rows)}
        work = logits[torch.tensor(work_rows, device=logits.device)]
        if shaped:
            _shape(work, [at[i] for i in shaped], [params[i] for i in shaped], [indices[i] for i in shaped],
                   [histories[i] for i in shaped if params[i].penalised], eos_token_ids)
            greedy = [i for i in shaped if params[i].greedy]
            if greedy:
                tokens[torch.tensor(greedy, device=logits.device)] = work[[at[i] for i in greedy]].argmax(dim=-1)
        if rows:
            draws = [uniform(seeds[i], indices[i]) for i in rows]
            held = any(indices[i] < params[i].min_tokens for i in rows)
            sampled = work if len(rows) == len(work_rows) else work[[at[i] for i in rows]]  # no second copy
            chosen = _sample_rows(sampled, [params[i] for i in rows], draws, held)
            tokens[torch.tensor(rows, device=logits.device)] = chosen
        best = logits.gather(1, tokens[:, None]).squeeze(1)
    logprobs = best - torch.logsumexp(logits, dim=-1)
    return tokens.tolist(), logprobs.tolist()


def _shape(
    logits: torch.Tensor,  # [R, V], changed in place; row at[k] is the one of params[k]
    at: list[int],
    params: list[SamplingParams],
    indices: list[int],
    histories: Sequence[Sequence[int]],  # of the penalised ones among them, in order
    eos_token_ids: Collection[int],
) -> None:
    """min_tokens, then the penalties, on raw logits (vLLM's order); every other row is left as it was."""
    vocab, device = logits.shape[1], logits.device
    held_rows, held_ids = [], []
    for row, p, n in zip(at, params, indices):
        if n < p.min_tokens:
            ids = {t for t in (*eos_token_ids, *p.stop_token_ids) if t < vocab}
            held_rows += [row] * len(ids)
            held_ids += ids
    if held_ids:
        logits[torch.tensor(held_rows, device=device), torch.tensor(held_ids, device=device)] = float("-inf")
    penalised = [k for k, p in enumerate(params) if p.penalised]
    if not penalised:
        return
    # Counts of each row's generated tokens (rows 0..P-1) and, where the repetition penalty needs them, of
    # its prompt tokens (rows P..2P-1): one scatter_add over the flattened [2P, V] counts.
    n_pen = len(penalised)
    flat = []
    for j, (k, history) in enumerate(zip(penalised, histories, strict=True)):
        n = indices[k]
        split = len(history) - n
        flat.append(torch.as_tensor(history[split:], dtype=torch.long) + j * vocab)
        if params[k].repetition_penalty != 1:
            flat.append(torch.as_tensor(history[:split], dtype=torch.long) + (n_pen + j) * vocab)
    index = torch.cat(flat).to(device)
    counts = torch.zeros(2 * n_pen * vocab, dtype=logits.dtype, device=device)
    counts.scatter_add_(0, index, torch.ones(index.shape, dtype=logits.dtype, device=device))
    output_counts, prompt_counts = counts.view(2, n_pen, vocab)

    def column(name: str) -> torch.Tensor:  # [P, 1]
        values = [getattr(params[k], name) for k in penalised]
        return torch.tensor(values, dtype=logits.dtype, device=device)[:, None]

    rows = torch.tensor([at[k] for k in penalised], device=device)
    x = logits[rows]
    # A penalty of 1 divides or multiplies by 1, and a penalty of 0 subtracts 0: exact no-ops for such rows.
    penalty = column("repetition_penalty")
    seen = (output_counts > 0) | (prompt_counts > 0)
    x = torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)
    x -= column("frequency_penalty") * output_counts + column("presence_penalty") * (output_counts > 0)
    logits[rows] = x


def _sample_rows(
    logits: torch.Tensor, params: list[SamplingParams], draws: list[float], held: bool = False
) -> torch.Tensor:
    """`held`: some row has tokens set to -inf (min_tokens), which must stay out of reach of the clamp below."""
    b, vocab = logits.shape
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=logits.device)
    top_k = torch.tensor([p.top_k or vocab for p in params], device=logits.device)
    top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype, device=logits.device)

    scaled = logits / temperature[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    probs = sorted_logits.softmax(dim=-1)
    # In transformers' order: top-k, then top-p on what top-k kept (renormalised): a token stays while the
    # mass of the more probable tokens it kept is below top_p of their whole mass (so the top token always
    # stays), then min_p, relative to the top token's probability (which renormalising does not change).
    in_top_k = rank < top_k[:, None]
    top_k_probs = torch.where(in_top_k, probs, torch.zeros_like(probs))
    mass_before = top_k_probs.cumsum(dim=-1) - top_k_probs
    keep = in_top_k & (mass_before < top_p[:, None] * top_k_probs.sum(dim=-1, keepdim=True))
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=logits.dtype, device=logits.device)
        keep &= probs >= min_p[:, None] * probs[:, :1]  # probs[:, 0] is the top token's: it always stays
    if held:
        keep &= sorted_logits > float("-inf")
    kept = torch.where(keep, sorted_logits, torch.full_like(sorted_logits, float("-inf"))).softmax(dim=-1)
    cdf = kept.cumsum(dim=-1)
    u = torch.tensor(draws, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1]
    pick = torch.searchsorted(cdf, u[:, None], right=True).clamp_(max=vocab - 1)
    # Never land on a masked tail token through rounding at the end of the CDF.
    pick = torch.minimum(pick, keep.sum(dim=-1, keepdim=True) - 1)
    return order.gather(1, pick).squeeze(1)


def top_alternatives(logits: torch.Tensor, rows: list[int], ks: list[int]) -> list[tuple[list[int], list[float]]]:
    """The ks[j] most likely tokens of row rows[j] and their log-probabilities under the model's distribution
    (the raw logits, as the chosen token's logprob), most likely first."""
    sub = logits[torch.tensor(rows, device=logits.device)]
    values, ids = (sub - torch.logsumexp(sub, dim=-1, keepdim=True)).topk(max(ks), dim=-1)
    values, ids = values.tolist(), ids.tolist()
    return [(ids[j][:k], values[j][:k]) for j, k in enumerate(ks)]
