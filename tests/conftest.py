"""Shared fixtures: the real config composed and shrunk (tiny model, temporary folders)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("CAI_ROOT", str(REPO))
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach for a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shared_data_dir() -> Path | None:
    """The paper's files and hh-rlhf: CAI_DATA_DIR, else ../shared/data beside the checkout."""
    for candidate in (os.environ.get("CAI_DATA_DIR"), REPO.parent / "shared" / "data"):
        if candidate and Path(candidate, "cai-paper").is_dir():
            return Path(candidate)
    return None


@pytest.fixture
def data_dir() -> Path:
    found = shared_data_dir()
    if found is None:
        pytest.skip(
            "paper data not found: set CAI_DATA_DIR to a folder holding cai-paper/ and hh-rlhf/"
        )
    return found


# The whole pipeline on the random tiny model, shrunk to seconds (tests extend it per stage).
TINY_STAGES = [
    "model=tiny",
    "data.max_red_team=6",
    "data.max_helpful=3",
    "sl.generate_revisions=1",
    "sft.num_revisions=1",
    "sl.max_answer_tokens=8",
    "sl.max_critique_tokens=6",
    "sl.max_revision_tokens=8",
    "generation.progress=false",
    "sft.batch_size=4",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "pairs.max_new_tokens=10",
    "pm.batch_size=4",
    "pipeline.figures=false",  # figures: only where a test asks for them
]


# The judge and eval stages shrunk the same way (they join TINY_STAGES runs of the full list).
TINY_EVAL = [
    "judge.init=tiny",
    "judge.max_paper_pairs=16",
    "judge.validation.answers_per_model=2",
    "judge.validation.pairs_per_prompt=2",
    "judge.validation.bootstrap=20",
    "judge.max_train=8",
    "judge.max_test=8",
    "judge.max_hhh=8",
    "judge.batch_size=4",
    "eval.max_red_team=2",
    "eval.max_helpful=2",
    "eval.max_new_tokens=8",
    "eval.bootstrap=50",
    "eval.ai_feedback.max_comparisons=6",
    "eval.max_revision_prompts=3",
]


def path_overrides(tmp: Path) -> list[str]:
    """Send every output of a run under `tmp` (the model cache stays shared)."""
    return [
        f"paths.output_dir={tmp}/outputs",
        f"paths.results_dir={tmp}/results",
        f"paths.figures_dir={tmp}/figures",
    ]


@pytest.fixture
def make_cfg(tmp_path):
    """Compose the real config with overrides, outputs under tmp_path."""
    from cai.config import compose

    def _make(*overrides: str):
        return compose(path_overrides(tmp_path) + list(overrides))

    return _make


def run_train(args: list[str], tmp: Path, timeout: int = 600, env: dict | None = None):
    """Run `python src/train.py ARGS` as a user would; returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(
        [sys.executable, str(REPO / "src" / "train.py"), *args, *path_overrides(tmp)],
        cwd=tmp,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class FitKilled(RuntimeError):
    """What `kill_fits_at_step` raises inside a Lightning fit."""


def kill_fits_at_step(monkeypatch, step: int) -> None:
    """Every Lightning fit started from now on raises FitKilled once it reaches `step` (after
    that step's checkpoint callback has had its turn): a run killed mid-training.
    `monkeypatch.undo()` lets fits run again."""
    import pytorch_lightning as pl

    class Kill(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == step:
                raise FitKilled(f"killed at step {step}")

    original = pl.Trainer.__init__

    def with_kill(self, *args, callbacks=None, **kwargs):
        original(self, *args, callbacks=[*(callbacks or []), Kill()], **kwargs)

    monkeypatch.setattr(pl.Trainer, "__init__", with_kill)
