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
`cai.preference.PreferenceModel.load(folder).score(dialogues)` scores it without this module.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification

from cai.artifacts import write_json_atomic
from cai.comparisons import Comparison, clean
from cai.errors import ConfigError
from cai.memory import padded_width
from cai.models import load_model
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
from cai.preference import PreferenceModel

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# 1. Pure maths


def soft_preference_loss(r_a: torch.Tensor, r_b: torch.Tensor, p_a: torch.Tensor) -> torch.Tensor:
    """Mean BCE between sigmoid(r_a - r_b) and p_a: -[p log s(d) + (1 - p) log s(-d)].

    r_a, r_b: [N] scalar rewards; p_a: [N] targets in [0, 1]. Returns a scalar.
    """
    return torch.nn.functional.binary_cross_entropy_with_logits(r_a - r_b, p_a)


# ---------------------------------------------------------------------------------------------
# 2. Tokens


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
# 4. Training data and training


def init_preference_model(
    model_cfg: DictConfig, cache_dir: str, seed: int = 0, dtype: str = "float32"
):
    """A sequence-classification model (one output) whose backbone is the causal LM's; the
    score head drawn from its own generator seeded by `seed` (the stage's seed), never from
    torch's global random state, so the same key gives the same weights whatever ran before."""
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
    # `epochs` passes over the pairs (the judges' settings have none: one)
    run_cfg = OmegaConf.merge(cfg, {"trainer": {"max_epochs": int(node.get("epochs", 1))}})
    trained = fit(run_cfg, module, data, work_dir, int(node.max_steps), int(node.checkpoint_every))
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
