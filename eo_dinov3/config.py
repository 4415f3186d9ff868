"""Layered YAML configuration shared by every workflow: defaults ← a YAML file ← ``key=value`` overrides.

Unknown keys are errors that name the key and where it came from (typos are the most common config bug). Sections
that are ``null`` or ``{}`` in the defaults, and the ``free_keys`` a workflow declares, are free-form; a free key's
value replaces the default instead of being merged into it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from eo_dinov3.errors import ConfigError


def unknown_keys(defaults: Any, given: Any, *, free_keys: Sequence[str] = (), prefix: str = "") -> list[str]:
    """Dotted names in ``given`` that ``defaults`` does not have (free-form sections are not descended)."""
    if not isinstance(given, dict) or not isinstance(defaults, dict) or not defaults:
        return []
    bad = []
    for key, value in given.items():
        name = prefix + str(key)
        if key not in defaults:
            bad.append(name)
        elif name not in free_keys:
            bad += unknown_keys(defaults[key], value, free_keys=free_keys, prefix=name + ".")
    return bad


def layered_config(
    defaults: Mapping[str, Any] | DictConfig,
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
    *,
    free_keys: Sequence[str] = (),
    what: str = "config",
    valid_keys_hint: str = "",
) -> DictConfig:
    """Merge ``defaults`` ← YAML ``path`` ← dotted ``overrides`` ← ``values`` (nested dict) into a DictConfig."""
    cfg = defaults if isinstance(defaults, DictConfig) else OmegaConf.create(dict(defaults))
    plain_defaults = OmegaConf.to_container(cfg)
    layers = []
    try:
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"{what} file not found: {path}")
            layers.append((str(path), OmegaConf.load(path)))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"overrides must look like key=value, got {bad}")
            layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
        if values:
            layers.append(("arguments", OmegaConf.create(dict(values))))
        for source, layer in layers:
            unknown = unknown_keys(plain_defaults, OmegaConf.to_container(layer), free_keys=free_keys)
            if unknown:
                hint = f" (valid keys: {valid_keys_hint})" if valid_keys_hint else ""
                raise ConfigError(f"unknown {what} key(s) {unknown} in {source}{hint}")
            for key in free_keys:  # free-form values replace, never merge
                value = OmegaConf.select(layer, key)
                if value is not None:
                    OmegaConf.update(cfg, key, value, merge=False)
            cfg = OmegaConf.merge(cfg, layer)
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid {what}: {str(e).splitlines()[0]}") from None
    return cfg
