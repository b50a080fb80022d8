"""Chat formatting, left padding, post-instruction length and refusal-start tokens."""

from __future__ import annotations

import pytest

from interp.chat import (
    NoChatTemplateError,
    encode,
    format_conversations,
    format_prompts,
    iter_batches,
    post_instruction_length,
    refusal_token_ids,
)


def test_format_ends_at_assistant_turn(tiny_tokenizer):
    (text,) = format_prompts(tiny_tokenizer, ["hi"])
    assert text.endswith("<|im_start|>assistant\n") and "hi" in text
    (with_sys,) = format_prompts(tiny_tokenizer, ["hi"], system="be brief")
    assert with_sys.startswith("<|im_start|>system\nbe brief")


def test_conversation_boundary_is_exact(tiny_tokenizer):
    prompts, full = format_conversations(tiny_tokenizer, ["q1", "longer question"], ["a", "bb"])
    for p, f, r in zip(prompts, full, ["a", "bb"]):
        assert f.startswith(p) and f[len(p):].startswith(r)


def test_left_padding_and_index(tiny_tokenizer):
    texts = ["a", "a much longer text here", "mid text"]
    batch = encode(tiny_tokenizer, texts)
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[:, -1].all()
    assert (batch.input_ids[0, batch.attention_mask[0] == 0] == tiny_tokenizer.pad_token_id).all()
    seen = []
    for b in iter_batches(tiny_tokenizer, texts, batch_size=2):
        seen.extend(b.index)
        lengths = b.attention_mask.sum(1).tolist()
        assert lengths == sorted(lengths)
    assert sorted(seen) == [0, 1, 2]


def test_truncation_warns_and_keeps_the_end(tiny_tokenizer):
    with pytest.warns(UserWarning, match="1 of 2 prompts exceed 4 tokens"):
        batch = encode(tiny_tokenizer, ["abcdefgh", "ab"], max_length=4)
    assert batch.input_ids.shape[1] == 4
    assert tiny_tokenizer.decode(batch.input_ids[0]) == "efgh"


def test_post_instruction_length(tiny_tokenizer):
    # "<|im_end|>" "\n" "<|im_start|>" "assistant" as bytes "\n"
    n = post_instruction_length(tiny_tokenizer)
    suffix = "<|im_end|>\n<|im_start|>assistant\n"
    assert n == len(tiny_tokenizer(suffix, add_special_tokens=False)["input_ids"])


def test_refusal_tokens_are_first_tokens(tiny_tokenizer):
    ids = refusal_token_ids(tiny_tokenizer)
    assert tiny_tokenizer.convert_tokens_to_ids("I") in ids
    assert len(ids) == len(set(ids))


def test_missing_template_is_a_clear_error(tiny_tokenizer):
    tiny_tokenizer.chat_template = None
    with pytest.raises(NoChatTemplateError, match="raw"):
        format_prompts(tiny_tokenizer, ["hi"])
    assert format_prompts(tiny_tokenizer, ["hi"], raw=True) == ["hi"]


def test_refusal_tokens_without_no(tiny_tokenizer):
    from interp.chat import NO_PHRASES, REFUSAL_PHRASES

    assert "No," in REFUSAL_PHRASES and NO_PHRASES == ("No,",)
    with_no, without = refusal_token_ids(tiny_tokenizer), refusal_token_ids(tiny_tokenizer, include_no=False)
    no_id = tiny_tokenizer("No,", add_special_tokens=False)["input_ids"][0]
    assert no_id in with_no and no_id not in without
    assert set(without) == set(with_no) - {no_id}
