"""PPO maths as pure functions (settings of Bai et al. 2022a, used by the CAI paper's RL stage:
KL coefficient 0.001, clip 0.2, gamma 1, no entropy bonus). Shapes: B rollouts, T answer tokens;
`mask` [B, T] is 1 on real answer tokens and 0 on padding after the answer ends.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, T] over positions where mask [B, T] is 1. Returns a scalar."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked positions of x [B, T]; padding stays 0.

    shift_mean=False keeps the mean (rescales only), as for advantages' sign-preserving use.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_shaped_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * (log pi - log pi_ref) at every answer token, plus the PM
    score at the last answer token.

    scores: [B]; logprobs, ref_logprobs, mask: [B, T]. Returns (rewards [B, T], kl [B, T]), where
    kl is the per-token estimate log pi - log pi_ref (summed over T it estimates KL(pi || ref)).
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & (mask > 0)  # final real token
    rewards = rewards + last.to(rewards.dtype) * scores[:, None]
    return rewards, kl


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, vectorised over the batch (a loop over time only).

    rewards, values, mask: [B, T]. delta_t = r_t + gamma * V_{t+1} - V_t (V past the last real
    token is 0); A_t = delta_t + gamma * lam * A_{t+1}. Returns (advantages, returns = A + V),
    both [B, T], zero on padding.
    """
    batch, length = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(length)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * m
        # a padded position passes nothing back: the episode ended before it
        next_value = values[:, t] * m
        next_advantage = advantage * m
    return advantages, (advantages + values) * mask


def gae_loop(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """The textbook per-sequence loop (lists of floats), for checking `gae`."""
    out = []
    for r, v, m in zip(rewards.tolist(), values.tolist(), mask.tolist(), strict=True):
        n = int(sum(m))
        adv = [0.0] * len(r)
        running = 0.0
        for t in reversed(range(n)):
            next_v = v[t + 1] if t + 1 < n else 0.0
            delta = r[t] + gamma * next_v - v[t]
            running = delta + gamma * lam * running
            adv[t] = running
        out.append(adv)
    return torch.tensor(out, dtype=rewards.dtype)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate: mean of max(-A r, -A clip(r, 1 - c, 1 + c)), r = pi / pi_old.

    All inputs [B, T]. Returns (loss, clip fraction, approximate KL 0.5 E[(log r)^2]).
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approxkl = 0.5 * masked_mean(log_ratio**2, mask)
    return loss, clipfrac, approxkl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * mean of max((V - R)^2, (clip(V, V_old +- c) - R)^2).

    All inputs [B, T]. Returns (loss, clip fraction)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


class AdaptiveKLController:
    """Ziegler et al. 2019: move the KL coefficient so the observed KL tracks `target`."""

    def __init__(self, init: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, observed_kl: float, batch_size: int) -> float:
        error = max(-0.2, min(0.2, observed_kl / self.target - 1.0))
        self.value *= 1.0 + error * batch_size / self.horizon
        return self.value
