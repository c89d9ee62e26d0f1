"""PPO maths against values worked out by hand."""

import math

import pytest
import torch

from cai.rl.ppo_math import (
    AdaptiveKLController,
    gae,
    gae_loop,
    kl_shaped_rewards,
    masked_mean,
    policy_loss,
    value_loss,
    whiten,
)


def test_kl_shaped_rewards_by_hand():
    scores = torch.tensor([2.0, -1.0])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = kl_shaped_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    assert kl.tolist() == [[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]]
    # -0.1 * kl everywhere, + the score at the last real token (index 2, then index 1)
    expected = [[-0.05, 0.0, 0.1 + 2.0], [-0.1, -1.0, 0.0]]
    assert torch.allclose(rewards, torch.tensor(expected))


def test_gae_by_hand_gamma_1():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.4]])
    mask = torch.ones(1, 3)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # deltas: 0 + 0.2 - 0.5 = -0.3; 0 + 0.4 - 0.2 = 0.2; 1 + 0 - 0.4 = 0.6
    a2 = 0.6
    a1 = 0.2 + 0.5 * a2
    a0 = -0.3 + 0.5 * a1
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2]]))
    assert torch.allclose(ret, adv + values)


def test_vectorised_gae_matches_the_loop():
    torch.manual_seed(0)
    rewards, values = torch.randn(5, 9), torch.randn(5, 9)
    lengths = torch.tensor([9, 1, 4, 7, 0])
    mask = (torch.arange(9)[None] < lengths[:, None]).float()
    for gamma, lam in ((1.0, 0.95), (0.9, 0.5), (1.0, 1.0)):
        adv, _ = gae(rewards, values, mask, gamma, lam)
        assert torch.allclose(adv, gae_loop(rewards, values, mask, gamma, lam), atol=1e-6)


def test_whiten_by_hand():
    x = torch.tensor([[1.0, 3.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    out = whiten(x, mask)
    assert torch.allclose(out, torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-4)  # mean 2, std 1
    kept = whiten(x, mask, shift_mean=False)
    assert torch.allclose(kept, torch.tensor([[1.0, 3.0, 0.0]]), atol=1e-4)
    assert masked_mean(x, mask) == 2.0


def test_policy_loss_clips_by_hand():
    old = torch.zeros(1, 2)
    new = torch.tensor([[math.log(1.5), math.log(0.9)]])  # ratios 1.5 and 0.9
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    loss, clipfrac, approxkl = policy_loss(new, old, adv, mask, clip=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.9, 0.9) = 0.9
    assert float(loss) == pytest.approx((-1.2 + 0.9) / 2)
    assert float(clipfrac) == 0.5
    assert float(approxkl) == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.9) ** 2) / 2)


def test_value_loss_clips_by_hand():
    values, old, returns = (
        torch.tensor([[1.0, 0.1]]),
        torch.tensor([[0.0, 0.0]]),
        torch.tensor([[0.0, 1.0]]),
    )
    loss, clipfrac = value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: max(1.0, 0.2^2) = 1.0; token 1: max(0.81, (0.1 - 1)^2) = 0.81
    assert float(loss) == pytest.approx(0.5 * (1.0 + 0.81) / 2)
    assert float(clipfrac) == 0.0


def test_adaptive_kl_moves_towards_the_target():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert controller.update(12.0, batch_size=10) == pytest.approx(0.1 * 1.02)
    assert controller.update(0.0, batch_size=10) < 0.102
