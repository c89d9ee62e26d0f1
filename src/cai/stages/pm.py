"""pm: the preference model PPO optimises (Bai et al. 2022, section 4.1), trained on the
feedback stage's soft AI harmlessness labels mixed with helpfulness comparisons
(`pm.helpfulness_ratio`), from SL-CAI. The baselines' PMs come from the same stage:
`pm.harmlessness=human` (HH-RLHF) and `none` (Helpful-RLHF). The LightningModule is
cai.modules.pm.PMModule; the saved PM scores through cai.preference.PreferenceModel.

Files: model/ (AutoModelForSequenceClassification, num_labels = 1), rows.csv (accuracy, margin
and ECE on held-out hh-rlhf and HHH pairs; agreement with the paper's PM).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from cai.artifacts import Artifact, read_jsonl
from cai.comparisons import decided_pairs, hold_out, preference_comparisons
from cai.config import model_cfg_for
from cai.data import hh_split_rule
from cai.errors import ConfigError
from cai.eval.validation import validate_pm
from cai.models import count_parameters
from cai.modules.pm import train_preference_model
from cai.modules.training import is_follower
from cai.paper_samples import fingerprint as paper_samples_fingerprint
from cai.preference import PreferenceModel, human_eval_sets, score_pair_sets
from cai.results import write_rows
from cai.stages.base import TRAINER_RUNTIME, Stage


def run(cfg: DictConfig, inputs: dict[str, Artifact], work_dir: Path) -> dict:
    # 1. Training comparisons: AI harmlessness labels (or human, or none) and helpfulness
    pm = cfg.pm
    comparisons, counts = preference_comparisons(
        read_jsonl(inputs["feedback"].file("labels.jsonl")), pm.harmlessness, pm.helpfulness,
        pm.helpfulness_ratio, pm.max_human, cfg.paths.data_dir, cfg.seed,
    )  # fmt: skip
    if not comparisons:
        raise ConfigError(
            f"No PM training comparisons (pm.harmlessness={pm.harmlessness}, "
            f"pm.helpfulness={pm.helpfulness}): check the feedback labels and the data."
        )

    # AI-labelled pairs of pm.holdout_percent of the prompts kept apart to measure the PM on
    comparisons, held_out = hold_out(comparisons, int(pm.holdout_percent))
    counts["held_out_pairs"] = len(held_out)

    # 2. Train from pm.init (SL-CAI by default) and save
    init_cfg = model_cfg_for(cfg, str(pm.init), "pm.init", inputs)
    scorer, trained = train_preference_model(cfg, pm, comparisons, init_cfg, work_dir)
    if is_follower():
        return trained

    # 3. Measure it: held-out AI labels, held-out human comparisons, HHH, agreement with the
    # paper's PM
    rows, evaluation = evaluate(
        cfg, scorer, init_cfg.name, count_parameters(scorer.model), held_out
    )
    # the PM that PPO optimises, validated like the judges (agreement with the paper's PM)
    validated, validation = validate_pm(
        scorer,
        cfg,
        {"stage": "pm", "model": init_cfg.name, "parameters": count_parameters(scorer.model),
         "judge": f"training_pm_{pm.harmlessness}"},
    )  # fmt: skip
    rows += validated
    write_rows(work_dir / "rows.csv", rows)
    return {
        **counts,
        **trained,
        "eval": evaluation,
        "validation": validation,
        "harmlessness": str(pm.harmlessness),
        "helpfulness": str(pm.helpfulness),
        "init": str(pm.init),
    }


def evaluate(cfg: DictConfig, scorer: PreferenceModel, name: str, parameters: int, held_out: list):
    """PM accuracy, margin and ECE on the held-out AI-labelled pairs the labeller decides (per
    kind: heldout_ai_harmless, heldout_ai_helpful), on hh-rlhf harmless `pm_eval` (comparisons
    within pm.max_length) and on the 438 HHH pairs."""
    limit = int(cfg.pm.max_length)
    margin = float(cfg.pm.holdout_min_margin)
    sets = {
        f"heldout_{source}": decided_pairs([c for c in held_out if c.source == source], margin)
        for source in sorted({c.source for c in held_out})
    }
    sets |= human_eval_sets(
        cfg.paths.data_dir,
        "pm_eval",
        cfg.pm.max_eval,
        cfg.pm.max_hhh,
        fits=lambda pair: scorer.fits(pair, limit),
    )
    common = {
        "stage": "pm",
        "model": name,
        "parameters": parameters,
        "method": f"pm_{cfg.pm.harmlessness}",
    }
    return score_pair_sets(scorer, sets, common)


STAGE = Stage(
    "pm",
    run,
    settings=("model", "pm", "trainer", "judge.validation"),
    version=4,  # 4: validation beside the trivial rules; 3: seeded head, PALMS validation
    upstream=("feedback", "sft"),
    runtime=("pm.checkpoint_every", "pm.eval_batch_size", *TRAINER_RUNTIME),
    fingerprints=lambda cfg: {
        "hh_rlhf_splits": hh_split_rule(),
        "paper_samples": paper_samples_fingerprint(cfg.paths.data_dir),
    },
    distributed=True,
    # pm.holdout_percent=0 (every pair trains) and pm.epochs=1 leave the key as it was before
    # the settings
    inert=lambda cfg: (
        (() if int(cfg.pm.holdout_percent) else ("pm.holdout_percent", "pm.holdout_min_margin"))
        + (() if int(cfg.pm.epochs) != 1 else ("pm.epochs",))
    ),
)
