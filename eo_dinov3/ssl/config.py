"""Pretraining configuration: package defaults ← a YAML file ← ``key=value`` overrides (official trainer style).

>>> cfg = load_config("configs/pretrain/demo_cpu.yaml", ["optim.lr=5e-4", "train.batch_size_per_gpu=8"])

Unknown keys are errors (typos are the most common config bug); values are parsed as YAML (``[1,2]``, ``null``,
``{start: 0, peak: 1e-3}``). Sections that are ``null`` or ``{}`` in the defaults are free-form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from eo_dinov3.config import layered_config

DEFAULT_CONFIG = Path(__file__).with_name("default_config.yaml")


def default_config() -> DictConfig:
    return OmegaConf.load(DEFAULT_CONFIG)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Merge defaults, an optional YAML file and dotted overrides; unknown keys raise :class:`ConfigError`."""
    return layered_config(default_config(), path, overrides, what="pretraining config",
                          valid_keys_hint="eo_dinov3/ssl/default_config.yaml")


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the resolved config (what the run really used) as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(OmegaConf.to_yaml(cfg, resolve=True))
