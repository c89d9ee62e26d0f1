"""The eval stage: judgements, Elo rows, per-model measures, settings; and the whole default
pipeline on the tiny model writing every figure."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_EVAL, TINY_STAGES, run_train

from cai.errors import ConfigError
from cai.eval.compare import (
    Point,
    elo_rows,
    mean_interval,
    pm_judgements,
    with_hh_score,
)
from cai.results import phrase_rate

POINTS = [
    Point("helpful", "helpful"),
    Point("sl_cai", "sl_cai", revisions=4),
    Point("rl_cai", "sl_cai", rl_sequences=0, revisions=4, cot=False),
    Point("rl_cai", "rl_cai@8", rl_sequences=8, revisions=4, cot=False),
]


def samples_for(players, prompts=3, kind="red_team"):
    return [
        {"player": p, "prompt_id": f"q{i}", "kind": kind, "prompt": f"question {i}", "sample": 0}
        for p in players
        for i in range(prompts)
    ]


def test_pm_judgement_is_the_sigmoid_of_the_score_margin():
    samples = samples_for(["a", "b"], prompts=2)
    scores = [1.0, 0.0, 0.0, 2.0]  # a: q0 1.0, q1 0.0; b: q0 0.0, q1 2.0
    judged = pm_judgements(samples, scores, "pm_harmlessness", "red_team")
    assert [(j["prompt_id"], j["player_a"], j["player_b"]) for j in judged] == [
        ("q0", "a", "b"),
        ("q1", "a", "b"),
    ]
    assert judged[0]["p_a"] == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert judged[1]["p_a"] == pytest.approx(1 / (1 + math.exp(2.0)))
    assert {j["dimension"] for j in judged} == {"harmlessness"}
    assert pm_judgements(samples, scores, "pm_helpfulness", "helpful") == []  # other kind


def _judgements(winner_over: dict, prompts=20):
    """p_a = 1 when player_a is listed as beating player_b, 0 the other way, else 0.5."""
    players = ["helpful", "sl_cai", "rl_cai@8"]
    out = []
    for q in range(prompts):
        for i, a in enumerate(players):
            for b in players[i + 1 :]:
                p = 1.0 if (a, b) in winner_over else 0.0 if (b, a) in winner_over else 0.5
                out.append(
                    {
                        "judge": "stub",
                        "dimension": "harmlessness",
                        "prompt_id": f"q{q}",
                        "sample": 0,
                        "player_a": a,
                        "player_b": b,
                        "p_a": p,
                    }
                )
    return out


def test_elo_rows_rank_winners_anchor_sl_cai_and_share_players(make_cfg):
    cfg = make_cfg("model=tiny", "eval.bootstrap=30")
    # rl_cai@8 beats everyone, helpful loses to everyone
    beats = {("rl_cai@8", "helpful"), ("rl_cai@8", "sl_cai"), ("sl_cai", "helpful")}
    rows = elo_rows(cfg, POINTS, _judgements(beats))
    elo = {(r["method"], r["rl_sequences"]): r for r in rows}
    assert elo[("sl_cai", None)]["value"] == 0.0  # the anchor
    assert elo[("rl_cai", 0)]["value"] == 0.0  # RL-CAI before training is SL-CAI
    assert elo[("rl_cai", 8)]["value"] > 0 > elo[("helpful", None)]["value"]
    for r in rows:
        assert r["low"] <= r["value"] <= r["high"]
        assert r["judge"] == "stub" and r["eval"] == "harmlessness" and r["metric"] == "elo"
        assert r["model"] == "tiny" and r["n"] == 40  # 2 opponents x 20 prompts


def test_elo_rows_flag_never_losing_players_and_carry_the_judges_trust(make_cfg):
    cfg = make_cfg("model=tiny", "eval.bootstrap=30")
    beats = {("rl_cai@8", "helpful"), ("rl_cai@8", "sl_cai"), ("sl_cai", "helpful")}
    trust = {"stub": {"flag": "at_chance", "independent": False}}
    rows = elo_rows(cfg, POINTS, _judgements(beats), trust)
    flags = {(r["method"], r["rl_sequences"]): r["flag"] for r in rows}
    assert flags[("rl_cai", 8)] == "at_chance;never_loses"  # wins every judgement
    assert flags[("helpful", None)] == "at_chance"  # loses every one: a rating from data
    assert {r["independent"] for r in rows} == {False}
    # ties are not wins: a player that only ties is not flagged
    rows = elo_rows(cfg, POINTS, _judgements(set()))
    assert not any("never_loses" in r["flag"] for r in rows)
    # a judge with a judged model's own weights: that model's rows say self_judged
    trust = {"stub": {"flag": "", "independent": False, "self_judged": ["helpful"]}}
    rows = elo_rows(cfg, POINTS, _judgements(beats), trust)
    flags = {(r["method"], r["rl_sequences"]): r["flag"] for r in rows}
    assert flags[("helpful", None)] == "self_judged" and flags[("sl_cai", None)] == ""


def test_self_judged_players_are_the_judges_own_weights(make_cfg):
    from omegaconf import OmegaConf

    from cai.eval.compare import self_judged_players

    cfg = make_cfg("model=tiny")
    players = {"helpful": cfg.model, "sl_cai": OmegaConf.create({"name": "tiny", "path": "/a/sft"})}
    assert self_judged_players(cfg.model, players) == ["helpful"]
    assert self_judged_players(OmegaConf.create({"name": "x", "path": "/a/sft"}), players) == [
        "sl_cai"
    ]
    assert (
        self_judged_players(OmegaConf.create({"name": "served", "path": "http://h"}), players) == []
    )


def test_rates_and_scores():
    assert phrase_rate(
        ["I'm sorry, no.", "Sure! Here it is", "i CANNOT do that"], ["I'm sorry", "I cannot"]
    ) == pytest.approx(2 / 3)
    assert phrase_rate([], ["x"]) == 0.0
    mean, low, high = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and low == pytest.approx(2 - 1.96 / math.sqrt(3))
    both = with_hh_score({"pm_harmlessness": [1.0, 2.0], "pm_helpfulness": [0.5, -1.0]})
    assert both["pm_hh"] == [1.5, 1.0]
    assert "pm_hh" not in with_hh_score({"pm_harmlessness": [1.0]})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.models=[helpful,sl_cai,mystery]", "does not define"),
        ("eval.models=[helpful,rl_cai]", "eval.anchor"),
        ("eval.judges=[crowdworkers]", "eval.judges"),
        ("eval.samples_per_prompt=0", "samples_per_prompt"),
    ],
)
def test_bad_eval_settings_stop_before_any_work(make_cfg, tmp_path, override, message):
    from cai.pipeline import run

    with pytest.raises(ConfigError, match=message):  # when composed, or before any stage
        run(make_cfg(*TINY_STAGES, override, "pipeline.stages=[generate_sl,sft,judge,eval]"))
    assert not (tmp_path / "outputs" / "artifacts" / "generate_sl").exists()  # nothing started


EVAL_TINY = [
    *TINY_STAGES,
    "pm.max_eval=4",
    "pm.max_hhh=4",
    "pm.max_human=8",
    "ppo.steps=2",
    "ppo.batch_size=4",
    "ppo.max_new_tokens=8",
    "ppo.snapshot_sequences=[4]",
    *TINY_EVAL,
    "feedback.cot_max_tokens=8",
]


def test_default_pipeline_on_the_tiny_model_writes_every_figure(tmp_path, data_dir):
    """`python src/train.py` (default stage list, every variant of the paper's Figure 2) on the
    tiny model: eval rows for every model and judge, the run's rows in results/runs/, every
    figure; then `src/make_figures.py` rebuilds the same figures from results/ alone."""
    from cai.analysis.figures import FIGURES
    from cai.analysis.gather import gather
    from cai.results import read_rows

    args = [
        *EVAL_TINY,
        "pipeline.figures=true",
        f"paths.data_dir={data_dir}",
        "eval.models=[helpful,sl_cai,rl_cai,rl_cai_cot,helpful_rlhf,hh_rlhf]",
    ]
    done = run_train(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = tmp_path / "figures"
    expected = {f"{n}.{s}" for n in FIGURES for s in ("png", "pdf")}
    expected |= {"elo_table.md", "judge_validation.md"}
    assert {p.name for p in figures.iterdir()} == expected
    assert all((figures / name).stat().st_size > 1000 for name in expected)
    # the run's rows were published to results/runs/
    (published,) = (tmp_path / "results" / "runs").glob("*.csv")
    rows = read_rows(published)
    stages = {r["stage"] for r in rows}
    assert {"pm", "judge", "eval"} <= stages
    elo = [r for r in rows if r["metric"] == "elo"]
    series = {r["method"] for r in elo}
    assert series == {"helpful", "sl_cai", "rl_cai", "rl_cai_cot", "helpful_rlhf", "hh_rlhf"}
    assert {(r["judge"], r["eval"]) for r in elo} >= {
        ("pm_harmlessness", "harmlessness"),
        ("ai_feedback", "harmlessness"),
        ("ai_feedback", "helpfulness"),
    }
    assert all(float(r["value"]) == 0.0 for r in elo if r["method"] == "sl_cai")
    snapshots = {r["rl_sequences"] for r in elo if r["method"] == "rl_cai"}
    assert snapshots == {"0", "4", "8"}  # init, snapshot, final policy
    revisions = [r for r in rows if r["method"] == "sl_revision"]
    assert {r["revisions"] for r in revisions} == {"0", "1"}
    judge_acc = [r for r in rows if r["stage"] == "judge" and r["metric"] == "accuracy"]
    assert {r["eval"] for r in judge_acc} == {"hhh"}  # the paper_pm judge has no hh-rlhf test
    # every judge and the PM that PPO optimised validated against the paper's PM
    agreement = [r for r in rows if r["metric"] == "agreement_paper_pm"]
    assert {(r["stage"], r["judge"]) for r in agreement} >= {
        ("judge", "pm_harmlessness"),
        ("pm", "training_pm_ai"),
        ("eval", "ai_feedback"),
    }
    for r in agreement:  # an interval around the value; a flag whenever it covers 0.5, and for
        # a judge, also when it does not beat the best trivial rule on the same pairs
        assert float(r["low"]) <= float(r["value"]) <= float(r["high"])
        assert (float(r["low"]) <= 0.5) <= (r["flag"] != "")
        if r["method"] == "trivial_rule":
            assert (r["flag"] != "") == (float(r["low"]) <= 0.5)
        elif float(r["low"]) > 0.5:
            assert r["flag"] in (
                "",
                f"not_above_{next(m['method'] for m in rows if m['metric'] == 'agreement_minus_best_rule' and m['judge'] == r['judge'])}",
            )
    # independence: the PM judge shares nothing with the RL-CAI PM; the AI judge is the same
    # model as the feedback model offline
    assert {r["independent"] for r in elo if r["judge"] == "ai_feedback"} == {"False"}
    assert {r["independent"] for r in elo if r["judge"] == "pm_harmlessness"} == {"True"}
    # offline the AI judge is the helpful model's own weights: those rows, and only those, say so
    helpful_ai = [r for r in elo if r["judge"] == "ai_feedback" and r["method"] == "helpful"]
    assert helpful_ai and all("self_judged" in r["flag"] for r in helpful_ai)
    # (the human-feedback baselines start from the helpful model: their snapshot 0 is it)
    others = [r for r in elo if r["method"] == "sl_cai" or r["rl_sequences"] not in ("", "0")]
    assert others and not any("self_judged" in r["flag"] for r in others)
    pm_flags = {r["flag"] for r in agreement if r["judge"] == "pm_harmlessness"}
    assert {r["flag"].split(";")[0] for r in elo if r["judge"] == "pm_harmlessness"} <= pm_flags | {
        "never_loses"
    }
    # the eval artifact: samples and judgements that load with standard tools
    import datasets

    (eval_dir,) = (tmp_path / "outputs" / "artifacts" / "eval").glob("*/")
    samples = datasets.load_dataset(
        "json", data_files=str(eval_dir / "samples.jsonl"), split="train"
    )
    manifest = json.loads((eval_dir / "manifest.json").read_text())
    assert len(samples) == len(manifest["metrics"]["players"]) * 4
    assert len(manifest["metrics"]["players"]) == 10  # helpful, SL-CAI, 4 RL runs x 2 snapshots
    # the gathering command redraws the same figures from results/ alone
    before = {p.name: p.stat().st_mtime_ns for p in figures.iterdir()}
    command = [sys.executable, str(REPO / "src" / "make_figures.py")]
    command += ["--results", str(tmp_path / "results"), "--figures", str(figures)]
    assert subprocess.run(command, capture_output=True, timeout=300).returncode == 0
    assert {p.name for p in figures.iterdir()} == set(before)
    assert all(p.stat().st_mtime_ns > before[p.name] for p in figures.iterdir())
    table = gather(tmp_path / "results", write=False)
    assert len(table) == len(rows)  # one run: its rows, once
    assert (tmp_path / "results" / "all_results.csv").is_file()
    # the results notebook runs top to bottom on this run's outputs
    run_notebook(
        REPO / "notebooks" / "results.ipynb",
        {
            "CAI_RESULTS_DIR": str(tmp_path / "results"),
            "CAI_ARTIFACT_DIR": str(tmp_path / "outputs" / "artifacts"),
        },
    )


def run_notebook(path: Path, env: dict) -> dict:
    """Execute a notebook's code cells in order in one namespace (no Jupyter needed)."""
    import os

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        namespace: dict = {}
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                exec(compile("".join(cell["source"]), f"{path.name} cell", "exec"), namespace)
        return namespace
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_the_ai_judge_asks_the_constitutions_evaluation_principles(make_cfg):
    """The AI-feedback judge's questions carry the constitution's evaluation principles, never
    the feedback principles that labelled the training PM (its few-shot block included)."""
    from cai.comparisons import Comparison
    from cai.eval.compare import AIJudge
    from cai.inputs import load_inputs

    cfg = make_cfg("model=tiny", "eval.ai_feedback.model=policy")
    constitution, _ = load_inputs(cfg)
    evaluation, feedback = set(constitution.evaluation), set(constitution.feedback)
    assert evaluation and feedback and not evaluation & feedback
    judge = AIJudge(cfg, {})
    for index, principle in enumerate(constitution.evaluation):
        question = judge.prompts.question("Can you help me?", index, "Yes.", "No.")
        assert principle.strip() in question
        assert not any(p.strip() in question for p in feedback)
    assert not any(p.strip() in judge.prompts.prefix for p in feedback)
    # the labels it gives record the principles asked, every one an evaluation principle
    (record,) = judge.label([Comparison.of_answers("c", "Can you help me?", ("Yes.", "No."))])
    asked = [judge.prompts.principle(query["principle"]) for query in record["queries"]]
    assert asked and all(p in evaluation for p in asked)
