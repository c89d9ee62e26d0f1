"""SFT training speed: this project's Lightning SFT module against TRL's `SFTTrainer`, same
model (SmolLM2-135M), same chats, batch size, sequence lengths and precision (bf16 autocast),
measured side by side in one run.

    python benchmarks/bench_sft.py                          # 8 timed steps each, batch 4
    python benchmarks/bench_sft.py --model tiny --steps 4   # seconds

Tokens/s counts real (non-padding) tokens of the timed steps; the first step of each is a
warm-up and not timed. Needs `pip install trl` for the baseline.
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

from cai.config import CONF_DIR, load_model_preset  # noqa: E402
from cai.data import builtin_prompts  # noqa: E402
from cai.memory import peak_gb, reset_peak  # noqa: E402
from cai.models import load_model  # noqa: E402
from cai.modules.sft import SFTDataModule, SFTModule, encode_example  # noqa: E402
from cai.modules.training import training_dtype  # noqa: E402

ANSWER = (
    "I can't help with that, because it could hurt someone or break the law. If you are dealing "
    "with a difficult situation, I'm glad to talk through safer options, point you to people "
    "who can help, or explain the rules that apply. "
)


def chats(n: int) -> list[tuple[str, str]]:
    """~220-token chats: builtin prompts with answers of varied length."""
    prompts = builtin_prompts(n, 1).red_team[:n]
    return [(p.text, ANSWER * (2 + i % 3)) for i, p in enumerate(prompts)]


class StepTimer(pl.Callback):
    def __init__(self):
        self.times = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.times.append((time.perf_counter(), int(batch["attention_mask"].sum())))


def run_ours(model, tokenizer, data, batch_size, micro_batch_tokens=None):
    """Tokens/s of our module: bf16 weights with fp32 masters (the stage's default on bf16
    CPUs), or fp32 weights under bf16 autocast."""
    examples = [encode_example(tokenizer, q, a, "chat", f"p{i}") for i, (q, a) in enumerate(data)]
    module = SFTModule(
        model,
        lr=1e-5,
        weight_decay=0.0,
        betas=(0.9, 0.95),
        warmup_steps=1,
        clip_norm=1.0,
        micro_batch_tokens=micro_batch_tokens,
    )
    timer = StepTimer()
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
    )
    trainer.fit(
        module, datamodule=SFTDataModule(examples, [], batch_size, 8, tokenizer.pad_token_id, 0)
    )
    (t0, _), rest = timer.times[0], timer.times[1:]
    return sum(n for _, n in rest) / (rest[-1][0] - t0)


def run_trl(model, tokenizer, data, batch_size):
    import datasets
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = [
        {
            "prompt": [{"role": "user", "content": q}],
            "completion": [{"role": "assistant", "content": a}],
        }
        for q, a in data
    ]
    times = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append((time.perf_counter(), state.num_input_tokens_seen))

    args = SFTConfig(
        **trl_args("/tmp/bench_sft_trl", batch_size, len(data) // batch_size),
        include_num_input_tokens_seen="non_padding",
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[Timer()],
    )
    trainer.train()
    (t0, n0), (t1, n1) = times[0], times[-1]
    return (n1 - n0) / (t1 - t0)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    cache = str(Path.home() / ".cache" / "cai")
    data = chats(args.batch_size * (args.steps + 1))
    spec = load_model_preset(args.model)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {args.model}, batch "
        f"{args.batch_size}, {args.steps} timed steps"
    )
    model, tokenizer = load_model(spec, cache, dtype="float32")
    mean_len = sum(
        len(encode_example(tokenizer, q, a, "chat", "x").input_ids) for q, a in data
    ) / len(data)
    print(f"mean chat length: {mean_len:.0f} tokens")
    reset_peak()
    trl_rate = run_trl(model, tokenizer, data, args.batch_size)
    print(f"TRL SFTTrainer                {trl_rate:8.1f} tokens/s")
    print(f"  peak memory {peak_gb():.2f} GB")
    # as the sft stage runs by default (conf/sft, conf/trainer/cpu.yaml)
    sft = OmegaConf.load(CONF_DIR / "sft" / "default.yaml")
    model, tokenizer = load_model(
        spec, cache, dtype=training_dtype(OmegaConf.load(CONF_DIR / "trainer" / "cpu.yaml"))
    )
    ours = run_ours(model, tokenizer, data, args.batch_size, sft.micro_batch_tokens)
    print(
        f"cai SFTModule ({str(model.dtype)[6:]}, masters) {ours:8.1f} tokens/s  peak memory {peak_gb():.2f} GB"
    )
    print(f"speed-up: {ours / trl_rate:.2f}x")
    # the module as it was before (fp32 weights under autocast, whole batches), for comparison
    model, tokenizer = load_model(spec, cache, dtype="float32")
    before = run_ours(model, tokenizer, data, args.batch_size)
    print(f"cai SFTModule (fp32 + autocast) {before:6.1f} tokens/s  peak memory {peak_gb():.2f} GB")
    print(f"default against fp32 + autocast: {ours / before:.2f}x")


if __name__ == "__main__":
    main()
