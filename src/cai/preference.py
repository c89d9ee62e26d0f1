"""A trained preference model as a scorer (Bai et al. 2022, section 4.1: the PM reads
"conversation + answer" and gives one scalar): `PreferenceModel.load(folder).score(dialogues)`,
and its measures on held-out comparisons (accuracy, margin, calibration).

Training lives in cai.modules.pm; this module needs only transformers and a saved folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from cai.artifacts import Artifact
from cai.comparisons import transcript_turns
from cai.constitution import Turn
from cai.data import hh_rlhf_comparisons
from cai.generation.shared_prefix import ATTENTION_NAME, PackedRows, release_mask
from cai.memory import padded_width
from cai.models import bf16_supported, resolve_dtype
from cai.paper_evals import hhh_pairs
from cai.prompting import raw_conversation
from cai.results import calibration, row, wilson_interval

log = logging.getLogger(__name__)


def pair_metrics(r_a: list[float], r_b: list[float], p_a: list[float], bins: int = 10) -> dict:
    """Accuracy (the PM prefers the answer the label prefers), mean margin (r of the preferred
    answer minus r of the other) and expected calibration error of sigmoid(r_a - r_b)."""
    preferred_first = [p > 0.5 for p in p_a]
    margins = [
        (a - b) if first else (b - a) for a, b, first in zip(r_a, r_b, preferred_first, strict=True)
    ]
    p_model = [1 / (1 + math.exp(-(a - b))) for a, b in zip(r_a, r_b, strict=True)]
    chose_first = [p >= 0.5 for p in p_model]
    correct = [c == f for c, f in zip(chose_first, preferred_first, strict=True)]
    ece, _ = calibration([max(p, 1 - p) for p in p_model], correct, bins)
    n = len(correct)
    return {
        "accuracy": sum(correct) / n,
        "margin": sum(margins) / n,
        "ece": ece,
        "n": n,
    }


def dialogue_text(tokenizer, turns: list[dict], prompt_format: str) -> str:
    """The conversation the PM reads: the chat template (ends with the end-of-turn token) or the
    raw transcript plus the end token."""
    if prompt_format == "chat":
        return tokenizer.apply_chat_template(turns, tokenize=False)
    return raw_conversation([Turn(t["role"], t["content"]) for t in turns]) + tokenizer.eos_token


class PreferenceModel:
    """A trained PM: `score(dialogues)` -> one reward per dialogue (a list of turns, or a
    "Human: .. Assistant: .." transcript)."""

    def __init__(
        self,
        model,
        tokenizer,
        prompt_format: str,
        batch_size: int = 16,
        max_batch_tokens: int = 8192,
        max_row_tokens: int = 1024,
        max_row_dialogues: int = 2,
    ):
        self.model, self.tokenizer, self.format = model, tokenizer, prompt_format
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        # a packed row's attention is dense (masked, not skipped): two answers of ~150 tokens
        # to one context pay, eight to one prompt cost more than they save (HHH and hh-rlhf
        # scoring 61 -> 47 s, PALMS validation 44 -> 36 s; benchmarks/README.md)
        self.max_row_tokens, self.max_row_dialogues = max_row_tokens, max_row_dialogues

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def load(cls, folder: str | Path, dtype: str = "auto", device: str = "cpu"):
        """dtype: auto = bf16 where the hardware has it (the dtype the training stages train
        in), else fp32."""
        folder = Path(folder)
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=resolve_dtype(dtype), use_safetensors=True
        ).to(device)
        model.eval()
        settings = json.loads((folder / "pm_settings.json").read_text())
        return cls(model, AutoTokenizer.from_pretrained(folder), settings["prompt_format"])

    def _autocast(self):
        """bf16 autocast for fp32 weights where the hardware has bf16 (2x faster on this CPU)."""
        if self.model.dtype == torch.float32 and bf16_supported():
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def encode(self, dialogue) -> list[int]:
        turns = transcript_turns(dialogue) if isinstance(dialogue, str) else dialogue
        text = dialogue_text(self.tokenizer, turns, self.format)
        return self.tokenizer(text, add_special_tokens=self.format != "chat").input_ids

    def fits(self, dialogues, max_length: int) -> bool:
        """Whether every dialogue (e.g. both sides of a comparison) is within max_length tokens."""
        return all(len(self.encode(d)) <= max_length for d in dialogues)

    @torch.no_grad()
    def score(self, dialogues: list, progress: bool = False) -> list[float]:
        """One reward per dialogue. Each distinct token sequence is scored once, and dialogues
        that differ only in their last turn (a comparison's two answers, a prompt's answers) are
        packed into one row in which their shared context is encoded once and each answer
        attends to the context and to itself (cai.generation.shared_prefix.PackedRows: the
        same attention as separate rows, a third fewer tokens on HHH and hh-rlhf). Rows are
        sorted by width and batched up to `batch_size` rows and `max_batch_tokens` padded
        tokens."""
        turns = [transcript_turns(d) if isinstance(d, str) else d for d in dialogues]
        encoded = [self.encode(t) for t in turns]
        first: dict[tuple, int] = {}
        same = [first.setdefault(tuple(ids), i) for i, ids in enumerate(encoded)]
        groups: dict[str, list[int]] = {}
        for i in sorted(set(same)):
            groups.setdefault(repr(turns[i][:-1]), []).append(i)
        rows = [
            row
            for members in groups.values()
            for row in shared_context_rows(
                [encoded[i] for i in members],
                members,
                self.max_row_tokens,
                self.max_row_dialogues,
            )
        ]
        rows.sort(key=row_width)
        batches, batch = [], []
        for packed_row in rows:  # ascending widths: the newest member is the widest
            if batch and (
                len(batch) == self.batch_size
                or (len(batch) + 1) * padded_width(row_width(packed_row)) > self.max_batch_tokens
            ):
                batches.append(batch)
                batch = []
            batch.append(packed_row)
        if batch:
            batches.append(batch)
        out = [0.0] * len(encoded)
        backbone = getattr(self.model, self.model.base_model_prefix)
        previous_attention = self.model.config._attn_implementation
        self.model.set_attn_implementation(ATTENTION_NAME)
        try:
            for batch in tqdm(batches, disable=not progress, desc="pm scores"):
                packed = PackedRows.build(
                    [(context, continuations) for context, continuations, _ in batch],
                    self.tokenizer.pad_token_id,
                    width=padded_width(max(row_width(r) for r in batch)),
                )
                with self._autocast():
                    hidden = backbone(
                        input_ids=packed.input_ids.to(self.device),
                        position_ids=packed.positions.to(self.device),
                        use_cache=False,
                        cai_prefix=None,
                        cai_key_mask=packed.key_mask.to(self.device),
                        cai_visible=packed.visible.to(self.device),
                    ).last_hidden_state  # [B, W, H]
                    where = [
                        (r, end - 1) for r, spans in enumerate(packed.spans) for _, end in spans
                    ]
                    final = hidden[[r for r, _ in where], [c for _, c in where]]  # [N, H]
                    values = self.model.score(final).squeeze(-1).float().cpu()
                owners = [i for _, _, ids in batch for i in ids]
                for i, value in zip(owners, values.tolist(), strict=True):
                    out[i] = value
        finally:
            self.model.set_attn_implementation(previous_attention)
            release_mask()
        return [out[i] for i in same]


def row_width(row: tuple[list[int], list[list[int]], list[int]]) -> int:
    """Tokens of a packed row: its context and every continuation."""
    return len(row[0]) + sum(len(c) for c in row[1])


def shared_context_rows(
    sequences: list[list[int]], ids: list[int], max_tokens: int, max_continuations: int = 2
) -> list[tuple[list[int], list[list[int]], list[int]]]:
    """Token sequences that share a context (dialogues differing only in their last turn) as
    packed rows (context, continuations, ids): the context is their longest common prefix,
    leaving at least one token of each as its continuation; continuations join a row while it
    stays within `max_tokens` and `max_continuations` (a row holds at least one)."""
    shortest = min(len(s) for s in sequences)
    common = 0
    while common < shortest - 1 and all(s[common] == sequences[0][common] for s in sequences):
        common += 1
    context = sequences[0][:common]
    rows: list[tuple[list[int], list[list[int]], list[int]]] = []
    for sequence, i in zip(sequences, ids, strict=True):
        rest = sequence[common:]
        if (
            rows
            and len(rows[-1][1]) < max_continuations
            and row_width(rows[-1]) + len(rest) <= max_tokens
        ):
            rows[-1][1].append(rest)
            rows[-1][2].append(i)
        else:
            rows.append((context, [rest], [i]))
    return rows


def human_eval_sets(
    data_dir: str | None, split: str, max_human: int | None, max_hhh: int | None, fits=None
):
    """Pairs (preferred, other) to measure a PM on: hh-rlhf harmless-base `split` (the first
    `max_human` for which `fits(pair)` holds, e.g. within the PM's max_length) and HHH 438."""
    sets = {}
    if data_dir:
        human = hh_rlhf_comparisons(data_dir, "harmless-base", split)
        sets["hh_rlhf_harmless"] = [p for p in human if fits is None or fits(p)][:max_human]
        sets["hhh"] = hhh_pairs(data_dir)[:max_hhh]
    else:
        log.warning("paths.data_dir is not set: the PM is not evaluated on human comparisons.")
    return sets


def score_pair_sets(scorer: PreferenceModel, sets: dict, common: dict) -> tuple[list, dict]:
    """Accuracy (Wilson 95% interval), margin and ECE of `scorer` on each set of (preferred,
    other) pairs, as result rows with the fields of `common`; and a summary."""
    rows, summary = [], {}
    for eval_name, pairs in sets.items():
        if not pairs:
            continue
        scores = scorer.score([t for pair in pairs for t in pair], progress=True)
        metrics = pair_metrics(scores[0::2], scores[1::2], [1.0] * len(pairs))
        low, high = wilson_interval(metrics["accuracy"] * metrics["n"], metrics["n"])
        fields = {**common, "eval": eval_name, "n": metrics["n"]}
        rows.append(row(**fields, metric="accuracy", value=metrics["accuracy"], low=low, high=high))
        rows.append(row(**fields, metric="margin", value=metrics["margin"]))
        rows.append(row(**fields, metric="ece", value=metrics["ece"]))
        summary[eval_name] = {k: round(v, 4) for k, v in metrics.items()}
    return rows, summary


def load_pm(artifact: Artifact, device: str = "cpu") -> PreferenceModel:
    """The PM of a pm artifact, ready to score."""
    return PreferenceModel.load(artifact.path / "model", device=device)
