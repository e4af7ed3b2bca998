"""The models a router serves: every model it sees live in the membership, each with what the router needs of it
(its card, its tokenizer, its chat template; no weights).

Nodes register their model's name, its aliases and the checkpoint folder as they see it. The router loads a
model's tokenizer and config from that folder the first time it sees the model live (in a thread: a large
vocabulary takes a while), or from a folder it was given (`--model`, for a router that does not see the nodes'
folders at the same path). A model is served while a live node has it; a request names it by name or alias,
or names none when the cluster serves one model.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baton.common.membership import MembershipWatcher
from baton.engine import InvalidRequest
from baton.engine.checkpoint import ModelConfig
from baton.engine.checkpoint import served_name
from baton.engine.tokenizer import Tokenizer

from .admission import ModelCard, UnknownModel, with_prompt_bound

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ServedModel:
    card: ModelCard  # with its prompt bound
    tokenizer: Tokenizer
    folder: Path
    template: Any = None  # a chat.ChatTemplate, or None when the checkpoint has none

    @property
    def name(self) -> str:
        return self.card.id


def model_card(folder: Path, name: str | None = None, max_prompt_bytes: int = 0) -> ModelCard:
    """What the router knows of a checkpoint from its config (named `name`, else as its nodes name it)."""
    cfg = ModelConfig.from_folder(folder)
    return ModelCard(name or served_name(folder), cfg.architecture, cfg.max_model_len, cfg.vocab_size, cfg.dtype,
                     max_prompt_bytes, cfg.eos_token_ids)


def load_model(folder: Path, name: str, max_prompt_bytes: int = 0, chat_template: str = "") -> ServedModel:
    """Reads a checkpoint folder's config, tokenizer and chat template (slow: walks the vocabulary)."""
    from .chat import ChatTemplate, find_template, special_tokens

    tokenizer = Tokenizer.from_folder(folder)
    card = with_prompt_bound(model_card(folder, name, max_prompt_bytes), tokenizer)
    source = find_template(Path(folder), tokenizer.config, Path(chat_template) if chat_template else None)
    template = None if source is None else ChatTemplate(source, special_tokens(tokenizer.config))
    return ServedModel(card, tokenizer, Path(folder), template)


class Models:
    """Which models are served, by name and alias. The membership owns which nodes are live; this owns what
    was loaded for each model, and `follow` keeps it in step with the membership."""

    def __init__(self, membership: MembershipWatcher, given: list[ServedModel] = ()) -> None:
        self.membership = membership
        self._loaded: dict[str, ServedModel] = {m.name: m for m in given}
        self._failed: dict[str, str] = {}  # model -> why it could not be loaded (logged once)
        self._loading: set[str] = set()

    def live(self) -> list[ServedModel]:
        """The models a live node serves, that are loaded here, by name."""
        names = {n.model for n in self.membership.nodes()}
        return sorted((m for name, m in self._loaded.items() if name in names), key=lambda m: m.name)

    def all(self) -> list[ServedModel]:
        return sorted(self._loaded.values(), key=lambda m: m.name)

    def resolve(self, name: str) -> ServedModel:
        """The model a request names (by name or alias; "" when one model is served). Raises UnknownModel
        (NOT_FOUND) listing the served ones, or InvalidRequest("model") when several are served and none is
        named."""
        live = self.live()
        candidates = live or self.all()  # none live: the request waits for a node of a known model
        if not name:
            if len(candidates) == 1:
                return candidates[0]
            if not candidates:
                raise UnknownModel("model: no model is served yet (no live node)")
            raise InvalidRequest("model", f"this cluster serves several models ({_names(candidates)}): name one")
        aliases = self.aliases()
        for m in candidates:
            if name == m.name or name in aliases.get(m.name, ()):
                return m
        if name in self._loaded:  # known, not live now: its nodes may be back
            return self._loaded[name]
        raise UnknownModel(f"model: {name!r} is not served here (served: {_names(live) or 'none'})")

    def aliases(self) -> dict[str, set[str]]:
        """Each live model's aliases, as its nodes register them (the membership owns them)."""
        out: dict[str, set[str]] = {}
        for node in self.membership.nodes():
            out.setdefault(node.model, set()).update(node.aliases)
        return out

    async def follow(self) -> None:
        """Loads each model that nodes register the first time it appears. Runs until cancelled (one pass per
        membership change)."""
        while True:
            version = self.membership.version
            for node in self.membership.nodes():
                if node.model not in self._loaded and node.model not in self._loading and \
                        node.model not in self._failed and node.model_path:
                    self._loading.add(node.model)
                    asyncio.get_running_loop().create_task(self._load(node.model, node.model_path))
            try:
                await self.membership.wait_for(lambda: self.membership.version != version, 5.0)
            except TimeoutError:
                pass

    async def _load(self, name: str, folder: str) -> None:
        try:
            model = await asyncio.to_thread(load_model, Path(folder), name)
        except Exception as e:  # noqa: BLE001 (a folder the router cannot read: that model is not served)
            self._failed[name] = str(e)
            log.error("model %s: cannot load its tokenizer and config from %s (%s); not served by this router",
                      name, folder, e)
            return
        finally:
            self._loading.discard(name)
        self._loaded[name] = model
        log.info("model %s: loaded from %s", name, folder)


def _names(models: list[ServedModel]) -> str:
    return ", ".join(repr(m.name) for m in models)
