"""ppo: RL-CAI (Bai et al. 2022, section 4): PPO of the SL-CAI policy against the pm stage's
preference model, with a KL penalty to SL-CAI (cai.modules.ppo.PPOModule; the maths in
cai.rl.ppo_math). The Helpful-RLHF and HH-RLHF baselines are the same stage from the helpful
model (`ppo.init=policy`) against their own PMs (eval.variants).

Files: model/ (the final policy), snapshots/seq_<n>/ (after `ppo.snapshot_sequences` training
sequences, Figures 2 and 8), snapshots.json, metrics.jsonl (one line per PPO iteration; beside
TRL's `objective/scores`, `objective/score_gain`: the rollouts' PM score less the PM's score of
the start model's own answers to the same prompts: SL-CAI's from generate_pairs, the helpful
model's from generate_sl for the baselines that start from it).
Resumable from Lightning checkpoints (`ppo.checkpoint_every` iterations).
"""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cai.artifacts import Artifact, read_jsonl
from cai.comparisons import answer_turns
from cai.config import model_cfg_for
from cai.errors import ConfigError
from cai.generation import build_engine, resolve_device
from cai.inputs import input_fingerprints, load_inputs
from cai.models import load_model
from cai.modules.ppo import (
    PMValue,
    PPOModule,
    PromptBatches,
    ValueHead,
    minibatch_size,
)
from cai.modules.training import fit, is_follower, save_trained_policy, training_dtype
from cai.preference import PreferenceModel
from cai.prompting import answer_prompt
from cai.stages.base import TRAINER_RUNTIME, Stage


def run(cfg: DictConfig, inputs: dict[str, Artifact], work_dir: Path) -> dict:
    check_settings(cfg)
    ppo = cfg.ppo
    # 1. Models. The policy starts from SL-CAI (paper, section 4); the Helpful-RLHF and HH-RLHF baselines
    # start from the helpful model instead (ppo.init=policy). The KL reference is the same model.
    init_cfg = model_cfg_for(cfg, str(ppo.init), "ppo.init", inputs)
    # bf16 weights where the trainer trains in bf16 and the hardware has it: forward and backward
    # in bf16, fp32 master weights in the optimiser (MasterWeightAdamW); the reference and the PM
    # in bf16 too (half the memory; the reference's log-probabilities come from the same kernels
    # as the policy's, so the KL starts at exactly 0).
    dtype = training_dtype(cfg.trainer)
    policy, tokenizer = load_model(init_cfg, cfg.paths.cache_dir, dtype=dtype)
    reference, _ = load_model(init_cfg, cfg.paths.cache_dir, dtype=dtype)
    reference.eval()
    device = resolve_device(str(cfg.generation.get("device", "auto")))
    if cfg.trainer.accelerator == "cpu":
        device = "cpu"
    pm = PreferenceModel.load(inputs["pm"].path / "model", dtype=dtype, device=device)
    if ppo.activation_checkpointing:  # recompute each layer's activations in the backward pass
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if ppo.value_model == "head":
        value = ValueHead(policy.config.hidden_size)
    else:
        value = PMValue(PreferenceModel.load(inputs["pm"].path / "model", dtype=dtype).model)
        value.train()

    # 2. The reward: the PM's score of (prompt, answer); and each prompt's baseline for the
    # metrics, the PM's mean score of the start model's own answers to it (SL-CAI's two answers
    # from generate_pairs; the helpful model's from generate_sl for the baselines from it)
    def reward_fn(prompts: list[str], answers: list[str]) -> list[float]:
        return pm.score([answer_turns(p, a) for p, a in zip(prompts, answers, strict=True)])

    baseline_fn = PromptBaselines(start_model_answers(str(ppo.init), inputs), reward_fn)

    # 3. Prompts and the rollout engine: the configured engine (generation=hf or vllm) with its
    # own copy of the policy (bf16 where supported), given the trained weights before each
    # rollout
    prompts = ppo_prompts(cfg, tokenizer, cfg.model.prompt_format)
    engine = build_engine(
        OmegaConf.merge(cfg.generation, {"progress": False}),
        init_cfg,
        cfg.paths.cache_dir,
        model=policy,  # hf: generate with the policy itself (bf16 here); vllm: its own copy
    )

    # 4. Train: one Lightning step per PPO iteration (cai.modules.ppo.PPOModule)
    module = PPOModule(
        policy, reference, value, engine, reward_fn, tokenizer, prompts, ppo, baseline_fn
    )
    module.seed = int(cfg.seed)
    module.snapshot_dir = work_dir / "snapshots"
    module.snapshot_dir.mkdir(parents=True, exist_ok=True)
    # One epoch over ppo.steps prompt batches = ppo.steps iterations; the weights' own precision
    # (no autocast: a bf16 policy is bf16 already).
    run_cfg = OmegaConf.merge(cfg, {"trainer": {"max_epochs": 1, "precision": "32-true"}})
    data = PromptBatches(len(prompts), int(ppo.steps), int(ppo.batch_size), int(cfg.seed))
    # Lightning counts optimiser steps; ppo.checkpoint_every counts iterations
    batch = int(ppo.batch_size)
    steps_per_iteration = int(ppo.epochs) * math.ceil(
        batch / minibatch_size(int(ppo.minibatch_size), batch)
    )
    checkpoint_every = int(ppo.checkpoint_every) * steps_per_iteration
    trained = fit(run_cfg, module, data, work_dir, -1, checkpoint_every)
    if is_follower():  # several processes: global rank 0 saves
        return trained

    # 5. Save the final policy, the metrics per iteration and the list of snapshots
    snapshots = save_trained_policy(policy, tokenizer, work_dir, module.final_state, module.history)
    return {
        **trained,
        "sequences": module.sequences,
        "first": module.history[0] if module.history else {},
        "last": module.history[-1] if module.history else {},
        "snapshots": snapshots,
        "prompts": {k: sum(1 for p in prompts if p[0] == k) for k in ("red_team", "helpful")},
        "init": str(ppo.init),
    }


def ppo_prompts(cfg: DictConfig, tokenizer, prompt_format: str) -> list[tuple[str, str, str]]:
    """(kind, request, policy prompt) for the train split, mixed at `ppo.prompt_mix` red-team
    prompts per prompt (the rest helpfulness)."""
    _, prompt_set = load_inputs(cfg)
    train = prompt_set.split("train")
    red = [("red_team", p.text) for p in train.red_team]
    helpful = [("helpful", p.text) for p in train.helpful]
    mix = float(cfg.ppo.prompt_mix)
    if not 0.0 <= mix <= 1.0:
        raise ConfigError(f"ppo.prompt_mix={mix}: a fraction of red-team prompts in [0, 1].")
    if mix < 1.0 and helpful and red:
        wanted = round(len(red) * (1 - mix) / mix) if mix > 0 else len(helpful)
        helpful = helpful[: max(1, wanted)]
    chosen = (red if mix > 0 else []) + (helpful if mix < 1 else [])
    if not chosen:
        raise ConfigError("No PPO prompts: check data.* and ppo.prompt_mix.")
    return [(k, t, answer_prompt(tokenizer, t, prompt_format)) for k, t in chosen]


def start_model_answers(init: str, inputs: dict[str, Artifact]) -> dict[str, list[str]]:
    """{request: the start model's own answers to it}: SL-CAI's two answers per prompt
    (generate_pairs) when PPO starts from SL-CAI; the helpful model's (generate_sl: its initial
    red-team answer, its helpfulness samples) when it starts from the helpful model (the
    Helpful-RLHF and HH-RLHF baselines); none for another start model (no score gain)."""
    if init == "sft":
        pairs = read_jsonl(inputs["generate_pairs"].file("pairs.jsonl"))
        return {r["prompt"]: [r["answer_a"], r["answer_b"]] for r in pairs}
    if init == "policy":
        sl = inputs["generate_sl"]
        red = {r["prompt"]: [r["initial"]] for r in read_jsonl(sl.file("red_team.jsonl"))}
        helpful = {r["prompt"]: list(r["samples"]) for r in read_jsonl(sl.file("helpful.jsonl"))}
        return red | helpful
    return {}


class PromptBaselines:
    """requests -> the PM's mean score of the start model's own answers to each
    (start_model_answers), nan for a request without any; each request scored once, the first
    time PPO samples it, in a batch of its own answers only (so its score does not depend on
    which other requests were new at the time: a resumed run gets the same bits)."""

    def __init__(self, answers: dict[str, list[str]], reward_fn):
        self.answers = {prompt: list(texts) for prompt, texts in answers.items() if texts}
        self.reward_fn, self.known = reward_fn, {}

    def __call__(self, requests: list[str]) -> list[float]:
        for r in sorted({r for r in requests if r in self.answers and r not in self.known}):
            scores = self.reward_fn([r] * len(self.answers[r]), self.answers[r])
            self.known[r] = sum(scores) / len(scores)
        return [self.known.get(r, math.nan) for r in requests]


def check_settings(cfg: DictConfig) -> None:
    ppo = cfg.ppo
    if ppo.value_model not in ("head", "pm"):
        raise ConfigError(f"ppo.value_model={ppo.value_model!r}: use head or pm.")
    if not 0 < float(ppo.clip) < 1:
        raise ConfigError(f"ppo.clip={ppo.clip}: use a value in (0, 1) (paper: 0.2).")
    if int(ppo.steps) < 1 or int(ppo.batch_size) < 1:
        raise ConfigError("ppo.steps and ppo.batch_size must be >= 1.")


STAGE = Stage(
    "ppo",
    run,
    settings=("model", "data", "ppo", "trainer"),
    upstream=("sft", "pm", "generate_pairs", "generate_sl"),
    version=2,  # 2: the score gain against the start model's own answers (baselines: helpful)
    runtime=("ppo.checkpoint_every", *TRAINER_RUNTIME),
    fingerprints=input_fingerprints,
    check=check_settings,
    distributed=True,
)
