"""Text <-> token ids for a Hugging Face checkpoint folder, on the `tokenizers` library alone."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, pre_tokenizers

_LLAMA_CLASSES = {"LlamaTokenizer", "LlamaTokenizerFast"}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(value: Any) -> str | None:
    # Special tokens appear either as plain strings or as serialized AddedToken dicts.
    return value.get("content") if isinstance(value, dict) else value


@dataclass(slots=True)
class Tokenizer:
    backend: tokenizers.Tokenizer
    config: dict[str, Any] = field(default_factory=dict)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    special_token_ids: frozenset[int] = field(init=False)
    byte_token_ids: frozenset[int] = field(init=False)  # byte-fallback tokens <0x00>..<0xFF>

    def __post_init__(self) -> None:
        added = self.backend.get_added_tokens_decoder()
        self.special_token_ids = frozenset(i for i, t in added.items() if t.special)
        vocab = self.backend.get_vocab(with_added_tokens=False)
        self.byte_token_ids = frozenset(i for token, i in vocab.items() if _BYTE_TOKEN.fullmatch(token))

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {tokenizer_file.resolve()}")
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        config = _read_json(folder / "special_tokens_map.json") | _read_json(folder / "tokenizer_config.json")

        # transformers 5 does not load a Llama tokenizer.json as-is: LlamaTokenizer.__init__ rebuilds
        # it from vocab/merges with a Metaspace pre-tokenizer in place of the file's Prepend+Replace
        # normalizer. The two differ on leading spaces ("  a": the file gives ▁▁▁a, transformers ▁▁a).
        # Mirror it so that ids match what the model saw in HF-based pipelines.
        if config.get("tokenizer_class") in _LLAMA_CLASSES:
            add_prefix_space = config.get("add_prefix_space")
            add_prefix_space = True if add_prefix_space is None else add_prefix_space
            scheme = ("always" if config.get("legacy", False) else "first") if add_prefix_space else "never"
            backend.normalizer = None
            backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
            steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
            if add_prefix_space:
                steps.append(decoders.Strip(content=" ", left=1))
            backend.decoder = decoders.Sequence(steps)
        # The post-processor of tokenizer.json decides BOS/EOS: transformers 5 drops
        # add_bos_token/add_eos_token from tokenizer_config.json whenever a tokenizer.json exists.

        def lookup(key: str) -> int | None:
            content = _token_content(config.get(key))
            return backend.token_to_id(content) if content is not None else None

        return cls(backend, config, lookup("bos_token"), lookup("eos_token"))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce or decode, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)
