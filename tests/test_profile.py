"""`baton profile` (engine/profiling.py) and its file (engine/profile.py): the command measures the bundled
model on the engine a node runs and writes a profile the planner and the simulator read back; the fit never
has a negative term; a broken file is refused naming its field; bad options get status 2 naming theirs."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from cluster_harness import BATON

from baton.engine.profile import Profile, ProfileError, least_squares


def test_baton_profile_writes_a_profile_the_planner_reads(tmp_path):
    out = tmp_path / "p.yaml"
    done = subprocess.run([BATON, "profile", "--output", str(out), "--prompt-lens", "16,64,200",
                           "--cached-fractions", "0,0.5", "--batches", "1,4,8", "--contexts", "32,200", "--repeats",
                           "2", "--threads", "1", "--max-num-seqs", "8"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"written to {out}" in done.stdout
    p = Profile.load(out)
    assert (p.model, p.device, p.dtype, p.tp, p.max_num_seqs) == ("stories260K", "cpu", "float32", 1, 8)
    # stories260K: 5 layers, 4 KV heads of 8 dims, float32: K and V of one token.
    assert p.kv_bytes_per_token == 2 * 5 * 4 * 8 * 4 and p.max_model_len == 512
    # 16 tokens with half cached is 0 cached (whole blocks): measured once; 200 + 96 cached fits 512.
    assert sorted((x.tokens, x.cached) for x in p.prefill) == [(16, 0), (64, 0), (64, 32), (200, 0), (200, 96)]
    assert sorted((x.batch, x.context) for x in p.decode) == [(b, c + 4) for b in (1, 4, 8) for c in (32, 200)]
    assert all(x.seconds > 0 for x in p.prefill + p.decode)
    assert min(p.prefill_fit + p.decode_fit) >= 0 and p.prefill_s(100) > 0 and p.decode_step_s(4, 100) > 0
    assert Profile.from_dict(yaml.safe_load(out.read_text())) == p  # the file round-trips


def test_bad_options_and_files_are_refused_naming_the_field(tmp_path):
    for args, field in [(["--batches", "0,4"], "batches"), (["--cached-fractions", "1.5"], "cached_fractions"),
                        (["--prompt-lens", "x"], "prompt_lens"), (["--repeats", "0"], "repeats")]:
        done = subprocess.run([BATON, "profile", "--output", str(tmp_path / "x.yaml"), *args], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2 and field in done.stderr, (args, done.stderr)
    good = {"version": 1, "model": "m", "device": "cpu", "dtype": "float32", "tp": 1, "machine": "x",
            "block_size": 16, "num_kv_blocks": 100, "kv_bytes_per_token": 1280, "max_num_seqs": 8,
            "max_model_len": 512, "prefill": [{"tokens": 16, "cached": 0, "seconds": 0.001}],
            "decode": [{"batch": 1, "context": 16, "seconds": 0.001}],
            "prefill_fit": {"a": 0.001, "b": 0.0, "c": 0.0}, "decode_fit": {"d": 0.001, "e": 0.0, "f": 0.0}}
    Profile.from_dict(good)
    for change, message in [({"version": 2}, "version"), ({"tp": 0}, "tp: must be >= 1"),
                            ({"prefill": []}, "prefill: must be a non-empty list"),
                            ({"decode": [{"batch": 1, "context": 16, "seconds": "fast"}]}, r"decode\[0\]: seconds"),
                            ({"decode_fit": {"d": 0.1, "e": -1.0, "f": 0}}, "decode_fit: e: must be >= 0")]:
        with pytest.raises(ProfileError, match=message):
            Profile.from_dict({**good, **change})


def test_least_squares_recovers_costs_and_drops_a_negative_term():
    rows = [[1.0, n, n * (k + n)] for n in (16, 64, 256, 900) for k in (0, n)]
    exact = least_squares(rows, [0.002 + 1e-5 * r[1] + 3e-8 * r[2] for r in rows])
    assert exact == pytest.approx([0.002, 1e-5, 3e-8], rel=1e-6)
    clipped = least_squares(rows, [0.002 + 1e-5 * r[1] - 3e-9 * r[2] for r in rows])
    assert clipped[2] == 0.0 and min(clipped) >= 0
