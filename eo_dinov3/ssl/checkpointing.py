"""Training checkpoints: atomic, rotated, full state, resumable bit-for-bit.

Layout under ``<output_dir>/ckpt/``: ``<iteration>.pt`` (iteration = the number of completed optimiser steps)
holding ``{"format": "eo_dinov3.train", "iteration", "model" (student, teacher, Gram teacher, loss buffers),
"optimizer", "rng" (torch/numpy/python states), "data_position", "counters", "config"}``. Files are written to a
temporary name in the same folder and renamed (atomic on POSIX), so a run killed while saving never leaves a
half-written checkpoint that looks valid. The newest ``max_to_keep`` are kept, plus every ``keep_every``-th.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eo_dinov3.errors import CheckpointError
from eo_dinov3.fileio import atomic_save  # noqa: F401  (re-exported: ckpt.atomic_save)

_NAME = re.compile(r"^(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    """torch/numpy/python RNG states as tensors and ints (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """``[(iteration, path)]`` sorted by iteration (only complete files: temporaries are ignored)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(ckpt_dir)
    return ckpts[-1][1] if ckpts else None


def rotate_checkpoints(ckpt_dir: str | Path, max_to_keep: int, keep_every: int | None) -> list[Path]:
    """Delete all but the newest ``max_to_keep`` (keeping multiples of ``keep_every``); returns deleted paths."""
    ckpts = list_checkpoints(ckpt_dir)
    deleted = []
    for it, p in ckpts[: max(len(ckpts) - max_to_keep, 0)]:
        if keep_every and it % keep_every == 0:
            continue
        p.unlink(missing_ok=True)
        deleted.append(p)
    return deleted


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read one of our training checkpoints (``weights_only=True``: tensors, numbers and strings only)."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read training checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict) or obj.get("format") != "eo_dinov3.train":
        raise CheckpointError(f"{path} is not an eo_dinov3 training checkpoint")
    return obj
