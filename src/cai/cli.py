"""The two commands, installed as console scripts (`cai-train`, `cai-figures`) and run from a
checkout as `python src/train.py` and `python src/make_figures.py`.

cai-train                                  # default stages, embedded SmolLM2-135M
cai-train model=tiny pipeline.stages=[generate_sl]
cai-train -m model=size_sweep              # one job per model size
cai-figures                                # results/ -> paper_figures/
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cai.analysis.figures import make_figures
from cai.config import CONF_DIR
from cai.errors import CAIError
from cai.eval.joint import joint_rows
from cai.pipeline import run_from_config
from cai.results import write_rows

log = logging.getLogger("cai")


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def train(cfg: DictConfig) -> None:
    """Compose the Hydra config (conf/, shipped in the package), then run the pipeline, each
    stage in a process of its own (`pipeline.isolate_stages`): nothing has run torch here."""
    try:
        run_from_config(cfg, stage_processes=True)
    except CAIError as error:  # one clear message, no traceback
        log.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def figures(argv: list[str] | None = None) -> int:
    """Gather every result row and redraw the paper's figures from that table alone (no
    model). Folders default to results/ and paper_figures/ under $CAI_ROOT (the checkout when
    run as src/make_figures.py; else the current folder)."""
    root = Path(os.environ.get("CAI_ROOT", "."))
    parser = argparse.ArgumentParser(
        prog="cai-figures",
        description="Gather every result row and redraw the paper's figures from it.",
    )
    parser.add_argument("extra", nargs="*", help="run or multirun folders (or CSV files) to add")
    parser.add_argument("--results", default=str(root / "results"), help="results folder")
    parser.add_argument("--figures", default=str(root / "paper_figures"), help="output folder")
    parser.add_argument(
        "--joint",
        action="store_true",
        help="fit one Elo scale over every eval artifact of the named run/multirun folders "
        "(anchored at the largest model's SL-CAI) into RESULTS/joint_elo.csv first",
    )
    parser.add_argument("--bootstrap", type=int, default=1000, help="joint fit: resamples")
    parser.add_argument(
        "--pool-seeds",
        action="store_true",
        help="joint fit: one player per model and series across runs (runs that differ only in "
        "their seed, pooled on purpose); default: every run's players kept apart",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.joint:
        try:
            rows = joint_rows(args.extra, bootstrap=args.bootstrap, pool_seeds=args.pool_seeds)
        except CAIError as error:
            print(f"Error: {error}", file=sys.stderr)
            return 2
        write_rows(Path(args.results) / "joint_elo.csv", rows)
        print(Path(args.results) / "joint_elo.csv")
    for path in make_figures(args.results, args.figures, args.extra):
        print(path)
    return 0


def figures_main() -> None:
    sys.exit(figures())
