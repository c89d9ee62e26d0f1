"""GPU paths: generation and scoring on CUDA, bf16 SFT and PM training, PPO, the DDP strategy.

Skipped without a CUDA GPU (CI has none); run on a GPU machine with
`python -m pytest -q tests/test_gpu.py`. `CAI_GPU_MODEL` may name a local model folder to use
instead of the random tiny model (which needs the embedded model's tokenizer).
"""

import os

import pytest
import torch

from cai.generation.base import Request, ScoreRequest
from cai.generation.hf import HFEngine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PREFIX = "\n\nHuman: What is two plus two?\n\nAssistant: Four." * 4
PROMPTS = ["\n\nHuman: How do I bake bread?\n\nAssistant:", "\n\nHuman: Hi\n\nAssistant:"]


def model_overrides() -> list[str]:
    folder = os.environ.get("CAI_GPU_MODEL")
    return ["model=tiny", f"model.path={folder}"] if folder else ["model=tiny"]


@pytest.fixture(scope="module")
def tiny_cuda():
    from cai.config import compose
    from cai.models import load_model

    cfg = compose(model_overrides())
    model, tokenizer = load_model(cfg.model, cfg.paths.cache_dir, dtype="float32")
    return model.to("cuda"), tokenizer


def test_greedy_generation_on_cuda_matches_transformers(tiny_cuda):
    model, tokenizer = tiny_cuda
    engine = HFEngine(model, tokenizer, batch_size=2, progress=False)
    out = engine.generate(
        [Request(p, max_new_tokens=10, temperature=0) for p in PROMPTS], prefix=PREFIX
    )
    for prompt, generation in zip(PROMPTS, out, strict=True):
        ids = tokenizer(PREFIX + prompt, return_tensors="pt").to("cuda")
        expected = model.generate(
            **ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )[0, ids.input_ids.shape[1] :]
        assert generation.text == tokenizer.decode(expected, skip_special_tokens=True).strip()


def test_scoring_on_cuda_matches_a_plain_forward_pass(tiny_cuda):
    model, tokenizer = tiny_cuda
    engine = HFEngine(model, tokenizer, batch_size=2, progress=False)
    context = PROMPTS[0] + " The answer is:"
    [scores] = engine.score([ScoreRequest(context, (" (A)", " (B)"))], prefix=PREFIX)
    full_context = tokenizer(PREFIX + context).input_ids
    for option, logprob in zip((" (A)", " (B)"), scores.logprobs, strict=True):
        full = tokenizer(PREFIX + context + option).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([full], device="cuda")).logits[0].float()
        expected = sum(
            float(torch.log_softmax(logits[t - 1], -1)[full[t]])
            for t in range(len(full_context), len(full))
        )
        assert logprob == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("trainer", ["gpu", "ddp"])
def test_training_stages_run_on_the_gpu(make_cfg, trainer):
    from transformers import AutoModelForCausalLM

    from cai.pipeline import run

    cfg = make_cfg(
        *model_overrides(),
        f"trainer={trainer}",
        "trainer.devices=1",
        "data.max_red_team=8",
        "data.max_helpful=4",
        "sl.generate_revisions=1",
        "sft.num_revisions=1",
        "sl.max_answer_tokens=12",
        "sl.max_critique_tokens=8",
        "sl.max_revision_tokens=12",
        "generation.progress=false",
        "sft.batch_size=4",
        "sft.warmup_steps=1",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "pm.batch_size=4",
        "ppo.steps=2",
        "ppo.batch_size=4",
        "ppo.max_new_tokens=8",
        "ppo.snapshot_sequences=[4]",
        "pipeline.stages=[generate_sl,sft,generate_pairs,feedback,pm,ppo]",
    )
    artifacts = run(cfg)
    metrics = artifacts["sft"].manifest["metrics"]
    assert metrics["steps"] >= 2 and torch.isfinite(torch.tensor(metrics["train/loss"]))
    trained = AutoModelForCausalLM.from_pretrained(artifacts["sft"].path / "model")
    assert trained.config.num_hidden_layers >= 1
    assert artifacts["feedback"].manifest["metrics"]["comparisons"] >= 1
    assert artifacts["pm"].manifest["metrics"]["steps"] >= 1
    ppo = artifacts["ppo"].manifest["metrics"]
    assert ppo["sequences"] == 8 and ppo["snapshots"] == ["seq_00000004"]
    assert torch.isfinite(torch.tensor(ppo["last"]["objective/kl"]))
