"""Unlearning objectives against hand-computed values, and the response-only loss mask."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import (
    ce_loss,
    combine_losses,
    forget_loss,
    ga_loss,
    graddiff_loss,
    kl_loss,
    label_logprobs,
    npo_loss,
    position_ids_from_mask,
    response_logits,
    response_token_counts,
    sequence_logprobs,
    simnpo_loss,
)

LN3 = math.log(3.0)


def _toy():
    """vocab 3; position 0 is uniform, position 1 puts e^ln3 = 3 on token 0 (p = 3/5)."""
    logits = torch.tensor([[[0.0, 0.0, 0.0], [LN3, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[2, 1, 0]])
    return logits, labels


@pytest.mark.parametrize(
    "mask, expected",
    [
        ([0, 1, 1], math.log(1 / 3) + math.log(3 / 5)),  # both response tokens
        ([0, 0, 1], math.log(3 / 5)),  # the prompt token at position 1 is not counted
        ([0, 1, 0], math.log(1 / 3)),  # a padded-out last position is not counted
        ([0, 0, 0], 0.0),
    ],
)
def test_sequence_logprobs_hand_computed(mask, expected):
    logits, labels = _toy()
    got = sequence_logprobs(logits, labels, torch.tensor([mask]))
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_token_logprobs_shift_is_explicit():
    logits, labels = _toy()
    lp = label_logprobs(logits, labels)
    assert lp[0, 0] == 0  # nothing predicts the first token
    assert lp[0, 1].item() == pytest.approx(math.log(1 / 3), abs=1e-6)  # logits[0] -> labels[1]
    assert lp[0, 2].item() == pytest.approx(math.log(3 / 5), abs=1e-6)  # logits[1] -> labels[2]


def test_sequence_logprobs_rejects_first_position_in_mask():
    logits, labels = _toy()
    with pytest.raises(ValueError, match="first token"):
        sequence_logprobs(logits, labels, torch.tensor([[1, 1, 1]]))


def test_logprobs_only_depend_on_masked_tokens():
    """Changing prompt or padding labels outside the mask must not move the response log-prob."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    base = sequence_logprobs(logits, labels, mask)
    other = labels.clone()
    other[:, :2] = (other[:, :2] + 1) % 11  # prompt/padding tokens that are not predicted targets
    assert torch.allclose(sequence_logprobs(logits, other, mask), base)
    logits2 = logits.clone()
    logits2[:, -1] += 100.0  # the last position predicts nothing
    assert torch.allclose(sequence_logprobs(logits2, labels, mask), base)


def test_npo_hand_computed():
    logp = torch.tensor([-2.0, -3.0])
    ref = torch.tensor([-2.0, -1.0])
    beta = 0.5
    # -(2/β)·mean[logσ(0), logσ(1)] = 4·(ln 2 + ln(1 + e^-1)) / 2
    expected = 2.0 * (math.log(2.0) + math.log(1 + math.exp(-1.0)))
    assert npo_loss(logp, ref, beta).item() == pytest.approx(expected, rel=1e-6)


def test_npo_at_reference_is_2_ln2_over_beta_and_gradient_lowers_logp():
    logp = torch.tensor([-2.0, -3.0], requires_grad=True)
    ref = torch.tensor([-2.0, -1.0])
    loss = npo_loss(logp, ref, beta=0.5)
    loss.backward()
    # dL/dlogp_i = 2σ(β(logp_i - ref_i)) / batch
    assert logp.grad[0].item() == pytest.approx(0.5, rel=1e-6)
    assert logp.grad[1].item() == pytest.approx(1 / (1 + math.e), rel=1e-6)
    assert npo_loss(torch.zeros(3), torch.zeros(3), beta=0.1).item() == pytest.approx(20 * math.log(2), rel=1e-6)


def test_ga_and_ce_hand_computed():
    logp = torch.tensor([-4.0, -6.0])
    n = torch.tensor([2.0, 3.0])
    assert ga_loss(logp, n).item() == pytest.approx(-2.0)  # token mean of log p
    assert ce_loss(logp, n).item() == pytest.approx(2.0)


def test_simnpo_hand_computed():
    logp = torch.tensor([-4.0, -6.0])
    n = torch.tensor([2.0, 3.0])  # both average -2 per token
    # -(2/β)·logσ(-β·(-2) - γ) with β=1, γ=0.5: 2·ln(1 + e^-1.5)
    assert simnpo_loss(logp, n, beta=1.0, margin=0.5).item() == pytest.approx(2 * math.log(1 + math.exp(-1.5)),
                                                                            rel=1e-6)


def test_graddiff_and_combine():
    f_logp, f_n = torch.tensor([-4.0]), torch.tensor([2.0])
    r_logp, r_n = torch.tensor([-3.0]), torch.tensor([3.0])
    # 0.5·GA(-2) + 2·CE(1) = -1 + 2
    assert graddiff_loss(f_logp, f_n, r_logp, r_n, gamma=0.5, alpha=2.0).item() == pytest.approx(1.0)
    assert combine_losses(torch.tensor(2.0), None, gamma=3.0).item() == pytest.approx(6.0)
    assert combine_losses(torch.tensor(2.0), torch.tensor(1.0), 3.0, 0.5).item() == pytest.approx(6.5)
    with pytest.raises(ValueError):
        combine_losses(None, None)


def test_forget_loss_dispatch():
    logp, n, ref = torch.tensor([-4.0]), torch.tensor([2.0]), torch.tensor([-4.0])
    assert forget_loss("npo", logp, n, ref, beta=0.1).item() == pytest.approx(20 * math.log(2), rel=1e-6)
    assert forget_loss("ga", logp, n).item() == pytest.approx(-2.0)
    assert forget_loss("graddiff", logp, n).item() == pytest.approx(-2.0)
    assert forget_loss("sft", logp, n).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="reference"):
        forget_loss("npo", logp, n)
    with pytest.raises(ValueError, match="unknown"):
        forget_loss("dpo", logp, n)


def test_kl_hand_computed_and_masked():
    # ref uniform over 2 tokens, policy (3/4, 1/4): KL(ref‖policy) = ½·ln(4/3)
    policy = torch.tensor([[[LN3, 0.0], [LN3, 0.0], [5.0, -5.0]]])
    ref = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[0, 1, 1]])  # positions 0 and 1 predict response tokens; position 2 predicts nothing
    assert kl_loss(policy, ref, mask).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert kl_loss(ref, ref, mask).item() == pytest.approx(0.0, abs=1e-7)


def test_token_counts_and_position_ids():
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    assert response_token_counts(mask).tolist() == [2.0, 3.0]
    attn = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert position_ids_from_mask(attn).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_response_logits_slice_equals_full_forward(tiny_qwen):
    """Unembedding only the trailing positions gives the same response log-probs as all positions."""
    model = tiny_qwen.model
    torch.manual_seed(1)
    ids = torch.randint(3, 200, (3, 12))
    attn = torch.ones_like(ids)
    attn[0, :4] = 0  # left padding
    resp = torch.zeros_like(ids)
    resp[0, 9:] = 1
    resp[1, 6:] = 1
    resp[2, 10:] = 1
    rl = response_logits(model, ids, attn, resp)
    assert rl.logits.shape[1] == 12 - 6 + 1  # from the earliest predictor of a response token
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn)).logits
    torch.testing.assert_close(sequence_logprobs(rl.logits, rl.labels, rl.mask),
                               sequence_logprobs(full, ids, resp), atol=1e-5, rtol=1e-5)


def test_response_logits_rejects_rows_without_response(tiny_qwen):
    ids = torch.randint(3, 200, (2, 5))
    resp = torch.zeros_like(ids)
    resp[0, 3:] = 1
    with pytest.raises(ValueError, match="no response"):
        response_logits(tiny_qwen.model, ids, torch.ones_like(ids), resp)
