"""Fault injection for elastic-restart drills: one rank kills itself (SIGKILL) right after a chosen step.

Used to check, on a real cluster or in the tests, that ``torchrun --max-restarts N`` with a c10d rendezvous brings a
job back from its last checkpoint after a rank dies. Two environment variables arm it:

``EO_DINOV3_FAULT_AT_STEP=k``
    once k optimiser steps are complete (``iteration == k``: after step k's update, metrics and the periodic
    checkpoint of that iteration, if one was due and written), the chosen rank sends itself ``SIGKILL``: no
    clean-up, no checkpoint, like an out-of-memory kill or a lost node. k >= 1. The other ranks then fail in their
    next collective (rank 0 may not get to log step k) and torchrun restarts the whole group.
``EO_DINOV3_FAULT_RANK=r``
    the global rank that dies (default 0).

Safe to leave in production code: nothing happens unless ``EO_DINOV3_FAULT_AT_STEP`` is set, and the fault fires
only on the first attempt of a job -- ``TORCHELASTIC_RESTART_COUNT`` (set by torchrun in every worker: 0 for the
first attempt, then 1, 2, ...) unset or ``0`` -- so the restarted workers, which inherit the same environment,
run to the end. Example (kill rank 1 after step 3; with ``checkpointing.period=2`` the restart resumes from
``ckpt/2.pt``)::

    EO_DINOV3_FAULT_AT_STEP=3 EO_DINOV3_FAULT_RANK=1 torchrun --nnodes 1 --nproc-per-node 2 \\
        --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29400 --max-restarts 1 \\
        sat_training/pretrain.py checkpointing.period=2 ...
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

from eo_dinov3.errors import ConfigError

FAULT_AT_STEP_ENV = "EO_DINOV3_FAULT_AT_STEP"
FAULT_RANK_ENV = "EO_DINOV3_FAULT_RANK"
RESTART_COUNT_ENV = "TORCHELASTIC_RESTART_COUNT"


def restart_count(env: Mapping[str, str] | None = None) -> int:
    """How many times torchrun has restarted this job's workers (0 on the first attempt or outside torchrun)."""
    env = os.environ if env is None else env
    try:
        return int(env.get(RESTART_COUNT_ENV, "0") or 0)
    except ValueError:
        return 0


def _int_env(env: Mapping[str, str], name: str, default: int | None, minimum: int) -> int | None:
    raw = env.get(name, "")
    if raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ConfigError(f"{name}={raw!r}: expected an integer >= {minimum} (or unset it to disable fault injection)")
    return value


@dataclass(frozen=True)
class FaultPlan:
    """Rank ``rank`` dies with SIGKILL once ``iteration == step`` (``step`` completed optimiser steps)."""

    step: int
    rank: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> FaultPlan | None:
        """The armed plan, or None when ``EO_DINOV3_FAULT_AT_STEP`` is unset or this is a restarted attempt."""
        env = os.environ if env is None else env
        step = _int_env(env, FAULT_AT_STEP_ENV, None, 1)
        if step is None or restart_count(env) > 0:
            return None
        return cls(step=step, rank=_int_env(env, FAULT_RANK_ENV, 0, 0))

    def maybe_fire(self, iteration: int, rank: int) -> None:
        """Call once per completed step with the number of completed steps; SIGKILLs this process when due."""
        if iteration == self.step and rank == self.rank:
            os.kill(os.getpid(), signal.SIGKILL)
