"""The run's text inputs, loaded once per process and config: the constitution and the prompt
set (red-team and helpfulness prompts, split into train and eval), and their fingerprints."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from cai.constitution import Constitution, load_constitution
from cai.data import PromptSet, load_prompts

_LOADED: dict[str, tuple] = {}  # keys are computed often: load each config's inputs once


def load_inputs(cfg: DictConfig) -> tuple[Constitution, PromptSet]:
    """The constitution (`cfg.constitution`) and the prompt set (`cfg.data`)."""
    key = OmegaConf.to_yaml(
        OmegaConf.create({"c": cfg.constitution, "d": cfg.data, "p": cfg.paths})
    )
    if key not in _LOADED:
        constitution = load_constitution(cfg.constitution, cfg.paths.data_dir, cfg.paths.cache_dir)
        _LOADED[key] = (constitution, load_prompts(cfg.data, cfg.paths.data_dir))
    return _LOADED[key]


def input_fingerprints(cfg: DictConfig) -> dict:
    """Content fingerprints added to an artifact key: editing the constitution or prompt files
    changes the key even when the config does not."""
    constitution, prompts = load_inputs(cfg)
    return {"constitution": constitution.fingerprint(), "prompts": prompts.fingerprint()}
