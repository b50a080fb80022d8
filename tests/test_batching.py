"""Batch sizes from a memory budget: the per-row estimate grows with length and training, the batch
with the budget, at least one row fits or the error names the fix, and the CPU cap holds."""

from __future__ import annotations

import pytest
import torch

from interp.batching import (
    CPU_MAX_BATCH,
    MemoryBudgetError,
    auto_batch_size,
    check_batch_size,
    memory_budget,
    resolve_batch_size,
    row_bytes,
)
from study import Study, StudyConfig


def test_row_bytes_grow_with_length_training_and_logits(tiny_qwen):
    cfg = tiny_qwen.model.config
    short, long = row_bytes(cfg, 16), row_bytes(cfg, 256)
    assert 0 < short < long
    assert row_bytes(cfg, 64, training=True) > row_bytes(cfg, 64)
    assert row_bytes(cfg, 64, logits_positions=32) > row_bytes(cfg, 64)
    assert row_bytes(cfg, 64, kv_cache=True) > row_bytes(cfg, 64)
    assert row_bytes(cfg, 64, torch.float32) > row_bytes(cfg, 64, torch.bfloat16)


def test_auto_batch_size_is_monotone_and_at_least_one(tiny_qwen):
    per_row = row_bytes(tiny_qwen.model.config, 128, torch.float32)
    sizes = [auto_batch_size(tiny_qwen, 128, budget_bytes=k * per_row, max_batch=10_000) for k in (1, 3, 10, 100)]
    assert sizes == [1, 3, 10, 100]  # exactly budget // per_row, below the cap
    by_len = [auto_batch_size(tiny_qwen, n, budget_bytes=200 * per_row, max_batch=10_000) for n in (32, 128, 512)]
    assert by_len == sorted(by_len, reverse=True) and by_len[-1] >= 1
    train = auto_batch_size(tiny_qwen, 128, budget_bytes=200 * per_row, training=True, max_batch=10_000)
    assert 1 <= train < 200


def test_cpu_default_budget_is_capped(tiny_qwen):
    assert memory_budget("cpu") > 0
    assert 1 <= auto_batch_size(tiny_qwen, 64) <= CPU_MAX_BATCH  # tiny model, GBs of RAM: the cap decides


def test_one_row_that_does_not_fit_names_the_fix(tiny_qwen):
    with pytest.raises(MemoryBudgetError, match="shorten the rows") as err:
        auto_batch_size(tiny_qwen, 512, budget_bytes=1000, training=True)
    assert "gradient_checkpointing" in str(err.value)
    with pytest.raises(ValueError, match="seq_len"):
        auto_batch_size(tiny_qwen, 0)


def test_batch_size_settings(tiny_qwen):
    assert check_batch_size(8) == 8 and check_batch_size("12") == 12 and check_batch_size("auto") == "auto"
    for bad in (0, -1, "big", 2.5, True):
        with pytest.raises(ValueError, match="'auto'"):
            check_batch_size(bad)
    assert resolve_batch_size(5, tiny_qwen, 64) == 5
    assert 1 <= resolve_batch_size("auto", tiny_qwen, 64) <= CPU_MAX_BATCH


def test_study_keeps_its_default_and_resolves_auto(tiny_qwen):
    assert StudyConfig().to_dict()["eval_batch_size"] == 16  # the default CPU run's stage keys are unchanged
    study = Study(StudyConfig())
    assert study.eval_batch_size == 16 and study.eval_config().batch_size == 16
    auto = Study(StudyConfig(eval_batch_size="auto"), _lm=tiny_qwen)
    n = auto.eval_batch_size
    assert 1 <= n <= CPU_MAX_BATCH and auto.eval_config().batch_size == n
    assert auto.run_record()["eval_batch_size"] == n  # recorded with each stage
    assert StudyConfig.from_dict(StudyConfig(eval_batch_size="auto").to_dict()).eval_batch_size == "auto"
    with pytest.raises(ValueError, match="eval_batch_size"):
        StudyConfig(eval_batch_size=0)
