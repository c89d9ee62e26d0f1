"""generate_pairs: the SL-CAI model samples two answers per red-team prompt (Bai et al. 2022,
section 4.1: "we sample a pair of responses to each red-team prompt from the SL-CAI model"),
and per helpfulness prompt when `pairs.helpful` (for AI helpfulness labels, `pm.helpfulness=ai`).
The feedback stage then labels which answer of each pair is better.

Files: pairs.jsonl (id, prompt, answer_a, answer_b, ...). Resumable by chunks of `pairs.chunk_size`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from cai.artifacts import Artifact, PartWriter, write_jsonl_atomic
from cai.errors import ConfigError
from cai.generation import Request, build_engine, engine_tokenizer, request_seed
from cai.inputs import input_fingerprints, load_inputs
from cai.prompting import answer_prompt
from cai.stages.base import GENERATION_RUNTIME, Stage

log = logging.getLogger(__name__)


def pair_requests(prompts, tokenizer, prompt_format: str, pairs_cfg: DictConfig, seed: int):
    """Two sampling requests per prompt (answer a, answer b), each with its own seed."""
    return [
        Request(
            answer_prompt(tokenizer, p.text, prompt_format),
            max_new_tokens=int(pairs_cfg.max_new_tokens),
            temperature=float(pairs_cfg.temperature),
            top_p=float(pairs_cfg.top_p),
            seed=request_seed(seed, "pairs", p.id, which),
        )
        for p in prompts
        for which in ("a", "b")
    ]


def run(cfg: DictConfig, inputs: dict[str, Artifact], work_dir: Path) -> dict:
    # 1. Prompts: red-team (and helpfulness, when pairs.helpful) of pairs.split
    pairs_cfg = cfg.pairs
    _, prompt_set = load_inputs(cfg)
    split = prompt_set.split(str(pairs_cfg.split))
    limit = None if pairs_cfg.max_prompts is None else int(pairs_cfg.max_prompts)
    prompts = split.red_team[:limit]
    if not prompts:
        raise ConfigError(
            f"No red-team prompts in the {pairs_cfg.split!r} split to sample pairs for: check "
            "data.* (or pairs.split, pairs.max_prompts)."
        )
    # Helpfulness pairs too, for AI helpfulness labels (pm.helpfulness=ai)
    prompts += split.helpful[:limit] if pairs_cfg.helpful else []

    # 2. Two answers per prompt from SL-CAI, by chunks (a rerun skips finished parts)
    policy = OmegaConf.merge(cfg.model, {"path": str(inputs["sft"].path / "model")})
    engine = build_engine(cfg.generation, policy, cfg.paths.cache_dir)
    tokenizer = engine_tokenizer(engine, cfg.model, cfg.paths.cache_dir)
    parts = PartWriter(work_dir / "parts")
    chunk = int(pairs_cfg.chunk_size)
    starts = list(range(0, len(prompts), chunk))
    resumed = sum(parts.done(i // chunk) for i in starts)
    for start in tqdm(starts, desc="generate_pairs chunks", unit="chunk"):
        if parts.done(start // chunk):
            continue
        batch = prompts[start : start + chunk]
        answers = engine.generate(
            pair_requests(batch, tokenizer, cfg.model.prompt_format, pairs_cfg, int(cfg.seed)),
            desc="pairs",
        )
        parts.write(
            start // chunk,
            [
                {
                    "id": p.id,
                    "prompt": p.text,
                    "category": p.category,
                    "kind": p.kind,
                    "answer_a": a.text,
                    "answer_b": b.text,
                    "tokens_a": a.num_tokens,
                    "tokens_b": b.num_tokens,
                    "finish_a": a.finish_reason,
                    "finish_b": b.finish_reason,
                }
                for p, a, b in zip(batch, answers[0::2], answers[1::2], strict=True)
            ],
        )

    # 3. The parts joined into pairs.jsonl
    records = parts.read_all()
    write_jsonl_atomic(work_dir / "pairs.jsonl", records)
    shutil.rmtree(work_dir / "parts", ignore_errors=True)
    lengths = [r[f"tokens_{w}"] for r in records for w in "ab"]
    return {
        "pairs": len(records),
        "helpful_pairs": sum(r["kind"] == "helpful" for r in records),
        "identical_pairs": sum(r["answer_a"] == r["answer_b"] for r in records),
        "empty_answers": sum(not r[f"answer_{w}"].strip() for r in records for w in "ab"),
        "mean_answer_tokens": round(sum(lengths) / len(lengths), 2),
        "resumed_chunks": resumed,
        "engine": getattr(engine, "stats", {}),
    }


STAGE = Stage(
    "generate_pairs",
    run,
    settings=("model", "data", "pairs", "generation"),
    upstream=("sft",),
    runtime=("pairs.chunk_size", *GENERATION_RUNTIME),
    fingerprints=input_fingerprints,
)
