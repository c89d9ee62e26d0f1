"""The stage runner: artifact keys, manifests, reuse, resume after a kill, missing upstreams."""

import json

import pytest
from omegaconf import open_dict

from cai import pipeline
from cai.artifacts import ArtifactStore, PartWriter
from cai.errors import ArtifactError
from cai.pipeline import artifact_key
from cai.stages.base import Stage


class Killed(RuntimeError):
    pass


def count_stage(cfg, upstream, work_dir, kill_at=None):
    """A real stage in miniature: writes numbers batch by batch, resumable via PartWriter."""
    parts = PartWriter(work_dir / "parts")
    computed = 0
    for batch in range(cfg.toy.batches):
        if parts.done(batch):
            continue
        if kill_at is not None and batch == kill_at:
            raise Killed(f"killed at batch {batch}")
        parts.write(batch, [{"x": batch * 10 + i + cfg.seed} for i in range(3)])
        computed += 1
    records = parts.read_all()
    (work_dir / "numbers.json").write_text(json.dumps(records))
    return {"n": len(records), "computed_batches": computed}


def sum_stage(cfg, upstream, work_dir):
    numbers = json.loads(upstream["toy_count"].file("numbers.json").read_text())
    (work_dir / "sum.txt").write_text(str(sum(r["x"] for r in numbers)))
    return {"sum": sum(r["x"] for r in numbers)}


@pytest.fixture
def toy_stages(monkeypatch):
    monkeypatch.setitem(pipeline.STAGES, "toy_count", Stage("toy_count", count_stage, ("toy",)))
    monkeypatch.setitem(
        pipeline.STAGES,
        "toy_sum",
        Stage("toy_sum", sum_stage, ("toy_sum",), upstream=("toy_count",)),
    )


@pytest.fixture
def toy_cfg(make_cfg, toy_stages):
    cfg = make_cfg("model=tiny", "pipeline.stages=[toy_count,toy_sum]")
    with open_dict(cfg):
        cfg.toy = {"batches": 5, "label": "a"}
        cfg.toy_sum = {"scale": 1}
    return cfg


def test_keys_change_when_and_only_when_inputs_change(toy_cfg):
    base_count, base_sum = artifact_key(toy_cfg, "toy_count"), artifact_key(toy_cfg, "toy_sum")
    # unrelated settings: same keys
    toy_cfg.paths.results_dir = "/elsewhere"
    toy_cfg.model.name = "renamed"  # not a config key of the toy stages
    toy_cfg.pipeline.force = True
    assert (artifact_key(toy_cfg, "toy_count"), artifact_key(toy_cfg, "toy_sum")) == (
        base_count,
        base_sum,
    )
    # the downstream stage's own setting: only its key changes
    toy_cfg.toy_sum.scale = 2
    assert artifact_key(toy_cfg, "toy_count") == base_count
    assert artifact_key(toy_cfg, "toy_sum") != base_sum
    toy_cfg.toy_sum.scale = 1
    # an upstream setting: both change
    toy_cfg.toy.label = "b"
    assert artifact_key(toy_cfg, "toy_count") != base_count
    assert artifact_key(toy_cfg, "toy_sum") != base_sum
    toy_cfg.toy.label = "a"
    # the seed
    toy_cfg.seed = 1
    assert artifact_key(toy_cfg, "toy_count") != base_count
    toy_cfg.seed = 0
    assert (artifact_key(toy_cfg, "toy_count"), artifact_key(toy_cfg, "toy_sum")) == (
        base_count,
        base_sum,
    )


def test_run_writes_manifests_and_reuses(toy_cfg):
    first = pipeline.run(toy_cfg)
    manifest = first["toy_sum"].manifest
    assert manifest["status"] == "complete" and manifest["metrics"]["sum"] == sum(
        b * 10 + i for b in range(5) for i in range(3)
    )
    assert manifest["upstream"] == {"toy_count": first["toy_count"].key}
    assert (
        set(manifest["files"]) == {"sum.txt"} and len(manifest["files"]["sum.txt"]["sha256"]) == 64
    )
    assert manifest["config"] == {"toy_sum": {"scale": 1}} and manifest["timings"]["wall_s"] >= 0
    mtime = (first["toy_count"].path / "manifest.json").stat().st_mtime_ns
    again = pipeline.run(toy_cfg)
    assert again["toy_count"].path == first["toy_count"].path
    assert (again["toy_count"].path / "manifest.json").stat().st_mtime_ns == mtime  # reused


def test_killed_run_resumes_to_the_same_artifact(toy_cfg, make_cfg, tmp_path, monkeypatch):
    # Uninterrupted run in its own store.
    clean = pipeline.run(toy_cfg)["toy_count"]
    # Interrupted run in a second store: killed at batch 3, then rerun.
    toy_cfg.paths.artifact_dir = str(tmp_path / "second_store")
    killing = Stage("toy_count", lambda c, u, w: count_stage(c, u, w, kill_at=3), ("toy",))
    monkeypatch.setitem(pipeline.STAGES, "toy_count", killing)
    with pytest.raises(Killed):
        pipeline.run(toy_cfg)
    store = ArtifactStore(toy_cfg.paths.artifact_dir)
    key = artifact_key(toy_cfg, "toy_count")
    assert store.get("toy_count", key) is None  # unfinished: never an input
    assert len(list(store.work_folder("toy_count", key).glob("parts/part-*.jsonl"))) == 3
    monkeypatch.setitem(pipeline.STAGES, "toy_count", Stage("toy_count", count_stage, ("toy",)))
    resumed = pipeline.run(toy_cfg)["toy_count"]
    assert resumed.manifest["metrics"]["computed_batches"] == 2  # only the unfinished batches
    assert resumed.manifest["files"] == clean.manifest["files"]  # identical checksums
    assert not store.work_folder("toy_count", key).exists()


def test_missing_upstream_says_which_stage_to_add(toy_cfg):
    toy_cfg.pipeline.stages = ["toy_sum"]
    with pytest.raises(ArtifactError, match=r"pipeline.stages=\[toy_count,toy_sum\]"):
        pipeline.run(toy_cfg)


def test_folder_without_complete_manifest_is_not_an_artifact(toy_cfg):
    done = pipeline.run(toy_cfg)["toy_count"]
    store = ArtifactStore(toy_cfg.paths.artifact_dir)
    (done.path / "manifest.json").write_text('{"key": "' + done.key + '", "status": "comp')
    assert store.get("toy_count", done.key) is None
    rebuilt = pipeline.run(toy_cfg)["toy_count"]  # rebuilt, not read half-written
    assert rebuilt.manifest["status"] == "complete"


def test_force_rebuilds(toy_cfg):
    first = pipeline.run(toy_cfg)["toy_count"]
    toy_cfg.pipeline.force = True
    second = pipeline.run(toy_cfg)["toy_count"]
    assert second.key == first.key and second.manifest["metrics"]["computed_batches"] == 5


def test_unwritable_artifact_dir_names_the_path(toy_cfg, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    toy_cfg.paths.artifact_dir = str(blocker / "artifacts")
    with pytest.raises(ArtifactError, match="a_file"):
        pipeline.run(toy_cfg)


def test_plan_lists_every_instance_and_runs_nothing(make_cfg, tmp_path, capsys):
    """pipeline.plan=true: the run's stages and each RL variant's own chain, in build order,
    with keys; instances a variant shares with the run appear once; nothing is built."""
    cfg = make_cfg(
        "model=tiny",
        "eval.models=[helpful,sl_cai,rl_cai,helpful_rlhf]",
        "pipeline.plan=true",
    )
    assert pipeline.run(cfg) == {}
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["stage", "action", "key"]
    labels = [line.split()[0] for line in lines[1:]]
    assert labels == [
        "generate_sl",
        "sft",
        "generate_pairs",
        "feedback",
        "pm",
        "ppo",
        "judge",
        "pm[helpful_rlhf]",  # pm.harmlessness=none: its own PM and PPO; the rest shared
        "ppo[helpful_rlhf]",
        "eval",
    ]
    assert all(line.split()[1] == "build" for line in lines[1:])
    keys = {line.split()[0]: line.split()[2] for line in lines[1:]}
    assert keys["sft"] == artifact_key(cfg, "sft")
    assert keys["eval"] == artifact_key(cfg, "eval")
    assert not (tmp_path / "outputs" / "artifacts").exists() or not any(
        (tmp_path / "outputs" / "artifacts").rglob("manifest.json")
    )


def test_plan_says_reuse_for_built_artifacts(make_cfg, capsys):
    cfg = make_cfg("model=tiny", "data.max_red_team=4", "data.max_helpful=2",
                   "sl.max_answer_tokens=4", "sl.max_critique_tokens=4",
                   "sl.max_revision_tokens=4", "sl.generate_revisions=1",
                   "pipeline.stages=[generate_sl]")  # fmt: skip
    pipeline.run(cfg)
    capsys.readouterr()
    cfg.pipeline.plan = True
    cfg.pipeline.stages = ["generate_sl", "sft"]
    pipeline.run(cfg)
    actions = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    assert actions["generate_sl"] == "reuse" and actions["sft"] == "build"
    cfg.pipeline.stages = ["sft"]  # generate_sl only read: listed as such
    pipeline.run(cfg)
    actions = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    assert actions["generate_sl"] == "read" and actions["sft"] == "build"


def test_dpo_vs_ppo_experiment_plans_both_methods_and_their_human_baselines(make_cfg, capsys):
    """experiment=dpo_vs_ppo: RL-CAI by PPO and by DPO from the same SL-CAI and labels, and the
    HH-RLHF / HH-DPO baselines on human comparisons, planned as instances of one experiment."""
    cfg = make_cfg("model=tiny", "experiment=dpo_vs_ppo", "pipeline.plan=true")
    pipeline.run(cfg)
    labels = [line.split()[0] for line in capsys.readouterr().out.strip().splitlines()[1:]]
    assert labels[-1] == "eval"
    assert {"dpo[rl_cai_dpo]", "pm[hh_rlhf]", "ppo[hh_rlhf]", "dpo[hh_dpo]"} <= set(labels)
    assert labels.count("feedback") == 1 and labels.count("sft") == 1  # one SL-CAI, one labelling
