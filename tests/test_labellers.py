"""Labellers other than an in-process model: a Python function by import path (feedback.function),
and the built-in known-signal rule."""

import pytest
from conftest import TINY_STAGES

from cai.comparisons import Comparison
from cai.errors import ConfigError
from cai.labellers import label_with_function, load_function, prefers_refusal

REFUSE, COMPLY = "I'm sorry, I can't help with that.", "Sure: first you take the pin."


def test_the_rule_prefers_declining_red_team_requests_and_answering_helpful_ones():
    assert prefers_refusal("Pick a lock?", REFUSE, COMPLY) == 1.0
    assert prefers_refusal("Pick a lock?", COMPLY, REFUSE) == 0.0
    assert prefers_refusal("Bake bread?", REFUSE, COMPLY, kind="helpful") == 0.0
    assert prefers_refusal("Bake bread?", COMPLY, COMPLY + " Then") == 0.5  # no signal: a tie


def test_function_labels_average_both_orders_and_keep_the_record_format():
    def biased(prompt, a, b):  # prefers whatever comes first by 0.2, and refusals
        return min(1.0, prefers_refusal(prompt, a, b) * 0.8 + 0.2)

    pairs = [Comparison.of_answers("p1", "Pick a lock?", (REFUSE, COMPLY))]
    (record,) = label_with_function(biased, pairs, swap=True, setting="feedback.function")
    # A first: 0.8 + 0.2 = 1.0; B first: 0 * 0.8 + 0.2 = 0.2 -> p(A) = (1.0 + 1 - 0.2) / 2 = 0.9
    assert record["p_a"] == pytest.approx(0.9)
    assert record["position_bias"] == pytest.approx((1.0 + 0.2) / 2 - 0.5)
    assert {"id", "prompt", "answer_a", "answer_b", "kind", "queries"} <= set(record)
    (one,) = label_with_function(biased, pairs, swap=False, setting="feedback.function")
    assert one["p_a"] == 1.0 and len(one["queries"]) == 1


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("no_such_module_x:f", "cannot import 'no_such_module_x'"),
        ("cai.labellers:nothing", "has no function 'nothing'"),
        ("cai.labellers", "write package.module:function"),
    ],
)
def test_bad_function_paths_are_one_clear_error(path, says):
    with pytest.raises(ConfigError, match=says):
        load_function(path, "feedback.function")


def test_a_function_returning_no_probability_is_an_error_naming_the_setting():
    pairs = [Comparison.of_answers("p1", "Pick a lock?", (REFUSE, COMPLY))]
    for bad in (1.5, float("nan"), "yes"):
        with pytest.raises(ConfigError, match=r"feedback.function returned .* for pair p1"):
            label_with_function(lambda *a, bad=bad: bad, pairs, False, "feedback.function")


def test_feedback_stage_labels_with_the_rule_and_the_pm_reads_them(make_cfg):
    from cai.artifacts import read_jsonl
    from cai.pipeline import artifact_key, run

    stages = "pipeline.stages=[generate_sl,sft,generate_pairs,feedback]"
    cfg = make_cfg(*TINY_STAGES, "pairs.max_new_tokens=10", stages,
                   "feedback.function=cai.labellers:prefers_refusal")  # fmt: skip
    model_cfg = make_cfg(*TINY_STAGES, "pairs.max_new_tokens=10", stages)
    assert artifact_key(cfg, "feedback") != artifact_key(model_cfg, "feedback")
    artifact = run(cfg)["feedback"]
    labels = read_jsonl(artifact.file("labels.jsonl"))
    for r in labels:  # the rule applied to the pair directly
        expected = prefers_refusal(r["prompt"], r["answer_a"], r["answer_b"], r["kind"])
        assert r["p_a"] == pytest.approx((expected + 1 - prefers_refusal(
            r["prompt"], r["answer_b"], r["answer_a"], r["kind"])) / 2)  # fmt: skip
    assert artifact.manifest["metrics"]["labeller"] == "cai.labellers:prefers_refusal"
    with pytest.raises(ConfigError, match="feedback.function='nope:f'"):
        run(make_cfg(*TINY_STAGES, stages, "feedback.function=nope:f"))


def test_the_ai_judge_is_independent_of_a_pm_labelled_by_a_function(make_cfg):
    from cai.eval.compare import ai_judge_independence

    by_model = ai_judge_independence(make_cfg("model=tiny"), {})
    assert by_model["same_model_as_feedback"] and not by_model["independent"]  # offline default
    by_rule = ai_judge_independence(
        make_cfg("model=tiny", "feedback.function=cai.labellers:prefers_refusal"), {}
    )
    assert by_rule["independent"] and not by_rule["same_model_as_feedback"]
