"""Lightning loggers from `cfg.logger` (conf/logger/*.yaml), for the training stages."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig


def build_loggers(logger_cfg: DictConfig | None) -> list:
    """One Lightning logger per entry of the `logger` group (none for logger=none)."""
    if not logger_cfg:
        return []
    return [
        instantiate(node) for node in logger_cfg.values() if node is not None and "_target_" in node
    ]
