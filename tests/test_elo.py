"""Elo from pairwise judgements: known ratings recovered, anchoring, monotonicity."""

import numpy as np
import pytest

from cai.eval.elo import Comparisons, bootstrap_elo, fit_elo, win_probability


def simulate(ratings, prompts=300, seed=0, soft=False):
    """Every pair of players judged once per prompt, outcomes drawn from the Elo model."""
    rng = np.random.default_rng(seed)
    records = []
    for prompt in range(prompts):
        for a in range(len(ratings)):
            for b in range(a + 1, len(ratings)):
                p = win_probability(ratings[a], ratings[b])
                records.append((a, b, float(p) if soft else float(rng.random() < p), prompt))
    return Comparisons.from_records(records)


def test_win_probability_is_the_papers_scale():
    assert win_probability(0, 0) == pytest.approx(0.5)
    assert win_probability(400, 0) == pytest.approx(10 / 11)  # 400 points: 10:1 odds
    assert win_probability(0, 400) == pytest.approx(1 / 11)


def test_exact_soft_judgements_give_the_ratings_back():
    truth = np.array([0.0, 120.0, -80.0, 250.0])
    elo = fit_elo(simulate(truth, prompts=20, soft=True), 4, anchor=0)
    np.testing.assert_allclose(elo, truth, atol=2.0)  # only the weak prior pulls (< 2 points)


def test_known_ratings_within_the_bootstrap_interval():
    truth = np.array([0.0, 100.0, -150.0, 60.0])
    elo, low, high = bootstrap_elo(simulate(truth, prompts=400, seed=1), 4, anchor=0, samples=300)
    assert np.all(low <= truth) and np.all(truth <= high), (truth, low, high)
    assert np.all(np.abs(elo - truth) < 40)
    assert np.all(high[1:] - low[1:] > 5)  # real intervals, not points
    assert np.all(high[1:] - low[1:] < 150)


def test_anchor_is_zero_in_the_fit_and_every_resample():
    truth = np.array([50.0, -30.0, 200.0])
    comparisons = simulate(truth, prompts=100, seed=2)
    elo, low, high = bootstrap_elo(comparisons, 3, anchor=1, samples=50)
    assert elo[1] == 0.0 and low[1] == 0.0 and high[1] == 0.0
    # anchoring shifts every rating by the same amount (up to the weak prior's pull)
    other = fit_elo(comparisons, 3, anchor=0)
    np.testing.assert_allclose(elo - elo[1], other - other[1], atol=0.5)


def test_a_player_who_always_wins_rates_above_one_who_always_loses():
    records = [(0, 1, 1.0, g) for g in range(10)] + [(1, 2, 1.0, g) for g in range(10)]
    elo = fit_elo(Comparisons.from_records(records), 3, anchor=1)
    assert elo[0] > 0 > elo[2]
    assert np.all(np.isfinite(elo))


def test_weights_count_comparisons():
    one = Comparisons.from_records([(0, 1, 0.75, 0)])
    twice = Comparisons.from_records([(0, 1, 0.75, 0), (0, 1, 0.75, 1)])
    np.testing.assert_allclose(
        fit_elo(one, 2, weights=np.array([2.0])), fit_elo(twice, 2), atol=1e-9
    )


def test_no_comparisons_is_an_error():
    with pytest.raises(ValueError, match="No comparisons"):
        Comparisons.from_records([])
