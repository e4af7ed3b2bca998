"""The flat step metadata the model runner builds (one layout for the torch path and the Triton kernels),
checked token by token against the definition, and the `kernels` setting."""

from __future__ import annotations

import pytest
import torch

from baton.engine import LLM, ConfigError, EngineConfig, SamplingParams
from baton.engine.sequence import Sequence

GREEDY = SamplingParams(max_tokens=8, temperature=0)


def _sequence(rid: str, length: int, computed: int) -> Sequence:
    first = sum(map(ord, rid))
    seq = Sequence(rid, [(first + 7 * i) % 400 + 3 for i in range(length)], length, GREEDY, length + 8, None)
    seq.num_computed = computed
    return seq


def test_mixed_step_metadata_matches_its_definition(stories_path):
    llm = LLM(str(stories_path), block_size=8, num_kv_blocks=64)
    blocks = llm.engine.blocks
    # Scattered block tables: sequences grow in turns, so each one's blocks are not consecutive.
    seqs = [
        _sequence("prompt-a", 13, 0),  # a whole prompt
        _sequence("decode-short", 5, 4),  # a decode at position 4
        _sequence("chunk", 30, 16),  # a chunk of 9 of 30 tokens after 16 cached (not the last)
        _sequence("decode-long", 27, 26),  # a decode at position 26
    ]
    for upto in (8, 16, 24, 32):  # block by block, in turns
        for seq in seqs:
            blocks.grow(seq.request_id, min(upto, seq.num_tokens))
    assert blocks.table("chunk")[:2] != [blocks.table("chunk")[0], blocks.table("chunk")[0] + 1]
    num_tokens = [13, 1, 9, 1]
    inputs = llm.engine.runner.prepare(seqs, num_tokens)
    meta = inputs.meta

    # Decode rows first, longest context first; then the prefill spans in their given order.
    order = [3, 1, 0, 2]
    rows = [(seqs[i], p) for i in order for p in range(seqs[i].num_computed, seqs[i].num_computed + num_tokens[i])]
    assert inputs.input_ids.tolist() == [s.token_ids[p] for s, p in rows]
    assert inputs.positions.tolist() == [p for _, p in rows]
    assert meta.slot_blocks.tolist() == [blocks.table(s.request_id)[p // 8] for s, p in rows]
    assert meta.slot_offsets.tolist() == [p % 8 for _, p in rows]

    assert meta.num_decodes == 2
    assert meta.decode_seq_lens.tolist() == meta.decode_seq_lens_host == [27, 5]
    assert meta.decode_block_tables.tolist() == [blocks.table("decode-long")[:4], blocks.table("decode-short")[:1] + [0] * 3]

    assert meta.prefill_query_start_loc.tolist() == meta.prefill_query_start_host == [2, 15, 24]
    assert meta.prefill_seq_lens.tolist() == meta.prefill_seq_lens_host == [13, 25]
    assert meta.max_query_len == 13
    assert meta.prefill_block_tables.tolist() == [blocks.table("prompt-a")[:2] + [0, 0], blocks.table("chunk")[:4]]
    # The chunk does not reach its sequence's end: nothing to sample from it.
    assert inputs.sample_rows.tolist() == [0, 1, 14]
    assert inputs.sample_seqs == [3, 1, 0]


def test_kernels_setting_is_checked(monkeypatch):
    with pytest.raises(ConfigError, match="kernels"):
        EngineConfig(kernels="cuda")
    assert EngineConfig(kernels="auto").kernels == ("triton" if torch.cuda.is_available() else "torch")
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ConfigError, match="kernels: triton .*TRITON_INTERPRET=1|kernels: triton is not installed"):
            EngineConfig(kernels="triton")


def test_cli_refuses_kernels_it_cannot_run(monkeypatch, capsys):
    from baton.cluster.cli import main

    if torch.cuda.is_available():
        pytest.skip("a GPU runs Triton for real")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["generate", "hello", "--kernels", "triton", "--max-tokens", "2"]) == 2
    assert "kernels" in capsys.readouterr().err
