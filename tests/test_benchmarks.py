"""Smoke tests of every benchmark on tiny models with one repetition: the result schema, the
correctness checks they carry, the 7B script's code path (``--tiny``), and BENCHMARKS.md rendering.
Timings are never asserted."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_loaded

from benchmarks import activations, e2e, gpu_7b, probing, refusal, unlearn
from benchmarks.harness import (
    SCHEMA,
    BenchConfig,
    BenchResult,
    Variant,
    machine_name,
    ratio,
    read_results,
    time_alternating,
    write_result,
)
from benchmarks.report import render_markdown, write_markdown

TINY = dict(reps=1, warmup=0, n_prompts=6, batch_size=4, train_batch=3, train_response_tokens=8, max_new_tokens=4,
            probe_per_domain=4, probe_folds=2, tiny=True, gpu_batch=4, gpu_seq=40, gpu_micro_batch=2,
            cache_activations=False)


@pytest.fixture(scope="module")
def lm():
    return make_tiny_loaded("qwen2")


@pytest.fixture
def cfg(tmp_path):
    return BenchConfig(**TINY, out_dir=str(tmp_path / "results"), machine="test-machine")


def _check_schema(result: BenchResult, variants: set[str], ratios: set[str]) -> dict:
    d = json.loads(json.dumps(result.to_dict()))  # JSON-serialisable all the way down
    assert d["schema"] == SCHEMA and d["status"] == "measured"
    assert set(d["variants"]) == variants and set(d["ratios"]) == ratios
    for v in d["variants"].values():
        assert len(v["times_s"]) == 1 and v["median_s"] > 0 and v["min_s"] > 0
        assert v["throughput"] and all(x > 0 for x in v["throughput"].values())
    for r in d["ratios"].values():
        assert r["ratio"] > 0 and r["paired_ratio"] > 0
        if "target" in r:
            assert isinstance(r["met"], bool)
    env = d["env"]
    assert {"machine", "versions", "git_commit", "timestamp"} <= set(env)
    assert {"torch", "transformers", "peft", "nnsight"} <= set(env["versions"])
    assert env["machine"]["cpu_count"] >= 1
    return d


def test_activations_benchmark(lm, cfg):
    d = _check_schema(activations.run(lm, cfg), {"emalab", "hf_hidden_states", "torch_hooks"},
                      {"emalab/hf_hidden_states", "emalab/torch_hooks"})
    # The three paths return the same activations (fp32 tiny model).
    assert d["checks"]["max_rel_diff_vs_hooks"] < 1e-5
    assert d["checks"]["max_rel_diff_vs_hidden_states_excl_last_layer"] < 1e-5
    assert d["variants"]["emalab"]["work"]["prompts"] == cfg.n_prompts


def test_refusal_benchmark(lm, cfg):
    d = _check_schema(refusal.run(lm, cfg), {"logit_score", "generate_judge"}, {"logit_score/generate_judge"})
    assert 0.0 <= d["checks"]["agreement_logit_vs_judge"] <= 1.0
    assert d["variants"]["generate_judge"]["judge_median_s"] >= 0


def test_unlearn_benchmark_restores_the_model(lm, cfg):
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    d = _check_schema(unlearn.run(lm, cfg), {"npo_precomputed", "npo_live_ref", "sft_peft_torch"},
                      {"npo_precomputed/sft_peft_torch", "npo_live_ref/sft_peft_torch", "npo_precomputed/npo_live_ref"})
    assert d["checks"]["first_npo_loss"] == pytest.approx(d["checks"]["expected_first_npo_loss"], rel=1e-5)
    assert not hasattr(lm.model, "peft_config")  # adapter detached
    after = lm.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_probes_benchmark_matches_the_naive_baseline():
    torch.manual_seed(0)
    # Planted data: domain c is shifted along its own direction, benign is not.
    d_model, n_layers = 8, 3
    harmful = {f"d{c}": torch.randn(10, n_layers, d_model) + 8.0 * torch.eye(d_model)[c] for c in range(3)}
    benign = torch.randn(20, n_layers, d_model)
    variants, ratios, checks = probing.measure(harmful, benign, n_folds=2, reps=1, warmup=0)
    assert set(variants) == {"emalab", "naive_sklearn"} and set(ratios) == {"emalab/naive_sklearn"}
    assert checks["accuracy_within_tolerance"] and checks["accuracy_mean_abs_diff_points"] <= 1.0
    assert checks["concept_vector_min_cosine"] > 1 - 1e-6
    assert checks["cosine_matrix_max_abs_diff"] < 1e-6
    assert checks["accuracy_mean_emalab"] > 0.9  # the planted shift is found


def test_probes_run_collects_real_activations(lm, cfg):
    d = _check_schema(probing.run(lm, cfg), {"emalab", "naive_sklearn"}, {"emalab/naive_sklearn"})
    assert d["config"]["layers"] == 4 and d["config"]["n_benign"] == 2 * cfg.probe_per_domain


def test_e2e_reads_pipeline_json_or_says_not_measured(cfg, tmp_path):
    missing = e2e.run(None, cfg.replace(pipeline_json=str(tmp_path / "none.json")))
    assert missing.status == "not_measured" and not missing.variants
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps({"config": {"study": {"model": "m", "dtype": "bfloat16"}, "experiments": ["h1"]},
                                "timings_s": {"h1": 10.0, "total": 12.5}, "peak_rss_gb": 3.2}))
    d = e2e.run(None, cfg.replace(pipeline_json=str(path))).to_dict()
    assert d["status"] == "partial" and not d["checks"]["complete_quick_preset"]
    v = d["variants"]["emalab_run"]
    assert v["median_s"] == 12.5 and v["peak_rss_gb"] == 3.2 and v["stage_seconds"] == {"h1": 10.0}
    from emalab.pipeline import QUICK

    path.write_text(json.dumps({"config": {"experiments": list(QUICK)}, "peak_rss_gb": 3.2,
                                "timings_s": {**{q: 600.0 for q in QUICK}, "total": 4000.0}}))
    d = e2e.run(None, cfg.replace(pipeline_json=str(path))).to_dict()
    assert d["status"] == "measured" and d["checks"] == {"complete_quick_preset": True, "cold_run": True}
    path.write_text(json.dumps({"config": {"experiments": list(QUICK)},
                                "timings_s": {**{q: 0.1 for q in QUICK}, "total": 2.0}}))
    d = e2e.run(None, cfg.replace(pipeline_json=str(path))).to_dict()
    assert d["status"] == "partial" and not d["checks"]["cold_run"] and any("RSS" in n for n in d["notes"])
    # interrupted after h1, resumed: the cost is the sum of the invocations
    first = {**{q: 0.0 for q in QUICK}, QUICK[0]: 300.0, "total": 301.0}
    second = {**{q: 200.0 for q in QUICK}, QUICK[0]: 0.1, "total": 200.0 * (len(QUICK) - 1) + 1.1}
    path.write_text(json.dumps({"config": {"experiments": list(QUICK)}, "timings_s": second, "peak_rss_gb": 5.0,
                                "invocations": [{"timings_s": first, "peak_rss_gb": 7.0},
                                                {"timings_s": second, "peak_rss_gb": 5.0}]}))
    d = e2e.run(None, cfg.replace(pipeline_json=str(path))).to_dict()
    v = d["variants"]["emalab_run"]
    assert d["status"] == "measured" and v["median_s"] == first["total"] + second["total"] and v["peak_rss_gb"] == 7.0
    # analysis-only experiments take 0 s in a cold run; the recorded stage count decides
    zero = {**{q: 100.0 for q in QUICK}, QUICK[1]: 0.0, "total": 500.0}
    for n, status in ((0, "measured"), (3, "partial")):
        path.write_text(json.dumps({"config": {"experiments": list(QUICK)}, "timings_s": zero, "peak_rss_gb": 5.0,
                                    "invocations": [{"timings_s": zero, "peak_rss_gb": 5.0, "stages_at_start": n}]}))
        assert e2e.run(None, cfg.replace(pipeline_json=str(path))).to_dict()["status"] == status


# -- the 7B script on tiny configs --------------------------------------------------------------


@pytest.mark.parametrize("arch", list(gpu_7b.ARCHITECTURES))
def test_meta_init_rebuilds_the_rotary_buffers(arch):
    from transformers import AutoModelForCausalLM

    lm = gpu_7b.build_random_model(arch, "cpu", "float32", tiny=True)
    reference = AutoModelForCausalLM.from_config(gpu_7b.architecture_config(arch, tiny=True))
    bufs, ref = dict(lm.model.named_buffers()), dict(reference.named_buffers())
    assert bufs.keys() == ref.keys() and bufs
    for k in bufs:
        torch.testing.assert_close(bufs[k], ref[k])
    for p in lm.model.parameters():
        assert torch.isfinite(p).all()
    assert lm.model.config.eos_token_id is None


def test_7b_configs_have_the_real_sizes():
    sizes = {}
    for arch in gpu_7b.ARCHITECTURES:
        with torch.device("meta"):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(gpu_7b.architecture_config(arch))
        sizes[arch] = sum(p.numel() for p in model.parameters()) / 1e9
    assert sizes["mistral-7b-v0.3"] == pytest.approx(7.25, abs=0.02)
    assert sizes["qwen2.5-7b"] == pytest.approx(7.62, abs=0.02)


def test_fixed_length_inputs_are_exactly_seq_tokens():
    from interp.chat import format_prompts

    tok = gpu_7b.byte_tokenizer()
    for p in gpu_7b.fixed_length_prompts(tok, 3, 40):
        assert len(tok(format_prompts(tok, [p])[0], add_special_tokens=False)["input_ids"]) == 40
    from training.data import collate

    b = collate(tok, gpu_7b.fixed_length_examples(tok, 4, 40, 10), max_prompt_tokens=None)
    assert b.input_ids.shape == (4, 40) and int(b.attention_mask.sum()) == 160 and int(b.response_mask.sum()) == 40


def test_peak_lookup_prefers_the_specific_name():
    assert gpu_7b.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_7b.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_7b.peak_tflops("NVIDIA H200") == 989.0
    assert gpu_7b.peak_tflops("Some Future GPU") is None


def test_gpu7b_tiny_runs_the_full_code_path(cfg):
    results = gpu_7b.run(None, cfg)
    assert [r.bench for r in results] == [f"gpu7b-{a}-tiny" for a in gpu_7b.ARCHITECTURES]
    for r in results:
        d = json.loads(json.dumps(r.to_dict()))
        assert {k.split(":")[0] for k in d["variants"]} == {"activations", "refusal", "unlearn"}
        for v in d["variants"].values():
            assert v["model_tflops_per_s"] > 0 and v["mfu"] is None  # no GPU peak on CPU
        assert d["checks"]["unlearn:micro_batches"] == cfg.gpu_batch // cfg.gpu_micro_batch
        assert d["checks"]["activations:max_rel_diff_vs_hooks"] < 1e-5
        assert d["config"]["matmul_params_with_unembed"] > d["config"]["matmul_params_body"]


def test_gpu7b_refuses_cpu_without_tiny(cfg):
    with pytest.raises(ValueError, match="GPU"):
        gpu_7b.run(None, cfg.replace(tiny=False))


# -- harness, files and report ------------------------------------------------------------------


def test_time_alternating_rotates_the_order():
    calls = []
    times = time_alternating({"a": lambda: calls.append("a"), "b": lambda: calls.append("b"),
                              "c": lambda: calls.append("c")}, reps=3, warmup=1)
    assert calls == list("abc" "abc" "bca" "cab")
    assert all(len(t) == 3 for t in times.values())


def test_ratio_is_baseline_over_emalab():
    vs = {"fast": Variant([1.0, 2.0, 1.0], {"x": 1}), "slow": Variant([2.0, 3.0, 4.0], {"x": 1})}
    r = ratio(vs, "fast", "slow", target=0.9)
    assert r["ratio"] == pytest.approx(3.0) and r["paired_ratio"] == pytest.approx(2.0) and r["met"]


def test_config_validation_and_suite_parsing():
    assert BenchConfig(suite=("activations,refusal", "e2e")).suite == ("activations", "refusal", "e2e")
    with pytest.raises(ValueError, match="unknown benchmark"):
        BenchConfig(suite=("nope",))
    with pytest.raises(ValueError, match="multiple"):
        BenchConfig(gpu_batch=32, gpu_micro_batch=5)
    cfg = BenchConfig(reps=2)
    assert BenchConfig.from_dict(cfg.to_dict()) == cfg
    assert machine_name("cpu").startswith("cpu-")


def test_results_round_trip_into_markdown(lm, cfg, tmp_path):
    write_result(refusal.run(lm, cfg), cfg.out_dir, "test-machine")
    write_result(e2e.run(None, cfg.replace(pipeline_json=str(tmp_path / "none.json"))), cfg.out_dir, "test-machine")
    found = read_results(cfg.out_dir)
    assert set(found) == {"test-machine"} and set(found["test-machine"]) == {"refusal", "e2e"}
    md = render_markdown(found, notes="Something we found.")
    assert "## test-machine" in md and "`logit_score/generate_judge`" in md and "Not yet measured" in md
    assert "pending" in md and "## Findings" in md
    out = write_markdown(cfg.out_dir, tmp_path / "BENCHMARKS.md", notes_file=tmp_path / "none.md")
    assert "### refusal" in out.read_text()


def test_cli_writes_markdown_and_emalab_bench_is_registered(cfg, tmp_path, capsys):
    from benchmarks.cli import main
    from emalab.cli import build_parser

    assert main(["--suite", "e2e", "--out-dir", cfg.out_dir, "--machine", "m1", "--pipeline-json",
                 str(tmp_path / "none.json"), "--write-md", "--md", str(tmp_path / "B.md")]) == 0
    assert "### e2e" in (tmp_path / "B.md").read_text()
    assert (tmp_path / "results" / "m1" / "e2e.json").exists()
    assert "not measured" in capsys.readouterr().out
    args = build_parser().parse_args(["bench", "--suite", "e2e", "--reps", "2"])
    assert args.suite == ["e2e"] and args.reps == 2


def test_speed_benchmark_reports_mfu_and_exact_prefix_cache(lm, cfg, tmp_path):
    from benchmarks import speed
    from benchmarks.harness import write_result
    from benchmarks.report import render_markdown

    results = speed.run(lm, cfg.replace(eval_limit=1, gen_prompts=4, max_new_tokens=6, train_batch=2,
                                        train_response_tokens=4))
    by = {r.bench: r for r in results}
    assert set(by) == {"matmul_peak", "scoring", "generation", "train_step", "train_phases", "containment_step"}
    assert by["matmul_peak"].checks["float32_peak_gflops"] > 0
    assert by["scoring"].checks["max_abs_diff_log_odds"] < 1e-4
    assert 0 < by["scoring"].variants["prefix_cache"].extra["mfu"]
    assert by["generation"].checks["judge_agreement"] == 1.0
    assert by["train_step"].variants["npo_retain_ce"].extra["mfu"] > 0
    for r in results:
        write_result(r, tmp_path, "tiny")
    from benchmarks.harness import read_results

    md = render_markdown(read_results(tmp_path))
    assert "### scoring" in md and "MFU" in md and "### matmul_peak" in md
