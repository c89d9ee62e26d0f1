"""Preference comparisons: two answers to one conversation, and the probability that the first
is better. One type for every use: pairs the feedback model labels, the PM's training pairs (AI
labels, hh-rlhf's human choices, the paper's PM scores), the eval judges' pairs."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from cai.constitution import parse_turns
from cai.data import hh_rlhf_comparisons, prompt_bucket
from cai.errors import ConfigError

log = logging.getLogger(__name__)


def answer_turns(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def transcript_turns(transcript: str) -> list[dict]:
    """'\\n\\nHuman: ..\\n\\nAssistant: ..' (hh-rlhf, the HHH evals) -> turns."""
    return parse_turns(transcript)


@dataclass(frozen=True)
class Comparison:
    """`a` and `b`: the conversation ending with each answer ({"role", "content"} turns)."""

    a: list[dict]
    b: list[dict]
    p_a: float | None = None  # probability that A is better (soft label); None: not labelled
    source: str = ""  # who labelled it: ai_harmless, ai_helpful, human_harmless, paper_pm, ...
    id: str = ""
    kind: str = "red_team"  # red_team: harmlessness principles; helpful: the helpfulness question
    # whether each answer ended (False: cut off by the length limit, so it gets no end token
    # where it is trained on, as in SFT and PPO); human and paper answers are complete
    ended: tuple[bool, bool] = (True, True)

    @classmethod
    def of_answers(
        cls, id: str, prompt: str, answers: tuple[str, str], kind: str = "red_team", **label
    ) -> Comparison:
        """Two answers to one human request."""
        a, b = answers
        return cls(answer_turns(prompt, a), answer_turns(prompt, b), id=id, kind=kind, **label)

    @property
    def prompt(self) -> str:
        """The human's request the answers reply to (its last turn before the answers)."""
        return next(t["content"] for t in reversed(self.a[:-1]) if t["role"] == "user")

    @property
    def answers(self) -> tuple[str, str]:
        return self.a[-1]["content"], self.b[-1]["content"]


def human_comparisons(pairs: list[tuple[str, str]], source: str) -> list[Comparison]:
    """(chosen, rejected) transcripts as comparisons: chosen = A, p(A) = 1."""
    return [Comparison(transcript_turns(c), transcript_turns(r), 1.0, source) for c, r in pairs]


def preference_comparisons(
    labels: list[dict],
    harmlessness: str,
    helpfulness: str,
    helpfulness_ratio: float | None,
    max_human: int | None,
    data_dir: str | None,
    seed: int,
    setting: str = "pm",
) -> tuple[list[Comparison], dict]:
    """The comparisons a preference learner trains on (the PM; DPO on the same data): AI labels
    of the feedback stage (`labels`, its labels.jsonl records), human hh-rlhf comparisons
    (split pm_train) or none, for harmlessness and for helpfulness, mixed at
    `helpfulness_ratio` helpfulness comparisons per harmlessness comparison. `setting` names the
    config group in errors (pm, dpo)."""

    def ai(kind: str, source: str) -> list[Comparison]:
        """AI labels of the feedback stage for pairs of this kind (red_team, helpful)."""
        return [
            Comparison.of_answers(
                r["id"],
                r["prompt"],
                (r["answer_a"], r["answer_b"]),
                kind,
                p_a=r["p_a"],
                source=source,
                ended=(r.get("finish_a") != "length", r.get("finish_b") != "length"),
            )  # fmt: skip
            for r in labels
            if r.get("kind", "red_team") == kind
        ]

    def human(subset: str, source: str) -> list[Comparison]:
        """Human comparisons of hh-rlhf `subset`, split pm_train."""
        return human_comparisons(
            hh_rlhf_comparisons(data_dir, subset, "pm_train")[:max_human], source
        )

    harmlessness_sources = {
        "ai": lambda: ai("red_team", "ai_harmless"),
        "human": lambda: human("harmless-base", "human_harmless"),
        "none": list,
    }
    helpfulness_sources = {
        "ai": lambda: ai("helpful", "ai_helpful"),
        "hh_rlhf": lambda: human("helpful-base", "human_helpful"),
        "none": list,
    }
    if harmlessness not in harmlessness_sources:
        raise ConfigError(f"{setting}.harmlessness={harmlessness!r}: use ai, human or none.")
    if helpfulness not in helpfulness_sources:
        raise ConfigError(f"{setting}.helpfulness={helpfulness!r}: use hh_rlhf, ai or none.")
    harmless = harmlessness_sources[harmlessness]()
    helpful = helpfulness_sources[helpfulness]()
    if helpfulness_ratio is not None:
        harmless, helpful = mix(harmless, helpful, float(helpfulness_ratio), int(seed))
    counts = {"harmlessness_pairs": len(harmless), "helpfulness_pairs": len(helpful)}
    return harmless + helpful, counts


def hold_out(comparisons: list[Comparison], percent: int) -> tuple[list, list]:
    """(train, held out): AI-labelled comparisons (source ai_*) whose prompt falls in the first
    `percent` of 100 buckets of a hash of its text are held out; human ones always train."""
    held = [
        c.source.startswith("ai_") and prompt_bucket(f"pm-holdout/{c.prompt}") < int(percent)
        for c in comparisons
    ]
    train = [c for c, h in zip(comparisons, held, strict=True) if not h]
    return train, [c for c, h in zip(comparisons, held, strict=True) if h]


def decided_pairs(comparisons: list[Comparison], min_margin: float) -> list[tuple]:
    """(preferred, other) conversations of the comparisons whose label decides,
    |p(A) - 0.5| >= min_margin."""
    return [
        (c.a, c.b) if c.p_a > 0.5 else (c.b, c.a)
        for c in comparisons
        if abs(c.p_a - 0.5) >= min_margin and c.p_a != 0.5
    ]


def mix(harmless: list, helpful: list, ratio: float, seed: int) -> tuple[list, list]:
    """Harmlessness and helpfulness comparisons at `ratio` helpful per harmless one: the larger
    side is subsampled (seeded), so every PM built from a config (RL-CAI's on AI labels, the
    HH-RLHF baseline's on many more human ones) trains on the same mix."""
    if not harmless or not helpful or ratio <= 0:
        return harmless, [] if ratio <= 0 else helpful
    rng = random.Random(f"{seed}/pm-mix")
    if round(ratio * len(harmless)) > len(helpful):  # too few helpful: fewer harmless
        harmless = rng.sample(harmless, max(1, round(len(helpful) / ratio)))
    keep = min(len(helpful), round(ratio * len(harmless)))
    return harmless, rng.sample(helpful, keep)


def clean(comparisons: list[Comparison], what: str = "PM") -> tuple[list[Comparison], dict]:
    """Skip and count labels that are NaN or outside [0, 1], and pairs with identical texts."""
    kept, bad_label, identical = [], 0, 0
    for c in comparisons:
        if not (isinstance(c.p_a, (int, float)) and 0.0 <= c.p_a <= 1.0):  # NaN fails both
            bad_label += 1
        elif c.a == c.b:
            identical += 1
        else:
            kept.append(c)
    for count, why in ((bad_label, "labels NaN or outside [0, 1]"), (identical, "identical")):
        if count:
            log.warning("Skipped %d %s comparisons: %s.", count, what, why)
    return kept, {"skipped_bad_label": bad_label, "skipped_identical": identical}
