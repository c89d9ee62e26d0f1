"""The main command as a user runs it, on the embedded model, shrunk to seconds."""

import json
from pathlib import Path

import pytest
from conftest import TINY_EVAL, run_train


@pytest.mark.slow  # every stage of the embedded model twice: 4.5 minutes on a float32-only CPU
def test_main_command_on_the_embedded_model(tmp_path: Path):
    args = [
        "data.max_red_team=2",
        "data.max_helpful=1",
        "sl.generate_revisions=1",
        "sft.num_revisions=1",
        "sft.batch_size=2",
        "trainer.enable_progress_bar=false",
        "sl.max_answer_tokens=8",
        "sl.max_critique_tokens=8",
        "sl.max_revision_tokens=8",
        "generation.progress=false",
        "pairs.max_new_tokens=8",
        "pm.max_eval=4",
        "pm.max_hhh=4",
        "ppo.steps=1",
        "ppo.batch_size=2",
        "ppo.max_new_tokens=4",
        "ppo.snapshot_sequences=[2]",
        *TINY_EVAL,
        "eval.max_new_tokens=4",
        "judge.max_train=4",
        "judge.max_test=4",
        "judge.max_hhh=4",
    ]
    done = run_train(args, tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = next((tmp_path / "outputs" / "runs").glob("*/*/train.log")).read_text()
    stages = ["generate_sl", "sft", "generate_pairs", "feedback", "pm", "ppo", "judge", "eval"]
    assert f"Model smollm2_135m (gguf_wheel), stages: {stages}" in log
    summary = json.loads(
        next((tmp_path / "outputs" / "runs").glob("*/*/pipeline_summary.json")).read_text()
    )
    assert [row["stage"] for row in summary] == stages and summary[0]["built"]
    manifest = json.loads((Path(summary[0]["path"]) / "manifest.json").read_text())
    assert (
        manifest["config"]["model"]["name"] == "smollm2_135m"
        and manifest["metrics"]["red_team_prompts"] == 2
    )
    from transformers import AutoModelForCausalLM

    sl_cai = AutoModelForCausalLM.from_pretrained(Path(summary[1]["path"]) / "model")  # SL-CAI-1
    assert sl_cai.config.num_hidden_layers == 30
    assert list((tmp_path / "outputs" / "runs").glob("*/*/csv/version_*/metrics.csv"))  # logged
    again = run_train(args, tmp_path, timeout=600)  # second run: everything reused
    assert again.returncode == 0
    summaries = sorted((tmp_path / "outputs" / "runs").glob("*/*/pipeline_summary.json"))
    assert [row["built"] for row in json.loads(summaries[-1].read_text())] == [False] * 8
    labels = (Path(summary[3]["path"]) / "labels.jsonl").read_text().splitlines()
    assert len(labels) == 3  # one soft label per red-team and helpfulness prompt
    from cai.preference import PreferenceModel

    pm = PreferenceModel.load(Path(summary[4]["path"]) / "model")
    assert len(pm.score(["\n\nHuman: hi\n\nAssistant: hello"])) == 1
    rl_cai = Path(summary[5]["path"])
    assert (rl_cai / "snapshots" / "seq_00000002" / "model.safetensors").is_file()
    assert AutoModelForCausalLM.from_pretrained(rl_cai / "model").config.num_hidden_layers == 30
    evaluation = json.loads((Path(summary[7]["path"]) / "manifest.json").read_text())["metrics"]
    assert evaluation["players"] == ["helpful", "sl_cai", "rl_cai@2"]
    assert (tmp_path / "figures" / "fig2_pareto.png").is_file()  # the run ends with the figures
    assert len(list((tmp_path / "results" / "runs").glob("*.csv"))) == 2  # one per run


def test_smoke_experiment(tmp_path: Path):
    done = run_train(["experiment=smoke", "generation.progress=false"], tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list((tmp_path / "outputs" / "artifacts" / "generate_sl").glob("*/red_team.jsonl"))
