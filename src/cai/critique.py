"""SL-CAI data: initial answers, then rounds of critique -> revision (Bai et al. 2022, section 3).

For each red-team prompt the helpful model answers (T = 1); then, for each round, one principle
is sampled uniformly with replacement (seeded per prompt), the model critiques its current answer
against the principle's critique request, and revises it against the revision request; the
revision becomes the answer of the next round. Helpfulness prompts get `sl.samples_per_helpful`
plain answers each (paper: 2). Every step is kept, so SL-CAI-n for any n comes from one run.
"""

from __future__ import annotations

import logging
import random

import datasets
from omegaconf import DictConfig

from cai.artifacts import Artifact
from cai.constitution import Principle
from cai.data import Prompt
from cai.errors import ConfigError
from cai.generation import GenerationEngine, Request, request_seed
from cai.prompting import SLPrompts

log = logging.getLogger(__name__)


def sample_principles(seed: int, prompt_id: str, rounds: int, num_principles: int) -> list[int]:
    """Indices of the principles used at each round for one prompt: uniform, with replacement,
    reproducible from (seed, prompt id) alone (paper section 3.1: "randomly sampled")."""
    rng = random.Random(f"{seed}:{prompt_id}")
    return [rng.randrange(num_principles) for _ in range(rounds)]


def sl_request(
    text: str, max_tokens: int, builder: SLPrompts, sl: DictConfig, seed: int
) -> Request:
    """One SL-CAI generation request: the `sl` sampling settings and the format's stop strings."""
    return Request(
        text,
        max_new_tokens=int(max_tokens),
        temperature=float(sl.temperature),
        top_p=float(sl.top_p),
        stop=builder.stops,
        seed=seed,
    )


def critique_revision_chain(
    engine: GenerationEngine,
    prompts: list[Prompt],
    builder: SLPrompts,
    principles: tuple[Principle, ...],
    sl: DictConfig,
    seed: int,
) -> list[dict]:
    """Run the whole loop for a list of red-team prompts; one record per prompt."""

    def request(text: str, max_tokens: int, *key) -> Request:
        return sl_request(text, max_tokens, builder, sl, request_seed(seed, *key))

    initial = engine.generate(
        [request(builder.initial(p.text), sl.max_answer_tokens, p.id, "initial") for p in prompts],
        desc="initial answers",
    )
    records = [
        {
            "id": p.id,
            "prompt": p.text,
            "category": p.category,
            "split": p.split,
            "initial": initial[i].text,
            "initial_tokens": initial[i].num_tokens,
            "initial_finish": initial[i].finish_reason,  # "length": cut off (no end token in SFT)
            "revisions": [],
        }
        for i, p in enumerate(prompts)
    ]
    current = [g.text for g in initial]
    finish = [g.finish_reason for g in initial]
    chosen = [
        sample_principles(seed, p.id, int(sl.generate_revisions), len(principles)) for p in prompts
    ]
    for round_index in range(int(sl.generate_revisions)):
        round_principles = [principles[c[round_index]] for c in chosen]
        critiques: list = [None] * len(prompts)
        if sl.critique:
            critiques = engine.generate(
                [
                    request(
                        builder.critique(p.text, current[i], round_principles[i]),
                        sl.max_critique_tokens,
                        p.id,
                        round_index,
                        "critique",
                    )
                    for i, p in enumerate(prompts)
                ],
                prefix=builder.prefix,
                desc=f"round {round_index + 1} critiques",
                keep_state=True,
            )
        # The revision prompt repeats the critique prompt and critique: the engine continues
        # from the critique's key/value state instead of encoding them again.
        revisions = engine.generate(
            [
                request(
                    builder.revision(
                        p.text,
                        current[i],
                        round_principles[i],
                        critiques[i].text if critiques[i] else None,
                    ),
                    sl.max_revision_tokens,
                    p.id,
                    round_index,
                    "revision",
                )
                for i, p in enumerate(prompts)
            ],
            prefix=builder.prefix,
            desc=f"round {round_index + 1} revisions",
            states=[c.extra.get("state") if c else None for c in critiques],
        )
        for i, record in enumerate(records):
            empty = not revisions[i].text
            if not empty:
                current[i], finish[i] = revisions[i].text, revisions[i].finish_reason
            record["revisions"].append(
                {
                    "round": round_index + 1,
                    "principle_id": round_principles[i].id,
                    "critique": critiques[i].text if critiques[i] else None,
                    "critique_tokens": critiques[i].num_tokens if critiques[i] else 0,
                    "revision": current[i],  # an empty revision keeps the previous answer
                    "revision_tokens": revisions[i].num_tokens,
                    "revision_finish": finish[i],  # of the text kept as this revision
                    "empty_revision": empty,
                }
            )
    return records


def helpful_samples(
    engine: GenerationEngine, prompts: list[Prompt], builder: SLPrompts, sl: DictConfig, seed: int
) -> list[dict]:
    """`sl.samples_per_helpful` answers per helpfulness prompt (paper: 2, section 3.1)."""
    n = int(sl.samples_per_helpful)
    requests = [
        sl_request(
            builder.initial(p.text),
            sl.max_answer_tokens,
            builder,
            sl,
            request_seed(seed, p.id, "helpful", k),
        )
        for p in prompts
        for k in range(n)
    ]
    outputs = engine.generate(requests, desc="helpful samples")
    return [
        {
            "id": p.id,
            "prompt": p.text,
            "category": p.category,
            "split": p.split,
            "samples": [outputs[i * n + k].text for k in range(n)],
            "sample_tokens": [outputs[i * n + k].num_tokens for k in range(n)],
            "sample_finishes": [outputs[i * n + k].finish_reason for k in range(n)],
        }
        for i, p in enumerate(prompts)
    ]


def fits_context(
    prompts: list[Prompt],
    builder: SLPrompts,
    sl: DictConfig,
    max_context: int,
    principles: tuple = (),
) -> tuple[list[Prompt], int]:
    """Keep prompts whose longest request (few-shot prefix, conversation, the longest
    principle's critique and revision requests, and the token budget) fits the model's context;
    count the rest. A principle that alone leaves no room is an error before any work."""
    tokenizer = builder.tokenizer
    prefix_tokens = len(tokenizer(builder.prefix).input_ids) if builder.prefix else 0
    lengths = {
        p.id: len(tokenizer(p.critique).input_ids) + len(tokenizer(p.revision).input_ids)
        for p in principles
    }
    longest_principle = max(lengths.values(), default=96)  # the real requests' tokens
    budget = (
        int(sl.max_answer_tokens)
        + int(sl.max_critique_tokens)
        + int(sl.max_revision_tokens)
        + longest_principle
    )
    if prefix_tokens + budget >= max_context:
        longest = max(lengths, key=lengths.get) if lengths else "(none)"
        raise ConfigError(
            f"No prompt can fit model.max_context={max_context} tokens: the few-shot "
            f"prefix takes {prefix_tokens}, the longest principle ({longest!r}) "
            f"{longest_principle}, and the answer, critique and revision budgets "
            f"{budget - longest_principle}. Shorten the principle, lower sl.num_fewshot or the "
            "sl.max_*_tokens budgets, or use a model with a longer context."
        )
    keep = [
        p
        for p in prompts
        if prefix_tokens + len(tokenizer(p.text).input_ids) + budget <= max_context
    ]
    skipped = len(prompts) - len(keep)
    if skipped:
        log.warning(
            "Skipped %d prompts longer than the model's context (%d tokens).",
            skipped,
            max_context,
        )
    return keep, skipped


def load_sl_dataset(artifact: Artifact, kind: str = "red_team"):
    """The SL data as a `datasets.Dataset` (kind: red_team or helpful)."""
    return datasets.load_dataset(
        "json", data_files=str(artifact.file(f"{kind}.jsonl")), split="train"
    )
