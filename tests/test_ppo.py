"""PPO on the tiny model: a toy reward rises, KL stays finite, parameters change; the stage."""

import copy
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY_STAGES
from omegaconf import OmegaConf

from cai.config import CONF_DIR


@pytest.fixture
def tiny_policy():
    from cai.config import compose
    from cai.models import load_model

    cfg = compose(["model=tiny"])
    return load_model(cfg.model, cfg.paths.cache_dir, dtype="float32")


def test_ppo_raises_a_toy_reward(tiny_policy, tmp_path):
    """Toy reward: how often the word "Exodus" appears in the answer. The random tiny model's
    final norm is scaled up so its next-token distribution is peaked (a uniform one over 49k
    tokens would almost never sample the word); PPO should then make it frequent while the KL
    to the reference stays finite."""
    import pytorch_lightning as pl

    from cai.generation.hf import HFEngine
    from cai.modules.ppo import PPOModule, PromptBatches, ValueHead

    policy, tokenizer = tiny_policy
    with torch.no_grad():
        policy.model.norm.weight.mul_(25)
    reference = copy.deepcopy(policy).eval()

    def reward(prompts, answers):
        return [a.count("Exodus") / 8 for a in answers]

    ppo = OmegaConf.merge(
        OmegaConf.load(CONF_DIR / "ppo" / "default.yaml"),
        {
            "lr": 5e-4,  # 1e-3 overshoots: on some sampling seeds the policy finds the word, then collapses
            "max_new_tokens": 12,
            "batch_size": 16,
            "minibatch_size": 8,
            "snapshot_sequences": [64, 160],
        },
    )
    prompts = [("red_team", f"q{i}", f"Question {i}?") for i in range(16)]
    value = ValueHead(policy.config.hidden_size)
    before_policy = {k: v.clone() for k, v in policy.state_dict().items()}
    module = PPOModule(
        policy,
        reference,
        value,
        HFEngine(policy, tokenizer, 16, progress=False),
        reward,
        tokenizer,
        prompts,
        ppo,
    )
    module.snapshot_dir = tmp_path
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, datamodule=PromptBatches(len(prompts), 10, 16, seed=0))
    scores = [h["objective/scores"] for h in module.history]
    assert len(scores) == 10
    assert sum(scores[-4:]) / 4 > sum(scores[:2]) / 2 + 0.3
    assert all(torch.isfinite(torch.tensor(h["objective/kl"])) for h in module.history)
    assert any(not torch.equal(before_policy[k], v) for k, v in policy.state_dict().items())
    assert float(value.linear.weight.abs().sum()) > 0  # the value head (zero at start) learned
    assert module.sequences == 160
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seq_00000064", "seq_00000160"]
    for name in (
        "objective/rlhf_reward",
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "loss/policy_avg",
        "loss/value_avg",
        "val/num_eos_tokens",
    ):
        assert name in module.history[-1]


SMALL = [
    *TINY_STAGES,
    "pm.max_eval=4",
    "pm.max_hhh=4",
    "ppo.steps=3",
    "ppo.batch_size=4",
    "ppo.max_new_tokens=8",
    "ppo.snapshot_sequences=[4,8]",
]


@pytest.mark.parametrize("value_model", ["head", "pm"])
def test_ppo_stage_writes_the_policy_snapshots_and_metrics(make_cfg, value_model):
    from transformers import AutoModelForCausalLM

    from cai.artifacts import read_jsonl
    from cai.pipeline import run

    cfg = make_cfg(
        *SMALL,
        f"ppo.value_model={value_model}",
        "pipeline.stages=[generate_sl,sft,generate_pairs,feedback,pm,ppo]",
    )
    artifact = run(cfg)["ppo"]
    metrics = artifact.manifest["metrics"]
    assert metrics["steps"] == 3 * 2 and metrics["sequences"] == 12  # 2 epochs x 1 minibatch
    assert metrics["snapshots"] == ["seq_00000004", "seq_00000008"]
    for folder in ["model", "snapshots/seq_00000004"]:
        assert AutoModelForCausalLM.from_pretrained(artifact.path / folder).config.vocab_size
    assert len(read_jsonl(artifact.file("metrics.jsonl"))) == 3
    assert not (artifact.path / "checkpoints").exists()


def test_bad_ppo_settings_stop_before_any_work(make_cfg):
    from cai.errors import ConfigError
    from cai.pipeline import run

    with pytest.raises(ConfigError, match="ppo.value_model"):
        run(make_cfg(*SMALL, "ppo.value_model=magic", "pipeline.stages=[generate_sl,ppo]"))


def exodus_reward(prompts, answers):  # module level: picklable for spawned processes
    return [a.count("Exodus") / 8 for a in answers]


class ParameterSums(pl.Callback):
    """Writes each rank's policy parameter sum at the end of training."""

    def __init__(self, folder):
        self.folder = folder

    def on_train_end(self, trainer, module):
        total = sum(float(p.double().sum()) for p in module.policy.parameters())
        (self.folder / f"rank{trainer.global_rank}.txt").write_text(f"{total!r} {module.sequences}")


def test_ppo_update_on_two_processes_stays_in_sync(tiny_policy, tmp_path):
    """trainer strategy ddp on 2 CPU processes (gloo): each rank rolls out its own prompts, the
    gradients are averaged, so both ranks end with the same, changed, policy."""
    import pytorch_lightning as pl

    from cai.generation.hf import HFEngine
    from cai.modules.ppo import PPOModule, PromptBatches, ValueHead

    policy, tokenizer = tiny_policy
    with torch.no_grad():
        policy.model.norm.weight.mul_(25)
    initial = sum(float(p.double().sum()) for p in policy.parameters())
    ppo = OmegaConf.merge(
        OmegaConf.load(CONF_DIR / "ppo" / "default.yaml"),
        {
            "lr": 5e-4,  # 1e-3 overshoots: on some sampling seeds the policy finds the word, then collapses
            "max_new_tokens": 8,
            "batch_size": 4,
            "minibatch_size": 4,
            "snapshot_sequences": [],
        },
    )
    prompts = [("red_team", f"q{i}", f"Question {i}?") for i in range(8)]
    module = PPOModule(
        policy,
        copy.deepcopy(policy).eval(),
        ValueHead(policy.config.hidden_size),
        HFEngine(policy, tokenizer, 8, progress=False),
        exodus_reward,
        tokenizer,
        prompts,
        ppo,
    )
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        use_distributed_sampler=False,
        callbacks=[ParameterSums(tmp_path)],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=PromptBatches(len(prompts), 6, 4, seed=0))
    ranks = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert ranks[0] == ranks[1]  # the same policy on both processes
    assert float(ranks[0][0]) != pytest.approx(initial, abs=1e-3)  # and it was updated
    assert int(ranks[0][1]) == 6 * 4 * 2  # sequences counted over both processes


def test_a_killed_ppo_run_resumes_from_its_checkpoint(make_cfg, monkeypatch):
    """Checkpoints every 2 iterations; an exception after the third, then the same command
    again: the run continues from iteration 2's checkpoint (ppo.checkpoint_every counts
    iterations, not optimiser steps) and ends where an uninterrupted one would."""
    from cai.artifacts import read_jsonl
    from cai.modules.ppo import PPOModule
    from cai.pipeline import run

    cfg = make_cfg(
        *SMALL,
        "ppo.checkpoint_every=2",
        "pipeline.stages=[generate_sl,sft,generate_pairs,feedback,pm,ppo]",
    )
    original = PPOModule.on_train_batch_end if hasattr(PPOModule, "on_train_batch_end") else None

    def crash(self, outputs, batch, batch_idx):
        if self.sequences >= 12:
            raise RuntimeError("killed")

    monkeypatch.setattr(PPOModule, "on_train_batch_end", crash, raising=False)
    with pytest.raises(RuntimeError, match="killed"):
        run(cfg)
    monkeypatch.undo()
    assert original is None or PPOModule.on_train_batch_end is original
    artifact = run(cfg)["ppo"]
    metrics = artifact.manifest["metrics"]
    assert metrics["resumed"] and metrics["sequences"] == 12
    assert metrics["start_step"] == 2 * 2  # iteration 2's checkpoint: 2 optimiser steps each
    assert len(read_jsonl(artifact.file("metrics.jsonl"))) == 3


def test_kl_beyond_the_bound_stops_with_a_message(make_cfg):
    from cai.modules.ppo import TrainingDiverged
    from cai.pipeline import run

    cfg = make_cfg(
        *SMALL, "ppo.max_kl=-1", "pipeline.stages=[generate_sl,sft,generate_pairs,feedback,pm,ppo]"
    )
    with pytest.raises(TrainingDiverged, match="beyond ppo.max_kl=-1"):
        run(cfg)
    assert not list((Path(cfg.paths.artifact_dir) / "ppo").glob("*/manifest.json"))
