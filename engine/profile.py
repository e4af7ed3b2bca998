"""A node profile: what one node of a model, degree and device costs, as `baton profile` measured it (engine/
profiling.py), read by the planner and the simulator without torch.

Two cost models, fitted by least squares to the measured points and kept beside them:

    prefill (one step computing prompts):  a + sum over the prompts of (b * new + c * new * (cached + new))
    decode (one step, `batch` sequences):  d + e * batch + f * batch * context

`new` is a prompt's tokens computed, `cached` those its prefix cache held; the product terms are attention,
which reads every earlier token of the sequence. A decode step's `context` is the sequences' mean length.
The YAML file holds the points, the coefficients, and what they were measured on (machine, device, dtype,
degree, KV geometry)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

VERSION = 1


@dataclass(frozen=True, slots=True)
class Grid:
    """What `baton profile` measures (engine/profiling.py)."""
    prompt_lens: tuple[int, ...] = (16, 64, 256, 1024)
    cached_fractions: tuple[float, ...] = (0.0, 0.5)  # of each prompt length, rounded down to whole blocks
    batches: tuple[int, ...] = (1, 4, 16, 64)
    contexts: tuple[int, ...] = (128, 1024)
    repeats: int = 5  # prompts per prefill point; decode steps per decode point = 4 x this


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the field."""


@dataclass(frozen=True, slots=True)
class PrefillPoint:
    tokens: int  # prompt tokens computed
    cached: int  # prompt tokens before them that the prefix cache held
    seconds: float  # the step that computed them (one prompt alone)


@dataclass(frozen=True, slots=True)
class DecodePoint:
    batch: int  # sequences decoding, one token each
    context: int  # their mean length (tokens)
    seconds: float  # one decode-only step


@dataclass(frozen=True, slots=True)
class Profile:
    model: str  # the checkpoint's folder name (or its served name)
    device: str
    dtype: str
    tp: int
    machine: str
    block_size: int
    num_kv_blocks: int  # the KV cache's blocks on one node, as the engine sized it
    kv_bytes_per_token: int  # K and V of one token, every layer, every rank together: what a transfer moves
    max_num_seqs: int
    max_model_len: int
    prefill: tuple[PrefillPoint, ...]
    decode: tuple[DecodePoint, ...]
    prefill_fit: tuple[float, float, float]  # a, b, c (seconds)
    decode_fit: tuple[float, float, float]  # d, e, f (seconds)
    threads: int = 0  # torch threads per rank (0: torch's default)

    # -- the cost models -----------------------------------------------------------------------------------
    def prefill_s(self, tokens: int, cached: int = 0) -> float:
        """One step computing one prompt's `tokens` after `cached` cached ones."""
        return self.prefill_batch_s([(tokens, cached)])

    def prefill_batch_s(self, prompts: list[tuple[int, int]]) -> float:
        """One step computing several prompts together: (tokens, cached) each."""
        a, b, c = self.prefill_fit
        return a + sum(b * n + c * n * (k + n) for n, k in prompts)

    def decode_step_s(self, batch: int, context: float) -> float:
        if batch <= 0:
            return 0.0
        d, e, f = self.decode_fit
        return d + e * batch + f * batch * context

    def max_batch_within(self, step_s: float, context: float) -> int:
        """The largest batch whose decode step at `context` takes at most `step_s` (0 if not even one)."""
        d, e, f = self.decode_fit
        per_seq = e + f * context
        if step_s < d + per_seq:
            return 0
        return min(self.max_num_seqs, int((step_s - d) / per_seq) if per_seq > 0 else self.max_num_seqs)

    # -- the file --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["prefill_fit"] = dict(zip(("a", "b", "c"), self.prefill_fit))
        d["decode_fit"] = dict(zip(("d", "e", "f"), self.decode_fit))
        return {"version": VERSION, **d}

    def save(self, path: str | Path) -> None:
        Path(path).write_text("# baton profile (engine/profile.py): seconds per step, measured and fitted\n"
                              + yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ProfileError(f"profile {path}: {e}") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: Any, where: str = "profile") -> Profile:
        if not isinstance(data, dict):
            raise ProfileError(f"{where}: must be a mapping, got {type(data).__name__}")
        if data.get("version") != VERSION:
            raise ProfileError(f"{where}: version: must be {VERSION}, got {data.get('version')!r}")

        def field(name: str, kind: type, low: float | None = None, source: dict = data, at: str = where):
            value = source.get(name)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ProfileError(f"{at}: {name}: must be a {kind.__name__}, got {value!r}")
            if low is not None and value < low:
                raise ProfileError(f"{at}: {name}: must be >= {low}, got {value!r}")
            return value

        def points(name: str, kind: type, fields: tuple[str, ...]) -> tuple:
            items = data.get(name)
            if not isinstance(items, list) or not items:
                raise ProfileError(f"{where}: {name}: must be a non-empty list of points")
            out = []
            for i, item in enumerate(items):
                at = f"{where}: {name}[{i}]"
                if not isinstance(item, dict):
                    raise ProfileError(f"{at}: must be a mapping")
                values = {f: field(f, int, 0, item, at) for f in fields}
                out.append(kind(**values, seconds=field("seconds", float, 0.0, item, at)))
            return tuple(out)

        def fit(name: str, keys: str) -> tuple[float, float, float]:
            source = data.get(name)
            if not isinstance(source, dict):
                raise ProfileError(f"{where}: {name}: must be a mapping of {', '.join(keys)}")
            return tuple(field(k, float, 0.0, source, f"{where}: {name}") for k in keys)  # type: ignore[return-value]

        return cls(model=field("model", str), device=field("device", str), dtype=field("dtype", str),
                   tp=field("tp", int, 1), machine=field("machine", str), block_size=field("block_size", int, 1),
                   num_kv_blocks=field("num_kv_blocks", int, 1), kv_bytes_per_token=field("kv_bytes_per_token", int, 1),
                   max_num_seqs=field("max_num_seqs", int, 1), max_model_len=field("max_model_len", int, 1),
                   prefill=points("prefill", PrefillPoint, ("tokens", "cached")),
                   decode=points("decode", DecodePoint, ("batch", "context")),
                   prefill_fit=fit("prefill_fit", "abc"), decode_fit=fit("decode_fit", "def"),
                   threads=field("threads", int, 0) if "threads" in data else 0)


def least_squares(rows: list[list[float]], ys: list[float]) -> list[float]:
    """Coefficients x >= 0 minimising |rows x - ys|: the normal equations, solved by elimination, with any
    coefficient that comes out negative dropped and the rest refitted (a cost term cannot be negative). Small
    systems only (three terms here); no numpy needed."""
    # Each column scaled to at most 1 first: a constant beside a token count squared would leave the normal
    # equations badly conditioned.
    scale = [max(abs(r[k]) for r in rows) or 1.0 for k in range(len(rows[0]))]
    scaled = [[v / s for v, s in zip(r, scale)] for r in rows]
    active = list(range(len(rows[0])))
    while True:
        x = _solve(scaled, ys, active)
        negative = [k for k in active if x[k] < 0]
        if not negative:
            return [v / s for v, s in zip(x, scale)]
        active.remove(min(negative, key=lambda k: x[k]))


def _solve(rows: list[list[float]], ys: list[float], active: list[int]) -> list[float]:
    n = len(active)
    ata = [[sum(r[i] * r[j] for r in rows) for j in active] for i in active]
    aty = [sum(r[i] * y for r, y in zip(rows, ys)) for i in active]
    for col in range(n):  # Gaussian elimination with partial pivoting
        pivot = max(range(col, n), key=lambda r: abs(ata[r][col]))
        ata[col], ata[pivot] = ata[pivot], ata[col]
        aty[col], aty[pivot] = aty[pivot], aty[col]
        if ata[col][col] == 0:
            continue
        for r in range(col + 1, n):
            factor = ata[r][col] / ata[col][col]
            for c in range(col, n):
                ata[r][c] -= factor * ata[col][c]
            aty[r] -= factor * aty[col]
    solution = [0.0] * n
    for r in range(n - 1, -1, -1):
        if ata[r][r]:
            solution[r] = (aty[r] - sum(ata[r][c] * solution[c] for c in range(r + 1, n))) / ata[r][r]
    x = [0.0] * len(rows[0])
    for k, value in zip(active, solution):
        x[k] = value
    return x


def parse_ints(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{name}: must be comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise ValueError(f"{name}: must be comma-separated numbers > 0, got {text!r}")
    return values
