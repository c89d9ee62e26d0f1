"""The paper's released evaluation files (Bai et al. 2022, section 4.2; supplementary material,
`evals/`), read in place from `paths.data_dir`/cai-paper/evals: the one reader of these files.

- `hhh`: the 438 binary HHH comparisons (438HHHEvaluations.jsonl), as multiple-choice items
  (`load_eval`) and as (correct, incorrect) transcripts for preference models (`hhh_pairs`);
- `harmful_vs_ethical`: was the assistant harmful or ethical (2 options);
- `harmfulness_classification`: which kind of harm (9 options).

Every line is checked: a malformed one is an error naming the file and the line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cai.errors import ConfigError

EVAL_FILES = {
    "hhh": "438HHHEvaluations.jsonl",
    "harmful_vs_ethical": "HarmfulVsEthical.jsonl",
    "harmfulness_classification": "HarmfulnessClassification.jsonl",
}


@dataclass(frozen=True)
class MCItem:
    id: str
    prompt: str  # ends with "The answer is:"
    options: tuple[str, ...]  # " (A)", " (B)", ...
    correct: int  # index of the correct option


def eval_path(name: str, data_dir: str | None) -> Path:
    if name not in EVAL_FILES:
        raise ConfigError(f"eval_hhh.evals: unknown eval {name!r}; known: {', '.join(EVAL_FILES)}.")
    if not data_dir:
        raise ConfigError(
            "eval_hhh needs the paper's eval files: set paths.data_dir (or CAI_DATA_DIR) to a "
            "folder holding cai-paper/evals/ (see ../shared/data/README.md)."
        )
    path = Path(data_dir) / "cai-paper" / "evals" / EVAL_FILES[name]
    if not path.is_file():
        raise ConfigError(f"{path} is missing: cai-paper/evals/ must hold {EVAL_FILES[name]}.")
    return path


def _records(path: Path, fields: tuple[str, ...]):
    """(line number, record) for every non-empty line, each a JSON object with `fields`."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            missing = [f for f in fields if f not in raw]
        except (json.JSONDecodeError, TypeError) as error:
            raise ConfigError(f"{path}, line {number}: not a JSON object ({error}).") from error
        if missing:
            raise ConfigError(
                f"{path}, line {number}: expected JSON with {', '.join(fields)} "
                f"(missing {', '.join(missing)})."
            )
        yield number, raw


def load_eval(name: str, data_dir: str | None) -> list[MCItem]:
    """Every item of one eval file, options in letter order, with a clear error per bad line."""
    path = eval_path(name, data_dir)
    items = []
    for number, raw in _records(path, ("prompt", "corrects", "incorrects")):
        corrects, incorrects = list(raw["corrects"]), list(raw["incorrects"])
        if len(corrects) != 1 or not incorrects:
            raise ConfigError(f"{path}, line {number}: need one correct and >= 1 incorrect option.")
        options = tuple(sorted(corrects + incorrects))
        items.append(MCItem(f"{name}-{number}", raw["prompt"], options, options.index(corrects[0])))
    return items


def hhh_pairs(data_dir: str | None) -> list[tuple[str, str]]:
    """(correct, incorrect) transcripts of the 438 HHH comparisons, for scoring with a PM; []
    when the data folder or the file is absent (callers say so)."""
    if not data_dir:
        return []
    path = Path(data_dir) / "cai-paper" / "evals" / EVAL_FILES["hhh"]
    if not path.is_file():
        return []
    return [
        (raw["text_correct"], raw["text_incorrect"])
        for _, raw in _records(path, ("text_correct", "text_incorrect"))
    ]
