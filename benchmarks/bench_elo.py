"""Elo fitting speed: this project's Newton fit (cai.eval.elo.fit_elo) against the classic
Bradley-Terry minorise-maximise iteration (Zermelo 1929; Hunter 2004, "MM algorithms for
generalized Bradley-Terry models"), on the eval stage's workload: every pair of players judged
on every prompt, soft judgements, and the bootstrap over prompts (1,000 refits per judge and
dimension). Both fits are run to the same tolerance and must agree.

    python benchmarks/bench_elo.py                     # 10 players, 41 prompts, 200 refits each
    python benchmarks/bench_elo.py --players 16 --prompts 400
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cai.eval.elo import ELO_PER_NAT, Comparisons, fit_elo, win_probability  # noqa: E402


def mm_fit(c: Comparisons, players: int, anchor: int, weights, tol=1e-10, iterations=100000):
    """Hunter's MM update pi_i <- W_i / sum_j n_ij / (pi_i + pi_j), soft wins, weighted."""
    wins = np.bincount(c.first, weights * c.p_first, players) + np.bincount(
        c.second, weights * (1 - c.p_first), players
    )
    pi = np.ones(players)
    for _ in range(iterations):
        inv = weights / (pi[c.first] + pi[c.second])
        denominator = np.bincount(c.first, inv, players) + np.bincount(c.second, inv, players)
        new = wins / denominator
        new /= new[anchor]
        if np.max(np.abs(np.log(new) - np.log(pi))) < tol:
            pi = new
            break
        pi = new
    return np.log(pi) * ELO_PER_NAT


def workload(players: int, prompts: int, seed: int = 0) -> Comparisons:
    rng = np.random.default_rng(seed)
    truth = rng.normal(0, 100, players)
    records = [
        (a, b, float(win_probability(truth[a], truth[b]) + rng.normal(0, 0.1)), q)
        for q in range(prompts)
        for a in range(players)
        for b in range(a + 1, players)
    ]
    records = [(a, b, min(0.99, max(0.01, p)), q) for a, b, p, q in records]
    return Comparisons.from_records(records)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--players", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=41)
    parser.add_argument("--refits", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    c = workload(args.players, args.prompts)
    rng = np.random.default_rng(1)
    groups = np.unique(c.group)
    resamples = [
        np.bincount(rng.integers(0, len(groups), len(groups)), minlength=len(groups))[c.group]
        for _ in range(args.refits)
    ]
    print(
        f"{args.players} players, {args.prompts} prompts, {len(c)} comparisons, {args.refits} bootstrap refits"
    )
    timings = {"newton (ours)": [], "MM (Hunter 2004)": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        ours = [fit_elo(c, args.players, 0, w, prior=0.0) for w in resamples]
        timings["newton (ours)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        theirs = [mm_fit(c, args.players, 0, w.astype(float)) for w in resamples]
        timings["MM (Hunter 2004)"].append(time.perf_counter() - start)
    gap = max(float(np.max(np.abs(a - b))) for a, b in zip(ours, theirs, strict=True))
    for name, values in timings.items():
        print(
            f"{name:18s} median {statistics.median(values):7.3f} s  ({', '.join(f'{v:.3f}' for v in values)})"
        )
    ratio = statistics.median(timings["MM (Hunter 2004)"]) / statistics.median(
        timings["newton (ours)"]
    )
    print(f"largest difference between the two fits: {gap:.2e} Elo")
    print(f"ratio (MM time / ours): {ratio:.1f}x")


if __name__ == "__main__":
    main()
