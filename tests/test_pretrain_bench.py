"""bench/pretrain_step.py: analytic step FLOPs against torch's FlopCounterMode, and a tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

BENCH = Path(__file__).resolve().parents[1] / "bench" / "pretrain_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("pretrain_step", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["pretrain_step"] = mod
    spec.loader.exec_module(mod)
    return mod


TINY = [
    "student.arch_overrides={embed_dim: 64, depth: 2, num_heads: 2}",
    "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32",
    "ibot.head_hidden_dim=64", "ibot.head_bottleneck_dim=32",
]


def _tiny(bench, batch=4):
    from eo_dinov3.ssl.meta_arch import SSLMetaArch

    recipe = bench.Recipe(global_size=64, local_size=32, n_local=2)
    cfg = bench.build_config("custom", prototypes=256, recipe=recipe, batch=batch, extra=TINY)
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    model.init_weights()
    model.train()
    return model, recipe


def _non_attention_flops(counter: FlopCounterMode) -> int:
    return sum(v for k, v in counter.get_flop_counts()["Global"].items() if "attention" not in str(k))


def test_vit_formula_matches_performance_reference(bench):
    """performance.md §1: ViT-L/16 at 224 px = 123.1 GFLOPs with N = 197; 4 registers add ≈ 2.1 %."""
    from eo_dinov3.models.vision_transformer import DinoVisionTransformer
    from eo_dinov3.hub import arch_config

    with torch.device("meta"):
        vitl = DinoVisionTransformer(arch_config("dinov3_vitl16"))
        vitl0 = DinoVisionTransformer(arch_config("dinov3_vitl16", n_storage_tokens=0))
    assert bench.backbone_forward_flops(vitl0, 224) / 1e9 == pytest.approx(123.1, abs=0.1)
    assert bench.backbone_forward_flops(vitl, 224) / bench.backbone_forward_flops(vitl0, 224) == pytest.approx(
        1.021, abs=0.002)


def test_backbone_formula_matches_flop_counter(bench):
    model, recipe = _tiny(bench)
    bb = model.student["backbone"]
    x = torch.randn(3, 3, 64, 64)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        bb.forward_features(x)
    assert _non_attention_flops(fc) == pytest.approx(3 * bench.backbone_forward_flops(bb, 64, attention=False),
                                                     rel=1e-9)
    # attention term: 4·N²·D per block, N = 16 patches + CLS + 4 registers
    full, no_attn = bench.backbone_forward_flops(bb, 64), bench.backbone_forward_flops(bb, 64, attention=False)
    assert full - no_attn == 2 * 4 * 21**2 * 64


def test_step_formula_close_to_flop_counter(bench):
    """Whole forward_backward (teacher + student + heads + losses): the analytic count is within a few % of the
    counted matmul FLOPs (differences: the patch-embedding backward needs no input gradient, loss matmuls)."""
    model, recipe = _tiny(bench)
    batch = bench.synthetic_batches(4, recipe, 16, 3, 1)[0]
    with FlopCounterMode(display=False) as fc:
        model.forward_backward(batch, teacher_temp=0.07)
    M = int(batch["mask_indices_list"].numel())
    assert M > 0
    analytic = bench.step_flops(model, 4, recipe, M, attention=False)
    ratio = _non_attention_flops(fc) / analytic["total"]
    assert 0.9 < ratio < 1.02, ratio


def test_synthetic_batches_have_real_masks(bench):
    recipe = bench.Recipe(global_size=64, local_size=32, n_local=2)
    b = bench.synthetic_batches(4, recipe, 16, 3, 2)
    for batch in b:
        assert batch["collated_global_crops"].shape == (8, 3, 64, 64)
        assert batch["collated_local_crops"].shape == (8, 3, 32, 32)
        per_image = batch["collated_masks"].sum(1)
        assert int((per_image > 0).sum()) == 4  # mask probability 0.5 of 8 crop-images
        assert int(batch["n_masked_patches"]) == int(batch["mask_indices_list"].numel())


def test_run_benchmark_tiny(bench, capsys):
    rows = bench.run_benchmark(["custom"], batch=2, prototypes=256, warmup=1, iters=1, cpu_peak_gflops=50.0,
                               recipe=bench.Recipe(global_size=64, local_size=32, n_local=2), extra_overrides=TINY)
    assert len(rows) == 1
    r = rows[0]
    for col in bench.COLUMNS:
        assert col in r
    for col in ("imgs_per_s", "step_ms", "peak_mem_mb", "tflop_per_step", "achieved_tflops", "mfu_pct"):
        assert math.isfinite(r[col]) and r[col] > 0, col
    assert r["peak_tflops"] == pytest.approx(0.05)
    assert r["device"] == "cpu" and r["dtype"] == "fp32" and r["batch"] == 2
    assert r["mfu_pct"] == pytest.approx(100 * r["achieved_tflops"] / 0.05)
    table = bench.format_table(rows)
    assert table.count("\n") == 2 and "| custom | 2 | 256 |" in table
