"""AI feedback: soft preference labels from a multiple-choice question (Bai et al. 2022, 4.1).

For each pair of answers to a red-team prompt the feedback model reads

    Consider the following conversation between a human and an assistant:
    [conversation]
    [principle] Options:
     (A) [[[answer A]]]
     (B) [[[answer B]]]
    The answer is:

after a few-shot block of solved questions, and the log-probabilities of the continuations
" (A)" and " (B)" (every token of each) are normalised over the two: p(A). Settings
(`conf/feedback/default.yaml`):
- `num_principles=k`: k principles sampled per comparison (seeded), p averaged (ensembling);
- `swap`: both orders scored and averaged, which cancels position bias (recorded);
- `cot`: the chain-of-thought format ("Let's think step by step:"), reasoning generated, then the
  options scored after it, p clamped to [clamp_low, clamp_high] (paper: 0.4-0.6); `cot_samples=n`
  averages n reasoning samples.

The maths are small pure functions; `label_comparisons` plans every query of a batch of
comparisons, runs them through the engine in one batch, and combines them.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import datasets
from omegaconf import DictConfig

from cai.artifacts import Artifact
from cai.comparisons import Comparison
from cai.constitution import Constitution
from cai.errors import ConfigError
from cai.generation.base import GenerationEngine, Request, ScoreRequest, request_seed

log = logging.getLogger(__name__)

OPTIONS = (" (A)", " (B)")  # the continuations scored (paper 4.1: "The answer is: (A)")
REASONING_STOPS = ("\n\nHuman:", "\n\nAssistant:", "\n\nConsider the following")


# ---------------------------------------------------------------------------------------------
# 1. Pure maths


def option_probability(logprob_a: float, logprob_b: float) -> float:
    """p(A) = P(A) / (P(A) + P(B)) from the two options' summed token log-probabilities."""
    return 1.0 / (1.0 + math.exp(logprob_b - logprob_a))


def clamp(p: float, low: float, high: float) -> float:
    """CoT probabilities are nearly 0 or 1; the paper clamps them to [0.4, 0.6] (section 4.1)."""
    return min(max(p, low), high)


def first_answer_probability(p_first_option: float, swapped: bool) -> float:
    """p(the comparison's first answer is better) from p(option (A)): in the swapped order the
    first answer sits at (B)."""
    return 1.0 - p_first_option if swapped else p_first_option


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def sample_feedback_principles(seed: int, comparison_id: str, k: int, available: int) -> list[int]:
    """k distinct principle indices for one comparison, seeded by (seed, comparison id)."""
    if not 1 <= k <= available:
        raise ConfigError(
            f"feedback.num_principles={k}, but the constitution has {available} feedback "
            f"principles: use 1..{available}."
        )
    return random.Random(f"{seed}/feedback/{comparison_id}").sample(range(available), k)


# ---------------------------------------------------------------------------------------------
# 2. Prompts (the paper's formats; raw text for every model, as the paper's feedback model is a
#    pretrained language model reading transcripts)


HELPFULNESS = -1  # principle index of the helpfulness question (helpfulness pairs)


class FeedbackPrompts:
    def __init__(
        self,
        constitution: Constitution,
        helpfulness_principle: str = "",
        seed: int = 0,
        principles: tuple[str, ...] | None = None,
    ):
        """`principles`: the questions asked (default: the constitution's feedback principles;
        the evaluation judge passes the constitution's evaluation principles)."""
        self.principles = tuple(principles or constitution.feedback)
        self.helpfulness_principle = helpfulness_principle
        # Few-shot block: each solved example under a principle sampled for it (seeded by the
        # stage's seed; the paper samples the principles of its few-shot examples too, section
        # 4.1) and the correct answer alternating between (A) and (B). The block is the same for
        # every query of a run, so the engine encodes it once.
        rng = random.Random(f"{seed}/feedback-fewshot")
        parts = []
        for i, example in enumerate(constitution.feedback_fewshot):
            correct, wrong = example.corrects[0], example.incorrects[0]
            first, second, letter = (correct, wrong, "A") if i % 2 == 0 else (wrong, correct, "B")
            conversation = example.prompt.removesuffix("\n\nAssistant:")
            principle = self.principles[rng.randrange(len(self.principles))]
            parts.append(self._question(conversation, principle, first, second) + f" ({letter})")
        self.prefix = "".join(parts)
        self.cot_prefix = "".join(
            text.replace("{}", self.principles[rng.randrange(len(self.principles))], 1)
            for text in constitution.cot_fewshot
        )

    @staticmethod
    def _question(conversation: str, principle: str, first: str, second: str) -> str:
        return (
            "\n\nConsider the following conversation between a human and an assistant:"
            f"{conversation}\n\n\n{principle.strip()}\n (A) [[[{first}]]]\n (B) [[[{second}]]]"
            "\n\nThe answer is:"
        )

    def principle(self, index: int) -> str:
        if index == HELPFULNESS:
            if not self.helpfulness_principle:
                raise ConfigError("Helpfulness pairs need feedback.helpfulness_principle.")
            return self.helpfulness_principle
        return self.principles[index]

    def question(self, request: str, principle: int, first: str, second: str) -> str:
        """The multiple-choice question (after `self.prefix`), ending in "The answer is:"."""
        return self._question(f"\n\nHuman: {request}", self.principle(principle), first, second)

    def cot_question(self, request: str, principle: int, first: str, second: str) -> str:
        """The chain-of-thought question (after `self.cot_prefix`), ending where the model
        starts reasoning (the paper's RLMadisonPrecog format)."""
        return (
            "\n\nHuman: Consider the following conversation between a human (H) and an "
            f"assistant (A):\n\nH: {request}\n\n{self.principle(principle)}\n (A) [[[{first}]]]"
            f"\n (B) [[[{second}]]]\n\nAssistant: Let's think step by step:"
        )

    @staticmethod
    def after_reasoning(cot_question: str, reasoning: str) -> str:
        """The context in which the options are scored once the reasoning is written."""
        return f"{cot_question} {reasoning.strip()}\n\nHuman:\nSo the answer is:"


# ---------------------------------------------------------------------------------------------
# 3. Labelling a batch of comparisons


@dataclass(frozen=True)
class Query:
    """One scored question: a comparison under one principle, in one order, one CoT sample."""

    comparison: int
    principle: int
    swapped: bool
    sample: int


@dataclass(frozen=True)
class LabelSettings:
    num_principles: int = 1
    swap: bool = False
    cot: bool = False
    cot_samples: int = 1
    clamp_low: float = 0.4
    clamp_high: float = 0.6
    cot_max_tokens: int = 96
    cot_temperature: float = 1.0

    @classmethod
    def from_config(cls, node: DictConfig) -> LabelSettings:
        settings = cls(**{k: node[k] for k in cls.__dataclass_fields__ if k in node})
        settings.check()
        return settings

    def check(self) -> None:
        if not 0.0 <= self.clamp_low <= self.clamp_high <= 1.0:
            raise ConfigError(
                f"feedback.clamp_low={self.clamp_low} and clamp_high={self.clamp_high}: need "
                "0 <= clamp_low <= clamp_high <= 1 (paper: 0.4 and 0.6)."
            )
        if self.cot_samples < 1 or self.num_principles < 1:
            raise ConfigError("feedback.cot_samples and feedback.num_principles must be >= 1.")


def plan_queries(
    comparisons: list[Comparison], settings: LabelSettings, num_principles: int, seed: int
) -> list[Query]:
    queries = []
    samples = settings.cot_samples if settings.cot else 1
    for index, comparison in enumerate(comparisons):
        principles = (
            [HELPFULNESS]
            if comparison.kind == "helpful"
            else sample_feedback_principles(
                seed, comparison.id, settings.num_principles, num_principles
            )
        )
        for principle in principles:
            for swapped in (False, True) if settings.swap else (False,):
                queries += [Query(index, principle, swapped, s) for s in range(samples)]
    return queries


def label_comparisons(
    engine: GenerationEngine,
    prompts: FeedbackPrompts,
    comparisons: list[Comparison],
    settings: LabelSettings,
    seed: int,
) -> list[dict]:
    """One record per comparison: p(A) (the first answer better) and every query behind it."""
    queries = plan_queries(comparisons, settings, len(prompts.principles), seed)

    def answers(q: Query) -> tuple[str, str]:
        a, b = comparisons[q.comparison].answers
        return (b, a) if q.swapped else (a, b)

    # 1. contexts: the question itself, or (CoT) the question + generated reasoning
    if settings.cot:
        questions = [
            prompts.cot_question(comparisons[q.comparison].prompt, q.principle, *answers(q))
            for q in queries
        ]
        generations = engine.generate(
            [
                Request(
                    text,
                    max_new_tokens=settings.cot_max_tokens,
                    temperature=settings.cot_temperature,
                    stop=REASONING_STOPS,
                    seed=_query_seed(seed, comparisons[q.comparison].id, q),
                )
                for text, q in zip(questions, queries, strict=True)
            ],
            prefix=prompts.cot_prefix,
            desc="feedback reasoning",
        )
        reasoning = [g.text for g in generations]
        contexts = [
            prompts.after_reasoning(text, r) for text, r in zip(questions, reasoning, strict=True)
        ]
        prefix = prompts.cot_prefix
    else:
        reasoning = [None] * len(queries)
        contexts = [
            prompts.question(comparisons[q.comparison].prompt, q.principle, *answers(q))
            for q in queries
        ]
        prefix = prompts.prefix
    # 2. score " (A)" and " (B)" after each context
    scores = engine.score(
        [ScoreRequest(c, OPTIONS) for c in contexts], prefix=prefix, desc="feedback scores"
    )
    # 3. p(option A) per query (clamped for CoT), p(first answer), then the mean per comparison
    per_comparison: list[list[dict]] = [[] for _ in comparisons]
    for q, score, thought in zip(queries, scores, reasoning, strict=True):
        p_option_a = option_probability(*score.logprobs)
        if settings.cot:
            p_option_a = clamp(p_option_a, settings.clamp_low, settings.clamp_high)
        per_comparison[q.comparison].append(
            {
                "principle": q.principle,
                "swapped": q.swapped,
                "sample": q.sample,
                "logprob_a": score.logprobs[0],
                "logprob_b": score.logprobs[1],
                "p_option_a": p_option_a,
                "p_first": first_answer_probability(p_option_a, q.swapped),
                **({"reasoning": thought} if thought is not None else {}),
            }
        )
    records = []
    for comparison, details in zip(comparisons, per_comparison, strict=True):
        records.append(
            {
                "id": comparison.id,
                "prompt": comparison.prompt,
                "answer_a": comparison.answers[0],
                "answer_b": comparison.answers[1],
                "p_a": mean([d["p_first"] for d in details]),
                "kind": comparison.kind,
                "principles": sorted({_principle_id(d["principle"]) for d in details}),
                # mean p of whatever sits at (A), minus 0.5: > 0 favours the first slot
                "position_bias": mean([d["p_option_a"] for d in details]) - 0.5,
                "queries": details,
            }
        )
    return records


def _principle_id(index: int) -> str:
    return "helpfulness" if index == HELPFULNESS else f"feedback{index}"


def _query_seed(seed: int, comparison_id: str, q: Query) -> int:
    return request_seed(seed, "feedback", comparison_id, q.principle, q.swapped, q.sample)


# ---------------------------------------------------------------------------------------------
# 4. The pipeline stage


def load_labels(artifact: Artifact):
    """The labels as a `datasets.Dataset` (columns id, prompt, answer_a, answer_b, p_a, ...)."""
    return datasets.load_dataset(
        "json", data_files=str(artifact.file("labels.jsonl")), split="train"
    )
