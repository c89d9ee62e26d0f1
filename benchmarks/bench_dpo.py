"""DPO training speed: this project's DPO stage (reference log-probabilities computed once, then
cai.modules.dpo.DPOModule) against TRL's `DPOTrainer`, same model (SmolLM2-135M), same pairs,
batch size, beta and sigmoid loss, bf16 on this CPU, measured side by side in one run.

    python benchmarks/bench_dpo.py                          # 8 timed steps each, batch 4
    python benchmarks/bench_dpo.py --model tiny --steps 4   # seconds

Pairs/s counts the pairs of the timed steps (the first step of each is a warm-up and not
timed). TRL computes the reference model's log-probabilities inside every step (its default,
`precompute_ref_log_probs=False`); ours are computed once before training, and that pass is
charged to our time in proportion to the pairs timed. Needs `pip install trl` for the baseline.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import pytorch_lightning as pl  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from trl_baseline import trl_args  # noqa: E402

from cai.comparisons import Comparison  # noqa: E402
from cai.config import CONF_DIR, load_model_preset  # noqa: E402
from cai.data import builtin_prompts  # noqa: E402
from cai.memory import peak_gb, reset_peak  # noqa: E402
from cai.models import load_model  # noqa: E402
from cai.modules.dpo import (  # noqa: E402
    DPOModule,
    PreferenceDataModule,
    encode_preferences,
    reference_logprobs,
)
from cai.modules.training import training_dtype  # noqa: E402

REFUSAL = (
    "I can't help with that, because it could hurt someone or break the law. If you are dealing "
    "with a difficult situation, I'm glad to talk through safer options or point you to help. "
)
COMPLIANCE = "Sure. Here is a detailed plan, step by step, with what you need at each stage. "
BETA = 0.1


def pairs(n: int) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected): builtin red-team prompts, answers of ~60-180 tokens."""
    prompts = builtin_prompts(n, 1).red_team[:n]
    return [
        (p.text, REFUSAL * (1 + i % 3), COMPLIANCE * (2 + i % 4)) for i, p in enumerate(prompts)
    ]


class StepTimer(pl.Callback):
    def __init__(self):
        self.times = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.times.append((time.perf_counter(), len(batch["p_a"])))


def run_ours(model, tokenizer, data, batch_size, micro_batch_tokens) -> tuple[float, float]:
    """Pairs/s of the dpo stage's path: the reference pass, then DPOModule steps. Returns
    (pairs/s with the reference pass charged, pairs/s of the training steps alone)."""
    comparisons = [Comparison.of_answers(f"p{i}", q, (a, b), p_a=1.0) for i, (q, a, b) in
                   enumerate(data)]  # fmt: skip
    encoded, _ = encode_preferences(comparisons, tokenizer, "chat", 1024)
    start = time.perf_counter()
    reference = reference_logprobs(model, encoded, tokenizer.pad_token_id, progress=False)
    reference_s = time.perf_counter() - start
    encoded = [p.__class__(p.a, p.b, p.p_a, a, b) for p, (a, b) in zip(encoded, reference,
                                                                        strict=True)]  # fmt: skip
    model.train()
    module = DPOModule(
        model, 1e-5, 0.0, (0.9, 0.95), 1, clip_norm=1.0, micro_batch_tokens=micro_batch_tokens,
        beta=BETA, loss="sigmoid",
    )  # fmt: skip
    timer = StepTimer()
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
    )
    trainer.fit(module, datamodule=PreferenceDataModule(encoded, batch_size,
                                                         tokenizer.pad_token_id, 0))  # fmt: skip
    (t0, _), rest = timer.times[0], timer.times[1:]
    timed = sum(n for _, n in rest)
    train_s = rest[-1][0] - t0
    return timed / (train_s + reference_s * timed / len(encoded)), timed / train_s


def run_trl(model, tokenizer, data, batch_size) -> float:
    import datasets
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = [
        {
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": a}],
            "rejected": [{"role": "assistant", "content": b}],
        }
        for q, a, b in data
    ]
    times = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    args = DPOConfig(
        **trl_args("/tmp/bench_dpo_trl", batch_size, len(data) // batch_size),
        beta=BETA,
        loss_type=["sigmoid"],
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model).eval(),  # the frozen start (our model has no hub path)
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[Timer()],
    )
    trainer.train()
    return (len(times) - 1) * batch_size / (times[-1] - times[0])


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    cache = str(Path.home() / ".cache" / "cai")
    data = pairs(args.batch_size * (args.steps + 1))
    spec = load_model_preset(args.model)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {args.model}, batch "
        f"{args.batch_size} pairs, {args.steps} timed steps, beta {BETA}, sigmoid loss"
    )
    model, tokenizer = load_model(spec, cache, dtype="float32")
    reset_peak()
    trl_rate = run_trl(model, tokenizer, data, args.batch_size)
    print(f"TRL DPOTrainer (fp32 + bf16 autocast, reference each step) {trl_rate:6.2f} pairs/s")
    print(f"  peak memory {peak_gb():.2f} GB")
    # as the dpo stage runs by default (conf/dpo, conf/trainer/cpu.yaml)
    dpo = OmegaConf.load(CONF_DIR / "dpo" / "default.yaml")
    dtype = training_dtype(OmegaConf.load(CONF_DIR / "trainer" / "cpu.yaml"))
    model, tokenizer = load_model(spec, cache, dtype=dtype)
    reset_peak()
    ours, steps_only = run_ours(model, tokenizer, data, args.batch_size, dpo.micro_batch_tokens)
    print(
        f"cai dpo stage ({str(model.dtype)[6:]}, masters, reference once) {ours:6.2f} pairs/s "
        f"(training steps alone {steps_only:.2f})  peak memory {peak_gb():.2f} GB"
    )
    print(f"speed-up: {ours / trl_rate:.2f}x")


if __name__ == "__main__":
    main()
