"""Triton kernels against their torch references, on fresh random inputs of many shapes.

Without a GPU they run under Triton's interpreter (TRITON_INTERPRET=1, set here before any kernel is
defined): exact enough to test against the references, slow (~10 ms a launch), and no proof that a kernel
compiles for a GPU. Outputs start poisoned with NaN, so an element a kernel forgets to write fails.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
pytest.importorskip("numpy")  # the interpreter needs it (triton does not declare it)

from baton.engine.kernels.add_rmsnorm import add_rmsnorm, add_rmsnorm_ref  # noqa: E402
from baton.engine.kernels.silu_mul import silu_mul, silu_mul_ref  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
# float16 differs from the reference by the order of a few roundings: a few ulps of values ~1-4.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=4e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=3e-2)}


def poisoned(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden", [(1, 64), (5, 80), (33, 128), (7, 100), (3, 4096), (0, 64)])
def test_add_rmsnorm_matches_its_reference(rows, hidden, dtype):
    # x is a strided view (rows of a wider tensor), as a slice of a fused projection would be.
    x = randn(rows, hidden + 24, dtype=dtype, seed=rows * 7 + hidden)[:, :hidden]
    residual = randn(rows, hidden, dtype=dtype, seed=hidden)
    weight = randn(hidden, dtype=dtype, seed=3) * 0.1 + 1
    out, res_out = poisoned(rows, hidden, dtype=dtype), poisoned(rows, hidden, dtype=dtype)
    got, got_res = add_rmsnorm(x, residual, weight, 1e-5, out=out, residual_out=res_out)
    want, want_res = add_rmsnorm_ref(x, residual, weight, 1e-5)
    assert got is out and got_res is res_out
    torch.testing.assert_close(got_res, want_res, rtol=0, atol=0)  # one addition: exact
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rmsnorm_without_a_residual(dtype):
    x = randn(9, 200, dtype=dtype, seed=4)[:, :72]  # strided rows
    weight = randn(72, dtype=dtype, seed=5) * 0.1 + 1
    got, res = add_rmsnorm(x, None, weight, 1e-6, out=poisoned(9, 72, dtype=dtype))
    want, _ = add_rmsnorm_ref(x, None, weight, 1e-6)
    assert res is x
    torch.testing.assert_close(got, want, **TOL[dtype])
    with pytest.raises(ValueError, match="residual_out"):
        add_rmsnorm(x, None, weight, 1e-6, residual_out=poisoned(9, 72, dtype=dtype))


def test_add_rmsnorm_in_place_over_its_inputs():
    x, residual = randn(4, 96, dtype=torch.float32, seed=1), randn(4, 96, dtype=torch.float32, seed=2)
    weight = torch.ones(96, device=DEVICE)
    want, want_res = add_rmsnorm_ref(x, residual, weight, 1e-6)
    add_rmsnorm(x, residual, weight, 1e-6, out=x, residual_out=residual)
    torch.testing.assert_close(x, want, **TOL[torch.float32])
    torch.testing.assert_close(residual, want_res, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,inter", [(1, 64), (6, 172), (17, 1536), (2, 2816), (0, 8)])
def test_silu_mul_matches_its_reference(rows, inter, dtype):
    gate_up = randn(rows, 2 * inter, dtype=dtype, seed=rows + inter) * 3
    out = poisoned(rows, inter, dtype=dtype)
    got = silu_mul(gate_up, out=out)
    assert got is out
    torch.testing.assert_close(got, silu_mul_ref(gate_up), **TOL[dtype])


@pytest.mark.parametrize("call,field", [
    (lambda: add_rmsnorm(torch.zeros(2, 8), torch.zeros(2, 8), torch.zeros(8, dtype=torch.float16), 1e-6), "weight"),
    (lambda: add_rmsnorm(torch.zeros(2, 8), torch.zeros(3, 8), torch.zeros(8), 1e-6), "residual"),
    (lambda: add_rmsnorm(torch.zeros(8, 2).t(), torch.zeros(2, 8), torch.zeros(8), 1e-6), "x"),
    (lambda: add_rmsnorm(torch.zeros(2, 8, dtype=torch.int32), torch.zeros(2, 8), torch.zeros(8), 1e-6), "x"),
    (lambda: silu_mul(torch.zeros(2, 7)), "gate_up"),
    (lambda: silu_mul(torch.zeros(2, 8), out=torch.zeros(2, 8)), "out"),
])
def test_a_wrong_argument_is_named(call, field):
    with pytest.raises(ValueError) as e:
        call()
    assert str(e.value).startswith(f"{field}:"), str(e.value)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,kvh,d,block_size", [(1, 1, 64, 16), (37, 2, 80, 8), (9, 8, 128, 32), (0, 2, 64, 16)])
def test_store_kv_matches_its_reference(tokens, kvh, d, block_size, dtype):
    from baton.engine.kernels.kv_store import store_kv, store_kv_ref

    num_blocks = 12
    g = torch.Generator().manual_seed(tokens + d)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]  # distinct slots, any blocks
    blocks, offsets = (slots // block_size).to(DEVICE), (slots % block_size).to(DEVICE)
    qkv = randn(tokens, (2 + 2 * kvh) * d, dtype=dtype, seed=tokens)  # k and v as strided slices of it
    k = qkv[:, 2 * d:(2 + kvh) * d].view(tokens, kvh, d)
    v = qkv[:, (2 + kvh) * d:].view(tokens, kvh, d)
    pool = poisoned(num_blocks, 2, block_size, kvh, d, dtype=dtype)
    want = pool.clone()
    store_kv(pool, k, v, blocks, offsets)
    store_kv_ref(want, k, v, blocks, offsets)
    torch.testing.assert_close(pool, want, rtol=0, atol=0, equal_nan=True)  # untouched slots stay NaN


def test_store_kv_skips_padding_rows():
    """Rows with a negative block (a CUDA graph's padding above the real batch) store nothing."""
    from baton.engine.kernels.kv_store import store_kv

    pool = poisoned(4, 2, 8, 2, 64, dtype=torch.float32)
    k, v = randn(3, 2, 64, dtype=torch.float32, seed=1), randn(3, 2, 64, dtype=torch.float32, seed=2)
    blocks = torch.tensor([2, -1, -1], device=DEVICE)
    store_kv(pool, k, v, blocks, torch.tensor([5, 0, 0], device=DEVICE))
    torch.testing.assert_close(pool[2, 0, 5], k[0], rtol=0, atol=0)
    torch.testing.assert_close(pool[2, 1, 5], v[0], rtol=0, atol=0)
    assert int(torch.isnan(pool).logical_not().sum()) == 2 * 2 * 64  # nothing else was written


def test_store_kv_names_a_wrong_argument():
    from baton.engine.kernels.kv_store import store_kv

    pool = torch.zeros(4, 2, 16, 2, 64)
    k = torch.zeros(3, 2, 64)
    idx = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="^v:"):
        store_kv(pool, k, torch.zeros(3, 2, 32), idx, idx)
    with pytest.raises(ValueError, match="^slot_offsets:"):
        store_kv(pool, k, k, idx, torch.zeros(3))
    with pytest.raises(ValueError, match="^pool:"):
        store_kv(pool.transpose(0, 1), k, k, idx, idx)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,heads,d,scaling", [
    (1, 1, 64, "default"), (13, 3, 80, "linear"), (7, 8, 128, "llama3"), (0, 4, 64, "default"), (5, 12, 96, "llama3"),
])
def test_rotary_matches_its_reference(tokens, heads, d, scaling, dtype):
    from baton.engine.config import RopeScaling
    from baton.engine.kernels.rotary import rotary, rotary_ref
    from baton.engine.rope import RotaryEmbedding, apply_rotary

    rope_scaling = {"default": RopeScaling(), "linear": RopeScaling("linear", factor=4.0),
                    "llama3": RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=64)}[scaling]
    table = RotaryEmbedding(d, 1024, 500000.0, rope_scaling).to(DEVICE)
    positions = torch.randint(0, 1024, (tokens,), generator=torch.Generator().manual_seed(d)).to(DEVICE)
    fused = randn(tokens, (heads + 2) * d, dtype=dtype, seed=tokens)  # x: a strided slice, as q is of QKV
    x = fused[:, : heads * d].view(tokens, heads, d)
    want = rotary_ref(x, table.cos, table.sin, positions)
    # The reference is the engine's own rotary, on the same tables.
    cos, sin = table(positions, dtype)
    torch.testing.assert_close(want, apply_rotary(x, x, cos, sin)[0], rtol=0, atol=0)
    got = rotary(x, table.cos, table.sin, positions, out=poisoned(tokens, heads, d, dtype=dtype))
    torch.testing.assert_close(got, want, **TOL[dtype])
    rotary(x, table.cos, table.sin, positions, out=x)  # in place
    torch.testing.assert_close(x, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lens,heads,kv_heads,d,block_size,per_split", [
    ([1], 4, 4, 64, 16, 16),  # GQA 1, a one-token context
    ([45, 3], 4, 1, 64, 16, 16),  # GQA 4, one split covers every context: written directly, no combine
    ([37, 5, 16], 6, 2, 80, 8, 2),  # GQA 3, head_dim 80, partly filled last blocks, several splits
    ([100, 64], 8, 2, 128, 32, 1),  # GQA 4, one block per split
    ([300, 17, 1, 129], 8, 1, 64, 16, 4),  # GQA 8, contexts over many blocks, empty splits for the short ones
])
def test_decode_attention_matches_its_reference(lens, heads, kv_heads, d, block_size, per_split, dtype):
    from baton.engine.kernels.decode_attention import decode_attention, decode_attention_ref

    b = len(lens)
    max_blocks = -(-max(lens) // block_size)
    num_blocks = b * max_blocks + 3
    g = torch.Generator().manual_seed(sum(lens) + d)
    ids = torch.randperm(num_blocks, generator=g)[: b * max_blocks].view(b, max_blocks)  # scattered blocks
    tables = ids.to(DEVICE)
    seq_lens = torch.tensor(lens, device=DEVICE)
    pool = randn(num_blocks, 2, block_size, kv_heads, d, dtype=dtype, seed=d)
    q = randn(b, heads, d, dtype=dtype, seed=b)
    want = decode_attention_ref(q, pool, tables, seq_lens, d**-0.5)
    got = decode_attention(q, pool, tables, seq_lens, d**-0.5, blocks_per_split=per_split,
                           out=poisoned(b, heads, d, dtype=dtype))
    torch.testing.assert_close(got, want, **TOL[dtype])


def test_decode_attention_names_a_wrong_argument():
    from baton.engine.kernels.decode_attention import decode_attention

    pool, tables, lens = torch.zeros(4, 2, 16, 2, 64), torch.zeros(1, 2, dtype=torch.int64), torch.ones(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="^q: 3 query heads"):
        decode_attention(torch.zeros(1, 3, 64), pool, tables, lens, 0.1)
    with pytest.raises(ValueError, match="^pool: block_size"):
        decode_attention(torch.zeros(1, 4, 64), torch.zeros(4, 2, 12, 2, 64), tables, lens, 0.1)
    with pytest.raises(ValueError, match="^seq_lens:"):
        decode_attention(torch.zeros(1, 4, 64), pool, tables, torch.ones(2, dtype=torch.int64), 0.1)
    with pytest.raises(ValueError, match="^block_tables:"):
        decode_attention(torch.zeros(1, 4, 64), pool, tables.float(), lens, 0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spans,heads,kv_heads,d,block_size", [
    ([(1, 1)], 4, 4, 64, 16),  # a one-token prompt
    ([(37, 37), (5, 21), (16, 16)], 6, 2, 80, 8),  # whole prompts and a chunk after 16 cached tokens, GQA 3
    ([(0, 9), (50, 130)], 8, 2, 128, 32),  # an empty span, and a chunk after 80 cached tokens, GQA 4
    ([(19, 19), (3, 40), (33, 33)], 8, 1, 64, 16),  # GQA 8
])
def test_prefill_attention_matches_its_reference(spans, heads, kv_heads, d, block_size, dtype):
    """spans: (query tokens, context tokens) each, the queries being the context's last tokens."""
    from baton.engine.kernels.prefill_attention import prefill_attention, prefill_attention_ref

    s = len(spans)
    max_blocks = max(-(-ctx // block_size) for _, ctx in spans)
    num_blocks = s * max_blocks + 2
    g = torch.Generator().manual_seed(d + s)
    tables = torch.randperm(num_blocks, generator=g)[: s * max_blocks].view(s, max_blocks).to(DEVICE)
    starts = [0]
    for n, _ in spans:
        starts.append(starts[-1] + n)
    qsl = torch.tensor(starts, device=DEVICE)
    lens = torch.tensor([ctx for _, ctx in spans], device=DEVICE)
    pool = randn(num_blocks, 2, block_size, kv_heads, d, dtype=dtype, seed=d)
    q = randn(starts[-1], heads, d, dtype=dtype, seed=starts[-1])
    want = prefill_attention_ref(q, pool, tables, qsl, lens, d**-0.5)
    got = prefill_attention(q, pool, tables, qsl, lens, d**-0.5, out=poisoned(starts[-1], heads, d, dtype=dtype))
    torch.testing.assert_close(got, want, **TOL[dtype])
