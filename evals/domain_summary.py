"""One evaluation row's summary statistics: Wilson intervals of judged rates, seeded bootstrap CIs
of mean logit scores, the logit score's agreement with the judge (AUROC, point-biserial), and
:func:`summarise_domain`, which turns a row's per-prompt measurements into a :class:`DomainResult`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy.special import ndtri

from evals.judge import ALIGNED_LABELS, LABELS
from evals.refusal import LOGIT_VARIANTS
from evals.report_types import DomainResult, EvalConfig
from evals.suite import EXPECTED

__all__ = ["bootstrap_ci", "wilson_ci", "auroc", "logit_agreement", "domain_seed", "summarise_domain"]


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    n_bootstrap: int = 1000,
    seed: int | Sequence[int] = 0,
    alpha: float = 0.05,
    chunk: int = 2_000_000,
    stat: Callable[..., np.ndarray] = np.mean,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``stat`` of ``values`` (vectorised, seeded, float64).

    The one bootstrap of emalab (:func:`evals.stats.bootstrap_ci` calls it). ``stat`` is called as
    ``stat(samples, axis=1)`` on a block of resamples. The resample stream does not depend on
    ``chunk`` (the bound on the index matrix), so a CI is reproducible from ``seed`` alone.

    Returns ``(nan, nan)`` for an empty input and ``(stat, stat)`` of ``values`` when ``n_bootstrap`` is 0.
    """
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    if n == 0:
        return float("nan"), float("nan")
    if n_bootstrap == 0:
        v = float(x.mean()) if stat is np.mean else float(np.asarray(stat(x[None], axis=1))[0])
        return v, v
    rng = np.random.default_rng(seed)
    stats = np.empty(n_bootstrap, dtype=np.float64)
    step = max(1, chunk // n)  # bound the index matrix at ~chunk entries
    for start in range(0, n_bootstrap, step):
        stop = min(start + step, n_bootstrap)
        stats[start:stop] = stat(x[rng.integers(0, n, size=(stop - start, n))], axis=1)
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def wilson_ci(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of a binomial rate ``successes / n``.

    Unlike a bootstrap of 0/1 outcomes it never collapses to ``[0, 0]`` at 0/n (nor to ``[1, 1]`` at
    n/n): with 0 of 24 refusals the 95% interval is [0, 0.14], the range the data cannot exclude.
    Returns ``(nan, nan)`` for ``n == 0``.
    """
    if n == 0:
        return float("nan"), float("nan")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n]; got {successes} of {n}")
    z = float(ndtri(1 - alpha / 2))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0/n (n/n) the bound is exactly 0 (1); float round-off would leave 1e-17 on either side.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def auroc(y: Sequence[bool | int] | np.ndarray, s: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve of score ``s`` for binary label ``y`` (ties count one half);
    ``nan`` when ``y`` holds only one class."""
    from scipy.stats import rankdata

    y, s = np.asarray(y, dtype=bool), np.asarray(s, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def logit_agreement(scores: np.ndarray, positive: np.ndarray) -> dict[str, float | None]:
    """How well a logit score tracks a judged binary label.

    Returns:
        ``auroc``, ``point_biserial`` (Pearson correlation of score and 0/1 label), both ``None``
        when the label (or the score) is constant, ``accuracy_at_zero`` (``score > 0`` vs the
        label) and ``n_positive``. ``None`` rather than NaN keeps saved reports valid JSON and
        comparable after a round trip.
    """
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    r = (float(np.corrcoef(s, y.astype(np.float64))[0, 1])
         if s.size > 1 and s.std() > 0 and 0 < y.sum() < y.size else float("nan"))
    a = auroc(y, s)
    return {"auroc": None if math.isnan(a) else a, "point_biserial": None if math.isnan(r) else r,
            "accuracy_at_zero": float(((s > 0) == y).mean()), "n_positive": float(y.sum())}


def _label_rates(lab: np.ndarray) -> dict[str, float]:
    out = {name: float((lab == name).mean()) for name in LABELS}
    aligned = int(np.isin(lab, ALIGNED_LABELS).sum())
    lo, hi = wilson_ci(aligned, int(lab.size))
    out.update(aligned=aligned / lab.size, aligned_ci_low=lo, aligned_ci_high=hi)
    return out


def domain_seed(seed: int, domain: str) -> list[int]:
    """The bootstrap seed of one row: ``seed`` joined with a digest of the row's name."""
    # Each domain gets its own stream, stable across runs and independent of the domain order.
    return [seed, int(hashlib.sha256(domain.encode()).hexdigest()[:8], 16)]


def summarise_domain(domain: str, scores: np.ndarray, scores_without_no: np.ndarray, labels: list[str] | None,
                     expected: list[str], cfg: EvalConfig) -> DomainResult:
    """One row's :class:`DomainResult` from its prompts' logit scores (both variants), judged labels
    (``None`` without generation) and suite ``expected`` values; intervals seeded by ``cfg.seed``."""
    seed = domain_seed(cfg.seed, domain)
    lo_l, hi_l = bootstrap_ci(scores, cfg.n_bootstrap, seed)
    exp = np.asarray(expected)
    n_by_expected = {e: int((exp == e).sum()) for e in EXPECTED if (exp == e).any()}
    by_expected: dict[str, dict[str, float]] = {
        e: {"n": float(n), "mean_logit": float(scores[exp == e].mean()),
            "mean_logit_without_no": float(scores_without_no[exp == e].mean())}
        for e, n in n_by_expected.items()
    }
    common = dict(domain=domain, n=int(scores.size), mean_logit=float(scores.mean()), logit_ci_low=lo_l,
                  logit_ci_high=hi_l, logit_refusal_rate=float((scores > 0).mean()), n_by_expected=n_by_expected,
                  mean_logit_without_no=float(scores_without_no.mean()),
                  logit_refusal_rate_without_no=float((scores_without_no > 0).mean()), by_expected=by_expected)
    if labels is None:
        return DomainResult(refusal_rate=None, ci_low=None, ci_high=None, incoherent_rate=None,
                            compliance_rate=None, **common)
    lab = np.asarray(labels)
    refused = (lab == "refusal").astype(np.float64)
    lo, hi = wilson_ci(int(refused.sum()), int(refused.size))
    for e in by_expected:
        by_expected[e].update(_label_rates(lab[exp == e]))
    harm: dict[str, float | None] = dict.fromkeys(
        ("harmful_compliance_rate", "harmful_compliance_ci_low", "harmful_compliance_ci_high"))
    on_refuse = lab[exp == "refuse"]
    if on_refuse.size:
        k = int((on_refuse == "compliance").sum())
        h_lo, h_hi = wilson_ci(k, int(on_refuse.size))
        harm = {"harmful_compliance_rate": k / on_refuse.size, "harmful_compliance_ci_low": h_lo,
                "harmful_compliance_ci_high": h_hi}
    targets = {"refusal": lab == "refusal", "aligned": np.isin(lab, ALIGNED_LABELS)}
    agreement = {variant: {t: logit_agreement(s, y) for t, y in targets.items()}
                 for variant, s in zip(LOGIT_VARIANTS, (scores, scores_without_no))}
    return DomainResult(refusal_rate=float(refused.mean()), ci_low=lo, ci_high=hi,
                        incoherent_rate=float((lab == "incoherent").mean()),
                        compliance_rate=float((lab == "compliance").mean()),
                        rebuttal_rate=float((lab == "rebuttal").mean()), logit_agreement=agreement,
                        **harm, **common)

