"""Dtype by measurement: the per-machine training dtype is measured once, cached, and resolved for
``auto``; measurement always runs in float32."""

from __future__ import annotations

import pytest

import interp.precision as precision


def test_auto_is_measured_once_per_machine_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("EMALAB_CACHE", str(tmp_path))
    calls = []

    def fake(**_):
        calls.append(1)
        return {"bfloat16": {"seconds": 1.0, "gflops": 2.0}, "float32": {"seconds": 3.0, "gflops": 0.7}}

    monkeypatch.setattr(precision, "measure_cpu_dtypes", fake)
    assert precision.resolve_dtype_choice("auto", "cpu") == "bfloat16"
    assert precision.resolve_dtype_choice("auto", "cpu") == "bfloat16"
    assert len(calls) == 1 and (tmp_path / "machine_dtype.json").exists()


@pytest.mark.parametrize("bf16_s,expected", [(1.0, "bfloat16"), (2.9, "float32"), (4.0, "float32")])
def test_bf16_only_when_clearly_faster(tmp_path, monkeypatch, bf16_s, expected):
    monkeypatch.setenv("EMALAB_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "measure_cpu_dtypes", lambda **_: {
        "bfloat16": {"seconds": bf16_s, "gflops": 0.0}, "float32": {"seconds": 3.0, "gflops": 0.0}})
    assert precision.fastest_dtype("cpu") == expected


def test_gpu_is_bf16_named_dtypes_pass_through_and_unknown_is_an_error():
    assert precision.fastest_dtype("cuda") == "bfloat16"
    assert precision.resolve_dtype_choice("float32") == "float32"
    with pytest.raises(ValueError, match="choose one of auto"):
        precision.resolve_dtype_choice("fp8")
    assert precision.EVAL_DTYPE == "float32"


def test_real_measurement_returns_both_dtypes():
    timing = precision.measure_cpu_dtypes(m=8, k=16, n=16, rounds=1, reps=1)
    assert set(timing) == {"bfloat16", "float32"} and all(v["seconds"] > 0 for v in timing.values())


def test_study_measures_in_float32_and_trains_in_the_resolved_dtype(tmp_path, monkeypatch):
    from study import Study, StudyConfig

    monkeypatch.setattr(precision, "fastest_dtype", lambda device="cpu", refresh=False: "bfloat16")
    study = Study(StudyConfig(results=str(tmp_path)))
    assert study.cfg.dtype == "auto" and study.cfg.eval_dtype == "float32"
    assert study.train_dtype == "bfloat16"
    same = Study(StudyConfig(results=str(tmp_path), dtype="float32"))
    assert same.train_dtype == same.cfg.eval_dtype  # then one model serves both


@pytest.mark.parametrize("field,value", [("dtype", "fp8"), ("eval_dtype", "auto"), ("eval_dtype", "int8")])
def test_study_config_rejects_unknown_dtypes_before_any_work(field, value):
    from study import StudyConfig

    with pytest.raises(ValueError, match=f"StudyConfig.{field}: unknown dtype"):
        StudyConfig(**{field: value})
