"""Where a token is chosen: greedy, or temperature / top-k / top-p sampling with a per-request RNG.

Each sampled row draws its one uniform number from its own `torch.Generator`, and every other operation is
row-wise, so a seeded request gets the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import torch

from .request import SamplingParams


def sample(
    logits: torch.Tensor,  # [B, V] float32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> tuple[list[int], list[float]]:
    """Returns the chosen token of each row and its log-probability under the model's distribution."""
    # One pass for the greedy choice and its logit, one for the normaliser: argmax + log_softmax read the
    # logits three times and write a copy (2.7 ms against 1.9 ms at batch 64 x 32k vocabulary on one core).
    best, tokens = logits.max(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        idx = torch.tensor(rows)
        chosen = _sample_rows(logits[idx], [params[i] for i in rows], [generators[i] for i in rows])
        tokens[idx] = chosen
        best = logits.gather(1, tokens[:, None]).squeeze(1)
    logprobs = best - torch.logsumexp(logits, dim=-1)
    return tokens.tolist(), logprobs.tolist()


def _sample_rows(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    b, vocab = logits.shape
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype)
    top_k = torch.tensor([p.top_k or vocab for p in params])
    top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype)

    scaled = logits / temperature[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(vocab)[None, :]
    probs = sorted_logits.softmax(dim=-1)
    # Keep a token while the probability mass *before* it is below top_p (so the top token always stays).
    mass_before = probs.cumsum(dim=-1) - probs
    keep = (rank < top_k[:, None]) & (mass_before < top_p[:, None])
    kept = torch.where(keep, sorted_logits, torch.full_like(sorted_logits, float("-inf"))).softmax(dim=-1)
    cdf = kept.cumsum(dim=-1)
    u = torch.cat([torch.rand(1, generator=g, dtype=cdf.dtype) for g in generators]) * cdf[:, -1]
    pick = torch.searchsorted(cdf, u[:, None], right=True).clamp_(max=vocab - 1)
    # Never land on a masked tail token through rounding at the end of the CDF.
    pick = torch.minimum(pick, keep.sum(dim=-1, keepdim=True) - 1)
    return order.gather(1, pick).squeeze(1)
