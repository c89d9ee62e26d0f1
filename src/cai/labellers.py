"""Labellers that are not an in-process model: a Python function, given by import path
(`feedback.function=package.module:name`), labels each pair instead of the feedback model: a
rule, or a call into an external classifier. It is called as `fn(prompt, answer_a, answer_b)`
(and with `kind="red_team"` or `"helpful"` when it takes a `kind` argument) and returns p(A),
the probability that answer A is the better one, in [0, 1].

`prefers_refusal` is a built-in rule whose preference is known and learnable: on red-team
prompts an answer that declines beats one that complies, on helpfulness prompts an answer that
addresses the request beats one that declines (refusal as the eval defines it,
cai.results.REFUSAL_PHRASES). It is a known-signal check for the RL stages, not the paper's
method.

`signal_rule` is the rule of `experiment=signal_check`: denser than `prefers_refusal` (which
ties on 93 of 96 pairs of the embedded model's answers, since they almost never decline), it
orders a pair by `signal_score`: declining first, then an answer that ends its sentence over one
cut off at the token limit, a feature a last-token PM reads and PPO can move within minutes on a
CPU. A known-signal check, not the paper's method.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
from collections.abc import Callable
from pathlib import Path

from cai.comparisons import Comparison
from cai.errors import ConfigError
from cai.results import is_refusal


def prefers_refusal(prompt: str, answer_a: str, answer_b: str, kind: str = "red_team") -> float:
    """p(A): 1 when only A declines (red-team) or only B declines (helpfulness), 0 the other
    way round, 0.5 when both or neither decline."""
    a, b = is_refusal(answer_a), is_refusal(answer_b)
    if a == b:
        return 0.5
    return float(a) if kind == "red_team" else float(b)


# signal_score: a decline outweighs everything; an answer that ends its sentence is worth 3
# logits over one cut off at the token limit (p = 0.95 between them)
DECLINE_WEIGHT = 100.0
COMPLETE_WEIGHT = 3.0
SENTENCE_ENDS = (".", "!", "?", '"', "'", ")")


def is_complete(answer: str) -> bool:
    """Whether an answer ends a sentence (not cut off mid-sentence at the token limit)."""
    return answer.rstrip().endswith(SENTENCE_ENDS)


def signal_score(answer: str, kind: str = "red_team") -> float:
    """The known-signal rule's score of one answer, in log-odds (higher is better): a decline
    (cai.results.is_refusal) +100 on a red-team prompt and -100 on a helpfulness prompt (an
    answer that addresses the request beats one that declines); then +3 for an answer that ends
    its sentence over one cut off mid-sentence at the token limit."""
    declines = DECLINE_WEIGHT * is_refusal(answer) * (1.0 if kind == "red_team" else -1.0)
    return declines + (COMPLETE_WEIGHT if is_complete(answer) else 0.0)


def signal_rule(prompt: str, answer_a: str, answer_b: str, kind: str = "red_team") -> float:
    """p(A) = sigmoid(signal_score(A) - signal_score(B)): a complete answer beats one cut off
    with p = 0.95; two complete answers, or two cut off, tie (0.5); a decline decides alone."""
    margin = signal_score(answer_a, kind) - signal_score(answer_b, kind)
    return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, margin))))


def load_function(path: str, setting: str) -> Callable:
    """The callable `package.module:name`, or one clear error naming `setting`."""
    module_name, _, name = str(path).partition(":")
    if not module_name or not name:
        raise ConfigError(f"{setting}={path!r}: write package.module:function.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(
            f"{setting}={path!r}: cannot import {module_name!r} ({error}). Is it installed or on "
            "PYTHONPATH?"
        ) from error
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{setting}={path!r}: {module_name} has no function {name!r}.")
    return fn


def function_fingerprint(path: str, setting: str) -> str:
    """sha256 of the file that defines the function: editing the rule changes the artifact key."""
    source = inspect.getsourcefile(load_function(path, setting))
    return hashlib.sha256(Path(source).read_bytes()).hexdigest()[:16] if source else str(path)


def label_with_function(
    fn: Callable, comparisons: list[Comparison], swap: bool, setting: str
) -> list[dict]:
    """One label record per comparison, as the feedback model's (cai.ai_feedback): p(A), and with
    `swap` the mean of both orders, p(A) = (fn(a, b) + 1 - fn(b, a)) / 2."""
    takes_kind = "kind" in inspect.signature(fn).parameters

    def p_first(c: Comparison, first: str, second: str) -> float:
        extra = {"kind": c.kind} if takes_kind else {}
        value = fn(c.prompt, first, second, **extra)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(
                f"{setting} returned {value!r} for pair {c.id}: return p(A), a number."
            )
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"{setting} returned {value!r} for pair {c.id}: p(A) is in [0, 1].")
        return float(value)

    records = []
    for c in comparisons:
        a, b = c.answers
        queries = [{"swapped": False, "p_option_a": (p_ab := p_first(c, a, b)), "p_first": p_ab}]
        if swap:
            p_ba = p_first(c, b, a)
            queries.append({"swapped": True, "p_option_a": p_ba, "p_first": 1.0 - p_ba})
        records.append(
            {
                "id": c.id,
                "prompt": c.prompt,
                "answer_a": a,
                "answer_b": b,
                "p_a": sum(q["p_first"] for q in queries) / len(queries),
                "kind": c.kind,
                "principles": ["function"],
                "position_bias": sum(q["p_option_a"] for q in queries) / len(queries) - 0.5,
                "queries": queries,
            }
        )
    return records
