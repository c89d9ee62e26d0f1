"""generate_sl: the SL-CAI data (Bai et al. 2022, section 3.1). The helpful model answers each
red-team prompt, then critiques and revises its answer `sl.generate_revisions` times, one
sampled principle per round (cai.critique); helpfulness prompts get `sl.samples_per_helpful`
plain answers. Every step is kept, so SL-CAI-n for any n (sft.num_revisions) comes from one run.

Files: red_team.jsonl, helpful.jsonl (train split). Resumable by chunks of `sl.chunk_size`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig
from tqdm.auto import tqdm

from cai.artifacts import Artifact, PartWriter, write_jsonl_atomic
from cai.critique import critique_revision_chain, fits_context, helpful_samples
from cai.errors import ConfigError
from cai.generation import build_engine, endpoint_engine, engine_tokenizer
from cai.inputs import input_fingerprints, load_inputs
from cai.prompting import SLPrompts
from cai.stages.base import ENDPOINT_RUNTIME, GENERATION_RUNTIME, Stage

log = logging.getLogger(__name__)


def run(cfg: DictConfig, inputs: dict[str, Artifact], work_dir: Path) -> dict:
    # 1. Inputs: the constitution's principles, the train split's prompts that fit the context
    sl = cfg.sl
    constitution, prompt_set = load_inputs(cfg)
    principles = constitution.principles(sl.get("principle_ids"), sl.get("num_principles"))
    train = prompt_set.split("train")
    limit = None if sl.get("max_prompts") is None else int(sl.max_prompts)  # per kind
    engine = sl_engine(cfg)
    builder = SLPrompts(
        constitution,
        engine_tokenizer(engine, cfg.model, cfg.paths.cache_dir),
        cfg.model.prompt_format,
        critique=bool(sl.critique),
        num_fewshot=sl.get("num_fewshot"),
    )
    max_context = int(cfg.model.max_context)
    red, skipped_red = fits_context(train.red_team[:limit], builder, sl, max_context, principles)
    helpful, skipped_helpful = fits_context(
        train.helpful[:limit], builder, sl, max_context, principles
    )

    # 2. Chunks of prompts, each written as a part when done (a rerun skips finished parts)
    chunk = int(sl.chunk_size)
    parts = {
        "red_team": PartWriter(work_dir / "parts_red_team"),
        "helpful": PartWriter(work_dir / "parts_helpful"),
    }
    chunks = [("red_team", i) for i in range(0, len(red), chunk)] + [
        ("helpful", i) for i in range(0, len(helpful), chunk)
    ]
    resumed = sum(parts[kind].done(i // chunk) for kind, i in chunks)
    if resumed:
        log.info("Resuming generate_sl: %d of %d chunks already finished.", resumed, len(chunks))
    for kind, start in tqdm(chunks, desc="generate_sl chunks", unit="chunk"):
        if parts[kind].done(start // chunk):
            continue
        if kind == "red_team":
            records = critique_revision_chain(
                engine, red[start : start + chunk], builder, principles, sl, int(cfg.seed)
            )
        else:
            records = helpful_samples(
                engine, helpful[start : start + chunk], builder, sl, int(cfg.seed)
            )
        parts[kind].write(start // chunk, records)

    # 3. The parts joined into the artifact's files
    red_records, helpful_records = parts["red_team"].read_all(), parts["helpful"].read_all()
    write_jsonl_atomic(work_dir / "red_team.jsonl", red_records)
    write_jsonl_atomic(work_dir / "helpful.jsonl", helpful_records)
    for folder in ("parts_red_team", "parts_helpful"):
        shutil.rmtree(work_dir / folder, ignore_errors=True)
    revisions = [r for rec in red_records for r in rec["revisions"]]
    return {
        "red_team_prompts": len(red_records),
        "helpful_prompts": len(helpful_records),
        "revisions_per_prompt": int(sl.generate_revisions),
        "skipped_too_long": {"red_team": skipped_red, "helpful": skipped_helpful},
        "prompt_counts": prompt_set.counts,
        "empty_revisions": sum(r["empty_revision"] for r in revisions),
        "mean_initial_tokens": _mean([r["initial_tokens"] for r in red_records]),
        "mean_critique_tokens": _mean([r["critique_tokens"] for r in revisions]),
        "mean_revision_tokens": _mean([r["revision_tokens"] for r in revisions]),
        "resumed_chunks": resumed,
        "engine": getattr(engine, "stats", {}),
        "few_shot_prefix_chars": len(builder.prefix),
    }


def sl_engine(cfg: DictConfig):
    """The model that answers, critiques and revises: the helpful model `model` in process
    (sl.model=policy), or a model served over HTTP (sl.model=http, sl.endpoint: an
    OpenAI-compatible completions endpoint). Prompts are built with `model`'s tokenizer and
    chat format either way, so a served model should share its chat template."""
    if str(cfg.sl.get("model", "policy")) == "http":
        return endpoint_engine(cfg.sl.endpoint, "sl.endpoint", bool(cfg.generation.progress))
    return build_engine(cfg.generation, cfg.model, cfg.paths.cache_dir)


def check_settings(cfg: DictConfig) -> None:
    """sl.model and, when it is http, the endpoint: before any work."""
    choice = str(cfg.sl.get("model", "policy"))
    if choice not in ("policy", "http"):
        raise ConfigError(f"sl.model={choice!r}: use policy (the model in process) or http.")
    if choice == "http":
        endpoint_engine(cfg.sl.endpoint, "sl.endpoint")  # its url and api key


def unused_settings(cfg: DictConfig) -> tuple[str, ...]:
    """Settings at their defaults that earlier keys did not have: sl.max_prompts=null, and
    sl.model/sl.endpoint unless the SL model is served."""
    unused = () if cfg.sl.get("max_prompts") is not None else ("sl.max_prompts",)
    if str(cfg.sl.get("model", "policy")) != "http":
        unused += ("sl.model", "sl.endpoint")
    return unused


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 2) if values else 0.0


STAGE = Stage(
    "generate_sl",
    run,
    settings=("model", "constitution", "data", "sl", "generation"),
    version=2,  # 2: finish reasons kept (SFT gives cut-off texts no end token)
    runtime=(
        "sl.num_revisions",  # the old name of sft.num_revisions
        *GENERATION_RUNTIME,
        *(f"sl.endpoint.{k}" for k in ENDPOINT_RUNTIME),
    ),
    fingerprints=input_fingerprints,
    check=check_settings,
    inert=unused_settings,
)
