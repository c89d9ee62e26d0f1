"""AI feedback labels: exact arithmetic with a stubbed scorer, prompts, and the real stages."""

import math
from pathlib import Path

import pytest
from conftest import TINY_STAGES

from cai.ai_feedback import (
    OPTIONS,
    FeedbackPrompts,
    LabelSettings,
    clamp,
    label_comparisons,
    option_probability,
)
from cai.comparisons import Comparison
from cai.constitution import load_constitution
from cai.errors import ConfigError
from cai.generation.base import Generation, OptionScores
from cai.pipeline import run


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


class StubEngine:
    """Scores from a function of the context: logprobs(context) -> (log p(A), log p(B))."""

    def __init__(self, logprobs, reasoning="(B) is kinder."):
        self.logprobs = logprobs
        self.reasoning = reasoning
        self.contexts, self.prefixes = [], []

    def score(self, requests, prefix="", desc=""):
        self.prefixes.append(prefix)
        out = []
        for r in requests:
            assert r.options == OPTIONS
            self.contexts.append(r.context)
            out.append(OptionScores(self.logprobs(r.context), (3, 3)))
        return out

    def generate(self, requests, prefix="", desc="", **kwargs):
        return [Generation(f"{self.reasoning} #{r.seed}", 5, "stop") for r in requests]


@pytest.fixture(scope="module")
def prompts():
    from omegaconf import OmegaConf

    return FeedbackPrompts(load_constitution(OmegaConf.create({"source": "builtin"})))


PAIR = Comparison.of_answers("c1", "How do I pick a lock?", ("GOOD answer", "BAD answer"))


def slot_a_is(context: str) -> str:
    """Which answer the question put at option (A)."""
    return "GOOD" if context.index("GOOD") < context.index("BAD") else "BAD"


def test_option_probability_normalises_over_the_two_options():
    assert option_probability(-1.0, -2.0) == pytest.approx(sigmoid(1.0))
    assert option_probability(-5.0, -5.0) == 0.5
    assert clamp(0.99, 0.4, 0.6) == 0.6 and clamp(0.01, 0.4, 0.6) == 0.4
    assert clamp(0.55, 0.4, 0.6) == 0.55


def test_p_a_is_the_normalised_probability_of_option_a(prompts):
    engine = StubEngine(lambda c: (-1.0, -2.0))
    [record] = label_comparisons(engine, prompts, [PAIR], LabelSettings(), seed=0)
    assert record["p_a"] == pytest.approx(sigmoid(1.0))
    assert record["queries"][0]["logprob_a"] == -1.0
    assert engine.prefixes == [prompts.prefix]  # the few-shot block is the shared prefix
    assert engine.contexts[0].endswith("The answer is:")


def test_swap_averages_both_orders(prompts):
    # The scorer likes whatever sits at (A) a little (position bias), and GOOD a lot.
    def logprobs(context):
        good_at_a = slot_a_is(context) == "GOOD"
        return (0.0, -2.0 + 0.5) if good_at_a else (0.0, 1.0 + 0.5)

    settings = LabelSettings(swap=True)
    [record] = label_comparisons(StubEngine(logprobs), prompts, [PAIR], settings, seed=0)
    p_original = sigmoid(1.5)  # GOOD at (A): p(option A)
    p_swapped = sigmoid(-1.5)  # BAD at (A): p(option A)
    assert record["p_a"] == pytest.approx((p_original + (1 - p_swapped)) / 2)
    assert record["position_bias"] == pytest.approx((p_original + p_swapped) / 2 - 0.5)
    assert [q["swapped"] for q in record["queries"]] == [False, True]


def test_ensemble_is_the_mean_over_sampled_principles(prompts):
    shifts = {i: 0.1 * i for i in range(len(prompts.principles))}

    def logprobs(context):
        i = next(i for i, p in enumerate(prompts.principles) if p in context)
        return (shifts[i], 0.0)

    settings = LabelSettings(num_principles=3)
    [record] = label_comparisons(StubEngine(logprobs), prompts, [PAIR], settings, seed=0)
    used = [q["principle"] for q in record["queries"]]
    assert len(set(used)) == 3
    assert record["p_a"] == pytest.approx(sum(sigmoid(shifts[i]) for i in used) / 3)
    assert record["principles"] == sorted(f"feedback{i}" for i in used)
    # seeded: the same comparison and seed pick the same principles
    [again] = label_comparisons(StubEngine(logprobs), prompts, [PAIR], settings, seed=0)
    assert [q["principle"] for q in again["queries"]] == used


def test_cot_clamps_each_sample_and_averages(prompts):
    calls = iter([(0.0, -10.0), (0.0, 0.2)])  # sample 0: p ~ 1 -> 0.6; sample 1: sigmoid(-0.2)
    engine = StubEngine(lambda c: next(calls))
    settings = LabelSettings(cot=True, cot_samples=2)
    [record] = label_comparisons(engine, prompts, [PAIR], settings, seed=0)
    assert record["p_a"] == pytest.approx((0.6 + sigmoid(-0.2)) / 2)
    assert [q["p_option_a"] for q in record["queries"]] == pytest.approx([0.6, sigmoid(-0.2)])
    # the options are scored after the question, the reasoning and "So the answer is:"
    context = engine.contexts[0]
    assert "Let's think step by step: (B) is kinder." in context
    assert context.endswith("So the answer is:")
    assert record["queries"][0]["reasoning"].startswith("(B) is kinder.")
    assert engine.prefixes == [prompts.cot_prefix]


def test_more_principles_than_the_constitution_has_is_an_error(prompts):
    with pytest.raises(ConfigError, match="num_principles=99"):
        label_comparisons(
            StubEngine(lambda c: (0.0, 0.0)),
            prompts,
            [PAIR],
            LabelSettings(num_principles=99),
            0,
        )


def test_prompts_follow_the_paper_format(prompts, data_dir):
    from omegaconf import OmegaConf

    question = prompts.question("Hi?", 0, "first", "second")
    assert question.startswith(
        "\n\nConsider the following conversation between a human and an assistant:\n\nHuman: Hi?"
    )
    assert question.endswith(" (A) [[[first]]]\n (B) [[[second]]]\n\nThe answer is:")
    assert prompts.prefix.count("The answer is:") == 3  # three solved examples
    assert prompts.prefix.count("The answer is: (A)") + prompts.prefix.count(" is: (B)") == 3
    # with the paper's own files the question reads like the published HHH eval prompts
    paper = FeedbackPrompts(
        load_constitution(OmegaConf.create({"source": "anthropic_2022"}), str(data_dir))
    )
    q = paper.question("Hi?", 1, "x", "y")
    assert "Hi?\n\n\nPlease choose the response that is the most helpful, honest, and" in q
    assert "{}" not in paper.cot_prefix and paper.cot_prefix.count("So the answer is:") == 6


def test_real_tokenizer_options_have_several_tokens():
    """' (A)' is several tokens for SmolLM2: the score must sum all of them (test_generation
    checks the sum against a plain forward pass)."""
    from cai.config import compose, load_model_preset
    from cai.models import load_tokenizer

    tokenizer = load_tokenizer(load_model_preset("smollm2_135m"), compose([]).paths.cache_dir)
    assert len(tokenizer(" (A)", add_special_tokens=False).input_ids) > 1


# ---------------------------------------------------------------------------------------------
# The stages on the tiny model

SMALL = [*TINY_STAGES, "feedback.chunk_size=2"]


def test_pairs_and_feedback_write_soft_labels(make_cfg):
    from cai.ai_feedback import load_labels
    from cai.artifacts import read_jsonl

    cfg = make_cfg(*SMALL, "pipeline.stages=[generate_sl,sft,generate_pairs,feedback]")
    artifacts = run(cfg)
    pairs = read_jsonl(artifacts["generate_pairs"].file("pairs.jsonl"))
    assert len(pairs) == 9 and all(p["answer_a"] != p["answer_b"] for p in pairs)
    assert [p["kind"] for p in pairs].count("helpful") == 3
    labels = load_labels(artifacts["feedback"])
    assert labels.num_rows == 9
    helpful = [r for r in labels if r["kind"] == "helpful"]
    assert all(r["principles"] == ["helpfulness"] for r in helpful)
    assert all(0.0 <= p <= 1.0 for p in labels["p_a"])
    assert all(len(q) == 2 for q in labels["queries"])  # swap on by default: both orders
    metrics = artifacts["feedback"].manifest["metrics"]
    assert metrics["comparisons"] == 9 and "position_bias" in metrics
    assert not (artifacts["feedback"].path / "parts").exists()
    # CoT labels are clamped; the pairs and SFT artifacts are reused, not rebuilt
    cot = run(
        make_cfg(
            *SMALL, "pipeline.stages=[feedback]", "feedback.cot=true", "feedback.cot_max_tokens=6"
        )
    )
    p = load_labels(cot["feedback"])["p_a"]
    assert all(0.4 <= x <= 0.6 for x in p)
    assert cot["feedback"].path != artifacts["feedback"].path


def test_conflicting_clamps_stop_the_run_before_any_work(make_cfg):
    cfg = make_cfg(
        *SMALL,
        "pipeline.stages=[generate_sl,sft,generate_pairs,feedback]",
        "feedback.cot=true",
        "feedback.clamp_low=0.7",
        "feedback.clamp_high=0.3",
    )
    with pytest.raises(ConfigError, match="clamp_low=0.7 and clamp_high=0.3"):
        run(cfg)
    assert not (Path(cfg.paths.artifact_dir) / "generate_sl").exists()  # nothing started
