"""RL-CAI: PPO of the SL-CAI policy against the preference model (Bai et al. 2022, section 4;
PPO settings of Bai et al. 2022a: KL coefficient 0.001 to the SL-CAI reference, clip 0.2,
gamma 1, no entropy bonus, answers up to 128 tokens).

One Lightning step is one PPO iteration, with manual optimisation:
1. rollout: the policy answers a batch of prompts (red-team and helpfulness, `ppo.prompt_mix`)
   through the generation engine;
2. score: the PM scores each (prompt, answer); answers that never end can get a penalty; the
   score gain over the PM's score of SL-CAI's own answers to the same prompt is logged too;
3. KL-shaped rewards: -kl_coef * (log pi - log pi_ref) per token, the score at the last token;
4. advantages: GAE over the value function's estimates, whitened;
5. optimise: `ppo.epochs` passes over minibatches, clipped policy and value losses.
The maths are the pure functions of `cai.rl.ppo_math`. Snapshots of the policy are saved as
transformers models after configured numbers of training sequences (Figures 2 and 8).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from cai.errors import CAIError
from cai.generation.base import Request, request_seed
from cai.memory import trim_heap_if_grown
from cai.modules.logprobs import token_logprobs
from cai.modules.training import (
    MasterWeightAdamW,
    full_precision_state_dict,
    rank_and_world,
    remaining_batches,
    save_policy,
)
from cai.results import refusal_rate
from cai.rl.ppo_math import (
    AdaptiveKLController,
    gae,
    kl_shaped_rewards,
    policy_loss,
    value_loss,
    whiten,
)

log = logging.getLogger(__name__)


class TrainingDiverged(CAIError):
    """NaN/inf in the losses, or a KL beyond `ppo.max_kl`."""


@dataclass
class Rollout:
    """One batch of sampled answers. Token tensors are [B, T] over answer tokens."""

    prompts: list[str]
    answers: list[str]
    input_ids: torch.Tensor  # [B, L] prompt + answer, right-padded
    answer_start: torch.Tensor  # [B] index of the first answer token
    mask: torch.Tensor  # [B, T] 1 on answer tokens
    ended: list[bool]  # the answer ended with an end token (else it hit the length limit)
    kinds: list[str] = field(default_factory=list)  # red_team / helpful per answer


# ---------------------------------------------------------------------------------------------
# 1. Log-probabilities and values of answer tokens


def answer_positions(answer_start: torch.Tensor, length: int) -> torch.Tensor:
    """[B, T] index of the position that predicts answer token t (the one before it)."""
    return answer_start[:, None] - 1 + torch.arange(length, device=answer_start.device)[None]


def token_logprobs_and_hidden(
    model, rollout: Rollout, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi_T(answer token t) [B, T] and the hidden state that predicts it [B, T, H].

    pi_T is the distribution the rollout sampled from: softmax(logits / T). PPO's ratio and KL
    must be taken under it (as TRL and OpenRLHF do), not under the T = 1 distribution."""
    hidden = model.get_decoder()(input_ids=rollout.input_ids).last_hidden_state  # [B, L, H]
    length = rollout.mask.shape[1]
    positions = answer_positions(rollout.answer_start, length).clamp(max=hidden.shape[1] - 1)
    rows = torch.arange(len(positions), device=hidden.device)[:, None]
    states = hidden[rows, positions]  # [B, T, H]
    targets = rollout.input_ids[rows, (positions + 1).clamp(max=hidden.shape[1] - 1)]
    # the LM head a chunk of positions at a time: no [B, T, V] logits kept (cai.modules.logprobs)
    logprobs = token_logprobs(
        states.flatten(0, 1), model.get_output_embeddings().weight, targets.flatten(), temperature
    ).view(targets.shape)
    return logprobs * rollout.mask, states


class ValueHead(torch.nn.Module):
    """V(state) from the policy's hidden state: one linear layer (`ppo.value_model=head`)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.linear(states.to(self.linear.weight.dtype)).squeeze(-1).float()


class PMValue(torch.nn.Module):
    """V(state) from a separate model initialised from the PM (`ppo.value_model=pm`): the PM's
    backbone and head read at every answer position."""

    def __init__(self, pm_model):
        super().__init__()
        self.model = pm_model

    def forward(self, rollout: Rollout) -> torch.Tensor:
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(input_ids=rollout.input_ids).last_hidden_state
        positions = answer_positions(rollout.answer_start, rollout.mask.shape[1]).clamp(
            max=hidden.shape[1] - 1
        )
        rows = torch.arange(len(positions), device=hidden.device)[:, None]
        return self.model.score(hidden[rows, positions]).squeeze(-1).float()


# ---------------------------------------------------------------------------------------------
# 2. The Lightning module


class PPOModule(pl.LightningModule):
    def __init__(
        self, policy, reference, value, engine, reward_fn, tokenizer, prompts, cfg, baseline_fn=None
    ):
        super().__init__()
        # baseline_fn(requests) -> the PM's score of SL-CAI's own answers to each request (nan
        # where it has none): the score gain, read per prompt, leaves out the spread between prompts
        self.baseline_fn = baseline_fn
        self.automatic_optimization = False
        self.policy, self.reference, self.value = policy, reference, value
        self.engine, self.reward_fn, self.tokenizer = engine, reward_fn, tokenizer
        self.prompts = prompts  # list of (kind, text, prompt text for the policy)
        self.ppo = cfg
        self.seed = 0  # the stage's seed (set by run_stage): rollout sampling seeds derive from it
        self.temperature = float(cfg.temperature)
        self.kl = (
            AdaptiveKLController(float(cfg.kl_coef), float(cfg.kl_target), int(cfg.kl_horizon))
            if cfg.adaptive_kl
            else None
        )
        self.kl_coef = float(cfg.kl_coef)
        self.sequences = 0  # training sequences seen (the x axis of Figure 8)
        self.history: list[dict] = []  # metrics per iteration (kept in checkpoints)
        self.start_step = 0  # > 0 when resumed from a checkpoint
        self.snapshots: list[int] = sorted(int(s) for s in cfg.snapshot_sequences)
        self.snapshot_dir: Path | None = None
        self.final_state: dict | None = None  # fp32 weights at the end (on_train_end)
        self.reference.requires_grad_(False)

    # -- 1. rollout ------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, indices: list[int]) -> Rollout:
        chosen = [self.prompts[i] for i in indices]
        rank, _ = rank_and_world(self._trainer)
        self.engine.update_weights(self.policy)  # the engine samples from the current policy
        self.policy.eval()  # (activation checkpointing, if on, only in training mode)
        generations = self.engine.generate(
            [
                Request(
                    text,
                    max_new_tokens=int(self.ppo.max_new_tokens),
                    temperature=float(self.ppo.temperature),
                    # per (iteration, slot): the same prompt twice in a batch gets two samples
                    seed=request_seed(self.seed, "ppo", self.global_step, rank, slot),
                )
                for slot, (_, _, text) in enumerate(chosen)
            ],
            desc="ppo rollout",
        )
        self.policy.train()
        rows, starts, ended = [], [], []
        for (_, _, prompt_text), g in zip(chosen, generations, strict=True):
            prompt_ids = self.tokenizer(prompt_text, add_special_tokens=False).input_ids
            # the sampled tokens themselves (re-tokenising the text could differ from them)
            answer_ids = (
                list(g.token_ids) or self.tokenizer(g.text, add_special_tokens=False).input_ids
            )
            stop = g.finish_reason == "stop"
            if stop:  # the end token actually sampled (<|im_end|> or <|endoftext|>, ...)
                end = g.stop_token_id
                answer_ids = answer_ids + [self.tokenizer.eos_token_id if end is None else end]
            answer_ids = answer_ids[: int(self.ppo.max_new_tokens) + 1] or [
                self.tokenizer.eos_token_id
            ]
            rows.append(prompt_ids + answer_ids)
            starts.append(len(prompt_ids))
            ended.append(stop)
        width = max(len(r) for r in rows)
        length = max(len(r) - s for r, s in zip(rows, starts, strict=True))
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), length)
        for i, (r, s) in enumerate(zip(rows, starts, strict=True)):
            input_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r) - s] = 1.0
        return Rollout(
            [c[1] for c in chosen],
            [g.text for g in generations],
            input_ids.to(self.device),
            torch.tensor(starts, device=self.device),
            mask.to(self.device),
            ended,
            [c[0] for c in chosen],
        )

    def values_of(self, rollout: Rollout, states: torch.Tensor) -> torch.Tensor:
        return self.value(states) if isinstance(self.value, ValueHead) else self.value(rollout)

    # -- one PPO iteration -----------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        ppo = self.ppo
        started = time.perf_counter()
        # 1. rollout
        rollout = self.rollout(batch.tolist())
        rollout_s = time.perf_counter() - started
        # 2. score with the PM; optional penalty for answers that never end
        scores = torch.tensor(self.reward_fn(rollout.prompts, rollout.answers), device=self.device)
        if ppo.no_eos_penalty is not None:
            ended = torch.tensor(rollout.ended, device=self.device)
            scores = torch.where(ended, scores, torch.full_like(scores, float(ppo.no_eos_penalty)))
        # the score gain for the metrics: the PM's score of SL-CAI's answers to the same prompts
        # (scored the first time a prompt is drawn, so its time counts as scoring)
        gains = score_gains(scores, self.baseline_fn(rollout.prompts) if self.baseline_fn else [])
        score_s = time.perf_counter() - started - rollout_s
        # 3. old log-probabilities, values, reference log-probabilities; KL-shaped rewards
        with torch.no_grad():
            old_logprobs, states = token_logprobs_and_hidden(self.policy, rollout, self.temperature)
            old_values = self.values_of(rollout, states) * rollout.mask
            ref_logprobs, _ = token_logprobs_and_hidden(self.reference, rollout, self.temperature)
            rewards, kl = kl_shaped_rewards(
                scores, old_logprobs, ref_logprobs, rollout.mask, self.kl_coef
            )
            # 4. advantages (GAE), whitened
            advantages, returns = gae(
                rewards, old_values, rollout.mask, float(ppo.gamma), float(ppo.lam)
            )
            advantages = whiten(advantages, rollout.mask)
        # 5. K epochs over minibatches
        optimizer = self.optimizers()
        stats = {"policy": [], "value": [], "clipfrac": [], "approxkl": [], "vf_clipfrac": []}
        size = len(rollout.prompts)
        minibatch = minibatch_size(int(ppo.minibatch_size), size)
        for _epoch in range(int(ppo.epochs)):
            order = torch.randperm(size, generator=torch.Generator().manual_seed(self.global_step))
            for start in range(0, size, minibatch):
                idx = order[start : start + minibatch].to(self.device)
                part = _select(rollout, idx)
                logprobs, part_states = token_logprobs_and_hidden(
                    self.policy, part, self.temperature
                )
                values = self.values_of(part, part_states)
                pg_loss, clipfrac, approxkl = policy_loss(
                    logprobs, old_logprobs[idx], advantages[idx], part.mask, float(ppo.clip)
                )
                vf_loss, vf_clipfrac = value_loss(
                    values, old_values[idx], returns[idx], part.mask, float(ppo.value_clip)
                )
                loss = pg_loss + float(ppo.vf_coef) * vf_loss
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"PPO loss became {float(loss)} at step {self.global_step}: lower "
                        "ppo.lr, or check the PM scores."
                    )
                optimizer.zero_grad(set_to_none=True)
                self.manual_backward(loss)
                if ppo.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self._trainable(), float(ppo.max_grad_norm))
                optimizer.step()
                for key, value in (
                    ("policy", pg_loss),
                    ("value", vf_loss),
                    ("clipfrac", clipfrac),
                    ("approxkl", approxkl),
                    ("vf_clipfrac", vf_clipfrac),
                ):
                    stats[key].append(float(value.detach()))
        # 6. metrics (TRL's names), KL control, stability check, snapshots
        mean_kl = float((kl.sum(1)).mean())
        if not math.isfinite(mean_kl) or mean_kl > float(ppo.max_kl):
            raise TrainingDiverged(
                f"KL(policy || SL-CAI) = {mean_kl:.2f} nats at step {self.global_step}, beyond "
                f"ppo.max_kl={ppo.max_kl}: lower ppo.lr or raise ppo.kl_coef."
            )
        if self.kl is not None:
            self.kl_coef = self.kl.update(mean_kl, size)
        self.sequences += size * int(self.trainer.world_size)
        refusals = refusal_rate(rollout.answers)
        metrics = {
            "objective/kl": mean_kl,
            "objective/scores": float(scores.mean()),
            "objective/rlhf_reward": float(scores.mean()) - self.kl_coef * mean_kl,
            "objective/kl_coef": self.kl_coef,
            "policy/approxkl_avg": _mean(stats["approxkl"]),
            "policy/clipfrac_avg": _mean(stats["clipfrac"]),
            "loss/policy_avg": _mean(stats["policy"]),
            "loss/value_avg": _mean(stats["value"]),
            "val/clipfrac_avg": _mean(stats["vf_clipfrac"]),
            "val/num_eos_tokens": float(sum(rollout.ended)),
            "answers/mean_tokens": float(rollout.mask.sum(1).mean()),
            "answers/refusal_rate": refusals,
            **per_kind_metrics(rollout, scores),
            **per_kind_gains(rollout.kinds, gains),
            "train/sequences": float(self.sequences),
            "time/rollout_s": rollout_s,
            "time/score_s": score_s,
            "time/update_s": time.perf_counter() - started - rollout_s - score_s,
        }
        self.log_dict(metrics, prog_bar=False, batch_size=size)
        self.history.append(metrics)
        self._maybe_snapshot()
        trim_heap_if_grown()  # each iteration starts from about the same footprint

    def on_train_start(self):
        self.start_step = self.global_step

    def on_train_end(self):
        self.final_state = self.policy_state_dict()  # the optimiser goes with the trainer

    def _trainable(self):
        return [p for p in self.parameters() if p.requires_grad]

    def _maybe_snapshot(self):
        while self.snapshots and self.sequences >= self.snapshots[0]:
            target = self.snapshots.pop(0)
            if self.snapshot_dir is not None and self.trainer.is_global_zero:
                folder = self.snapshot_dir / f"seq_{target:08d}"
                if not folder.is_dir():
                    save_policy(self.policy, self.tokenizer, folder, self.policy_state_dict())

    def configure_optimizers(self):
        settings = {"lr": float(self.ppo.lr), "betas": tuple(self.ppo.betas), "weight_decay": 0.0}
        if any(p.dtype != torch.float32 for p in self._trainable()):  # a bf16 policy
            return MasterWeightAdamW(self._trainable(), **settings)
        return torch.optim.AdamW(self._trainable(), **settings)

    def policy_state_dict(self) -> dict:
        """The policy's weights, in fp32 where the optimiser keeps master copies."""
        optimizer = self.optimizers() if self._trainer is not None else None
        return full_precision_state_dict(self.policy, optimizer)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["cai_ppo"] = {
            "sequences": self.sequences,
            "kl_coef": self.kl_coef,
            "snapshots": self.snapshots,
            "history": self.history,
        }

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint.get("cai_ppo", {})
        self.sequences = state.get("sequences", 0)
        self.kl_coef = state.get("kl_coef", self.kl_coef)
        self.snapshots = state.get("snapshots", self.snapshots)
        self.history = state.get("history", [])
        if self.kl is not None:
            self.kl.value = self.kl_coef


def minibatch_size(requested: int, rollouts: int) -> int:
    """Rollouts per optimiser step: `ppo.minibatch_size`, at most the iteration's rollouts."""
    return max(1, min(requested, rollouts))


def _select(rollout: Rollout, idx: torch.Tensor) -> Rollout:
    keep = idx.tolist()
    return Rollout(
        [rollout.prompts[i] for i in keep],
        [rollout.answers[i] for i in keep],
        rollout.input_ids[idx],
        rollout.answer_start[idx],
        rollout.mask[idx],
        [rollout.ended[i] for i in keep],
        [rollout.kinds[i] for i in keep] if rollout.kinds else [],
    )


def per_kind_metrics(rollout: Rollout, scores: torch.Tensor) -> dict[str, float]:
    """PM score, answer tokens and refusal rate of the red-team and of the helpfulness answers
    of one rollout batch (`scores` [B]): whether PPO trades one kind of prompt for the other."""
    metrics = {}
    lengths = rollout.mask.sum(1)
    for kind in sorted(set(rollout.kinds)):
        mine = [i for i, k in enumerate(rollout.kinds) if k == kind]
        metrics[f"objective/scores_{kind}"] = float(scores[mine].mean())
        metrics[f"answers/mean_tokens_{kind}"] = float(lengths[mine].mean())
        metrics[f"answers/refusal_rate_{kind}"] = refusal_rate([rollout.answers[i] for i in mine])
    return metrics


def score_gains(scores: torch.Tensor, baselines: list[float]) -> list[float]:
    """Each rollout's PM score less its prompt's baseline (scores [B], baselines [B], nan where a
    prompt has none: then nan); [] without baselines."""
    if not baselines:
        return []
    return [float(s) - b for s, b in zip(scores.tolist(), baselines, strict=True)]


def per_kind_gains(kinds: list[str], gains: list[float]) -> dict[str, float]:
    """`objective/score_gain`: the mean gain of the rollouts whose prompt has a baseline, over
    all and per prompt kind (absent when none has)."""
    if not gains:
        return {}
    kinds = kinds or [""] * len(gains)
    known = [(g, k) for g, k in zip(gains, kinds, strict=True) if not math.isnan(g)]
    metrics = {"objective/score_gain": _mean([g for g, _ in known])} if known else {}
    for kind in sorted({k for _, k in known if k}):
        metrics[f"objective/score_gain_{kind}"] = _mean([g for g, k in known if k == kind])
    return metrics


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


class PromptBatches(pl.LightningDataModule):
    """`ppo.steps` batches of prompt indices, seeded, sharded by rank."""

    def __init__(self, num_prompts: int, steps: int, batch_size: int, seed: int):
        super().__init__()
        self.num_prompts, self.steps, self.batch_size, self.seed = (
            num_prompts,
            steps,
            batch_size,
            seed,
        )

    def train_dataloader(self) -> DataLoader:
        rank, _ = rank_and_world(self.trainer)
        rng = random.Random(f"{self.seed}/ppo/{rank}")
        batches = [
            torch.tensor([rng.randrange(self.num_prompts) for _ in range(self.batch_size)])
            for _ in range(self.steps)
        ]
        module = self.trainer.lightning_module if self.trainer else None
        done = len(module.history) if module is not None else 0  # iterations restored
        return DataLoader(remaining_batches(batches, self.trainer, done), batch_size=None)
