"""judge: the evaluation preference models, trained on the paper's PM labels and/or human
comparisons and kept apart from the PM that PPO optimised (the paper's judges were
crowdworkers, Bai et al. 2022, section 3.3).

One judge per dimension: harmlessness (`judge.harmlessness`: hh-rlhf harmless-base comparisons
of split `judge_train`; `paper_pm`: pairs of the paper's released answers on train-split PALMS
prompts, labelled by the paper's own PM; or both, `paper_pm+harmless-base`) and helpfulness
(helpful-base). Each judge reports its held-out accuracy (hh-rlhf `judge_test`, HHH) and its
validation against the paper's PM on the test-split PALMS prompts (cai.eval.validation). Data
that a configured judge needs and cannot find is an error, never an empty judge.

Files: <dimension>/model/ (one PM per dimension), judges.json (which), validation.json,
rows.csv.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cai.artifacts import Artifact, write_json_atomic
from cai.comparisons import Comparison, answer_turns, human_comparisons
from cai.config import model_cfg_for
from cai.data import hh_rlhf_comparisons, hh_rlhf_fingerprint, hh_split_rule
from cai.errors import ConfigError
from cai.eval.judges import DIMENSIONS, judge_name
from cai.eval.validation import length_matched, validate_pm
from cai.models import count_parameters
from cai.modules.pm import train_preference_model
from cai.modules.training import is_follower
from cai.paper_evals import hhh_pairs
from cai.paper_samples import fingerprint as paper_samples_fingerprint
from cai.paper_samples import load_answers
from cai.preference import PreferenceModel, score_pair_sets
from cai.results import write_rows
from cai.stages.base import TRAINER_RUNTIME, Stage

log = logging.getLogger(__name__)

HARMLESSNESS_SOURCES = ("harmless-base", "paper_pm", "paper_pm+harmless-base")
HELPFULNESS_SOURCES = ("helpful-base",)


def run(cfg: DictConfig, inputs: dict[str, Artifact], work_dir: Path) -> dict:
    check_settings(cfg)
    cfg = with_seed(cfg, judge_seed(cfg))  # every draw of the judge from its own seed
    node = cfg.judge
    init_cfg = model_cfg_for(cfg, str(node.init), "judge.init", inputs)
    judges, metrics, rows, validation = {}, {}, [], {}
    for dimension in DIMENSIONS:
        if not node.get(dimension):
            continue
        # 1. Train the dimension's PM on its sources
        comparisons, sources = training_data(cfg, dimension)
        scorer, trained = train_preference_model(
            cfg, node, comparisons, init_cfg, work_dir / dimension
        )
        if is_follower():  # several processes: global rank 0 evaluates and writes
            continue
        common = {
            "stage": "judge",
            "model": init_cfg.name,
            "parameters": count_parameters(scorer.model),
            "method": f"pm_{node.get(dimension)}",
            "judge": judge_name(dimension),
        }
        # 2. Held-out accuracy on hh-rlhf judge_test comparisons within the judge's max_length
        sets = {}
        for subset in [s for s in str(node.get(dimension)).split("+") if s != "paper_pm"]:
            test = hh_rlhf_comparisons(cfg.paths.data_dir, subset, "judge_test")
            test = [p for p in test if scorer.fits(p, int(node.max_length))][: node.max_test]
            sets[f"hh_rlhf_{subset.split('-')[0]}"] = test
        if dimension == "harmlessness":  # HHH: Figure 4's "PM trained on human feedback" series
            sets["hhh"] = hhh_pairs(cfg.paths.data_dir)[: node.max_hhh]
        judge_rows, summary = score_pair_sets(scorer, sets, common)
        rows += judge_rows
        # 3. Validation: agreement with the paper's PM on test-split PALMS prompts
        validated_rows, validation[judge_name(dimension)] = validate_pm(scorer, cfg, common)
        rows += validated_rows
        judges[dimension] = f"{dimension}/model"
        metrics[dimension] = {"train_comparisons": sources, **trained, "eval": summary}
    if is_follower():
        return {}
    # 4. Judges a user names (judge.extra): validated too
    for name, folder in (node.get("extra") or {}).items():
        scorer = PreferenceModel.load(folder)
        common = {"stage": "judge", "model": str(folder), "parameters": count_parameters(
            scorer.model), "method": "pm_extra", "judge": str(name)}  # fmt: skip
        extra_rows, validation[str(name)] = validate_pm(scorer, cfg, common)
        rows += extra_rows
    write_rows(work_dir / "rows.csv", rows)
    write_json_atomic(work_dir / "judges.json", judges)
    write_json_atomic(work_dir / "validation.json", validation)
    return {"judges": sorted(judges), **metrics, "validation": validation}


def training_data(cfg: DictConfig, dimension: str) -> tuple[list, dict]:
    """The comparisons a judge of `dimension` trains on, and where they came from."""
    node = cfg.judge
    sources = str(node.get(dimension)).split("+")
    comparisons, counts = [], {}
    for source in sources:
        if source == "paper_pm":
            these = paper_pm_comparisons(
                cfg.paths.data_dir, node.max_paper_pairs, int(cfg.seed), node.get("paper_pairs")
            )
        else:  # an hh-rlhf subset; a missing file is an error, never an empty judge
            train = hh_rlhf_comparisons(cfg.paths.data_dir, source, "judge_train")
            these = human_comparisons(train[: node.max_train], source)
        counts[source] = len(these)
        comparisons += these
    return comparisons, counts


PAPER_PAIRS = (None, "within_model", "length_matched")


def paper_pm_comparisons(
    data_dir: str | None, max_pairs: int | None, seed: int, which: str | None = None
) -> list:
    """Comparisons of pairs of the paper's answers to the same prompt (train-split prompts
    only), soft label sigmoid(score_a - score_b) of the paper's PM: a judge that learns to order
    answers as the paper's PM does. `which` (judge.paper_pairs): every pair (None); pairs from
    one paper model (`within_model`: no model's style to recognise); or pairs whose word counts
    are within 20% (`length_matched`: no length to read)."""
    by_prompt: dict[str, list] = {}
    for a in load_answers(data_dir, "train"):
        by_prompt.setdefault(a.prompt_id, []).append(a)
    pairs = [
        pair for pid in sorted(by_prompt) for pair in itertools.combinations(by_prompt[pid], 2)
    ]
    if which == "within_model":
        pairs = [(a, b) for a, b in pairs if a.model_type == b.model_type]
    elif which == "length_matched":
        pairs = [(a, b) for a, b in pairs if length_matched(a.answer, b.answer)]
    rng = random.Random(f"{seed}/paper-pm-pairs")
    if max_pairs is not None:
        pairs = rng.sample(pairs, min(int(max_pairs), len(pairs)))
    out = []
    for a, b in pairs:
        if rng.random() < 0.5:  # either order
            a, b = b, a
        p_a = 1.0 / (1.0 + math.exp(-(a.pm_score - b.pm_score)))
        out.append(
            Comparison(answer_turns(a.prompt, a.answer), answer_turns(b.prompt, b.answer), p_a,
                       "paper_pm")
        )  # fmt: skip
    return out


def judge_seed(cfg: DictConfig) -> int:
    """The judge's seed: judge.seed, else the run's. A fixed judge.seed makes one judge for runs
    of several seeds (experiment=replicate), so their Elo share one scale."""
    return int(cfg.seed if cfg.judge.get("seed") is None else cfg.judge.seed)


def with_seed(cfg: DictConfig, seed: int) -> DictConfig:
    """A copy of `cfg` whose `seed` is `seed`."""
    copy = cfg.copy()
    copy.seed = seed
    return copy


def check_settings(cfg: DictConfig) -> None:
    node = cfg.judge
    if not any(node.get(d) for d in DIMENSIONS):
        raise ConfigError("judge.harmlessness and judge.helpfulness are both null: no judge.")
    for dimension, allowed in (
        ("harmlessness", HARMLESSNESS_SOURCES),
        ("helpfulness", HELPFULNESS_SOURCES),
    ):
        value = node.get(dimension)
        if value and str(value) not in allowed:
            raise ConfigError(f"judge.{dimension}={value!r}: use {', '.join(allowed)} or null.")
    if node.get("paper_pairs") not in PAPER_PAIRS:
        raise ConfigError(
            f"judge.paper_pairs={node.paper_pairs!r}: use null (every pair), within_model or "
            "length_matched."
        )
    if str(node.get("weights", "auto")) not in ("auto", "float32"):
        raise ConfigError(f"judge.weights={node.weights!r}: use auto or float32.")
    if str(node.init) in ("policy", "sft"):
        log.warning(
            "judge.init=%s: the judge then changes with the model judged, so runs of different "
            "sizes share no judge (one Elo scale needs one judge: name a preset or a folder).",
            node.init,
        )


def fingerprints(cfg: DictConfig) -> dict:
    """Fingerprints of the data the judges train and validate on (part of the judge's key); and
    the run's model when `judge.init` is policy or sft (the judge's backbone is then that)."""
    data_dir = cfg.paths.data_dir
    subsets = {str(cfg.judge.get(d)).split("+")[-1] for d in DIMENSIONS if cfg.judge.get(d)} - {
        "paper_pm"
    }
    return {
        "hh_rlhf_splits": hh_split_rule(),
        "hh_rlhf": {s: hh_rlhf_fingerprint(data_dir, s) for s in sorted(subsets)},
        "paper_samples": paper_samples_fingerprint(data_dir),
        "extra": {n: str(f) for n, f in (cfg.judge.get("extra") or {}).items()},
    } | (
        {"policy_model": OmegaConf.to_container(cfg.model, resolve=True)}
        if str(cfg.judge.init) in ("policy", "sft")
        else {}
    )


STAGE = Stage(
    "judge",
    run,
    settings=("judge", "trainer"),  # judge.init names its model: one judge for every run
    version=4,  # 4: validation beside the trivial rules, verdicts; 3: seeded head, paper_pm,
    # PALMS validation, data fingerprints
    # judge.seed is in the key as its `seed` (seed_of), so judge.seed=0 under seed 0 is the same
    # judge as no judge.seed
    runtime=("judge.checkpoint_every", "judge.eval_batch_size", "judge.seed", *TRAINER_RUNTIME),
    inert=lambda cfg: () if cfg.judge.get("paper_pairs") else ("judge.paper_pairs",),
    seed_of=judge_seed,
    fingerprints=fingerprints,
    check=check_settings,
    distributed=True,
)
