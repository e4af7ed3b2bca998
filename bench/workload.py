"""Seeded request generation for `baton bench`: length distributions, mixtures, and ShareGPT files.

A workload config (the `workload:` section of a bench config) is one of

    {prompt_len: LEN, output_len: LEN}                       one kind of request
    {mixture: [{name, weight, prompt_len, output_len}, ...]}  named kinds drawn by weight
    {sharegpt: PATH, limit: 1000}                             real conversations (prompt as text)

where LEN is an int (fixed) or {dist: fixed, value: N} | {dist: uniform, min, max} |
{dist: normal, mean, std, min, max} (normal draws are rounded and clipped to [min, max]).

The same seed, vocabulary and context length always give the same sequence of requests: one
random.Random drives every draw, so nothing depends on timing or on how many requests a run takes.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from baton.router.client import InvalidArgument

DISTS = ("fixed", "uniform", "normal")
FIRST_TOKEN = 3  # ids 0-2 are <unk>, <s>, </s> in the Llama tokenizers Baton serves: random prompts avoid them


@dataclass(slots=True)
class LengthDist:
    """A distribution of token counts. `value` is used by fixed; min/max by uniform and as normal's clip."""
    dist: str = "fixed"
    value: int = 1
    min: int = 1
    max: int = 1
    mean: float = 0.0
    std: float = 0.0

    def __post_init__(self) -> None:
        if self.dist not in DISTS:
            raise ValueError(f"dist: must be one of {', '.join(DISTS)}, not {self.dist!r}")
        if self.dist == "fixed" and self.value < 1:
            raise ValueError(f"value: must be >= 1, not {self.value}")
        if self.dist in ("uniform", "normal"):
            if self.min < 1:
                raise ValueError(f"min: must be >= 1, not {self.min}")
            if self.max < self.min:
                raise ValueError(f"max: must be >= min ({self.min}), not {self.max}")
        if self.dist == "normal" and self.std < 0:
            raise ValueError(f"std: must be >= 0, not {self.std}")

    @classmethod
    def parse(cls, obj: Any, where: str) -> LengthDist:
        """From an int (fixed) or a mapping; errors name the field as `where.key`."""
        if isinstance(obj, bool) or not isinstance(obj, int | Mapping):
            raise ValueError(f"{where}: must be an int or a mapping with `dist`, not {obj!r}")
        if isinstance(obj, int):
            obj = {"dist": "fixed", "value": obj}
        unknown = set(obj) - {"dist", "value", "min", "max", "mean", "std"}
        if unknown:
            raise ValueError(f"{where}.{sorted(unknown)[0]}: unknown key")
        kw = dict(obj)
        if kw.get("dist") == "normal":  # a normal without bounds is clipped only at 1 token
            kw.setdefault("min", 1)
            kw.setdefault("max", 1 << 30)
        try:
            return cls(**kw)
        except ValueError as e:
            raise ValueError(f"{where}.{e}") from None
        except TypeError as e:
            raise ValueError(f"{where}: {e}") from None

    def sample(self, rng: random.Random) -> int:
        if self.dist == "fixed":
            return self.value
        if self.dist == "uniform":
            return rng.randint(self.min, self.max)
        return min(self.max, max(self.min, round(rng.gauss(self.mean, self.std))))


@dataclass(slots=True)
class Component:
    """One named kind of request in a mixture."""
    name: str
    prompt_len: LengthDist
    output_len: LengthDist
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: must not be empty")
        if not self.weight > 0:
            raise ValueError(f"weight: must be > 0, not {self.weight}")


@dataclass(slots=True)
class WorkloadSpec:
    """Synthetic components (drawn by weight), or a ShareGPT file when `sharegpt` is set."""
    components: list[Component] = field(default_factory=list)
    sharegpt: str = ""
    limit: int = 1000  # ShareGPT: conversations tokenized up front (each costs a Tokenize call)

    def __post_init__(self) -> None:
        if not self.components and not self.sharegpt:
            raise ValueError("workload: needs prompt_len/output_len, a mixture or a sharegpt file")
        if self.limit < 1:
            raise ValueError(f"workload.limit: must be >= 1, not {self.limit}")
        names = [c.name for c in self.components]
        if len(set(names)) != len(names):
            raise ValueError("workload.mixture.name: names must be unique")

    @classmethod
    def parse(cls, obj: Any) -> WorkloadSpec:
        if not isinstance(obj, Mapping):
            raise ValueError(f"workload: must be a mapping, not {obj!r}")
        unknown = set(obj) - {"prompt_len", "output_len", "mixture", "sharegpt", "limit", "name"}
        if unknown:
            raise ValueError(f"workload.{sorted(unknown)[0]}: unknown key")
        if "sharegpt" in obj:
            return cls(sharegpt=str(obj["sharegpt"]), limit=int(obj.get("limit", 1000)))
        if "mixture" in obj:
            mix = obj["mixture"]
            if not isinstance(mix, list) or not mix:
                raise ValueError("workload.mixture: must be a non-empty list")
            comps = []
            for i, c in enumerate(mix):
                where = f"workload.mixture[{i}]"
                if not isinstance(c, Mapping):
                    raise ValueError(f"{where}: must be a mapping")
                for key in ("prompt_len", "output_len"):
                    if key not in c:
                        raise ValueError(f"{where}.{key}: missing")
                try:
                    comps.append(Component(str(c.get("name", f"w{i}")), LengthDist.parse(c["prompt_len"],
                                           f"{where}.prompt_len"), LengthDist.parse(c["output_len"],
                                           f"{where}.output_len"), float(c.get("weight", 1.0))))
                except ValueError as e:
                    raise ValueError(e if str(e).startswith(where) else f"{where}.{e}") from None
            return cls(components=comps)
        for key in ("prompt_len", "output_len"):
            if key not in obj:
                raise ValueError(f"workload.{key}: missing")
        return cls(components=[Component(str(obj.get("name", "default")),
                                         LengthDist.parse(obj["prompt_len"], "workload.prompt_len"),
                                         LengthDist.parse(obj["output_len"], "workload.output_len"))])


@dataclass(slots=True)
class Request:
    """One request to send: token ids (synthetic) or text (ShareGPT), and the output length to ask for."""
    index: int
    workload: str  # the mixture component's name, or "sharegpt"
    prompt: list[int] | str
    prompt_len: int  # tokens (for a text prompt: as the router tokenizes it)
    output_len: int  # max_tokens; with ignore_eos the request generates exactly this many


@dataclass(slots=True)
class Conversation:
    """A ShareGPT entry, tokenized once by the router."""
    prompt: str
    prompt_len: int
    output_len: int


def fit(prompt_len: int, output_len: int, max_model_len: int) -> tuple[int, int]:
    """Shortens a draw so that prompt + output <= max_model_len - 1 (the router's limit), keeping at least
    one output token: the prompt is cut first only when it alone leaves no room."""
    room = max_model_len - 1
    prompt_len = max(1, min(prompt_len, room - 1))
    return prompt_len, max(1, min(output_len, room - prompt_len))


def synthetic(spec: WorkloadSpec, seed: int, vocab_size: int, max_model_len: int) -> Iterator[Request]:
    """An endless, seeded stream of random-token requests."""
    if vocab_size <= FIRST_TOKEN:
        raise ValueError(f"vocab_size: must be > {FIRST_TOKEN}, not {vocab_size}")
    rng = random.Random(seed)
    names = [c.name for c in spec.components]
    weights = [c.weight for c in spec.components]
    by_name = {c.name: c for c in spec.components}
    index = 0
    while True:
        comp = by_name[rng.choices(names, weights)[0]]
        p, o = fit(comp.prompt_len.sample(rng), comp.output_len.sample(rng), max_model_len)
        prompt = [rng.randrange(FIRST_TOKEN, vocab_size) for _ in range(p)]
        yield Request(index, comp.name, prompt, p, o)
        index += 1


def read_sharegpt(path: Path) -> list[tuple[str, str]]:
    """(first human turn, first gpt turn after it) of each conversation that has both, in file order."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise ValueError(f"sharegpt: {path} must hold a JSON list of conversations")
    pairs = []
    for entry in data:
        turns = entry.get("conversations", []) if isinstance(entry, dict) else []
        human = next((i for i, t in enumerate(turns) if t.get("from") == "human" and t.get("value")), None)
        if human is None:
            continue
        gpt = next((t["value"] for t in turns[human + 1:] if t.get("from") == "gpt" and t.get("value")), None)
        if gpt is not None:
            pairs.append((turns[human]["value"], gpt))
    return pairs


class Tokenizer(Protocol):
    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


async def tokenize_sharegpt(pairs: list[tuple[str, str]], client: Tokenizer, max_model_len: int,
                            concurrency: int = 16) -> list[Conversation]:
    """Token counts from the router's own tokenizer (never a downloaded one); conversations that do not
    fit the context are dropped, as vLLM's benchmark does, rather than cut (a cut text is another prompt)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(human: str, gpt: str) -> Conversation | None:
        async with gate:
            try:
                p = len(await client.tokenize(human))  # with BOS: what the router will prefill
                o = len(await client.tokenize(gpt, add_special_tokens=False))
            except InvalidArgument:  # more text than any prompt the context holds: the router refused it
                return None
        if p < 1 or o < 1 or p + o > max_model_len - 1:
            return None
        return Conversation(human, p, o)

    found = await asyncio.gather(*(one(h, g) for h, g in pairs))
    return [c for c in found if c is not None]


def from_conversations(convs: list[Conversation], seed: int) -> Iterator[Request]:
    """An endless, seeded stream over the conversations: a fresh shuffle for every pass."""
    if not convs:
        raise ValueError("sharegpt: no conversation fits the model's context")
    rng = random.Random(seed)
    index = 0
    while True:
        order = list(range(len(convs)))
        rng.shuffle(order)
        for k in order:
            c = convs[k]
            yield Request(index, "sharegpt", c.prompt, c.prompt_len, c.output_len)
            index += 1


async def prepare(spec: WorkloadSpec, seed: int, client: Any) -> Callable[[], Iterator[Request]]:
    """A factory of identical request streams for one router: its vocabulary and context come from
    ListModels, ShareGPT lengths from its Tokenize (done once here, not for every sweep point)."""
    info = (await client.list_models())[0]
    if spec.sharegpt:
        pairs = read_sharegpt(Path(spec.sharegpt))[: spec.limit]
        convs = await tokenize_sharegpt(pairs, client, info.max_model_len)
        return lambda: from_conversations(convs, seed)
    return lambda: synthetic(spec, seed, info.vocab_size, info.max_model_len)
