"""Smoke test of bench/chm_predict.py on a micro model (no timing assertion): both pipelines run on the same
tiles, the table and JSON are produced, the CPU fp32 / bf16 / int8 variants run and differ from fp32 by finite,
small height differences."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_chm_predict", ROOT / "bench" / "chm_predict.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _has_hf_chmv2() -> bool:
    try:
        return importlib.util.find_spec("transformers.models.chmv2") is not None
    except ModuleNotFoundError:
        return False


def test_chm_bench_smoke(tmp_path, capsys):
    bench = _bench()
    args = ["--arch", "micro", "--size", "160", "--tile", "64", "--overlap", "16", "--json", str(tmp_path / "r.json")]
    if not _has_hf_chmv2():
        args.append("--skip-peer")
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "ours (predict_raster)" in out
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["ours"]["mpx_s"] > 0 and r["ours"]["km2_h"] == pytest.approx(r["ours"]["mpx_s"] * 3600 / (1 / 0.36))
    if _has_hf_chmv2():
        assert "transformers CHMv2 loop" in out and r["ratio_ours_over_peer"] > 0
    v = r["cpu_variants"]
    assert v["fp32"]["mean_abs_diff_m"] == 0.0 and v["fp32"]["speedup_vs_fp32"] == 1.0
    assert v["fp32"]["mean_height_m"] > 0
    expected = {"fp32", "int8"} | ({"bf16"} if bench.cpu_has_native_bf16() else set())
    assert set(v) == expected
    for name in expected - {"fp32"}:
        i = v[name]
        assert 0 < i["mean_abs_diff_m"] <= i["max_abs_diff_m"] < 96  # heights stay within the mixlog range
        assert "CPU precision variants" in out


def test_tile_grid_covers_raster():
    bench = _bench()
    starts = bench.tile_grid(300, 128, 32)
    assert starts[0] == 0 and starts[-1] + 128 == 300
    assert all(b - a <= 96 for a, b in zip(starts, starts[1:]))
