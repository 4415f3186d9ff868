"""Pretraining configuration: package defaults ← a YAML file ← ``key=value`` overrides (official trainer style).

>>> cfg = load_config("configs/pretrain/demo_cpu.yaml", ["optim.lr=5e-4", "train.batch_size_per_gpu=8"])

Unknown keys are errors (typos are the most common config bug); values are parsed as YAML (``[1,2]``, ``null``,
``{start: 0, peak: 1e-3}``). Sections that are ``null`` or ``{}`` in the defaults are free-form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from eo_dinov3.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).with_name("default_config.yaml")


def default_config() -> DictConfig:
    return OmegaConf.load(DEFAULT_CONFIG)


def _unknown_keys(defaults: Any, given: Any, prefix: str = "") -> list[str]:
    if not isinstance(given, dict) or not isinstance(defaults, dict) or not defaults:
        return []  # leaf, or a free-form section (null / {} in the defaults)
    bad = []
    for key, value in given.items():
        if key not in defaults:
            bad.append(prefix + str(key))
        else:
            bad += _unknown_keys(defaults[key], value, f"{prefix}{key}.")
    return bad


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Merge defaults, an optional YAML file and dotted overrides; unknown keys raise :class:`ConfigError`."""
    cfg = default_config()
    defaults = OmegaConf.to_container(cfg)
    layers = []
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            layers.append((str(path), OmegaConf.load(path)))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"overrides must look like key=value, got {bad}")
            layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
        for source, layer in layers:
            unknown = _unknown_keys(defaults, OmegaConf.to_container(layer))
            if unknown:
                raise ConfigError(
                    f"unknown config key(s) {unknown} in {source} (valid keys: eo_dinov3/ssl/default_config.yaml)"
                )
            cfg = OmegaConf.merge(cfg, layer)
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid config: {str(e).splitlines()[0]}") from None
    return cfg


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the resolved config (what the run really used) as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(OmegaConf.to_yaml(cfg, resolve=True))
