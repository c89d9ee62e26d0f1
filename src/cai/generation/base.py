"""The generation interface every stage that samples text uses, whatever the backend."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Request:
    prompt: str  # text after the shared prefix
    max_new_tokens: int = 128
    temperature: float = 1.0  # paper: T = 1 for SL-CAI samples (Bai et al. 2022, section 3.1)
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # generation ends at the first of these; the text is cut there
    seed: int = 0  # per-request sampling seed: same seed, same sample, whatever the batch


@dataclass(frozen=True)
class Generation:
    text: str
    num_tokens: int  # tokens generated (up to and including a stop string)
    finish_reason: str  # "stop" (end token or stop string) or "length"
    prompt_tokens: int = 0  # tokens of the prompt after the shared prefix
    token_ids: tuple[int, ...] = ()  # the sampled tokens (end token excluded), where known
    stop_token_id: int | None = None  # the end token sampled (finish "stop" on a token), if any
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ScoreRequest:
    context: str  # text after the shared prefix
    options: tuple[str, ...]  # continuations of `context` whose log-probabilities are wanted


@dataclass(frozen=True)
class OptionScores:
    logprobs: tuple[float, ...]  # per option: sum of log p(token) over all its tokens
    num_tokens: tuple[int, ...]  # per option: how many tokens it has


class GenerationEngine:
    """generate(requests, prefix) -> one Generation per request, in order;
    score(requests, prefix) -> one OptionScores per request, in order."""

    def generate(
        self,
        requests: list[Request],
        prefix: str = "",
        desc: str = "generate",
        keep_state: bool = False,
        states: list | None = None,
    ) -> list[Generation]:
        """keep_state/states: an engine may reuse the work of an earlier request whose prompt and
        output the new prompt repeats (engines without this ignore them)."""
        raise NotImplementedError

    def score(
        self, requests: list[ScoreRequest], prefix: str = "", desc: str = "score"
    ) -> list[OptionScores]:
        """Log-probabilities of each request's options after `prefix + request.context`."""
        raise NotImplementedError

    def update_weights(self, model) -> None:
        """Load the weights of `model` (a transformers model of the same architecture, e.g. the
        policy PPO trains) into the engine, so the next samples come from them."""
        raise NotImplementedError(f"{type(self).__name__} cannot take new weights.")


def request_seed(seed: int, *parts) -> int:
    """A sampling seed for one generation request, stable across batching and resumes."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
