"""Every numeric setting checked when the run starts, before any work: type and range, with
one line that names the key, the value and what is allowed.

A value of the wrong type ("abc" for an integer, 1.7 for a count) or out of range (a batch size
of 0, a negative temperature, a negative prompt limit, which Python would read as a slice) is
refused here instead of failing deep inside a stage or, worse, running with changed results.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from cai.errors import ConfigError

# key -> (kind, low, high, null allowed); kind: "int" (a whole number, not a bool or float) or
# "float" (any real number); low/high inclusive, None = unbounded
NUMBERS: dict[str, tuple[str, float | None, float | None, bool]] = {
    "seed": ("int", 0, None, False),
    "data.eval_percent": ("int", 0, 99, False),
    "data.max_red_team": ("int", 1, None, True),
    "data.max_helpful": ("int", 1, None, True),
    "data.max_eval": ("int", 1, None, True),
    "model.max_context": ("int", 256, None, False),
    "generation.batch_size": ("int", 1, None, False),
    "generation.score_batch_size": ("int", 1, None, True),
    "sl.generate_revisions": ("int", 0, None, False),
    "sl.num_revisions": ("int", 0, None, False),
    "sl.num_principles": ("int", 1, None, True),
    "sl.num_fewshot": ("int", 0, None, True),
    "sl.temperature": ("float", 0.0, None, False),
    "sl.top_p": ("float", 1e-9, 1.0, False),
    "sl.max_answer_tokens": ("int", 1, None, False),
    "sl.max_critique_tokens": ("int", 1, None, False),
    "sl.max_revision_tokens": ("int", 1, None, False),
    "sl.samples_per_helpful": ("int", 0, None, False),
    "sl.chunk_size": ("int", 1, None, False),
    "sft.lr": ("float", 1e-12, None, False),
    "sft.batch_size": ("int", 1, None, False),
    "sft.micro_batch_tokens": ("int", 1, None, True),
    "sft.max_length": ("int", 8, None, False),
    "sft.warmup_steps": ("int", 0, None, False),
    "sft.val_fraction": ("float", 0.0, 0.9, False),
    "sft.checkpoint_every": ("int", 1, None, False),
    "pairs.max_prompts": ("int", 1, None, True),
    "pairs.temperature": ("float", 0.0, None, False),
    "pairs.top_p": ("float", 1e-9, 1.0, False),
    "pairs.max_new_tokens": ("int", 1, None, False),
    "pairs.chunk_size": ("int", 1, None, False),
    "feedback.num_principles": ("int", 1, None, False),
    "feedback.cot_samples": ("int", 1, None, False),
    "feedback.cot_max_tokens": ("int", 1, None, False),
    "feedback.cot_temperature": ("float", 0.0, None, False),
    "feedback.chunk_size": ("int", 1, None, False),
    "pm.lr": ("float", 1e-12, None, False),
    "pm.batch_size": ("int", 1, None, False),
    "pm.micro_batch_tokens": ("int", 1, None, True),
    "pm.eval_batch_size": ("int", 1, None, False),
    "pm.max_length": ("int", 8, None, False),
    "pm.max_human": ("int", 1, None, True),
    "pm.max_eval": ("int", 1, None, True),
    "pm.max_hhh": ("int", 0, None, True),
    "pm.helpfulness_ratio": ("float", 0.0, None, True),
    "pm.checkpoint_every": ("int", 1, None, False),
    "ppo.lr": ("float", 1e-12, None, False),
    "ppo.steps": ("int", 1, None, False),
    "ppo.batch_size": ("int", 1, None, False),
    "ppo.minibatch_size": ("int", 1, None, False),
    "ppo.epochs": ("int", 1, None, False),
    "ppo.temperature": ("float", 1e-6, None, False),
    "ppo.max_new_tokens": ("int", 1, None, False),
    "ppo.kl_coef": ("float", 0.0, None, False),
    "ppo.checkpoint_every": ("int", 1, None, False),
    "judge.lr": ("float", 1e-12, None, False),
    "judge.batch_size": ("int", 1, None, False),
    "judge.train_layers": ("int", 1, None, True),
    "judge.micro_batch_tokens": ("int", 1, None, True),
    "judge.eval_batch_size": ("int", 1, None, False),
    "judge.max_length": ("int", 8, None, False),
    "judge.max_train": ("int", 1, None, True),
    "judge.max_test": ("int", 1, None, True),
    "judge.max_hhh": ("int", 0, None, True),
    "judge.max_paper_pairs": ("int", 1, None, True),
    "judge.validation.answers_per_model": ("int", 1, 17, True),
    "judge.validation.pairs_per_prompt": ("int", 1, None, False),
    "judge.validation.bootstrap": ("int", 1, None, False),
    "judge.checkpoint_every": ("int", 1, None, False),
    "eval.samples_per_prompt": ("int", 1, None, False),
    "eval.temperature": ("float", 0.0, None, False),
    "eval.max_new_tokens": ("int", 1, None, False),
    "eval.max_red_team": ("int", 1, None, True),
    "eval.max_helpful": ("int", 1, None, True),
    "eval.bootstrap": ("int", 1, None, False),
    "eval.max_revision_prompts": ("int", 1, None, False),
    "eval.ai_feedback.num_principles": ("int", 1, None, False),
    "eval.ai_feedback.max_comparisons": ("int", 1, None, True),
    "eval.ai_feedback.chunk_size": ("int", 1, None, False),
    "eval_hhh.max_items": ("int", 1, None, True),
    "eval_hhh.cot_max_items": ("int", 1, None, True),
    "eval_hhh.cot_samples": ("int", 1, None, False),
    "eval_hhh.cot_max_tokens": ("int", 1, None, False),
}


def _describe(kind: str, low, high, nullable: bool) -> str:
    what = "an integer" if kind == "int" else "a number"
    if low is not None and high is not None:
        what += f" from {low:g} to {high:g}"
    elif low is not None:
        what += f" >= {low:g}" if low > 1e-6 or low == 0 else " > 0"
    return what + (" or null" if nullable else "")


def check_value(key: str, value, kind: str, low, high, nullable: bool) -> None:
    """Raise ConfigError naming `key` when `value` is not of `kind` within [low, high]."""
    allowed = _describe(kind, low, high, nullable)
    if value is None:
        if nullable:
            return
        raise ConfigError(f"{key}=null: use {allowed}.")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r}: use {allowed}.")
    if kind == "int" and not isinstance(value, int):
        raise ConfigError(f"{key}={value!r}: use {allowed} (a whole number).")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"{key}={value!r}: use {allowed}.")


def check_settings(cfg: DictConfig) -> None:
    """Every setting of NUMBERS present in `cfg`, and the structural ones below."""
    for key, (kind, low, high, nullable) in NUMBERS.items():
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=False, default="<absent>")
        except Exception as error:  # an interpolation that does not resolve
            raise ConfigError(f"{key}: {error}") from error
        if value != "<absent>":
            check_value(key, value, kind, low, high, nullable)
    stages = cfg.pipeline.stages
    if isinstance(stages, str) or not OmegaConf.is_list(stages):
        raise ConfigError(
            f"pipeline.stages={stages!r}: a list of stages, in brackets, e.g. "
            "pipeline.stages=[generate_sl] or pipeline.stages=[generate_sl,sft]."
        )
    devices = cfg.trainer.get("devices", 1)
    if devices != "auto" and (
        isinstance(devices, bool) or not isinstance(devices, int) or devices < 1
    ):
        raise ConfigError(f"trainer.devices={devices!r}: use an integer >= 1 or auto.")
    extra = cfg.eval.get("extra_models") or {}
    taken = set(cfg.eval.models) | set(cfg.eval.variants)
    clash = sorted(set(extra) & taken)
    if clash:
        raise ConfigError(
            f"eval.extra_models names {clash}, which eval.models/eval.variants already use: "
            "give the extra models other names."
        )
