"""Multispectral weight adaptation and normalisation presets."""

from __future__ import annotations

import pytest
import torch

from eo_dinov3.data.normalization import get_normalization, normalize
from eo_dinov3.hub import build_backbone
from eo_dinov3.models.multispectral import adapt_model_bands, adapt_patch_embed_weight

TINY = dict(embed_dim=64, depth=2, num_heads=2)


def test_adapt_weight_convention():
    w = torch.randn(8, 3, 16, 16)
    bands = ["blue", "green", "red", "nir", "swir16"]
    a = adapt_patch_embed_weight(w, bands)
    assert a.shape == (8, 5, 16, 16)
    s = 3 / 5
    torch.testing.assert_close(a[:, 0], w[:, 2] * s)  # blue keeps the blue filter
    torch.testing.assert_close(a[:, 2], w[:, 0] * s)  # red keeps the red filter
    torch.testing.assert_close(a[:, 3], w.mean(1) * s)  # new bands: mean RGB filter
    torch.testing.assert_close(a[:, 4], w.mean(1) * s)
    # RGB in RGB order is the identity (3/3 = 1)
    torch.testing.assert_close(adapt_patch_embed_weight(w, ["B04", "B03", "B02"]), w)


def test_adapted_model_matches_rgb_model_on_rgb_replicated_input():
    rgb = build_backbone("dinov3_vits16", pretrained=False, **TINY).eval()
    ms = adapt_model_bands(rgb, ["red", "green", "blue", "red", "green", "blue"]).eval()
    assert ms.config.in_chans == 6 and ms.config.bands == ["red", "green", "blue"] * 2
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        a = rgb.forward_features(x)["x_norm_patchtokens"]
        # two copies of RGB with weights scaled by 3/6 sum to the RGB response
        b = ms.forward_features(torch.cat([x, x], 1))["x_norm_patchtokens"]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for k, v in rgb.state_dict().items():
        if k != "patch_embed.proj.weight":
            assert torch.equal(v, ms.state_dict()[k]), k


def test_wrong_band_count_is_explained():
    rgb = build_backbone("dinov3_vits16", pretrained=False, **TINY)
    with pytest.raises(ValueError, match="takes 3 bands"):
        rgb.forward_features(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="RGB patch-embedding"):
        adapt_patch_embed_weight(torch.randn(8, 4, 16, 16), ["a"])


def test_normalization_presets():
    sat = get_normalization("sat493m")
    assert sat.mean == (0.430, 0.411, 0.296) and sat.std == (0.213, 0.156, 0.143)
    assert get_normalization("chmv2").mean[0] == 0.420
    assert get_normalization("imagenet").mean == (0.485, 0.456, 0.406)
    x = torch.tensor(sat.mean)[None, :, None, None].expand(1, 3, 2, 2)
    assert torch.allclose(normalize(x, "sat"), torch.zeros(1, 3, 2, 2), atol=1e-6)
    with pytest.raises(ValueError, match="unknown normalisation"):
        get_normalization("landsat9")
    with pytest.raises(ValueError, match="3 bands but the input has 4"):
        normalize(torch.zeros(1, 4, 2, 2), "sat493m")
