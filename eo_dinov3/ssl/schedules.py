"""Iteration-based training schedules: lr, weight decay, EMA momentum, teacher temperature, last-layer lr.

Two official kinds (``dinov3/train/cosine_lr_scheduler.py``, ``dinov3/train/train.py``), all float64 NumPy:

* **v1** :class:`CosineScheduler` (config without a ``schedules`` key; default / IN-1k ViT-L): ``freeze`` zeros,
  then a linear warmup ``linspace(start, base, W)`` (endpoint included), then
  ``final + ½(base − final)(1 + cos(π i / n))`` for ``i = 0 … n−1``; indexing at ``it ≥ total`` gives
  ``final``.
* **v2** :func:`linear_warmup_cosine_decay` (config with ``schedules``; all 7B and distillation configs):
  ``linspace(start, peak, W, endpoint=False)``, then ``end + (peak − end)·½(1 + cos(linspace(0, π, C)))``
  (endpoints included, default ``C = total − W``), then constant ``end``.

LR scaling (``optim.scaling_rule``) with ``G = batch_size_per_gpu × world_size``: ``sqrt_wrt_1024`` multiplies by
``4·√(G/1024)``, ``linear_wrt_256`` by ``G/256``. v1 scales ``optim.lr`` only (``min_lr`` unscaled); v2 scales
the lr ``peak`` and ``end`` (not ``start``). The last-layer lr is the lr schedule with the first
``freeze_last_layer_epochs × epoch_length`` iterations set to 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

#: official default config values (``ssl_default_config.yaml``) used for missing keys
DEFAULTS: dict[str, dict[str, Any]] = {
    "train": {"OFFICIAL_EPOCH_LENGTH": 1250, "batch_size_per_gpu": 64},
    "optim": {
        "epochs": 100,
        "weight_decay": 0.04,
        "weight_decay_end": 0.4,
        "lr": 0.001,
        "warmup_epochs": 10,
        "min_lr": 1.0e-06,
        "schedule_trunc_extra": 0.0,
        "freeze_last_layer_epochs": 1,
        "scaling_rule": "sqrt_wrt_1024",
    },
    "teacher": {
        "momentum_teacher": 0.992,
        "final_momentum_teacher": 1.0,
        "warmup_teacher_temp": 0.04,
        "teacher_temp": 0.07,
        "warmup_teacher_temp_epochs": 30,
    },
}


class CosineScheduler:
    """v1 schedule: ``schedule`` (float64 ``[total_iters]``); ``self[it]`` = ``final_value`` for ``it ≥ total``.

    ``trunc_extra > 0`` computes a cosine over ``(1 + trunc_extra)·n`` steps, keeps the first ``n`` and rescales
    them to end exactly at ``final_value``."""

    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0.0,
        freeze_iters: int = 0,
        trunc_extra: float = 0.0,
    ):
        self.final_value = np.float64(final_value)
        self.total_iters = total_iters
        freeze = np.zeros(freeze_iters)
        warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
        n = total_iters - warmup_iters - freeze_iters
        if trunc_extra == 0.0:
            iters = np.arange(n)
            cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
        else:
            angles = np.linspace(0, np.pi, int((1 + trunc_extra) * n))[:n]
            cosine = (np.cos(angles) + 1) / 2
            cosine = (cosine - cosine[-1]) / (1 - cosine[-1])
            cosine = cosine * (base_value - final_value) + final_value
        self.schedule = np.concatenate((freeze, warmup, cosine), dtype=np.float64)
        if len(self.schedule) != total_iters:
            raise ValueError(
                f"CosineScheduler: warmup ({warmup_iters}) + freeze ({freeze_iters}) exceed total ({total_iters})"
            )

    def __getitem__(self, it: int) -> np.float64:
        return self.final_value if it >= self.total_iters else self.schedule[it]

    def __len__(self) -> int:
        return self.total_iters


def linear_warmup_cosine_decay(
    start: float,
    peak: float,
    end: float,
    warmup_iterations: int,
    total_iterations: int,
    cosine_iterations: int | None = None,
) -> np.ndarray:
    """v2 schedule, float64 ``[total_iterations]``: linear ``start → peak`` (endpoint excluded) over
    ``warmup_iterations``, cosine ``peak → end`` over ``cosine_iterations`` (default: the rest; both endpoints
    included), then constant ``end``."""
    linear = np.linspace(start, peak, warmup_iterations, endpoint=False)
    if cosine_iterations is None:
        cosine_iterations = total_iterations - warmup_iterations
    cosine = (np.cos(np.linspace(0, np.pi, cosine_iterations)) + 1) / 2
    cosine = (peak - end) * cosine + end
    remaining = total_iterations - cosine_iterations - warmup_iterations
    if remaining < 0:
        raise ValueError(
            f"linear_warmup_cosine_decay: warmup ({warmup_iterations}) + cosine ({cosine_iterations}) iterations "
            f"exceed the total ({total_iterations})"
        )
    return np.concatenate([linear, cosine, np.full((remaining,), fill_value=end)])


def lr_scale_factor(scaling_rule: str | None, global_batch_size: int) -> float:
    """Multiplier of the configured lr: ``sqrt_wrt_1024`` → ``4·√(G/1024)``, ``linear_wrt_256`` → ``G/256``,
    anything else (e.g. ``None``/``"none"``) → 1."""
    if scaling_rule == "sqrt_wrt_1024":
        return 4 * math.sqrt(global_batch_size / 1024.0)
    if scaling_rule == "linear_wrt_256":
        return global_batch_size / 256.0
    return 1.0


class _Array:
    """A v2 array indexable past its end (returns the last value; the official array would raise)."""

    def __init__(self, values: np.ndarray):
        self.schedule = values

    def __getitem__(self, it: int) -> np.float64:
        return self.schedule[min(it, len(self.schedule) - 1)]

    def __len__(self) -> int:
        return len(self.schedule)


def _iters(epochs: float, epoch_length: int) -> int:
    """Iterations of ``epochs`` "epochs" of ``epoch_length`` iterations (fractional epochs allowed)."""
    return int(round(epochs * epoch_length))


def _section(cfg: Mapping[str, Any], name: str) -> dict[str, Any]:
    given = cfg[name] if name in cfg else {}
    return {**DEFAULTS.get(name, {}), **{k: given[k] for k in given}}


@dataclass
class ScheduleSet:
    """The five per-iteration schedules of one run; ``sched[it]`` → dict of floats at absolute iteration ``it``."""

    lr: Any
    wd: Any
    momentum: Any
    teacher_temp: Any
    last_layer_lr: Any
    version: str
    total_iterations: int

    def __getitem__(self, it: int) -> dict[str, float]:
        return {
            "lr": float(self.lr[it]),
            "wd": float(self.wd[it]),
            "momentum": float(self.momentum[it]),
            "teacher_temp": float(self.teacher_temp[it]),
            "last_layer_lr": float(self.last_layer_lr[it]),
        }

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], world_size: int = 1) -> "ScheduleSet":
        """Build from an official-style config (dict or OmegaConf) with sections ``train``
        (``OFFICIAL_EPOCH_LENGTH``, ``batch_size_per_gpu``), ``optim``, ``teacher`` and optionally ``schedules``
        (v2: ``lr``/``weight_decay``/``momentum``/``teacher_temp`` each with ``start``, ``peak``, ``end``,
        ``warmup_epochs``, optional ``cosine_epochs``; ``lr.freeze_last_layer_epochs``). Missing v1 keys take the
        official defaults (:data:`DEFAULTS`). ``world_size`` enters the lr scaling only."""
        train, optim, teacher = _section(cfg, "train"), _section(cfg, "optim"), _section(cfg, "teacher")
        ep = int(train["OFFICIAL_EPOCH_LENGTH"])
        total = _iters(optim["epochs"], ep)
        factor = lr_scale_factor(optim["scaling_rule"], int(train["batch_size_per_gpu"]) * world_size)
        if "schedules" in cfg and cfg["schedules"]:
            return cls._v2(cfg["schedules"], ep, total, factor)

        lr_args = dict(
            base_value=optim["lr"] * factor,
            final_value=optim["min_lr"],
            total_iters=total,
            warmup_iters=_iters(optim["warmup_epochs"], ep),
            start_warmup_value=0,
            trunc_extra=optim["schedule_trunc_extra"],
        )
        lr = CosineScheduler(**lr_args)
        last_layer_lr = CosineScheduler(**lr_args)
        last_layer_lr.schedule[: _iters(optim["freeze_last_layer_epochs"], ep)] = 0
        wd = CosineScheduler(
            optim["weight_decay"], optim["weight_decay_end"], total, trunc_extra=optim["schedule_trunc_extra"]
        )
        momentum = CosineScheduler(
            teacher["momentum_teacher"],
            teacher["final_momentum_teacher"],
            total,
            trunc_extra=optim["schedule_trunc_extra"],
        )
        tt_iters = _iters(teacher["warmup_teacher_temp_epochs"], ep)
        teacher_temp = CosineScheduler(
            teacher["teacher_temp"],
            teacher["teacher_temp"],
            tt_iters,
            warmup_iters=tt_iters,
            start_warmup_value=teacher["warmup_teacher_temp"],
        )
        return cls(lr, wd, momentum, teacher_temp, last_layer_lr, "v1", total)

    @classmethod
    def _v2(cls, sch: Mapping[str, Any], ep: int, total: int, factor: float) -> "ScheduleSet":
        def build(name: str, scale: float = 1.0) -> np.ndarray:
            s = sch[name]
            return linear_warmup_cosine_decay(
                start=s["start"],
                peak=s["peak"] * scale,
                end=s["end"] * scale,
                warmup_iterations=_iters(s["warmup_epochs"], ep),
                total_iterations=total,
                cosine_iterations=_iters(s["cosine_epochs"], ep) if "cosine_epochs" in s else None,
            )

        lr = build("lr", factor)
        last_layer_lr = lr.copy()
        freeze = sch["lr"]["freeze_last_layer_epochs"] if "freeze_last_layer_epochs" in sch["lr"] else 0
        last_layer_lr[: _iters(freeze, ep)] = 0
        return cls(
            _Array(lr),
            _Array(build("weight_decay")),
            _Array(build("momentum")),
            _Array(build("teacher_temp")),
            _Array(last_layer_lr),
            "v2",
            total,
        )
