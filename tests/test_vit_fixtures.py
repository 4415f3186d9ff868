"""The backbone and RoPE against tensors produced by the official implementation (shared/fixtures/dinov3)."""

from __future__ import annotations

import json

import pytest
import torch

from eo_dinov3.models.rope import RopePositionEmbedding, apply_rope, rope_periods
from eo_dinov3.models.vision_transformer import DinoVisionTransformer
from tests.conftest import FIXTURES, requires_fixtures

pytestmark = requires_fixtures
TOL = dict(rtol=1e-5, atol=1e-5)
KEYS = ["x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"]


@pytest.fixture(scope="module")
def tiny():
    cfg = json.loads((FIXTURES / "scalars.json").read_text())["vit_tiny"]["config"]
    model = DinoVisionTransformer(**cfg).eval()
    result = model.load_state_dict(torch.load(FIXTURES / "vit_tiny_state_dict.pt", weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIXTURES / "vit_tiny_cases.pt", weights_only=True)


def test_state_dict_keys_are_official(tiny):
    info = json.loads((FIXTURES / "scalars.json").read_text())["vit_tiny"]
    ours = {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in tiny.state_dict().items()}
    expected = {name: [shape, dtype] for name, shape, dtype in info["state_dict_keys"]}
    assert ours == expected
    assert sum(p.numel() for p in tiny.parameters()) == info["n_params"]


def test_hub_parameter_counts_and_sat_keys():
    from eo_dinov3.hub import BACKBONES, dinov3_vitl16

    hub = json.loads((FIXTURES / "scalars.json").read_text())["hub"]
    for name, fn in BACKBONES.items():
        model = fn(pretrained=False, device="meta")
        assert sum(p.numel() for p in model.parameters()) == hub["param_counts"][name], name
    sat = dinov3_vitl16(pretrained=False, device="meta", untie_global_and_local_cls_norm=True)
    assert sum(p.numel() for p in sat.parameters()) == hub["param_counts"]["dinov3_vitl16_sat493m"]
    expected = {name: shape for name, shape in hub["dinov3_vitl16_sat493m_state_dict"]}
    assert {k: list(v.shape) for k, v in sat.state_dict().items()} == expected
    names = set(expected)
    assert len(names) == 370


@torch.no_grad()
def test_eval_forward_features(tiny, ref):
    out = tiny.forward_features(ref["input"])
    for k in KEYS:
        torch.testing.assert_close(out[k], ref[f"eval.forward_features.{k}"], **TOL)
    torch.testing.assert_close(tiny(ref["input"]), ref["eval.forward"], **TOL)


@torch.no_grad()
def test_masked_forward_features(tiny, ref):
    out = tiny.forward_features(ref["input"], masks=ref["masks"])
    for k in KEYS:
        torch.testing.assert_close(out[k], ref[f"eval.masked.forward_features.{k}"], **TOL)
    assert out["masks"] is ref["masks"]
    # the mask token really replaces patches: unmasked output differs
    assert not torch.allclose(out["x_prenorm"], tiny.forward_features(ref["input"])["x_prenorm"])


@torch.no_grad()
def test_non_multiple_input_is_cropped(tiny, ref):
    out = tiny.forward_features(ref["input_nonmultiple"])
    torch.testing.assert_close(out["x_norm_patchtokens"], ref["eval.nonmultiple.x_norm_patchtokens"], **TOL)


@torch.no_grad()
def test_get_intermediate_layers(tiny, ref):
    layers = tiny.get_intermediate_layers(
        ref["input"], n=[0, 2], reshape=True, return_class_token=True, return_extra_tokens=True
    )
    for (patch, cls, storage), b in zip(layers, [0, 2]):
        pre = f"eval.gil.n[0,2].norm.reshape.block{b}"
        torch.testing.assert_close(patch, ref[f"{pre}.patch"], **TOL)
        torch.testing.assert_close(cls, ref[f"{pre}.cls"], **TOL)
        torch.testing.assert_close(storage, ref[f"{pre}.storage"], **TOL)
    layers = tiny.get_intermediate_layers(ref["input"], n=3, return_class_token=True)
    assert len(layers) == 3
    for b, (patch, cls) in enumerate(layers):
        torch.testing.assert_close(patch, ref[f"eval.gil.n3.norm.block{b}.patch"], **TOL)
        torch.testing.assert_close(cls, ref[f"eval.gil.n3.norm.block{b}.cls"], **TOL)
    (last,) = tiny.get_intermediate_layers(ref["input"], n=1, norm=False)
    torch.testing.assert_close(last, ref["eval.gil.n1.nonorm.patch"], **TOL)


@torch.no_grad()
def test_list_forward_eval_and_train(tiny, ref):
    xs, ms = [ref["input"], ref["input_local"]], [ref["masks"], None]
    out = tiny.forward_features(xs, ms)
    for k in KEYS:
        torch.testing.assert_close(out[1][k], ref[f"eval.list.local.{k}"], **TOL)
    tiny.train()
    saved = tiny.rope_embed.rescale_coords
    tiny.rope_embed.rescale_coords = None  # the fixture's train case has the RoPE augmentation off
    try:
        out = tiny.forward_features(xs, ms)
    finally:
        tiny.rope_embed.rescale_coords = saved
        tiny.eval()
    for k in KEYS:
        torch.testing.assert_close(out[0][k], ref[f"train.list.global.{k}"], **TOL)
        torch.testing.assert_close(out[1][k], ref[f"train.list.local.{k}"], **TOL)
    # local_cls_norm is really used for the local entry in training only
    assert not torch.allclose(ref["train.list.local.x_norm_clstoken"], ref["eval.list.local.x_norm_clstoken"])


# ---------------------------------------------------------------------------------------------------- RoPE
@pytest.fixture(scope="module")
def rope_ref():
    return torch.load(FIXTURES / "rope_cases.pt", weights_only=True)


def test_rope_periods(rope_ref):
    t = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rope_periods(64, base=100.0), rope_ref["periods.Dh64.base100.fp32"], **t)
    assert torch.equal(rope_periods(64, base=100.0, dtype=torch.bfloat16), rope_ref["periods.Dh64.base100.bf16"])
    torch.testing.assert_close(rope_periods(32, base=100.0), rope_ref["periods.Dh32.base100.fp32"], **t)
    torch.testing.assert_close(
        rope_periods(16, base=None, min_period=0.5, max_period=50.0), rope_ref["periods.Dh16.minmax_0.5_50.fp32"], **t
    )


@pytest.mark.parametrize(
    "key,H,W,norm",
    [("H2W3.separate", 2, 3, "separate"), ("H2W4.separate", 2, 4, "separate"), ("H2W4.min", 2, 4, "min"),
     ("H2W4.max", 2, 4, "max")],
)
def test_rope_eval_tables(rope_ref, key, H, W, norm):
    rope = RopePositionEmbedding(16, num_heads=1, base=100.0, normalize_coords=norm).eval()
    sin, cos = rope(H=H, W=W)
    torch.testing.assert_close(sin, rope_ref[f"eval.Dh16.{key}.sin"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cos, rope_ref[f"eval.Dh16.{key}.cos"], rtol=1e-6, atol=1e-6)


def test_rope_dh64_tables_fp32_and_bf16(rope_ref):
    for dtype, tag in [(torch.float32, "fp32"), (torch.bfloat16, "bf16")]:
        rope = RopePositionEmbedding(64, num_heads=1, base=100.0, dtype=dtype).eval()
        sin, cos = rope(H=4, W=6)
        if dtype == torch.float32:
            torch.testing.assert_close(sin, rope_ref[f"eval.Dh64.H4W6.{tag}.sin"], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(cos, rope_ref[f"eval.Dh64.H4W6.{tag}.cos"], rtol=1e-6, atol=1e-6)
        else:
            torch.testing.assert_close(sin.float(), rope_ref[f"eval.Dh64.H4W6.{tag}.sin"].float(), rtol=0, atol=1e-2)
            torch.testing.assert_close(cos.float(), rope_ref[f"eval.Dh64.H4W6.{tag}.cos"].float(), rtol=0, atol=1e-2)


@pytest.mark.parametrize(
    "name,kwargs,seed",
    [
        ("rescale2", dict(rescale_coords=2.0), 123),
        ("shift0.5", dict(shift_coords=0.5), 124),
        ("jitter1.5", dict(jitter_coords=1.5), 125),
        ("shift0.5_jitter1.5_rescale2", dict(shift_coords=0.5, jitter_coords=1.5, rescale_coords=2.0), 126),
    ],
)
def test_rope_train_augmentation_matches_official_draws(rope_ref, name, kwargs, seed):
    rope = RopePositionEmbedding(16, num_heads=1, base=100.0, **kwargs).train()
    torch.manual_seed(seed)
    sin, cos = rope(H=2, W=3)
    torch.testing.assert_close(sin, rope_ref[f"train.{name}.seed{seed}.sin"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cos, rope_ref[f"train.{name}.seed{seed}.cos"], rtol=1e-6, atol=1e-6)
    # a second call draws new factors (training augmentation is not cached)
    sin2, _ = rope(H=2, W=3)
    assert not torch.allclose(sin, sin2)


def test_rope_apply_skips_prefix_tokens(rope_ref):
    from eo_dinov3.models.layers import SelfAttention

    q, k = SelfAttention._rope(rope_ref["apply.q_in"], rope_ref["apply.k_in"], (rope_ref["apply.sin"], rope_ref["apply.cos"]))
    torch.testing.assert_close(q, rope_ref["apply.q_out"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k, rope_ref["apply.k_out"], rtol=1e-6, atol=1e-6)
    # the official bf16 path: tables computed in bf16, q/k cast to bf16, rotated, cast back
    rope_bf16 = RopePositionEmbedding(64, num_heads=2, base=100.0, dtype=torch.bfloat16).eval()
    qb, kb = SelfAttention._rope(rope_ref["apply.q_in"], rope_ref["apply.k_in"], rope_bf16(H=4, W=3))
    torch.testing.assert_close(qb, rope_ref["apply_bf16.q_out"], rtol=0, atol=1e-2)
    torch.testing.assert_close(kb, rope_ref["apply_bf16.k_out"], rtol=0, atol=1e-2)
    assert torch.equal(q[:, :, :5], rope_ref["apply.q_in"][:, :, :5])
    assert torch.allclose(apply_rope(q, torch.zeros_like(q), torch.ones_like(q)), q)
