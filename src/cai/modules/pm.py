"""The preference model (Bai et al. 2022, section 4.1): a causal-LM backbone with a scalar head
read at the last token of "conversation + answer", trained on soft AI harmlessness labels mixed
with helpfulness comparisons.

Loss: binary cross-entropy between sigmoid(r_A - r_B) and the soft target p(A) (hard labels are
p in {0, 1}), so a 0.55 label asks for a small margin and a 0.99 label for a large one.

Baselines from the same module (paper Figures 2 and 3): `pm.harmlessness=ai` (RL-CAI, default),
`human` (HH-RLHF: human harmlessness comparisons of hh-rlhf harmless-base, split `pm_train`),
`none` (Helpful-RLHF). Metrics on the held-out human comparisons (split `pm_eval`, disjoint from
every other split) and on the 438 HHH comparisons go to result rows (Figure 4's PM series).

The saved model is a transformers `AutoModelForSequenceClassification` (num_labels = 1);
`PreferenceModel.load(folder).score(dialogues)` scores in batches without the training code.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cai.artifacts import Artifact, read_jsonl, write_json_atomic
from cai.constitution import parse_turns
from cai.errors import ConfigError
from cai.generation.shared_prefix import ATTENTION_NAME, PackedRows, release_mask
from cai.memory import padded_width
from cai.modules.sft import bucketed_batches
from cai.modules.training import (
    TrainingModule,
    fit,
    is_follower,
    remaining_batches,
    row_slices,
    shard_batches,
    training_dtype,
)
from cai.paper_evals import hhh_pairs
from cai.prompting import raw_conversation
from cai.results import calibration, row, wilson_interval

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# 1. Pure maths


def soft_preference_loss(r_a: torch.Tensor, r_b: torch.Tensor, p_a: torch.Tensor) -> torch.Tensor:
    """Mean BCE between sigmoid(r_a - r_b) and p_a: -[p log s(d) + (1 - p) log s(-d)].

    r_a, r_b: [N] scalar rewards; p_a: [N] targets in [0, 1]. Returns a scalar.
    """
    return torch.nn.functional.binary_cross_entropy_with_logits(r_a - r_b, p_a)


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


# ---------------------------------------------------------------------------------------------
# 2. Texts and tokens


def dialogue_text(tokenizer, turns: list[dict], prompt_format: str) -> str:
    """The conversation the PM reads: the chat template (ends with the end-of-turn token) or the
    raw transcript plus the end token."""
    if prompt_format == "chat":
        return tokenizer.apply_chat_template(turns, tokenize=False)
    from cai.constitution import Turn

    return raw_conversation([Turn(t["role"], t["content"]) for t in turns]) + tokenizer.eos_token


def answer_turns(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def transcript_turns(transcript: str) -> list[dict]:
    """'\\n\\nHuman: ..\\n\\nAssistant: ..' (hh-rlhf, the HHH evals) -> turns."""
    return parse_turns(transcript)


@dataclass(frozen=True)
class Comparison:
    a: list[dict]  # turns ending with answer A
    b: list[dict]
    p_a: float  # probability that A is better (soft label)
    source: str  # ai_harmless, ai_helpful, human_harmless, human_helpful


@dataclass(frozen=True)
class EncodedPair:
    a: list[int]
    b: list[int]
    p_a: float


def collate_pairs(pairs: list[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows [A_1..A_n, B_1..B_n], right-padded to a width from a small set
    (cai.memory.padded_width); `last` indexes each row's final real token."""
    rows = [p.a for p in pairs] + [p.b for p in pairs]
    width = padded_width(max(len(r) for r in rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
    return {
        "input_ids": input_ids,
        "last": torch.tensor([len(r) - 1 for r in rows]),
        "p_a": torch.tensor([p.p_a for p in pairs], dtype=torch.float32),
    }


def rewards(model, input_ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Scalar reward of each row read at its last real token. input_ids [R, T], last [R] -> [R].

    Right padding comes after every real token, so under the causal mask no attention mask is
    needed."""
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids).last_hidden_state  # [R, T, H]
    final = hidden[torch.arange(len(last), device=hidden.device), last]  # [R, H]
    return model.score(final).squeeze(-1).float()


# ---------------------------------------------------------------------------------------------
# 3. Lightning


class PairDataModule(pl.LightningDataModule):
    def __init__(self, pairs: list[EncodedPair], batch_size: int, pad_id: int, seed: int):
        super().__init__()
        self.pairs, self.batch_size, self.pad_id, self.seed = pairs, batch_size, pad_id, seed

    def train_dataloader(self) -> DataLoader:
        lengths = [max(len(p.a), len(p.b)) for p in self.pairs]
        batches = bucketed_batches(lengths, self.batch_size, 16, self.seed)
        batches = shard_batches(batches, self.trainer, "pm.batch_size")
        batches = remaining_batches(batches, self.trainer)
        return DataLoader(
            self.pairs, batch_sampler=batches, collate_fn=lambda b: collate_pairs(b, self.pad_id)
        )


def pair_micro_batches(batch: dict[str, torch.Tensor], budget: int | None) -> list[dict]:
    """The batch's comparisons in micro-batches of at most `budget` padded tokens (rows A and B
    of each comparison together), each trimmed to its own longest row rounded up by
    cai.memory.padded_width."""
    n = len(batch["p_a"])
    lengths = (torch.maximum(batch["last"][:n], batch["last"][n:]) + 1).tolist()
    lengths = [padded_width(x) for x in lengths]
    parts = []
    for pairs in row_slices([2 * x for x in lengths], budget):
        rows = torch.cat([torch.arange(n)[pairs], torch.arange(n)[pairs] + n])
        width = min(max(lengths[pairs]), batch["input_ids"].shape[1])
        parts.append(
            {
                "input_ids": batch["input_ids"][rows, :width],
                "last": batch["last"][rows],
                "p_a": batch["p_a"][pairs],
            }
        )
    return parts


class PMModule(TrainingModule):
    def training_step(self, batch, batch_idx):
        # 1. micro-batches within pm.micro_batch_tokens (the activations of one at a time)
        parts = pair_micro_batches(batch, self.micro_batch_tokens)
        n, rewards_a, rewards_b = len(batch["p_a"]), [], []

        def losses():
            for part in parts:
                # 2. one forward over [A rows; B rows]; rewards at the last tokens
                r_a, r_b = rewards(self.model, part["input_ids"], part["last"]).chunk(2)
                rewards_a.append(r_a.detach())
                rewards_b.append(r_b.detach())
                # 3. soft-label loss, the batch's mean as a sum over micro-batches
                yield soft_preference_loss(r_a, r_b, part["p_a"]) * len(r_a) / n

        loss = self.accumulate(losses())
        # 4. log loss, agreement with the label, margin
        r_a, r_b = torch.cat(rewards_a), torch.cat(rewards_b)
        agree = ((r_a > r_b) == (batch["p_a"] > 0.5)).float().mean()
        n = len(r_a)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/accuracy", agree, prog_bar=True, batch_size=n)
        self.log("train/margin", (r_a - r_b).abs().mean(), batch_size=n)
        return loss


# ---------------------------------------------------------------------------------------------
# 4. Scoring API


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
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from cai.models import resolve_dtype

        folder = Path(folder)
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=resolve_dtype(dtype), use_safetensors=True
        ).to(device)
        model.eval()
        settings = json.loads((folder / "pm_settings.json").read_text())
        return cls(model, AutoTokenizer.from_pretrained(folder), settings["prompt_format"])

    def _autocast(self):
        """bf16 autocast for fp32 weights where the hardware has bf16 (2x faster on this CPU)."""
        import contextlib

        from cai.models import bf16_supported

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


# ---------------------------------------------------------------------------------------------
# 5. The pipeline stage


def training_comparisons(cfg: DictConfig, upstream: dict[str, Artifact]) -> tuple[list, dict]:
    """The PM's training comparisons per `pm.harmlessness` and `pm.helpfulness`, mixed at
    `pm.helpfulness_ratio` helpfulness comparisons per harmlessness comparison."""
    from cai.data import hh_rlhf_comparisons

    pm = cfg.pm
    labels = read_jsonl(upstream["feedback"].file("labels.jsonl"))

    def ai(kind: str, source: str) -> list[Comparison]:
        """AI labels of the feedback stage for pairs of this kind (red_team, helpful)."""
        return [
            Comparison(
                answer_turns(r["prompt"], r["answer_a"]),
                answer_turns(r["prompt"], r["answer_b"]),
                r["p_a"],
                source,
            )
            for r in labels
            if r.get("kind", "red_team") == kind
        ]

    def human(subset: str, source: str) -> list[Comparison]:
        """Human comparisons of hh-rlhf `subset`, split pm_train."""
        pairs = hh_rlhf_comparisons(cfg.paths.data_dir, subset, "pm_train")[: pm.max_human]
        return human_comparisons(pairs, source)

    harmlessness_sources = {
        "ai": lambda: ai("red_team", "ai_harmless"),
        "human": lambda: human("harmless-base", "human_harmless"),
        "none": list,
    }
    helpfulness_sources = {
        "ai": lambda: ai("helpful", "ai_helpful"),
        "hh_rlhf": lambda: human("helpful-base", "human_helpful"),
        "none": list,
    }
    if pm.harmlessness not in harmlessness_sources:
        raise ConfigError(f"pm.harmlessness={pm.harmlessness!r}: use ai, human or none.")
    if pm.helpfulness not in helpfulness_sources:
        raise ConfigError(f"pm.helpfulness={pm.helpfulness!r}: use hh_rlhf, ai or none.")
    harmless = harmlessness_sources[pm.harmlessness]()
    helpful = helpfulness_sources[pm.helpfulness]()
    if pm.helpfulness_ratio is not None:
        harmless, helpful = mix(harmless, helpful, float(pm.helpfulness_ratio), int(cfg.seed))
    counts = {"harmlessness_pairs": len(harmless), "helpfulness_pairs": len(helpful)}
    return harmless + helpful, counts


def mix(harmless: list, helpful: list, ratio: float, seed: int) -> tuple[list, list]:
    """Harmlessness and helpfulness comparisons at `ratio` helpful per harmless one: the larger
    side is subsampled (seeded), so every PM built from a config (RL-CAI's on AI labels, the
    HH-RLHF baseline's on many more human ones) trains on the same mix."""
    if not harmless or not helpful or ratio <= 0:
        return harmless, [] if ratio <= 0 else helpful
    rng = random.Random(f"{seed}/pm-mix")
    if round(ratio * len(harmless)) > len(helpful):  # too few helpful: fewer harmless
        harmless = rng.sample(harmless, max(1, round(len(helpful) / ratio)))
    keep = min(len(helpful), round(ratio * len(harmless)))
    return harmless, rng.sample(helpful, keep)


def human_comparisons(pairs: list[tuple[str, str]], source: str) -> list[Comparison]:
    """(chosen, rejected) transcripts as comparisons: chosen = A, p(A) = 1."""
    return [Comparison(transcript_turns(c), transcript_turns(r), 1.0, source) for c, r in pairs]


def clean(comparisons: list[Comparison]) -> tuple[list[Comparison], dict]:
    """Skip and count labels that are NaN or outside [0, 1], and pairs with identical texts."""
    kept, bad_label, identical = [], 0, 0
    for c in comparisons:
        if not (isinstance(c.p_a, (int, float)) and 0.0 <= c.p_a <= 1.0):  # NaN fails both
            bad_label += 1
        elif c.a == c.b:
            identical += 1
        else:
            kept.append(c)
    for count, what in ((bad_label, "labels NaN or outside [0, 1]"), (identical, "identical")):
        if count:
            log.warning("Skipped %d PM comparisons: %s.", count, what)
    return kept, {"skipped_bad_label": bad_label, "skipped_identical": identical}


def init_preference_model(
    model_cfg: DictConfig, cache_dir: str, seed: int = 0, dtype: str = "float32"
):
    """A sequence-classification model (one output) whose backbone is the causal LM's; the
    score head drawn from its own generator seeded by `seed` (the stage's seed), never from
    torch's global random state, so the same key gives the same weights whatever ran before."""
    from transformers import AutoModelForSequenceClassification

    from cai.models import load_model

    causal, tokenizer = load_model(model_cfg, cache_dir, dtype="float32")
    config = causal.config
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    pm = AutoModelForSequenceClassification.from_config(config)
    getattr(pm, pm.base_model_prefix).load_state_dict(
        getattr(causal, causal.base_model_prefix).state_dict()
    )
    generator = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        pm.score.weight.copy_(
            torch.randn(pm.score.weight.shape, generator=generator)
            / math.sqrt(config.hidden_size + 1)
        )
        if getattr(pm.score, "bias", None) is not None:
            pm.score.bias.zero_()
    # parameters only: buffers such as RoPE's inv_freq stay in fp32, as from_pretrained leaves
    # them (a PM trained here and one loaded from its folder then score the same)
    for param in pm.parameters():
        param.data = param.data.to(getattr(torch, dtype))
    return pm, tokenizer


def train_top_layers(model, count: int | None) -> int:
    """Freeze the embeddings and every transformer layer but the last `count` (the final norm
    and the score head stay trainable); None, or a backbone of at most `count` layers, trains
    everything. Frozen layers need no gradients, master weights or optimiser state, and no
    backward pass runs through them. Returns the number of trainable weights."""
    backbone = getattr(model, model.base_model_prefix)
    layers = next(m for m in backbone.children() if isinstance(m, torch.nn.ModuleList))
    if count is not None and int(count) < 1:
        raise ConfigError(f"train_layers={count}: a number of layers (>= 1) or null.")
    frozen = set()
    if count is not None and int(count) < len(layers):
        frozen = {id(p) for p in backbone.get_input_embeddings().parameters()}
        frozen |= {
            id(p) for layer in layers[: len(layers) - int(count)] for p in layer.parameters()
        }
    for param in model.parameters():
        param.requires_grad_(id(param) not in frozen)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_preference_model(
    cfg: DictConfig, node: DictConfig, comparisons: list[Comparison], init_cfg, work_dir: Path
) -> tuple[PreferenceModel, dict]:
    """Train a PM (settings `node`: cfg.pm, or an evaluation judge's) on `comparisons` from the
    causal LM `init_cfg`; save it in `work_dir/model`. Returns the scorer and its metrics."""
    comparisons, skipped = clean(comparisons)
    if not comparisons:
        raise ConfigError("No usable preference comparisons to train on: check the data.")
    # weights: "auto" = the trainer's (bf16 with fp32 masters where the hardware has bf16), or
    # "float32" (fp32 weights, bf16 autocast under a bf16-mixed trainer)
    weights = str(node.get("weights", "auto"))
    dtype = training_dtype(cfg.trainer) if weights == "auto" else weights
    model, tokenizer = init_preference_model(init_cfg, cfg.paths.cache_dir, int(cfg.seed), dtype)
    trainable = train_top_layers(model, node.get("train_layers"))
    scorer = PreferenceModel(model, tokenizer, init_cfg.prompt_format, int(node.eval_batch_size))
    encoded = [
        EncodedPair(scorer.encode(c.a), scorer.encode(c.b), float(c.p_a)) for c in comparisons
    ]
    pairs = [p for p in encoded if max(len(p.a), len(p.b)) <= int(node.max_length)]
    too_long = len(encoded) - len(pairs)
    if too_long:
        log.warning("Skipped %d PM comparisons longer than max_length.", too_long)
    if not pairs:
        raise ConfigError(f"Every PM comparison is longer than max_length={node.max_length}.")
    model.train()
    module = PMModule.from_config(model, node, cfg.trainer)
    data = PairDataModule(pairs, int(node.batch_size), tokenizer.pad_token_id, int(cfg.seed))
    trained = fit(cfg, module, data, work_dir, int(node.max_steps), int(node.checkpoint_every))
    model.eval()
    if is_follower():  # several processes: global rank 0 saves and evaluates
        return scorer, trained
    # fp32 master weights where it trained in bf16; the scorer goes on with the bf16 weights,
    # as PreferenceModel.load gives them on bf16 hardware
    model.save_pretrained(
        work_dir / "model", safe_serialization=True, state_dict=module.final_state
    )
    module.final_state = None  # 4 bytes a weight: let it go before scoring
    tokenizer.save_pretrained(work_dir / "model")
    write_json_atomic(
        work_dir / "model" / "pm_settings.json", {"prompt_format": init_cfg.prompt_format}
    )
    return scorer, {
        **skipped,
        "skipped_too_long": too_long,
        "train_pairs": len(pairs),
        "trainable_parameters": trainable,
        **trained,
    }


def run_stage(cfg: DictConfig, upstream: dict[str, Artifact], work_dir: Path) -> dict:
    """pm: train the preference model, save it in `work_dir/model`, evaluate it (rows.csv)."""
    from cai.config import model_cfg_for
    from cai.eval.validation import validate_pm
    from cai.models import count_parameters
    from cai.results import write_rows

    pm = cfg.pm
    comparisons, counts = training_comparisons(cfg, upstream)
    if not comparisons:
        raise ConfigError(
            f"No PM training comparisons (pm.harmlessness={pm.harmlessness}, "
            f"pm.helpfulness={pm.helpfulness}): check the feedback labels and the data."
        )
    init_cfg = model_cfg_for(cfg, str(pm.init), "pm.init", upstream)
    scorer, trained = train_preference_model(cfg, pm, comparisons, init_cfg, work_dir)
    if is_follower():
        return trained
    rows, evaluation = evaluate(cfg, scorer, init_cfg.name, count_parameters(scorer.model))
    # the PM that PPO optimises, validated like the judges (agreement with the paper's PM)
    validated, validation = validate_pm(
        scorer,
        cfg,
        {"stage": "pm", "model": init_cfg.name, "parameters": count_parameters(scorer.model),
         "judge": f"training_pm_{pm.harmlessness}"},
    )  # fmt: skip
    rows += validated
    write_rows(work_dir / "rows.csv", rows)
    return {
        **counts,
        **trained,
        "eval": evaluation,
        "validation": validation,
        "harmlessness": str(pm.harmlessness),
        "helpfulness": str(pm.helpfulness),
        "init": str(pm.init),
    }


def human_eval_sets(
    data_dir: str | None, split: str, max_human: int | None, max_hhh: int | None, fits=None
):
    """Pairs (preferred, other) to measure a PM on: hh-rlhf harmless-base `split` (the first
    `max_human` for which `fits(pair)` holds, e.g. within the PM's max_length) and HHH 438."""
    from cai.data import hh_rlhf_comparisons

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


def evaluate(cfg: DictConfig, scorer: PreferenceModel, name: str, parameters: int):
    """PM accuracy, margin and ECE on hh-rlhf harmless `pm_eval` (comparisons within
    pm.max_length) and on the 438 HHH pairs."""
    limit = int(cfg.pm.max_length)
    sets = human_eval_sets(
        cfg.paths.data_dir,
        "pm_eval",
        cfg.pm.max_eval,
        cfg.pm.max_hhh,
        fits=lambda pair: scorer.fits(pair, limit),
    )
    common = {
        "stage": "pm",
        "model": name,
        "parameters": parameters,
        "method": f"pm_{cfg.pm.harmlessness}",
    }
    return score_pair_sets(scorer, sets, common)


def load_pm(artifact: Artifact, device: str = "cpu") -> PreferenceModel:
    """The PM of a pm artifact, ready to score."""
    return PreferenceModel.load(artifact.path / "model", device=device)
