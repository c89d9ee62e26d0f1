"""experiment=signal_check: the known-signal rule, the PM's held-out AI labels, the rule judge,
and the pipeline run end to end on the tiny model."""

import pytest
from conftest import TINY_EVAL, TINY_STAGES

from cai.comparisons import Comparison, decided_pairs, hold_out
from cai.errors import ConfigError
from cai.labellers import is_complete, signal_rule, signal_score

FORTY = " ".join(["word"] * 39) + " end."  # 40 words, complete
CUT = " ".join(["word"] * 40)  # 40 words, cut off mid-sentence


def test_the_rule_orders_decline_then_completeness():
    assert is_complete(FORTY) and not is_complete(CUT) and is_complete('He said "no."  ')
    # complete (3 logits) against cut off (0): p = 1 / (1 + e^-3) = 0.9526
    assert signal_rule("q", FORTY, CUT) == pytest.approx(0.952574, abs=1e-6)
    assert signal_rule("q", CUT, FORTY, kind="helpful") == pytest.approx(0.047426, abs=1e-6)
    assert signal_score(FORTY) == 3.0 and signal_score(CUT) == 0.0
    # two complete answers tie whatever their lengths; so do two cut off
    eighty = " ".join(["word"] * 79) + " end."
    assert signal_rule("q", FORTY, eighty, kind="helpful") == 0.5
    assert signal_rule("q", CUT, CUT + " more words", kind="helpful") == 0.5
    # a decline wins a red-team pair and loses a helpfulness pair, whatever else
    decline = "I'm sorry, I can't help with that " + CUT
    assert signal_rule("q", decline, FORTY) > 0.999999
    assert signal_rule("q", decline, FORTY, kind="helpful") < 1e-6


def test_held_out_pairs_are_chosen_by_prompt_and_only_among_ai_labels():
    ai = [Comparison.of_answers(f"p{i}", f"prompt {i}", ("a", "b"), p_a=0.9, source="ai_harmless")
          for i in range(400)]  # fmt: skip
    human = [Comparison.of_answers(f"h{i}", f"prompt {i}", ("a", "b"), p_a=1.0, source="human")
             for i in range(50)]  # fmt: skip
    train, held = hold_out(ai + human, 25)
    assert 70 <= len(held) <= 130  # about a quarter of 400 prompts
    assert all(c.source == "ai_harmless" for c in held)
    assert len(train) + len(held) == 450 and all(c in train for c in human)
    assert hold_out(ai + human, 25)[1] == held  # the same prompts every time
    assert hold_out(ai, 0) == (ai, [])
    # a pair with the same prompt text is held out with it (no prompt is on both sides)
    assert {c.prompt for c in held}.isdisjoint({c.prompt for c in train if c.source != "human"})


def test_decided_pairs_put_the_preferred_answer_first_and_drop_close_calls():
    c = [Comparison.of_answers(str(i), "q", (f"a{i}", f"b{i}"), p_a=p)
         for i, p in enumerate([0.9, 0.1, 0.6, 0.5])]  # fmt: skip
    pairs = decided_pairs(c, 0.25)
    assert [(a[-1]["content"], b[-1]["content"]) for a, b in pairs] == [("a0", "b0"), ("b1", "a1")]
    assert len(decided_pairs(c, 0.0)) == 3  # ties (0.5) never count


def test_new_settings_at_their_defaults_leave_every_key_as_it_was(make_cfg):
    from cai.stages.generate_sl import STAGE as SL
    from cai.stages.pm import STAGE as PM

    cfg = make_cfg("model=tiny")
    assert "max_prompts" not in SL.inputs(cfg, {}, {})["config"]["sl"]
    assert not {"holdout_percent", "epochs"} & set(PM.inputs(cfg, {}, {})["config"]["pm"])
    on = make_cfg("model=tiny", "sl.max_prompts=4", "pm.holdout_percent=25", "pm.epochs=2")
    assert SL.inputs(on, {}, {})["config"]["sl"]["max_prompts"] == 4
    assert PM.inputs(on, {}, {})["config"]["pm"]["holdout_percent"] == 25
    assert PM.inputs(on, {}, {})["config"]["pm"]["epochs"] == 2


def test_the_rule_judge_needs_its_function(make_cfg):
    from cai.stages.eval import check_settings

    with pytest.raises(ConfigError, match="eval.rule is not set"):
        check_settings(make_cfg("model=tiny", "eval.judges=[rule]"))
    with pytest.raises(ConfigError, match="eval.rule='nope:f'"):
        check_settings(make_cfg("model=tiny", "eval.judges=[rule]", "eval.rule=nope:f"))


def test_signal_check_runs_every_stage_and_the_rule_judges_every_pair(make_cfg):
    from cai.artifacts import read_jsonl
    from cai.pipeline import run

    cfg = make_cfg(
        "experiment=signal_check", *TINY_STAGES, *TINY_EVAL,
        "data.max_red_team=8", "data.max_helpful=8", "data.max_eval=2", "sl.max_prompts=2",
        "pairs.max_new_tokens=12", "pm.max_steps=2", "pm.max_eval=4", "pm.holdout_percent=50",
        "pm.holdout_min_margin=0",
        "ppo.steps=2", "ppo.batch_size=4", "ppo.minibatch_size=4", "ppo.max_new_tokens=8",
        "ppo.snapshot_sequences=[4]", "dpo.snapshot_sequences=[4]", "dpo.batch_size=4",
        "eval.max_red_team=2", "eval.max_helpful=2", "eval.max_new_tokens=8",
    )  # fmt: skip
    artifacts = run(cfg)
    sl = read_jsonl(artifacts["generate_sl"].file("red_team.jsonl"))
    assert len(sl) == 2  # sl.max_prompts caps the SL data, not the pairs
    pm = artifacts["pm"].manifest["metrics"]
    assert pm["held_out_pairs"] > 0
    assert pm["train_pairs"] + pm["held_out_pairs"] <= 16
    assert {k for k in pm["eval"] if k.startswith("heldout_")}  # measured on its own labels
    history = artifacts["ppo"].manifest["metrics"]["last"]
    assert {
        "objective/scores_red_team",
        "answers/mean_tokens_helpful",
        "objective/score_gain",
    } <= set(history)  # the gain: every PPO prompt has SL-CAI answers from generate_pairs
    ev = artifacts["eval"]
    judgements = read_jsonl(ev.file("judgements.jsonl"))
    samples = read_jsonl(ev.file("samples.jsonl"))
    by_player = {(s["prompt_id"], s["player"]): s for s in samples}
    rule = [j for j in judgements if j["judge"] == "rule"]
    players = {s["player"] for s in samples}
    assert len(rule) == 4 * len(players) * (len(players) - 1) // 2  # every pair, 4 prompts
    for j in rule:  # the rule applied to the two answers directly, both orders averaged
        a = by_player[(j["prompt_id"], j["player_a"])]
        b = by_player[(j["prompt_id"], j["player_b"])]
        kind = a["kind"]
        expected = (signal_rule("", a["answer"], b["answer"], kind)
                    + 1 - signal_rule("", b["answer"], a["answer"], kind)) / 2  # fmt: skip
        assert j["p_a"] == pytest.approx(expected)
    validation = ev.manifest["metrics"]["validation"]["rule"]
    assert validation["same_rule_as_feedback"] and not validation["independent"]


def test_ppo_metrics_per_prompt_kind():
    import torch

    from cai.modules.ppo import Rollout, per_kind_metrics

    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float)
    rollout = Rollout(["p"] * 3, ["Sure.", "I'm sorry, I can't.", "Here."],
                      torch.zeros(3, 6, dtype=torch.long), torch.zeros(3, dtype=torch.long),
                      mask, [True] * 3, ["red_team", "red_team", "helpful"])  # fmt: skip
    m = per_kind_metrics(rollout, torch.tensor([0.2, 0.6, -1.0]))
    assert m["objective/scores_red_team"] == pytest.approx(0.4)
    assert m["objective/scores_helpful"] == pytest.approx(-1.0)
    assert m["answers/mean_tokens_red_team"] == 2.0 and m["answers/mean_tokens_helpful"] == 4.0
    assert m["answers/refusal_rate_red_team"] == 0.5 and m["answers/refusal_rate_helpful"] == 0.0


def test_score_gain_is_the_score_less_the_pm_score_of_sl_cai_answers_to_the_same_prompt():
    import torch

    from cai.modules.ppo import per_kind_gains, score_gains
    from cai.stages.ppo import PromptBaselines, start_model_answers

    calls = []

    def reward_fn(prompts, answers):  # a stub scorer: the answer's length
        calls.append(len(answers))
        return [float(len(a)) for a in answers]

    answers = {"p1": ["ab", "abcd"],  # baseline (2 + 4) / 2 = 3
               "p2": ["a", "a"]}  # fmt: skip  # baseline 1
    baselines = PromptBaselines(answers, reward_fn)
    got = baselines(["p1", "p2", "p1", "unknown"])
    assert got[:3] == [3.0, 1.0, 3.0] and got[3] != got[3]  # nan: no pair for that prompt
    assert calls == [2, 2]  # two prompts, two answers each, each prompt scored once alone
    assert baselines(["p2"]) == [1.0] and calls == [2, 2]  # already known: not scored again
    gains = score_gains(torch.tensor([5.0, 0.5, 3.0, 9.0]), got)
    assert gains[:3] == [2.0, -0.5, 0.0]
    metrics = per_kind_gains(["red_team", "helpful", "red_team", "helpful"], gains)
    assert metrics == {"objective/score_gain": pytest.approx(1.5 / 3),
                       "objective/score_gain_red_team": 1.0,
                       "objective/score_gain_helpful": -0.5}  # fmt: skip
    assert per_kind_gains([], []) == {}
    assert score_gains(torch.tensor([1.0, 2.0]), []) == []  # no baselines: no gains
    # a prompt with three answers (a helpfulness prompt's samples) averages all three
    assert PromptBaselines({"p": ["a", "abc", "abcde"]}, reward_fn)(["p"]) == [3.0]
    assert start_model_answers("some/folder", {}) == {}  # another start model: no gain


def test_score_gain_measures_each_variant_against_its_own_start_model(make_cfg):
    """SL-CAI's answers (generate_pairs) for RL-CAI; the helpful model's own answers
    (generate_sl: initial red-team answers, helpfulness samples) for the baselines that start
    from it, not SL-CAI's."""
    from cai.artifacts import read_jsonl
    from cai.pipeline import run
    from cai.stages.ppo import start_model_answers

    done = run(make_cfg(*TINY_STAGES, "pipeline.stages=[generate_sl,sft,generate_pairs]"))
    sl = {r["prompt"]: r for r in read_jsonl(done["generate_sl"].file("red_team.jsonl"))}
    pairs = {r["prompt"]: r for r in read_jsonl(done["generate_pairs"].file("pairs.jsonl"))}
    from_sft = start_model_answers("sft", done)
    from_policy = start_model_answers("policy", done)
    prompt = next(p for p in pairs if p in sl)
    assert from_sft[prompt] == [pairs[prompt]["answer_a"], pairs[prompt]["answer_b"]]
    assert from_policy[prompt] == [sl[prompt]["initial"]]
    helpful = read_jsonl(done["generate_sl"].file("helpful.jsonl"))[0]
    assert from_policy[helpful["prompt"]] == helpful["samples"]
