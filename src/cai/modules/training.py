"""What the training stages (sft, pm, ppo) share: the optimiser, clipping, CPU settings, and
fitting a module with resumable Lightning checkpoints."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
import zipfile
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig

from cai.artifacts import atomic_path

log = logging.getLogger(__name__)


class TrainingModule(pl.LightningModule):
    """AdamW (fused where available) with a linear warm-up then a constant learning rate,
    gradient clipping by the module itself, and the CPU settings of `on_fit_start`."""

    def __init__(
        self,
        model,
        lr: float,
        weight_decay: float,
        betas,
        warmup_steps: int,
        clip_norm: float | None = None,
        cpu_attention: str | None = "eager",
    ):
        super().__init__()
        self.model = model
        self.cpu_attention = cpu_attention  # attention kernel for training on a CPU
        self.clip_norm = clip_norm  # clipped here: Lightning refuses to clip with a fused optimizer
        self.lr, self.weight_decay, self.betas, self.warmup_steps = (
            lr,
            weight_decay,
            tuple(betas),
            warmup_steps,
        )
        self.start_step = 0

    @classmethod
    def from_config(cls, model, stage: DictConfig, trainer: DictConfig):
        """The module with a stage's optimiser settings (`sft`, `pm`) and the trainer's clip."""
        clip = trainer.get("gradient_clip_val")
        return cls(
            model,
            float(stage.lr),
            float(stage.weight_decay),
            stage.betas,
            int(stage.warmup_steps),
            clip_norm=float(clip) if clip else None,
            cpu_attention=stage.get("cpu_attention"),
        )

    def on_fit_start(self):
        if self.device.type != "cpu":
            return
        from cai.models import keep_freed_memory

        keep_freed_memory()  # no page faults on the step's fresh 100+ MB buffers (models.py)
        self._attention = self.model.config._attn_implementation
        if self.cpu_attention:  # eager (bmm) attention trains faster here than SDPA's CPU kernel
            self.model.set_attn_implementation(self.cpu_attention)

    def on_fit_end(self):
        if getattr(self, "_attention", None):  # the saved model keeps its own attention setting
            self.model.set_attn_implementation(self._attention)

    def on_train_start(self):
        self.start_step = self.global_step  # > 0 when resumed from a checkpoint

    def on_before_optimizer_step(self, optimizer):
        if self.clip_norm:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.grad is not None], self.clip_norm
            )

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        settings = {"lr": self.lr, "weight_decay": self.weight_decay, "betas": self.betas}
        try:  # the fused kernel: one pass over all parameters (about 4x faster on a CPU)
            optimizer = torch.optim.AdamW(params, fused=True, **settings)
        except (RuntimeError, TypeError):
            optimizer = torch.optim.AdamW(params, **settings)
        warmup = max(1, self.warmup_steps)
        # Constant learning rate after a linear warm-up (paper: constant LR, section 3.1).
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def is_follower() -> bool:
    """True in a process that Lightning (or Slurm, torchrun) started beside the global-zero one
    to train on several devices. Such a process takes part in every fit but writes nothing: the
    pipeline (cai.pipeline.follow) and the stages leave artifacts to global rank 0."""
    import os

    return any(int(os.environ.get(v) or 0) > 0 for v in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def rank_and_world(trainer) -> tuple[int, int]:
    """(global rank, number of processes) of a trainer, (0, 1) outside one."""
    return (trainer.global_rank, trainer.world_size) if trainer else (0, 1)


def shard_batches(batches: list, trainer, setting: str) -> list:
    """Several processes (DDP, FSDP): each takes every world-th batch of the same seeded order,
    all the same number of batches (trainer.use_distributed_sampler is off)."""
    from cai.errors import ConfigError

    rank, world = rank_and_world(trainer)
    if world == 1:
        return batches
    usable = len(batches) - len(batches) % world
    if usable == 0:
        raise ConfigError(
            f"{len(batches)} batches for {world} processes: lower {setting} or trainer.devices."
        )
    return batches[:usable][rank::world]


def remaining_batches(batches: list, trainer, done: int | None = None) -> list:
    """The epoch's batches with the `done` ones (default: optimiser steps x accumulation, this
    epoch) moved to the end. Resumed from a mid-epoch checkpoint, Lightning restarts a plain
    DataLoader at its first batch and stops after len - done batches: it would train again on
    the batches before the checkpoint and never on the last ones. Rotated, the first len - done
    batches are exactly the ones not yet trained on, so a resumed run ends with the same
    weights as an uninterrupted one (tests/test_faults.py)."""
    if trainer is None:
        return batches
    if done is None:
        steps = trainer.global_step * trainer.accumulate_grad_batches
        done = steps - trainer.current_epoch * len(batches)
    done = min(max(0, done), len(batches))
    return batches[done:] + batches[:done]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written through `cai.artifacts.atomic_path` (a temporary file
    beside the target, then renamed): a kill or a full disk mid-write never leaves a truncated
    `last.ckpt` behind, and a failed write names the checkpoint's real path."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            try:
                super().save_checkpoint(checkpoint, tmp, storage_options)
            except RuntimeError as error:  # torch's own writer reports a full disk this way
                if "No space left" not in str(error):
                    raise
                raise OSError(errno.ENOSPC, "No space left on device", str(path)) from error


def atomic_checkpoints(trainer_cfg: DictConfig) -> list:
    """The atomic checkpoint writer, for strategies that save one file per checkpoint (FSDP and
    DeepSpeed write sharded folders with their own writers)."""
    strategy = str(trainer_cfg.get("strategy", "auto")).lower()
    return [] if "fsdp" in strategy or "deepspeed" in strategy else [AtomicCheckpointIO()]


def usable_checkpoint(path: Path) -> bool:
    """Whether a checkpoint file is a complete archive (every member's CRC checks). One that is
    not (written by an older version without atomic saves, then killed) is set aside with a
    warning, and training starts from the beginning."""
    if not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        bad = str(error) or "unreadable"
    if bad is None:
        return True
    aside = path.with_name(path.name + ".corrupt")
    os.replace(path, aside)
    log.warning(
        "The checkpoint %s does not load (%s): set aside as %s; training starts from the "
        "beginning.",
        path,
        bad,
        aside,
    )
    return False


def fit(
    cfg: DictConfig,
    module: TrainingModule,
    data: pl.LightningDataModule,
    work_dir: Path,
    max_steps: int,
    checkpoint_every: int,
) -> dict:
    """Train with `cfg.trainer`; a killed run, started again, resumes from the last checkpoint
    in `work_dir/checkpoints` (removed once training ends). Returns the trainer's metrics."""
    from hydra.utils import instantiate
    from pytorch_lightning.callbacks import ModelCheckpoint

    from cai.loggers import build_loggers
    from cai.models import bf16_supported

    checkpoints = work_dir / "checkpoints"
    precision = cfg.trainer.precision
    if cfg.trainer.accelerator == "cpu" and "bf16" in str(precision) and not bf16_supported():
        log.warning("This CPU has no native bf16: training in fp32.")
        precision = "32-true"
    pl.seed_everything(int(cfg.seed), workers=True)
    trainer = instantiate(
        cfg.trainer,
        precision=precision,
        gradient_clip_val=None,  # the module clips (TrainingModule.on_before_optimizer_step)
        max_steps=max_steps,
        logger=build_loggers(cfg.logger),
        plugins=atomic_checkpoints(cfg.trainer),
        callbacks=[
            ModelCheckpoint(
                dirpath=checkpoints,
                save_last=True,
                every_n_train_steps=checkpoint_every,
                save_top_k=0,
            )
        ],
    )
    resume = checkpoints / "last.ckpt"
    resumed = usable_checkpoint(resume)  # a killed run left a checkpoint: continue from it
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resumed else None)
    except RuntimeError as error:
        if resumed and "state_dict" in str(error):  # weights of another model or settings
            from cai.errors import ArtifactError

            raise ArtifactError(
                f"The checkpoint {resume} does not fit this model: "
                f"{str(error).splitlines()[0]} It was written by another model or settings; "
                f"delete {checkpoints} to train from the start."
            ) from error
        raise
    wall = time.perf_counter() - start
    if not is_follower():  # resumable state is not part of the artifact; rank 0 tidies up
        shutil.rmtree(checkpoints, ignore_errors=True)
    return {
        "steps": trainer.global_step,
        "resumed": resumed,
        "start_step": module.start_step,
        "fit_wall_s": round(wall, 2),
        **{k: float(v) for k, v in trainer.callback_metrics.items()},
    }
