"""Tree-crown dense probe (eo_dinov3.evaluation.crown_probe) on the real NEON sample scenes and deepforest boxes.

Checks that the labels are real and non-trivial, that chipping covers every patch exactly once, and that the probe
tells signal from noise: a colour-only stand-in backbone must beat a random-feature stand-in by a clear margin."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

pytest.importorskip("rasterio")
pytest.importorskip("sklearn")

from eo_dinov3.data import samples  # noqa: E402
from eo_dinov3.evaluation import crown_probe as cp  # noqa: E402
from eo_dinov3.models.vision_transformer import DinoVisionTransformer, ViTConfig  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _samples():
    samples.fetch_samples(progress=False)


class RandomPatchFeatures(nn.Module):
    """Stand-in backbone whose patch features ignore the image: i.i.d. normal ``[B, N, 32]``."""

    patch_size = 16

    def __init__(self) -> None:
        super().__init__()
        self.g = torch.Generator().manual_seed(123)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        n = (x.shape[-2] // 16) * (x.shape[-1] // 16)
        return {"x_norm_patchtokens": torch.randn(x.shape[0], n, 32, generator=self.g)}


def _native_box_union_fraction(key: str) -> float:
    import rasterio

    with rasterio.open(samples.sample_path(f"{key}_rgb_native")) as src:
        H, W = src.height, src.width
    mask = np.zeros((H, W), bool)
    with open(samples.sample_path("crowns_pixel"), newline="") as fh:
        for r in csv.DictReader(fh):
            if r["image_key"] == f"{key}_rgb_native":
                mask[int(r["ymin"]) : int(r["ymax"]), int(r["xmin"]) : int(r["xmax"])] = True
    return float(mask.mean())


@pytest.mark.parametrize("key", cp.SCENES)
def test_scene_labels_are_real_and_nontrivial(key):
    s = cp.load_scene(key, 0.15, 16)
    H, W = s.image.shape[-2:]
    assert s.image.shape[0] == 3 and H % 16 == 0 and W % 16 == 0
    assert s.crown_fraction.shape == (H // 16, W // 16)
    assert float(s.crown_fraction.min()) >= 0.0 and float(s.crown_fraction.max()) <= 1.0 + 1e-6
    assert 0.0 <= float(s.image.min()) and float(s.image.max()) <= 1.0
    # both classes present, positive fraction in a plausible range for forests/savanna
    pos = float(s.labels.float().mean())
    assert 0.1 < pos < 0.7, pos
    # resampling keeps the crown cover of the native box union (within edge-crop effects)
    assert abs(float(s.crown_fraction.mean()) - _native_box_union_fraction(key)) < 0.02
    # scaled by 0.1 m / 0.15 m
    native_h = {"yell": 2472, "yell2": 1035, "osbs": 400, "sjer": 400}[key]
    assert abs(H - native_h / 1.5) < 16


def test_patch_features_cover_every_patch_once():
    """Chipping + stitching equals one pass over the whole image (the colour stand-in is translation-equivariant)."""
    img = torch.rand(3, 37 * 16, 29 * 16, generator=torch.Generator().manual_seed(0))
    feats = cp.patch_features(cp.PatchColourBaseline(), img, normalization="sat493m", chip_px=224, device="cpu")
    from eo_dinov3.data.normalization import normalize

    direct = F.avg_pool2d(normalize(img[None], "sat493m"), 16)[0].permute(1, 2, 0)
    assert feats.shape == (37, 29, 3)
    torch.testing.assert_close(feats, direct, rtol=1e-5, atol=1e-5)


def test_region_split_has_guard_band():
    top, bottom = cp._split_rows(16)
    assert top == slice(0, 7) and bottom == slice(9, 16)


def test_probe_tells_signal_from_noise():
    colour = cp.crown_probe(cp.PatchColourBaseline())
    noise = cp.crown_probe(RandomPatchFeatures())
    for r in (colour, noise):
        assert r["n_train_patches"] > 5000 and r["n_test_patches"] > 5000
        assert 0.15 < r["train_positive_fraction"] < 0.4 and 0.15 < r["test_positive_fraction"] < 0.4
        assert set(r["per_image"]) == set(cp.SCENES)
    assert colour["n_test_patches"] == noise["n_test_patches"]
    assert 0.4 < noise["auc"] < 0.6 and 0.4 < noise["balanced_accuracy"] < 0.6
    assert colour["auc"] > noise["auc"] + 0.1
    assert colour["balanced_accuracy"] > noise["balanced_accuracy"] + 0.05


def test_probe_image_split_holds_out_whole_scenes():
    r = cp.crown_probe(cp.PatchColourBaseline(), split="image")
    assert set(r["per_image"]) == set(cp.TEST_SCENES)
    n_yell = cp.load_scene("yell").labels.numel()
    assert r["n_train_patches"] == n_yell
    assert r["auc"] > 0.6  # colour still carries signal across sites (yell2 AUC ≈ 0.8)


def test_probe_runs_on_random_init_vit_and_restores_mode():
    cfg = ViTConfig(embed_dim=48, depth=2, num_heads=2, n_storage_tokens=4, layerscale_init=1e-5)
    torch.manual_seed(0)
    vit = DinoVisionTransformer(cfg)
    vit.init_weights()
    vit.train()
    r = cp.crown_probe(vit, device="cpu")
    assert vit.training
    assert r["feature_dim"] == 48
    assert 0.0 <= r["auc"] <= 1.0 and 0.0 <= r["balanced_accuracy"] <= 1.0
    assert np.isfinite(r["auc"]) and r["seconds"] > 0
    with pytest.raises(ValueError):
        cp.crown_probe(vit, split="patch")


def test_knn_probe_tells_signal_from_noise():
    """The k-NN classifier (DINO's weighted vote) separates colour features from random ones, like the linear probe."""
    colour = cp.crown_probe(cp.PatchColourBaseline(), classifier="knn")
    noise = cp.crown_probe(RandomPatchFeatures(), classifier="knn")
    assert colour["classifier"] == "knn" and colour["k"] == cp.KNN_K
    assert 0.4 < noise["auc"] < 0.6 and 0.4 < noise["balanced_accuracy"] < 0.6
    assert colour["auc"] > noise["auc"] + 0.05 and colour["balanced_accuracy"] > noise["balanced_accuracy"] + 0.05
    with pytest.raises(ValueError, match="classifier"):
        cp.crown_probe(cp.PatchColourBaseline(), classifier="svm")


def test_knn_scores_weighted_vote():
    """Hand-checkable case: a test row identical to the positive training rows scores ~1, between the two clusters
    the vote follows the similarity weights."""
    train = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]])
    y = torch.tensor([1, 1, 0, 0])
    s = cp.knn_scores(train, y, torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), k=4)
    assert s[0] > 0.99 and s[1] < 0.01 and abs(float(s[2]) - 0.5) < 0.01
    assert cp.knn_scores(train, y, torch.tensor([[1.0, 0.0]]), k=100).shape == (1,)  # k capped at N
