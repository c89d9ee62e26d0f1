"""Preference comparisons: two answers to one conversation, and the probability that the first
is better. One type for every use: pairs the feedback model labels, the PM's training pairs (AI
labels, hh-rlhf's human choices, the paper's PM scores), the eval judges' pairs."""

from __future__ import annotations

from dataclasses import dataclass

from cai.constitution import parse_turns


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
