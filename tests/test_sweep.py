"""Multirun sweeps as a user launches them: `python src/train.py -m model=size_sweep`."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_EVAL, run_train

from cai.results import read_rows

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


def summaries_of(tmp_path: Path, launch: str) -> list[list[dict]]:
    """The pipeline summaries of the jobs of the multirun launched at `launch` (a folder)."""
    return [json.loads(p.read_text()) for p in sorted(Path(launch).glob("*/pipeline_summary.json"))]


def multirun_folders(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "outputs" / "multirun").glob("*/*"))


@pytest.mark.slow  # about 2 minutes on 2 cores; .ci/run runs it
def test_the_three_sweeps_share_upstream_and_feed_one_table_of_figures(tmp_path: Path):
    """The user's commands: -m model=size_sweep, -m sft.num_revisions=0,1,2,3,4 and
    -m feedback.cot=false,true (the last with the joblib launcher: two jobs at once that need
    the same SL data and SL-CAI model), then the figure command on results/."""
    runs = [
        ["-m", "model=size_sweep", "model.preset=tiny,tiny_2x", "sft.num_revisions=2"],
        ["-m", "model=tiny", "sl.generate_revisions=4", "sft.num_revisions=0,1,2,3,4"],
        ["-m", "model=tiny", "seed=1", "sft.num_revisions=2", "feedback.cot=false,true"]
        + ["feedback.cot_max_tokens=4", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    ]
    folders = []
    for args in runs:
        keys = {a.split("=")[0] for a in args}
        tiny = [a for a in TINY_SL if a.split("=")[0] not in keys]
        done = run_train([*args, *tiny], tmp_path, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        folders.append(next(f for f in multirun_folders(tmp_path) if f not in folders))
    stages = ["generate_sl", "sft", "generate_pairs", "feedback", "pm", "ppo", "judge", "eval"]
    sizes, revisions, cot = (summaries_of(tmp_path, f) for f in folders)
    assert len(sizes) == 2 and len(revisions) == 5 and len(cot) == 2
    assert all([r["stage"] for r in job] == stages for job in sizes + revisions + cot)
    assert sizes[0][0]["key"] != sizes[1][0]["key"]  # one SL data set per model size
    # revisions: the SL data is generated once, SL-CAI-n trained once per n
    assert len({job[0]["key"] for job in revisions}) == 1
    assert [job[0]["built"] for job in revisions] == [True] + [False] * 4
    assert len({job[1]["key"] for job in revisions}) == 5
    # CoT feedback: both jobs share SL data and SL-CAI (built by one, waited for by the other)
    assert len({job[1]["key"] for job in cot}) == 1
    assert sorted(job[0]["built"] for job in cot) == [False, True]
    assert sorted(job[1]["built"] for job in cot) == [False, True]
    assert len({job[3]["key"] for job in cot}) == 2  # plain and CoT labels
    # one table from every job, and the figures drawn from it
    command = [sys.executable, str(REPO / "src" / "make_figures.py")]
    command += ["--results", str(tmp_path / "results"), "--figures", str(tmp_path / "figures")]
    assert subprocess.run(command, capture_output=True, timeout=300).returncode == 0
    table = read_rows(tmp_path / "results" / "all_results.csv")
    assert len(list((tmp_path / "results" / "runs").glob("*.csv"))) == 9  # one per job
    assert {r["model"] for r in table if r["stage"] == "eval"} == {"tiny", "tiny_2x"}
    sl_cai = {r["revisions"] for r in table if r["method"] == "sl_cai" and r["metric"] == "elo"}
    assert sl_cai == {"0", "1", "2", "3", "4"}
    assert {r["cot"] for r in table if r["method"] == "rl_cai" and r["metric"] == "elo"} == {
        "True",
        "False",
    }
    assert (tmp_path / "figures" / "fig3_scaling.png").is_file()
    # Figure 3 on one scale: one fit over both sizes (one judge), the largest SL-CAI at 0
    joint = [*command, "--joint", str(folders[0]), "--bootstrap", "20"]
    done = subprocess.run(joint, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_rows(tmp_path / "results" / "joint_elo.csv")
    assert {r["model"] for r in rows} == {"tiny", "tiny_2x"}
    anchor = [r for r in rows if r["model"] == "tiny_2x" and r["method"] == "sl_cai"]
    assert anchor and all(float(r["value"]) == 0.0 for r in anchor)
    small_sl = [r for r in rows if r["model"] == "tiny" and r["method"] == "sl_cai"]
    assert small_sl and all(float(r["value"]) != 0.0 for r in small_sl)  # on the shared scale
    assert {r["stage"] for r in rows} == {"joint"} and {r["judge"] for r in rows} == {
        "pm_harmlessness"
    }
    table = read_rows(tmp_path / "results" / "all_results.csv")
    assert any(r["stage"] == "joint" for r in table)  # gathered: Figure 3 draws from them
    # runs judged by different judge artifacts share no scale: refused with a message
    same_job = ["model=size_sweep", "model.preset=tiny", "sft.num_revisions=2"]
    other_judge = [a for a in TINY_SL if not a.startswith("judge.init")] + ["judge.init=tiny_2x"]
    other = run_train(
        [*same_job, *other_judge], tmp_path, timeout=900
    )  # reuses all but judge, eval
    assert other.returncode == 0, other.stderr[-3000:]
    mixed = [*command, "--joint", str(folders[0]), str(tmp_path / "outputs" / "runs")]
    done = subprocess.run(mixed, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "one Elo scale needs one judge" in done.stderr


@pytest.mark.parametrize(
    ("experiment", "swept", "values"),
    [
        ("fig3_scaling", "model.preset", ["smollm2_135m", "smollm2_360m", "smollm2_1.7b"]),
        ("fig4_hhh", "model.preset", ["smollm2_135m", "smollm2_360m", "smollm2_1.7b"]),
        ("fig5_revisions", "sft.num_revisions", ["0", "1", "2", "3", "4"]),
        ("fig6_principles", "sl.num_principles", ["1", "2", "4", "8", "16"]),
        ("fig7_critique_vs_direct", "sl.critique", ["true", "false"]),
    ],
)
def test_experiment_files_carry_their_sweeps(experiment, swept, values):
    """`-m experiment=<name>` alone sweeps what the figure needs (read from the composed
    hydra.sweeper.params; test_size_sweep_launches_one_job_per_size launches such a sweep)."""
    from hydra import compose, initialize_config_dir

    from cai.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    assert str(cfg.hydra.sweeper.params[swept]).split(",") == values
