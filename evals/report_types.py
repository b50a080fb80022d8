"""What an evaluation returns: its config (:class:`EvalConfig`), one :class:`DomainResult` per row,
the per-prompt :class:`PromptRecord` and the :class:`EvalReport` with its JSON round trip and tables.

:mod:`evals.evaluate` computes them; see its docstring for what each rate means.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evals.judge import JUDGES, UnknownJudgeError
from evals.refusal import LOGIT_VARIANTS
from evals.suite import DOMAINS, EXTRA_SETS, SPLITS, UnknownDomainError
from interp.config import JsonConfig
from interp.io import atomic_write_json, read_json, write_jsonl

__all__ = ["EvalConfig", "DomainResult", "PromptRecord", "EvalReport", "OVER_REFUSAL", "BENIGN", "GENERATION_MODES"]

OVER_REFUSAL = "over_refusal"
BENIGN = "benign"
GENERATION_MODES = ("judge_aware", "fixed")


@dataclass
class EvalConfig(JsonConfig):
    """What to evaluate and how. Field types and ranges are checked by :func:`interp.config.check_fields`."""

    domains: tuple[str, ...] = DOMAINS
    """Refusal domains to evaluate (each a row of the table)."""
    split: str = "eval"
    """Suite split to draw prompts from."""
    limit: int | None = None
    """At most this many prompts per domain (the suite's fixed order); ``None`` for all."""
    over_refusal: bool = True
    """Also measure refusal on the ``over_refusal`` set (benign prompts that look harmful)."""
    generate: bool = True
    """Generate and judge responses; ``False`` computes the logit score only (fast)."""
    max_new_tokens: int = 48
    """Tokens generated per response (refusals are decided in the opening)."""
    batch_size: int = 16
    """Prompts per forward / generate batch."""
    judge: str = "keyword"
    """Judge for generated responses: ``keyword`` or ``model``."""
    n_bootstrap: int = 1000
    """Bootstrap resamples for the 95% confidence intervals."""
    seed: int = 0
    """Seed of the bootstrap."""
    system: str | None = None
    """System prompt; ``None`` keeps the chat template's default."""
    max_prompt_tokens: int = 512
    """Prompts longer than this keep their last tokens."""
    raw: bool = False
    """Feed prompts as plain text, without a chat template (base models that have none)."""
    benign: bool = True
    """Also measure refusal on the ``benign`` set (harmless requests: any refusal there is a cost of
    unlearning, not safety)."""
    kl_tokens: int | None = 8
    """When the model carries an adapter: mean next-token KL(base || model) on the benign prompts over
    this many response positions (the utility cost of the adapter); None skips it."""
    generation: str = "judge_aware"
    """``judge_aware``: stop each response once the judge can decide (the keyword judge: once the
    opening it reads is complete, :func:`evals.judge.opening_decided`), capped at ``max_new_tokens``;
    ``fixed``: always ``max_new_tokens`` (or end-of-sequence), HF ``generate``. A judge without a
    ``decided`` rule (the model judge) gets fixed-length responses either way."""
    prefix_cache: bool = True
    """Reuse the shared system/template prefix's KV cache in scoring and generation (exact)."""

    def __post_init__(self) -> None:
        if not self.domains:
            raise ValueError("domains is empty; pass at least one of " + ", ".join(DOMAINS))
        valid = DOMAINS + EXTRA_SETS
        for d in self.domains:
            if d not in valid:
                raise UnknownDomainError(f"unknown domain {d!r}; valid domains: {', '.join(valid)}")
        if self.over_refusal and OVER_REFUSAL in self.domains:
            raise ValueError("over_refusal is its own row; drop it from domains or set over_refusal=False")
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}; valid splits: {', '.join(SPLITS)}")
        if self.judge not in JUDGES:
            raise UnknownJudgeError(f"unknown judge {self.judge!r}; valid judges: {', '.join(JUDGES)}")
        if self.benign and "benign" in self.domains:
            raise ValueError("benign is its own row; drop it from domains or set benign=False")
        if self.generation not in GENERATION_MODES:
            raise ValueError(f"generation must be one of {', '.join(GENERATION_MODES)}, got {self.generation!r}")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if not self.raw:
            del d["raw"]  # keeps the cache keys of every chat-template evaluation as they were
        del d["prefix_cache"]  # exact either way: not part of what a result depends on
        return d


@dataclass
class DomainResult:
    """Refusal measurements of one domain (rates over all ``n`` prompts; ``None`` without generation)."""

    domain: str
    n: int
    refusal_rate: float | None
    ci_low: float | None
    """Wilson 95% interval of ``refusal_rate`` (never [0, 0] at 0/n)."""
    ci_high: float | None
    mean_logit: float
    incoherent_rate: float | None
    compliance_rate: float | None
    logit_ci_low: float = float("nan")
    logit_ci_high: float = float("nan")
    logit_refusal_rate: float = float("nan")
    """Fraction of prompts whose logit score is > 0 (refusal opening more likely than not)."""
    rebuttal_rate: float | None = None
    """Fraction of all prompts judged ``rebuttal`` (only ``rebut`` prompts can be)."""
    n_by_expected: dict[str, int] = field(default_factory=dict)
    """Prompts per suite ``expected`` value."""
    harmful_compliance_rate: float | None = None
    """``compliance`` on ``refuse`` prompts over the ``refuse`` prompts: the EMA measure. ``None``
    without generation or without ``refuse`` prompts."""
    harmful_compliance_ci_low: float | None = None
    """Wilson 95% interval of ``harmful_compliance_rate``."""
    harmful_compliance_ci_high: float | None = None
    by_expected: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per ``expected`` value: ``n``, ``mean_logit``, ``mean_logit_without_no`` and, with generation,
    the rate of each label, ``aligned`` (refusal or rebuttal) and its Wilson interval
    ``aligned_ci_low`` / ``aligned_ci_high``."""
    mean_logit_without_no: float | None = None
    """Mean logit score without "No" among the refusal tokens (the variant for loaded questions);
    ``None`` in reports saved before the variant existed."""
    logit_refusal_rate_without_no: float | None = None
    """Fraction of prompts whose ``without_no`` logit score is > 0."""
    logit_agreement: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    """``{variant: {target: {auroc, point_biserial, accuracy_at_zero, n_positive}}}``: how well each
    logit score variant (``standard``, ``without_no``) tracks the judge, for the targets ``refusal``
    (judged refusal) and ``aligned`` (judged refusal or rebuttal); empty without generation."""


@dataclass
class PromptRecord:
    """One prompt's measurements (no response text)."""

    id: str
    domain: str
    logit_score: float
    label: str | None = None
    reason: str | None = None
    expected: str = "refuse"
    """The prompt's suite ``expected`` value (records saved before it existed read as ``refuse``)."""
    logit_score_without_no: float | None = None
    """The logit score without "No" among the refusal tokens (``None`` in older records)."""


@dataclass
class EvalReport:
    """The result of :func:`evaluate`: one :class:`DomainResult` per domain plus over-refusal."""

    config: EvalConfig
    model: str
    state_id: str
    domains: dict[str, DomainResult]
    over_refusal: DomainResult | None
    timings: dict[str, float]
    judge: str | None = None
    benign: DomainResult | None = None
    """Refusal on harmless requests (``EvalConfig.benign``)."""
    utility: dict[str, Any] | None = None
    """``{"kl_to_base", "kl_ci", "kl_tokens", "n"}`` when the model carries an adapter, else ``None``."""
    records: list[PromptRecord] = field(default_factory=list, repr=False, compare=False)
    """Per-prompt records; saved separately (:meth:`save_records`), not part of the report JSON."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "model": self.model,
            "state_id": self.state_id,
            "judge": self.judge,
            "domains": {k: dataclasses.asdict(v) for k, v in self.domains.items()},
            "over_refusal": dataclasses.asdict(self.over_refusal) if self.over_refusal else None,
            "benign": dataclasses.asdict(self.benign) if self.benign else None,
            "utility": self.utility,
            "timings": dict(self.timings),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvalReport:
        return cls(
            config=EvalConfig.from_dict(d["config"]),
            model=d["model"],
            state_id=d["state_id"],
            judge=d.get("judge"),
            domains={k: DomainResult(**v) for k, v in d["domains"].items()},
            over_refusal=DomainResult(**d["over_refusal"]) if d.get("over_refusal") else None,
            benign=DomainResult(**d["benign"]) if d.get("benign") else None,
            utility=d.get("utility"),
            timings=dict(d["timings"]),
        )

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> EvalReport:
        return cls.from_dict(read_json(path))

    def save_records(self, path: str | Path) -> Path:
        """Write the per-prompt records as JSONL (belongs under ``results/``, not in git)."""
        return write_jsonl(path, (dataclasses.asdict(r) for r in self.records))

    def table(self) -> str:
        """A fixed-width text table: one row per domain, then benign and over-refusal, the KL to the
        base model (adapters), then timings."""
        rows = (list(self.domains.values()) + ([self.benign] if self.benign else [])
                + ([self.over_refusal] if self.over_refusal else []))
        width = max([len("domain")] + [len(r.domain) for r in rows])
        header = (f"{'domain':<{width}} {'n':>5}  {'refusal [95% CI]':<20} {'compl':>6} {'incoh':>6} {'rebut':>6}  "
                  f"{'harmful compl. [95% CI]':<26} {'logit [95% CI]':<22} {'logit>0':>7} {'no-No':>6}")
        lines = [f"model {self.model}  state {self.state_id}  judge {self.judge or '-'}", header, "-" * len(header)]
        for r in rows:
            if r is (self.benign or self.over_refusal) and len(lines) > 3:
                lines.append("-" * len(header))
            ref = (f"{r.refusal_rate:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}]" if r.refusal_rate is not None
                   else "-")
            compl = f"{r.compliance_rate:.2f}" if r.compliance_rate is not None else "-"
            incoh = f"{r.incoherent_rate:.2f}" if r.incoherent_rate is not None else "-"
            rebut = f"{r.rebuttal_rate:.2f}" if r.rebuttal_rate is not None else "-"
            n_refuse = r.n_by_expected.get("refuse", 0)
            harm = (f"{r.harmful_compliance_rate:.2f} [{r.harmful_compliance_ci_low:.2f}, "
                    f"{r.harmful_compliance_ci_high:.2f}] n={n_refuse}" if r.harmful_compliance_rate is not None
                    else "-")
            logit = f"{r.mean_logit:+.2f} [{r.logit_ci_low:+.2f}, {r.logit_ci_high:+.2f}]"
            no_no = f"{r.mean_logit_without_no:+.2f}" if r.mean_logit_without_no is not None else "-"
            lines.append(f"{r.domain:<{width}} {r.n:>5}  {ref:<20} {compl:>6} {incoh:>6} {rebut:>6}  {harm:<26} "
                         f"{logit:<22} {r.logit_refusal_rate:>7.2f} {no_no:>6}")
        if self.utility:
            u = self.utility
            lines.append(f"KL(base || model) on {u['n']} benign prompts, first {u['kl_tokens']} response tokens: "
                         f"{u['kl_to_base']:.4f} [{u['kl_ci'][0]:.4f}, {u['kl_ci'][1]:.4f}] nats")
        t = self.timings
        parts = [f"{k.removesuffix('_s')} {v:.1f} s" for k, v in t.items()
                 if k.endswith("_s") and not k.endswith("_per_s")]
        if t.get("logit_prompts_per_s"):
            parts.append(f"logit {t['logit_prompts_per_s']:.1f} prompts/s")
        lines.append("timings: " + ", ".join(parts))
        return "\n".join(lines)

    def expected_table(self) -> str:
        """Per domain and ``expected`` value: n, judged label rates and the aligned rate with its CI."""
        rows = list(self.domains.values()) + ([self.over_refusal] if self.over_refusal else [])
        header = (f"{'domain':<18} {'expected':<17} {'n':>4} {'refusal':>8} {'rebut':>6} {'compl':>6} {'incoh':>6}  "
                  f"{'aligned [95% CI]':<20} {'logit':>6} {'no-No':>6}")
        lines = [header, "-" * len(header)]
        for r in rows:
            for exp, v in r.by_expected.items():
                rates = (f"{v['refusal']:>8.2f} {v['rebuttal']:>6.2f} {v['compliance']:>6.2f} {v['incoherent']:>6.2f}  "
                         f"{v['aligned']:.2f} [{v['aligned_ci_low']:.2f}, {v['aligned_ci_high']:.2f}]    "
                         if "aligned" in v else f"{'-':>8} {'-':>6} {'-':>6} {'-':>6}  {'-':<20}")
                lines.append(f"{r.domain:<18} {exp:<17} {int(v['n']):>4} {rates}{v['mean_logit']:>+6.2f} "
                             f"{v['mean_logit_without_no']:>+6.2f}")
        return "\n".join(lines)

    def agreement_table(self) -> str:
        """Per domain: AUROC / accuracy at 0 of each logit variant against the judged labels."""
        header = f"{'domain':<18} {'target':<8} " + " ".join(f"{v + ' AUROC/acc':>22}" for v in LOGIT_VARIANTS)
        lines = [header, "-" * len(header)]
        rows = list(self.domains.values()) + ([self.over_refusal] if self.over_refusal else [])
        for r in rows:
            if not r.logit_agreement:
                continue
            for target in ("refusal", "aligned"):
                cells = []
                for variant in LOGIT_VARIANTS:
                    a = r.logit_agreement.get(variant, {}).get(target, {})
                    auc, acc = a.get("auroc"), a.get("accuracy_at_zero")
                    cells.append(f"{'-' if auc is None else f'{auc:.2f}':>13} / {'-' if acc is None else f'{acc:.2f}'}")
                lines.append(f"{r.domain:<18} {target:<8} " + " ".join(f"{c:>22}" for c in cells))
        return "\n".join(lines)
