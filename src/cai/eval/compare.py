"""eval: every model answers held-out prompts, judges compare them pair by pair, Elo ratings.

Bai et al. 2022, sections 3.3-4.5: crowdworkers compared the answers of two models to the same
prompt (harmlessness on red-team prompts, helpfulness on helpfulness prompts) and the
comparisons became Elo scores with SL-CAI 52B at 0 (Figures 2, 3, 8); PM scores of the
revisions per revision number give Figure 5. Offline we replace crowdworkers by two judges,
both kept apart from the PM that PPO optimised (optimising and judging with one model would
hide Goodharting):
- `pm_harmlessness` / `pm_helpfulness`: preference models trained on human hh-rlhf comparisons
  (the `judge` stage); a pair's judgement is sigmoid(r_A - r_B);
- `ai_feedback`: the feedback model's multiple-choice question with the constitution's
  principles (helpfulness question on helpfulness prompts), both orders averaged.

Models compared (`eval.models`, defined in `eval.variants`): the helpful model, SL-CAI, each RL
run's snapshots (RL-CAI, RL-CAI with CoT feedback, the Helpful-RLHF and HH-RLHF baselines: PPO
from the helpful model against the `pm.harmlessness=none` / `human` PMs) and any extra model.
An RL variant's upstream artifacts are built here (or reused) from the config with the variant's
overrides, so `pipeline.stages=[..., eval]` is all it takes.

Files: samples.jsonl (every answer), judgements.jsonl (every pairwise judgement), rows.csv.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from cai.ai_feedback import FeedbackPrompts, LabelSettings, label_comparisons
from cai.artifacts import Artifact, PartWriter, read_jsonl
from cai.comparisons import Comparison, answer_turns
from cai.config import model_cfg_for
from cai.errors import ConfigError
from cai.eval.elo import Comparisons, bootstrap_elo
from cai.eval.judges import judge_name
from cai.eval.validation import validate_pairwise, validation_settings
from cai.generation import Request, build_engine, endpoint_engine, engine_tokenizer, request_seed
from cai.inputs import load_inputs
from cai.labellers import label_with_function, load_function
from cai.memory import release_freed_memory
from cai.paper_samples import load_answers
from cai.prompting import answer_prompt
from cai.results import boilerplate_rate, mean_interval, refusal_rate, row, wilson_interval

log = logging.getLogger(__name__)

RL_SOURCES = ("ppo", "dpo")  # RL-CAI by PPO against a PM, or by DPO on the same labels
SOURCES = ("policy", "sft", *RL_SOURCES)
JUDGES = ("pm", "ai_feedback", "rule")
DIMENSION_OF_KIND = {"red_team": "harmlessness", "helpful": "helpfulness"}  # paper, 3.3


# ---------------------------------------------------------------------------------------------
# 1. Which models: series (a line in a figure) made of points (one set of weights each)


@dataclass(frozen=True)
class Point:
    """One model in one series: e.g. series rl_cai after 32 RL sequences."""

    series: str
    player: str  # the weights that answer (shared: rl_cai at 0 sequences is SL-CAI)
    rl_sequences: int | None = None
    revisions: int | None = None
    cot: bool | None = None


def weights_id(model_cfg: DictConfig) -> str:
    """What names a set of weights: its folder, or `<preset name>` for a preset."""
    return str(model_cfg.get("path") or f"<{model_cfg.name}>")


def self_judged_players(judge_model: DictConfig, players: dict[str, DictConfig]) -> list[str]:
    """The players whose weights are the judge's own: offline, the AI-feedback judge is the
    helpful model itself (eval.ai_feedback.model=policy), so its judgements of that model are a
    model judging its own answers. Their rows are flagged `self_judged`."""
    return [
        name
        for name, model_cfg in players.items()
        if weights_id(model_cfg) == weights_id(judge_model)
    ]


def plan_models(
    cfg: DictConfig,
    inputs: dict[str, Artifact],
    variants: dict[str, tuple[DictConfig, dict[str, Artifact]]],
) -> tuple[list[Point], dict[str, DictConfig]]:
    """The points to compare and {player: model config}. `inputs`: the eval stage's own
    upstream artifacts (sft); `variants`: each RL variant's config and finished artifacts
    ({stage: artifact}, ppo and the sft it started from)."""
    players: dict[str, DictConfig] = {}
    names: dict[str, str] = {}  # model folder -> player name (one player per set of weights)

    def player(name: str, model_cfg: DictConfig) -> str:
        folder = weights_id(model_cfg)
        if folder not in names:
            names[folder] = name
            players[name] = model_cfg
        return names[folder]

    def sl_model(artifacts) -> DictConfig:
        return model_cfg_for(cfg, "sft", "eval", artifacts)

    points = []
    revisions = int(cfg.sft.num_revisions)
    for name in cfg.eval.models:
        variant = cfg.eval.variants[name]
        if variant.source == "policy":
            points.append(Point(name, player(name, cfg.model)))
        elif variant.source == "sft":
            points.append(Point(name, player(name, sl_model(inputs)), revisions=revisions))
        else:
            vcfg, artifacts = variants[name]
            rl = artifacts[variant.source]  # ppo, or dpo (rl_sequences: training pairs seen)
            init = str(vcfg[variant.source].init)
            start = model_cfg_for(vcfg, init, f"{variant.source}.init", artifacts)
            common = {
                "revisions": int(vcfg.sft.num_revisions) if init == "sft" else None,
                "cot": bool(vcfg.feedback.cot),
            }
            points.append(Point(name, player(f"{name}@0", start), rl_sequences=0, **common))
            snapshots = [(int(s.split("_")[1]), rl.path / "snapshots" / s) for s in _listed(rl)]
            final = int(rl.manifest["metrics"].get("sequences", 0))
            if not snapshots or snapshots[-1][0] < final:
                snapshots.append((final, rl.path / "model"))
            if not cfg.eval.snapshots:
                snapshots = snapshots[-1:]
            for sequences, folder in snapshots:
                model = OmegaConf.merge(cfg.model, {"path": str(folder)})
                points.append(
                    Point(name, player(f"{name}@{sequences}", model), sequences, **common)
                )
    for name, where in (cfg.eval.get("extra_models") or {}).items():
        points.append(Point(name, player(name, model_cfg_for(cfg, str(where), name, inputs))))
    return points, players


def _listed(ppo: Artifact) -> list[str]:
    return json.loads(ppo.file("snapshots.json").read_text())


# ---------------------------------------------------------------------------------------------
# 2. Samples: every player answers every held-out prompt (T = 1)


def eval_prompts(cfg: DictConfig):
    """The held-out (eval split) red-team and helpfulness prompts, capped per kind."""
    _, prompt_set = load_inputs(cfg)
    held_out = prompt_set.split("eval")
    red = held_out.red_team[: cfg.eval.max_red_team]
    helpful = held_out.helpful[: cfg.eval.max_helpful]
    if not red and not helpful:
        raise ConfigError("No held-out prompts to evaluate on: check data.eval_percent.")
    return red + helpful


def sample_answers(cfg: DictConfig, players: dict[str, DictConfig], prompts, work_dir: Path):
    """samples.jsonl records, one per (player, prompt, sample); resumable per player."""
    node = cfg.eval
    parts = PartWriter(work_dir / "sample_parts")
    for index, (name, model_cfg) in enumerate(tqdm(players.items(), desc="eval models")):
        if parts.done(index):
            continue
        engine = build_engine(cfg.generation, model_cfg, cfg.paths.cache_dir)
        tokenizer = engine_tokenizer(engine, model_cfg, cfg.paths.cache_dir)
        jobs = [(p, k) for p in prompts for k in range(int(node.samples_per_prompt))]
        requests = [
            Request(
                answer_prompt(tokenizer, p.text, cfg.model.prompt_format),
                max_new_tokens=int(node.max_new_tokens),
                temperature=float(node.temperature),
                seed=request_seed(cfg.seed, "eval", p.id, k),  # same seed for every model
            )
            for p, k in jobs
        ]
        answers = engine.generate(requests, desc=f"eval answers {name}")
        parts.write(
            index,
            [
                {
                    "player": name,
                    "prompt_id": p.id,
                    "kind": p.kind,
                    "prompt": p.text,
                    "sample": k,
                    "answer": a.text,
                    "tokens": a.num_tokens,
                    "finish": a.finish_reason,
                }
                for (p, k), a in zip(jobs, answers, strict=True)
            ],
        )
        del engine
        release_freed_memory()  # one model's weights and caches at a time
    return parts.read_all()


# ---------------------------------------------------------------------------------------------
# 3. Judgements: every pair of players on the same prompt and sample


def pair_keys(samples: list[dict]) -> list[tuple[str, str, int, str, str]]:
    """(kind, prompt_id, sample, player_a, player_b) for every pair of players, a before b in
    the order players first appear."""
    order = list(dict.fromkeys(s["player"] for s in samples))
    prompts = list(dict.fromkeys((s["kind"], s["prompt_id"], s["sample"]) for s in samples))
    return [
        (kind, pid, k, a, b)
        for kind, pid, k in prompts
        for a, b in itertools.combinations(order, 2)
    ]


def pm_judgements(samples: list[dict], scores: list[float], judge: str, kind: str) -> list[dict]:
    """PM judgements of prompts of `kind`: p(A better) = sigmoid(r_A - r_B)."""
    by_key = {
        (s["prompt_id"], s["sample"], s["player"]): r for s, r in zip(samples, scores, strict=True)
    }
    out = []
    for k, pid, sample, a, b in pair_keys(samples):
        if k != kind:
            continue
        margin = by_key[(pid, sample, a)] - by_key[(pid, sample, b)]
        p_a = 1.0 / (1.0 + math.exp(-margin))
        out.append(_judgement(judge, kind, pid, sample, a, b, p_a))
    return out


def _judgement(judge, kind, prompt_id, sample, a, b, p_a) -> dict:
    return {
        "judge": judge,
        "dimension": DIMENSION_OF_KIND[kind],
        "prompt_id": prompt_id,
        "sample": sample,
        "player_a": a,
        "player_b": b,
        "p_a": p_a,
    }


class AIJudge:
    """The AI-feedback judge: the model `eval.ai_feedback.model` asking the constitution's
    evaluation principles (disjoint from the feedback principles that labelled the PM) and the
    evaluation helpfulness question, both answer orders averaged. `label(comparisons)` gives the
    feedback stage's label records; the model loads once, on first use."""

    def __init__(self, cfg: DictConfig, upstream: dict[str, Artifact]):
        node = cfg.eval.ai_feedback
        self.cfg = cfg
        self.served = str(node.model) == "http"  # eval.ai_feedback.endpoint
        self.model_cfg = labeller_model(
            cfg, str(node.model), node.endpoint, "eval.ai_feedback.model", upstream
        )
        self.prompts = ai_judge_prompts(cfg)
        self.settings = LabelSettings(num_principles=int(node.num_principles), swap=bool(node.swap))
        self._engine = None

    def label(self, comparisons: list) -> list[dict]:
        if self._engine is None:
            cfg = self.cfg
            self._engine = (
                endpoint_engine(
                    cfg.eval.ai_feedback.endpoint,
                    "eval.ai_feedback.endpoint",
                    bool(cfg.generation.progress),
                )
                if self.served
                else build_engine(cfg.generation, self.model_cfg, cfg.paths.cache_dir)
            )
        return label_comparisons(
            self._engine, self.prompts, comparisons, self.settings, int(self.cfg.seed)
        )


def labeller_model(
    cfg: DictConfig, choice: str, endpoint: DictConfig, setting: str, upstream: dict
) -> DictConfig:
    """The model a labeller setting (feedback.model, eval.ai_feedback.model) names, as
    model_cfg_for reads it; for `http`, what the rows record of the served model: its name and
    the URL."""
    if choice != "http":
        return model_cfg_for(cfg, choice, setting, upstream)
    return OmegaConf.create(
        {"name": str(endpoint.get("model") or "served"), "path": str(endpoint.get("url"))}
    )


def pair_comparisons(samples: list[dict], keys: list[tuple]) -> list[Comparison]:
    """The two players' answers to one prompt and sample, per pair key (pair_keys), as a
    comparison for a pairwise judge."""
    answers = {(s["prompt_id"], s["sample"], s["player"]): s for s in samples}
    return [
        Comparison.of_answers(
            f"eval/{pid}/{k}/{a}/{b}",
            answers[(pid, k, a)]["prompt"],
            (answers[(pid, k, a)]["answer"], answers[(pid, k, b)]["answer"]),
            kind,
        )
        for kind, pid, k, a, b in keys
    ]


def ai_feedback_judgements(
    cfg: DictConfig, samples: list[dict], judge: AIJudge, work_dir: Path
) -> list[dict]:
    """The AI feedback judge's judgement of a seeded subset of the pairs (at most
    eval.ai_feedback.max_comparisons per kind), both answer orders averaged."""
    node = cfg.eval.ai_feedback
    keys = pair_keys(samples)
    chosen = []
    for kind in DIMENSION_OF_KIND:
        of_kind = [key for key in keys if key[0] == kind]
        limit = node.max_comparisons
        if limit is not None and len(of_kind) > int(limit):
            of_kind = random.Random(f"{cfg.seed}/eval-ai-judge/{kind}").sample(of_kind, int(limit))
        chosen += sorted(of_kind)
    comparisons = pair_comparisons(samples, chosen)
    if not comparisons:
        return []
    parts = PartWriter(work_dir / "judge_parts")
    chunk = int(node.chunk_size)
    for start in tqdm(range(0, len(comparisons), chunk), desc="ai judge chunks", unit="chunk"):
        if parts.done(start // chunk):
            continue
        labels = judge.label(comparisons[start : start + chunk])
        parts.write(
            start // chunk,
            [
                _judgement("ai_feedback", kind, pid, k, a, b, label["p_a"])
                | {"principles": label["principles"], "position_bias": label["position_bias"]}
                for (kind, pid, k, a, b), label in zip(
                    chosen[start : start + chunk], labels, strict=True
                )
            ],
        )
    return parts.read_all()


def rule_judgements(rule_path: str, samples: list[dict]) -> list[dict]:
    """The rule judge (eval.rule, a function as feedback.function takes) on every pair of
    players, both answer orders averaged; red-team prompts judged as harmlessness, helpfulness
    prompts as helpfulness."""
    fn = load_function(rule_path, "eval.rule")
    keys = pair_keys(samples)
    labels = label_with_function(fn, pair_comparisons(samples, keys), True, "eval.rule")
    return [
        _judgement("rule", kind, pid, k, a, b, label["p_a"])
        for (kind, pid, k, a, b), label in zip(keys, labels, strict=True)
    ]


def validate_rule(cfg: DictConfig) -> tuple[list[dict], dict]:
    """The rule judge's agreement with the paper's PM on held-out PALMS prompts (rows, summary),
    and whether it is the rule that labelled the PM (then it is not independent: a known-signal
    check's ground truth, experiment=signal_check)."""
    path = str(cfg.eval.rule)
    fn = load_function(path, "eval.rule")
    same = str(cfg.feedback.function or "") == path
    independence = {"independent": not same, "same_rule_as_feedback": same, "labeller": path}
    try:
        answers = load_answers(cfg.paths.data_dir, "test")
    except ConfigError as error:
        log.warning("The rule judge is not validated: %s", error)
        return [], {"flag": "unvalidated", "reason": str(error), **independence}

    def p_a(pairs):
        comparisons = [
            Comparison.of_answers(f"palms/{i}", p, (a, b)) for i, (p, a, b) in enumerate(pairs)
        ]
        return [r["p_a"] for r in label_with_function(fn, comparisons, True, "eval.rule")]

    common = {"stage": "eval", "model": path, "parameters": ""}
    rows, summary = validate_pairwise("rule", p_a, answers, validation_settings(cfg), common)
    return [r | {"independent": not same} for r in rows], summary | independence


def ai_judge_prompts(cfg: DictConfig):
    """The AI-feedback judge's questions: the constitution's evaluation principles (disjoint
    from the feedback principles that labelled the PM) and the evaluation helpfulness question."""
    constitution, _ = load_inputs(cfg)
    return FeedbackPrompts(
        constitution,
        str(cfg.eval.ai_feedback.helpfulness_principle),
        seed=int(cfg.seed),
        principles=constitution.evaluation,
    )


def ai_judge_independence(cfg: DictConfig, upstream: dict[str, Artifact]) -> dict:
    """Whether the AI-feedback judge is independent of the PM that trained the RL models it
    judges: no shared principles, a different helpfulness question, a different model. A PM
    labelled by a function (feedback.function) shares none of them with the judge."""
    if cfg.feedback.function:
        return {"independent": True, "same_model_as_feedback": False, "shared_principles": 0,
                "same_helpfulness_question": False, "labeller": cfg.feedback.function}  # fmt: skip
    constitution, _ = load_inputs(cfg)
    node = cfg.eval.ai_feedback

    def model_of(choice: str, endpoint: DictConfig, setting: str) -> tuple:
        m = labeller_model(cfg, choice, endpoint, setting, upstream)
        return (str(m.get("name")), str(m.get("path") or ""))

    same_model = model_of(str(node.model), node.endpoint, "eval.ai_feedback.model") == model_of(
        str(cfg.feedback.model), cfg.feedback.endpoint, "feedback.model"
    )
    shared = sorted(set(constitution.evaluation) & set(constitution.feedback))
    same_question = str(node.helpfulness_principle) == str(cfg.feedback.helpfulness_principle)
    return {
        "independent": not (same_model or shared or same_question),
        "same_model_as_feedback": same_model,
        "shared_principles": len(shared),
        "same_helpfulness_question": same_question,
    }


def validate_ai_judge(cfg: DictConfig, judge: AIJudge):
    """The AI-feedback judge's agreement with the paper's PM on held-out PALMS prompts (rows,
    summary); without the paper's samples, a warning and an `unvalidated` summary."""
    try:
        answers = load_answers(cfg.paths.data_dir, "test")
    except ConfigError as error:
        log.warning("The AI-feedback judge is not validated: %s", error)
        return [], {"flag": "unvalidated", "reason": str(error)}

    def p_a(pairs):
        comparisons = [
            Comparison.of_answers(f"palms/{i}", p, (a, b)) for i, (p, a, b) in enumerate(pairs)
        ]
        return [label["p_a"] for label in judge.label(comparisons)]

    model = judge.model_cfg
    common = {"stage": "eval", "model": model.name, "parameters": model.get("params", "")}
    return validate_pairwise("ai_feedback", p_a, answers, validation_settings(cfg), common)


# ---------------------------------------------------------------------------------------------
# 4. Per-model measures: refusals, boilerplate, PM scores


def point_row(cfg: DictConfig, point: Point, **fields) -> dict:
    """A result row about one point (model) of a series."""
    return row(
        stage="eval",
        model=cfg.model.name,
        parameters=cfg.model.get("params", ""),
        method=point.series,
        revisions=point.revisions,
        cot=point.cot,
        rl_sequences=point.rl_sequences,
        **fields,
    )


def never_loses(player: str, judgements: list[dict]) -> bool:
    """True when every judgement of `player` favours it (p > 1/2 for it). With hard 0/1
    judgements its maximum-likelihood rating would be infinite, and the fit's prior sets it;
    with soft judgements (a PM's sigmoid, the AI judge's probabilities) the fit is finite, but
    the player won every comparison it was in, so its rating is bounded by the judge's
    confidence, not by any loss: flagged either way."""
    mine = [j for j in judgements if player in (j["player_a"], j["player_b"])]
    return bool(mine) and all(
        (j["p_a"] > 0.5) if j["player_a"] == player else (j["p_a"] < 0.5) for j in mine
    )


def elo_rows(
    cfg: DictConfig, points: list[Point], judgements: list[dict], trust: dict | None = None
) -> list[dict]:
    """Elo per point, per (judge, dimension): Bradley-Terry over all of that judge's pairwise
    judgements, the anchor (eval.anchor, SL-CAI) at 0, 95% bootstrap interval over prompts.

    `trust`: {judge: {"flag": .., "independent": .., "self_judged": [players]}}: each row carries
    its judge's validation flag (at_chance, below_chance, not_above_<rule>, unvalidated) and
    independence; a player that never loses a judgement is flagged never_loses (`never_loses`
    says what that means for hard and soft judgements); a player whose weights are the judge's
    own is flagged self_judged."""
    trust = trust or {}
    players = list(dict.fromkeys(p.player for p in points))
    index = {name: i for i, name in enumerate(players)}
    anchor = next(p.player for p in points if p.series == cfg.eval.anchor)
    rows = []
    for judge, dimension in sorted({(j["judge"], j["dimension"]) for j in judgements}):
        these = [j for j in judgements if j["judge"] == judge and j["dimension"] == dimension]
        group = {pid: g for g, pid in enumerate(sorted({j["prompt_id"] for j in these}))}
        comparisons = Comparisons.from_records(
            [
                (index[j["player_a"]], index[j["player_b"]], j["p_a"], group[j["prompt_id"]])
                for j in these
            ]
        )
        elo, low, high = bootstrap_elo(
            comparisons, len(players), index[anchor], int(cfg.eval.bootstrap), int(cfg.seed)
        )
        judged_by = trust.get(judge, {})
        for point in points:
            i = index[point.player]
            n = sum(point.player in (j["player_a"], j["player_b"]) for j in these)
            if n == 0 and point.player != anchor:  # never judged: no rating to report
                continue
            flags = [judged_by.get("flag", "")]
            if n and never_loses(point.player, these):
                flags.append("never_loses")
            if point.player in judged_by.get("self_judged", ()):
                flags.append("self_judged")
            rows.append(
                point_row(
                    cfg,
                    point,
                    eval=dimension,
                    judge=judge,
                    metric="elo",
                    value=float(elo[i]),
                    low=float(low[i]),
                    high=float(high[i]),
                    n=n,
                    flag=";".join(f for f in flags if f),
                    independent=judged_by.get("independent", ""),
                )
            )
    return rows


def win_rate_rows(
    cfg: DictConfig, points: list[Point], judgements: list[dict], trust: dict | None = None
) -> list[dict]:
    """Per point and (judge, dimension): the mean probability that its answer beats the
    anchor's (eval.anchor, SL-CAI) to the same prompt, with a normal 95% interval over the
    judged prompts: how often a judge prefers a model to where it started."""
    anchor = next(p.player for p in points if p.series == cfg.eval.anchor)
    rows = []
    for judge, dimension in sorted({(j["judge"], j["dimension"]) for j in judgements}):
        these = [j for j in judgements if j["judge"] == judge and j["dimension"] == dimension]
        for point in points:
            wins = [
                j["p_a"] if j["player_a"] == point.player else 1.0 - j["p_a"]
                for j in these
                if {j["player_a"], j["player_b"]} == {point.player, anchor}
            ]
            if point.player == anchor or not wins:
                continue
            mean, low, high = mean_interval(wins)
            fields = trust_fields(trust, judge)
            if point.player in (trust or {}).get(judge, {}).get("self_judged", ()):
                fields["flag"] = ";".join(f for f in (fields["flag"], "self_judged") if f)
            rows.append(
                point_row(
                    cfg, point, eval=dimension, judge=judge, metric="win_rate_vs_anchor",
                    value=mean, low=low, high=high, n=len(wins), **fields,
                )
            )  # fmt: skip
    return rows


def model_rows(
    cfg: DictConfig,
    points: list[Point],
    samples: list[dict],
    scores: dict[str, list[float]],
    trust: dict | None = None,
) -> list[dict]:
    """Per point and prompt kind: mean PM score per judge (and their sum, the HH score, as in
    Figure 5), refusal or evasion rate, boilerplate rate, answer length."""
    scores = with_hh_score(scores)
    rows = []
    for point in points:
        for kind in DIMENSION_OF_KIND:
            mine = [
                i
                for i, s in enumerate(samples)
                if s["player"] == point.player and s["kind"] == kind
            ]
            if not mine:
                continue
            answers = [samples[i]["answer"] for i in mine]
            for metric, rate_of in (
                ("refusal_rate", refusal_rate),
                ("boilerplate_rate", boilerplate_rate),
            ):
                rate = rate_of(answers)
                low, high = wilson_interval(rate * len(mine), len(mine))
                rows.append(
                    point_row(
                        cfg,
                        point,
                        eval=kind,
                        metric=metric,
                        value=rate,
                        low=low,
                        high=high,
                        n=len(mine),
                    )
                )
            ended = sum(samples[i].get("finish", "stop") == "stop" for i in mine) / len(mine)
            low, high = wilson_interval(ended * len(mine), len(mine))
            rows.append(
                point_row(
                    cfg, point, eval=kind, metric="ended_rate", value=ended, low=low, high=high,
                    n=len(mine),
                )  # answers that ended before eval.max_new_tokens (not cut off)
            )  # fmt: skip
            tokens = mean_interval([float(samples[i]["tokens"]) for i in mine])
            rows.append(
                point_row(
                    cfg,
                    point,
                    eval=kind,
                    metric="answer_tokens",
                    value=tokens[0],
                    low=tokens[1],
                    high=tokens[2],
                    n=len(mine),
                )
            )
            for judge, values in scores.items():
                mean, low, high = mean_interval([values[i] for i in mine])
                rows.append(
                    point_row(
                        cfg,
                        point,
                        eval=kind,
                        judge=judge,
                        metric="pm_score",
                        value=mean,
                        low=low,
                        high=high,
                        n=len(mine),
                        **trust_fields(trust, judge),
                    )
                )
    return rows


def trust_fields(trust: dict | None, judge: str) -> dict:
    """The `flag` and `independent` fields of a row judged by `judge` (pm_hh: by both PMs)."""
    trust = trust or {}
    parts = ("pm_harmlessness", "pm_helpfulness") if judge == "pm_hh" else (judge,)
    flags = sorted({trust.get(p, {}).get("flag", "") for p in parts} - {""})
    independent = [trust.get(p, {}).get("independent", "") for p in parts]
    return {
        "flag": ";".join(flags),
        "independent": all(independent) if "" not in independent else "",
    }


def with_hh_score(scores: dict[str, list[float]]) -> dict[str, list[float]]:
    """Add `pm_hh` = harmlessness + helpfulness PM score per answer when both judges exist."""
    parts = ("pm_harmlessness", "pm_helpfulness")
    if all(p in scores for p in parts):
        scores = {
            **scores,
            "pm_hh": [a + b for a, b in zip(*(scores[p] for p in parts), strict=True)],
        }
    return scores


def revision_method(sl: DictConfig) -> str:
    """The method name of revision rows: sl_revision for the paper's default (critique, every
    principle); _direct without critiques (Figure 7); _p<k> with the first k principles
    (Figure 6); _ids with an explicit principle list."""
    name = "sl_revision" if sl.critique else "sl_revision_direct"
    if sl.get("principle_ids"):
        return f"{name}_ids"
    return f"{name}_p{int(sl.num_principles)}" if sl.get("num_principles") else name


def revision_rows(
    cfg: DictConfig, sl_artifact: Artifact, pm_judges: dict, trust: dict | None = None
) -> list[dict]:
    """Figure 5: mean PM score of the initial answer (0) and of each revision n of the SL data's
    red-team prompts (the first eval.max_revision_prompts), per judge and for their sum."""
    records = read_jsonl(sl_artifact.file("red_team.jsonl"))[: cfg.eval.max_revision_prompts]
    if not records:
        return []
    rounds = min(len(r["revisions"]) for r in records)
    texts = [
        (n, r["prompt"], r["initial"] if n == 0 else r["revisions"][n - 1]["revision"])
        for r in records
        for n in range(rounds + 1)
    ]
    scores = {
        judge_name(d): pm.score([answer_turns(p, t) for _, p, t in texts], progress=True)
        for d, pm in pm_judges.items()
    }
    rows = []
    for judge, values in with_hh_score(scores).items():
        for n in range(rounds + 1):
            mean, low, high = mean_interval(
                [v for (m, _, _), v in zip(texts, values, strict=True) if m == n]
            )
            point = Point(revision_method(cfg.sl), "sl_data", revisions=n)
            rows.append(
                point_row(
                    cfg,
                    point,
                    eval="red_team_sl",
                    judge=judge,
                    metric="pm_score",
                    value=mean,
                    low=low,
                    high=high,
                    n=len(records),
                    **trust_fields(trust, judge),
                )
            )
    return rows
