"""engine/linear.py: the packed CPU linear rounds its row count up (a bounded set of shapes for oneDNN) and
still gives each row the plain nn.Linear result."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from baton.engine.linear import PackedLinear, packing_works, padded_rows


def test_row_counts_round_up_by_at_most_an_eighth_to_a_bounded_set():
    rounded = [padded_rows(n) for n in range(1, 8193)]
    assert all(n <= r <= n + n // 8 for n, r in zip(range(1, 8193), rounded))
    assert rounded[:16] == list(range(1, 17))  # small batches (decode steps) as they are
    assert len(set(rounded)) == 88  # 8 per octave above 16: what oneDNN keeps state for
    assert all(padded_rows(r) == r for r in rounded)


@pytest.mark.skipif(not packing_works(torch.float32), reason="oneDNN packed linear not available")
@pytest.mark.parametrize("rows", [1, 7, 17, 33, 100, 1000])
def test_packed_rows_match_the_plain_linear(rows: int):
    torch.manual_seed(rows)
    plain = nn.Linear(96, 80)
    x = torch.randn(rows, 96)
    packed = PackedLinear(plain)
    assert torch.allclose(packed(x), plain(x), rtol=1e-5, atol=1e-5)
    assert packed(x.view(1, rows, 96)).shape == (1, rows, 80)
