"""The offline API: generate for many prompts at once, or stream one."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

from .config import EngineConfig
from .engine import LLMEngine
from .request import Completion, RequestOutput, SamplingParams

Prompt = str | Sequence[int]


class LLM:
    def __init__(self, model: str = "", **engine_options) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_options))
        self._ids = itertools.count()

    def close(self) -> None:
        """Stops the engine's other ranks (tensor parallelism); the object is unusable afterwards."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Runs all prompts through continuous batching; returns one `Completion` per prompt, in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        prompt_ids: dict[str, list[int]] = {}
        try:
            for prompt, p in zip(prompts, params):
                rid = f"offline-{next(self._ids)}"
                prompt_ids[rid] = self.engine.add_request(rid, prompt, p)
        except Exception:
            for rid in prompt_ids:
                self.engine.abort_request(rid)
            raise
        outputs: dict[str, list[RequestOutput]] = {rid: [] for rid in prompt_ids}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                outputs[out.request_id].append(out)
        return [_completion(rid, prompt_ids[rid], outputs[rid]) for rid in prompt_ids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yields each step's output for one prompt as it is produced."""
        rid = f"stream-{next(self._ids)}"
        self.engine.add_request(rid, prompt, params or SamplingParams())
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(rid)


def _completion(request_id: str, prompt_ids: list[int], outputs: list[RequestOutput]) -> Completion:
    return Completion(
        request_id,
        prompt_ids,
        [t for o in outputs for t in o.token_ids],
        [lp for o in outputs for lp in o.logprobs],
        "".join(o.text for o in outputs),
        outputs[-1].finish_reason,
    )
