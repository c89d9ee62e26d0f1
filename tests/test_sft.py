"""SL-CAI fine-tuning: response-only loss, training changes the model, resume, the sft stage."""

import pytest
import torch
from conftest import FitKilled, kill_fits_at_step
from transformers import AutoModelForCausalLM

from cai import pipeline
from cai.config import load_model_preset
from cai.errors import ConfigError
from cai.models import load_model
from cai.modules.sft import (
    IGNORE,
    SFTDataModule,
    SFTModule,
    bucketed_batches,
    collate,
    encode_example,
    response_nll,
)

SMALL = [
    "model=tiny",
    "data.max_red_team=6",
    "data.max_helpful=3",
    "sl.generate_revisions=2",
    "sft.num_revisions=2",
    "sl.max_answer_tokens=12",
    "sl.max_critique_tokens=8",
    "sl.max_revision_tokens=12",
    "generation.progress=false",
    "sft.batch_size=4",
    "sft.warmup_steps=1",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "pipeline.stages=[generate_sl,sft]",
]


@pytest.fixture(scope="module")
def tiny():
    from cai.config import compose

    return load_model(load_model_preset("tiny"), compose([]).paths.cache_dir, dtype="float32")


def test_response_only_mask_on_a_hand_built_example(tiny):
    _, tokenizer = tiny
    example = encode_example(
        tokenizer, "How do I pick a lock?", "I can't help with that.", "chat", "p1"
    )
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "How do I pick a lock?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    n_prompt = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    response = tokenizer("I can't help with that.", add_special_tokens=False).input_ids + [
        tokenizer.eos_token_id
    ]
    assert example.labels[:n_prompt] == [IGNORE] * n_prompt  # prompt tokens ignored
    assert example.labels[n_prompt:] == response == example.input_ids[n_prompt:]  # response counted
    raw = encode_example(tokenizer, "Hi", "Hello.", "raw", "p2")
    assert tokenizer.decode(raw.input_ids).endswith("Assistant: Hello.<|im_end|>")
    assert tokenizer.decode([t for t in raw.labels if t != IGNORE]) == " Hello.<|im_end|>"


def _full_loss(logits, labels):
    """Reference: next-token cross-entropy over all positions, IGNORE labels skipped."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE
    )


def test_response_nll_counts_only_positions_that_predict_the_response(tiny):
    model, tokenizer = tiny
    example = encode_example(tokenizer, "Hi", "Hello there.", "chat", "p")
    batch = collate([example], tokenizer.pad_token_id)
    n_prompt = example.labels.count(IGNORE)
    with torch.no_grad():
        nll = response_nll(model, batch)
        full = model(input_ids=batch["input_ids"]).logits
    response = example.input_ids[n_prompt:]
    assert nll.shape == (len(response),)  # response tokens only
    # position t predicts token t + 1: the first counted position is the last prompt token
    expected = -torch.log_softmax(full[0, n_prompt - 1 : -1].double(), -1)[
        torch.arange(len(response)), torch.tensor(response)
    ]
    assert torch.allclose(nll.double(), expected, atol=1e-5)
    assert torch.allclose(nll.mean(), _full_loss(full, batch["labels"]), atol=1e-6)


def test_batches_group_similar_lengths():
    lengths = [5, 100, 6, 101, 7, 102, 8, 103]
    batches = bucketed_batches(lengths, batch_size=2, bucket_size=4, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) <= 2 for b in batches)
    assert batches == bucketed_batches(lengths, 2, 4, seed=0)


def _examples(tokenizer, n=8):
    return [
        encode_example(
            tokenizer, f"Question {i}?", "I can't help with that, sorry.", "chat", f"p{i}"
        )
        for i in range(n)
    ]


def test_a_few_steps_lower_the_loss_and_change_the_parameters(tiny, tmp_path):
    import pytorch_lightning as pl

    model, tokenizer = tiny
    model = AutoModelForCausalLM.from_config(model.config)
    model.load_state_dict(tiny[0].state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    examples = _examples(tokenizer)
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        loss_before = _full_loss(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["labels"],
        )
    data = SFTDataModule(examples, [], 4, 4, tokenizer.pad_token_id, seed=0)
    module = SFTModule(model, lr=3e-3, weight_decay=0.0, betas=(0.9, 0.95), warmup_steps=1)
    trainer = pl.Trainer(
        max_epochs=5,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    with torch.no_grad():
        loss_after = _full_loss(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["labels"],
        )
    assert trainer.global_step == 10
    assert loss_after < loss_before - 1.0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sft_stage_saves_a_loadable_model(make_cfg):
    artifacts = pipeline.run(make_cfg(*SMALL))
    sft = artifacts["sft"]
    metrics = sft.manifest["metrics"]
    assert (
        metrics["red_team"] == 6
        and metrics["helpful_samples"] == 6
        and metrics["target_revision"] == 2
    )
    assert metrics["steps"] >= 2 and "val/loss" in metrics and not metrics["resumed"]
    model = AutoModelForCausalLM.from_pretrained(sft.path / "model")
    assert model.config.hidden_size == 64
    assert not (sft.path / "checkpoints").exists()
    assert sft.manifest["upstream"] == {"generate_sl": artifacts["generate_sl"].key}
    # the texts trained on are revision 2 of each red-team record, read from the file itself
    import json

    from transformers import AutoTokenizer

    from cai.modules.sft import IGNORE, sl_examples

    sl = artifacts["generate_sl"]
    lines = (sl.path / "red_team.jsonl").read_text().splitlines()
    wanted = {json.loads(x)["id"]: json.loads(x)["revisions"][1]["revision"] for x in lines}
    tokenizer = AutoTokenizer.from_pretrained(sft.path / "model")
    examples, _ = sl_examples(sl, 2, tokenizer, "chat", False, 10_000)
    for example in examples:
        target = [t for t in example.labels if t != IGNORE and t != tokenizer.eos_token_id]
        assert tokenizer.decode(target).strip() == wanted[example.prompt_id].strip()


def test_revision_index_beyond_the_data_fails_clearly(make_cfg):
    cfg = make_cfg(*SMALL, "sft.num_revisions=3")
    with pytest.raises(ConfigError, match="sft.num_revisions=3, but the SL data holds 2"):
        pipeline.run(cfg)
    assert not list(
        (
            cfg.paths.artifact_dir and __import__("pathlib").Path(cfg.paths.artifact_dir) / "sft"
        ).glob("*/manifest.json")
    )


def test_sft_key_follows_target_revision_not_sl_data(make_cfg):
    a, b = make_cfg(*SMALL, "sft.num_revisions=1"), make_cfg(*SMALL, "sft.num_revisions=2")
    assert pipeline.artifact_key(a, "generate_sl") == pipeline.artifact_key(b, "generate_sl")
    assert pipeline.artifact_key(a, "sft") != pipeline.artifact_key(b, "sft")


def test_killed_training_resumes_from_its_checkpoint(make_cfg, monkeypatch):

    cfg = make_cfg(*SMALL, "sft.checkpoint_every=1", "sft.batch_size=2")
    pipeline.run(
        make_cfg(
            *[s for s in SMALL if not s.startswith("pipeline.stages")],
            "pipeline.stages=[generate_sl]",
        )
    )

    kill_fits_at_step(monkeypatch, 2)
    with pytest.raises(FitKilled):
        pipeline.run(cfg)
    monkeypatch.undo()
    key = pipeline.artifact_key(cfg, "sft")
    partial = (
        __import__("pathlib").Path(cfg.paths.artifact_dir)
        / "sft"
        / f"{key}.partial"
        / "checkpoints"
        / "last.ckpt"
    )
    assert partial.is_file()
    saved_step = torch.load(partial, map_location="cpu", weights_only=False)[
        "global_step"
    ]  # our own file
    assert saved_step >= 1
    resumed = pipeline.run(cfg)["sft"]
    assert resumed.manifest["metrics"]["resumed"] is True
    assert resumed.manifest["metrics"]["start_step"] == saved_step  # continued from the saved step
    assert resumed.manifest["metrics"]["steps"] == resumed.manifest["metrics"][
        "train_examples"
    ] // 2 + (resumed.manifest["metrics"]["train_examples"] % 2 > 0)


def test_lora_trains_adapters_and_saves_a_merged_model(make_cfg):
    sft = pipeline.run(make_cfg(*SMALL, "sft.lora=true", "sft.lora_r=4"))["sft"]
    model = AutoModelForCausalLM.from_pretrained(sft.path / "model")
    assert not [name for name in model.state_dict() if "lora" in name]  # merged into the weights
    assert sft.manifest["config"]["sft"]["lora"] is True


def test_empty_sl_data_fails_without_an_artifact(make_cfg, tmp_path):
    from cai.artifacts import Artifact
    from cai.modules.sft import sl_examples

    (tmp_path / "red_team.jsonl").write_text("")
    (tmp_path / "helpful.jsonl").write_text("")
    empty = Artifact("generate_sl", "k", tmp_path, {"metrics": {"revisions_per_prompt": 4}})
    with pytest.raises(ConfigError, match="no non-empty answers"):
        sl_examples(empty, 4, None, "chat", True, 1024)


def test_gradient_clipping_bounds_the_norm(tiny):
    model, tokenizer = tiny
    module = SFTModule(
        AutoModelForCausalLM.from_config(model.config), 1e-3, 0.0, (0.9, 0.95), 1, clip_norm=0.01
    )
    batch = collate(_examples(tokenizer, 2), tokenizer.pad_token_id)
    response_nll(module.model, batch).mean().backward()
    module.on_before_optimizer_step(None)
    norm = torch.sqrt(
        sum((p.grad.float() ** 2).sum() for p in module.model.parameters() if p.grad is not None)
    )
    assert norm <= 0.0101


def test_right_padding_needs_no_attention_mask(tiny):
    """The loss the module computes (no mask, right padding) equals the masked computation."""
    model, tokenizer = tiny
    examples = [
        encode_example(tokenizer, "Hi", "Hello there, how can I help?", "chat", "a"),
        encode_example(
            tokenizer, "A much longer question about baking bread at home?", "Sure.", "chat", "b"
        ),
    ]
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        ours = response_nll(model, batch).mean()
        masked = _full_loss(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["labels"],
        )
    assert torch.allclose(ours, masked, atol=1e-5)
