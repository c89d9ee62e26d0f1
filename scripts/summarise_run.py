"""Every stage of one run as one JSON file: key, wall time, peak memory and manifest metrics.

python scripts/summarise_run.py outputs/runs/<date>/<time> results/run_smollm2_135m.json

Reads the run folder's pipeline_summary.json and each artifact's manifest.json (the artifacts
must still be under paths.artifact_dir); adds the PPO metrics per iteration (metrics.jsonl).
"""

import json
import sys
from pathlib import Path


def summarise(run_folder: Path) -> dict:
    out = {}
    for stage in json.loads((run_folder / "pipeline_summary.json").read_text()):
        folder = Path(stage["path"])
        manifest = json.loads((folder / "manifest.json").read_text())
        out[stage["stage"]] = {
            "key": stage["key"],
            "built_in_this_run": stage["built"],
            "wall_s": stage["wall_s"],
            "peak_memory_gb": stage["peak_memory_gb"],
            "metrics": manifest["metrics"],
        }
        if (folder / "metrics.jsonl").is_file():
            lines = (folder / "metrics.jsonl").read_text().splitlines()
            out[stage["stage"]]["history"] = [json.loads(line) for line in lines]
    return out


if __name__ == "__main__":
    run, target = Path(sys.argv[1]), Path(sys.argv[2])
    target.write_text(json.dumps(summarise(run), indent=1, sort_keys=True, default=str) + "\n")
    print(target)
