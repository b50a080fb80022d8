"""JSON configs (round trip, field-doc help, validation) and cached stage directories."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from interp.config import JsonConfig, add_config_arguments, config_from_args, field_docs
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
