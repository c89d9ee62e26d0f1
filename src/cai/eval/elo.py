"""Elo ratings from pairwise judgements: a Bradley-Terry model fitted by maximum likelihood, on
the paper's scale, one model anchored at 0, 95% intervals by bootstrap over prompts.

Scale (Bai et al. 2022, section 3.3 and Figure 2; Bai et al. 2022a, eq. 2.1):
    P(A beats B) = 1 / (1 + 10^((Elo_B - Elo_A) / 400))
The paper fixes SL-CAI 52B at 0; we fix SL-CAI of the run (`anchor`). A soft judgement p (a
probability that A is better, from a PM or the AI feedback model) counts as p of a win for A and
1 - p for B, as crowdworker comparisons would if each were repeated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ELO_PER_NAT = 400.0 / math.log(10.0)  # Elo points per unit of Bradley-Terry log-strength


def win_probability(elo_a: float | np.ndarray, elo_b: float | np.ndarray):
    """P(A beats B) on the Elo scale (elementwise for arrays)."""
    return 1.0 / (1.0 + 10.0 ** ((np.asarray(elo_b) - np.asarray(elo_a)) / 400.0))


@dataclass(frozen=True)
class Comparisons:
    """n pairwise judgements between players 0..k-1.

    first, second: (n,) int player indices; p_first: (n,) float in [0, 1], the (soft) win of
    `first`; group: (n,) int, the prompt each judgement is about (the bootstrap resamples these).
    """

    first: np.ndarray
    second: np.ndarray
    p_first: np.ndarray
    group: np.ndarray

    @classmethod
    def from_records(cls, records: list[tuple[int, int, float, int]]) -> Comparisons:
        """From (first, second, p_first, group) tuples."""
        if not records:
            raise ValueError("No comparisons to fit Elo ratings to.")
        first, second, p, group = zip(*records, strict=True)
        return cls(
            np.asarray(first, dtype=np.int64),
            np.asarray(second, dtype=np.int64),
            np.asarray(p, dtype=np.float64),
            np.asarray(group, dtype=np.int64),
        )

    def __len__(self) -> int:
        return len(self.first)


def fit_elo(
    comparisons: Comparisons,
    num_players: int,
    anchor: int = 0,
    weights: np.ndarray | None = None,
    prior: float = 1e-2,
    iterations: int = 100,
) -> np.ndarray:
    """Maximum-likelihood Bradley-Terry ratings (num_players,), Elo scale, `anchor` at 0.

    Maximises sum_c w_c [p_c log s(d_c) + (1 - p_c) log s(-d_c)] - prior/2 sum_k x_k^2 over the
    log-strengths x (x_anchor = 0), d_c = x_first - x_second, s the logistic function; Newton's
    method (the objective is concave). The weak Gaussian prior (sd 1/sqrt(prior) = 10 nats,
    ~1,700 Elo) keeps a player who wins every judgement finite instead of infinite.
    weights: (n,) per-comparison weight (bootstrap counts); None = all 1.
    """
    w = np.ones(len(comparisons)) if weights is None else np.asarray(weights, dtype=np.float64)
    free = np.array([k for k in range(num_players) if k != anchor], dtype=np.int64)
    k = num_players
    x = np.zeros(k)
    i, j, p = comparisons.first, comparisons.second, comparisons.p_first
    for _ in range(iterations):
        q = 1.0 / (1.0 + np.exp(-(x[i] - x[j])))  # (n,) model P(first wins)
        residual = w * (p - q)  # (n,) gradient contribution to x_first (minus for x_second)
        gradient = np.bincount(i, residual, k) - np.bincount(j, residual, k)  # (k,)
        curvature = w * q * (1.0 - q)  # (n,)
        hessian = (  # (k, k): the weighted Laplacian of the comparison graph
            np.bincount(i * k + i, curvature, k * k)
            + np.bincount(j * k + j, curvature, k * k)
            - np.bincount(i * k + j, curvature, k * k)
            - np.bincount(j * k + i, curvature, k * k)
        ).reshape(k, k)
        g = gradient[free] - prior * x[free]
        h = hessian[np.ix_(free, free)] + prior * np.eye(len(free))
        step = np.linalg.solve(h, g)  # Newton step for the concave objective
        x[free] += step
        if np.max(np.abs(step)) < 1e-10:
            break
    return x * ELO_PER_NAT


def bootstrap_elo(
    comparisons: Comparisons,
    num_players: int,
    anchor: int = 0,
    samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(elo, low, high), each (num_players,): the fit on all comparisons, and the central `level`
    interval of fits on `samples` bootstrap resamples of the prompts (groups) with replacement."""
    elo = fit_elo(comparisons, num_players, anchor)
    groups, index = np.unique(comparisons.group, return_inverse=True)
    rng = np.random.default_rng(seed)
    fits = np.empty((samples, num_players))
    for b in range(samples):
        counts = np.bincount(rng.integers(0, len(groups), len(groups)), minlength=len(groups))
        fits[b] = fit_elo(comparisons, num_players, anchor, weights=counts[index])
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(fits, [tail, 100.0 - tail], axis=0)
    return elo, low, high
