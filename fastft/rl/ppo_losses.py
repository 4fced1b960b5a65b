"""PPO's per-token quantities and losses as pure tensor functions (no model, no trainer state).

Shapes: every per-token tensor is (batch, completion_length), right-padded; ``mask`` is 1 (or True) on the
completion's tokens (up to and including its EOS) and 0 on padding. Token t of a completion is action a_t taken
in state s_t (the prompt and tokens < t); the value V(s_t) and log pi(a_t | s_t) come from the same hidden state.

The formulas (Schulman et al. 2017, "Proximal Policy Optimization Algorithms"; Ziegler et al. 2019 for the
per-token KL penalty of RLHF), as TRL's removed PPO trainer computed them:

    kl_t       = log pi(a_t) - log pi_ref(a_t)                           ("k1": unbiased, can be negative)
               = exp(-d) - 1 + d,  d = log pi(a_t) - log pi_ref(a_t)     ("k3": non-negative, lower variance)
    r_t        = -kl_coef * kl_t  (+ score on the completion's last token)
    delta_t    = r_t + gamma * V(s_{t+1}) - V(s_t)                        (V after the last token = 0)
    A_t        = delta_t + gamma * lam * A_{t+1}                           (GAE, Schulman et al. 2016)
    R_t        = A_t + V(s_t)                                              (the value target)
    ratio_t    = exp(log pi_new(a_t) - log pi_old(a_t))
    L_policy   = mean_t max(-A_t ratio_t, -A_t clip(ratio_t, 1 - eps, 1 + eps))
    L_value    = 0.5 mean_t max((V_new - R_t)^2, (V_old + clip(V_new - V_old, -eps_v, eps_v) - R_t)^2)

Means are over the unmasked tokens of the batch (token-level averaging, as TRL's PPO did).
"""

from __future__ import annotations

import torch

_KL_ESTIMATORS = ("k1", "k3")


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is nonzero (all dims, or along ``dim``)."""
    mask = mask.bool()
    kept = torch.where(mask, values, torch.zeros_like(values))  # not values * mask: padding may hold inf
    if dim is None:
        return kept.sum() / mask.sum().clamp(min=1)
    return kept.sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(values - mean) / sqrt(var + 1e-8)`` over the masked positions (unbiased variance), 0 on padding.

    ``shift_mean=False`` scales without centring (the mean is added back), as PPO does for whitened rewards.
    """
    mask = mask.bool()
    count = mask.sum().to(values.dtype)
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask) * (count / (count - 1).clamp(min=1))  # Bessel's correction
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros_like(whitened))


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs (see the module docstring)."""
    diff = logprobs - ref_logprobs
    if estimator == "k1":
        return diff
    if estimator == "k3":
        return torch.expm1(-diff) + diff
    raise ValueError(f"kl_estimator must be one of {_KL_ESTIMATORS}, got {estimator!r}")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: ``-kl_coef * kl`` on every completion token, plus ``scores`` (batch,) on the last one."""
    mask = mask.bool()
    rewards = torch.where(mask, -kl_coef * kl, torch.zeros_like(kl))
    last = (mask.sum(1) - 1).clamp(min=0)  # right padding: the last completion token's index
    rewards[torch.arange(len(scores), device=scores.device), last] += scores.to(rewards.dtype)
    return rewards


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by generalised advantage estimation, 0 on padding.

    One reverse pass over the completion positions, vectorised over the batch: the value after a completion's
    last token is 0 (the episode ends there), so padding contributes nothing.
    """
    mask = mask.bool()
    values = torch.where(mask, values, torch.zeros_like(values))
    rewards = torch.where(mask, rewards, torch.zeros_like(rewards))
    length = rewards.shape[1]
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        running = torch.where(mask[:, t], delta + gamma * lam * running, torch.zeros_like(running))
        advantages[:, t] = running
    return advantages, advantages + values


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate loss; returns (loss, clip fraction, approximate KL 0.5 E[(log ratio)^2])."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
        approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
    return loss, clipfrac, approx_kl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss ``0.5 * mean max(unclipped, clipped squared error)``; returns (loss, clip fraction)."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(values.dtype), mask)
    return loss, clipfrac
