"""The paper's multiple-choice evals: loader, accuracy, calibration, and the eval_hhh stage."""

import json
import math
from pathlib import Path

import pytest

from cai.errors import ConfigError
from cai.eval.hhh import cot_context, option_probabilities, score_items, summarise
from cai.generation.base import Generation, OptionScores
from cai.paper_evals import hhh_pairs, load_eval
from cai.results import calibration, read_rows, wilson_interval


def test_loaders_read_every_item(data_dir):
    hhh = load_eval("hhh", str(data_dir))
    assert len(hhh) == 438
    assert all(i.options == (" (A)", " (B)") for i in hhh)
    assert {i.correct for i in hhh} == {0, 1}
    assert all(i.prompt.endswith("The answer is:") for i in hhh)
    assert len(load_eval("harmful_vs_ethical", str(data_dir))) == 254
    classification = load_eval("harmfulness_classification", str(data_dir))
    assert len(classification) == 287 and all(len(i.options) == 9 for i in classification)


def _raw_answers(data_dir) -> dict[str, str]:
    """Read straight from the published file, not through load_eval: the text of both options of
    each HHH item (from the first "[[[" to the last "]]]") -> its correct option (" (A)" or
    " (B)")."""
    path = Path(data_dir) / "cai-paper" / "evals" / "438HHHEvaluations.jsonl"
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        raw = json.loads(line)
        prompt = raw["prompt"]
        out[prompt[prompt.index("[[[") : prompt.rindex("]]]")]] = raw["corrects"][0]
    return out


class OracleEngine:
    """Always puts most probability on the correct option, which it knows from its own reading
    of the eval file (so a loader that mixed up options would be caught)."""

    def __init__(self, answers: dict[str, str]):
        self.answers = answers

    def score(self, requests, prefix="", desc=""):
        out = []
        for r in requests:
            correct = next(c for options, c in self.answers.items() if options in r.context)
            out.append(
                OptionScores(
                    tuple(-0.1 if o == correct else -3.0 for o in r.options),
                    (3,) * len(r.options),
                )
            )
        return out

    def generate(self, requests, prefix="", desc="", **kwargs):
        return [Generation("thinking", 1, "stop") for _ in requests]


def test_a_model_that_always_prefers_the_correct_text_scores_1(data_dir):
    items = load_eval("hhh", str(data_dir))
    records = score_items(
        OracleEngine(_raw_answers(data_dir)), items, ["zero_shot"], "", 1, 8, 1.0, 0
    )
    for r in records:
        r["eval"] = "hhh"
    rows, _ = summarise(records, {"model": "oracle"})
    accuracy = next(r for r in rows if r["metric"] == "accuracy")
    assert accuracy["value"] == 1.0 and accuracy["n"] == 438
    assert accuracy["high"] == 1.0 and accuracy["low"] > 0.99


def test_cot_methods_score_after_the_reasoning(data_dir):
    items = load_eval("hhh", str(data_dir))[:3]
    engine = OracleEngine(_raw_answers(data_dir))
    records = score_items(engine, items, ["cot", "cot_ensemble"], "PREFIX", 3, 8, 1.0, 0)
    assert [r["method"] for r in records] == ["cot", "cot_ensemble"] * 3
    assert all(r["is_correct"] for r in records)
    assert len(records[1]["reasoning"]) == 3 and len(records[0]["reasoning"]) == 1
    assert cot_context(items[0].prompt).endswith("\n\nAssistant: Let's think step by step:")
    assert "The answer is:" not in cot_context(items[0].prompt)


def test_option_probabilities_and_calibration_by_hand():
    assert option_probabilities((math.log(3.0), math.log(1.0))) == pytest.approx([0.75, 0.25])
    # two items at confidence 0.75 (one right), one at 0.95 (right)
    ece, table = calibration([0.75, 0.75, 0.95], [True, False, True], bins=10)
    assert ece == pytest.approx(2 / 3 * abs(0.5 - 0.75) + 1 / 3 * abs(1.0 - 0.95))
    assert [(b["n"], b["accuracy"]) for b in table] == [(2, 0.5), (1, 1.0)]


def test_wilson_interval():
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)


def test_a_malformed_eval_line_names_file_and_line(tmp_path):
    evals = tmp_path / "cai-paper" / "evals"
    evals.mkdir(parents=True)
    (evals / "438HHHEvaluations.jsonl").write_text('{"prompt": "x", "corrects": [" (A)"]}\n')
    with pytest.raises(ConfigError, match="438HHHEvaluations.jsonl, line 1"):
        load_eval("hhh", str(tmp_path))
    with pytest.raises(ConfigError, match="CAI_DATA_DIR"):
        load_eval("hhh", None)
    with pytest.raises(ConfigError, match=r"line 1: expected JSON with text_correct"):
        hhh_pairs(str(tmp_path))  # the PM's reader of the same file checks its lines too
    assert hhh_pairs(None) == [] and hhh_pairs(str(tmp_path / "elsewhere")) == []


def test_hhh_pairs_are_the_published_transcripts(data_dir):
    """Straight from the file: the 438 pairs, the correct transcript first."""
    lines = (data_dir / "cai-paper" / "evals" / "438HHHEvaluations.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    pairs = hhh_pairs(str(data_dir))
    assert len(pairs) == 438
    assert pairs[0] == (first["text_correct"], first["text_incorrect"])


def test_eval_hhh_stage_writes_result_rows(make_cfg, data_dir):
    from cai.pipeline import run

    cfg = make_cfg(
        "model=tiny",
        f"paths.data_dir={data_dir}",
        "pipeline.stages=[eval_hhh]",
        "generation.progress=false",
        "eval_hhh.max_items=8",
        "eval_hhh.cot_max_items=2",
        "eval_hhh.cot_samples=2",
        "eval_hhh.cot_max_tokens=6",
    )
    artifact = run(cfg)["eval_hhh"]
    rows = read_rows(artifact.file("rows.csv"))
    accuracy = {(r["eval"], r["method"]): r for r in rows if r["metric"] == "accuracy"}
    assert set(accuracy) == {
        ("hhh", "zero_shot"),
        ("hhh", "cot"),
        ("hhh", "cot_ensemble"),
        ("harmful_vs_ethical", "zero_shot"),
        ("harmfulness_classification", "zero_shot"),
    }
    assert accuracy["hhh", "zero_shot"]["n"] == "8" and accuracy["hhh", "cot"]["n"] == "2"
    assert all(0 <= float(r["value"]) <= 1 for r in accuracy.values())
    assert {r["model"] for r in rows} == {"tiny"} and rows[0]["parameters"]
    assert {r["run_id"] for r in rows} == {artifact.key}
    assert read_rows(artifact.file("calibration.csv"))
    # the run gathers every stage's rows into one table beside its logs
    gathered = read_rows(Path(cfg.paths.output_dir) / "compose" / "results.csv")
    assert len(gathered) == len(rows)


def test_eval_hhh_unknown_method_is_an_error(make_cfg, data_dir):
    from cai.pipeline import run

    cfg = make_cfg(
        "model=tiny",
        f"paths.data_dir={data_dir}",
        "pipeline.stages=[eval_hhh]",
        "eval_hhh.methods=[zero_shot,vibes]",
    )
    with pytest.raises(ConfigError, match="vibes"):
        run(cfg)
