"""The paper's released PALMS samples (Bai et al. 2022, supplementary material, `samples/`), read
in place from `paths.data_dir`/cai-paper/samples or from the paper's public repository online.

- Answers: 40 sensitive-topic prompts, 17 answers each from the paper's four 52B models
  (Helpful-RLHF, HH-RLHF, RL-CAI, RL-CAI with CoT), each with the paper's own PM score.
- Chains: the same 40 prompts, the paper's SL-CAI critique -> revision chains (4 revisions).

They validate judges (agreement with the paper's PM; scores along the paper's revisions) and
train the `paper_pm` judge. Prompts are split train / test by a hash of the prompt text
(`palms_split`), never both, so a judge trained on them is measured on prompts it never saw.
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cai import models
from cai.data import first_human_turn, prompt_bucket
from cai.errors import ConfigError

# file stem -> the model type (series name used in result rows)
ANSWER_FILES = {
    "PALMS_HRLHF": "helpful_rlhf",
    "PALMS_HHRLHF": "hh_rlhf",
    "PALMS_RLMADISON": "rl_cai",
    "PALMS_RLMADISON_COT": "rl_cai_cot",
}
CHAIN_FILE = "PALMS_SLMADISON"
PUBLIC_URL = (
    "https://raw.githubusercontent.com/anthropics/ConstitutionalHarmlessnessPaper/"
    "831f7813dbafab659a526d7452f7adeac464b796/samples/{name}.jsonl"
)
TEST_PERCENT = 50  # prompts whose bucket is below this are test prompts (about half)


@dataclass(frozen=True)
class PaperAnswer:
    prompt_id: str
    prompt: str  # the human's request (first human turn)
    model_type: str  # helpful_rlhf, hh_rlhf, rl_cai, rl_cai_cot
    index: int  # 0..16 within its prompt and model
    answer: str
    pm_score: float  # the paper's PM


@dataclass(frozen=True)
class PaperChain:
    prompt_id: str
    prompt: str
    texts: tuple[str, ...]  # initial answer, then revisions 1..4


def palms_split(prompt: str) -> str:
    """'test' or 'train', fixed by the prompt's text."""
    return "test" if prompt_bucket(prompt) < TEST_PERCENT else "train"


def _prompt_id(prompt: str) -> str:
    return "palms-" + hashlib.sha256(prompt.encode()).hexdigest()[:10]


def _answer_text(sample: str) -> str:
    """The answer without the next turn's "Human:" marker the sampler stopped on."""
    return sample.strip().removesuffix("Human:").strip()


def _read(data_dir: str | None, name: str) -> list[dict]:
    """One samples file: from data_dir, else the public repository; one clear error if neither."""
    path = Path(data_dir or "") / "cai-paper" / "samples" / f"{name}.jsonl"
    if data_dir and path.is_dir():
        raise ConfigError(f"{path} is a folder; it should be the paper's {name}.jsonl file.")
    if data_dir and path.is_file():
        text = path.read_text(encoding="utf-8")
    else:
        if not models.hub_reachable():
            raise ConfigError(
                f"The paper's samples file {name}.jsonl was not found under paths.data_dir="
                f"{data_dir} (expected cai-paper/samples/{name}.jsonl) and the network is not "
                "reachable. Set paths.data_dir or CAI_DATA_DIR (see ../shared/data/README.md)."
            )
        with urllib.request.urlopen(PUBLIC_URL.format(name=name), timeout=60) as response:
            text = response.read().decode("utf-8")
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}, line {number}: not JSON ({error}).") from error
    return records


def load_answers(data_dir: str | None, split: str | None = None) -> list[PaperAnswer]:
    """Every answer of the four model files (of `split`'s prompts when given)."""
    answers = []
    for stem, model_type in ANSWER_FILES.items():
        for number, record in enumerate(_read(data_dir, stem), start=1):
            try:
                prompt = first_human_turn(record["rl_prompt"])
                samples = record["sampled_answers"]
                for index, sample in enumerate(samples):
                    answers.append(
                        PaperAnswer(
                            _prompt_id(prompt),
                            prompt,
                            model_type,
                            index,
                            _answer_text(sample["sampled_string"]),
                            float(sample["pm_scores"][0]["pm_score"]),
                        )
                    )
            except (KeyError, IndexError, TypeError, ValueError) as error:
                raise ConfigError(
                    f"{stem}.jsonl, line {number}: expected rl_prompt and sampled_answers with "
                    f"sampled_string and pm_scores[0].pm_score ({error!r})."
                ) from error
    return [a for a in answers if split is None or palms_split(a.prompt) == split]


def load_chains(data_dir: str | None, split: str | None = None) -> list[PaperChain]:
    """The paper's critique -> revision chains (of `split`'s prompts when given)."""
    chains = []
    for number, record in enumerate(_read(data_dir, CHAIN_FILE), start=1):
        try:
            prompt = first_human_turn(record["rl_prompt"])
            texts = [record["initial_response"][0]["sample"]]
            texts += [step["revision"]["sample"] for step in record["cst"]]
        except (KeyError, IndexError, TypeError) as error:
            raise ConfigError(
                f"{CHAIN_FILE}.jsonl, line {number}: expected rl_prompt, initial_response[0]."
                f"sample and cst[].revision.sample ({error!r})."
            ) from error
        chains.append(PaperChain(_prompt_id(prompt), prompt, tuple(t.strip() for t in texts)))
    return [c for c in chains if split is None or palms_split(c.prompt) == split]


def fingerprint(data_dir: str | None) -> str | None:
    """sha256 of the samples files (part of the keys of the stages that read them); None when
    the files are not under data_dir."""
    folder = Path(data_dir or "") / "cai-paper" / "samples"
    if not data_dir or not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for stem in [*ANSWER_FILES, CHAIN_FILE]:
        path = folder / f"{stem}.jsonl"
        digest.update(path.read_bytes() if path.is_file() else b"missing")
    return digest.hexdigest()[:16]
