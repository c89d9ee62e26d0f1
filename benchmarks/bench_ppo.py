"""PPO iteration time with SmolLM2-135M on this CPU, split into rollout, scoring and update,
samples/s and peak memory, for the stage's precision (bf16 weights with fp32 master weights in
the optimiser, where the CPU has bf16) beside fp32 weights (the stage before), in one run. The
rollout is also measured against a named baseline: `model.generate` on each prompt in turn (the
plain loop), same policy, prompts and answer length.

    python benchmarks/bench_ppo.py                        # 3 iterations of 8 rollouts, each dtype
    python benchmarks/bench_ppo.py --model tiny --steps 2 # seconds

The PM is the policy's backbone with a fresh one-output head (the speed does not depend on its
weights); the reference is a frozen copy of the policy; value head on the policy.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import pytorch_lightning as pl  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from cai.comparisons import answer_turns  # noqa: E402
from cai.config import CONF_DIR, load_model_preset  # noqa: E402
from cai.data import builtin_prompts  # noqa: E402
from cai.generation.hf import HFEngine  # noqa: E402
from cai.memory import peak_gb, reset_peak  # noqa: E402
from cai.models import bf16_supported, load_model  # noqa: E402
from cai.modules.pm import init_preference_model  # noqa: E402
from cai.modules.ppo import PPOModule, PromptBatches, ValueHead  # noqa: E402
from cai.preference import PreferenceModel  # noqa: E402
from cai.prompting import answer_prompt  # noqa: E402


def run(args, spec, cache, dtype: str) -> tuple[PPOModule, dict]:
    """`args.steps` PPO iterations with weights in `dtype`; the module and the median parts."""
    reset_peak()
    policy, tokenizer = load_model(spec, cache, dtype=dtype)
    reference = copy.deepcopy(policy).eval()
    pm_model, _ = init_preference_model(spec, cache, dtype=dtype)
    pm = PreferenceModel(pm_model.eval(), tokenizer, spec.prompt_format)

    def reward(prompts, answers):
        return pm.score([answer_turns(p, a) for p, a in zip(prompts, answers, strict=True)])

    prompt_set = builtin_prompts(32, 32)
    prompts = [
        (p.kind, p.text, answer_prompt(tokenizer, p.text, spec.prompt_format))
        for p in prompt_set.red_team + prompt_set.helpful
    ]
    ppo = OmegaConf.merge(
        OmegaConf.load(CONF_DIR / "ppo" / "default.yaml"),
        {
            "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens,
            "snapshot_sequences": [],
        },
    )
    if ppo.activation_checkpointing:  # as the stage does (conf/ppo/default.yaml)
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine = HFEngine(policy, tokenizer, batch_size=args.batch_size, progress=False)
    module = PPOModule(
        policy,
        reference,
        ValueHead(policy.config.hidden_size),
        engine,
        reward,
        tokenizer,
        prompts,
        ppo,
    )
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=PromptBatches(len(prompts), args.steps, args.batch_size, 0))
    total = time.perf_counter() - start
    steps = module.history[1:] or module.history  # the first iteration warms up
    parts = {
        k: statistics.median(h[f"time/{k}_s"] for h in steps)
        for k in ("rollout", "score", "update")
    }
    step = sum(parts.values())
    print(
        f"{dtype:<9} median iteration: "
        + ", ".join(f"{k} {v:.1f} s ({100 * v / step:.0f}%)" for k, v in parts.items())
        + f"; {args.batch_size / step:.2f} samples/s ({total:.0f} s for {args.steps} iterations); "
        f"peak memory {peak_gb():.2f} GB"
    )
    return module, {"step": step, "tokenizer": tokenizer, "prompts": prompts}


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    cache = str(Path.home() / ".cache" / "cai")
    spec = load_model_preset(args.model)
    ppo = OmegaConf.load(CONF_DIR / "ppo" / "default.yaml")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {args.model}, "
        f"{args.batch_size} rollouts of up to {args.max_new_tokens} tokens per iteration, "
        f"{ppo.epochs} epochs x minibatches of {ppo.minibatch_size}"
    )
    dtypes = ["float32"] + (["bfloat16"] if bf16_supported() else [])
    steps = {}
    for dtype in dtypes:  # one at a time: the earlier run's models are let go first
        module = info = None
        gc.collect()
        module, info = run(args, spec, cache, dtype)
        steps[dtype] = info["step"]
    if len(steps) == 2:
        print(f"speed-up of bf16 over fp32: {steps['float32'] / steps['bfloat16']:.2f}x")

    policy, engine, tokenizer, prompts = (
        module.policy,
        module.engine,
        info["tokenizer"],
        info["prompts"],
    )
    # The rollout's baseline: the plain per-prompt generate loop on the same prompts.
    chosen = [prompts[i][2] for i in range(args.batch_size)]
    policy.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for text in chosen:
            ids = tokenizer(text, return_tensors="pt")
            policy.generate(
                **ids,
                max_new_tokens=args.max_new_tokens,
                do_sample=True,
                pad_token_id=tokenizer.pad_token_id,
            )
    plain = time.perf_counter() - start
    start = time.perf_counter()
    from cai.generation.base import Request

    engine.generate(
        [Request(t, max_new_tokens=args.max_new_tokens, seed=i) for i, t in enumerate(chosen)]
    )
    ours = time.perf_counter() - start
    print(
        f"rollout of {args.batch_size}: plain generate loop {plain:.1f} s, engine {ours:.1f} s, "
        f"speed-up {plain / ours:.1f}x"
    )


if __name__ == "__main__":
    main()
