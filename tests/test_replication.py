"""Findings over seeds: rows carry their seed and replicate, one judge for several seeds, values
pooled over seeds with intervals that include the seed-to-seed spread (worked by hand), and the
figures and Elo table showing each seed."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pytest
from conftest import TINY_EVAL, TINY_STAGES

from cai.analysis.figures import FIGURES, elo_table, paper_reference
from cai.analysis.gather import as_table
from cai.analysis.pooling import every_seed, holds, pool_over_seeds, pooled_interval
from cai.results import row


def test_pooled_interval_by_hand():
    # three seeds at 10, 20, 30, each +-5 over prompts: s = 10, t(2 df) = 4.303
    mean, low, high = pooled_interval([10.0, 20.0, 30.0], [5.0, 15.0, 25.0], [15.0, 25.0, 35.0])
    seed_term = 4.303 * 10.0 / math.sqrt(3)
    half = math.sqrt(seed_term**2 + 5.0**2)
    assert mean == 20.0
    assert (low, high) == pytest.approx((20.0 - half, 20.0 + half))
    # seeds that agree exactly: only the prompts' error is left, in full (the same prompts)
    assert pooled_interval([7.0, 7.0], [5.0, 6.0], [9.0, 8.0]) == (7.0, 7.0 - 1.5, 7.0 + 1.5)
    assert every_seed([1.0, 2.0, 3.0], 0.0) == "above"
    assert every_seed([-1.0, -2.0], 0.0) == "below"
    assert every_seed([-1.0, 2.0], 0.0) == "mixed"
    assert every_seed([0.6, 0.7], 0.5) == "above"


def _elo(seed, value, replicate="r1", method="rl_cai", rl_sequences=32, dimension="harmlessness"):
    return row(stage="eval", run_id=f"key{seed}", model="m", parameters=1, eval=dimension,
               method=method, judge="pm_harmlessness", rl_sequences=rl_sequences, metric="elo",
               value=value, low=value - 10, high=value + 10, n=16, flag="", independent=True,
               seed=seed, replicate=replicate)  # fmt: skip


def seeded_rows() -> list[dict]:
    rows = [_elo(s, v) for s, v in ((0, -30.0), (1, 20.0), (2, -10.0))]  # mixed signs
    rows += [_elo(s, v, rl_sequences=64) for s, v in ((0, 40.0), (1, 50.0), (2, 60.0))]  # above
    rows += [_elo(s, v, dimension="helpfulness") for s, v in ((0, 5.0), (1, 6.0), (2, 7.0))]
    rows += [_elo(s, v, dimension="helpfulness", rl_sequences=64) for s, v in ((0, 1.0), (1, 2.0),
                                                                               (2, 3.0))]  # fmt: skip
    rows += [_elo(0, 99.0, replicate="other")]  # another config: never pooled with r1
    legacy = _elo(0, 7.0, replicate="") | {"seed": ""}  # written before seeds were recorded
    return [*rows, legacy]


def test_pool_over_seeds_keeps_replicates_apart():
    pooled = pool_over_seeds(as_table(seeded_rows()))
    mine = pooled[pooled.run_id == "pooled:r1"]
    assert len(mine) == 4 and set(mine.seeds) == {3}
    first = mine[(mine.rl_sequences == 32) & (mine["eval"] == "harmlessness")].iloc[0]
    assert first.value == pytest.approx(-20.0 / 3)
    assert first.seed_values == {0: -30.0, 1: 20.0, 2: -10.0}
    assert first.every_seed == "mixed" and holds(first) == "no"
    later = mine[(mine.rl_sequences == 64) & (mine["eval"] == "harmlessness")].iloc[0]
    assert later.every_seed == "above" and holds(later) == "every seed"
    assert later.n == 3 * 16  # comparisons of all seeds
    # the other replicate and the legacy row pass through, one seed each
    assert list(pooled[pooled.replicate == "other"].value) == [99.0]
    assert holds(pooled[pooled.replicate == "other"].iloc[0]) == "one seed"
    assert len(pooled[(pooled.replicate == "") & (pooled.value == 7.0)]) == 1


def test_figures_and_elo_table_show_each_seed():
    table = as_table(seeded_rows())
    text = elo_table(table, paper_reference())
    line = next(x for x in text.splitlines() if "| 64 | pm_harmlessness | harmlessness |" in x)
    assert "| +50 |" in line and "| 3: +40, +50, +60 | every seed |" in line
    fig8 = FIGURES["fig8_rl_sequences"](pool_over_seeds(table), paper_reference())
    labels = [str(c.get_label()) for ax in fig8.axes for c in ax.containers]
    assert any("mean of 3 seeds" in label for label in labels)
    points = [c.get_offsets() for ax in fig8.axes for c in ax.collections if len(c.get_offsets())]
    assert any(sorted(p[:, 1].tolist()) == [-30.0, -10.0, 20.0, 40.0, 50.0, 60.0] for p in points)
    fig2 = FIGURES["fig2_pareto"](pool_over_seeds(table), paper_reference())
    scattered = [c.get_offsets() for ax in fig2.axes for c in ax.collections]
    assert any(len(p) == 6 for p in scattered)  # 2 snapshots x 3 seeds, (help, harm) pairs
    plt.close("all")


def test_one_judge_for_every_seed_and_rows_carry_their_seed(make_cfg, data_dir):
    from cai.pipeline import artifact_key, replicate_id

    base = [*TINY_STAGES, *TINY_EVAL, f"paths.data_dir={data_dir}", "judge.seed=0"]
    zero, one = make_cfg(*base, "seed=0"), make_cfg(*base, "seed=1")
    assert artifact_key(zero, "judge") == artifact_key(one, "judge")
    assert artifact_key(zero, "sft") != artifact_key(one, "sft")
    assert artifact_key(zero, "eval") != artifact_key(one, "eval")
    # judge.seed=0 under seed 0 is the judge a run without judge.seed builds
    plain = make_cfg(*[a for a in base if a != "judge.seed=0"], "seed=0")
    assert artifact_key(plain, "judge") == artifact_key(zero, "judge")
    assert replicate_id(zero) == replicate_id(one)
    assert replicate_id(zero) != replicate_id(make_cfg(*base, "seed=0", "ppo.lr=1e-6"))
    # replicate composes the default pipeline with DPO beside PPO at seeds 0, 1, 2
    replicate = make_cfg("experiment=replicate")
    assert list(replicate.eval.models) == ["helpful", "sl_cai", "rl_cai", "rl_cai_dpo"]
    assert replicate.judge.seed == 0


def test_a_run_stamps_seed_and_replicate_on_its_rows(tmp_path, data_dir):
    from conftest import run_train

    from cai.results import read_rows

    args = [*TINY_STAGES, *TINY_EVAL, f"paths.data_dir={data_dir}", "seed=3", "judge.seed=0",
            "pipeline.stages=[generate_sl,sft,judge,eval]", "eval.models=[helpful,sl_cai]",
            "eval.judges=[pm]"]  # fmt: skip
    done = run_train(args, tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_rows(next((tmp_path / "outputs" / "runs").glob("*/*/results.csv")))
    by_stage = {r["stage"]: r for r in rows}
    assert by_stage["eval"]["seed"] == "3" and by_stage["judge"]["seed"] == "0"
    assert len({r["replicate"] for r in rows}) == 1 and len(rows[0]["replicate"]) == 12
    published = read_rows(next((tmp_path / "results" / "runs").glob("*.csv")))
    assert {r["seed"] for r in published} == {"0", "3"}
