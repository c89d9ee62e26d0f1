"""Faults: a run killed partway through any stage, started again with the same command, ends
with the same artifact files (sha256 in the manifests) as an uninterrupted run; nothing
half-written is ever read; a full disk names the path. Also determinism: the same seed and
config give identical artifacts."""

import errno
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
from conftest import TINY_EVAL, TINY_STAGES, path_overrides, shared_data_dir

from cai.artifacts import PartWriter, read_jsonl
from cai.config import compose
from cai.errors import ArtifactError
from cai.pipeline import artifact_key, run

STAGES = ["generate_sl", "sft", "generate_pairs", "feedback", "pm", "ppo", "judge", "eval"]
GENERATION = {"generate_sl", "generate_pairs", "feedback", "eval"}  # resumable chunks
FAULT_RUN = [
    *TINY_STAGES,
    *TINY_EVAL,
    "sl.chunk_size=2",
    "pairs.chunk_size=2",
    "feedback.chunk_size=2",
    "eval.ai_feedback.chunk_size=2",
    "sft.batch_size=2",
    "sft.checkpoint_every=1",
    "pm.batch_size=2",
    "pm.checkpoint_every=1",
    "pm.max_eval=4",
    "pm.max_hhh=4",
    "judge.batch_size=2",
    "judge.checkpoint_every=1",
    "ppo.steps=3",
    "ppo.batch_size=2",
    "ppo.max_new_tokens=6",
    "ppo.snapshot_sequences=[2]",
    "ppo.checkpoint_every=1",
]


class Killed(Exception):
    """Stands in for a signal or crash partway through a stage."""


def config(folder: Path, *extra: str):
    data = shared_data_dir()
    return compose(
        path_overrides(folder)
        + FAULT_RUN
        + ([f"paths.data_dir={data}"] if data else [])
        + list(extra)
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Every stage built once without a fault: the reference artifacts."""
    if shared_data_dir() is None:
        pytest.skip("paper data not found: set CAI_DATA_DIR (the judge stage needs hh-rlhf)")
    folder = tmp_path_factory.mktemp("uninterrupted")
    return run(config(folder)), folder


def comparable(files: dict, stage: str) -> dict:
    """sha256 per file; PPO's metrics.jsonl holds wall times, compared separately."""
    return {
        k: v["sha256"] for k, v in files.items() if not (stage == "ppo" and k == "metrics.jsonl")
    }


def inject_fault(stage: str, monkeypatch) -> None:
    if stage in GENERATION:  # the second finished chunk is never written
        original, calls = PartWriter.write, []

        def write(self, index, records):
            calls.append(index)
            if len(calls) == 2:
                raise Killed(f"killed while writing chunk {index}")
            original(self, index, records)

        monkeypatch.setattr(PartWriter, "write", write)
    else:  # training: killed at the end of the second batch (the first one's checkpoint
        # written; Lightning runs checkpoint callbacks after this one)

        class Kill(pl.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                if batch_idx >= 1:
                    raise Killed(f"killed after batch {batch_idx}")

        original_init = pl.Trainer.__init__

        def with_kill(self, *args, callbacks=None, **kwargs):
            original_init(self, *args, callbacks=[*(callbacks or []), Kill()], **kwargs)

        monkeypatch.setattr(pl.Trainer, "__init__", with_kill)


@pytest.mark.parametrize("stage", STAGES)
def test_a_run_killed_in_any_stage_resumes_to_the_same_artifact(
    stage, uninterrupted, tmp_path, monkeypatch
):
    reference, reference_folder = uninterrupted
    cfg = config(tmp_path)
    # the upstream artifacts, finished (copied from the reference run: same keys)
    for before in STAGES[: STAGES.index(stage)]:
        source = reference[before].path
        shutil.copytree(source, Path(cfg.paths.artifact_dir) / before / source.name)
    cfg.pipeline.stages = STAGES[: STAGES.index(stage) + 1]
    inject_fault(stage, monkeypatch)
    with pytest.raises(Killed):
        run(cfg)
    monkeypatch.undo()
    key = artifact_key(cfg, stage)
    work = Path(cfg.paths.artifact_dir) / stage / f"{key}.partial"
    assert work.is_dir() and not (Path(cfg.paths.artifact_dir) / stage / key).exists()
    resumed = run(cfg)[stage]  # the same command again
    assert resumed.key == reference[stage].key
    metrics = resumed.manifest["metrics"]
    metrics = metrics.get("harmlessness", metrics) if stage == "judge" else metrics
    assert metrics.get("resumed_chunks", 0) >= 1 or metrics.get("resumed") or stage == "eval"
    assert comparable(resumed.manifest["files"], stage) == comparable(
        reference[stage].manifest["files"], stage
    )
    if stage == "ppo":  # the same iterations, wall times aside
        assert untimed(read_jsonl(resumed.file("metrics.jsonl"))) == untimed(
            read_jsonl(reference[stage].file("metrics.jsonl"))
        )


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_the_same_seed_and_config_give_identical_artifacts(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    again = run(config(tmp_path))
    for stage in STAGES:
        assert comparable(again[stage].manifest["files"], stage) == comparable(
            reference[stage].manifest["files"], stage
        ), stage


def test_a_full_disk_names_the_path_and_keeps_finished_work(tmp_path, monkeypatch):
    """ENOSPC while a stage saves: one clear error naming the file; finished chunks stay."""
    from cai.stages import sft

    cfg = config(tmp_path, "pipeline.stages=[generate_sl,sft]")
    target = tmp_path / "somewhere" / "model.safetensors"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(sft, "split_examples", full)
    with pytest.raises(ArtifactError, match="No space left on device") as error:
        run(cfg)
    assert str(target) in str(error.value) and "sft" in str(error.value)
    monkeypatch.undo()
    assert len(list((Path(cfg.paths.artifact_dir) / "generate_sl").glob("*/manifest.json"))) == 1


def test_a_checkpoint_from_another_model_is_refused_clearly(tmp_path, monkeypatch):
    """A resumable folder holding another model's Lightning checkpoint: one clear error."""
    other = config(tmp_path / "other", "model=tiny_2x", "pipeline.stages=[generate_sl,sft]")
    inject_fault("sft", monkeypatch)
    with pytest.raises(Killed):
        run(other)
    monkeypatch.undo()
    (written,) = Path(other.paths.artifact_dir).glob("sft/*.partial/checkpoints/last.ckpt")
    cfg = config(tmp_path / "mine", "pipeline.stages=[generate_sl,sft]")
    target = Path(cfg.paths.artifact_dir) / "sft" / f"{artifact_key(cfg, 'sft')}.partial"
    (target / "checkpoints").mkdir(parents=True)
    shutil.copy(written, target / "checkpoints" / "last.ckpt")
    with pytest.raises(ArtifactError, match="does not fit this model") as error:
        run(cfg)
    assert str(target / "checkpoints" / "last.ckpt") in str(error.value)
