"""The known-signal check's results from one run folder (experiment=signal_check):

python scripts/signal_check_report.py outputs/runs/<date>/<time>

writes results/signal_check/run.json (every stage's key, wall time, peak memory, metrics and
the PPO metrics per iteration, as scripts/summarise_run.py), results/signal_check/rows.csv (the
run's result rows; src/make_figures.py leaves this folder out of the paper's figures) and
paper_figures/signal_check.png|pdf, and prints what the check shows.
"""

import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("CAI_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

import matplotlib.pyplot as plt  # noqa: E402
from summarise_run import summarise  # noqa: E402

from cai.analysis.figures import figure_signal_check  # noqa: E402
from cai.analysis.gather import as_table  # noqa: E402
from cai.results import read_rows  # noqa: E402


def main(run: Path, results: Path = ROOT / "results" / "signal_check",
         figures: Path = ROOT / "paper_figures") -> None:  # fmt: skip
    results.mkdir(parents=True, exist_ok=True)
    summary = summarise(run)
    (results / "run.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    shutil.copyfile(run / "results.csv", results / "rows.csv")
    table = as_table(read_rows(results / "rows.csv"))
    fig = figure_signal_check(summary["ppo"]["history"], table)
    for suffix in ("png", "pdf"):
        fig.savefig(figures / f"signal_check.{suffix}", dpi=150)
    plt.close(fig)

    pm = summary["pm"]["metrics"]["eval"]
    for name, m in pm.items():
        if name.startswith("heldout_"):
            print(f"PM on {name}: accuracy {m['accuracy']:.3f} (n = {m['n']})")
    history = summary["ppo"]["history"]
    for h in history:
        print(f"PPO @{h['train/sequences']:.0f}: PM score {h['objective/scores']:+.3f}, "
              f"ended {h['val/num_eos_tokens']:.0f}, KL {h['objective/kl']:.3f}")  # fmt: skip
    eval_rows = table[(table.stage == "eval") & table.metric.isin(["elo", "ended_rate"])]
    for r in eval_rows.sort_values(
        ["metric", "judge", "eval", "method", "rl_sequences"]
    ).itertuples():
        print(f"{r.metric} {r.judge or '-'} {r.eval} {r.method}@{r.rl_sequences}: {r.value:.3f} "
              f"[{r.low:.3f}, {r.high:.3f}] {r.flag}")  # fmt: skip
    print(f"total wall time of the stages: {sum(s['wall_s'] for s in summary.values()):.0f} s")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
