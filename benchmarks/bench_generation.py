"""Generation speed on the SL-CAI critique-revision workload: our `hf` engine against batched
`model.generate` in bf16 with left padding (the peer a user writes first: same batch size,
full prompts) and, for continuity, a naive loop that calls `model.generate` once per request in
fp32 (same prompts, few-shot block, token budgets and sampling settings), side by side in one
run.

    python benchmarks/bench_generation.py                     # paper constitution, SmolLM2-135M
    python benchmarks/bench_generation.py --prompts 8 --naive-prompts 2 --rounds 1   # quick look
    python benchmarks/bench_generation.py --model tiny --prompts 8 --naive-prompts 2 # seconds

The naive loop is slow (each call re-encodes the ~2,500-token few-shot block), so it runs on the
first `--naive-prompts` prompts only; tokens/s is a rate, so the two are comparable. Prints
tokens/s of both, the ratio, peak memory, and where our engine's time goes.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from omegaconf import OmegaConf  # noqa: E402

from cai.config import load_model_preset  # noqa: E402
from cai.constitution import load_constitution  # noqa: E402
from cai.critique import critique_revision_chain  # noqa: E402
from cai.data import load_prompts  # noqa: E402
from cai.generation.base import Generation, GenerationEngine  # noqa: E402
from cai.generation.hf import HFEngine  # noqa: E402
from cai.models import load_model  # noqa: E402
from cai.prompting import SLPrompts  # noqa: E402


class NaiveEngine(GenerationEngine):
    """Baseline: one `model.generate` call per request, full prompt (few-shot block included)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.stats = {"generated_tokens": 0}

    @torch.no_grad()
    def generate(self, requests, prefix="", desc="", keep_state=False, states=None):
        out = []
        for r in requests:
            ids = self.tokenizer(prefix + r.prompt, return_tensors="pt")
            torch.manual_seed(r.seed)
            gen = self.model.generate(
                **ids,
                max_new_tokens=r.max_new_tokens,
                do_sample=r.temperature > 0,
                temperature=r.temperature or None,
                top_p=r.top_p,
                top_k=0,
                stop_strings=list(r.stop),
                tokenizer=self.tokenizer,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            new = gen[0, ids.input_ids.shape[1] :]
            self.stats["generated_tokens"] += len(new)
            out.append(
                Generation(
                    self.tokenizer.decode(new, skip_special_tokens=True).strip(), len(new), "stop"
                )
            )
        return out


class BatchedGenerateEngine(GenerationEngine):
    """The peer a user writes first: batched `model.generate` in bf16 with left padding, the
    full prompt (few-shot block included) in every row, `batch_size` requests per call in
    request order, sampling seeded per batch."""

    def __init__(self, model, tokenizer, batch_size):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.stats = {"generated_tokens": 0}

    @torch.no_grad()
    def generate(self, requests, prefix="", desc="", keep_state=False, states=None):
        out = []
        self.tokenizer.padding_side = "left"
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            first = batch[0]
            ids = self.tokenizer(
                [prefix + r.prompt for r in batch], return_tensors="pt", padding=True
            )
            torch.manual_seed(first.seed)
            gen = self.model.generate(
                **ids,
                max_new_tokens=max(r.max_new_tokens for r in batch),
                do_sample=first.temperature > 0,
                temperature=first.temperature or None,
                top_p=first.top_p,
                top_k=0,
                stop_strings=list(first.stop),
                tokenizer=self.tokenizer,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            for row in gen[:, ids.input_ids.shape[1] :]:
                new = [t for t in row.tolist() if t != self.tokenizer.pad_token_id]
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                for stop in first.stop:  # generate stops after the string; cut it as ours does
                    text = text.split(stop)[0]
                self.stats["generated_tokens"] += len(new)
                out.append(Generation(text.strip(), len(new), "stop", token_ids=tuple(new)))
        return out


def greedy_agreement(ours, peer, prompts, builder, principles, sl) -> str:
    """Identical greedy outputs? Both engines, T = 0, one critique round on `prompts`."""
    greedy = OmegaConf.merge(sl, {"temperature": 0.0, "generate_revisions": 1})
    a = critique_revision_chain(ours, prompts, builder, principles, greedy, seed=0)
    b = critique_revision_chain(peer, prompts, builder, principles, greedy, seed=0)

    def texts(records):
        return [r["initial"] for r in records] + [
            x[k] for r in records for x in r["revisions"] for k in ("critique", "revision")
        ]

    same = sum(x == y for x, y in zip(texts(a), texts(b), strict=True))
    return f"{same}/{len(texts(a))} greedy texts identical"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def run(engine, prompts, builder, principles, sl, label):
    start = time.perf_counter()
    critique_revision_chain(engine, prompts, builder, principles, sl, seed=0)
    wall = time.perf_counter() - start
    tokens = engine.stats["generated_tokens"]
    print(
        f"{label:<34} {len(prompts):>4} prompts {tokens:>7} tokens {wall:>8.1f} s {tokens / wall:>8.1f} tokens/s"
    )
    return tokens / wall


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument(
        "--constitution", default="anthropic_2022", choices=["anthropic_2022", "builtin"]
    )
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--naive-prompts", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--format", default=None, help="raw or chat (default: the model's)")
    parser.add_argument(
        "--greedy-check", type=int, default=0, help="compare greedy outputs on this many prompts"
    )
    args = parser.parse_args()

    data_dir = os.environ.get(
        "CAI_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    cache_dir = os.environ.get("CAI_CACHE_DIR", str(Path.home() / ".cache" / "cai"))
    constitution = load_constitution(
        OmegaConf.create({"source": args.constitution, "url": ""}), data_dir
    )
    prompt_cfg = OmegaConf.create(
        {
            "source": "builtin",
            "eval_percent": 10,
            "shuffle_seed": 0,
            "max_red_team": args.prompts,
            "max_helpful": 1,
            "max_eval": 0,
        }
    )
    prompts = load_prompts(prompt_cfg).split("train").red_team
    sl = OmegaConf.create(
        {
            "generate_revisions": args.rounds,
            "critique": True,
            "temperature": 1.0,
            "top_p": 1.0,
            "max_answer_tokens": args.max_tokens,
            "max_critique_tokens": args.max_tokens,
            "max_revision_tokens": args.max_tokens,
        }
    )
    spec = load_model_preset(args.model)
    fmt = args.format or spec.prompt_format
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {args.model}, "
        f"constitution {args.constitution}, format {fmt}, {args.rounds} rounds, {args.max_tokens} "
        f"new tokens per call, T=1"
    )

    ours_model, tokenizer = load_model(spec, cache_dir, dtype="auto")
    builder = SLPrompts(constitution, tokenizer, fmt)
    print(
        f"few-shot prefix: {len(tokenizer(builder.prefix).input_ids)} tokens; ours in {ours_model.dtype}"
    )
    principles = constitution.principles()

    naive_model, _ = load_model(spec, cache_dir, dtype="float32")
    naive = NaiveEngine(naive_model, tokenizer)
    naive_rate = run(
        naive, prompts[: args.naive_prompts], builder, principles, sl, "naive generate, fp32"
    )
    del naive_model

    peer_model, _ = load_model(spec, cache_dir, dtype="auto")
    peer = BatchedGenerateEngine(peer_model, tokenizer, args.batch_size)
    peer_rate = run(
        peer,
        prompts,
        builder,
        principles,
        sl,
        f"batched generate, {str(peer_model.dtype)[6:]}, batch {args.batch_size}",
    )
    engine = HFEngine(ours_model, tokenizer, batch_size=args.batch_size, progress=False)
    ours_rate = run(
        engine,
        prompts,
        builder,
        principles,
        sl,
        f"cai hf engine, {str(ours_model.dtype)[6:]}, batch {args.batch_size}",
    )
    print(
        f"speed-up: {ours_rate / naive_rate:.1f}x over naive fp32, "
        f"{ours_rate / peer_rate:.1f}x over batched bf16 generate   peak RSS: {peak_rss_gb():.2f} GB"
        f"   engine prefill tokens: {engine.stats['prefill_tokens']}"
    )
    if args.greedy_check:
        print(greedy_agreement(engine, peer, prompts[: args.greedy_check], builder, principles, sl))


if __name__ == "__main__":
    main()
