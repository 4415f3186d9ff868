"""Elastic restarts: under ``torchrun --max-restarts`` with a c10d rendezvous, a rank killed mid-run (SIGKILL, via the
``EO_DINOV3_FAULT_AT_STEP`` drill hook) brings the job back from its last checkpoint, and the restarted job's
per-step losses equal an uninterrupted run's bit for bit. Tiny model, real sample tiles, 2 CPU processes."""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from eo_dinov3.errors import ConfigError
from eo_dinov3.ssl.distributed import _GENERATION_KEY, _init_process_group
from eo_dinov3.ssl.faults import FaultPlan, restart_count
from tests.test_pretrain_loop import PRETRAIN, _losses, tiny_overrides


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_c10d(out: Path, tiles: Path, fault_env: dict[str, str]) -> subprocess.CompletedProcess:
    """2 workers, c10d rendezvous on a free local port, one restart allowed; 6 steps, a checkpoint every 2."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **fault_env}
    for k in ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "EO_DINOV3_FAULT_AT_STEP", "EO_DINOV3_FAULT_RANK"):
        if k not in fault_env:
            env.pop(k, None)  # exercise torchrun's default (shared, reused) store and no stray drill
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", out.name,
           "--max-restarts", "1", str(PRETRAIN), "--no-progress",
           *tiny_overrides(out, tiles, batch=2, iters=6)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_killed_rank_restarts_from_last_checkpoint_with_identical_losses(tmp_path, tiles_dir):
    ref = _torchrun_c10d(tmp_path / "ref", tiles_dir, {})
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = _losses(tmp_path / "ref")
    assert sorted(reference) == list(range(6))

    run = tmp_path / "faulty"
    r = _torchrun_c10d(run, tiles_dir, {"EO_DINOV3_FAULT_AT_STEP": "3", "EO_DINOV3_FAULT_RANK": "1"})
    assert r.returncode == 0, r.stderr[-3000:]  # (a) the job as a whole succeeded
    assert "fault injection armed: rank 1" in r.stderr
    assert "exitcode: -9" in r.stderr or "exitcode : -9" in r.stderr, r.stderr[-3000:]  # rank 1 really died
    # (b) torchrun restarted the workers once (and the restarted attempt did not inject the fault again)
    assert "elastic restart 1 (TORCHELASTIC_RESTART_COUNT)" in r.stderr
    assert json.loads((run / "summary.json").read_text())["elastic_restart_count"] == 1
    # (c) from the last checkpoint (2 steps), not from scratch: the log jumps back to iteration 2, never to 0
    assert f"resumed from {run / 'ckpt' / '2.pt'} at iteration 2" in r.stderr
    order = [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    back = next(i for i in range(1, len(order)) if order[i] <= order[i - 1])
    assert order[:back] in ([0, 1, 2], [0, 1, 2, 3]) and order[back:] == [2, 3, 4, 5], order
    # (d) the restarted job's per-step losses are the uninterrupted run's, bit for bit
    assert _losses(run) == reference
    assert sorted(int(p.stem) for p in (run / "ckpt").glob("*.pt")) == [2, 4, 6]


def test_fault_plan_is_armed_only_on_the_first_attempt():
    assert FaultPlan.from_env({}) is None
    assert FaultPlan.from_env({"EO_DINOV3_FAULT_AT_STEP": "3"}) == FaultPlan(step=3, rank=0)
    armed = {"EO_DINOV3_FAULT_AT_STEP": "3", "EO_DINOV3_FAULT_RANK": "1"}
    assert FaultPlan.from_env({**armed, "TORCHELASTIC_RESTART_COUNT": "0"}) == FaultPlan(step=3, rank=1)
    assert FaultPlan.from_env({**armed, "TORCHELASTIC_RESTART_COUNT": "1"}) is None
    assert restart_count({"TORCHELASTIC_RESTART_COUNT": "2"}) == 2 and restart_count({}) == 0
    for bad in ({"EO_DINOV3_FAULT_AT_STEP": "0"}, {"EO_DINOV3_FAULT_AT_STEP": "three"},
                {"EO_DINOV3_FAULT_AT_STEP": "3", "EO_DINOV3_FAULT_RANK": "-1"}):
        with pytest.raises(ConfigError, match="EO_DINOV3_FAULT"):
            FaultPlan.from_env(bad)
    plan = FaultPlan(step=3, rank=1)
    plan.maybe_fire(3, rank=0)  # other rank, other step: nothing happens (this test process survives)
    plan.maybe_fire(2, rank=1)


def test_process_groups_on_a_reused_agent_store_get_fresh_key_prefixes(monkeypatch):
    """What torchrun does on a restart in this torch build: the agent's store (and its keys) outlive the workers.
    Each process group built on it must use a new key namespace, recorded in the store."""
    port = _free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=datetime.timedelta(seconds=30))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    assert not dist.is_initialized()
    for expected in (0, 1, 2):  # first attempt, then two restarts on the same store
        _init_process_group("gloo", 0, 1, datetime.timedelta(seconds=30))
        try:
            assert server.get(_GENERATION_KEY) == str(expected).encode()
        finally:
            dist.destroy_process_group()
