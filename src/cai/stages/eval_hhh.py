"""eval_hhh: the paper's multiple-choice evaluations of a model (Bai et al. 2022, section 4.2,
Figures 4 and 9): the 438 HHH comparisons, harmful_vs_ethical and harmfulness_classification,
zero-shot and with chain of thought (cai.eval.hhh).

Files: items_<eval>.jsonl (every item's option probabilities), rows.csv (accuracy, ECE),
calibration.csv (the reliability table, Figure 9). Resumable per eval.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from omegaconf import DictConfig

from cai.ai_feedback import FeedbackPrompts
from cai.artifacts import Artifact, read_jsonl, write_jsonl_atomic
from cai.config import model_cfg_for
from cai.errors import ConfigError
from cai.eval.hhh import METHODS, score_items, shuffled, summarise
from cai.generation import build_engine
from cai.inputs import input_fingerprints, load_inputs
from cai.models import count_parameters
from cai.paper_evals import eval_path, load_eval
from cai.results import write_csv, write_rows
from cai.stages.base import GENERATION_RUNTIME, Stage


def run(cfg: DictConfig, inputs: dict[str, Artifact], work_dir: Path) -> dict:
    # 1. The model evaluated and the CoT few-shot prefix of the feedback prompts
    ev = cfg.eval_hhh
    check_settings(cfg)
    methods = [str(m) for m in ev.methods]
    model_cfg = model_cfg_for(cfg, str(ev.model), "eval_hhh.model", inputs)
    constitution, _ = load_inputs(cfg)
    cot_prefix = FeedbackPrompts(constitution).cot_prefix
    engine = build_engine(cfg.generation, model_cfg, cfg.paths.cache_dir)
    parameters = (
        count_parameters(engine.model) if hasattr(engine, "model") else model_cfg.get("params")
    )

    # 2. Each eval's items scored zero-shot (and with CoT), one finished file per eval
    records = []
    for name in [str(e) for e in ev.evals]:
        items = shuffled(load_eval(name, cfg.paths.data_dir), int(cfg.seed))
        if ev.max_items is not None:
            items = items[: int(ev.max_items)]
        done = work_dir / f"items_{name}.jsonl"  # one finished file per eval: resumable
        if done.is_file():
            records += read_jsonl(done)
            continue
        mine = score_items(engine, items, [m for m in methods if m == "zero_shot"])
        cot_methods = [m for m in methods if m != "zero_shot"]
        if cot_methods and name in ev.cot_evals:
            cot_items = items if ev.cot_max_items is None else items[: int(ev.cot_max_items)]
            mine += score_items(
                engine,
                cot_items,
                cot_methods,
                cot_prefix,
                int(ev.cot_samples),
                int(ev.cot_max_tokens),
                float(ev.cot_temperature),
                int(cfg.seed),
            )
        for r in mine:
            r["eval"] = name
        write_jsonl_atomic(done, mine)
        records += mine

    # 3. Accuracy and calibration
    common = {"stage": "eval_hhh", "model": model_cfg.name, "parameters": parameters}
    rows, reliability = summarise(records, common, int(ev.calibration_bins))
    write_rows(work_dir / "rows.csv", rows)
    write_csv(
        work_dir / "calibration.csv",
        reliability,
        ["eval", "method", "low", "high", "n", "confidence", "accuracy"],
    )
    return {
        "model": model_cfg.name,
        "parameters": parameters,
        "accuracy": {
            f"{r['eval']}/{r['method']}": round(r["value"], 4)
            for r in rows
            if r["metric"] == "accuracy"
        },
        "n": {f"{r['eval']}/{r['method']}": r["n"] for r in rows if r["metric"] == "accuracy"},
        "engine": getattr(engine, "stats", {}),
    }


def check_settings(cfg: DictConfig) -> None:
    unknown = {str(m) for m in cfg.eval_hhh.methods} - set(METHODS)
    if unknown:
        raise ConfigError(f"eval_hhh.methods: unknown {sorted(unknown)}; known: {METHODS}.")
    for name in cfg.eval_hhh.evals:
        eval_path(str(name), cfg.paths.data_dir)


def fingerprints(cfg: DictConfig) -> dict:
    """Fingerprints of the eval files read (part of the artifact key)."""
    fingerprints = {}
    for name in cfg.eval_hhh.evals:
        path = eval_path(str(name), cfg.paths.data_dir)
        fingerprints[str(name)] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return fingerprints


STAGE = Stage(
    "eval_hhh",
    run,
    settings=("model", "constitution", "eval_hhh", "generation"),
    runtime=GENERATION_RUNTIME,
    fingerprints=lambda cfg: {**input_fingerprints(cfg), **fingerprints(cfg)},
    check=check_settings,
)
