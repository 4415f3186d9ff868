"""DINOv3 ConvNeXt: official parameter counts and key layout, strict load/export round trip, outputs, and reference
values computed with the official ``facebookresearch/dinov3@6876159 dinov3/models/convnext.py``."""

from __future__ import annotations

import pytest
import torch

from eo_dinov3.errors import CheckpointError
from eo_dinov3.hub import dinov3_convnext_base, dinov3_convnext_large, dinov3_convnext_small, dinov3_convnext_tiny
from eo_dinov3.models.convnext import (
    CONVNEXT_PARAM_COUNTS,
    ConvNeXt,
    ConvNeXtConfig,
    convnext_config,
    load_convnext,
    save_convnext,
)


def _official_count(depths: list[int], dims: list[int], in_chans: int = 3) -> int:
    """Closed-form count of the official module: stem conv+LN, 3 × (LN + 2×2 conv), blocks (dw 7×7 conv, LN,
    two linears with ratio 4, gamma), final LN."""
    n = in_chans * dims[0] * 16 + dims[0] + 2 * dims[0]
    for i in range(3):
        n += 2 * dims[i] + dims[i] * dims[i + 1] * 4 + dims[i + 1]
    for d, c in zip(depths, dims):
        per_block = (49 * c + c) + 2 * c + (c * 4 * c + 4 * c) + (4 * c * c + c) + c
        n += d * per_block
    return n + 2 * dims[-1]


@pytest.mark.parametrize("size", ["tiny", "small", "base", "large"])
def test_param_counts_match_official(size):
    model = ConvNeXt(convnext_config(size), device="meta")
    n = sum(p.numel() for p in model.parameters())
    cfg = convnext_config(size)
    assert n == CONVNEXT_PARAM_COUNTS[size] == _official_count(cfg.depths, cfg.dims)
    sd = model.state_dict()
    n_stage_keys = sum(1 for k in sd if k.startswith("stages."))
    assert n_stage_keys == 9 * sum(cfg.depths)  # dwconv, norm, pwconv1, pwconv2 (weight+bias each) and gamma
    # official layout: 16 downsample keys, 9 per block, final norm + its norms.3 alias
    assert len(sd) == 16 + 9 * sum(cfg.depths) + 4
    assert {"norm.weight", "norms.3.weight", "downsample_layers.0.1.bias", "stages.3.2.gamma"} <= set(sd)


def test_hub_constructors_sizes():
    counts = {fn.__name__: sum(p.numel() for p in fn(pretrained=False, device="meta").parameters())
              for fn in (dinov3_convnext_tiny, dinov3_convnext_small, dinov3_convnext_base, dinov3_convnext_large)}
    assert counts == {f"dinov3_convnext_{k}": v for k, v in CONVNEXT_PARAM_COUNTS.items()}
    with pytest.raises(CheckpointError, match="weights=<local checkpoint path>"):
        dinov3_convnext_tiny()


def _tiny() -> ConvNeXt:
    return ConvNeXt(ConvNeXtConfig(depths=[1, 1, 2, 1], dims=[8, 16, 24, 32], patch_size=16))


def _deterministic_state_dict(model: ConvNeXt) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out = {}
    for i, k in enumerate(sorted(sd)):
        n = sd[k].numel()
        v = torch.sin(torch.arange(n, dtype=torch.float64) * 0.37 + i) * 0.2
        if k.endswith("weight") and sd[k].ndim == 1:
            v = v + 1.0
        out[k] = v.float().reshape(sd[k].shape)
    out["norms.3.weight"], out["norms.3.bias"] = out["norm.weight"], out["norm.bias"]
    return out


def test_matches_official_reference_values():
    model = _tiny()
    model.load_state_dict(_deterministic_state_dict(model))
    model.eval()
    x = torch.cos(torch.arange(2 * 3 * 64 * 96, dtype=torch.float64) * 0.011).float().reshape(2, 3, 64, 96)
    with torch.no_grad():
        o = model.forward_features(x)
        il = model.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True)
    # values printed by the official module on the same weights and input (CPU, fp32)
    ref_cls = torch.tensor([[0.89237356, -0.03691288, -1.11547911, 1.02916348],
                            [0.96376854, -0.09385426, -1.00422299, 1.11884332]])
    torch.testing.assert_close(o["x_norm_clstoken"][:, :4], ref_cls, atol=2e-5, rtol=1e-5)
    assert o["x_norm_clstoken"].sum().item() == pytest.approx(-0.9644043, abs=2e-4)
    assert o["x_norm_patchtokens"].shape == (2, 6, 32)
    torch.testing.assert_close(o["x_norm_patchtokens"][0, :2, :3],
                               torch.tensor([[-0.05081856, -0.91193813, 0.89589882],
                                             [1.02850199, -0.66427547, -0.44535124]]), atol=2e-5, rtol=1e-5)
    assert o["x_norm_patchtokens"].abs().sum().item() == pytest.approx(348.07947, rel=1e-5)
    assert [t[0].shape for t in il] == [(2, 24, 4, 6), (2, 32, 4, 6)]
    assert il[0][0].abs().sum().item() == pytest.approx(380.29459, rel=1e-5)
    assert il[1][0].abs().sum().item() == pytest.approx(1389.8289, rel=1e-5)
    assert il[0][1].sum().item() == pytest.approx(-1.9402515, abs=2e-4)


def test_forward_features_keys_shapes_and_patch_grid():
    model = _tiny().eval()
    x = torch.randn(3, 3, 64, 96)
    out = model(x, is_training=True)
    assert set(out) == {"x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm", "masks"}
    assert out["x_norm_clstoken"].shape == (3, 32)
    assert out["x_storage_tokens"].shape == (3, 0, 32)
    assert out["x_norm_patchtokens"].shape == (3, 2 * 3, 32)  # stride 32
    assert torch.equal(model(x), out["x_norm_clstoken"])
    outs = model.forward_features([x, x[..., :32, :32]], [None, None])
    assert [o["x_norm_patchtokens"].shape[1] for o in outs] == [6, 1]
    # the last-stage intermediate output (normed, resized to the patch-16 grid) equals forward_features with the
    # patch-grid option
    model.patch_tokens_on_patch_grid = True
    dense = model.forward_features(x)
    assert dense["x_norm_patchtokens"].shape == (3, 4 * 6, 32)
    (patches, cls), = model.get_intermediate_layers(x, n=1, return_class_token=True)
    torch.testing.assert_close(patches, dense["x_norm_patchtokens"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cls, dense["x_norm_clstoken"], atol=1e-6, rtol=1e-6)
    trip = model.get_intermediate_layers(x, n=[0, 3], return_class_token=True, return_extra_tokens=True)
    assert [t[2].shape for t in trip] == [(3, 0, 8), (3, 0, 32)]


def test_official_layout_round_trip_is_bit_exact(tmp_path):
    model = _tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    official = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "convnext_official.pth"
    torch.save(official, path)
    loaded = load_convnext(path)
    assert loaded.config.depths == [1, 1, 2, 1] and loaded.config.dims == [8, 16, 24, 32]
    out = tmp_path / "exported.pth"
    save_convnext(loaded, out)
    again = torch.load(out, weights_only=True)
    assert list(again) == list(official)
    assert all(torch.equal(again[k], official[k]) for k in official)
    # our format records the config; a training export with heads and prefixes loads too
    save_convnext(loaded, tmp_path / "eo.pth", format="eo")
    assert load_convnext(tmp_path / "eo.pth", patch_size=16).config.patch_size == 16
    export = {"teacher": {**{f"backbone.{k}": v for k, v in official.items()},
                          "dino_head.last_layer.weight": torch.zeros(4, 4)}}
    torch.save(export, tmp_path / "teacher_checkpoint.pth")
    sd2 = load_convnext(tmp_path / "teacher_checkpoint.pth").state_dict()
    assert all(torch.equal(sd2[k], official[k]) for k in official)
    # without the norms.3 alias (same tensor) it still loads
    torch.save({k: v for k, v in official.items() if not k.startswith("norms.")}, tmp_path / "no_alias.pth")
    assert torch.equal(load_convnext(tmp_path / "no_alias.pth").norms[3].weight, official["norm.weight"])


def test_loader_errors_are_one_line(tmp_path):
    bad = tmp_path / "vit.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 8)}, bad)
    with pytest.raises(CheckpointError, match="not a ConvNeXt state dict"):
        load_convnext(bad)
    model = _tiny()
    sd = model.state_dict()
    sd["stages.0.0.pwconv1.weight"] = torch.zeros(5, 8)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match="wrong shapes"):
        load_convnext(tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_convnext(tmp_path / "missing.pth")
