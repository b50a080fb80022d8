"""Selection of the refusal direction among scored candidates: each candidate's scores, the filters
(KL, induction, late layers) applied to stored scores, the lowest bypass score among the survivors,
and the result's files and table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from jaxtyping import Float
from torch import Tensor

from interp.direction import Direction
from interp.io import atomic_save_safetensors, atomic_write_json, read_json
from probes.direction_candidates import RefusalDirectionConfig

__all__ = ["NoValidCandidateError", "CandidateScore", "RefusalDirectionResult", "format_table", "load_selection"]


class NoValidCandidateError(RuntimeError):
    """No candidate passed the filters; the message shows the closest ones and which filter failed."""


@dataclass
class CandidateScore:
    """Scores of one candidate direction (position offset × layer)."""

    position: int
    token: str
    layer: int
    norm: float
    bypass_score: float | None = None
    induce_score: float | None = None
    kl: float | None = None
    status: str = "unscored"
    """``selected``, ``ok`` (passed the filters), or the filters it failed joined by ``+``:
    ``late_layer``, ``kl``, ``no_induce``, ``zero_norm``."""


@dataclass
class RefusalDirectionResult:
    """The selected direction (if any candidate passed) and every candidate's scores."""

    direction: Direction | None
    candidates: list[CandidateScore]
    candidate_vectors: Float[Tensor, "pos layer d_model"]
    """Raw differences of means, rows in the order of ``positions``, columns of ``layers``."""
    positions: list[int]
    layers: list[int]
    baseline: dict
    """Mean refusal scores without intervention on the validation sets, and prompt counts."""
    timings: dict
    config: RefusalDirectionConfig
    provenance: dict = field(default_factory=dict)
    """Model name, state id and layer count the candidates were computed on."""

    @property
    def selected(self) -> CandidateScore | None:
        return next((c for c in self.candidates if c.status == "selected"), None)

    def reselect(self, cfg: RefusalDirectionConfig) -> RefusalDirectionResult:
        """Apply ``cfg``'s thresholds to the stored scores and pick the direction again (cheap: no
        forward passes). Only ``kl_threshold`` and ``induce_threshold`` may differ from the scoring
        config; candidates never scored stay excluded."""
        for c in self.candidates:
            if c.bypass_score is None:
                continue
            reasons = [r for r in c.status.split("+") if r == "late_layer"]
            if c.kl > cfg.kl_threshold:
                reasons.append("kl")
            if c.induce_score < cfg.induce_threshold:
                reasons.append("no_induce")
            c.status = "+".join(reasons) or "ok"
        self.config = replace(self.config, kl_threshold=cfg.kl_threshold, induce_threshold=cfg.induce_threshold)
        ok = [c for c in self.candidates if c.status == "ok"]
        self.direction = None
        if ok:
            best = min(ok, key=lambda c: c.bypass_score)
            best.status = "selected"
            vec = self.candidate_vectors[self.positions.index(best.position), self.layers.index(best.layer)]
            self.direction = Direction.from_vectors(vec, [best.layer], name="refusal", meta={
                "builder": "mean_difference", **self.provenance, "site": self.config.site,
                "position": best.position, "token": best.token, "layer": best.layer,
                "bypass_score": best.bypass_score, "induce_score": best.induce_score, "kl": best.kl,
                "baseline": self.baseline, "config_hash": self.config.hash(),
            })
        return self

    @classmethod
    def load(cls, out: str | Path) -> RefusalDirectionResult:
        """Read a run directory written by :meth:`save`."""
        from safetensors.torch import load_file

        out = Path(out)
        rec = read_json(out / "candidates.json")
        vecs = load_file(out / "candidate_vectors.safetensors")["vectors"]
        direction = Direction.load(out / "direction.safetensors") if (out / "direction.safetensors").exists() else None
        return cls(direction, [CandidateScore(**c) for c in rec["candidates"]], vecs, rec["positions"], rec["layers"],
                   rec["baseline"], rec["timings"], RefusalDirectionConfig.from_dict(rec["config"]),
                   rec.get("provenance", {}))

    def require(self) -> Direction:
        if self.direction is None:
            raise NoValidCandidateError(
                "no candidate passed the filters; closest:\n" + self.table(5)
                + "\nrelax kl_threshold / induce_threshold, or give more prompts")
        return self.direction

    def table(self, top: int = 12) -> str:
        """The best candidates by bypass score (filtered ones included, with the failed filter)."""
        return format_table([asdict(c) for c in self.candidates], self.baseline, top)

    def save(self, out: str | Path) -> Path:
        """Write ``direction.safetensors`` (if selected), ``candidates.json`` and ``candidate_vectors.safetensors``."""
        out = Path(out)
        if self.direction is not None:
            self.direction.save(out / "direction.safetensors")
        else:
            (out / "direction.safetensors").unlink(missing_ok=True)
        atomic_save_safetensors(out / "candidate_vectors.safetensors", {"vectors": self.candidate_vectors},
                                metadata={"positions": str(self.positions), "layers": str(self.layers)})
        atomic_write_json(out / "candidates.json", {
            "config": self.config.to_dict(), "provenance": self.provenance, "baseline": self.baseline,
            "timings": self.timings,
            "positions": self.positions, "layers": self.layers,
            "selected": asdict(self.selected) if self.selected else None,
            "candidates": [asdict(c) for c in self.candidates],
        })
        return out


def format_table(candidates: Sequence[dict], baseline: dict, top: int = 12) -> str:
    """Selection table of candidate records (``asdict(CandidateScore)``), best bypass score first.

    The ``base`` row holds the scores without intervention: a good direction's bypass score is far
    below the harmful baseline and its induce score far above the harmless one.
    """
    scored = sorted((c for c in candidates if c["bypass_score"] is not None), key=lambda c: c["bypass_score"])
    lines = [f"{'pos':>4} {'token':>14} {'layer':>5} {'bypass':>8} {'induce':>8} {'kl':>7}  status",
             f"{'':>4} {'(no intervention)':>20} {baseline['harmful_val']:8.3f} {baseline['harmless_val']:8.3f}"]
    for c in scored[:top]:
        lines.append(f"{c['position']:>4} {c['token']!r:>14} {c['layer']:>5} {c['bypass_score']:8.3f} "
                     f"{c['induce_score']:8.3f} {c['kl']:7.4f}  {c['status']}")
    skipped = len(candidates) - len(scored)
    if skipped:
        lines.append(f"({skipped} candidates not scored: excluded late layers or zero vectors)")
    return "\n".join(lines)


def load_selection(out: str | Path) -> tuple[Direction, dict]:
    """The saved direction and the candidates record of a selection run directory."""
    out = Path(out)
    return Direction.load(out / "direction.safetensors"), read_json(out / "candidates.json")
