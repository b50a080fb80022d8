"""The GPU check's code path on CPU with tiny configs of the same architectures (no GPU figures here)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import gpu_check


def test_gpu_check_code_path_on_cpu(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--steps", "2", "--gradient-checkpointing",
                           "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["measured_peak_tflops"] > 0
    assert [r["architecture"] for r in res["results"]] == list(gpu_check.ARCHITECTURES)
    for r in res["results"]:
        assert set(r["stages"]) == {"logit score", "generate", "activations", "npo+retain", "re-evaluation"}
        for stage in r["stages"].values():
            assert stage["tokens_per_s"] > 0 and 0 < stage["mfu"] and math.isfinite(stage["mfu"])
        assert r["stages"]["re-evaluation"]["mean_abs_score_change"] > 0  # the NPO steps changed the model
    assert "MFU" in capsys.readouterr().out


def test_gpu_check_refuses_7b_shapes_on_cpu():
    with pytest.raises(ValueError, match="needs a GPU"):
        gpu_check.CheckConfig(device="cpu")
