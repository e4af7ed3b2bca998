"""Every supported architecture and config variant against transformers, on tiny random checkpoints.

Each checkpoint is written here with transformers' `save_pretrained` (nothing is downloaded), with weights
drawn large (`initializer_range` 0.3) so that logits spread over about +-10, and with norm weights and biases
perturbed so that a swapped or ignored one shows. The closest top-two gap over all greedy steps is ~1e-3, the
float32 logit error ~2e-5, so exact token equality is safe in float32. Baton must pick the same greedy
tokens as transformers and give the same last-position logits, on the whole-prompt, chunked and decode paths.
"""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from baton.engine import LLM, ConfigError, SamplingParams
from baton.engine.checkpoint import DEFAULT_MODEL
from baton.engine.rope import inverse_frequencies
from baton.engine.sequence import Sequence

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
NEW_TOKENS = 24
PROMPT_LENGTHS = (5, 23, 60)
FLOAT32_TOL = 1e-4
# Max |Baton - transformers| over last-position logits (|logits| up to ~10), each side run in the checkpoint's
# half dtype. Observed on CPU: 0.11 (bfloat16) and 0.015 (float16); transformers' own half-vs-float32 error is
# 0.43 and 0.04. The bounds leave about 3.5 times the observed error.
HALF_TOL = {"bfloat16": 0.4, "float16": 0.05}

LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # tiny, so that the scaling changes the tiny model's frequencies
    "rope_theta": 500000.0,
}


@dataclass(frozen=True)
class Variant:
    architecture: str
    config: dict = field(default_factory=dict)  # on top of BASE_CONFIG
    max_shard_size: str | None = None  # set: a sharded save (index + several files)
    legacy_rope: bool = False  # rewrite config.json's rope in the transformers 4.x form (rope_scaling, rope_theta)


BASE_CONFIG = dict(
    vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=256, initializer_range=0.3, rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)

VARIANTS = {
    "llama-mha": Variant("LlamaForCausalLM"),  # GQA ratio 1
    "llama-gqa2": Variant("LlamaForCausalLM", dict(num_key_value_heads=2)),
    "llama-gqa4-tied": Variant(
        "LlamaForCausalLM", dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    ),
    "llama-head-dim": Variant("LlamaForCausalLM", dict(num_key_value_heads=2, head_dim=32)),  # not 64 / 4
    "llama-biases": Variant("LlamaForCausalLM", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "llama3-rope": Variant("LlamaForCausalLM", dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE)),
    "llama3-rope-legacy": Variant(
        "LlamaForCausalLM", dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE), legacy_rope=True
    ),
    "llama-sharded": Variant("LlamaForCausalLM", dict(num_hidden_layers=3), max_shard_size="100KB"),
    "mistral": Variant("MistralForCausalLM", dict(num_key_value_heads=1)),
    "qwen2-tied": Variant("Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
}


def write_checkpoint(folder: Path, variant: Variant) -> Path:
    torch.manual_seed(0)
    config_cls = getattr(transformers, variant.architecture.replace("ForCausalLM", "Config"))
    model = getattr(transformers, variant.architecture)(config_cls(**(BASE_CONFIG | variant.config)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):  # transformers initialises biases to zero
                p.copy_(0.3 * torch.randn_like(p))
    kwargs = {"max_shard_size": variant.max_shard_size} if variant.max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    for name in TOKENIZER_FILES:
        shutil.copy(DEFAULT_MODEL / name, folder / name)
    if variant.legacy_rope:
        edit_config(folder, _to_legacy_rope)
    return folder


def _to_legacy_rope(config: dict) -> None:
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope


def edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config, indent=2))


def load_hf(folder: Path, dtype: torch.dtype = torch.float32):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # never stop early: Baton runs with ignore_eos
    return model


def make_prompts(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


PROMPTS = make_prompts()
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)

# How a prompt's tokens reach the model: all at once, in two chunks (the second attends to cached K/V), or all
# but the last then the last alone (the paged decode path).
SPLITS = {
    "prefill": lambda n: [n],
    "chunked": lambda n: [n // 2, n - n // 2],
    "decode": lambda n: [n - 1, 1],
}
_logit_ids = itertools.count()


def baton_last_logits(llm: LLM, prompt: list[int], split: str = "prefill") -> torch.Tensor:
    """The float32 logits of the prompt's last position, through the engine's paged KV cache."""
    engine = llm.engine
    rid = f"logits-{next(_logit_ids)}"
    seq = Sequence(rid, list(prompt), len(prompt), GREEDY, len(prompt) + 1, None)
    engine.blocks.grow(rid, len(prompt))
    try:
        for n in SPLITS[split](len(prompt)):
            logits, rows = engine.runner.run([seq], [n])
            seq.num_computed += n
    finally:
        engine.blocks.free(rid)
    assert rows == [0]
    return logits[0]


@torch.inference_mode()
def hf_last_logits(model, prompt: list[int]) -> torch.Tensor:
    return model(torch.tensor([prompt])).logits[0, -1].float()


@torch.inference_mode()
def hf_greedy(model, prompt: list[int]) -> tuple[list[int], list[float]]:
    """transformers' greedy continuation, and at each step the margin between its top two logits."""
    out = model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False,
        max_new_tokens=NEW_TOKENS, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
    )
    ids = out.sequences[0, len(prompt):].tolist()
    assert len(ids) == NEW_TOKENS
    margins = [float(t.topk(2).values[0, 0] - t.topk(2).values[0, 1]) for t in out.logits]
    return ids, margins


# -- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """`checkpoint(name)`: the folder of VARIANTS[name], written once per module."""
    folders: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in folders:
            folders[name] = write_checkpoint(tmp_path_factory.mktemp(name), VARIANTS[name])
        return folders[name]

    return get


@dataclass
class Pair:
    folder: Path
    hf: object
    llm: LLM


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, checkpoint) -> Pair:
    folder = checkpoint(request.param)
    return Pair(folder, load_hf(folder), LLM(str(folder)))


# -- float32: exact tokens, logits within 1e-4 ----------------------------------------------------------------


def test_greedy_tokens_match_transformers(pair):
    outs = pair.llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_greedy(pair.hf, prompt)[0]
    assert pair.llm.engine.num_free_blocks == pair.llm.engine.blocks.num_blocks


@pytest.mark.parametrize("split", list(SPLITS))
def test_last_logits_match_transformers(pair, split):
    for prompt in PROMPTS:
        ours, theirs = baton_last_logits(pair.llm, prompt, split), hf_last_logits(pair.hf, prompt)
        assert ours.dtype == torch.float32 and ours.shape == theirs.shape == (512,)
        assert (ours - theirs).abs().max().item() <= FLOAT32_TOL
    assert pair.llm.engine.num_free_blocks == pair.llm.engine.blocks.num_blocks


def test_variants_are_what_they_claim(checkpoint):
    """Guards the table itself: the sharded save is sharded, and the llama3 scaling really moves frequencies."""
    sharded = checkpoint("llama-sharded")
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (sharded / "model.safetensors").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards

    for name in ("llama3-rope", "llama3-rope-legacy"):
        config = LLM(str(checkpoint(name))).engine.model_config
        assert config.rope_scaling.rope_type == "llama3" and config.rope_theta == 500000.0
        scaled = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        plain = inverse_frequencies(config.head_dim, config.rope_theta, type(config.rope_scaling)())
        changed = ~torch.isclose(scaled, plain)
        assert 0 < changed.sum() < len(plain)  # low frequencies scaled, high ones kept
    legacy = json.loads((checkpoint("llama3-rope-legacy") / "config.json").read_text())
    assert "rope_scaling" in legacy and "rope_parameters" not in legacy


# -- half-precision checkpoints ---------------------------------------------------------------------------------

HALF_VARIANTS = ("llama-gqa2", "qwen2-tied")


@pytest.fixture(scope="module")
def half_checkpoint(checkpoint, tmp_path_factory):
    """`half_checkpoint(name, dtype)`: VARIANTS[name] re-saved in that dtype, and transformers' model of it."""
    made: dict[tuple[str, str], tuple[Path, object]] = {}

    def get(name: str, dtype: str):
        if (name, dtype) not in made:
            hf = load_hf(checkpoint(name), getattr(torch, dtype))
            folder = tmp_path_factory.mktemp(f"{name}-{dtype}")
            hf.save_pretrained(folder)
            for f in TOKENIZER_FILES:
                shutil.copy(DEFAULT_MODEL / f, folder / f)
            made[name, dtype] = folder, hf
        return made[name, dtype]

    return get


@pytest.mark.parametrize("dtype", list(HALF_TOL))
@pytest.mark.parametrize("name", HALF_VARIANTS)
def test_half_checkpoint_matches_transformers_in_its_dtype(half_checkpoint, name, dtype):
    folder, hf = half_checkpoint(name, dtype)
    assert json.loads((folder / "config.json").read_text())["dtype"] == dtype
    llm = LLM(str(folder))  # dtype=None: the checkpoint's
    assert llm.engine.runner.kv.storage.dtype == getattr(torch, dtype)
    tol = HALF_TOL[dtype]
    for split in SPLITS:
        for prompt in PROMPTS:
            err = (baton_last_logits(llm, prompt, split) - hf_last_logits(hf, prompt)).abs().max().item()
            assert err <= tol, (split, len(prompt))
    # Greedy tokens: the same until a step where the two sides' logits, measured on that very context, differ
    # enough to explain the flip. If Baton picks a where transformers picks b, with both sides' logits within
    # e of each other there, then transformers' margin L_b - L_2nd <= L_b - L_a <= (L_b - B_b) + (B_a - L_a)
    # <= 2e: a flip with a wider margin is a bug, whatever the dtype. After a legitimate flip the two
    # continuations no longer share a context.
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, GREEDY)):
        assert len(out.token_ids) == NEW_TOKENS
        theirs, margins = hf_greedy(hf, prompt)
        for i, (ours_id, their_id, margin) in enumerate(zip(out.token_ids, theirs, margins)):
            if ours_id != their_id:
                context = prompt + theirs[:i]
                e = (baton_last_logits(llm, context) - hf_last_logits(hf, context)).abs().max().item()
                assert e <= tol and margin <= 2 * e, (i, margin, e)
                break


@pytest.mark.parametrize("name", HALF_VARIANTS)
def test_float32_override_on_bfloat16_checkpoint(half_checkpoint, name):
    folder, _ = half_checkpoint(name, "bfloat16")
    llm = LLM(str(folder), dtype="float32")
    assert llm.engine.runner.kv.storage.dtype == torch.float32
    hf = load_hf(folder, torch.float32)  # the same bfloat16 weights, upcast
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, GREEDY)):
        assert (baton_last_logits(llm, prompt) - hf_last_logits(hf, prompt)).abs().max().item() <= FLOAT32_TOL
        assert out.token_ids == hf_greedy(hf, prompt)[0]


# -- load-time errors name the culprit -------------------------------------------------------------------------


def _unsupported_architecture(folder: Path):
    edit_config(folder, lambda c: c.update(architectures=["GPT2LMHeadModel"]))
    return "architectures", ["GPT2LMHeadModel", "LlamaForCausalLM"]


def _rewrite_tensors(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _missing_tensor(folder: Path):
    name = "model.layers.1.mlp.down_proj.weight"
    _rewrite_tensors(folder, lambda t: t.pop(name))
    return name, ["missing"]


def _wrong_shape(folder: Path):
    name = "model.layers.0.self_attn.k_proj.weight"  # [2 * 16, 64] for llama-gqa2
    _rewrite_tensors(folder, lambda t: t.update({name: t[name].repeat(2, 1)}))
    return name, ["(64, 64)", "(32, 64)"]


def _unexpected_tensor(folder: Path):
    name = "model.layers.0.mlp.extra_proj.weight"
    _rewrite_tensors(folder, lambda t: t.update({name: torch.zeros(4, 4)}))
    return name, ["unexpected", "LlamaForCausalLM"]


def _missing_weights_file(folder: Path):
    (folder / "model.safetensors").unlink()
    return "model", ["model.safetensors", str(folder)]


def _missing_shard(folder: Path):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    (folder / shard).unlink()
    return "model", [shard, "missing"]


LOAD_ERRORS = {
    "unsupported-architecture": ("llama-gqa2", _unsupported_architecture),
    "missing-tensor": ("llama-gqa2", _missing_tensor),
    "wrong-shape": ("llama-gqa2", _wrong_shape),
    "unexpected-tensor": ("llama-gqa2", _unexpected_tensor),
    "missing-model-safetensors": ("llama-gqa2", _missing_weights_file),
    "missing-shard": ("llama-sharded", _missing_shard),
}


@pytest.mark.parametrize("case", list(LOAD_ERRORS))
def test_load_error_names_the_culprit(case, checkpoint, tmp_path):
    base, breaks = LOAD_ERRORS[case]
    folder = shutil.copytree(checkpoint(base), tmp_path / base)
    LLM(str(folder))  # the intact copy loads
    expected_field, fragments = breaks(folder)
    with pytest.raises(ConfigError) as info:
        LLM(str(folder))
    assert info.value.field == expected_field
    for fragment in fragments:
        assert fragment in str(info.value)
