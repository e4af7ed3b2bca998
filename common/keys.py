"""API keys: what a key may do, and how it is kept in etcd without the key itself.

A key reads `bt_<id>_<secret>`: `id` (12 hex digits) names its record, `/baton/<cluster>/keys/<id>`, so a
router finds the record without trying every key; the secret is 32 random bytes (base64url). The record holds
HMAC-SHA256(cluster secret, key), never the key: whoever reads etcd cannot use what is there, and cannot test
guesses against it without the cluster's secret either, which lives in a file given to the routers and to
`baton keys` (never in etcd). Routers compare digests in constant time (`hmac.compare_digest`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .membership import record_from_json

KEY_PATTERN = re.compile(r"bt_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
MIN_SECRET_BYTES = 32


def keys_prefix(cluster: str) -> str:
    if not cluster or "/" in cluster:
        raise ValueError(f"cluster name must be non-empty and contain no '/', got {cluster!r}")
    return f"/baton/{cluster}/keys/"


def new_key() -> tuple[str, str]:
    """(the key, its id)."""
    key_id = secrets.token_hex(6)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    return f"bt_{key_id}_{secret}", key_id


def key_id_of(key: str) -> str | None:
    """The id a well-formed key names, else None."""
    match = KEY_PATTERN.fullmatch(key)
    return match.group(1) if match else None


def digest(secret: bytes, key: str) -> str:
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()


def read_secret(path: str | Path) -> bytes:
    """The cluster secret in `path` (what `write_secret` made, or any file of at least MIN_SECRET_BYTES)."""
    data = Path(path).read_bytes().strip()
    if len(data) < MIN_SECRET_BYTES:
        raise ValueError(f"cluster secret {path}: {len(data)} bytes, at least {MIN_SECRET_BYTES} are needed")
    return data


def write_secret(path: str | Path) -> bytes:
    """A new random cluster secret in `path`, readable by its owner alone."""
    data = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data + b"\n")
    return data


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key's record in etcd. Limits of 0 (or an empty list of models) mean none. `expires`: a Unix time, 0
    for never (a key being rotated expires at the end of its grace period)."""

    key_id: str
    name: str
    digest: str
    models: list[str] = field(default_factory=list)
    rpm: int = 0  # requests per minute
    tpm: int = 0  # tokens (prompt + completion) per minute
    max_concurrency: int = 0
    max_tokens_per_request: int = 0
    quota_tokens: int = 0
    priority: int = 0  # negative: shed first under overload
    weight: int = 1  # its share in fair queuing
    expires: float = 0.0
    created: float = 0.0
    revoked: float = 0.0  # when it was revoked (0: it was not)
    # Whose usage it counts to: the first key's id, kept by the keys that rotate it, so a rotation does not
    # start its quota afresh. "": the key's own id.
    account: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{12}", self.key_id):
            raise ValueError(f"KeyRecord.key_id must be 12 hex digits, got {self.key_id!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"KeyRecord.name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.models, list) or not all(isinstance(m, str) and m for m in self.models):
            raise ValueError(f"KeyRecord.models must be a list of model names, got {self.models!r}")
        for name in ("rpm", "tpm", "max_concurrency", "max_tokens_per_request", "quota_tokens", "weight"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"KeyRecord.{name} must be an integer >= 0, got {value!r}")
        if self.weight < 1:
            raise ValueError(f"KeyRecord.weight must be >= 1, got {self.weight}")
        if self.account and not re.fullmatch(r"[0-9a-f]{12}", self.account):
            raise ValueError(f"KeyRecord.account must be a key id (12 hex digits), got {self.account!r}")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise ValueError(f"KeyRecord.priority must be an integer, got {self.priority!r}")

    def state(self, now: float | None = None) -> str:
        """"active", "revoked" or "expired"."""
        now = time.time() if now is None else now
        if self.revoked:
            return "revoked"
        if self.expires and now >= self.expires:
            return "expired"
        return "active"

    @property
    def ledger_id(self) -> str:
        """The id its limits are counted under (router/ledger.py)."""
        return self.account or self.key_id

    def allows(self, model: str) -> bool:
        return not self.models or model in self.models

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> KeyRecord:
        return record_from_json(cls, data)
