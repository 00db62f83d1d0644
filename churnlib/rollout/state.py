"""A rollout: which version challenges the champion on live traffic, and how.

The state lives in the registry, where every replica already looks (it polls
the champion alias): one JSON tag on the registered model, ``churn.rollout``,

    {"mode": "shadow" | "canary", "share": 0.1, "version": "7",
     "started_at": "...", "started_by": "...", "run_id": "<MLflow run>"}

and the ``challenger`` alias on that version (for people and the MLflow UI;
the tag is what replicas follow). ``churn rollout start`` writes both,
``abort`` and ``promote`` remove both; a replica picks a change up within one
poll (``serve.poll_interval_s``), loading the challenger beside the champion,
as it does for a new champion: no request is dropped.

Routing is a pure function of the record, so every replica routes alike and a
customer always meets the same version: ``bucket`` hashes the customer id (or,
for a record without one, its request id) to [0, 1); canary sends the records
whose bucket is below the share to the challenger.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from churnlib.errors import ConfigError
from churnlib.tags import TAG_ROLLOUT

MODES = ("shadow", "canary")
CHALLENGER = "challenger"


def bucket(key: Any) -> float:
    """A stable number in [0, 1) for a customer id (or request id): the same on every replica,
    process and machine (not Python's salted ``hash``)."""
    digest = hashlib.blake2b(str(key).encode(), digest_size=8, person=b"churn-rollout").digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


@dataclass(frozen=True)
class Rollout:
    mode: str
    version: str
    share: float = 0.0  # canary: the share of customers the challenger answers
    started_at: str = ""
    started_by: str = ""
    run_id: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"rollout mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0.0 < self.share < 1.0 and self.mode == "canary":
            raise ConfigError(f"--share must be between 0 and 1 (exclusive) for a canary, got {self.share:g}")

    def to_tag(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_tag(cls, text: str | None) -> "Rollout | None":
        """The tag's rollout; None for no tag, or one this code cannot read (said by the caller)."""
        if not text:
            return None
        data = json.loads(text)
        return cls(**{k: data[k] for k in ("mode", "version", "share", "started_at", "started_by", "run_id")
                      if k in data})

    @property
    def started(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.started_at)

    def challenger_answers(self, key: Any) -> bool:
        """Canary: whether the challenger answers this customer (or request)."""
        return self.mode == "canary" and bucket(key) < self.share


def read(client: Any, name: str) -> Rollout | None:
    """The rollout on registered model ``name`` (None: none)."""
    rm = client.get_registered_model(name)
    return Rollout.from_tag((rm.tags or {}).get(TAG_ROLLOUT))
