"""Smoke test of ``bench/backbone.py`` (not a timing assertion) and exactness of the ViT's inference fast paths.

The benchmark's speed work (fused RoPE on q and k, in-place LayerScale / residual / GELU without autograd) must give
the same numbers as the autograd path, bit for bit.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from eo_dinov3.hub import arch_config
from eo_dinov3.models.rope import apply_rope, apply_rope_to_patches
from eo_dinov3.models.vision_transformer import DinoVisionTransformer

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_backbone", ROOT / "bench" / "backbone.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load_bench()


def test_run_benchmark_reports_every_column(bench):
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    rows = bench.run_benchmark(["vits16"], [64], batch=2, iters=1, warmup=1, threads=None, log=None)
    assert len(rows) == 1
    r = rows[0]
    assert tuple(r) == bench.COLUMNS
    assert (r["model"], r["size"], r["batch"], r["device"], r["dtype"]) == ("vits16", 64, 2, "cpu", "fp32")
    for impl in bench.IMPLS:
        assert r[f"ips_{impl}"] > 0 and math.isfinite(r[f"ips_{impl}"])
        assert r[f"mem_mb_{impl}"] > 0  # a forward at least holds its output tokens
    for peer in ("timm", "hf"):
        assert r[f"ratio_{peer}"] == pytest.approx(r["ips_ours"] / r[f"ips_{peer}"])
    table = bench.format_table(rows, iters=1)
    for word in ("img/s ours", "ours/timm", "ours/HF", "peak MB ours", "vits16", "profile_memory"):
        assert word in table
    # output tokens alone: 2 images x (1 + 4 + 16) tokens x 384 x 4 bytes; activations add more
    assert r["mem_mb_ours"] * 2**20 >= 2 * 21 * 384 * 4


def test_run_benchmark_ours_only_and_cli_json(bench, tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--models", "vits16", "--sizes", "32", "--batch", "1", "--iters", "1", "--impls", "ours",
                       "--json", str(out)]) == 0
    import json

    data = json.loads(out.read_text())
    (r,) = data["rows"]
    assert r["ips_ours"] > 0 and r["ips_timm"] is None and r["ratio_hf"] is None
    assert data["environment"]["torch"] == torch.__version__
    with pytest.raises(ValueError):
        bench.run_benchmark(["vits16"], [32], impls=("timm",), log=None)
    with pytest.raises(ValueError):
        bench.run_benchmark(["vitx"], [32], log=None)


def test_default_batches_are_positive(bench):
    for model in bench.MODELS:
        for size in (64, 224, 512, 1024):
            for dev in ("cpu", "cuda"):
                assert bench.default_batch(model, size, dev) >= 1


def test_apply_rope_to_patches_matches_reference_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 3, 5 + 12, 16, generator=g)  # [q/k, B, heads, prefix + patches, D_h]
    ang = torch.rand(12, 8, generator=g).tile(2) * 6
    sin, cos = ang.sin(), ang.cos()
    ref = torch.cat((x[..., :5, :], apply_rope(x[..., 5:, :], sin, cos)), dim=-2)
    with torch.no_grad():  # fast path: written into a fresh buffer
        fast = apply_rope_to_patches(x, sin, cos)
    assert torch.equal(fast, ref)
    xg = x.clone().requires_grad_(True)  # autograd path
    slow = apply_rope_to_patches(xg, sin, cos)
    assert torch.equal(slow.detach(), ref)
    slow.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    # a bf16 table rotates in bf16 and casts back, like the official rope_dtype="bf16"
    ref16 = torch.cat((x[..., :5, :], apply_rope(x[..., 5:, :].bfloat16(), sin.bfloat16(), cos.bfloat16()).float()), -2)
    assert torch.equal(apply_rope_to_patches(x, sin.bfloat16(), cos.bfloat16()), ref16)
    # bf16 q/k (autocast) with fp32 tables: rotated in fp32, one rounding to bf16 at the end
    xb = x.bfloat16()
    refb = torch.cat((xb[..., :5, :], apply_rope(xb[..., 5:, :].float(), sin, cos).bfloat16()), -2)
    with torch.no_grad():
        assert torch.equal(apply_rope_to_patches(xb, sin, cos), refb)


@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
def test_inference_fast_path_is_bit_exact(ffn):
    torch.manual_seed(0)
    m = DinoVisionTransformer(arch_config("dinov3_vits16", embed_dim=64, num_heads=2, depth=2, ffn_layer=ffn))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # LayerScale 1e-5 would hide the branches
    x = torch.randn(2, 3, 48, 32)
    m.eval()
    with torch.inference_mode():  # first, so that its cached RoPE tables would leak into the autograd call below
        fast = m.forward_features(x)
    grad_path = m.forward_features(x)  # autograd on: no in-place, cat-based RoPE
    for k in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
        assert torch.equal(fast[k], grad_path[k].detach()), k
    grad_path["x_prenorm"].sum().backward()  # fails if inference-mode RoPE tables were reused with autograd
    assert m.blocks[0].attn.qkv.weight.grad is not None
    # training (sample-drop stochastic depth, RoPE augmentation): same draws, same numbers with and without grad
    m.train()
    m.blocks[0].sample_drop_ratio = m.blocks[1].sample_drop_ratio = 0.5
    torch.manual_seed(3)
    with_grad = m.forward_features([x, x[:, :, :32]], [None, None])
    torch.manual_seed(3)
    with torch.no_grad():
        no_grad = m.forward_features([x, x[:, :, :32]], [None, None])
    for a, b in zip(with_grad, no_grad):
        assert torch.equal(a["x_prenorm"].detach(), b["x_prenorm"])


def test_forward_hooks_see_unmodified_activations():
    """With hooks registered, the in-place fast path is off: hooked outputs are not scaled/added/activated later."""
    torch.manual_seed(0)
    m = DinoVisionTransformer(arch_config("dinov3_vits16", embed_dim=64, num_heads=2, depth=1)).eval()
    x = torch.randn(1, 3, 32, 32)
    seen: dict[str, list[torch.Tensor]] = {"attn": [], "fc1": []}
    m.blocks[0].attn.register_forward_hook(lambda mod, i, o: seen["attn"].append(o))
    m.blocks[0].mlp.fc1.register_forward_hook(lambda mod, i, o: seen["fc1"].append(o))
    ref = m.forward_features(x)["x_prenorm"].detach()  # autograd path never writes in place
    with torch.inference_mode():
        out = m.forward_features(x)["x_prenorm"]
    assert torch.equal(out, ref)
    for name, (a, b) in seen.items():
        assert torch.equal(b, a.detach()), name
