"""Resuming an interrupted run reproduces the uninterrupted loss trajectory exactly (CPU, fp32), both
after an injected exception and after a real SIGKILL of a training subprocess; a checkpoint of a
different config is refused with a diff."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import Interrupted, interrupted_and_resumed, make_tiny_loaded, stop_after

from training.checkpoint import latest_checkpoint
from training.config import UnlearnConfig
from training.data import DataSet, Example
from training.trainer import IncompatibleCheckpointError, UnlearnData, unlearn

TESTS = Path(__file__).resolve().parent


pytestmark = pytest.mark.usefixtures("one_thread")


def make_data() -> UnlearnData:
    forget = [Example(f"f{i}", "cybersecurity", f"How do I break into system {i}?",
                      f"I'm sorry, but I can't help with system {i}.", "refusal") for i in range(5)]
    retain = [Example(f"r{i}", "privacy", f"Where does person {i} live?", "I cannot share that.", "refusal")
              for i in range(3)]
    return UnlearnData(DataSet(forget), DataSet(retain))


def make_cfg(**kw) -> UnlearnConfig:
    # dropout > 0 and a cosine schedule make the RNG and scheduler state part of what must be restored
    base = dict(model="tiny-qwen2", dtype="float32", n_forget=5, batch_size=2, retain_batch_size=2, steps=7,
                checkpoint_every=2, lr=5e-3, lora_rank=4, lora_dropout=0.1, retain_mode="ce",
                scheduler="cosine", warmup_steps=1)
    return UnlearnConfig(**{**base, **kw})


def losses(history):
    return [(r["step"], r["loss"], r["losses"]["forget"], r["losses"]["retain"]) for r in history]


def test_resume_after_exception_matches_uninterrupted(tmp_path):
    cfg = make_cfg()
    full = unlearn(make_tiny_loaded("qwen2"), cfg, tmp_path / "full", progress=False, data=make_data())
    # Step 5 is logged but not checkpointed: the run resumes from step 4.
    resumed = interrupted_and_resumed(cfg, make_data, tmp_path / "interrupted", stop_at=5)
    assert resumed.resumed_from == 4
    for (s1, *a), (s2, *b) in zip(losses(full.history), losses(resumed.history), strict=True):
        assert s1 == s2
        assert a == pytest.approx(b, abs=1e-6), f"step {s1}"
    assert resumed.adapter_id == full.adapter_id  # identical final weights


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    cfg = make_cfg(steps=6)
    run = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, sys
        import torch
        sys.path.insert(0, {str(TESTS)!r})
        torch.set_num_threads(1)
        from conftest import Interrupted, interrupted_and_resumed, make_tiny_loaded, stop_after
        from test_training_resume import make_cfg, make_data
        from training.trainer import unlearn

        def kill_at_3(step, out):
            if step == 3:
                os.kill(os.getpid(), signal.SIGKILL)

        unlearn(make_tiny_loaded("qwen2"), make_cfg(steps=6), {str(run)!r}, progress=False, data=make_data(),
                on_step=kill_at_3)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert latest_checkpoint(run).name == "step-000002"
    resumed = unlearn(make_tiny_loaded("qwen2"), cfg, run, progress=False, data=make_data())
    full = unlearn(make_tiny_loaded("qwen2"), cfg, tmp_path / "full", progress=False, data=make_data())
    assert resumed.resumed_from == 2
    assert [r["step"] for r in resumed.history] == list(range(1, 7))
    for (s1, *a), (s2, *b) in zip(losses(full.history), losses(resumed.history), strict=True):
        assert a == pytest.approx(b, abs=1e-6), f"step {s1}"
    assert resumed.adapter_id == full.adapter_id


def test_resume_with_other_config_is_refused_with_diff(tmp_path):
    cfg = make_cfg(steps=4)
    stop = stop_after(3)
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        unlearn(make_tiny_loaded("qwen2"), cfg, run, progress=False, data=make_data(), on_step=stop)
    with pytest.raises(IncompatibleCheckpointError) as err:
        unlearn(make_tiny_loaded("qwen2"), cfg.replace(lr=1e-3, beta=0.2), run, progress=False, data=make_data())
    msg = str(err.value)
    assert "lr: 0.005 -> 0.001" in msg and "beta: 0.1 -> 0.2" in msg and "steps" not in msg
    # where it is written and how often it checkpoints do not change the trajectory: resumable
    ok = unlearn(make_tiny_loaded("qwen2"), cfg.replace(checkpoint_every=1), run, progress=False, data=make_data())
    assert ok.resumed_from == 2
    # different data under the same config is refused too
    other = make_data()
    other.forget.examples[0] = Example("f0", "cybersecurity", "changed", "I can't.", "refusal")
    with pytest.raises(Interrupted):
        unlearn(make_tiny_loaded("qwen2"), cfg, tmp_path / "run2", progress=False, data=make_data(), on_step=stop)
    with pytest.raises(IncompatibleCheckpointError, match="different data"):
        unlearn(make_tiny_loaded("qwen2"), cfg, tmp_path / "run2", progress=False, data=other)
