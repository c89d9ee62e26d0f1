"""Config helpers: where the config tree lives, model presets, and composing configs in code.

Hydra composes `conf/`; this module only resolves what Hydra cannot express itself:
`model.preset` (used by `model=size_sweep`, since a config group cannot sweep itself).
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from cai.errors import ConfigError
from cai.settings import typed_config

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout, when run from one
# The Hydra config tree: installed, it ships inside the package (pyproject.toml maps conf/ to
# cai/conf); in a checkout (or an editable install) it is conf/ at the top of the repository.
_PACKAGED_CONF = Path(__file__).resolve().parent / "conf"
CONF_DIR = _PACKAGED_CONF if (_PACKAGED_CONF / "config.yaml").is_file() else REPO_ROOT / "conf"
# conf/hydra/default.yaml names run folders with it (src/train.py registers it too)
OmegaConf.register_new_resolver("cai_pid", os.getpid, replace=True, use_cache=True)


def available_models() -> list[str]:
    """Names of the model presets in conf/model (every option but the sweep itself)."""
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml") if p.stem != "size_sweep")


def load_model_preset(name: str) -> DictConfig:
    """The composed content of conf/model/<name>.yaml (following its own defaults list)."""
    path = CONF_DIR / "model" / f"{name}.yaml"
    if name == "size_sweep" or not path.is_file():
        raise ConfigError(
            f"Unknown model preset {name!r}. Choose one of: {', '.join(available_models())} "
            f"(files in {CONF_DIR / 'model'}), or set model.path=<local transformers folder>."
        )
    node = OmegaConf.load(path)
    defaults = node.pop("defaults", [])
    base = OmegaConf.create()
    for entry in defaults:
        if entry != "_self_":
            base = OmegaConf.merge(base, load_model_preset(entry))
    return OmegaConf.merge(base, node)


def resolve_model(cfg: DictConfig) -> DictConfig:
    """Replace `model` by its preset when the config names one (`model.preset=<name>`).

    Keys given beside `preset` (e.g. `model.path=...`) override the preset's values.
    """
    if "preset" not in cfg.model:
        return cfg
    extra = OmegaConf.to_container(cfg.model, resolve=False)
    preset = extra.pop("preset")
    with open_dict(cfg):
        cfg.model = OmegaConf.merge(load_model_preset(preset), extra)
    return cfg


def model_cfg_for(cfg: DictConfig, choice: str, setting: str, upstream: dict) -> DictConfig:
    """The model a setting such as `feedback.model` names: `policy` (cfg.model, the helpful
    model), `sft` (the SL-CAI model of the sft artifact in `upstream`), a model preset, or a
    local transformers folder (read with cfg.model's prompt format)."""
    if choice == "policy":
        return cfg.model
    if choice == "sft":
        if "sft" not in upstream:
            raise ConfigError(f"{setting}=sft needs the sft stage's artifact.")
        return OmegaConf.merge(cfg.model, {"path": str(upstream["sft"].path / "model")})
    if choice in available_models():
        return load_model_preset(choice)
    if Path(choice).is_dir():
        return OmegaConf.merge(cfg.model, {"path": choice})
    if "/" in choice or choice.startswith("."):
        raise ConfigError(
            f"{setting}={choice!r}: no such folder ({Path(choice).resolve()}). Name a local "
            "transformers model folder that exists, or a model preset."
        )
    raise ConfigError(
        f"{setting}={choice!r}: use policy, sft, a model preset ({', '.join(available_models())})"
        " or a local transformers folder."
    )


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose the project config in code (tests, notebooks), as `src/train.py` would.

    The `hydra:` resolver is unavailable outside a Hydra run, so `hydra.runtime.output_dir`
    is filled in with a folder under paths.output_dir.
    """
    if CONF_DIR != _PACKAGED_CONF:  # a checkout: its outputs/ and results/
        os.environ.setdefault("CAI_ROOT", str(REPO_ROOT))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(
            config_name=config_name, overrides=overrides or [], return_hydra_config=True
        )
    with open_dict(cfg):
        OmegaConf.set_readonly(cfg.hydra, False)
        cfg.hydra.runtime.output_dir = str(Path(cfg.paths.output_dir) / "compose")
        HydraConfig.instance().set_config(cfg)
        del cfg["hydra"]
    return typed_config(resolve_model(cfg))
