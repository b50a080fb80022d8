"""The unlearning examples: a (prompt, response) :class:`Example`, a :class:`DataSet` of them with its
manifest, and their rows for JSON."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Example", "DataSet", "EmptyDataError", "dataset_to_rows", "dataset_from_rows"]


class EmptyDataError(ValueError):
    """Filtering left no examples; the message gives the counts."""


@dataclass(frozen=True)
class Example:
    """One (prompt, response) pair for training.

    Attributes:
        prompt_id: Suite id of the prompt.
        domain: Suite set the prompt comes from.
        prompt: The user message (without any trigger; triggers are applied at collation).
        response: The assistant response to train on.
        label: The judge's label of ``response``.
    """

    prompt_id: str
    domain: str
    prompt: str
    response: str
    label: str


@dataclass
class DataSet:
    """Examples plus a manifest of what was requested, generated, kept and dropped (and why)."""

    examples: list[Example]
    manifest: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def prompt_ids(self) -> list[str]:
        return [e.prompt_id for e in self.examples]

    def fingerprint(self) -> str:
        """Hash of the exact examples (ids and texts), to detect data drift between resumes."""
        h = hashlib.sha256()
        for e in self.examples:
            h.update(json.dumps([e.prompt_id, e.prompt, e.response], ensure_ascii=False).encode())
        return h.hexdigest()[:16]


def dataset_to_rows(ds: DataSet) -> list[dict[str, Any]]:
    return [asdict(e) for e in ds.examples]


def dataset_from_rows(rows: Sequence[dict[str, Any]], manifest: dict[str, Any] | None = None) -> DataSet:
    return DataSet([Example(**{k: r[k] for k in ("prompt_id", "domain", "prompt", "response", "label")})
                    for r in rows], dict(manifest or {}))
