"""Train harmlessness judges under several settings and compare their validations against the
trivial rules and the goals of a judge that earns its verdict (README, "Judges held against
trivial rules"). Each trial is `python src/train.py pipeline.stages=[judge]` with its overrides,
in its own process and output folder (its rows stay out of results/).

    python scripts/judge_trials.py /tmp/judge_trials                 # every trial below
    python scripts/judge_trials.py /tmp/judge_trials default within  # some of them

Writes <out>/trials.json and prints a markdown table (copy it to results/ with the command and
wall time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TRIALS = {  # name -> overrides of the default judge (conf/judge/default.yaml)
    "default": [],
    "seed1": ["judge.seed=1"],
    "within_model": ["judge.paper_pairs=within_model"],
    "length_matched": ["judge.paper_pairs=length_matched"],
    "paper_pm+harmless-base": ["judge.harmlessness=paper_pm+harmless-base"],
    "all_layers": ["judge.train_layers=null"],
}
# item 4 of the judges' goals, on the PALMS test prompts
GOALS = "judge - shorter wins >= +0.05 (interval above 0); length-matched >= 0.62; within one model > 0.55; revision 4 above revision 0"


def run_trial(name: str, overrides: list[str], out: Path) -> dict:
    folder = out / name
    command = [
        sys.executable, str(REPO / "src" / "train.py"), "pipeline.stages=[judge]",
        f"paths.output_dir={folder}", f"paths.results_dir={folder}/results",
        f"hydra.run.dir={folder}/run", "pipeline.figures=false", *overrides,
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    (validation,) = (folder / "artifacts" / "judge").glob("*/validation.json")
    summary = json.loads(validation.read_text())["pm_harmlessness"]
    return {"name": name, "overrides": overrides, "wall_s": round(wall, 1), **summary}


def cell(block: dict) -> str:
    low, high = block["interval"]
    return f"{block['agreement']:.3f} [{low:.3f}, {high:.3f}]"


def table(results: list[dict]) -> str:
    lines = [
        "| trial | overrides | agreement | shorter wins | judge - shorter wins | length-matched "
        "| within one model | revision 4 - 0 | verdict | wall |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        margin = r["minus_best_rule"]
        gain = r.get("revision_gain") or {}
        lines.append(
            f"| {r['name']} | {' '.join(r['overrides']) or '(none)'} | {cell(r)} "
            f"| {cell(r['rules']['shorter_wins'])} | {margin['difference']:+.3f} "
            f"[{margin['interval'][0]:+.3f}, {margin['interval'][1]:+.3f}] ({margin['rule']}) "
            f"| {cell(r['length_matched'])} | {cell(r['within_model'])} "
            f"| {gain.get('gain', float('nan')):+.3f} [{gain.get('interval', [0, 0])[0]:+.3f}, "
            f"{gain.get('interval', [0, 0])[1]:+.3f}] | {r['verdict']} | {r['wall_s']:.0f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    out = Path(sys.argv[1])
    names = sys.argv[2:] or list(TRIALS)
    results = []
    for name in names:
        print(f"[judge_trials] {name}: {' '.join(TRIALS[name]) or 'default'}", flush=True)
        results.append(run_trial(name, TRIALS[name], out))
        (out / "trials.json").write_text(json.dumps(results, indent=1))
    print(f"Goals: {GOALS}\n")
    print(table(results))


if __name__ == "__main__":
    main()
