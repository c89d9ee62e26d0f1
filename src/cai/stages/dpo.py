"""dpo: RL-CAI by direct preference optimisation (Rafailov et al. 2023) instead of a PM and PPO.
SL-CAI is fine-tuned on the generate_pairs answers with the feedback stage's soft AI labels
(helpfulness pairs mixed in at `dpo.helpfulness_ratio`, as in the PM), against the frozen SL-CAI
as reference (cai.modules.dpo.DPOModule; the losses in cai.rl.dpo_math). The same labels and the
same start as PPO, so eval can put the two side by side (variants rl_cai_dpo and hh_dpo).

Files: model/ (the final policy), snapshots/seq_<n>/ (after `dpo.snapshot_sequences` training
pairs), snapshots.json, metrics.jsonl (one line per optimiser step, TRL's metric names),
reference_logprobs.json (the reference's log-probabilities, computed once). Resumable from
Lightning checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cai.artifacts import Artifact, read_jsonl, write_json_atomic
from cai.comparisons import clean, preference_comparisons
from cai.config import model_cfg_for
from cai.data import hh_split_rule
from cai.errors import ConfigError
from cai.models import load_model
from cai.modules.dpo import DPOModule, PreferenceDataModule, encode_preferences, reference_logprobs
from cai.modules.training import fit, is_follower, save_trained_policy, training_dtype
from cai.rl.dpo_math import LOSSES, hard_labels
from cai.stages.base import TRAINER_RUNTIME, Stage


def run(cfg: DictConfig, inputs: dict[str, Artifact], work_dir: Path) -> dict:
    check_settings(cfg)
    dpo = cfg.dpo
    # 1. The pairs: AI harmlessness labels (or human, or none) and helpfulness, as the PM's
    labels = read_jsonl(inputs["feedback"].file("labels.jsonl"))
    comparisons, counts = preference_comparisons(
        labels, dpo.harmlessness, dpo.helpfulness, dpo.helpfulness_ratio, dpo.max_human,
        cfg.paths.data_dir, cfg.seed, setting="dpo",
    )  # fmt: skip
    comparisons, skipped = clean(comparisons, what="DPO")
    ties = 0
    if dpo.labels == "hard":  # p rounded to 0 or 1; a tie says nothing and is dropped
        rounded, kept = hard_labels([c.p_a for c in comparisons])
        ties = len(comparisons) - len(kept)
        comparisons = [
            dataclasses.replace(comparisons[i], p_a=p) for i, p in zip(kept, rounded, strict=True)
        ]
    if not comparisons:
        raise ConfigError(
            f"No DPO pairs (dpo.harmlessness={dpo.harmlessness}, dpo.helpfulness="
            f"{dpo.helpfulness}, dpo.labels={dpo.labels}): check the feedback labels and the data."
        )

    # 2. The policy from dpo.init (SL-CAI by default): bf16 weights with fp32 master weights
    # where the trainer trains in bf16
    init_cfg = model_cfg_for(cfg, str(dpo.init), "dpo.init", inputs)
    policy, tokenizer = load_model(init_cfg, cfg.paths.cache_dir, dtype=training_dtype(cfg.trainer))
    pairs, too_long = encode_preferences(
        comparisons, tokenizer, init_cfg.prompt_format, dpo.max_length
    )
    if not pairs:
        raise ConfigError(f"Every DPO pair is longer than dpo.max_length={dpo.max_length}.")

    # 3. The reference: the same weights before training, its log-probabilities computed once
    # and kept in the work folder (a resumed run reads them back)
    cache = work_dir / "reference_logprobs.json"
    reference = json.loads(cache.read_text()) if cache.is_file() else []
    if len(reference) != len(pairs):
        reference = reference_logprobs(policy, pairs, tokenizer.pad_token_id)
        write_json_atomic(cache, reference)
    pairs = [
        dataclasses.replace(p, ref_a=a, ref_b=b) for p, (a, b) in zip(pairs, reference, strict=True)
    ]

    # 4. Train (cai.modules.dpo.DPOModule), snapshots by training pairs seen
    policy.train()
    module = DPOModule.from_config(policy, dpo, cfg.trainer, beta=dpo.beta, loss=dpo.loss)
    module.snapshots = sorted(int(s) for s in dpo.snapshot_sequences)
    module.snapshot_dir, module.tokenizer = work_dir / "snapshots", tokenizer
    module.snapshot_dir.mkdir(parents=True, exist_ok=True)
    data = PreferenceDataModule(pairs, dpo.batch_size, tokenizer.pad_token_id, cfg.seed)
    run_cfg = OmegaConf.merge(cfg, {"trainer": {"max_epochs": dpo.epochs}})
    trained = fit(run_cfg, module, data, work_dir, dpo.max_steps, dpo.checkpoint_every)
    if is_follower():  # several processes: global rank 0 saves
        return trained

    # 5. Save the final policy (fp32 master weights), the metrics and the list of snapshots
    snapshots = save_trained_policy(policy, tokenizer, work_dir, module.final_state, module.history)
    history = module.history
    return {
        **counts,
        **skipped,
        "ties_dropped": ties,
        "skipped_too_long": too_long,
        "train_pairs": len(pairs),
        **trained,
        "sequences": module.pairs_seen,  # training pairs seen (the x axis of the snapshots)
        "first": history[0] if history else {},
        "last": history[-1] if history else {},
        "snapshots": snapshots,
        "init": str(dpo.init),
    }


def check_settings(cfg: DictConfig) -> None:
    dpo = cfg.dpo
    if dpo.loss not in LOSSES:
        raise ConfigError(f"dpo.loss={dpo.loss!r}: use {' or '.join(LOSSES)}.")
    if dpo.labels not in ("soft", "hard"):
        raise ConfigError(f"dpo.labels={dpo.labels!r}: use soft or hard.")
    if dpo.harmlessness not in ("ai", "human", "none"):
        raise ConfigError(f"dpo.harmlessness={dpo.harmlessness!r}: use ai, human or none.")
    if dpo.helpfulness not in ("ai", "hh_rlhf", "none"):
        raise ConfigError(f"dpo.helpfulness={dpo.helpfulness!r}: use ai, hh_rlhf or none.")


STAGE = Stage(
    "dpo",
    run,
    settings=("model", "dpo", "trainer"),
    upstream=("feedback", "sft"),
    version=2,  # 2: an answer cut off by the length limit gets no end token
    runtime=("dpo.checkpoint_every", *TRAINER_RUNTIME),
    fingerprints=lambda cfg: {"hh_rlhf_splits": hh_split_rule()},
    check=check_settings,
    distributed=True,
)
