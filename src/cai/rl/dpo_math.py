"""Direct preference optimisation losses (Rafailov et al. 2023; IPO: Azar et al. 2023) with soft
labels, as pure functions.

For a pair (A, B) with label p = P(A is better), the implicit reward margin is

    h = (log pi(A) - log ref(A)) - (log pi(B) - log ref(B))

(log-probabilities summed over each answer's tokens). Losses, averaged over the batch:
- sigmoid: p * -log sigmoid(beta h) + (1 - p) * -log sigmoid(-beta h); with soft labels this is
  label-smoothed ("conservative") DPO, with p in {0, 1} the original DPO loss;
- ipo: p * (h - 1/(2 beta))^2 + (1 - p) * (h + 1/(2 beta))^2: the IPO regression of the margin
  to +-1/(2 beta), weighted by the label (p in {0, 1}: IPO as published).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "ipo")


def dpo_margins(
    policy_a: torch.Tensor, policy_b: torch.Tensor, ref_a: torch.Tensor, ref_b: torch.Tensor
) -> torch.Tensor:
    """h = (log pi(A) - log ref(A)) - (log pi(B) - log ref(B)). All [N] -> [N]."""
    return (policy_a - ref_a) - (policy_b - ref_b)


def dpo_loss(margins: torch.Tensor, p_a: torch.Tensor, beta: float, loss: str) -> torch.Tensor:
    """Mean loss over pairs. margins [N] (dpo_margins), p_a [N] in [0, 1] -> scalar."""
    if loss == "sigmoid":
        return (
            p_a * -F.logsigmoid(beta * margins) + (1 - p_a) * -F.logsigmoid(-beta * margins)
        ).mean()
    if loss == "ipo":
        target = 1.0 / (2.0 * beta)
        return (p_a * (margins - target) ** 2 + (1 - p_a) * (margins + target) ** 2).mean()
    raise ValueError(f"dpo loss {loss!r}: use one of {LOSSES}")


def hard_labels(p_a: list[float]) -> tuple[list[float], list[int]]:
    """Labels rounded to 0 or 1, and the indices kept: a tie (p = 0.5) says nothing and is
    dropped (the caller counts it)."""
    kept = [i for i, p in enumerate(p_a) if p != 0.5]
    return [1.0 if p_a[i] > 0.5 else 0.0 for i in kept], kept


def reward_metrics(
    policy_a: torch.Tensor,
    policy_b: torch.Tensor,
    ref_a: torch.Tensor,
    ref_b: torch.Tensor,
    p_a: torch.Tensor,
    beta: float,
) -> dict[str, torch.Tensor]:
    """TRL's DPO metrics: the implicit rewards beta * (log pi - log ref) of the preferred answer
    (`chosen`: A where p >= 0.5, else B) and the other, how often the chosen one's is higher,
    and their mean margin. All [N] -> scalars."""
    reward_a, reward_b = beta * (policy_a - ref_a), beta * (policy_b - ref_b)
    a_chosen = p_a >= 0.5
    chosen = torch.where(a_chosen, reward_a, reward_b)
    rejected = torch.where(a_chosen, reward_b, reward_a)
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "rewards/margins": (chosen - rejected).mean(),
    }
