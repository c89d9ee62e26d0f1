"""sft: SL-CAI (Bai et al. 2022, section 3): fine-tune the initial model on (red-team prompt,
revision n) with n = `sft.num_revisions` (0 = the initial answer, the no-revision baseline) and
the helpfulness samples, loss on response tokens only, 1 epoch at a constant learning rate after
a short warm-up (section 3.1). The LightningModule is cai.modules.sft.SFTModule.

Files: model/ (save_pretrained, fp32 master weights). Resumable from Lightning checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from cai.artifacts import Artifact
from cai.config import model_cfg_for
from cai.errors import ConfigError
from cai.models import load_model
from cai.modules.sft import SFTDataModule, SFTModule, sl_examples, split_examples
from cai.modules.training import fit, is_follower, training_dtype
from cai.stages.base import TRAINER_RUNTIME, Stage


def run(cfg: DictConfig, inputs: dict[str, Artifact], work_dir: Path) -> dict:
    sft = cfg.sft
    revisions = int(cfg.sft.num_revisions)
    # 1. The model to fine-tune: bf16 weights with fp32 master weights where the trainer trains
    # in bf16 (LoRA: fp32, its adapters are merged into the fp32 model at the end)
    init_cfg = model_cfg_for(cfg, str(sft.init), "sft.init", inputs)
    dtype = "float32" if sft.lora else training_dtype(cfg.trainer)
    model, tokenizer = load_model(init_cfg, cfg.paths.cache_dir, dtype=dtype)

    # 2. Examples: revision n of each red-team answer (and the helpfulness samples)
    examples, counts = sl_examples(
        inputs["generate_sl"],
        revisions,
        tokenizer,
        init_cfg.prompt_format,
        bool(sft.include_helpful),
        int(sft.max_length),
    )
    train, val = split_examples(examples, float(sft.val_fraction))

    # 3. Train
    if sft.lora:
        model = _with_lora(model, sft)
    model.train()
    data = SFTDataModule(
        train, val, int(sft.batch_size), int(sft.bucket_size), tokenizer.pad_token_id, int(cfg.seed)
    )
    module = SFTModule.from_config(model, sft, cfg.trainer)
    trained = fit(cfg, module, data, work_dir, int(sft.max_steps), int(sft.checkpoint_every))
    if is_follower():  # several processes: global rank 0 saves
        return trained

    # 4. Save: LoRA merged; fp32 master weights where it trained in bf16
    final = module.model.merge_and_unload() if sft.lora else module.model
    final.save_pretrained(
        work_dir / "model", safe_serialization=True, state_dict=module.final_state
    )
    tokenizer.save_pretrained(work_dir / "model")
    return {
        **counts,
        "train_examples": len(train),
        "val_examples": len(val),
        **trained,
        "target_revision": revisions,
        "init": str(sft.init),
    }


def _with_lora(model, sft: DictConfig):
    try:  # peft is optional (the `lora` extra)
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ConfigError("sft.lora=true needs peft: pip install -e '.[lora]'.") from error
    config = LoraConfig(
        r=int(sft.lora_r),
        lora_alpha=int(sft.lora_alpha),
        lora_dropout=float(sft.lora_dropout),
        target_modules=list(sft.lora_targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


STAGE = Stage(
    "sft",
    run,
    settings=("model", "sft", "trainer"),
    upstream=("generate_sl",),
    runtime=("sft.checkpoint_every", *TRAINER_RUNTIME),
    distributed=True,
)
