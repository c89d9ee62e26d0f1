"""SL-CAI: fine-tune a causal LM on the critique -> revision data (Bai et al. 2022, section 3).

Each red-team prompt contributes (prompt, revision n) with n = `sft.num_revisions` (0 = the
initial answer, the no-revision baseline); each helpfulness prompt contributes its samples. The
loss covers the response tokens only. Paper settings (section 3.1): 1 epoch, constant learning
rate (0.5x pretraining), here with a short linear warm-up.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from cai.artifacts import Artifact, read_jsonl
from cai.comparisons import answer_turns
from cai.errors import ConfigError
from cai.memory import padded_width
from cai.modules.logprobs import token_logprobs
from cai.modules.training import (
    TrainingModule,
    remaining_batches,
    row_slices,
    shard_batches,
)
from cai.prompting import conversation_prompt

log = logging.getLogger(__name__)
IGNORE = -100  # label of tokens that carry no loss (the prompt, padding)


# ---------------------------------------------------------------------------------------------
# 1. Examples: prompt tokens masked, response tokens counted


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens
    prompt_id: str


def encode_example(
    tokenizer,
    prompt_text: str,
    response: str,
    prompt_format: str,
    prompt_id: str,
    ended: bool = True,
) -> Example:
    """Tokens of prompt + response + end token; labels only on the response and end token.

    A response cut off by the length limit (`ended=False`) gets no end token: teaching the model
    to stop where the sampler was cut off would teach it to end mid-sentence."""
    turns = answer_turns(prompt_text, response)
    return encode_conversation(tokenizer, turns, prompt_format, prompt_id, ended)


def encode_conversation(
    tokenizer, turns: list[dict], prompt_format: str, prompt_id: str = "", ended: bool = True
) -> Example:
    """Tokens of the conversation before the last turn, then the last turn's answer and (when
    it `ended`) the end token; labels on the answer and the end token only."""
    prompt = conversation_prompt(tokenizer, turns[:-1], prompt_format)
    response = turns[-1]["content"]
    if prompt_format == "raw":
        response = " " + response
    prompt_ids = tokenizer(prompt, add_special_tokens=prompt_format != "chat").input_ids
    response_ids = tokenizer(response, add_special_tokens=False).input_ids
    if ended:
        response_ids = response_ids + [tokenizer.eos_token_id]
    return Example(prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids, prompt_id)


def _target_text(record: dict, num_revisions: int) -> tuple[str, bool]:
    """The answer SFT trains on for one red-team record (the initial answer at 0, else revision
    n) and whether it ended (False: cut off by the length limit; older SL data: assumed ended)."""
    if num_revisions == 0:
        return record["initial"], record.get("initial_finish", "stop") != "length"
    revision = record["revisions"][num_revisions - 1]
    return revision["revision"], revision.get("revision_finish", "stop") != "length"


def sl_examples(
    sl_artifact: Artifact,
    num_revisions: int,
    tokenizer,
    prompt_format: str,
    include_helpful: bool,
    max_length: int,
) -> tuple[list[Example], dict]:
    """All training examples of an SL data artifact for target revision `num_revisions`."""
    red = read_jsonl(sl_artifact.file("red_team.jsonl"))
    helpful = read_jsonl(sl_artifact.file("helpful.jsonl")) if include_helpful else []
    generated = int(sl_artifact.manifest["metrics"]["revisions_per_prompt"])
    if not 0 <= num_revisions <= generated:
        raise ConfigError(
            f"sft.num_revisions={num_revisions}, but the SL data holds {generated} revisions per "
            f"prompt: use 0..{generated}, or regenerate with sl.generate_revisions>={num_revisions}."
        )
    pairs = [(r["id"], r["prompt"], *_target_text(r, num_revisions)) for r in red]
    pairs += [
        (h["id"], h["prompt"], s, finish != "length")
        for h in helpful
        for s, finish in zip(
            h["samples"], h.get("sample_finishes", ["stop"] * len(h["samples"])), strict=True
        )
    ]
    pairs = [p for p in pairs if p[2].strip()]
    if not pairs:
        raise ConfigError(
            f"The SL data in {sl_artifact.path} has no non-empty answers to train on."
        )
    examples = [
        encode_example(tokenizer, prompt, answer, prompt_format, pid, ended)
        for pid, prompt, answer, ended in pairs
    ]
    kept = [e for e in examples if len(e.input_ids) <= max_length]
    counts = {
        "red_team": len(red),
        "helpful_samples": len(pairs) - len(red),
        "examples": len(kept),
        "skipped_too_long": len(examples) - len(kept),
    }
    if counts["skipped_too_long"]:
        log.warning(
            "Skipped %d SFT examples longer than sft.max_length=%d.",
            counts["skipped_too_long"],
            max_length,
        )
    if not kept:
        raise ConfigError(
            f"Every SFT example is longer than sft.max_length={max_length}; raise it."
        )
    return kept, counts


def split_examples(
    examples: list[Example], val_fraction: float
) -> tuple[list[Example], list[Example]]:
    """Hold out whole prompts (by a hash of their id) for the validation loss."""

    def held_out(e: Example) -> bool:
        return (
            int(hashlib.sha256(e.prompt_id.encode()).hexdigest()[:8], 16) % 1000
            < val_fraction * 1000
        )

    train = [e for e in examples if not held_out(e)]
    val = [e for e in examples if held_out(e)]
    if not train:
        train, val = val, []
    return train, val


# ---------------------------------------------------------------------------------------------
# 2. Batches: length bucketing, right padding


def bucketed_batches(
    lengths: list[int], batch_size: int, bucket_size: int, seed: int
) -> list[list[int]]:
    """Batches of indices with similar lengths (little padding), in a seeded random order."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * bucket_size
    batches = []
    for start in range(0, len(order), chunk):
        bucket = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches += [bucket[i : i + batch_size] for i in range(0, len(bucket), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded to a width from a small set (cai.memory.padded_width)."""
    width = padded_width(max(len(e.input_ids) for e in examples))
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        input_ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
        attention_mask[row, : len(e.input_ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class SFTDataModule(pl.LightningDataModule):
    def __init__(
        self,
        train: list[Example],
        val: list[Example],
        batch_size: int,
        bucket_size: int,
        pad_id: int,
        seed: int,
    ):
        super().__init__()
        self.train, self.val = train, val
        self.batch_size, self.bucket_size, self.pad_id, self.seed = (
            batch_size,
            bucket_size,
            pad_id,
            seed,
        )

    def _loader(self, examples: list[Example], seed: int, train: bool = False) -> DataLoader:
        batches = bucketed_batches(
            [len(e.input_ids) for e in examples], self.batch_size, self.bucket_size, seed
        )
        batches = shard_batches(batches, self.trainer, "sft.batch_size")
        if train:
            batches = remaining_batches(batches, self.trainer)
        return DataLoader(
            examples, batch_sampler=batches, collate_fn=lambda b: collate(b, self.pad_id)
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, self.seed, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val, self.seed) if self.val else []


# ---------------------------------------------------------------------------------------------
# 3. The module


def response_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Negative log-likelihood of each response token [N], N = response tokens of the batch.

    batch: input_ids and labels [B, T] (labels IGNORE on prompt and padding). The decoder runs
    on every position, the LM head (49k x 576 for SmolLM2, a fifth of the model's FLOPs) only
    where a response token is predicted, a chunk at a time (cai.modules.logprobs: no [N, V]
    logits kept).
    """
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    counted = targets != IGNORE
    # Padding is on the right, so under the causal mask no real token attends to a pad: no
    # attention mask is needed, and attention takes the fused causal path.
    hidden = model.get_decoder()(input_ids=batch["input_ids"]).last_hidden_state  # [B, T, H]
    head = model.get_output_embeddings()
    return -token_logprobs(hidden[:, :-1][counted], head.weight, targets[counted])


def sft_micro_batches(batch: dict[str, torch.Tensor], budget: int | None) -> list[dict]:
    """The batch's rows in micro-batches of at most `budget` padded tokens, each trimmed to its
    own longest row rounded up by cai.memory.padded_width (right padding)."""
    lengths = [padded_width(n) for n in batch["attention_mask"].sum(1).tolist()]
    parts = []
    for rows in row_slices(lengths, budget):
        width = min(max(lengths[rows]), batch["input_ids"].shape[1])
        parts.append({k: v[rows, :width] for k, v in batch.items()})
    return parts


class SFTModule(TrainingModule):
    """Fine-tuning on response tokens; optimiser, clipping and CPU settings: TrainingModule."""

    def __init__(self, model, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        self._tokens, self._started = 0, None

    def training_step(self, batch, batch_idx):
        # 1. micro-batches within sft.micro_batch_tokens (the activations of one at a time)
        parts = sft_micro_batches(batch, self.micro_batch_tokens)
        counted = int((batch["labels"][:, 1:] != IGNORE).sum())
        # 2. forward over prompt + response, loss on response tokens only: the batch's mean,
        # as the sum over micro-batches (the same gradient as one pass over the batch)
        loss = self.accumulate(response_nll(self.model, part).sum() / counted for part in parts)
        # 3. log loss and throughput (all tokens processed, padding excluded)
        self._tokens += int(batch["attention_mask"].sum())
        self._started = self._started or time.perf_counter()
        elapsed = max(time.perf_counter() - self._started, 1e-6)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("train/tokens_per_s", self._tokens / elapsed, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log(
            "val/loss",
            response_nll(self.model, batch).mean(),
            prog_bar=True,
            batch_size=batch["input_ids"].shape[0],
        )


# ---------------------------------------------------------------------------------------------
# 4. The pipeline stage
