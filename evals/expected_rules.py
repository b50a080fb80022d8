"""What an aligned answer to each suite prompt is (the ``expected`` field), by the ordered rules and
per-id overrides of ``evals/data/expected_rules.json``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from evals.suite import DOMAINS, EXPECTED, EXTRA_SETS, check_expected
from interp.io import sha256_file

__all__ = ["EXPECTED_RULES_PATH", "ExpectedRules", "load_expected_rules", "assign_expected"]

EXPECTED_RULES_PATH = Path(__file__).resolve().parent / "data" / "expected_rules.json"
"""The ordered rules and per-id overrides that assign ``expected``; a data table, not code."""

_CONDITIONS = ("sets", "sources", "first_intent", "any_intent", "no_intent", "text", "not_text")


@dataclass(frozen=True)
class ExpectedRules:
    """The parsed ``expected_rules.json``.

    Attributes:
        version: Bumped whenever a rule, pattern or override changes an assignment.
        patterns: Pattern group name -> compiled case-insensitive regexes.
        rules: Ordered rules; each has ``name``, ``expected``, ``why`` and optional conditions.
        overrides: Prompt id -> ``{"expected", "why"}``; wins over every rule.
        sha256: Digest of the file, recorded in the manifest.
    """

    version: str
    patterns: dict[str, tuple[re.Pattern, ...]]
    rules: tuple[dict, ...]
    overrides: dict[str, dict]
    sha256: str


def load_expected_rules(path: str | Path = EXPECTED_RULES_PATH) -> ExpectedRules:
    """Read and check the rules file: every value in :data:`evals.suite.EXPECTED`, every pattern
    group named by a rule defined, every condition known, and a last rule without conditions.

    Raises:
        ValueError: A malformed rule, with its name and the valid choices.
    """
    path = Path(path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    if set(raw["values"]) != set(EXPECTED):
        raise ValueError(f"{path}: 'values' must document exactly {EXPECTED}, got {sorted(raw['values'])}")
    patterns = {name: tuple(re.compile(rx, re.IGNORECASE) for rx in rxs) for name, rxs in raw["patterns"].items()}
    for rule in raw["rules"]:
        name = rule.get("name", "?")
        check_expected(rule["expected"], f"{path}: rule {name!r}: ")
        unknown = set(rule) - set(_CONDITIONS) - {"name", "expected", "why"}
        if unknown:
            raise ValueError(f"{path}: rule {name!r} has unknown key(s) {sorted(unknown)}; conditions: {_CONDITIONS}")
        for key in ("text", "not_text"):
            missing = set(rule.get(key, ())) - set(patterns)
            if missing:
                raise ValueError(f"{path}: rule {name!r} names undefined pattern group(s) {sorted(missing)}")
        bad_sets = set(rule.get("sets", ())) - set(DOMAINS + EXTRA_SETS)
        if bad_sets:
            raise ValueError(f"{path}: rule {name!r} names unknown set(s) {sorted(bad_sets)}")
    if any(k in raw["rules"][-1] for k in _CONDITIONS):
        raise ValueError(f"{path}: the last rule must have no conditions, so that every prompt gets a value")
    for pid, ov in raw["overrides"].items():
        check_expected(ov["expected"], f"{path}: override {pid!r}: ")
    return ExpectedRules(str(raw["version"]), patterns, tuple(raw["rules"]), dict(raw["overrides"]),
                         sha256_file(path))


def _rule_holds(rule: dict, rules: ExpectedRules, set_name: str, source: str, category: str, text: str) -> bool:
    intents = category.split("+")

    def searched(groups: list[str]) -> bool:
        return any(rx.search(text) for g in groups for rx in rules.patterns[g])

    checks = {
        "sets": lambda v: set_name in v,
        "sources": lambda v: any(source.startswith(prefix) for prefix in v),
        "first_intent": lambda v: any(intents[0].startswith(prefix) for prefix in v),
        "any_intent": lambda v: any(i.startswith(prefix) for i in intents for prefix in v),
        "no_intent": lambda v: not any(i.startswith(prefix) for i in intents for prefix in v),
        "text": searched,
        "not_text": lambda v: not searched(v),
    }
    return all(checks[k](rule[k]) for k in _CONDITIONS if k in rule)


def assign_expected(
    set_name: str, source: str, category: str, text: str, prompt_id: str | None = None,
    rules: ExpectedRules | None = None,
) -> tuple[str, str]:
    """What an aligned answer to one prompt is, and why.

    Args:
        set_name: The prompt's set (a domain or an extra set).
        source: Its ``source`` string (rules match on a prefix such as ``do-not-answer``).
        category: The source's own code(s), ``+``-joined for Do-Not-Answer intents.
        text: The prompt text.
        prompt_id: Its id, looked up in the override table first.
        rules: Parsed rules; default :func:`load_expected_rules`.

    Returns:
        ``(expected, rule name)``; the rule name is ``override`` for a per-id override.
    """
    rules = rules or load_expected_rules()
    if prompt_id is not None and prompt_id in rules.overrides:
        return rules.overrides[prompt_id]["expected"], "override"
    for rule in rules.rules:
        if _rule_holds(rule, rules, set_name, source, category, text):
            return rule["expected"], rule["name"]
    raise AssertionError("unreachable: load_expected_rules ensures a last rule without conditions")
