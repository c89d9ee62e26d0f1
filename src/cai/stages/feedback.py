"""feedback: AI labels for the RL stage (Bai et al. 2022, section 4.1). The feedback model
answers a multiple-choice question per pair of SL-CAI answers ("which response is more
harmless?", with a sampled constitution principle; the helpfulness question on helpfulness
pairs), and the normalised probabilities of " (A)" and " (B)" become a soft label
(cai.ai_feedback: few-shot block, principle ensembling, swapped orders, chain of thought).

Files: labels.jsonl (id, prompt, answer_a, answer_b, p_a, queries, ...). Resumable by chunks of
`feedback.chunk_size`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig
from tqdm.auto import tqdm

from cai.ai_feedback import FeedbackPrompts, LabelSettings, label_comparisons, mean
from cai.artifacts import Artifact, PartWriter, read_jsonl, write_jsonl_atomic
from cai.comparisons import Comparison
from cai.config import model_cfg_for
from cai.errors import ConfigError
from cai.generation import build_engine, endpoint_engine
from cai.inputs import input_fingerprints, load_inputs
from cai.labellers import function_fingerprint, label_with_function, load_function
from cai.stages.base import ENDPOINT_RUNTIME, GENERATION_RUNTIME, Stage

log = logging.getLogger(__name__)


def run(cfg: DictConfig, inputs: dict[str, Artifact], work_dir: Path) -> dict:
    # 1. The comparisons: each generate_pairs pair with two different, non-empty answers
    settings = LabelSettings.from_config(cfg.feedback)
    constitution, _ = load_inputs(cfg)
    pairs = read_jsonl(inputs["generate_pairs"].file("pairs.jsonl"))
    comparisons = [
        Comparison.of_answers(
            p["id"], p["prompt"], (p["answer_a"], p["answer_b"]), p.get("kind", "red_team")
        )
        for p in pairs
        if p["answer_a"].strip() and p["answer_b"].strip() and p["answer_a"] != p["answer_b"]
    ]
    skipped = len(pairs) - len(comparisons)
    if skipped:
        log.warning("Skipped %d pairs with an empty or repeated answer.", skipped)
    if not comparisons:
        raise ConfigError(
            f"No usable pairs in {inputs['generate_pairs'].path}: every pair has an empty or "
            "repeated answer. Sample more (pairs.max_new_tokens, pairs.temperature)."
        )

    # 2. The labeller: the feedback model (paper: a pretrained LM, kept apart from the policy
    # being trained), in this process or served over HTTP (feedback.model=http), or a Python
    # function (feedback.function: a rule, an external classifier)
    if cfg.feedback.function:
        fn, engine = load_function(cfg.feedback.function, "feedback.function"), None

        def label(batch: list[Comparison]) -> list[dict]:
            return label_with_function(fn, batch, settings.swap, "feedback.function")
    else:
        prompts = FeedbackPrompts(constitution, cfg.feedback.helpfulness_principle, seed=cfg.seed)
        if str(cfg.feedback.model) == "http":
            engine = endpoint_engine(
                cfg.feedback.endpoint, "feedback.endpoint", bool(cfg.generation.progress)
            )
        else:
            model_cfg = model_cfg_for(cfg, str(cfg.feedback.model), "feedback.model", inputs)
            engine = build_engine(cfg.generation, model_cfg, cfg.paths.cache_dir)

        def label(batch: list[Comparison]) -> list[dict]:
            return label_comparisons(engine, prompts, batch, settings, cfg.seed)

    # 3. Labels by chunks of comparisons (a rerun skips finished parts)
    parts = PartWriter(work_dir / "parts")
    chunk = int(cfg.feedback.chunk_size)
    starts = range(0, len(comparisons), chunk)
    resumed = sum(parts.done(i // chunk) for i in starts)
    for start in tqdm(starts, desc="feedback chunks", unit="chunk"):
        if not parts.done(start // chunk):
            parts.write(start // chunk, label(comparisons[start : start + chunk]))
    # each label keeps its answers' finish reasons (DPO gives a cut-off answer no end token)
    finishes = {
        p["id"]: {"finish_a": p.get("finish_a"), "finish_b": p.get("finish_b")} for p in pairs
    }
    records = [r | finishes[r["id"]] for r in parts.read_all()]
    write_jsonl_atomic(work_dir / "labels.jsonl", records)
    shutil.rmtree(work_dir / "parts", ignore_errors=True)
    p = [r["p_a"] for r in records]
    return {
        "comparisons": len(records),
        "skipped_pairs": skipped,
        "mean_p_a": round(mean(p), 4),
        "mean_abs_confidence": round(mean([abs(x - 0.5) for x in p]), 4),
        "position_bias": round(mean([r["position_bias"] for r in records]), 4),
        "queries_per_comparison": len(records[0]["queries"]),
        "resumed_chunks": resumed,
        "labeller": cfg.feedback.function or "model",
        "engine": getattr(engine, "stats", {}),
    }


def check_settings(cfg: DictConfig) -> None:
    LabelSettings.from_config(cfg.feedback)
    if cfg.feedback.function:
        load_function(cfg.feedback.function, "feedback.function")
    elif str(cfg.feedback.model) == "http":
        endpoint_engine(cfg.feedback.endpoint, "feedback.endpoint")  # url, api key present


def unused_settings(cfg: DictConfig) -> tuple[str, ...]:
    """The endpoint, unless the labeller is served (a function or an in-process model needs none)."""
    served = str(cfg.feedback.model) == "http" and not cfg.feedback.function
    return () if served else ("feedback.endpoint",)


def fingerprints(cfg: DictConfig) -> dict:
    """The prompts and constitution read, and (feedback.function) the file of the function."""
    function = cfg.feedback.function
    return input_fingerprints(cfg) | (
        {"function": function_fingerprint(function, "feedback.function")} if function else {}
    )


STAGE = Stage(
    "feedback",
    run,
    settings=("model", "constitution", "feedback", "generation"),
    upstream=("generate_pairs", "sft"),
    runtime=(
        "feedback.chunk_size",
        *GENERATION_RUNTIME,
        *(f"feedback.endpoint.{k}" for k in ENDPOINT_RUNTIME),
    ),
    version=2,  # 2: labels keep the answers' finish reasons
    fingerprints=fingerprints,
    check=check_settings,
    inert=unused_settings,
)
