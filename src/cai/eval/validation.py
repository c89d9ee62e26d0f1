"""Judge validation on the paper's released PALMS samples (cai.paper_samples): before a judge's
numbers go into a figure, measure it against the paper's own 52B preference model.

- Agreement: over pairs of answers to the same prompt (both from the paper's four models), the
  fraction the judge orders as the paper's PM does (a judge tie counts 1/2); 95% interval by
  bootstrap over prompts. 0.5 is chance; a judge whose interval reaches 0.5 is `at_chance`.
- Scores per model type: the judge's mean score of the paper's Helpful-RLHF, HH-RLHF, RL-CAI
  and RL-CAI-CoT answers, beside the paper PM's mean of the same answers.
- Scores per revision: the judge's mean score of the paper's SL-CAI chains at revision 0..4
  (the paper's Figure 5 on its own data: a harmlessness judge that works scores it rising).

Scorers are functions, so any judge fits: a PM (`score(dialogues)`), or a pairwise judge
(`judge(pairs) -> p(A better)`, the AI-feedback judge).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from cai.errors import ConfigError
from cai.paper_samples import PaperAnswer, PaperChain, load_answers, load_chains
from cai.results import mean_interval, row

PAPER_JUDGE = "paper_pm_52b"  # the judge name of the paper's own PM scores in result rows


@dataclass(frozen=True)
class ValidationSettings:
    answers_per_model: int | None = 8  # per prompt and model type (null: all 17)
    pairs_per_prompt: int = 8  # pairwise judges: seeded pairs per prompt
    bootstrap: int = 1000
    seed: int = 0


def subset(answers: list[PaperAnswer], per_model: int | None) -> list[PaperAnswer]:
    """The first `per_model` answers of each (prompt, model type)."""
    return [a for a in answers if per_model is None or a.index < int(per_model)]


# ---------------------------------------------------------------------------------------------
# 1. Pure statistics


def agreement_counts(
    prompt_ids: list[str], judge: list[float], paper: list[float]
) -> dict[str, tuple[float, int]]:
    """Per prompt: (pairs ordered as the paper orders them, pairs), over every pair of answers to
    the same prompt whose paper scores differ. A judge tie counts 1/2."""
    by_prompt: dict[str, list[int]] = {}
    for i, pid in enumerate(prompt_ids):
        by_prompt.setdefault(pid, []).append(i)
    counts = {}
    for pid, members in by_prompt.items():
        agree, total = 0.0, 0
        for i, j in itertools.combinations(members, 2):
            if paper[i] == paper[j]:
                continue
            total += 1
            d = (judge[i] - judge[j]) * (paper[i] - paper[j])
            agree += 1.0 if d > 0 else 0.5 if d == 0 else 0.0
        counts[pid] = (agree, total)
    return counts


def pairwise_counts(
    prompt_ids: list[str], p_a: list[float], paper_a: list[float], paper_b: list[float]
) -> dict[str, tuple[float, int]]:
    """The same for a pairwise judge: p_a = its probability that A is better."""
    counts: dict[str, tuple[float, int]] = {}
    for pid, p, a, b in zip(prompt_ids, p_a, paper_a, paper_b, strict=True):
        if a == b:
            continue
        agree, total = counts.get(pid, (0.0, 0))
        d = (p - 0.5) * (a - b)
        counts[pid] = (agree + (1.0 if d > 0 else 0.5 if d == 0 else 0.0), total + 1)
    return counts


def bootstrap_agreement(
    counts: dict[str, tuple[float, int]], resamples: int, seed: int
) -> tuple[float, float, float, int]:
    """(agreement, 95% low, 95% high, pairs): prompts resampled with replacement."""
    items = [counts[k] for k in sorted(counts)]
    pairs = sum(t for _, t in items)
    if pairs == 0:
        return float("nan"), float("nan"), float("nan"), 0
    value = sum(a for a, _ in items) / pairs
    rng = random.Random(f"{seed}/validation-bootstrap")
    draws = []
    for _ in range(resamples):
        sample = [items[rng.randrange(len(items))] for _ in items]
        total = sum(t for _, t in sample)
        if total:
            draws.append(sum(a for a, _ in sample) / total)
    draws.sort()
    if not draws:
        return value, value, value, pairs
    low = draws[int(0.025 * (len(draws) - 1))]
    high = draws[int(round(0.975 * (len(draws) - 1)))]
    return value, low, high, pairs


def trust_flag(low: float, high: float) -> str:
    """'at_chance' when the interval reaches 0.5, 'below_chance' when it lies below, else ''."""
    if high < 0.5:
        return "below_chance"
    return "at_chance" if low <= 0.5 else ""


# ---------------------------------------------------------------------------------------------
# 2. Validating a judge


def _summary(estimate: tuple, prompts: int) -> dict:
    """The manifest's summary of an agreement estimate (value, low, high, pairs)."""
    value, low, high, pairs = estimate
    return {
        "agreement": round(value, 4),
        "interval": [round(low, 4), round(high, 4)],
        "pairs": pairs,
        "prompts": prompts,
        "flag": trust_flag(low, high),
    }


def _agreement_row(common: dict, name: str, estimate: tuple) -> dict:
    value, low, high, pairs = estimate
    return row(
        **common,
        eval="palms_test",
        method="agreement",
        judge=name,
        metric="agreement_paper_pm",
        value=value,
        low=low,
        high=high,
        n=pairs,
        flag=trust_flag(low, high),
    )


def validate_scorer(
    name: str,
    score: Callable[[list], list[float]],
    answers: list[PaperAnswer],
    chains: list[PaperChain],
    settings: ValidationSettings,
    common: dict,
) -> tuple[list[dict], dict]:
    """Rows and a summary for a judge that scores single answers (a PM). `score(dialogues)`:
    one number per [{"role": "user", ..}, {"role": "assistant", ..}] dialogue."""

    def dialogue(prompt: str, answer: str) -> list[dict]:
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]

    chosen = subset(answers, settings.answers_per_model)
    scores = score([dialogue(a.prompt, a.answer) for a in chosen])
    counts = agreement_counts([a.prompt_id for a in chosen], scores, [a.pm_score for a in chosen])
    estimate = bootstrap_agreement(counts, settings.bootstrap, settings.seed)
    rows = [_agreement_row(common, name, estimate)]
    by_type = {}
    for model_type in dict.fromkeys(a.model_type for a in chosen):
        mine = [i for i, a in enumerate(chosen) if a.model_type == model_type]
        for judge, values in ((name, scores), (PAPER_JUDGE, [a.pm_score for a in chosen])):
            mean, low, high = mean_interval([values[i] for i in mine])
            rows.append(
                row(**common, eval="palms_answers", method=model_type, judge=judge,
                    metric="pm_score", value=mean, low=low, high=high, n=len(mine))
            )  # fmt: skip
            if judge == name:
                by_type[model_type] = round(mean, 4)
    by_revision = []
    if chains:
        steps = min(len(c.texts) for c in chains)
        texts = [(n, c.prompt, c.texts[n]) for c in chains for n in range(steps)]
        values = score([dialogue(p, t) for _, p, t in texts])
        for n in range(steps):
            mean, low, high = mean_interval(
                [v for (m, _, _), v in zip(texts, values, strict=True) if m == n]
            )
            rows.append(
                row(**common, eval="palms_revisions", method="paper_sl_cai", judge=name,
                    revisions=n, metric="pm_score", value=mean, low=low, high=high,
                    n=len(chains))
            )  # fmt: skip
            by_revision.append(round(mean, 4))
    summary = _summary(estimate, len(counts))
    return rows, summary | {"score_by_model_type": by_type, "score_by_revision": by_revision}


def palms_pairs(
    answers: list[PaperAnswer], settings: ValidationSettings
) -> list[tuple[PaperAnswer, PaperAnswer]]:
    """Seeded pairs of answers to the same prompt (paper scores differ), per prompt."""
    chosen = subset(answers, settings.answers_per_model)
    by_prompt: dict[str, list[PaperAnswer]] = {}
    for a in chosen:
        by_prompt.setdefault(a.prompt_id, []).append(a)
    pairs = []
    for pid in sorted(by_prompt):
        candidates = [
            (a, b) for a, b in itertools.combinations(by_prompt[pid], 2) if a.pm_score != b.pm_score
        ]
        rng = random.Random(f"{settings.seed}/palms-pairs/{pid}")
        pairs += rng.sample(candidates, min(settings.pairs_per_prompt, len(candidates)))
    return pairs


def validate_pairwise(
    name: str,
    judge: Callable[[list[tuple[str, str, str]]], list[float]],
    answers: list[PaperAnswer],
    settings: ValidationSettings,
    common: dict,
) -> tuple[list[dict], dict]:
    """Agreement of a pairwise judge: `judge([(prompt, answer_a, answer_b)])` -> p(A better)."""
    pairs = palms_pairs(answers, settings)
    p_a = judge([(a.prompt, a.answer, b.answer) for a, b in pairs])
    counts = pairwise_counts(
        [a.prompt_id for a, _ in pairs], p_a, [a.pm_score for a, _ in pairs],
        [b.pm_score for _, b in pairs],
    )  # fmt: skip
    estimate = bootstrap_agreement(counts, settings.bootstrap, settings.seed)
    return [_agreement_row(common, name, estimate)], _summary(estimate, len(counts))


def validation_settings(cfg) -> ValidationSettings:
    """The settings `judge.validation` (used for every judge and for the training PM)."""
    node = cfg.judge.validation
    return ValidationSettings(
        answers_per_model=node.answers_per_model,
        pairs_per_prompt=int(node.pairs_per_prompt),
        bootstrap=int(node.bootstrap),
        seed=int(cfg.seed),
    )


def validate_pm(scorer, cfg, common: dict) -> tuple[list[dict], dict]:
    """A preference model's validation on the held-out PALMS prompts: rows and a summary.
    `common`: the rows' stage, model, parameters and judge (the name it goes by). Without the
    paper's samples: a warning, no rows, and a summary saying `unvalidated`."""
    try:
        answers = load_answers(cfg.paths.data_dir, "test")
        chains = load_chains(cfg.paths.data_dir, "test")
    except ConfigError as error:
        logging.getLogger(__name__).warning("%s is not validated: %s", common["judge"], error)
        return [], {"flag": "unvalidated", "reason": str(error)}
    return validate_scorer(
        common["judge"],
        lambda dialogues: scorer.score(dialogues, progress=True),
        answers,
        chains,
        validation_settings(cfg),
        {k: v for k, v in common.items() if k not in ("judge", "method")},
    )
