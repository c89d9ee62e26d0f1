"""judge: the evaluation preference models, trained on human comparisons and kept apart from the
PM that PPO optimised (the paper's judges were crowdworkers, Bai et al. 2022, section 3.3).

One judge per dimension: harmlessness (hh-rlhf harmless-base) and helpfulness (helpful-base),
each trained on the hh-rlhf split `judge_train` and measured on `judge_test` (its own held-out
accuracy) and on the 438 HHH comparisons. A dimension whose data is not available (offline:
helpful-base) is skipped with a warning and recorded in the manifest.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from cai.artifacts import Artifact, write_json_atomic
from cai.errors import ConfigError

log = logging.getLogger(__name__)

DIMENSIONS = ("harmlessness", "helpfulness")


def judge_name(dimension: str) -> str:
    """The name result rows give a PM judge."""
    return f"pm_{dimension}"


def check_settings(cfg: DictConfig) -> None:
    if not any(cfg.judge.get(d) for d in DIMENSIONS):
        raise ConfigError("judge.harmlessness and judge.helpfulness are both null: no judge.")


def run_stage(cfg: DictConfig, upstream: dict[str, Artifact], work_dir: Path) -> dict:
    """judge: a PM per dimension in `work_dir/<dimension>/model`; judges.json lists them."""
    from cai.config import model_cfg_for
    from cai.data import hh_rlhf_comparisons
    from cai.models import count_parameters
    from cai.modules.pm import (
        hhh_pairs,
        human_comparisons,
        score_pair_sets,
        train_preference_model,
    )
    from cai.modules.training import is_follower
    from cai.results import write_rows

    node = cfg.judge
    init_cfg = model_cfg_for(cfg, str(node.init), "judge.init", upstream)
    judges, skipped, metrics, rows = {}, {}, {}, []
    for dimension in DIMENSIONS:
        subset = node.get(dimension)
        if not subset:
            continue
        try:
            train = hh_rlhf_comparisons(cfg.paths.data_dir, subset, "judge_train")
            test = hh_rlhf_comparisons(cfg.paths.data_dir, subset, "judge_test")
        except ConfigError as error:
            log.warning("No %s judge: %s", dimension, error)
            skipped[dimension] = str(error)
            continue
        comparisons = human_comparisons(train[: node.max_train], subset)
        scorer, trained = train_preference_model(
            cfg, node, comparisons, init_cfg, work_dir / dimension
        )
        if is_follower():  # several processes: global rank 0 evaluates and writes
            continue
        # held-out accuracy on the judge_test comparisons within the judge's max_length
        test = [p for p in test if scorer.fits(p, int(node.max_length))][: node.max_test]
        sets = {f"hh_rlhf_{subset.split('-')[0]}": test}
        if dimension == "harmlessness":  # HHH: Figure 4's "PM trained on human feedback" series
            sets["hhh"] = hhh_pairs(cfg.paths.data_dir)[: node.max_hhh]
        common = {
            "stage": "judge",
            "model": init_cfg.name,
            "parameters": count_parameters(scorer.model),
            "method": "pm_human",
            "judge": judge_name(dimension),
        }
        judge_rows, summary = score_pair_sets(scorer, sets, common)
        rows += judge_rows
        judges[dimension] = f"{dimension}/model"
        metrics[dimension] = {"train_comparisons": len(comparisons), **trained, "eval": summary}
    if is_follower():
        return {}
    if not judges:  # eval then judges with the AI feedback model only
        log.warning(
            "No PM judge could be trained: hh-rlhf data was not found (set paths.data_dir or "
            "CAI_DATA_DIR)."
        )
    write_rows(work_dir / "rows.csv", rows)
    write_json_atomic(work_dir / "judges.json", judges)
    return {"judges": sorted(judges), "skipped": skipped, **metrics}


def load_judges(artifact: Artifact, device: str = "cpu") -> dict:
    """{dimension: PreferenceModel} of a judge artifact."""
    import json

    from cai.modules.pm import PreferenceModel

    listed = json.loads(artifact.file("judges.json").read_text())
    return {
        d: PreferenceModel.load(artifact.path / folder, device=device)
        for d, folder in listed.items()
    }
