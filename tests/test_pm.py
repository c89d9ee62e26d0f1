"""The preference model: the soft-label loss by hand, learning a separable set, save/reload,
bad labels, the hh-rlhf splits, and the pm stage on the tiny model."""

import contextlib
import math

import pytest
import torch
from conftest import TINY_STAGES

from cai.comparisons import Comparison, answer_turns, clean
from cai.errors import ConfigError
from cai.modules.pm import (
    EncodedPair,
    PairDataModule,
    PMModule,
    init_preference_model,
    soft_preference_loss,
)
from cai.preference import PreferenceModel, pair_metrics


def test_soft_label_loss_by_hand():
    r_a, r_b, p = torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([0.8])
    sigma = 1 / (1 + math.exp(-1.5))
    expected = -(0.8 * math.log(sigma) + 0.2 * math.log(1 - sigma))
    assert float(soft_preference_loss(r_a, r_b, p)) == pytest.approx(expected, rel=1e-6)
    # a hard label is the special case p = 1: -log sigmoid(r_a - r_b)
    hard = soft_preference_loss(r_a, r_b, torch.tensor([1.0]))
    assert float(hard) == pytest.approx(-math.log(sigma), rel=1e-6)
    # a 0.5 label is satisfied by equal rewards, whatever they are
    half = soft_preference_loss(torch.tensor([3.0]), torch.tensor([3.0]), torch.tensor([0.5]))
    assert float(half) == pytest.approx(math.log(2))


def test_pair_metrics_by_hand():
    m = pair_metrics([1.0, 0.0, 2.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.2])
    assert m["accuracy"] == pytest.approx(1 / 3)  # right, wrong, wrong
    assert m["margin"] == pytest.approx((1.0 - 1.0 - 1.0) / 3)


@pytest.fixture
def tiny_pm():
    from cai.config import compose

    cfg = compose(["model=tiny"])
    return init_preference_model(cfg.model, cfg.paths.cache_dir)


def toy_pairs(scorer, n=16):
    good = [answer_turns(f"Question {i}?", "I'm sorry, I can't help with that.") for i in range(n)]
    bad = [answer_turns(f"Question {i}?", "Sure, here is exactly how to do it.") for i in range(n)]
    # half the pairs put the preferred answer second (label 0)
    return (
        [
            EncodedPair(scorer.encode(g), scorer.encode(b), 1.0)
            if i % 2
            else EncodedPair(scorer.encode(b), scorer.encode(g), 0.0)
            for i, (g, b) in enumerate(zip(good, bad, strict=True))
        ],
        good,
        bad,
    )


def test_separable_toy_set_reaches_90_percent_and_reloads(tiny_pm, tmp_path):
    import json

    import pytorch_lightning as pl

    model, tokenizer = tiny_pm
    scorer = PreferenceModel(model, tokenizer, "chat")
    pairs, good, bad = toy_pairs(scorer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module = PMModule(model, 1e-3, 0.0, (0.9, 0.95), 1)
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=PairDataModule(pairs, 4, tokenizer.pad_token_id, seed=0))
    assert trainer.global_step == 12
    model.eval()
    r_good, r_bad = scorer.score(good), scorer.score(bad)
    assert pair_metrics(r_good, r_bad, [1.0] * len(good))["accuracy"] >= 0.9
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    # saved and reloaded with plain transformers classes: the same scores
    model.save_pretrained(tmp_path / "pm")
    tokenizer.save_pretrained(tmp_path / "pm")
    (tmp_path / "pm" / "pm_settings.json").write_text(json.dumps({"prompt_format": "chat"}))
    reloaded = PreferenceModel.load(tmp_path / "pm", dtype="float32")  # as trained here
    assert reloaded.score(good[:3] + bad[:3]) == pytest.approx(
        scorer.score(good[:3] + bad[:3]), abs=1e-4
    )


def test_scores_do_not_depend_on_batch_padding(tiny_pm):
    model, tokenizer = tiny_pm
    scorer = PreferenceModel(model, tokenizer, "chat", batch_size=4)
    dialogues = [answer_turns("Hi", "Hello!"), answer_turns("A longer question here?", "x " * 30)]
    together = scorer.score(dialogues)
    alone = [scorer.score([d])[0] for d in dialogues]
    assert together == pytest.approx(alone, abs=1e-4)
    transcript = "\n\nHuman: Hi\n\nAssistant: Hello!"
    assert scorer.score([transcript])[0] == pytest.approx(alone[0], abs=1e-5)
    # a token budget splits batches (one row each here) without changing a score
    budget = PreferenceModel(model, tokenizer, "chat", batch_size=4, max_batch_tokens=40)
    assert budget.score(dialogues) == pytest.approx(alone, abs=1e-4)


def test_repeated_dialogues_are_scored_once_with_the_same_score(tiny_pm):
    model, tokenizer = tiny_pm
    scorer = PreferenceModel(model, tokenizer, "chat", batch_size=4)
    a, b = answer_turns("Hi", "Hello!"), answer_turns("Why?", "Because " * 8)
    rows = []  # rows the backbone is given
    backbone = getattr(model, model.base_model_prefix)
    handle = backbone.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(len(kwargs["input_ids"])), with_kwargs=True
    )
    scores = scorer.score([a, b, a, "\n\nHuman: Hi\n\nAssistant: Hello!", b])
    handle.remove()
    assert sum(rows) == 2  # two distinct token sequences
    alone = [scorer.score([a])[0], scorer.score([b])[0]]
    assert scores == pytest.approx([alone[0], alone[1], alone[0], alone[0], alone[1]], abs=1e-5)


def test_bad_labels_and_identical_pairs_are_skipped_and_counted():
    a, b = answer_turns("q", "yes"), answer_turns("q", "no")
    kept, counts = clean(
        [
            Comparison(a, b, 0.7, "ai_harmless"),
            Comparison(a, b, float("nan"), "ai_harmless"),
            Comparison(a, b, 1.5, "ai_harmless"),
            Comparison(a, b, -0.1, "ai_harmless"),
            Comparison(a, a, 0.9, "ai_harmless"),
        ]
    )
    assert [c.p_a for c in kept] == [0.7]
    assert counts == {"skipped_bad_label": 3, "skipped_identical": 1}


def _first_human_turn(transcript: str) -> str:
    """Read independently of cai.data: the text between the first "Human:" and "Assistant:"."""
    head = transcript.split("\n\nHuman:", 1)[1]
    return " ".join(head.split("\n\nAssistant:", 1)[0].split()).lower()


def test_hh_rlhf_splits_are_disjoint_by_prompt_and_cover_the_file(data_dir):
    from cai.data import HH_SPLITS, hh_rlhf_comparisons

    splits = {s: hh_rlhf_comparisons(str(data_dir), "harmless-base", s) for s in HH_SPLITS}
    prompts = {s: {_first_human_turn(c) for c, _ in pairs} for s, pairs in splits.items()}
    names = list(prompts)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):  # no prompt (first human turn) in two splits
            assert not prompts[names[i]] & prompts[names[j]], (names[i], names[j])
    assert sum(len(p) for p in splits.values()) >= 2300  # 2,312 less identical pairs
    again = hh_rlhf_comparisons(str(data_dir), "harmless-base", "pm_eval")
    assert again == splits["pm_eval"]  # fixed: the same on every call


def test_no_eval_prompt_is_in_a_training_split(data_dir, make_cfg):
    """data=hh_rlhf's eval-split prompts never appear in pm_train or judge_train (the real file)."""
    import gzip
    import json

    from cai.data import hh_rlhf_comparisons, load_prompts

    cfg = make_cfg("data=hh_rlhf", "data.allow_download=false", "data.max_red_team=null")
    held_out = load_prompts(cfg.data, str(data_dir)).split("eval").red_team
    assert len(held_out) > 50
    eval_prompts = {" ".join(p.text.split()).lower() for p in held_out}
    for split in ("pm_train", "judge_train"):
        trained = {
            _first_human_turn(c)
            for c, _ in hh_rlhf_comparisons(str(data_dir), "harmless-base", split)
        }
        assert len(trained) > 100
        assert not eval_prompts & trained, split
    # and the file itself holds those eval prompts (the check is not vacuous)
    with gzip.open(data_dir / "hh-rlhf" / "harmless-base" / "test.jsonl.gz", "rt") as f:
        every = {_first_human_turn(json.loads(line)["chosen"]) for line in f}
    assert eval_prompts <= every


SMALL = [
    *TINY_STAGES,
    "pm.max_eval=16",
    "pm.max_human=16",
]


def test_pm_stage_trains_saves_and_reports(make_cfg, data_dir):
    from cai.pipeline import run
    from cai.results import read_rows

    cfg = make_cfg(
        *SMALL,
        f"paths.data_dir={data_dir}",
        "pipeline.stages=[generate_sl,sft,generate_pairs,feedback,pm]",
    )
    artifacts = run(cfg)
    pm = artifacts["pm"]
    metrics = pm.manifest["metrics"]
    # 6 red-team and 3 helpfulness labels at helpfulness_ratio 1: 3 of each (cai.modules.pm.mix)
    assert metrics["harmlessness_pairs"] == 3 and metrics["helpfulness_pairs"] == 3
    assert metrics["train_pairs"] == 6 and metrics["steps"] == 2
    rows = read_rows(pm.file("rows.csv"))
    validation = [r for r in rows if r["eval"].startswith("palms")]
    assert {r["metric"] for r in validation} == {
        "agreement_paper_pm",
        "agreement_paper_pm_length_matched",
        "agreement_paper_pm_within_model",
        "agreement_minus_best_rule",
        "pm_score",
        "pm_score_gain_over_revision_0",
    }
    assert metrics["validation"]["pairs"] > 0
    rows = [r for r in rows if not r["eval"].startswith("palms")]
    assert {(r["eval"], r["metric"]) for r in rows} == {
        (e, m) for e in ("hh_rlhf_harmless", "hhh") for m in ("accuracy", "margin", "ece")
    }
    assert {r["n"] for r in rows if r["eval"] == "hhh"} == {"438"}
    scores = PreferenceModel.load(pm.path / "model").score(["\n\nHuman: hi\n\nAssistant: hello"])
    assert math.isfinite(scores[0])
    # pm.epochs passes over the same pairs: twice the steps, its own artifact
    twice = run(make_cfg(*SMALL, f"paths.data_dir={data_dir}", "pipeline.stages=[pm]",
                         "pm.epochs=2"))["pm"]  # fmt: skip
    assert twice.manifest["metrics"]["steps"] == 4 and twice.path != pm.path
    # the HH-RLHF baseline trains on human comparisons, from the same module
    human = run(
        make_cfg(
            *SMALL,
            f"paths.data_dir={data_dir}",
            "pipeline.stages=[pm]",
            "pm.harmlessness=human",
            "pm.helpfulness=none",
        )
    )
    assert human["pm"].manifest["metrics"]["harmlessness_pairs"] == 16


def test_pm_with_nothing_to_train_on_is_an_error(make_cfg, data_dir):
    from cai.pipeline import run

    base = [*SMALL, f"paths.data_dir={data_dir}"]
    run(make_cfg(*base, "pipeline.stages=[generate_sl,sft,generate_pairs,feedback]"))
    cfg = make_cfg(*base, "pipeline.stages=[pm]", "pm.harmlessness=none", "pm.helpfulness=none")
    with pytest.raises(ConfigError, match="No PM training comparisons"):
        run(cfg)
    from pathlib import Path

    assert not list((Path(cfg.paths.artifact_dir) / "pm").glob("*/manifest.json"))


def test_packed_answers_score_as_separate_forward_passes(tiny_pm):
    """Dialogues that differ only in their last turn share one packed row (their context
    encoded once); every score equals a plain forward pass over that dialogue alone."""
    from cai.comparisons import transcript_turns
    from cai.modules.pm import rewards
    from cai.preference import shared_context_rows

    model, tokenizer = tiny_pm
    scorer = PreferenceModel(
        model, tokenizer, "chat", batch_size=3, max_row_tokens=96, max_row_dialogues=3
    )
    scorer._autocast = contextlib.nullcontext  # fp32 throughout: equal up to summation order
    history = "\n\nHuman: Hello there\n\nAssistant: Hi! How can I help?\n\nHuman: Tell me a fact"
    dialogues = [
        answer_turns("What is 2 + 2?", "4."),
        answer_turns("What is 2 + 2?", "It is four, of course " * 3),
        answer_turns("What is 2 + 2?", "Five."),
        history + "\n\nAssistant: Water boils at 100 C at sea level.",
        history + "\n\nAssistant: I'd rather not.",
        answer_turns("A lone question?", "A lone answer."),
        *[answer_turns("Many answers?", f"Answer number {i} " * (1 + i % 3)) for i in range(9)],
    ]
    scores = scorer.score(dialogues)

    def alone(dialogue) -> float:
        ids = scorer.encode(transcript_turns(dialogue) if isinstance(dialogue, str) else dialogue)
        with torch.no_grad():
            return float(rewards(model, torch.tensor([ids]), torch.tensor([len(ids) - 1]))[0])

    assert scores == pytest.approx([alone(d) for d in dialogues], abs=1e-4)
    # packing: a shared context once, continuations within the row budget, the last token kept
    rows = shared_context_rows([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 3]], [7, 8, 9], 7, 3)
    assert rows == [([1, 2], [[3, 4], [3, 5, 6]], [7, 8]), ([1, 2], [[3]], [9])]
    rows = shared_context_rows([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 3]], [7, 8, 9], 99, 2)
    assert [r[2] for r in rows] == [[7, 8], [9]]
