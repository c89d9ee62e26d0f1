"""Every config group option composes; presets resolve; bad overrides fail clearly."""

from pathlib import Path

import pytest
from conftest import run_train
from hydra.errors import ConfigCompositionException

from cai.config import CONF_DIR, available_models, load_model_preset, resolve_model
from cai.errors import ConfigError

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(make_cfg, group, option):
    cfg = make_cfg(f"{group}={option}")
    assert cfg.paths.artifact_dir.endswith("outputs/artifacts")
    if group == "model":
        assert cfg.model.name and cfg.model.params > 0
        assert cfg.model.prompt_format in ("chat", "raw")


def test_default_is_embedded_model(make_cfg):
    cfg = make_cfg()
    assert cfg.model.name == "smollm2_135m" and cfg.model.source == "gguf_wheel"


def test_size_sweep_resolves_to_its_preset(make_cfg):
    cfg = make_cfg("model=size_sweep", "model.preset=tiny_2x")
    assert cfg.model.name == "tiny_2x"
    assert cfg.model.architecture.hidden_size == 128  # tiny_2x overrides tiny's width
    assert cfg.model.architecture.num_hidden_layers == 2  # and inherits the rest


def test_preset_keeps_extra_keys():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"model": {"preset": "smollm2_360m", "path": "/some/folder"}})
    cfg = resolve_model(cfg)
    assert (
        cfg.model.hub_id == "HuggingFaceTB/SmolLM2-360M-Instruct"
        and cfg.model.path == "/some/folder"
    )


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="smollm2_135m"):
        load_model_preset("gpt5")
    assert "size_sweep" not in available_models() and "tiny" in available_models()


def test_unknown_group_option_lists_the_options(make_cfg):
    with pytest.raises(ConfigCompositionException, match="Available options"):
        make_cfg("model=not_a_model")


def test_unknown_option_on_command_line_fails_clearly(tmp_path: Path):
    done = run_train(["model=not_a_model"], tmp_path, timeout=120)
    assert done.returncode != 0
    assert "Available options" in done.stderr and "smollm2_135m" in done.stderr
    assert not (tmp_path / "outputs" / "artifacts").exists()


def test_unknown_stage_fails_before_any_work(tmp_path: Path):
    done = run_train(["model=tiny", "pipeline.stages=[generate_everything]"], tmp_path, timeout=120)
    assert done.returncode == 2
    assert "Unknown stage 'generate_everything'" in done.stderr


def test_csv_logger_is_built_into_the_run_folder(make_cfg, tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    from cai.loggers import build_loggers

    loggers = build_loggers(make_cfg().logger)
    assert len(loggers) == 1 and isinstance(loggers[0], CSVLogger)
    assert loggers[0].save_dir.startswith(str(tmp_path))
    assert build_loggers(make_cfg("logger=none").logger) == []
