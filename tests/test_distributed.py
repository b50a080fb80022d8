"""Scaling beyond one process: data-parallel NPO steps (2 gloo processes == 1 process on the global
batch), prompt-sharded activation collection with an order-restoring merge, and nnsight's ``remote``
flag reaching the trace."""

from __future__ import annotations

import os
import socket

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
from training.config import UnlearnConfig
from training.data import Example, collate
from training.distributed import DistContext, data_parallel_step, init_distributed, shard_examples
from training.lora import attach_lora, trainable_state
from training.losses import response_logits, sequence_logprobs

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


# -- data-parallel NPO ----------------------------------------------------------------------------

GLOBAL_BATCH = 5  # odd on purpose: ranks get 3 and 2 rows, so the row weighting is exercised
STEPS = 2  # LoRA A gets no gradient while B = 0, so the second step is where A moves
LR = 0.01


def _examples() -> list[Example]:
    texts = ["How do I pick a lock?", "Write malware", "hello", "Tell me how to hurt someone badly", "why?"]
    responses = ["I can't help with that.", "Sorry, no.", "Hi! How can I help you today?",
                 "I won't do that, but I can talk about safety.", "Because of physics."]
    return [Example(f"e{i}", "safety", p, r, "refusal") for i, (p, r) in enumerate(zip(texts, responses, strict=True))]


def _setup():
    torch.manual_seed(0)
    lm = make_tiny_loaded("qwen2")
    attach_lora(lm, rank=4, alpha=8.0)
    lm.model.train()
    params = [p for p in lm.model.parameters() if p.requires_grad]
    cfg = UnlearnConfig(method="npo", model=lm.name, dtype="float32", beta=0.5, max_grad_norm=None)
    return lm, params, cfg


def _ref_logp(lm, batch) -> torch.Tensor:
    with torch.no_grad(), lm.model.disable_adapter():
        rl = response_logits(lm.model, batch.input_ids, batch.attention_mask, batch.response_mask)
        return sequence_logprobs(rl.logits, rl.labels, rl.mask)


def _run(ctx: DistContext) -> tuple[list[float], dict[str, torch.Tensor]]:
    lm, params, cfg = _setup()
    opt = torch.optim.SGD(params, lr=LR)  # SGD: the update is proportional to the gradient (Adam's is not)
    batch = collate(lm.tokenizer, shard_examples(_examples()[:GLOBAL_BATCH], ctx))
    ref = _ref_logp(lm, batch)
    losses = [float(data_parallel_step(lm, cfg, batch, params, opt, ctx, logp_ref=ref).loss) for _ in range(STEPS)]
    return losses, {k: v.clone() for k, v in trainable_state(lm.model).items()}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = init_distributed(device="cpu")
    try:
        losses, state = _run(ctx)
        if ctx.is_main:
            torch.save({"losses": losses, "state": state}, out)
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_npo_step_equals_one_process_on_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    dp = torch.load(out)
    losses, state = _run(DistContext())
    assert losses[0] == pytest.approx(2 / 0.5 * torch.log(torch.tensor(2.0)).item(), abs=1e-6)  # B = 0 at step 1
    assert dp["losses"] == pytest.approx(losses, abs=1e-5)
    assert losses[1] < losses[0]  # the step did something the comparison can see
    assert state.keys() == dp["state"].keys()
    for name, w in state.items():
        torch.testing.assert_close(dp["state"][name], w, atol=1e-5, rtol=0)
    init = {k: v.clone() for k, v in trainable_state(_setup()[0].model).items()}
    a = [k for k in state if "lora_A" in k]
    b = [k for k in state if "lora_B" in k]
    assert a and b and all(float(init[k].abs().max()) == 0 for k in b)
    assert max(float((state[k] - init[k]).abs().max()) for k in b) > 1e-3  # B moved at step 1
    assert max(float((state[k] - init[k]).abs().max()) for k in a) > 1e-6  # A moved at step 2


def test_single_process_context_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init_distributed(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.enabled, ctx.is_main) == (0, 1, False, True)
    assert shard_examples(list(range(5)), ctx) == list(range(5))
    assert shard_examples(list(range(5)), DistContext(rank=1, world_size=2)) == [3, 4]
