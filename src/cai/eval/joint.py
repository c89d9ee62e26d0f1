"""One Elo scale across the runs of a multirun (Figure 3): every model of every run (all sizes,
all variants) in one Bradley-Terry fit, anchored at the largest model's SL-CAI as in the paper
(Bai et al. 2022, Figure 3: SL-CAI 52B = 0).

Within one run the eval stage compares its own models. Across runs, the PM judges make every
answer comparable with every other answer to the same prompt: each answer carries its judge
scores (samples.jsonl, `scores`), so a pair of answers from two runs gets the judgement
sigmoid(r_A - r_B), as within a run. That needs one judge for all runs (`judge.init` a preset,
not `policy`): runs judged by different judge artifacts are refused.

    python src/make_figures.py --joint multirun/2026-11-28/10-00-00
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from cai.artifacts import read_jsonl
from cai.errors import ConfigError
from cai.eval.elo import Comparisons, bootstrap_elo
from cai.eval.validation import trust_flag
from cai.results import row

log = logging.getLogger(__name__)

DIMENSION_OF_KIND = {"red_team": "harmlessness", "helpful": "helpfulness"}


def eval_artifacts(folders: list[str | Path]) -> list[Path]:
    """The eval artifact folders named by the pipeline_summary.json files under `folders`."""
    found = []
    for folder in map(Path, folders):
        for summary in sorted(folder.rglob("pipeline_summary.json")):
            for stage in json.loads(summary.read_text()):
                path = Path(stage["path"])
                if stage["stage"] == "eval" and path not in found and path.is_dir():
                    found.append(path)
    return found


def load_run(path: Path) -> dict:
    """One eval artifact: its manifest's models and judge key, and its scored samples."""
    manifest = json.loads((path / "manifest.json").read_text())
    config = manifest["config"]
    model = config["model"]
    return {
        "path": path,
        "model": model.get("name"),
        "parameters": model.get("params"),
        "judge_key": manifest["metrics"].get("judge_key"),
        "validation": manifest["metrics"].get("validation", {}),
        "models": manifest["metrics"]["models"],
        "samples": read_jsonl(path / "samples.jsonl"),
        "anchor": config["eval"]["anchor"],
    }


def player_name(run: dict, player: str, pool_seeds: bool = False) -> str:
    """A player of the joint fit: '<model>@<eval key>/<player>', so two runs of one model (two
    seeds, two settings) stay two players; with `pool_seeds`, '<model>/<player>': the runs of
    one model pooled into one player on purpose (seeds of one config; nothing else may differ)."""
    return (
        f"{run['model']}/{player}" if pool_seeds else f"{run['model']}@{run['path'].name}/{player}"
    )


def joint_judgements(
    runs: list[dict], judge: str, pool_seeds: bool = False
) -> tuple[list[dict], list[str]]:
    """Judgements of every pair of players (across runs) answering the same prompt and sample,
    by PM judge `judge`; players named by `player_name`. Two answers of one player to one prompt
    (pooled seeds) are never judged against each other."""
    by_prompt: dict[tuple, list[tuple[str, float]]] = {}
    players = []
    for run in runs:
        for s in run["samples"]:
            if judge not in s.get("scores", {}):
                continue
            if DIMENSION_OF_KIND[s["kind"]] != _dimension(judge):
                continue
            name = player_name(run, s["player"], pool_seeds)
            if name not in players:
                players.append(name)
            by_prompt.setdefault((s["prompt_id"], s["sample"]), []).append(
                (name, s["scores"][judge])
            )
    judgements = []
    for (prompt_id, _), answers in sorted(by_prompt.items()):
        for i in range(len(answers)):
            for j in range(i + 1, len(answers)):
                (a, ra), (b, rb) = answers[i], answers[j]
                if a == b:
                    continue
                p_a = 1.0 / (1.0 + math.exp(-(ra - rb)))
                judgements.append(
                    {"prompt_id": prompt_id, "player_a": a, "player_b": b, "p_a": p_a}
                )
    return judgements, players


def judge_flag(validation: dict) -> str:
    """A judge's trust flag from its validation summary: its verdict against the trivial rules
    (cai.eval.validation.verdict); from the agreement interval alone for a summary written
    before verdicts; `unvalidated` without one."""
    if "verdict" in validation:
        return str(validation.get("flag", ""))
    interval = validation.get("interval")
    return trust_flag(*interval) if interval else "unvalidated"


def _dimension(judge: str) -> str:
    return judge.removeprefix("pm_")


def joint_rows(
    folders: list[str | Path], bootstrap: int = 1000, seed: int = 0, pool_seeds: bool = False
) -> list[dict]:
    """Result rows (stage `joint`, metric `elo`) of one fit per PM judge over every eval
    artifact under `folders`; the anchor is the SL-CAI of the largest model (of its first run
    by eval key when several runs share it). `pool_seeds`: see `player_name`."""
    paths = eval_artifacts(folders)
    if not paths:
        raise ConfigError(
            f"No eval artifacts found under {[str(f) for f in folders]}: name the run or "
            "multirun folders whose pipeline_summary.json lists an eval stage."
        )
    runs = [load_run(p) for p in paths]
    keys = {r["judge_key"] for r in runs}
    if len(keys) != 1 or None in keys:
        raise ConfigError(
            f"The runs were judged by {len(keys)} different judge artifacts ({sorted(map(str, keys))}): "
            "one Elo scale needs one judge. Set judge.init to a preset (not policy) for every run."
        )
    runs.sort(key=lambda r: r["path"].name)
    largest = max(runs, key=lambda r: float(r["parameters"] or 0))
    anchor_point = next(m for m in largest["models"] if m["series"] == largest["anchor"])
    anchor = player_name(largest, anchor_point["player"], pool_seeds)
    judges = sorted({j for r in runs for s in r["samples"][:1] for j in s.get("scores", {})})
    rows = []
    for judge in judges:
        judgements, players = joint_judgements(runs, judge, pool_seeds)
        if anchor not in players or not judgements:
            continue
        index = {p: i for i, p in enumerate(players)}
        group = {pid: g for g, pid in enumerate(sorted({j["prompt_id"] for j in judgements}))}
        comparisons = Comparisons.from_records(
            [
                (index[j["player_a"]], index[j["player_b"]], j["p_a"], group[j["prompt_id"]])
                for j in judgements
            ]
        )
        elo, low, high = bootstrap_elo(comparisons, len(players), index[anchor], bootstrap, seed)
        flag = judge_flag(runs[0]["validation"].get(judge, {}))
        done = set()
        for run in runs:
            for point in run["models"]:
                name = player_name(run, point["player"], pool_seeds)
                if name not in index or name in done:
                    continue
                i = index[name]
                done.add(name)
                rows.append(
                    row(
                        stage="joint",
                        run_id=str(run["path"].name),
                        model=run["model"],
                        parameters=run["parameters"],
                        eval=_dimension(judge),
                        method=point["series"],
                        judge=judge,
                        revisions=point.get("revisions"),
                        cot=point.get("cot"),
                        rl_sequences=point.get("rl_sequences"),
                        metric="elo",
                        value=float(elo[i]),
                        low=float(low[i]),
                        high=float(high[i]),
                        n=sum(name in (j["player_a"], j["player_b"]) for j in judgements),
                        flag=flag,
                        independent=True,
                    )
                )
    log.info("Joint Elo: %d runs, anchor %s, %d rows", len(runs), anchor, len(rows))
    return rows
