"""Architecture rules of the house style, checked on the source tree."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("interp", "evals", "study", "probes", "training")
MAX_MODULE_LINES = 400
"""A library module longer than this holds more than one concept and is split by concept (issue #19)."""
APP = ("experiments", "figures", "emalab", "benchmarks", "tests")


def _py_files(*packages):
    for pkg in packages:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("path", list(_py_files(*LIBRARY)), ids=lambda p: str(p.relative_to(ROOT)))
def test_library_never_imports_the_app_layer(path):
    assert not _imports(path) & set(APP), f"{path} imports {_imports(path) & set(APP)}"


def _code_only(path: Path) -> str:
    """The source with strings and comments removed (docstrings may name module paths)."""
    toks = tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
    return "".join(t.string for t in toks if t.type in (tokenize.NAME, tokenize.OP, tokenize.NUMBER))


def test_module_paths_only_in_the_adapter():
    pattern = re.compile(r"model\.model\.|\bmodel\.layers\[|embed_tokens|self_attn\.o_proj|mlp\.down_proj")
    offenders = [str(p.relative_to(ROOT)) for p in _py_files(*LIBRARY, *APP[:-1])
                 if p.name != "adapter.py" and pattern.search(_code_only(p))]
    assert not offenders, f"module paths outside interp/adapter.py: {offenders}"


def test_nnsight_traces_live_in_interp():
    offenders = [str(p.relative_to(ROOT)) for p in _py_files("probes", "training", *APP[:-1])
                 if re.search(r"\.trace\(|import nnsight|from nnsight", p.read_text(encoding="utf-8"))]
    assert not offenders, f"nnsight used outside interp: {offenders}"


def test_library_modules_declare_all():
    missing = [str(p.relative_to(ROOT)) for p in _py_files(*LIBRARY)
               if p.name != "__init__.py" and "__all__" not in p.read_text(encoding="utf-8")]
    assert not missing, f"library modules without __all__: {missing}"


def test_library_modules_stay_small():
    long = {str(p.relative_to(ROOT)): n for p in _py_files(*LIBRARY)
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"library modules over {MAX_MODULE_LINES} lines (split them by concept): {long}"


def test_experiments_stay_thin():
    """An experiment reads as its hypothesis; its machinery belongs in the library (study, evals, ...)."""
    long = {p.name: n for p in _py_files("experiments")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 150}
    assert not long, f"experiments over 150 lines (move the machinery into the library): {long}"


def _module_level_imports(path: Path) -> set[str]:
    """Full module names imported at module level (not inside functions)."""
    out = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize("path", list(_py_files("interp")), ids=lambda p: str(p.relative_to(ROOT)))
def test_interp_imports_without_probes_or_training(path):
    upward = {m for m in _module_level_imports(path) if m.split(".")[0] in ("evals", "study", "probes", "training")}
    assert not upward, f"{path} imports {upward} at module level; interp is the bottom layer"


def test_experiments_never_import_each_other():
    offenders = {}
    for p in _py_files("experiments"):
        names = {m for m in _module_level_imports(p) if m.startswith("experiments.")}
        others = {m for m in names if m.split(".")[1] != p.stem}
        if others:
            offenders[p.name] = sorted(others)
    assert not offenders, f"experiments import other experiments (share through study): {offenders}"


@pytest.mark.parametrize("path", list(_py_files("evals")), ids=lambda p: str(p.relative_to(ROOT)))
def test_evals_builds_on_interp_only(path):
    upward = _imports(path) & {"study", "probes", "training"}
    assert not upward, f"{path} imports {upward}; evals measures behaviour and builds on interp alone"


def test_experiments_import_public_names_only():
    offenders = {}
    for p in _py_files("experiments"):
        private = sorted(m for m in _module_level_imports(p) if m.rsplit(".", 1)[-1].startswith("_")
                         and m.rsplit(".", 1)[-1] != "__future__")
        if private:
            offenders[p.name] = private
    assert not offenders, f"experiments import private names: {offenders}"
