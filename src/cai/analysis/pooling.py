"""Findings over seeds: the result rows of one replicate (runs whose configs differ in their seed
alone, `replicate` in the rows) pooled into one row per measurement, with an interval that
includes the seed-to-seed spread.

A bootstrap over prompts sees which prompts happened to be drawn, not the randomness of sampling
and training, which at 135M moves results more than most effects (README, "Findings over seeds").
For k >= 2 seeds with values v_1..v_k and their own 95% intervals:

- pooled value: the mean of the seeds' values;
- half-width: sqrt((t * s / sqrt(k))^2 + h^2), where s is the standard deviation of the seeds'
  values (sampling and training randomness), t the 97.5% quantile of Student's t with k - 1
  degrees of freedom (few seeds: wide), and h the mean half-width of the seeds' own intervals.
  The seeds answer the same held-out prompts, so averaging seeds does not shrink the prompt
  sampling error h; it is added in full, not divided by k (conservative);
- every_seed: `above` when every seed's value lies above the reference (0 for Elo and score
  differences, 1/2 for agreements and win rates), `below` when every one lies below, else
  `mixed`. A finding is stated where every seed agrees or the pooled interval excludes the
  reference.

Rows of one seed only, and rows without a replicate id (written before seeds were recorded),
pass through unchanged.
"""

from __future__ import annotations

import math

import pandas as pd

from cai.results import ROW_FIELDS

# The value a measurement is compared with: an effect is a difference from it
REFERENCE = {
    "agreement_paper_pm": 0.5,
    "agreement_paper_pm_length_matched": 0.5,
    "agreement_paper_pm_within_model": 0.5,
    "win_rate_vs_anchor": 0.5,
    "accuracy": 0.5,
}
DEFAULT_REFERENCE = 0.0  # Elo, score gains, margins over a rule
# 97.5% quantiles of Student's t by degrees of freedom (k seeds: k - 1); 1.96 beyond the table
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
# what one measurement of one replicate is: every field but who measured it (run_id, seed) and
# what it measured
MEASUREMENT = [
    f
    for f in ROW_FIELDS
    if f not in ("run_id", "seed", "value", "low", "high", "n", "flag", "independent")
]


def pooled_interval(values: list[float], lows: list[float], highs: list[float]) -> tuple:
    """(mean, low, high) of k seeds' values with their own 95% intervals (module docstring).
    A seed without an interval (low or high NaN) adds no prompt error."""
    k = len(values)
    mean = sum(values) / k
    if k < 2:
        return mean, lows[0], highs[0]
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1))
    seed_term = T_975.get(k - 1, 1.96) * spread / math.sqrt(k)
    halves = [(h - lo) / 2 for lo, h in zip(lows, highs, strict=True) if not math.isnan(h - lo)]
    prompt_term = sum(halves) / len(halves) if halves else 0.0
    half = math.sqrt(seed_term**2 + prompt_term**2)
    return mean, mean - half, mean + half


def every_seed(values: list[float], reference: float) -> str:
    """'above' or 'below' when every seed's value lies on that side of `reference`, else
    'mixed'."""
    if all(v > reference for v in values):
        return "above"
    if all(v < reference for v in values):
        return "below"
    return "mixed"


def pool_over_seeds(table: pd.DataFrame) -> pd.DataFrame:
    """The table with each replicate's rows of two or more seeds replaced by one pooled row per
    measurement: seed NaN, run_id `pooled:<replicate>`, `seeds` (k), `seed_values` ({seed:
    value}), `every_seed` and the flags of all seeds joined. Other rows unchanged (seeds 1,
    seed_values empty). A seed measured twice (a rerun) counts once: its rows are averaged."""
    table = table.copy()
    table["seeds"] = 1
    table["seed_values"] = [{} for _ in range(len(table))]
    table["every_seed"] = ""
    if table.empty or "replicate" not in table:
        return table
    candidates = (table.replicate != "") & table.seed.notna()
    keep, pooled = [table[~candidates]], []
    for _, group in table[candidates].groupby(MEASUREMENT, dropna=False, sort=False):
        per_seed = group.groupby("seed", sort=True)
        if per_seed.ngroups < 2:
            keep.append(group)
            continue
        means = per_seed[["value", "low", "high", "n"]].mean()
        values = [float(v) for v in means.value]
        value, low, high = pooled_interval(values, list(means.low), list(means.high))
        first = group.iloc[0].to_dict()
        reference = REFERENCE.get(str(first["metric"]), DEFAULT_REFERENCE)
        flags = sorted({f for flag in group.flag for f in str(flag).split(";") if f})
        independent = group.independent.dropna()
        pooled.append(
            first
            | {
                "run_id": f"pooled:{first['replicate']}",
                "seed": math.nan,
                "value": value,
                "low": low,
                "high": high,
                "n": float(means.n.sum()),
                "flag": ";".join(flags),
                "independent": bool(independent.all()) if len(independent) else None,
                "seeds": len(values),
                "seed_values": {int(s): float(v) for s, v in zip(means.index, values, strict=True)},
                "every_seed": every_seed(values, reference),
            }
        )
    return pd.concat([*keep, pd.DataFrame(pooled)], ignore_index=True) if pooled else table


def holds(row: pd.Series) -> str:
    """Whether a pooled row's effect holds: 'every seed' (all on one side of the reference),
    'pooled interval' (the interval excludes the reference, seeds not all agreeing), or 'no'.
    For a row of one seed: 'one seed' (no finding can be stated from it)."""
    if int(row.get("seeds", 1) or 1) < 2:
        return "one seed"
    reference = REFERENCE.get(str(row.metric), DEFAULT_REFERENCE)
    if row.every_seed in ("above", "below"):
        return "every seed"
    if row.low > reference or row.high < reference:
        return "pooled interval"
    return "no"


__all__ = ["holds", "pool_over_seeds", "pooled_interval", "every_seed"]
