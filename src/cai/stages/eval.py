"""eval: every model answers held-out prompts, judges compare them pair by pair, Elo ratings
(Bai et al. 2022, sections 3.3-4.5; Figures 2, 3, 5, 8). The helpful model, SL-CAI and each RL
variant's snapshots (`eval.models`, defined in `eval.variants`) answer the held-out red-team and
helpfulness prompts; the judge stage's PMs and the AI-feedback judge compare every pair; a
Bradley-Terry fit gives Elo with SL-CAI at 0 (cai.eval.compare, cai.eval.elo).

An RL variant (RL-CAI with CoT feedback, the Helpful-RLHF and HH-RLHF baselines) is the
pipeline's own stages under the variant's overrides: the runner plans and builds (or reuses)
each one's chain before this stage and passes the artifacts in; eval never builds anything.

Files: samples.jsonl (every answer, with the PM judges' scores), judgements.jsonl (every
pairwise judgement), rows.csv. Resumable per model and per chunk of AI judgements.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cai.artifacts import Artifact, write_jsonl_atomic
from cai.comparisons import answer_turns
from cai.config import model_cfg_for
from cai.errors import ConfigError
from cai.eval.compare import (
    DIMENSION_OF_KIND,
    JUDGES,
    RL_SOURCES,
    SOURCES,
    AIJudge,
    ai_feedback_judgements,
    ai_judge_independence,
    elo_rows,
    eval_prompts,
    model_rows,
    plan_models,
    pm_judgements,
    revision_rows,
    rule_judgements,
    sample_answers,
    self_judged_players,
    validate_ai_judge,
    validate_rule,
    win_rate_rows,
)
from cai.eval.judges import judge_name, load_judges, load_validation
from cai.generation import endpoint_engine
from cai.inputs import input_fingerprints
from cai.labellers import function_fingerprint, load_function
from cai.paper_samples import fingerprint as paper_samples_fingerprint
from cai.results import write_rows
from cai.stages.base import ENDPOINT_RUNTIME, GENERATION_RUNTIME, Stage, variant_inputs

log = logging.getLogger(__name__)


def run(cfg: DictConfig, inputs: dict[str, Artifact], work_dir: Path) -> dict:
    check_settings(cfg)
    node = cfg.eval
    # 1. The models compared: the helpful model, SL-CAI, every RL variant's snapshots (built
    # before this stage by the runner, passed in as "<variant>:<stage>"), extra models
    variants = {
        name: (vcfg, variant_inputs(inputs, name)) for name, (vcfg, _) in rl_variants(cfg).items()
    }
    points, players = plan_models(cfg, inputs, variants)

    # 2. Every model answers the held-out prompts (T = 1, the same seed per prompt)
    prompts = eval_prompts(cfg)
    log.info("eval: %d models (%d distinct), %d prompts", len(points), len(players), len(prompts))
    samples = sample_answers(cfg, players, prompts, work_dir)

    # 3. PM judges score every answer; their pairwise judgements cover their own dimension
    scores: dict[str, list[float]] = {}
    judgements: list[dict] = []
    pm_judges = load_judges(inputs["judge"]) if "pm" in node.judges else {}
    judge_trust = load_validation(inputs["judge"])
    validation = {name: judge_trust.get(name, {}) for name in map(judge_name, pm_judges)}
    dialogues = [answer_turns(s["prompt"], s["answer"]) for s in samples]
    for dimension, judge in pm_judges.items():
        name = judge_name(dimension)
        scores[name] = judge.score(dialogues, progress=True)
        kind = next(k for k, d in DIMENSION_OF_KIND.items() if d == dimension)
        judgements += pm_judgements(samples, scores[name], name, kind)
    # every answer with its PM judges' scores: a joint Elo fit across runs (cai.eval.joint)
    # compares answers of different runs to the same prompt by these scores
    samples = [s | {"scores": {n: v[i] for n, v in scores.items()}} for i, s in enumerate(samples)]
    write_jsonl_atomic(work_dir / "samples.jsonl", samples)
    trust = {name: judge_trust.get(name, {"flag": "unvalidated"}) | {"independent": True}
             for name in scores}  # fmt: skip

    # 4. The AI-feedback judge on a seeded subset of the pairs, validated and its independence
    # from the training PM recorded
    rows = []
    if "ai_feedback" in node.judges:
        ai_judge = AIJudge(cfg, inputs)
        judgements += ai_feedback_judgements(cfg, samples, ai_judge, work_dir)
        validation_rows, ai_validation = validate_ai_judge(cfg, ai_judge)
        independence = ai_judge_independence(cfg, inputs)
        rows += [r | {"independent": independence["independent"]} for r in validation_rows]
        # offline the AI judge is the helpful model itself: those rows are a model judging itself
        self_judged = self_judged_players(ai_judge.model_cfg, players)
        trust["ai_feedback"] = {
            "flag": ai_validation.get("flag", ""),
            **independence,
            "self_judged": self_judged,
        }
        validation["ai_feedback"] = ai_validation | independence | {"self_judged": self_judged}
    # the rule judge (eval.rule) on every pair: in experiment=signal_check the rule that
    # labelled the PM, the known ground truth (its rows say independent=false)
    if "rule" in node.judges:
        judgements += rule_judgements(str(node.rule), samples)
        validation_rows, rule_validation = validate_rule(cfg)
        rows += validation_rows
        trust["rule"] = {
            "flag": rule_validation.get("flag", ""),
            "independent": rule_validation["independent"],
        }
        validation["rule"] = rule_validation
    if not judgements:
        raise ConfigError(
            "eval: no judgements were made. The PM judges need their data (paths.data_dir); "
            "or add ai_feedback to eval.judges."
        )

    # 5. Elo per judge and dimension (Bradley-Terry, bootstrap intervals), per-model measures,
    # PM scores of the revisions (Figure 5)
    write_jsonl_atomic(work_dir / "judgements.jsonl", judgements)
    rows += elo_rows(cfg, points, judgements, trust)
    rows += win_rate_rows(cfg, points, judgements, trust)
    rows += model_rows(cfg, points, samples, scores, trust)
    rows += revision_rows(cfg, inputs["generate_sl"], pm_judges, trust) if pm_judges else []
    write_rows(work_dir / "rows.csv", rows)
    for folder in ("sample_parts", "judge_parts"):
        shutil.rmtree(work_dir / folder, ignore_errors=True)
    elo = {
        f"{r['judge']}/{r['eval']}/{r['method']}"
        + (f"@{r['rl_sequences']}" if r["rl_sequences"] is not None else ""): round(r["value"], 1)
        for r in rows
        if r["metric"] == "elo"
    }
    return {
        "models": [p.__dict__ for p in points],
        "players": list(players),
        "prompts": {k: sum(p.kind == k for p in prompts) for k in DIMENSION_OF_KIND},
        "samples": len(samples),
        "judgements": {
            j: sum(x["judge"] == j for x in judgements) for j in {x["judge"] for x in judgements}
        },
        "pm_judges": sorted(scores),
        "judge_key": inputs["judge"].key,
        "validation": validation,
        "elo": elo,
    }


def rl_variants(cfg: DictConfig) -> dict[str, tuple[DictConfig, str]]:
    """{name: (config with its overrides, its last stage: ppo or dpo)} of every RL variant in
    eval.models."""
    return {
        name: (variant_config(cfg, cfg.eval.variants[name].get("overrides")), source)
        for name in cfg.eval.models
        if (source := cfg.eval.variants[name].source) in RL_SOURCES
    }


def variant_config(cfg: DictConfig, overrides) -> DictConfig:
    """`cfg` with a variant's overrides (`key=value` strings, Hydra's syntax) applied."""
    overrides = list(overrides or [])
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"eval variant override {item!r}: write key=value.")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides)) if overrides else cfg


def check_settings(cfg: DictConfig) -> None:
    node = cfg.eval
    variants = node.variants
    for name in node.models:
        if name not in variants:
            raise ConfigError(
                f"eval.models names {name!r}, which eval.variants does not define. Defined: "
                f"{', '.join(variants)}."
            )
        if variants[name].source not in SOURCES:
            raise ConfigError(
                f"eval.variants.{name}.source={variants[name].source!r}: use {', '.join(SOURCES)}."
            )
        variant_config(cfg, variants[name].get("overrides"))
    if node.anchor not in node.models:
        raise ConfigError(
            f"eval.anchor={node.anchor!r} (the model at Elo 0) is not in eval.models="
            f"{list(node.models)}."
        )
    unknown = set(node.judges) - set(JUDGES)
    if unknown or not node.judges:
        raise ConfigError(f"eval.judges={list(node.judges)}: choose from {', '.join(JUDGES)}.")
    if "rule" in node.judges:
        if not node.get("rule"):
            raise ConfigError(
                "eval.judges includes rule but eval.rule is not set: name the function, e.g. "
                "eval.rule=cai.labellers:signal_rule."
            )
        load_function(str(node.rule), "eval.rule")
    if int(node.samples_per_prompt) < 1:
        raise ConfigError("eval.samples_per_prompt must be >= 1.")
    if "ai_feedback" in node.judges and str(node.ai_feedback.model) == "http":
        endpoint_engine(node.ai_feedback.endpoint, "eval.ai_feedback.endpoint")  # url, api key
    for name, where in (node.get("extra_models") or {}).items():  # before any work
        if str(where) not in ("policy", "sft"):
            model_cfg_for(cfg, str(where), f"eval.extra_models.{name}", {})


def unused_settings(cfg: DictConfig) -> tuple[str, ...]:
    """The endpoints of labellers that are not served (an in-process model or a function), and
    eval.rule when it is not set."""
    unused = [] if cfg.eval.get("rule") else ["eval.rule"]
    if str(cfg.eval.ai_feedback.model) != "http":
        unused.append("eval.ai_feedback.endpoint")
    if str(cfg.feedback.model) != "http" or cfg.feedback.function:
        unused += ["feedback.endpoint.url", "feedback.endpoint.model"]
    return tuple(unused)


def fingerprints(cfg: DictConfig) -> dict:
    """Fingerprints of the prompts, constitution and paper samples read, and of the rule
    judge's file (part of the key; the runner adds the keys of the RL variants' artifacts)."""
    rule = cfg.eval.get("rule")
    return {
        **input_fingerprints(cfg),
        "paper_samples": paper_samples_fingerprint(cfg.paths.data_dir),
        **({"rule": function_fingerprint(str(rule), "eval.rule")} if rule else {}),
    }


STAGE = Stage(
    "eval",
    run,
    settings=(
        "model",
        "data",
        "constitution",
        "eval",
        "sft.num_revisions",
        "generation",
        "feedback.model",  # the AI judge's independence is recorded in its rows
        "feedback.endpoint.url",
        "feedback.endpoint.model",
        "feedback.function",
        "feedback.helpfulness_principle",
    ),
    version=3,  # 3: judges validated beside the trivial rules; 2: ended_rate, win_rate_vs_anchor
    upstream=("generate_sl", "sft", "judge"),
    runtime=(
        "eval.ai_feedback.chunk_size",
        *GENERATION_RUNTIME,
        *(f"eval.ai_feedback.endpoint.{k}" for k in ENDPOINT_RUNTIME),
    ),
    fingerprints=fingerprints,
    check=check_settings,
    inert=unused_settings,
    variants=rl_variants,
)
