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
from hydra.utils import instantiate
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint

from cai.artifacts import atomic_path, write_json_atomic, write_jsonl_atomic
from cai.errors import ArtifactError, ConfigError
from cai.loggers import build_loggers
from cai.memory import release_freed_memory, trim_heap_if_grown
from cai.models import bf16_supported

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
        cpu_attention: str | None = "sdpa",
        micro_batch_tokens: int | None = None,
    ):
        super().__init__()
        self.model = model
        self.micro_batch_tokens = micro_batch_tokens  # padded tokens per forward pass (None: all)
        self.final_state: dict | None = None  # fp32 master weights at the end (bf16 training):
        # what the stage saves (save_pretrained(state_dict=...)); the model stays in bf16
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
    def from_config(cls, model, stage: DictConfig, trainer: DictConfig, **extra):
        """The module with a stage's optimiser settings (`sft`, `pm`, `dpo`) and the trainer's
        clip; `extra`: the module's own arguments."""
        clip = trainer.get("gradient_clip_val")
        return cls(
            model,
            float(stage.lr),
            float(stage.weight_decay),
            stage.betas,
            int(stage.warmup_steps),
            clip_norm=float(clip) if clip else None,
            cpu_attention=stage.get("cpu_attention"),
            micro_batch_tokens=stage.get("micro_batch_tokens"),
            **extra,
        )

    def accumulate(self, losses) -> torch.Tensor:
        """Backpropagate each loss of a batch's micro-batches as it comes (so one micro-batch's
        activations are alive at a time) but the last, which Lightning backpropagates when the
        training step returns it. Returns the total loss (gradient flows from the last part).
        The parts' losses must add up to the batch's loss."""
        previous, total = None, 0.0
        for loss in losses:
            if previous is not None:
                self._backward(previous)
            total = total + loss.detach()
            previous = loss
        return previous + (total - previous.detach())

    def _backward(self, loss: torch.Tensor) -> None:
        if self._trainer is None:  # called outside a fit (tests)
            loss.backward()
        else:  # through the strategy: precision plugin (loss scaling) and DDP hooks
            self.trainer.strategy.backward(loss, None)

    def on_fit_start(self):
        if self.device.type != "cpu":
            return
        self._attention = self.model.config._attn_implementation
        if self.cpu_attention:  # sdpa: memory linear in length (eager keeps [B, H, T, T] weights)
            self.model.set_attn_implementation(self.cpu_attention)

    def on_fit_end(self):
        if getattr(self, "_attention", None):  # the saved model keeps its own attention setting
            self.model.set_attn_implementation(self._attention)

    def on_train_start(self):
        self.start_step = self.global_step  # > 0 when resumed from a checkpoint

    def on_train_end(self):
        # bf16 weights: keep the optimiser's fp32 master weights (the trainer lets them go)
        if any(p.dtype != torch.float32 for p in self.model.parameters()):
            self.final_state = full_precision_state_dict(self.model, self.optimizers())

    def on_train_batch_end(self, outputs, batch, batch_idx):
        trim_heap_if_grown()  # each step starts from about the same footprint (cai.memory)

    def on_before_optimizer_step(self, optimizer):
        if self.clip_norm:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.grad is not None], self.clip_norm
            )

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        settings = {"lr": self.lr, "weight_decay": self.weight_decay, "betas": self.betas}
        if any(p.dtype != torch.float32 for p in params):  # bf16 weights: fp32 master copies
            optimizer = MasterWeightAdamW(params, **settings)
        else:
            optimizer = fused_adamw(params, **settings)
        warmup = max(1, self.warmup_steps)
        # Constant learning rate after a linear warm-up (paper: constant LR, section 3.1).
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def row_slices(lengths: list[int], budget: int | None) -> list[slice]:
    """Consecutive groups of rows whose padded size (rows x longest row) stays within `budget`
    tokens (a longer row goes alone); one group when budget is None."""
    if not budget:
        return [slice(0, len(lengths))]
    groups, start, widest = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and (i - start + 1) * max(widest, n) > budget:
            groups.append(slice(start, i))
            start, widest = i, 0
        widest = max(widest, n)
    groups.append(slice(start, len(lengths)))
    return groups


def training_dtype(trainer_cfg: DictConfig) -> str:
    """The dtype the training stages load their weights in: bfloat16 when `trainer.precision`
    is a bf16 one and the hardware has bf16 (forward and backward in bf16, fp32 master weights
    in the optimiser: MasterWeightAdamW), else float32."""
    if "bf16" not in str(trainer_cfg.precision):
        return "float32"
    if trainer_cfg.accelerator == "cpu" and not bf16_supported():
        return "float32"
    return "bfloat16"


def is_follower() -> bool:
    """True in a process that Lightning (or Slurm, torchrun) started beside the global-zero one
    to train on several devices. Such a process takes part in every fit but writes nothing: the
    pipeline (cai.pipeline.follow) and the stages leave artifacts to global rank 0."""
    return any(int(os.environ.get(v) or 0) > 0 for v in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def rank_and_world(trainer) -> tuple[int, int]:
    """(global rank, number of processes) of a trainer, (0, 1) outside one."""
    return (trainer.global_rank, trainer.world_size) if trainer else (0, 1)


def shard_batches(batches: list, trainer, setting: str) -> list:
    """Several processes (DDP, FSDP): each takes every world-th batch of the same seeded order,
    all the same number of batches (trainer.use_distributed_sampler is off)."""
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
            try:  # straight to the file: Lightning's own writer serialises into memory first
                # (a second copy of the weights and optimiser state at the peak)
                torch.save(checkpoint, tmp)
            except RuntimeError as error:  # torch's writer reports a full disk as a stream error
                if "No space left" not in str(error) and not _disk_full(Path(tmp).parent):
                    raise
                raise OSError(errno.ENOSPC, "No space left on device", str(path)) from error


def _disk_full(folder: Path) -> bool:
    """Whether the file system of `folder` has (almost) no space left."""
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


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
    checkpoints = work_dir / "checkpoints"
    precision = cfg.trainer.precision
    if cfg.trainer.accelerator == "cpu" and "bf16" in str(precision) and not bf16_supported():
        log.warning("This CPU has no native bf16: training in fp32.")
        precision = "32-true"
    if any(p.dtype == torch.bfloat16 for p in module.parameters()):
        precision = "32-true"  # bf16 weights (training_dtype): bf16 already, no autocast
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
            raise ArtifactError(
                f"The checkpoint {resume} does not fit this model: "
                f"{str(error).splitlines()[0]} It was written by another model or settings; "
                f"delete {checkpoints} to train from the start."
            ) from error
        raise
    wall = time.perf_counter() - start
    if not is_follower():  # resumable state is not part of the artifact; rank 0 tidies up
        shutil.rmtree(checkpoints, ignore_errors=True)
    metrics = {
        "steps": trainer.global_step,
        "resumed": resumed,
        "start_step": module.start_step,
        "fit_wall_s": round(wall, 2),
        **{k: float(v) for k, v in trainer.callback_metrics.items()},
    }
    # The optimiser state (2x the weights) goes with the trainer: let it go before the stage
    # scores or saves anything, so it does not add to the stage's peak memory.
    module.trainer = data.trainer = None
    del trainer
    module.zero_grad(set_to_none=True)
    release_freed_memory()
    return metrics


def fused_available(params) -> bool | None:
    """Whether AdamW's fused kernel (one pass over all parameters, about 4x faster on a CPU)
    takes these parameters; None lets torch choose."""
    try:
        torch.optim.AdamW(
            [torch.zeros(1, dtype=params[0].dtype, device=params[0].device)], fused=True
        )
    except (RuntimeError, TypeError, IndexError):
        return None
    return True


def fused_adamw(params, **settings) -> torch.optim.AdamW:
    """AdamW with the fused kernel where it is available."""
    return torch.optim.AdamW(params, fused=fused_available(params), **settings)


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW for a model held in bf16: the update runs on fp32 master copies of its weights
    (mixed-precision training as in Megatron-LM and DeepSpeed), which are then rounded into the
    model. Forward and backward passes run in bf16 on half the memory; small updates are not
    lost to bf16 rounding. fp32 parameters (e.g. a value head) are updated in place as usual.
    The master copies are part of `state_dict`, so a resumed run continues from them exactly."""

    GROUP_ELEMENTS = 8_000_000  # weights per update group (the fp32 gradients of one group
    # exist at a time: 32 MB, not 4 bytes a weight of the whole model at the step's peak)

    def __init__(self, params, **settings):
        self.model_params = [p for p in params if p.requires_grad]
        masters = [
            p if p.dtype == torch.float32 else p.detach().float().requires_grad_(True)
            for p in self.model_params
        ]
        super().__init__(
            update_groups(masters, self.GROUP_ELEMENTS), fused=fused_available(masters), **settings
        )

    def _masters(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pairs = iter(zip(self.model_params, self._masters(), strict=True))
        groups = self.param_groups
        try:
            for group in groups:  # one group at a time: its fp32 gradients, update, copy back
                members = [next(pairs) for _ in group["params"]]
                for param, master in members:
                    if master is not param:
                        master.grad = None if param.grad is None else param.grad.float()
                        param.grad = None  # the bf16 gradient goes as its fp32 copy comes
                self.param_groups = [group]
                super().step()
                for param, master in members:
                    if master is not param:
                        param.copy_(master)
                        master.grad = None  # 4 bytes a weight, needed only for the update
        finally:
            self.param_groups = groups
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for param in self.model_params:  # the model's gradients; fp32 ones as AdamW would
            if param.grad is not None and (set_to_none or param.dtype != torch.float32):
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()

    def full_precision(self) -> dict[int, torch.Tensor]:
        """id(model parameter) -> its fp32 master weights."""
        return {id(p): m for p, m in zip(self.model_params, self._masters(), strict=True)}

    def state_dict(self):
        state = super().state_dict()
        state["master_weights"] = [m.detach() for m in self._masters()]  # saved at once
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_weights", None)
        super().load_state_dict(state_dict)
        if masters is not None:
            with torch.no_grad():
                for master, saved in zip(self._masters(), masters, strict=True):
                    master.copy_(saved)


def update_groups(params: list[torch.Tensor], max_elements: int) -> list[dict]:
    """Consecutive parameters in groups of at most `max_elements` weights (a larger tensor goes
    alone), as optimiser parameter groups."""
    groups, size = [], 0
    for p in params:
        if not groups or size + p.numel() > max_elements:
            groups.append({"params": []})
            size = 0
        groups[-1]["params"].append(p)
        size += p.numel()
    return groups


def full_precision_state_dict(model, optimizer) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with the optimiser's fp32 master weights where it keeps them."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Lightning wraps optimisers
    masters = inner.full_precision() if isinstance(inner, MasterWeightAdamW) else {}
    by_storage = {
        p.data_ptr(): masters[id(p)].detach() for p in model.parameters() if id(p) in masters
    }
    # tied weights (embedding = LM head) share storage: both names get the same master tensor
    return {
        name: by_storage.get(tensor.data_ptr(), tensor)
        for name, tensor in model.state_dict().items()
    }


def save_policy(policy, tokenizer, folder: Path, state_dict: dict | None = None) -> None:
    """save_pretrained into a temporary folder, then rename: never a half-written snapshot.
    `state_dict`: the weights to save (e.g. fp32 master weights) instead of the model's own."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)


def save_trained_policy(
    policy, tokenizer, work_dir: Path, state_dict: dict | None, history: list[dict]
) -> list[str]:
    """What an RL stage (ppo, dpo) writes at the end: the final policy in `work_dir/model`
    (`state_dict`: e.g. fp32 master weights), its metrics per step in metrics.jsonl, and the
    finished snapshots (`work_dir/snapshots/seq_<n>`) in snapshots.json. Returns that list."""
    save_policy(policy, tokenizer, work_dir / "model", state_dict)
    write_jsonl_atomic(work_dir / "metrics.jsonl", history)
    snapshots = sorted(  # finished snapshots only (a killed save leaves seq_<n>.tmp)
        p.name for p in (work_dir / "snapshots").glob("seq_*") if not p.name.endswith(".tmp")
    )
    write_json_atomic(work_dir / "snapshots.json", snapshots)
    return snapshots
