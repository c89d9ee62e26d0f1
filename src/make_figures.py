"""Gather every result row and redraw the paper's figures from that table alone (no model).
From a checkout; installed: `cai-figures` (cai.cli.figures).

python src/make_figures.py                          # results/ -> results/all_results.csv,
                                                    # paper_figures/*.png|pdf + elo_table.md
python src/make_figures.py outputs/multirun/2026-11-26/10-00-00   # also these run folders
python src/make_figures.py --results my_results --figures my_figures
python src/make_figures.py --joint multirun/2026-11-28/10-00-00   # Figure 3 on one Elo scale:
    # one Bradley-Terry fit over every model of every run there (results/joint_elo.csv)
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("CAI_ROOT", str(ROOT))  # results/ and paper_figures/ of this checkout
sys.path.insert(0, str(ROOT / "src"))  # runs from a checkout without installing too

from cai.cli import figures  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return figures(argv)


if __name__ == "__main__":
    sys.exit(main())
