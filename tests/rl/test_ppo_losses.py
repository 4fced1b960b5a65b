"""PPO's loss terms on fixed tensors against a direct transcription of the formulas.

The transcriptions below work on one sequence and one token at a time with Python loops and float64 scalars, so
they share no code (and no vectorisation trick) with :mod:`fastft.rl.ppo_losses`. Padding positions hold large
garbage: any leak of padding into a result shows up as a mismatch. Tolerance: both sides are float64; 1e-12
relative covers the different summation orders.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastft.rl.ppo_losses import (
    gae_advantages,
    kl_estimate,
    masked_mean,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)

LENGTHS = [5, 1, 3, 7]  # completion lengths: one full row, one single-token row
WIDTH = 7
TOL = {"rtol": 1e-12, "atol": 1e-12}


def _batch(seed: int = 0):
    """Per-token tensors (4, 7) with padding filled by garbage, and the right-padded mask."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(WIDTH)[None] < torch.tensor(LENGTHS)[:, None]

    def tensor(scale=1.0, shift=0.0):
        x = torch.randn(len(LENGTHS), WIDTH, generator=g, dtype=torch.float64) * scale + shift
        return torch.where(mask, x, torch.full_like(x, 37.0))  # garbage on padding

    return mask, tensor


def _valid(mask):
    return [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]


def test_gae_matches_the_recursion_written_out():
    mask, tensor = _batch(0)
    rewards, values = tensor(), tensor()
    gamma, lam = 0.9, 0.8
    advantages, returns = gae_advantages(rewards, values, mask, gamma, lam)
    for b, length in enumerate(LENGTHS):
        r, v = rewards[b].tolist(), values[b].tolist()
        expected = [0.0] * length
        following = 0.0  # A_{t+1}; 0 after the last token
        for t in range(length - 1, -1, -1):
            next_value = v[t + 1] if t + 1 < length else 0.0  # the episode ends after the last token
            delta = r[t] + gamma * next_value - v[t]
            following = delta + gamma * lam * following
            expected[t] = following
        torch.testing.assert_close(advantages[b, :length], torch.tensor(expected, dtype=torch.float64), **TOL)
        torch.testing.assert_close(
            returns[b, :length], torch.tensor([a + v[t] for t, a in enumerate(expected)], dtype=torch.float64), **TOL
        )
        assert advantages[b, length:].eq(0).all() and returns[b, length:].eq(0).all()


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    mask, tensor = _batch(1)
    rewards, values = tensor(), tensor()
    advantages, returns = gae_advantages(rewards, values, mask, 1.0, 1.0)
    for b, length in enumerate(LENGTHS):
        for t in range(length):
            to_go = sum(rewards[b, k].item() for k in range(t, length))
            assert advantages[b, t].item() == pytest.approx(to_go - values[b, t].item(), rel=1e-12, abs=1e-12)
            assert returns[b, t].item() == pytest.approx(to_go, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_estimators(estimator):
    mask, tensor = _batch(2)
    logprobs, ref = tensor(0.5, -2.0), tensor(0.5, -2.0)
    kl = kl_estimate(logprobs, ref, estimator)
    for b, t in _valid(mask):
        d = logprobs[b, t].item() - ref[b, t].item()
        expected = d if estimator == "k1" else math.exp(-d) - 1 + d
        assert kl[b, t].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    if estimator == "k3":
        assert (kl >= 0).all()
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_estimate(logprobs, ref, "k9")


def test_token_rewards_penalise_every_token_and_score_the_last():
    mask, tensor = _batch(3)
    kl, scores, kl_coef = tensor(), torch.tensor([1.5, -2.0, 0.25, 3.0], dtype=torch.float64), 0.1
    rewards = token_rewards(scores, kl, mask, kl_coef)
    for b, length in enumerate(LENGTHS):
        for t in range(WIDTH):
            expected = 0.0 if t >= length else -kl_coef * kl[b, t].item() + (scores[b].item() if t == length - 1 else 0)
            assert rewards[b, t].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def _reference_policy_loss(logprobs, old, advantages, mask, eps):
    """Sum over valid tokens of max(-A r, -A clip(r)) / count, built from scalar float64 ops (autograd through)."""
    terms, clipped_count = [], 0
    for b, t in _valid(mask):
        ratio = torch.exp(logprobs[b, t] - old[b, t])
        a = advantages[b, t]
        unclipped, clipped = -a * ratio, -a * torch.clamp(ratio, 1 - eps, 1 + eps)
        terms.append(torch.maximum(unclipped, clipped))
        clipped_count += int(clipped.item() > unclipped.item())
    return sum(terms) / len(terms), clipped_count / len(terms)


def test_clipped_policy_loss_and_gradient():
    mask, tensor = _batch(4)
    old, advantages = tensor(0.3, -3.0), tensor()
    new = (old + tensor(0.3)).detach().requires_grad_()  # ratios spread over both sides of the clip range
    loss, clipfrac, approx_kl = policy_loss(new, old, advantages, mask, cliprange=0.2)
    (grad,) = torch.autograd.grad(loss, new)
    ref_new = new.detach().clone().requires_grad_()
    ref_loss, ref_clipfrac = _reference_policy_loss(ref_new, old, advantages, mask, 0.2)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_new)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)  # 0 on clipped tokens and on padding
    assert 0 < clipfrac.item() < 1 and clipfrac.item() == pytest.approx(ref_clipfrac)
    valid = _valid(mask)
    expected_kl = 0.5 * sum((new[b, t].item() - old[b, t].item()) ** 2 for b, t in valid) / len(valid)
    assert approx_kl.item() == pytest.approx(expected_kl, rel=1e-12)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    mask, tensor = _batch(5)
    old, advantages = tensor(), tensor()
    loss, clipfrac, approx_kl = policy_loss(old.clone(), old, advantages, mask, cliprange=0.2)
    valid = _valid(mask)
    assert loss.item() == pytest.approx(-sum(advantages[b, t].item() for b, t in valid) / len(valid), rel=1e-12)
    assert clipfrac.item() == 0 and approx_kl.item() == 0


def test_clipped_value_loss_and_gradient():
    mask, tensor = _batch(6)
    old, returns = tensor(), tensor()
    new = (old + tensor(0.4)).detach().requires_grad_()
    eps = 0.2
    loss, clipfrac = value_loss(new, old, returns, mask, cliprange_value=eps)
    (grad,) = torch.autograd.grad(loss, new)
    ref_new = new.detach().clone().requires_grad_()
    terms, clipped_count = [], 0
    for b, t in _valid(mask):
        v, v_old, ret = ref_new[b, t], old[b, t], returns[b, t]
        v_clipped = v_old + torch.clamp(v - v_old, -eps, eps)
        unclipped, clipped = (v - ret) ** 2, (v_clipped - ret) ** 2
        terms.append(torch.maximum(unclipped, clipped))
        clipped_count += int(clipped.item() > unclipped.item())
    ref_loss = 0.5 * sum(terms) / len(terms)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_new)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    assert 0 < clipfrac.item() < 1 and clipfrac.item() == pytest.approx(clipped_count / len(terms))


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_and_mean(shift_mean):
    mask, tensor = _batch(7)
    x = tensor(2.0, 1.0)
    values = [x[b, t].item() for b, t in _valid(mask)]
    n = len(values)
    mean = sum(values) / n
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)  # unbiased
    assert masked_mean(x, mask).item() == pytest.approx(mean, rel=1e-12)
    whitened = masked_whiten(x, mask, shift_mean=shift_mean)
    for b in range(mask.shape[0]):
        for t in range(WIDTH):
            expected = 0.0
            if mask[b, t]:
                expected = (x[b, t].item() - mean) / math.sqrt(variance + 1e-8) + (0.0 if shift_mean else mean)
            assert whitened[b, t].item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    rows = masked_mean(x, mask, dim=1)
    for b, length in enumerate(LENGTHS):
        assert rows[b].item() == pytest.approx(sum(x[b, :length].tolist()) / length, rel=1e-12)
