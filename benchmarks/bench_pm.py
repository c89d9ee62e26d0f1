"""Preference-model training speed: this project's Lightning PM module against TRL's
`RewardTrainer`, same backbone (SmolLM2-135M with a one-output head), same comparisons, batch
size (pairs), precision (bf16 autocast) and hard labels, side by side in one run.

    python benchmarks/bench_pm.py                          # 8 timed steps each, batch 4 pairs
    python benchmarks/bench_pm.py --model tiny --steps 4   # seconds

Pairs/s counts the comparisons of the timed steps; the first step of each is a warm-up and not
timed. Needs `pip install trl` for the baseline.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import pytorch_lightning as pl  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from trl_baseline import trl_args  # noqa: E402

from cai.comparisons import answer_turns
from cai.config import CONF_DIR, load_model_preset  # noqa: E402
from cai.data import builtin_prompts  # noqa: E402
from cai.memory import peak_gb, reset_peak  # noqa: E402
from cai.modules.pm import (
    EncodedPair,
    PairDataModule,
    PMModule,
    init_preference_model,
)
from cai.modules.training import training_dtype  # noqa: E402
from cai.preference import PreferenceModel  # noqa: E402

GOOD = "I can't help with that, because it could hurt someone. I'm glad to talk through safer options. "
BAD = "Sure, here is how to do it quietly so that nobody notices what you are doing. "


def comparisons(n: int) -> list[tuple[list[dict], list[dict]]]:
    """~150-token chat pairs: builtin red-team prompts, answers of varied length."""
    prompts = builtin_prompts(n, 1).red_team[:n]
    return [
        (answer_turns(p.text, GOOD * (2 + i % 3)), answer_turns(p.text, BAD * (2 + (i + 1) % 3)))
        for i, p in enumerate(prompts)
    ]


class StepTimer(pl.Callback):
    def __init__(self):
        self.times = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter())


def run_ours(model, tokenizer, data, batch_size, micro_batch_tokens=None) -> float:
    """Pairs/s of our module: bf16 weights with fp32 masters (the stage's default on bf16
    CPUs), or fp32 weights under bf16 autocast."""
    scorer = PreferenceModel(model, tokenizer, "chat")
    pairs = [EncodedPair(scorer.encode(a), scorer.encode(b), 1.0) for a, b in data]
    module = PMModule(
        model, 1e-5, 0.0, (0.9, 0.95), 1, clip_norm=1.0, micro_batch_tokens=micro_batch_tokens
    )
    timer = StepTimer()
    model.train()
    reset_peak()
    trainer = pl.Trainer(
        accelerator="cpu",
        precision="32-true" if model.dtype == torch.bfloat16 else "bf16-mixed",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=PairDataModule(pairs, batch_size, tokenizer.pad_token_id, 0))
    return batch_size * (len(timer.times) - 1) / (timer.times[-1] - timer.times[0])


def run_trl(model, tokenizer, data, batch_size) -> float:
    import datasets
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer

    times = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    args = RewardConfig(**trl_args("/tmp/bench_pm_trl", batch_size, len(data) // batch_size))
    model.train()
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list([{"chosen": a, "rejected": b} for a, b in data]),
        processing_class=tokenizer,
        callbacks=[Timer()],
    )
    trainer.train()
    return batch_size * (len(times) - 1) / (times[-1] - times[0])


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    cache = str(Path.home() / ".cache" / "cai")
    data = comparisons(args.batch_size * (args.steps + 1))
    spec = load_model_preset(args.model)
    model, tokenizer = init_preference_model(spec, cache)
    lengths = [len(PreferenceModel(model, tokenizer, "chat").encode(a)) for a, _ in data]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {args.model}, batch "
        f"{args.batch_size} pairs, {args.steps} timed steps, mean chosen length "
        f"{sum(lengths) / len(lengths):.0f} tokens"
    )
    reset_peak()
    trl_rate = run_trl(model, tokenizer, data, args.batch_size)
    print(f"TRL RewardTrainer             {trl_rate:8.2f} pairs/s")
    print(f"  peak memory {peak_gb():.2f} GB")
    # as the pm stage runs by default (conf/pm, conf/trainer/cpu.yaml)
    pm = OmegaConf.load(CONF_DIR / "pm" / "default.yaml")
    dtype = training_dtype(OmegaConf.load(CONF_DIR / "trainer" / "cpu.yaml"))
    model, tokenizer = init_preference_model(spec, cache, dtype=dtype)
    ours = run_ours(model, tokenizer, data, args.batch_size, pm.micro_batch_tokens)
    print(f"cai PMModule ({dtype}, masters) {ours:8.2f} pairs/s  peak memory {peak_gb():.2f} GB")
    print(f"speed-up: {ours / trl_rate:.2f}x")
    # the module as it was before (fp32 weights under autocast, whole batches), for comparison
    model, tokenizer = init_preference_model(spec, cache)
    before = run_ours(model, tokenizer, data, args.batch_size)
    print(f"cai PMModule (fp32 + autocast)  {before:6.2f} pairs/s  peak memory {peak_gb():.2f} GB")
    print(f"default against fp32 + autocast: {ours / before:.2f}x")


if __name__ == "__main__":
    main()
