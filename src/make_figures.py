"""Gather every result row and redraw the paper's figures from that table alone (no model).

python src/make_figures.py                          # results/ -> results/all_results.csv,
                                                    # paper_figures/*.png|pdf + elo_table.md
python src/make_figures.py outputs/multirun/2026-11-26/10-00-00   # also these run folders
python src/make_figures.py --results my_results --figures my_figures
python src/make_figures.py --joint multirun/2026-11-28/10-00-00   # Figure 3 on one Elo scale:
    # one Bradley-Terry fit over every model of every run there (results/joint_elo.csv)
"""

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # runs from a checkout without installing too


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extra", nargs="*", help="run or multirun folders (or CSV files) to add")
    parser.add_argument("--results", default=str(ROOT / "results"), help="results folder")
    parser.add_argument("--figures", default=str(ROOT / "paper_figures"), help="output folder")
    parser.add_argument(
        "--joint",
        action="store_true",
        help="fit one Elo scale over every eval artifact of the named run/multirun folders "
        "(anchored at the largest model's SL-CAI) into RESULTS/joint_elo.csv first",
    )
    parser.add_argument("--bootstrap", type=int, default=1000, help="joint fit: resamples")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("CAI_ROOT", str(ROOT))
    from cai.analysis.figures import make_figures
    from cai.errors import CAIError

    if args.joint:
        from cai.eval.joint import joint_rows
        from cai.results import write_rows

        try:
            rows = joint_rows(args.extra, bootstrap=args.bootstrap)
        except CAIError as error:
            print(f"Error: {error}", file=sys.stderr)
            return 2
        write_rows(Path(args.results) / "joint_elo.csv", rows)
        print(Path(args.results) / "joint_elo.csv")

    for path in make_figures(args.results, args.figures, args.extra):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
