"""The resumable activation cache: rows always match the prompts asked for, whatever was cached."""

from __future__ import annotations

import torch

from interp.activations import collect_activations, collect_cached

PROMPTS = [f"Tell me about item number {i}." for i in range(6)]
IDS = [f"p{i}" for i in range(6)]


def test_cache_matches_direct_collection_and_resumes(tiny_qwen, tmp_path):
    direct = collect_activations(tiny_qwen, PROMPTS, layers=[0, 1], batch_size=4)
    first = collect_cached(tiny_qwen, PROMPTS, IDS, tmp_path, layers=[0, 1], shard_size=4, progress=False)
    again = collect_cached(tiny_qwen, PROMPTS, IDS, tmp_path, layers=[0, 1], shard_size=4, progress=False)
    torch.testing.assert_close(first.acts, direct, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again.acts, first.acts)


def test_another_shard_size_never_reuses_mismatched_shards(tiny_qwen, tmp_path):
    # Shards of 4 rows ([0,4), [4,6)) were once served to a request cut into shards of 2: 8 rows for 6 ids.
    four = collect_cached(tiny_qwen, PROMPTS, IDS, tmp_path, layers=[0], shard_size=4, progress=False)
    two = collect_cached(tiny_qwen, PROMPTS, IDS, tmp_path, layers=[0], shard_size=2, progress=False)
    assert two.acts.shape[0] == len(PROMPTS)
    torch.testing.assert_close(two.acts, four.acts, rtol=1e-4, atol=1e-5)


def test_changed_prompt_text_under_the_same_ids_is_recomputed(tiny_qwen, tmp_path):
    a = collect_cached(tiny_qwen, PROMPTS, IDS, tmp_path, layers=[1], progress=False)
    edited = [p.replace("item", "topic") for p in PROMPTS]
    b = collect_cached(tiny_qwen, edited, IDS, tmp_path, layers=[1], progress=False)
    assert a.meta["cache"] != b.meta["cache"]
    torch.testing.assert_close(b.acts, collect_activations(tiny_qwen, edited, layers=[1]), rtol=1e-4, atol=1e-5)
