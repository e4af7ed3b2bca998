"""The CPU prefill attention (blocked matmuls) against torch's fused attention, on the shapes the engine
gives it: whole prompts and chunks after cached context, across block boundaries, MHA and GQA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from baton.engine.attention import PREFILL_QUERY_BLOCK, _causal_attention_blocked


def reference(q, k, v, scale):
    n, ctx = q.shape[0], k.shape[0]
    visible = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                       attn_mask=visible, scale=scale, enable_gqa=True)
    return o.transpose(0, 1)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (6, 3), (8, 1)])
@pytest.mark.parametrize("n,ctx", [(1, 1), (5, 5), (PREFILL_QUERY_BLOCK, PREFILL_QUERY_BLOCK),
                                   (PREFILL_QUERY_BLOCK + 1, PREFILL_QUERY_BLOCK + 1), (200, 200),
                                   (70, 300), (1, 129), (128, 128 + 17)])
def test_blocked_prefill_attention_matches_fused(heads, kv_heads, n, ctx):
    g = torch.Generator().manual_seed(n * 1000 + ctx)
    q = torch.randn(n, heads, 32, generator=g)
    k, v = (torch.randn(ctx, kv_heads, 32, generator=g) for _ in range(2))
    torch.testing.assert_close(_causal_attention_blocked(q, k, v, 0.17), reference(q, k, v, 0.17),
                               atol=2e-6, rtol=1e-5)
