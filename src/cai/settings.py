"""Typed settings: one dataclass per config group (Hydra structured configs), applied when the
config is composed (`typed_config`): a value of the wrong type ("abc" for an integer), an
unknown key (a typo such as `sft.lrr`) or a value out of range (a batch size of 0, a negative
temperature, a negative prompt limit, which Python would read as a slice) fails before any
work, in one line that names the key, the value and what is allowed.

The groups whose content is free-form stay untyped: `model` (presets with their own
architecture fields), `trainer` and `logger` (Lightning's and the loggers' own arguments, checked
by them when instantiated), `paths`, `constitution` and `hydra`.

A range is given beside its field: `num(default, low, high)`; low/high are inclusive, None is
unbounded. Integers must be whole numbers (1.7 is refused for a count, as is true).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from cai.errors import ConfigError

log = logging.getLogger(__name__)


def num(default, low: float | None = None, high: float | None = None):
    """A numeric setting with its allowed range (inclusive; None: unbounded)."""
    return field(default=default, metadata={"low": low, "high": high})


def items(*values):
    """A list-valued default."""
    return field(default_factory=lambda: list(values))


@dataclass
class DataSettings:
    source: str = "builtin"  # builtin | hh_rlhf | files
    eval_percent: int = num(10, 0, 99)
    shuffle_seed: int = 0
    max_red_team: int | None = num(48, 1)
    max_helpful: int | None = num(48, 1)
    max_eval: int | None = num(None, 1)
    control_tokens: str = "escape"
    red_team_file: str | None = None  # data=files
    helpful_file: str | None = None
    hub_id: str | None = None  # data=hh_rlhf
    allow_download: bool = True
    helpful_fallback_builtin: bool = True


@dataclass
class GenerationSettings:
    backend: str = "hf"  # hf | vllm
    batch_size: int = num(64, 1)
    score_batch_size: int | None = num(32, 1)
    prefix_cache: bool = True
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True
    tensor_parallel_size: int = num(1, 1)  # vllm
    gpu_memory_utilization: float = num(0.85, 0.01, 1.0)


@dataclass
class EndpointSettings:
    """A labeller served over HTTP (`<group>.model=http`): an OpenAI-compatible completions API."""

    url: str | None = None  # base URL, e.g. http://gpu-node:8000/v1
    model: str = ""  # the served model's name ("" when the server serves one model)
    api_key_env: str | None = None  # environment variable holding the API key
    concurrency: int = num(4, 1)
    timeout_s: float = num(120.0, 1e-9)
    retries: int = num(3, 0)
    backoff_s: float = num(1.0, 0.0)


@dataclass
class SLSettings:
    model: str = "policy"  # policy (the helpful model, in process) | http (sl.endpoint)
    endpoint: EndpointSettings = field(default_factory=EndpointSettings)
    generate_revisions: int = num(4, 0)
    max_prompts: int | None = num(None, 1)  # per kind, of those data.* gives (null = all)
    num_revisions: int | None = num(None, 0)  # moved to sft.num_revisions (still read from here)
    critique: bool = True
    num_principles: int | None = num(None, 1)
    principle_ids: list[str] | None = None
    num_fewshot: int | None = num(None, 0)
    temperature: float = num(1.0, 0.0)
    top_p: float = num(1.0, 1e-9, 1.0)
    max_answer_tokens: int = num(128, 1)
    max_critique_tokens: int = num(96, 1)
    max_revision_tokens: int = num(128, 1)
    samples_per_helpful: int = num(2, 0)
    chunk_size: int = num(64, 1)


@dataclass
class SFTSettings:
    init: str = "policy"
    num_revisions: int = num(4, 0)  # SL-CAI-n: train on revision n (0 = the initial answer)
    lr: float = num(1e-5, 1e-12)
    weight_decay: float = num(0.0, 0.0)
    betas: list[float] = items(0.9, 0.95)
    warmup_steps: int = num(10, 0)
    batch_size: int = num(8, 1)
    micro_batch_tokens: int | None = num(512, 1)
    max_length: int = num(1024, 8)
    include_helpful: bool = True
    val_fraction: float = num(0.1, 0.0, 0.9)
    bucket_size: int = num(64, 1)
    cpu_attention: str | None = "sdpa"
    checkpoint_every: int = num(50, 1)
    lora: bool = False
    lora_r: int = num(16, 1)
    lora_alpha: int = num(32, 1)
    lora_dropout: float = num(0.05, 0.0, 1.0)
    lora_targets: list[str] = items(
        "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"
    )
    max_steps: int = -1


@dataclass
class PairsSettings:
    split: str = "train"
    max_prompts: int | None = num(None, 1)
    helpful: bool = True
    temperature: float = num(1.0, 0.0)
    top_p: float = num(1.0, 1e-9, 1.0)
    max_new_tokens: int = num(128, 1)
    chunk_size: int = num(32, 1)


@dataclass
class FeedbackSettings:
    model: str = "policy"  # policy | sft | a preset | a folder | http (feedback.endpoint)
    endpoint: EndpointSettings = field(default_factory=EndpointSettings)
    function: str | None = None  # package.module:name labelling instead of the model
    num_principles: int = num(1, 1)
    swap: bool = True
    cot: bool = False
    cot_samples: int = num(1, 1)
    clamp_low: float = num(0.4, 0.0, 1.0)
    clamp_high: float = num(0.6, 0.0, 1.0)
    cot_max_tokens: int = num(96, 1)
    cot_temperature: float = num(1.0, 0.0)
    helpfulness_principle: str = ""
    chunk_size: int = num(32, 1)


@dataclass
class PMSettings:
    init: str = "policy"
    harmlessness: str = "ai"  # ai | human | none
    helpfulness: str = "ai"  # ai | hh_rlhf | none
    helpfulness_ratio: float | None = num(1.0, 0.0)
    max_human: int | None = num(512, 1)
    lr: float = num(1e-5, 1e-12)
    weight_decay: float = num(0.0, 0.0)
    betas: list[float] = items(0.9, 0.95)
    warmup_steps: int = num(5, 0)
    batch_size: int = num(8, 1)
    micro_batch_tokens: int | None = num(512, 1)
    max_length: int = num(1024, 8)
    epochs: int = num(1, 1)  # passes over the comparisons (max_steps, if set, stops sooner)
    max_steps: int = -1
    checkpoint_every: int = num(50, 1)
    cpu_attention: str | None = "sdpa"
    eval_batch_size: int = num(16, 1)
    max_eval: int | None = num(128, 1)
    max_hhh: int | None = num(None, 0)
    weights: str = "auto"  # auto | float32
    train_layers: int | None = num(None, 1)
    holdout_percent: int = num(0, 0, 90)  # AI-labelled pairs held out (by prompt) to measure on
    holdout_min_margin: float = num(0.25, 0.0, 0.5)  # held-out pairs scored: |p(A) - 0.5| >= this


@dataclass
class PPOSettings:
    init: str = "sft"
    steps: int = num(6, 1)
    batch_size: int = num(16, 1)
    minibatch_size: int = num(4, 1)
    epochs: int = num(2, 1)
    lr: float = num(3e-5, 1e-12)
    betas: list[float] = items(0.9, 0.95)
    kl_coef: float = num(0.001, 0.0)
    adaptive_kl: bool = False
    kl_target: float = num(6.0, 0.0)
    kl_horizon: int = num(10000, 1)
    clip: float = 0.2  # in (0, 1): checked by the ppo stage
    value_clip: float = num(0.2, 0.0)
    vf_coef: float = num(0.5, 0.0)
    gamma: float = num(1.0, 0.0, 1.0)
    lam: float = num(0.95, 0.0, 1.0)
    max_grad_norm: float | None = num(1.0, 0.0)
    activation_checkpointing: bool = True
    temperature: float = num(1.0, 1e-6)
    max_new_tokens: int = num(128, 1)
    no_eos_penalty: float | None = None
    value_model: str = "head"  # head | pm
    prompt_mix: float = num(0.5, 0.0, 1.0)
    max_kl: float = 50.0
    snapshot_sequences: list[int] = items(32, 64, 96)
    checkpoint_every: int = num(3, 1)


@dataclass
class DPOSettings:
    init: str = "sft"
    harmlessness: str = "ai"  # ai | human | none
    helpfulness: str = "ai"  # ai | hh_rlhf | none
    helpfulness_ratio: float | None = num(1.0, 0.0)
    max_human: int | None = num(512, 1)
    beta: float = num(0.1, 1e-9)
    loss: str = "sigmoid"  # sigmoid | ipo
    labels: str = "soft"  # soft | hard
    lr: float = num(5e-6, 1e-12)
    weight_decay: float = num(0.0, 0.0)
    betas: list[float] = items(0.9, 0.95)
    warmup_steps: int = num(2, 0)
    epochs: int = num(2, 1)
    batch_size: int = num(8, 1)
    micro_batch_tokens: int | None = num(512, 1)
    max_length: int = num(512, 8)
    max_steps: int = -1
    cpu_attention: str | None = "sdpa"
    snapshot_sequences: list[int] = items(64, 128)
    checkpoint_every: int = num(4, 1)


@dataclass
class JudgeValidationSettings:
    answers_per_model: int | None = num(8, 1, 17)
    pairs_per_prompt: int = num(8, 1)
    bootstrap: int = num(1000, 1)


@dataclass
class JudgeSettings:
    init: str = "smollm2_135m"
    harmlessness: str | None = "paper_pm"
    helpfulness: str | None = None
    max_paper_pairs: int | None = num(384, 1)
    max_train: int | None = num(128, 1)
    max_test: int | None = num(128, 1)
    max_hhh: int | None = num(None, 0)
    extra: dict[str, str] = field(default_factory=dict)
    validation: JudgeValidationSettings = field(default_factory=JudgeValidationSettings)
    train_layers: int | None = num(8, 1)
    lr: float = num(3e-4, 1e-12)
    weight_decay: float = num(0.0, 0.0)
    betas: list[float] = items(0.9, 0.95)
    warmup_steps: int = num(5, 0)
    batch_size: int = num(8, 1)
    weights: str = "auto"
    micro_batch_tokens: int | None = num(512, 1)
    max_length: int = num(512, 8)
    max_steps: int = -1
    checkpoint_every: int = num(50, 1)
    cpu_attention: str | None = "sdpa"
    eval_batch_size: int = num(16, 1)
    seed: int | None = num(None, 0)
    paper_pairs: str | None = None


@dataclass
class VariantSettings:
    source: str = "ppo"  # policy | sft | ppo
    overrides: list[str] = field(default_factory=list)  # key=value, applied to the run's config


@dataclass
class AIJudgeSettings:
    model: str = "policy"  # as feedback.model; http: eval.ai_feedback.endpoint
    endpoint: EndpointSettings = field(default_factory=EndpointSettings)
    num_principles: int = num(1, 1)
    swap: bool = True
    max_comparisons: int | None = num(48, 1)
    helpfulness_principle: str = ""
    chunk_size: int = num(32, 1)


@dataclass
class EvalSettings:
    models: list[str] = items("helpful", "sl_cai", "rl_cai")
    variants: dict[str, VariantSettings] = field(default_factory=dict)
    extra_models: dict[str, str] = field(default_factory=dict)
    snapshots: bool = True
    anchor: str = "sl_cai"
    judges: list[str] = items("pm", "ai_feedback")  # and rule (eval.rule)
    rule: str | None = None  # package.module:name, the rule judge (as feedback.function)
    samples_per_prompt: int = num(1, 1)
    temperature: float = num(1.0, 0.0)
    max_new_tokens: int = num(128, 1)
    max_red_team: int | None = num(16, 1)
    max_helpful: int | None = num(16, 1)
    bootstrap: int = num(1000, 1)
    max_revision_prompts: int = num(64, 1)
    ai_feedback: AIJudgeSettings = field(default_factory=AIJudgeSettings)


@dataclass
class EvalHHHSettings:
    model: str = "policy"
    evals: list[str] = items("hhh", "harmful_vs_ethical", "harmfulness_classification")
    methods: list[str] = items("zero_shot", "cot", "cot_ensemble")
    max_items: int | None = num(None, 1)
    cot_evals: list[str] = items("hhh")
    cot_max_items: int | None = num(48, 1)
    cot_samples: int = num(5, 1)
    cot_max_tokens: int = num(96, 1)
    cot_temperature: float = num(1.0, 0.0)
    calibration_bins: int = num(10, 1)


@dataclass
class PipelineSettings:
    stages: list[str] = field(default_factory=list)
    plan: bool = False
    force: Any = False  # true, false or a list of stage names
    verify: str = "sha256"  # sha256 | size
    isolate_stages: bool = True
    figures: bool = True
    follower_timeout_s: float = num(86400, 1)


GROUPS: dict[str, type] = {
    "data": DataSettings,
    "generation": GenerationSettings,
    "sl": SLSettings,
    "sft": SFTSettings,
    "pairs": PairsSettings,
    "feedback": FeedbackSettings,
    "pm": PMSettings,
    "ppo": PPOSettings,
    "dpo": DPOSettings,
    "judge": JudgeSettings,
    "eval": EvalSettings,
    "eval_hhh": EvalHHHSettings,
    "pipeline": PipelineSettings,
}
MOVED = {"sl.num_revisions": "sft.num_revisions"}  # old name -> new name (still read)


def typed_config(cfg: DictConfig) -> DictConfig:
    """`cfg` with every typed group merged onto its dataclass (types and unknown keys checked,
    values converted: 1 -> 1.0 for a float) and every range checked; moved settings read from
    their old names. Raises ConfigError naming the key. Idempotent."""
    check_settings(cfg)  # ranges first: their messages say what is allowed
    with open_dict(cfg):
        for group, schema in GROUPS.items():
            if group not in cfg:
                continue
            try:
                cfg[group] = OmegaConf.merge(OmegaConf.structured(schema), cfg[group])
            except OmegaConfBaseException as error:
                raise ConfigError(_describe_error(group, error)) from error
        _read_moved(cfg)
    return cfg


def _describe_error(group: str, error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None) or getattr(error, "key", None) or ""
    key = key if str(key).startswith(f"{group}.") else f"{group}.{key}".rstrip(".")
    message = getattr(error, "msg", str(error)).splitlines()[0]
    if "not in" in message or "Key '" in message:
        schema = getattr(error, "object_type", None)
        schema = schema if dataclasses.is_dataclass(schema) else GROUPS[group]
        where = key.rsplit(".", 1)[0]
        known = ", ".join(f.name for f in dataclasses.fields(schema))
        return f"{key}: no such setting. The settings of `{where}` are: {known}."
    return f"{key}: {message}"


def _read_moved(cfg: DictConfig) -> None:
    for old, new in MOVED.items():
        value = OmegaConf.select(cfg, old)
        if value is None:
            continue
        log.warning("%s is now %s: read as %s=%s.", old, new, new, value)
        OmegaConf.update(cfg, new, value)
        OmegaConf.update(cfg, old, None)


def check_value(key: str, value, kind: type, low, high, nullable: bool) -> None:
    """Raise ConfigError naming `key` when `value` is not of `kind` within [low, high]."""
    allowed = _allowed(kind, low, high, nullable)
    if value is None:
        if nullable:
            return
        raise ConfigError(f"{key}=null: use {allowed}.")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r}: use {allowed}.")
    if kind is int and not isinstance(value, int):
        raise ConfigError(f"{key}={value!r}: use {allowed} (a whole number).")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"{key}={value!r}: use {allowed}.")


def _allowed(kind: type, low, high, nullable: bool) -> str:
    what = "an integer" if kind is int else "a number"
    if low is not None and high is not None:
        what += f" from {low:g} to {high:g}"
    elif low is not None:
        what += f" >= {low:g}" if low > 1e-6 or low == 0 else " > 0"
    return what + (" or null" if nullable else "")


def ranges(schema: type, prefix: str) -> dict[str, tuple[type, float | None, float | None, bool]]:
    """{dotted key: (int or float, low, high, null allowed)} of a dataclass's ranged fields."""
    out = {}
    for f in dataclasses.fields(schema):
        key, kind = f"{prefix}.{f.name}", str(f.type)
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(
            f.default_factory
        ):
            out |= ranges(f.default_factory, key)
        elif "low" in f.metadata:
            number = int if kind.startswith("int") else float
            out[key] = (number, f.metadata["low"], f.metadata["high"], "None" in kind)
    return out


NUMBERS = {
    "seed": (int, 0, None, False),
    "model.max_context": (int, 256, None, False),
    **{k: v for group, schema in GROUPS.items() for k, v in ranges(schema, group).items()},
}


def check_settings(cfg: DictConfig) -> None:
    """Every ranged setting present in `cfg`, and the structural ones below."""
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
        isinstance(devices, bool) or not isinstance(devices, int) or (devices < 1 and devices != -1)
    ):
        raise ConfigError(
            f"trainer.devices={devices!r}: use an integer >= 1, -1 (every GPU) or auto."
        )
    extra = cfg.eval.get("extra_models") or {}
    taken = set(cfg.eval.models) | set(cfg.eval.variants)
    clash = sorted(set(extra) & taken)
    if clash:
        raise ConfigError(
            f"eval.extra_models names {clash}, which eval.variants already use: "
            "give the extra models other names."
        )
