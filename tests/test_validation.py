"""Judge validation on the paper's PALMS samples: the reader against the published file, the
statistics against values worked out by hand, and the judge stage end to end on the tiny model."""

from __future__ import annotations

import gzip
import hashlib
import json
import math

import pytest
from conftest import TINY_EVAL, TINY_STAGES

from cai.eval.validation import (
    ValidationSettings,
    bootstrap_agreement,
    counts_by_prompt,
    credit,
    paired_difference,
    trust_flag,
    validate_pairwise,
    validate_scorer,
    verdict,
)

# ---------------------------------------------------------------------------------------------
# The reader


def test_paper_samples_reader_matches_the_files(data_dir):
    from cai.paper_samples import ANSWER_FILES, load_answers, load_chains, palms_split

    answers = load_answers(str(data_dir))
    assert len(answers) == 4 * 40 * 17
    # means of the paper's PM per model, read straight from the files (README: 2.41 1.96 2.73 0.87)
    for stem, model_type in ANSWER_FILES.items():
        lines = (data_dir / "cai-paper" / "samples" / f"{stem}.jsonl").read_text().splitlines()
        raw = [
            s["pm_scores"][0]["pm_score"]
            for line in lines
            for s in json.loads(line)["sampled_answers"]
        ]
        ours = [a.pm_score for a in answers if a.model_type == model_type]
        assert sum(ours) / len(ours) == pytest.approx(sum(raw) / len(raw))
    assert {round(sum(a.pm_score for a in answers if a.model_type == m) / 680, 2)
            for m in ANSWER_FILES.values()} == {2.41, 1.96, 2.73, 0.87}  # fmt: skip
    assert not any(a.answer.endswith("Human:") for a in answers)
    test, train = load_answers(str(data_dir), "test"), load_answers(str(data_dir), "train")
    assert len(test) + len(train) == len(answers)
    assert not {a.prompt for a in test} & {a.prompt for a in train}  # split by prompt
    assert 10 <= len({a.prompt for a in test}) <= 30
    chains = load_chains(str(data_dir))
    assert len(chains) == 40 and all(len(c.texts) == 5 for c in chains)
    assert {c.prompt for c in chains} == {a.prompt for a in answers}
    assert all(palms_split(c.prompt) == "test" for c in load_chains(str(data_dir), "test"))


def test_paper_samples_missing_is_one_clear_error(tmp_path, monkeypatch):
    from cai import models
    from cai.errors import ConfigError
    from cai.paper_samples import load_answers

    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    with pytest.raises(ConfigError, match="PALMS_HRLHF.jsonl was not found.*CAI_DATA_DIR"):
        load_answers(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Statistics by hand


def test_agreement_credit_by_hand():
    # prompt p: paper scores 3 > 2 > 1; judge orders (a, b) right, (a, c) right, (b, c) wrong
    paper = {"a": 3.0, "b": 2.0, "c": 1.0}
    judge = {"a": 0.9, "b": 0.1, "c": 0.5}
    pairs = [("a", "b"), ("a", "c"), ("b", "c")]
    credits = [credit(judge[x] - judge[y], paper[x] - paper[y]) for x, y in pairs]
    assert credits == [1.0, 1.0, 0.0]
    assert credit(0.0, 1.0) == 0.5  # a judge tie counts 1/2
    assert counts_by_prompt(["p", "p", "q"], credits) == {"p": (2.0, 2), "q": (0.0, 1)}
    assert counts_by_prompt(["p", "p", "q"], credits, [False, True, True]) == {
        "p": (1.0, 1),
        "q": (0.0, 1),
    }
    # pairwise judge: p(A better) - 1/2 is its difference
    assert [credit(p - 0.5, d) for p, d in ((0.8, 1), (0.5, -1), (0.3, -1))] == [1.0, 0.5, 1.0]


def test_paired_difference_and_verdict_by_hand():
    ids = [f"p{i // 2}" for i in range(20)]
    same = [1.0, 0.0] * 10
    assert paired_difference(ids, same, same, 200, 0) == (0.0, 0.0, 0.0)
    better = [1.0] * 20  # right on every pair where the other is right on half
    value, low, high = paired_difference(ids, better, same, 200, 0)
    assert value == 0.5 and low == high == 0.5  # every prompt: 2 of 2 against 1 of 2
    assert verdict(0.55, 0.70, "shorter_wins", 0.01) == ""
    assert verdict(0.55, 0.70, "shorter_wins", -0.02) == "not_above_shorter_wins"
    assert verdict(0.45, 0.70, "shorter_wins", 0.10) == "at_chance"
    assert verdict(0.20, 0.45, "longer_wins", -0.3) == "below_chance"


def test_bootstrap_agreement_interval():
    counts = {f"p{i}": (8.0, 10) for i in range(10)} | {f"q{i}": (2.0, 10) for i in range(10)}
    value, low, high, pairs = bootstrap_agreement(counts, 2000, seed=0)
    assert value == pytest.approx(0.5) and pairs == 200
    assert low < 0.5 < high and high - low > 0.1
    every = {f"p{i}": (9.0, 10) for i in range(20)}
    value, low, high, _ = bootstrap_agreement(every, 200, 0)
    assert value == low == high == pytest.approx(0.9)  # no spread between prompts
    assert trust_flag(0.45, 0.7) == "at_chance"
    assert trust_flag(0.55, 0.7) == ""
    assert trust_flag(0.2, 0.45) == "below_chance"


def _answers():
    from cai.paper_samples import PaperAnswer

    out = []
    for p in range(6):
        for m, base in (("helpful_rlhf", 2.0), ("rl_cai", 3.0), ("rl_cai_cot", 1.0)):
            for k in range(2):
                out.append(PaperAnswer(f"p{p}", f"prompt {p}", m, k, f"{m} {p} {k}", base + k / 10))
    return out


def test_validate_scorer_with_a_perfect_and_an_inverted_judge():
    from cai.paper_samples import PaperChain

    answers = _answers()
    by_text = {a.answer: a.pm_score for a in answers}
    chains = [PaperChain("p0", "prompt 0", ("r0", "r1", "r2"))]
    levels = {"r0": 0.0, "r1": 1.0, "r2": 2.0}

    def oracle(dialogues):  # a stub scorer: the paper's own score, to check the arithmetic
        return [by_text.get(d[1]["content"], levels.get(d[1]["content"], 0.0)) for d in dialogues]

    settings = ValidationSettings(answers_per_model=None, bootstrap=200)
    common = {"stage": "judge", "model": "m", "parameters": 1}
    rows, summary = validate_scorer("perfect", oracle, answers, chains, settings, common)
    assert summary["agreement"] == 1.0 and summary["flag"] == ""
    assert summary["pairs"] == 6 * 15
    assert summary["score_by_revision"] == [0.0, 1.0, 2.0]
    assert summary["score_by_model_type"]["rl_cai"] == pytest.approx(3.05)
    paper_rows = [r for r in rows if r["judge"] == "paper_pm_52b"]
    assert {r["method"] for r in paper_rows} == {"helpful_rlhf", "rl_cai", "rl_cai_cot"}
    _, inverted = validate_scorer(
        "inverted", lambda d: [-x for x in oracle(d)], answers, chains, settings, common
    )
    assert inverted["agreement"] == 0.0 and inverted["flag"] == "below_chance"
    _, coin = validate_scorer("flat", lambda d: [0.0] * len(d), answers, [], settings, common)
    assert coin["agreement"] == 0.5 and coin["flag"] == "at_chance"
    # beside it, on the same pairs: every answer has 3 words, so length rules tie (1/2); the
    # oracle scores model types, so it is right across models and ties within one
    assert summary["rules"]["shorter_wins"]["agreement"] == 0.5
    assert summary["rules"]["longer_wins"]["agreement"] == 0.5
    assert summary["rules"]["model_type_oracle"]["agreement"] == pytest.approx((72 + 9) / 90)
    assert summary["within_model"]["pairs"] == 6 * 3  # 3 model types, one pair each
    assert summary["within_model"]["agreement"] == 1.0
    assert summary["within_model"]["rules"]["model_type_oracle"]["agreement"] == 0.5
    assert summary["length_matched"]["pairs"] == 90  # equal lengths: every pair matched
    assert summary["minus_best_rule"]["difference"] > 0.4 and summary["verdict"] == "validated"
    assert summary["revision_gain"] == {"gain": 2.0, "interval": [2.0, 2.0]}
    # subsetting: answers_per_model=1 keeps index 0 of each model: 3 answers, 3 pairs per prompt
    _, one = validate_scorer("p", oracle, answers, [], ValidationSettings(1, bootstrap=10), common)
    assert one["pairs"] == 6 * 3


def test_a_judge_that_is_the_length_rule_is_not_validated():
    """A judge whose scores are minus the word count agrees above chance (shorter answers win
    here) but no more than the rule "shorter wins": its verdict names the rule."""
    from cai.paper_samples import PaperAnswer

    answers = []
    for p in range(12):  # the better answer is the shorter one on 3 of 4 pairs per prompt
        for k, (words, score) in enumerate(((2, 4.0), (4, 3.0), (8, 2.0), (16, 2.5))):
            answers.append(PaperAnswer(f"p{p}", "q", "rl_cai", k, " ".join(["w"] * words), score))
    settings = ValidationSettings(answers_per_model=None, bootstrap=200)
    rows, summary = validate_scorer(
        "length", lambda ds: [-len(d[1]["content"].split()) for d in ds], answers, [], settings,
        {"stage": "judge", "model": "m", "parameters": 1},
    )  # fmt: skip
    assert summary["agreement"] == summary["rules"]["shorter_wins"]["agreement"]
    assert summary["agreement"] == pytest.approx(5 / 6, abs=1e-4)
    assert summary["minus_best_rule"] == {"rule": "shorter_wins", "difference": 0.0,
                                          "interval": [0.0, 0.0]}  # fmt: skip
    assert summary["flag"] == "not_above_shorter_wins"
    # length-matched (within 20%): no two of 2, 4, 8, 16 words are
    assert summary["length_matched"]["pairs"] == 0
    judged = [r for r in rows if r["judge"] == "length" and r["metric"] == "agreement_paper_pm"]
    assert judged[0]["flag"] == "not_above_shorter_wins"
    margin = [r for r in rows if r["metric"] == "agreement_minus_best_rule"]
    assert margin[0]["method"] == "shorter_wins" and margin[0]["value"] == 0.0


def test_validate_pairwise_judge():
    answers = _answers()
    by_text = {a.answer: a.pm_score for a in answers}

    def judge(pairs):
        return [1 / (1 + math.exp(-(by_text[a] - by_text[b]))) for _, a, b in pairs]

    settings = ValidationSettings(answers_per_model=None, pairs_per_prompt=4, bootstrap=50)
    rows, summary = validate_pairwise("ai", judge, answers, settings, {"stage": "eval"})
    assert summary["agreement"] == 1.0 and summary["pairs"] == 6 * 4
    assert rows[0]["metric"] == "agreement_paper_pm" and rows[0]["judge"] == "ai"


# ---------------------------------------------------------------------------------------------
# The judge stage on the tiny model


def _sha256s(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.safetensors"))
    }


JUDGE = [*TINY_STAGES, *TINY_EVAL]


def test_judge_is_the_same_alone_and_after_other_stages(make_cfg, data_dir):
    """The judge's weights come from its own seed, not from what ran before it in the process
    (the score head used torch's global random state)."""
    import torch

    from cai.pipeline import run

    alone = run(make_cfg(*JUDGE, "pipeline.stages=[judge]", f"paths.data_dir={data_dir}"))["judge"]
    first = _sha256s(alone.path)
    assert first and (alone.path / "validation.json").is_file()
    validation = json.loads((alone.path / "validation.json").read_text())
    assert validation["pm_harmlessness"]["pairs"] > 0
    torch.manual_seed(1234)
    torch.rand(1000)  # what another stage would do to the global random state
    again = run(
        make_cfg(
            *JUDGE,
            "pipeline.stages=[generate_sl,judge]",
            "pipeline.force=true",
            f"paths.data_dir={data_dir}",
        )
    )["judge"]
    assert again.key == alone.key
    assert _sha256s(again.path) == first
    # a judge a user names is validated beside them (rows and validation.json)
    named = run(
        make_cfg(*JUDGE, "pipeline.stages=[judge]", f"paths.data_dir={data_dir}",
                 f"+judge.extra.mine={alone.path / 'harmlessness' / 'model'}")
    )["judge"]  # fmt: skip
    validation = json.loads((named.path / "validation.json").read_text())
    assert validation["mine"]["pairs"] == validation["pm_harmlessness"]["pairs"] > 0
    assert validation["mine"]["agreement"] == validation["pm_harmlessness"]["agreement"]


def test_pm_is_the_same_alone_and_after_other_stages(make_cfg, data_dir):
    import torch

    from cai.pipeline import run

    stages = "pipeline.stages=[generate_sl,sft,generate_pairs,feedback,pm]"
    small = [
        *TINY_STAGES,
        *TINY_EVAL,
        f"paths.data_dir={data_dir}",
        "pm.max_eval=8",
        "pm.max_hhh=8",
    ]
    built = run(make_cfg(*small, stages))["pm"]
    first = _sha256s(built.path)
    torch.manual_seed(99)
    torch.rand(10)
    again = run(make_cfg(*small, "pipeline.stages=[pm]", "pipeline.force=true"))["pm"]
    assert again.key == built.key and _sha256s(again.path) == first


def test_judge_without_its_data_is_an_error_not_an_artifact(make_cfg, tmp_path, monkeypatch):
    from cai import models

    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    from cai.errors import ConfigError
    from cai.pipeline import run

    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = make_cfg(*JUDGE, "pipeline.stages=[judge]", f"paths.data_dir={empty}")
    with pytest.raises(ConfigError, match="PALMS_HRLHF.jsonl was not found"):
        run(cfg)
    assert not list((tmp_path / "artifacts" / "judge").glob("*/manifest.json"))
    cfg = make_cfg(*JUDGE, "pipeline.stages=[judge]", f"paths.data_dir={empty}",
                   "judge.harmlessness=harmless-base")  # fmt: skip
    with pytest.raises(ConfigError, match="hh-rlhf harmless-base was not found"):
        run(cfg)


def test_judge_key_follows_its_data_files(make_cfg, tmp_path, data_dir):
    """Edited data gives another judge key (the files' fingerprints are part of it)."""
    import shutil

    from cai.pipeline import artifact_key

    copy = tmp_path / "data"
    shutil.copytree(data_dir / "cai-paper", copy / "cai-paper")
    shutil.copytree(data_dir / "hh-rlhf", copy / "hh-rlhf")
    before = artifact_key(make_cfg(*JUDGE, f"paths.data_dir={copy}"), "judge")
    assert before == artifact_key(make_cfg(*JUDGE, f"paths.data_dir={data_dir}"), "judge")
    path = copy / "cai-paper" / "samples" / "PALMS_HRLHF.jsonl"
    path.write_text(path.read_text().replace("drugs", "Drugs", 1))
    assert artifact_key(make_cfg(*JUDGE, f"paths.data_dir={copy}"), "judge") != before
    hh = copy / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    with gzip.open(hh, "rt") as f:
        lines = f.read().splitlines()[:-1]
    with gzip.open(hh, "wt") as f:
        f.write("\n".join(lines) + "\n")
    cfg = make_cfg(*JUDGE, f"paths.data_dir={copy}", "judge.harmlessness=paper_pm+harmless-base")
    other = make_cfg(
        *JUDGE, f"paths.data_dir={data_dir}", "judge.harmlessness=paper_pm+harmless-base"
    )
    assert artifact_key(cfg, "judge") != artifact_key(other, "judge")


def test_judge_training_pairs_within_one_model_or_length_matched(data_dir, make_cfg):
    """judge.paper_pairs picks the paper_pm training pairs: one paper model's answers, or
    answers of matched length; a wrong value is one clear error before any work."""
    from cai.errors import ConfigError
    from cai.eval.validation import word_count
    from cai.paper_samples import load_answers
    from cai.stages.judge import check_settings, paper_pm_comparisons

    by_text = {a.answer: a for a in load_answers(str(data_dir), "train")}

    def answers(comparison):
        return [by_text[turns[-1]["content"]] for turns in (comparison.a, comparison.b)]

    within = paper_pm_comparisons(str(data_dir), 64, 0, "within_model")
    assert len(within) == 64
    assert all(a.model_type == b.model_type for a, b in map(answers, within))
    matched = paper_pm_comparisons(str(data_dir), 64, 0, "length_matched")
    for a, b in map(answers, matched):
        shorter, longer = sorted((word_count(a.answer), word_count(b.answer)))
        assert shorter >= 0.8 * longer
    every = paper_pm_comparisons(str(data_dir), 64, 0)
    assert any(x.model_type != y.model_type for x, y in map(answers, every))
    with pytest.raises(ConfigError, match="judge.paper_pairs"):
        check_settings(make_cfg("judge.paper_pairs=same_length"))
