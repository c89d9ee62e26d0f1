"""The pipeline's stages, in pipeline order: one file each, named as the stage and its conf/
group (conf/sft/ <-> cai/stages/sft.py). Each file reads top to bottom: what the stage does, its
`run(cfg, inputs, work_dir)` in numbered steps, and its declaration `STAGE` (upstream stages,
settings, version), from which the runner (cai.pipeline) derives the artifact key.

Lower layers (data, generation, modules, maths, scoring, analysis) never import a stage, and no
stage imports another.
"""

from __future__ import annotations

from cai.stages import (
    dpo,
    eval,
    eval_hhh,
    feedback,
    generate_pairs,
    generate_sl,
    judge,
    pm,
    ppo,
    sft,
)
from cai.stages.base import Stage

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        generate_sl.STAGE,
        sft.STAGE,
        generate_pairs.STAGE,
        feedback.STAGE,
        pm.STAGE,
        ppo.STAGE,
        dpo.STAGE,
        judge.STAGE,
        eval.STAGE,
        eval_hhh.STAGE,
    )
}
