"""JSON configs (round trip, field-doc help, validation) and cached stage directories."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from interp.config import JsonConfig, add_config_arguments, config_from_args, field_docs
from interp.io import read_json
from interp.runs import Stage, run_dir, write_run


@dataclass
class Inner(JsonConfig):
    """Inner settings."""

    width: int = 3
    """How wide."""


@dataclass
class Outer(JsonConfig):
    """Outer settings."""

    name: str = "x"
    """A name."""
    layers: tuple[int, ...] = (1, 2)
    """Which layers."""
    limit: int | None = None
    """Optional cap."""
    inner: Inner = field(default_factory=Inner)
    """Nested config."""
    flag: bool = False
    """A switch."""


def test_round_trip(tmp_path):
    cfg = Outer(name="y", layers=(3,), limit=5, inner=Inner(7), flag=True)
    path = cfg.save(tmp_path / "c.json")
    assert Outer.load(path) == cfg
    assert Outer.from_dict(cfg.to_dict()).hash() == cfg.hash()
    assert Outer().hash() != cfg.hash()


def test_unknown_field_is_named():
    with pytest.raises(ValueError, match="unknown field.*'bogus'"):
        Outer.from_dict({"bogus": 1})


def test_help_comes_from_field_docs():
    assert field_docs(Outer)["layers"] == "Which layers."
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Outer)
    assert "Which layers." in parser.format_help()
    args = parser.parse_args(["--layers", "4", "5", "--flag"])
    cfg = config_from_args(Outer, args)
    assert cfg.layers == (4, 5) and cfg.flag and cfg.name == "x"


def test_stage_completes_and_rejects_other_keys(tmp_path):
    stage = Stage(tmp_path, "eval", {"a": 1})
    assert not stage.done
    path = stage.open()
    (path / "x.txt").write_text("partial")
    assert not stage.done, "a stage without DONE.json is unfinished and will be recomputed"
    stage.complete({"n": 3})
    assert stage.done and Stage(tmp_path, "eval", {"a": 1}).done
    assert not Stage(tmp_path, "eval", {"a": 2}).done


def test_run_dir_carries_hash_and_commit(tmp_path):
    cfg = Outer()
    path = run_dir(tmp_path, "h0", cfg)
    assert path.parent.name == "h0" and path.name.startswith(cfg.hash(8)[:8])
    write_run(path, cfg, {"x": 1})
    assert (tmp_path / "h0" / "latest" / "metrics.json").exists()


def test_help_keeps_a_percent_sign_from_field_docs():
    @dataclass
    class Pct(JsonConfig):
        ci: float = 0.95
        """Coverage of the 95% interval."""

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Pct)
    assert "95% interval" in parser.format_help()


@pytest.fixture
def source_tree(tmp_path, monkeypatch):
    """A copy of the library's source and suite data that a test may edit, standing in for the repo."""
    import shutil

    import interp.runs as runs

    root = tmp_path / "src"
    for pkg in runs.LIBRARY:
        shutil.copytree(runs._ROOT / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(runs, "_ROOT", root)
    monkeypatch.setattr(runs, "_announced", set())
    return root


@pytest.mark.parametrize("edited,stage,recomputes", [
    ("evals/judge.py", "eval", True),          # a fixed judge: evaluations are redone
    ("evals/judge.py", "unlearn", True),       # ... and so are forget sets built with it
    ("evals/keyword_judge.py", "eval", True),  # the judge's concept modules count as the judge
    ("evals/coherence.py", "unlearn", True),
    ("evals/data/suite/manifest.json", "eval", True),   # a rebuilt suite
    ("evals/data/suite/manifest.json", "activations", True),
    ("evals/stats.py", "eval", False),         # code the stage does not run leaves it cached
    ("interp/activations.py", "eval", False),
    ("training/lora.py", "eval", True),         # how an adapter is merged for measurement
    ("training/concept_gate.py", "eval_sets", True),  # ... or gated
    ("training/lora.py", "activations", True),
    ("training/step.py", "eval", False),        # training code leaves measurements of saved adapters cached
    ("evals/stats.py", "some_experiment_stage", True),  # unlisted stages key on the whole library
])
def test_code_or_suite_change_recomputes_affected_stages(source_tree, tmp_path, capsys, edited, stage, recomputes):
    results = tmp_path / "results"
    key = {"model": "m", "eval": {"limit": 4}}
    first = Stage(results, stage, key)
    first.open()
    first.complete()
    assert Stage(results, stage, key).done
    with (source_tree / edited).open("a") as f:
        f.write("\n# edited\n")
    again = Stage(results, stage, key)
    assert again.done is (not recomputes)
    if recomputes:
        assert again.path != first.path and first.path.exists()  # the old result is kept, not reused
        again.open()
        Stage(results, stage, {**key, "other": 1}).open()
        err = capsys.readouterr().err
        assert err.count(f"stage {stage}: the code or suite that computes it changed") == 1  # said once


def test_config_flags_given_repeat_exactly_the_options_passed():
    from interp.config import config_flags_given

    @dataclass
    class Run(JsonConfig):
        max_new_tokens: int = 8
        seeds: tuple[int, ...] = (0,)
        raw_prompts: bool = False
        lr: float = 3e-5

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Run)
    args = parser.parse_args(["--max-new-tokens", "4", "--seeds", "1", "2", "--no-raw-prompts", "--lr", "1e-4"])
    words = config_flags_given(Run, args, skip=("lr",))
    assert words == ["--max-new-tokens", "4", "--seeds", "1", "2", "--no-raw-prompts"]
    again = config_from_args(Run, parser.parse_args(words))
    assert again == Run(max_new_tokens=4, seeds=(1, 2), raw_prompts=False)
    assert config_flags_given(Run, parser.parse_args([])) == []


def test_a_completed_stage_records_what_it_cost(tmp_path):
    stage = Stage(tmp_path / "results", "eval", {"model": "m"})
    stage.open()
    stage.complete({"condition": "base"})
    done = read_json(stage.path / "DONE.json")
    cost = done["cost"]
    assert cost["seconds"] >= 0 and cost["peak_rss_gb"] > 0.01 and cost["rss_gb"] > 0.01
    assert cost["rss_gb"] <= cost["peak_rss_gb"] + 0.05  # now cannot exceed the peak so far
    assert done["condition"] == "base" and Stage(tmp_path / "results", "eval", {"model": "m"}).done


def test_stage_key_reserves_code_entry_and_names_unknown_modules(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        Stage(tmp_path, "eval", {"_code": "x"})
    with pytest.raises(ValueError, match="no source file"):
        Stage(tmp_path, "mine", {"a": 1}, code=("interp.no_such_module",))
