"""One table of every result row: `results/` (each run's rows, written by the pipeline into
results/runs/) and any run or multirun folders named, deduplicated (a stage artifact reused by
several runs contributes its rows once)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pandas as pd

from cai.results import LEGACY_FIELDS, ROW_FIELDS, UNSEEDED_FIELDS, read_rows, write_rows

log = logging.getLogger(__name__)

TABLE_NAME = "all_results.csv"


def is_rows_file(path: Path) -> bool:
    """A CSV whose header is exactly the result-row fields, now or before `flag` and
    `independent`, or `seed` and `replicate`, were added (other CSVs are left alone)."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError):
        return False
    return tuple(header) in (ROW_FIELDS, UNSEEDED_FIELDS, LEGACY_FIELDS)


# Kept out of the paper's figures: results/signal_check/, the known-signal check's rows
# (experiment=signal_check: a rule labelled its PM, not the paper's method), and
# results/archive/, runs of earlier code kept for what they measured
SEPARATE = ("signal_check", "archive")


def rows_files(results_dir: str | Path, extra: list[str | Path] = ()) -> list[Path]:
    """Every result-row CSV under `results_dir` and the `extra` folders (runs, multiruns)."""
    files = []
    for folder in [Path(results_dir), *map(Path, extra)]:
        if not folder.exists():
            log.warning("No such results folder: %s", folder)
            continue
        candidates = [folder] if folder.is_file() else sorted(folder.rglob("*.csv"))
        files += [
            f
            for f in candidates
            if f.name != TABLE_NAME and not set(SEPARATE) & set(f.parts) and is_rows_file(f)
        ]
    return files


def gather(results_dir: str | Path, extra: list[str | Path] = (), write: bool = True):
    """The deduplicated table of every row (a DataFrame with the ROW_FIELDS columns, numbers
    parsed); written to `results_dir/all_results.csv` when `write`."""
    rows = [r for f in rows_files(results_dir, extra) for r in read_rows(f)]
    unique = list({tuple(r[k] for k in ROW_FIELDS): r for r in rows}.values())
    if write:
        Path(results_dir).mkdir(parents=True, exist_ok=True)
        write_rows(Path(results_dir) / TABLE_NAME, unique)
    return as_table(unique)


CALIBRATION_FIELDS = ("eval", "method", "low", "high", "n", "confidence", "accuracy")


def gather_calibration(results_dir: str | Path, extra: list[str | Path] = ()) -> pd.DataFrame:
    """Every HHH reliability table (the eval_hhh stage's calibration.csv, copied into results/)
    under `results_dir` and `extra`, with a `model` column from the file name; deduplicated."""
    frames = []
    for folder in [Path(results_dir), *map(Path, extra)]:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*calibration*.csv")):
            try:
                frame = pd.read_csv(path)
            except (OSError, ValueError, pd.errors.ParserError):
                continue
            if tuple(frame.columns[: len(CALIBRATION_FIELDS)]) == CALIBRATION_FIELDS:
                if "model" not in frame:
                    frame["model"] = path.stem.replace("hhh_calibration_", "").split("_calib")[0]
                frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=[*CALIBRATION_FIELDS, "model"])
    return pd.concat(frames, ignore_index=True).drop_duplicates()


def as_table(rows: list[dict]) -> pd.DataFrame:
    """Rows as a DataFrame: numeric columns parsed (empty -> NaN), cot as a boolean or None."""
    table = pd.DataFrame(rows, columns=list(ROW_FIELDS))
    for column in ("parameters", "revisions", "rl_sequences", "value", "low", "high", "n", "seed"):
        table[column] = pd.to_numeric(table[column], errors="coerce")
    for column in ("cot", "independent"):
        table[column] = table[column].map({"True": True, "False": False, True: True, False: False})
    return table.fillna(
        {
            "judge": "",
            "method": "",
            "eval": "",
            "model": "",
            "stage": "",
            "flag": "",
            "replicate": "",
        }
    )
