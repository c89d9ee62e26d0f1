"""Gather every result row and redraw the paper's figures from that table alone (no model).

python src/make_figures.py                          # results/ -> results/all_results.csv,
                                                    # paper_figures/*.png|pdf + elo_table.md
python src/make_figures.py outputs/multirun/2026-11-26/10-00-00   # also these run folders
python src/make_figures.py --results my_results --figures my_figures
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("CAI_ROOT", str(ROOT))
    from cai.analysis.figures import make_figures

    for path in make_figures(args.results, args.figures, args.extra):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
