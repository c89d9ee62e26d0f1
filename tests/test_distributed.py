"""Several processes through the main command: `python src/train.py trainer=ddp
trainer.devices=2` on the CPU (gloo). Lightning starts the second process by running the same
command again; that process follows (cai.pipeline.follow): it joins every fit and writes
nothing, so the two never contend for an artifact."""

import json
from pathlib import Path

from conftest import TINY_STAGES, run_train


def test_two_processes_train_every_stage_through_the_main_command(tmp_path: Path):
    args = [
        *[a for a in TINY_STAGES if not a.startswith(("data.", "sft.batch_size"))],
        "data.max_red_team=8",
        "data.max_helpful=4",
        "sft.batch_size=2",
        "pm.max_eval=4",
        "pm.max_hhh=4",
        "ppo.steps=2",
        "ppo.batch_size=2",
        "ppo.max_new_tokens=6",
        "ppo.snapshot_sequences=[4]",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "pipeline.stages=[generate_sl,sft,generate_pairs,feedback,pm,ppo]",
    ]
    done = run_train(args, tmp_path, timeout=900)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    (summary_file,) = (tmp_path / "outputs" / "runs").glob("*/*/pipeline_summary.json")
    summary = json.loads(summary_file.read_text())  # written by global rank 0 only
    assert [r["stage"] for r in summary] == [
        "generate_sl",
        "sft",
        "generate_pairs",
        "feedback",
        "pm",
        "ppo",
    ]
    assert all(r["built"] for r in summary)
    artifacts = tmp_path / "outputs" / "artifacts"
    sft = json.loads(next((artifacts / "sft").glob("*/manifest.json")).read_text())["metrics"]
    train = sft["train_examples"]
    assert sft["steps"] == -(-train // 2) // 2  # ceil(train / 2) batches shared by 2 processes
    ppo = json.loads(next((artifacts / "ppo").glob("*/manifest.json")).read_text())["metrics"]
    assert ppo["sequences"] == 2 * 2 * 2  # 2 iterations x 2 rollouts x 2 processes
    assert not list(artifacts.glob("*/*.partial"))  # every artifact finished by rank 0
    log = done.stdout + done.stderr
    assert "Follower process of a multi-device run" in log or list(
        (tmp_path / "outputs" / "runs").glob("*/*/*.log")
    )
