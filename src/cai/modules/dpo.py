"""DPO (Rafailov et al. 2023) of a causal LM on labelled answer pairs, against a frozen reference.

Each comparison becomes two token sequences, conversation + answer A and conversation + answer
B (cai.modules.sft.encode_conversation: labels on the answer tokens and the end token only). The reference's summed
log-probabilities of each answer are computed once, before training, and cached by the stage;
a training step then needs the policy's forward and backward only. The maths are the pure
functions of `cai.rl.dpo_math`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cai.comparisons import Comparison
from cai.memory import padded_width
from cai.modules.logprobs import token_logprobs
from cai.modules.sft import IGNORE, Example, bucketed_batches, collate, encode_conversation
from cai.modules.training import (
    TrainingModule,
    full_precision_state_dict,
    remaining_batches,
    row_slices,
    save_policy,
    shard_batches,
)
from cai.rl.dpo_math import dpo_loss, dpo_margins, reward_metrics

# ---------------------------------------------------------------------------------------------
# 1. Pairs as tokens


@dataclass(frozen=True)
class EncodedPreference:
    a: Example  # conversation + answer A, labels on the answer
    b: Example
    p_a: float  # the label: P(A is better)
    ref_a: float = 0.0  # the reference's summed log-probability of answer A
    ref_b: float = 0.0


def encode_preferences(
    comparisons: list[Comparison], tokenizer, prompt_format: str, max_length: int
) -> tuple[list[EncodedPreference], int]:
    """The pairs whose both sequences fit `max_length` tokens, and how many did not. An answer
    cut off by the length limit (`Comparison.ended`) gets no end token, as in SFT and PPO."""
    pairs = [
        EncodedPreference(
            encode_conversation(tokenizer, c.a, prompt_format, ended=c.ended[0]),
            encode_conversation(tokenizer, c.b, prompt_format, ended=c.ended[1]),
            float(c.p_a),
        )
        for c in comparisons
    ]
    kept = [p for p in pairs if max(len(p.a.input_ids), len(p.b.input_ids)) <= max_length]
    return kept, len(pairs) - len(kept)


def collate_preferences(pairs: list[EncodedPreference], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows [A_1..A_n, B_1..B_n] right-padded (cai.modules.sft.collate), the labels p [n] and the
    reference log-probabilities ref_a, ref_b [n]."""
    batch = collate([p.a for p in pairs] + [p.b for p in pairs], pad_id)
    batch["p_a"] = torch.tensor([p.p_a for p in pairs], dtype=torch.float32)
    batch["ref_a"] = torch.tensor([p.ref_a for p in pairs], dtype=torch.float32)
    batch["ref_b"] = torch.tensor([p.ref_b for p in pairs], dtype=torch.float32)
    return batch


def sequence_logprobs(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's labelled tokens. input_ids, labels [R, T] -> [R].

    Right padding comes after every real token, so under the causal mask no attention mask is
    needed; the LM head runs only where a labelled token is predicted (cai.modules.logprobs)."""
    targets = labels[:, 1:]  # position t predicts token t + 1
    counted = targets != IGNORE
    hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state  # [R, T, H]
    head = model.get_output_embeddings()
    per_token = token_logprobs(hidden[:, :-1][counted], head.weight, targets[counted])  # [N]
    rows = torch.arange(len(input_ids), device=input_ids.device)[:, None].expand_as(targets)
    return torch.zeros(len(input_ids), device=per_token.device).index_add(
        0, rows[counted], per_token
    )


def pair_micro_batches(batch: dict[str, torch.Tensor], budget: int | None) -> list[dict]:
    """The batch's pairs in micro-batches of at most `budget` padded tokens (rows A and B of a
    pair together), each trimmed to its own longest row (cai.memory.padded_width)."""
    n = len(batch["p_a"])
    real = batch["attention_mask"].sum(1)
    lengths = [padded_width(int(max(real[i], real[n + i]))) for i in range(n)]
    parts = []
    for pairs in row_slices([2 * x for x in lengths], budget):
        index = torch.arange(n)[pairs]
        rows = torch.cat([index, index + n])
        width = min(max(lengths[pairs]), batch["input_ids"].shape[1])
        parts.append(
            {
                "input_ids": batch["input_ids"][rows, :width],
                "labels": batch["labels"][rows, :width],
                **{k: batch[k][index] for k in ("p_a", "ref_a", "ref_b")},
            }
        )
    return parts


@torch.no_grad()
def reference_logprobs(
    model, pairs: list[EncodedPreference], pad_id: int, batch_rows: int = 16, progress=True
) -> list[tuple[float, float]]:
    """(log ref(A), log ref(B)) of every pair, in batches of rows of similar length."""
    examples = [e for p in pairs for e in (p.a, p.b)]
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    out = [0.0] * len(examples)
    model.eval()
    for start in tqdm(range(0, len(order), batch_rows), desc="reference", disable=not progress):
        rows = order[start : start + batch_rows]
        batch = collate([examples[i] for i in rows], pad_id)
        values = sequence_logprobs(model, batch["input_ids"], batch["labels"])
        for i, value in zip(rows, values.tolist(), strict=True):
            out[i] = value
    return [(out[2 * i], out[2 * i + 1]) for i in range(len(pairs))]


# ---------------------------------------------------------------------------------------------
# 2. Lightning


class PreferenceDataModule(pl.LightningDataModule):
    def __init__(self, pairs: list[EncodedPreference], batch_size: int, pad_id: int, seed: int):
        super().__init__()
        self.pairs, self.batch_size, self.pad_id, self.seed = pairs, batch_size, pad_id, seed

    def train_dataloader(self) -> DataLoader:
        lengths = [max(len(p.a.input_ids), len(p.b.input_ids)) for p in self.pairs]
        batches = bucketed_batches(lengths, self.batch_size, 16, self.seed)
        batches = shard_batches(batches, self.trainer, "dpo.batch_size")
        batches = remaining_batches(batches, self.trainer)
        return DataLoader(
            self.pairs,
            batch_sampler=batches,
            collate_fn=lambda b: collate_preferences(b, self.pad_id),
        )


class DPOModule(TrainingModule):
    """DPO steps; optimiser, clipping and CPU settings: TrainingModule. The policy is saved to
    `snapshot_dir/seq_<n>` once `n` training pairs (of `snapshots`) have been seen."""

    def __init__(self, model, *args, beta: float, loss: str, **kwargs):
        super().__init__(model, *args, **kwargs)
        self.beta, self.loss_type = beta, loss
        self.pairs_seen, self.history = 0, []
        self.snapshots: list[int] = []
        self.snapshot_dir: Path | None = None
        self.tokenizer = None
        self._started = None

    def training_step(self, batch, batch_idx):
        # 1. micro-batches within dpo.micro_batch_tokens (the activations of one at a time)
        parts = pair_micro_batches(batch, self.micro_batch_tokens)
        n, logps_a, logps_b = len(batch["p_a"]), [], []

        def losses():
            for part in parts:
                # 2. one forward over [A rows; B rows]: the policy's summed answer log-probs
                policy_a, policy_b = sequence_logprobs(
                    self.model, part["input_ids"], part["labels"]
                ).chunk(2)
                logps_a.append(policy_a.detach())
                logps_b.append(policy_b.detach())
                # 3. the DPO loss against the cached reference, the batch's mean as a sum
                margins = dpo_margins(policy_a, policy_b, part["ref_a"], part["ref_b"])
                yield dpo_loss(margins, part["p_a"], self.beta, self.loss_type) * len(margins) / n

        loss = self.accumulate(losses())
        # 4. log TRL's metrics (implicit rewards of the chosen and rejected answers)
        metrics = reward_metrics(
            torch.cat(logps_a), torch.cat(logps_b), batch["ref_a"], batch["ref_b"],
            batch["p_a"], self.beta,
        )  # fmt: skip
        self.pairs_seen += n * self.trainer.world_size
        self._started = self._started or time.perf_counter()
        elapsed = max(time.perf_counter() - self._started, 1e-6)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name == "rewards/accuracies", batch_size=n)
        self.log("train/pairs_per_s", self.pairs_seen / elapsed, batch_size=n)
        self.history.append({"train/loss": float(loss.detach()), "train/pairs": self.pairs_seen}
                            | {k: float(v) for k, v in metrics.items()})  # fmt: skip
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # 5. snapshots after the configured numbers of training pairs
        while self.snapshots and self.pairs_seen >= self.snapshots[0]:
            target = self.snapshots.pop(0)
            if self.snapshot_dir is not None and self.trainer.is_global_zero:
                folder = self.snapshot_dir / f"seq_{target:08d}"
                if not folder.is_dir():
                    state = full_precision_state_dict(self.model, self.optimizers())
                    save_policy(self.model, self.tokenizer, folder, state)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["cai_dpo"] = {
            "pairs_seen": self.pairs_seen,
            "snapshots": self.snapshots,
            "history": self.history,
        }

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint.get("cai_dpo", {})
        self.pairs_seen = int(state.get("pairs_seen", 0))
        self.snapshots = list(state.get("snapshots", self.snapshots))
        self.history = list(state.get("history", []))
