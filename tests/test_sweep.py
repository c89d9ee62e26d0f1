"""Multirun sweeps as a user launches them: `python src/train.py -m model=size_sweep`."""

import json
import re
from pathlib import Path

from conftest import TINY_EVAL, run_train

TINY_SL = [
    "data.max_red_team=2",
    "data.max_helpful=1",
    "sl.generate_revisions=2",
    "sft.batch_size=2",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "sl.max_answer_tokens=6",
    "sl.max_critique_tokens=6",
    "sl.max_revision_tokens=6",
    "generation.progress=false",
    "pairs.max_new_tokens=6",
    "pm.max_eval=4",
    "pm.max_hhh=4",
    "ppo.steps=1",
    "ppo.batch_size=2",
    "ppo.max_new_tokens=4",
    "pipeline.figures=false",
    *TINY_EVAL,
]


def launched(stdout: str) -> list[str]:
    return re.findall(r"#\d+ : (.*)", stdout)


def test_size_sweep_launches_one_job_per_size(tmp_path: Path):
    """The default sweep: three SmolLM2 sizes (no stage runs, so nothing is downloaded)."""
    done = run_train(["-m", "model=size_sweep", "pipeline.stages=[]"], tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    jobs = launched(done.stdout + done.stderr)
    assert [re.search(r"model.preset=(\S+)", j).group(1) for j in jobs] == [
        "smollm2_135m",
        "smollm2_360m",
        "smollm2_1.7b",
    ]
    resolved = sorted((tmp_path / "outputs" / "multirun").glob("*/*/*/config_resolved.yaml"))
    names = sorted(re.search(r"^  name: (\S+)", p.read_text(), re.M).group(1) for p in resolved)
    assert names == ["smollm2_1.7b", "smollm2_135m", "smollm2_360m"]


def test_size_sweep_with_tiny_stand_ins_runs_the_stages(tmp_path: Path):
    done = run_train(
        ["-m", "model=size_sweep", "model.preset=tiny,tiny_2x", "sl.num_revisions=2", *TINY_SL],
        tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(launched(done.stdout + done.stderr)) == 2
    summaries = sorted((tmp_path / "outputs" / "multirun").glob("*/*/*/pipeline_summary.json"))
    keys = [json.loads(p.read_text())[0]["key"] for p in summaries]
    assert len(keys) == 2 and keys[0] != keys[1]  # one artifact per model size
    assert all(
        [row["stage"] for row in json.loads(p.read_text())]
        == ["generate_sl", "sft", "generate_pairs", "feedback", "pm", "ppo", "judge", "eval"]
        for p in summaries
    )
    manifests = list((tmp_path / "outputs" / "artifacts" / "generate_sl").glob("*/manifest.json"))
    assert sorted(json.loads(m.read_text())["config"]["model"]["name"] for m in manifests) == [
        "tiny",
        "tiny_2x",
    ]


def test_sibling_jobs_share_upstream_artifacts(tmp_path: Path):
    """A sweep over a setting the SL data does not depend on builds the data once."""
    done = run_train(["-m", "model=tiny", "sl.num_revisions=1,2", *TINY_SL], tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summaries = sorted((tmp_path / "outputs" / "multirun").glob("*/*/*/pipeline_summary.json"))
    rows = [json.loads(p.read_text()) for p in summaries]
    sl_rows, sft_rows = [r[0] for r in rows], [r[1] for r in rows]
    assert len({r["key"] for r in sl_rows}) == 1 and [r["built"] for r in sl_rows] == [True, False]
    assert len({r["key"] for r in sft_rows}) == 2 and all(
        r["built"] for r in sft_rows
    )  # SL-CAI-1, SL-CAI-2
