"""Prompt sets: red-team prompts (harmlessness) and helpfulness prompts, with a fixed split.

Sources (`data.source`):
- `builtin`: 207 red-team prompts over the nine harm categories of the paper's
  HarmfulnessClassification eval and 200 helpfulness prompts, written for this project
  (src/cai/resources/prompts/);
- `hh_rlhf`: the first human turn of Anthropic's hh-rlhf dialogues (red-team prompts from
  harmless-base, helpfulness prompts from helpful-base), read through `datasets` from
  `paths.data_dir`/hh-rlhf, or from the hub when online (the paper's prompts come from the
  same red-team and helpfulness data, Bai et al. 2022, section 3.2);
- `files`: your own files (`data.red_team_file`, `data.helpful_file`): .txt (one prompt per
  line), .jsonl (a "prompt" field) or .yaml (category -> list of prompts).

Duplicates are dropped and counted; limits apply after a seeded shuffle of the train split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import yaml
from omegaconf import DictConfig, OmegaConf

from cai import models
from cai.constitution import parse_turns, safe_yaml
from cai.errors import ConfigError

log = logging.getLogger(__name__)

RESOURCES = Path(__file__).parent / "resources" / "prompts"


@dataclass(frozen=True)
class Prompt:
    id: str  # stable: derived from the text
    text: str  # the human's request (first human turn)
    category: str
    split: str  # "train" or "eval"
    kind: str  # "red_team" or "helpful"


@dataclass
class PromptSet:
    red_team: list[Prompt]
    helpful: list[Prompt]
    counts: dict = field(default_factory=dict)  # read, duplicates, limited, per split

    def split(self, name: str) -> PromptSet:
        return PromptSet(
            [p for p in self.red_team if p.split == name],
            [p for p in self.helpful if p.split == name],
            self.counts,
        )

    def fingerprint(self) -> str:
        text = "\n".join(
            f"{p.kind}|{p.split}|{p.category}|{p.text}" for p in self.red_team + self.helpful
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_prompts(cfg: DictConfig, data_dir: str | None = None) -> PromptSet:
    """Both prompt lists for the `data` config node, deduplicated, split and limited."""
    helpful_source = cfg.source
    if cfg.source == "builtin":
        red = _from_yaml(RESOURCES / "red_team.yaml")
        helpful = _from_yaml(RESOURCES / "helpful.yaml")
    elif cfg.source == "files":
        red = _from_file(cfg.get("red_team_file"), "data.red_team_file")
        helpful = _from_file(cfg.get("helpful_file"), "data.helpful_file")
    elif cfg.source == "hh_rlhf":
        if int(cfg.eval_percent) > HH_TRAIN_FLOOR:
            raise ConfigError(
                f"data.eval_percent={cfg.eval_percent} with data.source=hh_rlhf: at most "
                f"{HH_TRAIN_FLOOR}, so that no eval prompt is in the PM's or the judges' "
                "training comparisons (cai.data.HH_SPLITS)."
            )
        helpful_source = "hh-rlhf helpful-base"
        red = _from_hh_rlhf(cfg, data_dir, "harmless-base")
        helpful = _from_hh_rlhf(cfg, data_dir, "helpful-base")
        if helpful is None:
            if not cfg.get("helpful_fallback_builtin", True):
                raise ConfigError(_hh_missing("helpful-base", data_dir))
            log.warning(
                "hh-rlhf helpful-base not found locally and the hub is unreachable: using the "
                "builtin helpfulness prompts (recorded in the manifest)."
            )
            helpful = _from_yaml(RESOURCES / "helpful.yaml")
            helpful_source = "builtin (hh-rlhf helpful-base unavailable)"
        if red is None:
            raise ConfigError(_hh_missing("harmless-base", data_dir))
    else:
        raise ConfigError(f"data.source={cfg.source!r}: use builtin, hh_rlhf or files.")
    counts: dict = {"helpful_source": helpful_source}
    red_prompts = _finish(
        red, "red_team", cfg, counts, cfg.get("max_red_team"), cfg.get("max_eval")
    )
    helpful_prompts = _finish(
        helpful, "helpful", cfg, counts, cfg.get("max_helpful"), cfg.get("max_eval")
    )
    return PromptSet(red_prompts, helpful_prompts, counts)


# ---------------------------------------------------------------------------------------------


def builtin_prompts(max_red_team: int, max_helpful: int) -> PromptSet:
    """The builtin prompt set, no eval split, first n of each kind (benchmarks, notebooks)."""
    cfg = OmegaConf.create(
        {
            "source": "builtin",
            "eval_percent": 0,
            "shuffle_seed": 0,
            "max_red_team": max_red_team,
            "max_helpful": max_helpful,
            "max_eval": 0,
        }
    )
    return load_prompts(cfg)


# Chat control tokens (ChatML <|im_start|>, <|endoftext|>, Llama 3 <|eot_id|>, ...; <s> </s>):
# in a prompt's text they would become real turns when the chat template is tokenized.
CONTROL_TOKEN = re.compile(r"<\|[^<>|\s]{1,40}\|>|</?s>")


def control_tokens(text: str, mode: str, kind: str) -> tuple[str, int]:
    """`text` with chat control tokens escaped (a zero-width space after the `<`, so they read
    the same but tokenize as text), or a ConfigError with `data.control_tokens=refuse`. Returns
    the text and how many were found."""
    found = CONTROL_TOKEN.findall(text)
    if not found:
        return text, 0
    if mode == "refuse":
        raise ConfigError(
            f"A {kind} prompt contains the chat control token {found[0]!r} ({text[:80]!r}...): "
            "prompt text must be text. Remove it, or set data.control_tokens=escape."
        )
    if mode != "escape":
        raise ConfigError(f"data.control_tokens={mode!r}: use escape or refuse.")
    return CONTROL_TOKEN.sub(lambda m: "<\u200b" + m.group(0)[1:], text), len(found)


def _finish(
    items: list[tuple[str, str]],
    kind: str,
    cfg: DictConfig,
    counts: dict,
    limit: int | None,
    eval_limit: int | None,
) -> list[Prompt]:
    """Deduplicate, split (fixed: by a hash of the text), shuffle (seeded) and limit."""
    if not items:
        raise ConfigError(
            f"No {kind} prompts were read for data.source={cfg.source}: the file is empty."
        )
    seen, prompts, duplicates, escaped = set(), [], 0, 0
    mode = str(cfg.get("control_tokens", "escape"))
    for category, text in items:
        text, found = control_tokens(text.strip(), mode, kind)
        escaped += found
        norm = re.sub(r"\s+", " ", text.lower())
        if not text or norm in seen:
            duplicates += bool(text)
            continue
        seen.add(norm)
        digest = hashlib.sha256(norm.encode()).hexdigest()
        split = "eval" if prompt_bucket(text) < int(cfg.eval_percent) else "train"
        prompts.append(Prompt(f"{kind}-{digest[:10]}", text, category, split, kind))
    random.Random(int(cfg.shuffle_seed)).shuffle(prompts)
    train = [p for p in prompts if p.split == "train"]
    evals = [p for p in prompts if p.split == "eval"]
    train = train if limit is None else train[: int(limit)]
    evals = evals if eval_limit is None else evals[: int(eval_limit)]
    counts[kind] = {
        "read": len(items),
        "duplicates": duplicates,
        "train": len(train),
        "eval": len(evals),
        "limited_away": len(prompts) - len(train) - len(evals),
        "control_tokens_escaped": escaped,
    }
    return train + evals


def _from_yaml(path: Path) -> list[tuple[str, str]]:
    raw = _read_text(path)
    try:
        tree = safe_yaml(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"Prompt file {path} is not valid YAML: {error}") from error
    if not isinstance(tree, dict) or not all(isinstance(v, list) for v in tree.values()):
        raise ConfigError(f"Prompt file {path}: expected a mapping of category -> list of prompts.")
    return [
        (str(cat), prompt_text(text, f"{path}, category {cat!r}, item {i + 1}"))
        for cat, texts in tree.items()
        for i, text in enumerate(texts)
    ]


def prompt_text(value, where: str) -> str:
    """A prompt as read from a file: non-empty text, never a number, null, list or mapping
    (which would otherwise become prompts such as "None" or "12345")."""
    if not isinstance(value, str):
        raise ConfigError(
            f"{where}: a prompt must be text, not {type(value).__name__} ({value!r}); quote it "
            "if it is meant as text."
        )
    if not value.strip():
        raise ConfigError(f"{where}: the prompt is empty or only white space.")
    return value


def _from_file(path: str | None, key: str) -> list[tuple[str, str]]:
    if not path:
        raise ConfigError(f"data.source=files needs {key}=<.txt, .jsonl or .yaml file>.")
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        return _from_yaml(path)
    raw = _read_text(path)
    if path.suffix == ".jsonl":
        items = []
        for number, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    text = prompt_text(row["prompt"], f"{path}, line {number}")
                    items.append((str(row.get("category", "none")), text))
                except (ValueError, KeyError, AttributeError, TypeError) as error:
                    raise ConfigError(
                        f"{path}, line {number}: expected a JSON object with a "
                        f"'prompt' field ({error})."
                    ) from error
        return items
    return [("none", line) for line in raw.splitlines() if line.strip()]


def _read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise ConfigError(f"Prompt file {path} does not exist.") from error
    except IsADirectoryError as error:
        raise ConfigError(
            f"Prompt file {path} is a folder: name a .txt, .jsonl or .yaml file."
        ) from error
    except UnicodeDecodeError as error:
        if Path(path).read_bytes()[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise ConfigError(
                f"Prompt file {path} is UTF-16 text; convert it to UTF-8, e.g. "
                f"`iconv -f utf-16 -t utf-8`."
            ) from error
        raise ConfigError(
            f"Prompt file {path} is not UTF-8 text ({error}); convert it, e.g. "
            f"`iconv -f latin1 -t utf-8`."
        ) from error


def _from_hh_rlhf(
    cfg: DictConfig, data_dir: str | None, subset: str
) -> list[tuple[str, str]] | None:
    """First human turn of each hh-rlhf dialogue in `subset`, or None when unavailable."""
    folder = Path(data_dir) / "hh-rlhf" / subset if data_dir else None
    files = sorted(folder.glob("*.jsonl.gz")) if folder and folder.is_dir() else []
    try:
        if files:
            dataset = datasets.load_dataset(
                "json", data_files=[str(f) for f in files], split="train"
            )
        elif cfg.get("allow_download", True) and models.hub_reachable():
            dataset = datasets.load_dataset(cfg.hub_id, data_dir=subset, split="train")
        else:
            return None
    except Exception as error:  # offline, or the hub refused
        log.info("hh-rlhf %s unavailable: %s", subset, error)
        return None
    items = []
    for row in dataset:
        turns = parse_turns(row["chosen"])
        if turns and turns[0]["role"] == "user":
            items.append((subset, turns[0]["content"]))
    return items


def _hh_missing(subset: str, data_dir: str | None) -> str:
    return (
        f"hh-rlhf {subset} was not found under paths.data_dir={data_dir} (expected "
        f"hh-rlhf/{subset}/*.jsonl.gz) and could not be downloaded. Set paths.data_dir or "
        f"CAI_DATA_DIR, or use data=builtin."
    )


# ---------------------------------------------------------------------------------------------
# Human comparisons of hh-rlhf, in fixed disjoint splits

# Every comparison of an hh-rlhf file belongs to exactly one of these, by its first human turn
# (the prompt): the bucket of that turn's digest, the same digest that splits a prompt set into
# train and eval (`prompt_bucket`). So all comparisons of one prompt share a split, and the
# training splits (pm_train, judge_train) start at bucket 35: with data.eval_percent <= 35 no
# eval-split prompt is ever in them. The PM trains on `pm_train` (pm.harmlessness=human) and
# reports on `pm_eval`; the evaluation judges train on `judge_train` and report on `judge_test`.
HH_SPLITS = {
    "judge_test": (0, 15),
    "pm_eval": (15, 35),
    "judge_train": (35, 60),
    "pm_train": (60, 100),
}
HH_TRAIN_FLOOR = 35  # first bucket of a training split: data.eval_percent must not pass it
HH_SPLIT_SALT = "first-human-turn-v2"  # the split rule's version (part of PM and judge keys)


def hh_split_rule() -> str:
    """The hh-rlhf split rule (version and bucket ranges): part of the PM and judge keys."""
    return f"{HH_SPLIT_SALT}:{sorted(HH_SPLITS.items())}"


def prompt_bucket(text: str) -> int:
    """0..99 from a prompt's normalised text (lower case, runs of white space as one space)."""
    norm = re.sub(r"\s+", " ", text.strip().lower())
    return int(hashlib.sha256(norm.encode()).hexdigest()[:8], 16) % 100


def first_human_turn(transcript: str) -> str:
    """The first human turn of a "\\n\\nHuman: .. \\n\\nAssistant: .." transcript."""
    turns = parse_turns(transcript)
    return turns[0]["content"] if turns and turns[0]["role"] == "user" else transcript


def hh_split_of(chosen: str) -> str:
    bucket = prompt_bucket(first_human_turn(chosen))
    return next(name for name, (low, high) in HH_SPLITS.items() if low <= bucket < high)


def hh_rlhf_fingerprint(data_dir: str | None, subset: str) -> str | None:
    """sha256 of the local hh-rlhf files of `subset` (None when there are none: the hub's)."""
    folder = Path(data_dir) / "hh-rlhf" / subset if data_dir else None
    files = sorted(folder.glob("*.jsonl.gz")) if folder and folder.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def hh_rlhf_comparisons(data_dir: str | None, subset: str, split: str) -> list[tuple[str, str]]:
    """(chosen, rejected) dialogue transcripts of one split of hh-rlhf `subset`
    (harmless-base, helpful-base), read through `datasets` from paths.data_dir or the hub."""
    if split not in HH_SPLITS:
        raise ConfigError(f"hh-rlhf split {split!r}: use one of {', '.join(HH_SPLITS)}.")
    folder = Path(data_dir) / "hh-rlhf" / subset if data_dir else None
    files = sorted(folder.glob("*.jsonl.gz")) if folder and folder.is_dir() else []
    try:
        if files:
            rows = datasets.load_dataset("json", data_files=[str(f) for f in files], split="train")
        elif models.hub_reachable():
            rows = datasets.load_dataset("Anthropic/hh-rlhf", data_dir=subset, split="train")
        else:
            raise ConfigError(_hh_missing(subset, data_dir))
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(f"{_hh_missing(subset, data_dir)} ({error})") from error
    return [
        (row["chosen"], row["rejected"])
        for row in rows
        if row["chosen"] != row["rejected"] and hh_split_of(row["chosen"]) == split
    ]
