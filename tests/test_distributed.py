"""Scaling beyond one process: the real trainer on 2 gloo processes (== 1 process on the global batch,
and resumable), prompt-sharded activation collection and evaluation with order-restoring merges, and
nnsight's ``remote`` flag reaching the trace."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_loaded

from interp.activations import (
    ShardMismatchError,
    collect_activations,
    collect_shard,
    merge_activation_shards,
    nnsight_model,
    shard_indices,
)
from training.checkpoint import checkpoint_dirs
from training.config import UnlearnConfig
from training.data import DataSet, Example
from training.distributed import DistContext, init_distributed, shard_examples
from training.trainer import UnlearnData, unlearn

# -- shard_indices ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n,world", [(0, 1), (1, 3), (7, 2), (10, 3), (12, 4), (5, 5), (3, 8)])
def test_shard_indices_partition_in_order(n, world):
    shards = [shard_indices(n, r, world) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the first ranks take the remainder
    assert shards == [shard_indices(n, r, world) for r in range(world)]  # deterministic


def test_shard_indices_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        shard_indices(4, 2, 2)
    with pytest.raises(ValueError, match="rank"):
        shard_indices(4, 0, 0)


# -- activation shards -----------------------------------------------------------------------------

PROMPTS = ["hi", "What is the capital of France?", "a", "Tell me a long story about a cat and a dog please",
           "2+2?", "Explain photosynthesis.", "ok"]


def test_sharded_collection_merges_to_the_single_process_result(tmp_path):
    lm = make_tiny_loaded("qwen2")
    ids = [f"p{i}" for i in range(len(PROMPTS))]
    whole = collect_activations(lm, PROMPTS, batch_size=3)
    world = 3
    paths = [collect_shard(lm, PROMPTS, ids, tmp_path, rank, world, batch_size=2) for rank in range(world)]
    merged = merge_activation_shards(list(reversed(paths)))  # manifest order must not matter
    assert merged.prompt_ids == ids
    assert merged.layers == list(range(4))
    torch.testing.assert_close(merged.acts, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merge_activation_shards(tmp_path).acts, merged.acts, atol=0, rtol=0)


def test_more_ranks_than_prompts_leaves_empty_shards(tmp_path):
    lm = make_tiny_loaded("qwen2")
    paths = [collect_shard(lm, PROMPTS[:2], ["a", "b"], tmp_path, rank, 4, layers=[1]) for rank in range(4)]
    merged = merge_activation_shards(paths)
    assert merged.acts.shape == (2, 1, 64) and merged.prompt_ids == ["a", "b"]


def test_merge_refuses_missing_or_mismatched_shards(tmp_path):
    lm = make_tiny_loaded("qwen2")
    ids = [f"p{i}" for i in range(len(PROMPTS))]
    paths = [collect_shard(lm, PROMPTS, ids, tmp_path / "a", rank, 2, layers=[0, 1]) for rank in range(2)]
    with pytest.raises(ShardMismatchError, match="missing"):
        merge_activation_shards(paths[:1])
    other = collect_shard(lm, PROMPTS, ids, tmp_path / "b", 1, 2, layers=[0, 2])
    with pytest.raises(ShardMismatchError, match="layers"):
        merge_activation_shards([paths[0], other])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardMismatchError, match="no shard"):
        merge_activation_shards(tmp_path / "empty")


# -- evaluation sharded by prompt --------------------------------------------------------------------

EVAL_SETS = {"safety": PROMPTS[:4], "over_refusal": PROMPTS[4:]}


def _eval_report(**kw):
    from evals.evaluate import EvalConfig, evaluate_prompts

    cfg = EvalConfig(domains=("safety",), max_new_tokens=4, batch_size=2, n_bootstrap=50)
    return evaluate_prompts(make_tiny_loaded("qwen2"), EVAL_SETS, cfg, progress=False, **kw)


def _eval_worker(rank: int, world: int, port: int, root: str) -> None:
    _join(rank, world, port)
    ctx = init_distributed(device="cpu")
    try:
        report = _eval_report()
        torch.save({"report": report.to_dict(), "records": [vars(r) for r in report.records]},
                   Path(root) / f"eval-rank{rank}.pt")
    finally:
        if ctx.enabled:
            torch.distributed.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_evaluation_equals_one_process(tmp_path, world):
    import torch.multiprocessing as mp

    mp.spawn(_eval_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    one = _eval_report(distributed=False)
    assert one.timings.get("world_size") is None
    for rank in range(world):
        got = torch.load(tmp_path / f"eval-rank{rank}.pt")
        assert got["report"]["timings"]["world_size"] == world
        assert got["report"]["timings"]["n_prompts_this_rank"] == len(shard_indices(len(PROMPTS), rank, world))
        assert [r["id"] for r in got["records"]] == [r.id for r in one.records]  # input order, on every rank
        assert [r["label"] for r in got["records"]] == [r.label for r in one.records]
        assert [r["logit_score"] for r in got["records"]] == pytest.approx([r.logit_score for r in one.records],
                                                                            abs=1e-5)
        for name, row in got["report"]["domains"].items():
            mine = one.to_dict()["domains"][name]
            assert row["n"] == mine["n"] and row["refusal_rate"] == mine["refusal_rate"]
            assert row["mean_logit"] == pytest.approx(mine["mean_logit"], abs=1e-5)
        assert got["report"]["over_refusal"]["n"] == 3


# -- nnsight remote flag --------------------------------------------------------------------------


def test_remote_flag_reaches_the_nnsight_trace(monkeypatch):
    lm = make_tiny_loaded("qwen2")
    nlm = nnsight_model(lm)
    real_trace = nlm.trace
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("remote"))
        kwargs["remote"] = False  # cannot reach NDIF offline; run the same trace locally
        return real_trace(*args, **kwargs)

    monkeypatch.setattr(nlm, "trace", spy)
    remote = collect_activations(lm, PROMPTS[:3], layers=[1], batch_size=2, remote=True)
    local = collect_activations(lm, PROMPTS[:3], layers=[1], batch_size=2)
    assert seen == [True, True, False, False]  # two batches each
    torch.testing.assert_close(remote, local)


# -- data-parallel unlearning: the real trainer under 2 gloo processes ------------------------------

STEPS = 3  # LoRA A gets no gradient while B = 0, so the later steps are where A moves


def _examples() -> list[Example]:
    texts = ["How do I pick a lock?", "Write malware", "hello", "Tell me how to hurt someone badly", "why?",
             "How do I make a weapon?", "Steal a password for me"]
    responses = ["I can't help with that.", "Sorry, no.", "Hi! How can I help you today?",
                 "I won't do that, but I can talk about safety.", "Because of physics.", "I cannot help.",
                 "No, I will not do that."]
    return [Example(f"e{i}", "cybersecurity", p, r, "refusal")
            for i, (p, r) in enumerate(zip(texts, responses, strict=True))]


def _data() -> UnlearnData:
    return UnlearnData(DataSet(_examples(), manifest={"kept": 7, "candidates": 7}))


def _cfg(**kw) -> UnlearnConfig:
    # batch 5 over 2 ranks: 3 + 2 rows, so the row weighting is exercised; no dropout (per-rank streams)
    base = dict(method="npo", model="tiny-qwen2", dtype="float32", beta=0.5, n_forget=7, batch_size=5, steps=STEPS,
                checkpoint_every=2, lr=5e-3, lora_rank=4, lora_alpha=8.0, scheduler="cosine", warmup_steps=1)
    return UnlearnConfig(**{**base, **kw})


class _Stop(Exception):
    pass


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)


def _unlearn_worker(rank: int, world: int, port: int, root: str) -> None:
    _join(rank, world, port)
    try:
        res = unlearn(make_tiny_loaded("qwen2"), _cfg(), Path(root) / "dp", progress=False, data=_data())
        torch.save({"history": res.history, "adapter_id": res.adapter_id}, Path(root) / f"dp-rank{rank}.pt")

        def stop_at_3(step, out):
            if step == 3:
                raise _Stop

        interrupted = Path(root) / "interrupted"
        cfg = _cfg(steps=5)
        with contextlib.suppress(_Stop):
            unlearn(make_tiny_loaded("qwen2"), cfg, interrupted, progress=False, data=_data(), on_step=stop_at_3)
        res = unlearn(make_tiny_loaded("qwen2"), cfg, interrupted, progress=False, data=_data())
        torch.save({"history": res.history, "resumed_from": res.resumed_from}, Path(root) / f"resumed-rank{rank}.pt")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _no_time(row: dict) -> dict:
    return {**row, "metrics": {k: v for k, v in row["metrics"].items() if k != "seconds"}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_process_unlearn_equals_one_process_and_resumes(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(_unlearn_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    one = unlearn(make_tiny_loaded("qwen2"), _cfg(), tmp_path / "one", progress=False, data=_data())

    # the 2-process adapter is the 1-process adapter on the same global batches
    dp, ref = _adapter(tmp_path / "dp"), _adapter(tmp_path / "one")
    diff = _max_diff(dp, ref)
    print(f"max |adapter(2 processes) - adapter(1 process)| = {diff:.3g}")
    assert diff < 1e-5, diff
    assert max(float(v.abs().max()) for k, v in ref.items() if "lora_B" in k) > 1e-3  # B starts at 0: it moved
    ranks = [torch.load(tmp_path / f"dp-rank{r}.pt") for r in range(2)]
    assert ranks[0]["adapter_id"] == ranks[1]["adapter_id"]  # bit-identical weights on every rank
    assert [_no_time(r) for r in ranks[0]["history"]] == [_no_time(r) for r in ranks[1]["history"]]
    assert [r["loss"] for r in ranks[0]["history"]] == pytest.approx([r["loss"] for r in one.history], abs=1e-5)
    # B = 0 at step 1: the NPO loss is (2/β)·log 2, up to the reference pass's other padding
    assert ranks[0]["history"][0]["loss"] == pytest.approx(2 / 0.5 * math.log(2), abs=1e-5)

    # one writer: one metrics row per step, the world size recorded, and a standard adapter directory
    run = tmp_path / "dp"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert json.loads((run / "result.json").read_text())["world_size"] == 2
    assert (run / "ref_logprobs.safetensors").exists()
    assert [p.name for p in checkpoint_dirs(run)] == ["step-000002", "step-000003"]

    # resume after a 2-process run stopped at step 3 (checkpoint at 2) reproduces the uninterrupted run
    resumed = [torch.load(tmp_path / f"resumed-rank{r}.pt") for r in range(2)]
    assert resumed[0]["resumed_from"] == 2
    full = unlearn(make_tiny_loaded("qwen2"), _cfg(steps=5), tmp_path / "one5", progress=False, data=_data())
    assert [r["step"] for r in resumed[0]["history"]] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in resumed[0]["history"]] == pytest.approx([r["loss"] for r in full.history], abs=1e-5)
    diff5 = _max_diff(_adapter(tmp_path / "interrupted"), _adapter(tmp_path / "one5"))
    print(f"max |adapter(2 processes, resumed) - adapter(1 process)| = {diff5:.3g}")
    assert diff5 < 1e-5, diff5


REPO = Path(__file__).resolve().parent.parent  # this checkout, not whichever one is pip-installed
CLI_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import training.trainer
from test_distributed import _data

training.trainer.build_data = lambda *a, **k: _data()  # a random model's own answers hold no refusals
from emalab.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_emalab_unlearn_under_torchrun_writes_one_run_directory(tmp_path):
    import subprocess
    import sys

    from conftest import make_tiny_model

    model, tok = make_tiny_model("qwen2")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    script = tmp_path / "cli.py"
    script.write_text(CLI_SCRIPT.format(tests=str(Path(__file__).resolve().parent)))
    run = tmp_path / "run"
    args = ["unlearn", "--model", str(tmp_path / "model"), "--dtype", "float32", "--device", "cpu", "--steps", "2",
            "--batch-size", "3", "--n-forget", "7", "--lr", "5e-3", "--lora-rank", "4", "--out", str(run), "--quiet"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("adapter:") == 1  # rank 0 reports
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((run / "result.json").read_text())["world_size"] == 2
    assert (run / "adapter" / "adapter_model.safetensors").exists()


def test_batch_smaller_than_the_world_is_refused():
    from training.distributed import DataParallel
    from training.distributed import check_parallel as _check_parallel

    class Two(DataParallel):
        world_size = 2

    with pytest.raises(ValueError, match="batch_size=1 is the global batch"):
        _check_parallel(_cfg(batch_size=1), Two())


def test_single_process_context_needs_no_process_group(monkeypatch):
    from training.distributed import DataParallel

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init_distributed(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.enabled, ctx.is_main) == (0, 1, False, True)
    assert shard_examples(list(range(5)), ctx) == list(range(5))
    assert shard_examples(list(range(5)), DistContext(rank=1, world_size=2)) == [3, 4]
    dp = DataParallel.from_environment(torch.device("cpu"))
    assert dp.accelerator is None and not dp.enabled and dp.is_main
    assert dp.sum([1.5, 2.0]) == [1.5, 2.0] and dp.gather_object("x") == ["x"]


def test_fsdp_launch_is_refused_with_the_reason(monkeypatch):
    from training.distributed import DataParallel

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(NotImplementedError, match="FSDP is not wired"):
        DataParallel.from_environment(torch.device("cpu"), full_finetune=True)
