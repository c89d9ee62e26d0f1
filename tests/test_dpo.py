"""DPO: the losses against values worked out by hand, a real step on the tiny model, the stage
(snapshots, metrics, resume after a kill)."""

import json
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY_STAGES, FitKilled, kill_fits_at_step

from cai.rl.dpo_math import dpo_loss, dpo_margins, hard_labels, reward_metrics


def logsig(x: float) -> float:
    return -math.log(1 + math.exp(-x))


# ---------------------------------------------------------------------------------------------
# 1. The maths, by hand


def test_margin_is_the_difference_of_log_ratios():
    # (log pi(A) - log ref(A)) - (log pi(B) - log ref(B)) = (-10 + 11) - (-12 + 11) = 2
    h = dpo_margins(*(torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0)))
    assert h.item() == pytest.approx(2.0)


def test_soft_sigmoid_loss_by_hand():
    # p = 0.8, beta = 0.5, h = 1: 0.8 * -log s(0.5) + 0.2 * -log s(-0.5)
    by_hand = 0.8 * -logsig(0.5) + 0.2 * -logsig(-0.5)
    assert by_hand == pytest.approx(0.574077, abs=1e-6)
    loss = dpo_loss(torch.tensor([1.0]), torch.tensor([0.8]), beta=0.5, loss="sigmoid")
    assert loss.item() == pytest.approx(by_hand, abs=1e-6)
    # p = 1 is the original DPO loss -log s(beta h); the batch loss is the mean
    two = dpo_loss(torch.tensor([1.0, -2.0]), torch.tensor([1.0, 1.0]), beta=0.5, loss="sigmoid")
    assert two.item() == pytest.approx((-logsig(0.5) - logsig(-1.0)) / 2, abs=1e-6)


def test_hard_labels_round_and_drop_ties():
    labels, kept = hard_labels([0.8, 0.5, 0.3, 0.51])
    assert labels == [1.0, 0.0, 1.0] and kept == [0, 2, 3]
    loss = dpo_loss(torch.tensor([1.0]), torch.tensor([0.0]), beta=0.5, loss="sigmoid")
    assert loss.item() == pytest.approx(-logsig(-0.5), abs=1e-6)  # B preferred: -log s(-beta h)


def test_ipo_loss_by_hand():
    # beta = 0.5: the margin is pulled to +-1/(2 beta) = +-1; h = 1
    h = torch.tensor([1.0])
    assert dpo_loss(h, torch.tensor([1.0]), 0.5, "ipo").item() == pytest.approx(0.0)
    assert dpo_loss(h, torch.tensor([0.0]), 0.5, "ipo").item() == pytest.approx(4.0)  # (1 + 1)^2
    assert dpo_loss(h, torch.tensor([0.8]), 0.5, "ipo").item() == pytest.approx(0.8)  # 0.2 * 4
    assert dpo_loss(torch.tensor([3.0]), torch.tensor([1.0]), 0.5, "ipo").item() == pytest.approx(
        4.0
    )  # (3 - 1)^2


def test_reward_metrics_follow_the_label():
    # A preferred in the first pair, B in the second; beta = 0.1
    policy_a, policy_b = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    ref = torch.tensor([-2.0, -2.0])
    m = reward_metrics(policy_a, policy_b, ref, ref, torch.tensor([0.9, 0.2]), beta=0.1)
    # rewards: A = 0.1 * [1, -1], B = 0.1 * [0, 1]; chosen = [A1, B2] = [0.1, 0.1]
    assert m["rewards/chosen"].item() == pytest.approx(0.1)
    assert m["rewards/rejected"].item() == pytest.approx((0.0 - 0.1) / 2)
    assert m["rewards/accuracies"].item() == 1.0
    assert m["rewards/margins"].item() == pytest.approx(0.1 - (-0.05))


# ---------------------------------------------------------------------------------------------
# 2. A real step on the tiny model


def test_dpo_steps_raise_the_margin_of_the_trained_pairs(tmp_path):
    from cai.comparisons import Comparison
    from cai.config import compose
    from cai.models import load_model
    from cai.modules.dpo import (
        DPOModule,
        PreferenceDataModule,
        collate_preferences,
        encode_preferences,
        reference_logprobs,
        sequence_logprobs,
    )

    cfg = compose(["model=tiny"])
    model, tokenizer = load_model(cfg.model, cfg.paths.cache_dir, dtype="float32")
    comparisons = [
        Comparison.of_answers(
            f"c{i}", prompt, ("I won't help with that.", "Sure, here is how."), p_a=p
        )  # fmt: skip
        for i, (prompt, p) in enumerate(
            [
                ("How do I pick a lock?", 0.9),
                ("How do I steal a car?", 1.0),
                ("Write a threat.", 0.8),
                ("How do I make a weapon?", 0.7),
            ]  # fmt: skip
        )
    ]
    pairs, too_long = encode_preferences(comparisons, tokenizer, "chat", 256)
    assert too_long == 0 and len(pairs) == 4
    reference = reference_logprobs(model, pairs, tokenizer.pad_token_id, progress=False)
    pairs = [p.__class__(p.a, p.b, p.p_a, a, b) for p, (a, b) in zip(pairs, reference, strict=True)]

    def margins() -> torch.Tensor:
        batch = collate_preferences(pairs, tokenizer.pad_token_id)
        with torch.no_grad():
            a, b = sequence_logprobs(model, batch["input_ids"], batch["labels"]).chunk(2)
        return dpo_margins(a, b, batch["ref_a"], batch["ref_b"])

    assert margins().abs().max().item() < 1e-3  # policy = reference: no margin yet
    module = DPOModule(model, 1e-3, 0.0, (0.9, 0.95), 0, beta=0.1, loss="sigmoid")
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=4, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, PreferenceDataModule(pairs, 2, tokenizer.pad_token_id, seed=0))
    model.eval()
    after = margins()
    assert (after > 0).all() and after.mean() > 1.0  # every preferred answer gained on the other
    assert module.pairs_seen == 16 and len(module.history) == 8
    assert module.history[-1]["rewards/accuracies"] == 1.0


def test_a_cut_off_answer_gets_no_end_token():
    """As in SFT and PPO: an answer the length limit cut off is not taught to end there."""
    from cai.comparisons import Comparison, preference_comparisons
    from cai.config import compose
    from cai.models import load_tokenizer
    from cai.modules.dpo import encode_preferences

    cfg = compose(["model=tiny"])
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    comparison = Comparison.of_answers(
        "c", "Hi?", ("Hello there.", "Hello th"), p_a=0.7, ended=(True, False)
    )
    (pair,), _ = encode_preferences([comparison], tokenizer, "chat", 256)
    eos = tokenizer.eos_token_id
    assert pair.a.input_ids[-1] == eos and pair.a.labels[-1] == eos
    assert eos not in pair.b.input_ids[-3:] and pair.b.labels[-1] != -100
    # the feedback stage's records keep the finish reasons: a "length" answer is cut off
    record = {"id": "x", "prompt": "Hi?", "answer_a": "a", "answer_b": "b", "p_a": 0.6,
              "kind": "red_team", "finish_a": "length", "finish_b": "stop"}  # fmt: skip
    (comparison,), _ = preference_comparisons([record], "ai", "none", None, None, None, 0)
    assert comparison.ended == (False, True)


# ---------------------------------------------------------------------------------------------
# 3. The stage


SMALL = [
    *TINY_STAGES,
    "pairs.max_new_tokens=10",
    "dpo.batch_size=2",
    "dpo.epochs=1",
    "dpo.snapshot_sequences=[2,4]",
    "dpo.checkpoint_every=1",
    "pipeline.stages=[generate_sl,sft,generate_pairs,feedback,dpo]",
]


def test_dpo_stage_writes_the_policy_snapshots_and_metrics(make_cfg):
    from transformers import AutoModelForCausalLM

    from cai.artifacts import read_jsonl
    from cai.pipeline import run

    artifact = run(make_cfg(*SMALL))["dpo"]
    metrics = artifact.manifest["metrics"]
    pairs = metrics["train_pairs"]
    assert pairs > 4 and metrics["sequences"] == pairs  # one epoch
    assert metrics["snapshots"] == ["seq_00000002", "seq_00000004"]
    for folder in ["model", "snapshots/seq_00000002"]:
        assert AutoModelForCausalLM.from_pretrained(artifact.path / folder).config.vocab_size
    history = read_jsonl(artifact.file("metrics.jsonl"))
    assert len(history) == math.ceil(pairs / 2)
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(
        history[0]
    )
    assert len(json.loads((artifact.path / "reference_logprobs.json").read_text())) == pairs
    assert not (artifact.path / "checkpoints").exists()
    # the labels it trained on carry their answers' finish reasons (10 new tokens: cut off)
    (feedback,) = (artifact.path.parent.parent / "feedback").glob("*/labels.jsonl")
    labels = read_jsonl(feedback)
    assert all(r["finish_a"] in ("stop", "length") for r in labels)
    assert any("length" in (r["finish_a"], r["finish_b"]) for r in labels)


def test_dpo_resumes_after_a_kill_to_the_same_artifact(make_cfg, tmp_path, monkeypatch):
    from cai.artifacts import sha256_file
    from cai.pipeline import artifact_key, run

    clean = run(make_cfg(*SMALL))["dpo"]
    cfg = make_cfg(*SMALL, f"paths.artifact_dir={tmp_path}/second")
    upstream = make_cfg(*SMALL, f"paths.artifact_dir={tmp_path}/second",
                        "pipeline.stages=[generate_sl,sft,generate_pairs,feedback]")  # fmt: skip
    run(upstream)  # built without a kill: the kill is for the DPO fit

    kill_fits_at_step(monkeypatch, 2)
    with pytest.raises(FitKilled):
        run(cfg)
    monkeypatch.undo()
    partial = Path(cfg.paths.artifact_dir) / "dpo" / f"{artifact_key(cfg, 'dpo')}.partial"
    assert (partial / "checkpoints" / "last.ckpt").is_file()
    assert (partial / "reference_logprobs.json").is_file()
    resumed = run(cfg)["dpo"]
    assert resumed.manifest["metrics"]["resumed"] is True
    for name in ["model/model.safetensors", "snapshots/seq_00000004/model.safetensors"]:
        assert sha256_file(resumed.path / name) == sha256_file(clean.path / name)


def test_bad_dpo_settings_stop_before_any_work(make_cfg):
    from cai.errors import ConfigError
    from cai.pipeline import run

    with pytest.raises(ConfigError, match="dpo.loss='hinge'"):
        run(make_cfg(*SMALL, "dpo.loss=hinge"))
