"""DataAugmentationDINO: official crop shapes, effective probabilities (inverted blur quirk), satellite options,
Gram crops, per-sample determinism."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import torchvision.transforms.v2.functional as TF

from eo_dinov3.data.augmentations import DataAugmentationDINO
from eo_dinov3.data.normalization import Normalization, get_normalization


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tile() -> torch.Tensor:
    """A real 256-px RGB sample tile as uint8 [3, 256, 256]."""
    from eo_dinov3.data.samples import fetch_samples, sample_path

    fetch_samples(progress=False)
    path = sorted(sample_path("tiles").parent.glob("yell_r0*.tif"))[0]
    with rasterio.open(path) as src:
        return torch.from_numpy(src.read([1, 2, 3]))


def _within(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(count / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def test_official_crop_shapes_and_dict(tile):
    aug = DataAugmentationDINO()  # SAT/7B sizes: 256 global, 112 local, 8 locals
    out = aug(tile, seed=0)
    assert [tuple(x.shape) for x in out["global_crops"]] == [(3, 256, 256)] * 2
    assert [tuple(x.shape) for x in out["local_crops"]] == [(3, 112, 112)] * 8
    assert out["global_crops_teacher"] is out["global_crops"] and out["offsets"] == ()
    assert "gram_teacher_crops" not in out
    assert all(x.dtype == torch.float32 for x in out["global_crops"] + out["local_crops"])
    # SAT-493M normalisation: a normalised crop has mean ~ (x/255 - mean)/std of its pixels, i.e. not in [0, 1].
    assert out["global_crops"][0].min() < -0.5

    small = DataAugmentationDINO(global_crops_size=224, local_crops_size=96, local_crops_number=3)(tile, seed=1)
    assert small["global_crops"][1].shape == (3, 224, 224) and len(small["local_crops"]) == 3


def test_normalize_uses_preset():
    aug = DataAugmentationDINO(normalization="sat493m")
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).view(3, 1, 1)
    mean = torch.tensor([0.430, 0.411, 0.296]).view(3, 1, 1)
    std = torch.tensor([0.213, 0.156, 0.143]).view(3, 1, 1)
    torch.testing.assert_close(aug.normalize(x), (x.float() / 255 - mean) / std)
    assert DataAugmentationDINO(normalization="lvd1689m").normalization == get_normalization("imagenet")


def test_gram_crops_are_the_same_crop_undistorted(tile):
    aug = DataAugmentationDINO(global_crops_size=64, local_crops_size=32, local_crops_number=2,
                               gram_teacher_crops_size=128, gram_teacher_no_distortions=True)
    out = aug(tile, seed=3, return_params=True)
    assert [tuple(x.shape) for x in out["gram_teacher_crops"]] == [(3, 128, 128)] * 2
    assert out["global_crops"][0].shape == (3, 64, 64)
    for k in range(2):
        p = out["params"][k]
        assert (p.height, p.width) != (0, 0)
        base = aug._geometric(tile, p, 128)  # the same crop box, at the Gram size, no photometric change
        torch.testing.assert_close(out["gram_teacher_crops"][k], aug.normalize(base))
        # the student crop is that same crop resized to 64 px, then distorted (official order)
        expected = aug.normalize(aug._photometric(aug._resize(base, 64), p))
        torch.testing.assert_close(out["global_crops"][k], expected)
        assert not torch.allclose(out["global_crops"][k], aug.normalize(aug._resize(base, 64)))  # distorted
    distorted = DataAugmentationDINO(global_crops_size=64, local_crops_size=32, local_crops_number=2,
                                     gram_teacher_crops_size=128, gram_teacher_no_distortions=False)
    o2 = distorted(tile, seed=3)
    # with distortions: the global crop is the resized Gram crop (both from the same distorted, normalised image)
    torch.testing.assert_close(o2["global_crops"][1], TF.resize(o2["gram_teacher_crops"][1], [64, 64],
                                                                interpolation=TF.InterpolationMode.BICUBIC,
                                                                antialias=True))


def test_determinism_from_seed_and_generator(tile):
    aug = DataAugmentationDINO(global_crops_size=64, local_crops_size=32, local_crops_number=3, satellite=True)
    a = aug(tile, seed=123)
    b = aug(tile, generator=torch.Generator().manual_seed(123))
    c = aug(tile, seed=124)
    for key in ("global_crops", "local_crops"):
        assert all(torch.equal(x, y) for x, y in zip(a[key], b[key]))
    assert not torch.equal(a["global_crops"][0], c["global_crops"][0])
    torch.manual_seed(0)
    d = aug(tile)
    torch.manual_seed(0)
    e = aug(tile)
    assert torch.equal(d["local_crops"][2], e["local_crops"][2])  # no seed: follows the global torch RNG


def test_effective_probabilities_statistics():
    """Sampled parameters over 4000 images: blur never / 0.9 / 0.5 (inverted-p quirk), solarize 0.2 on crop 2
    only, grayscale 0.2 (0 in satellite mode), jitter 0.8, flips and rotations; 4-sigma bounds."""
    n = 4000
    g = torch.Generator().manual_seed(0)
    web = DataAugmentationDINO(local_crops_number=2)
    sat = DataAugmentationDINO(local_crops_number=2, satellite=True, horizontal_flips=False)
    pw = [web.sample_params(g, 64, 64) for _ in range(n)]
    ps = [sat.sample_params(g, 64, 64) for _ in range(n)]

    def count(params, k, attr):
        return sum(bool(getattr(p[k], attr) not in (None, False, 0)) for p in params)

    assert count(pw, 0, "blur_sigma") == 0  # global crop 1: never blurred (nominal p=1.0)
    assert _within(count(pw, 1, "blur_sigma"), n, 0.9)  # global crop 2: p=0.9 (nominal 0.1)
    assert _within(count(pw, 2, "blur_sigma") + count(pw, 3, "blur_sigma"), 2 * n, 0.5)
    assert _within(count(pw, 1, "solarize"), n, 0.2)
    assert count(pw, 0, "solarize") == count(pw, 2, "solarize") == 0
    for k in range(4):
        assert _within(count(pw, k, "grayscale"), n, 0.2)
        assert _within(count(pw, k, "jitter"), n, 0.8)
        assert _within(count(pw, k, "hflip"), n, 0.5)
        assert count(pw, k, "vflip") == count(pw, k, "rot90") == 0
        assert count(ps, k, "grayscale") == 0 and count(ps, k, "hflip") == 0
        assert _within(count(ps, k, "vflip"), n, 0.5)
        rots = np.bincount([p[k].rot90 for p in ps], minlength=4)
        assert all(_within(int(c), n, 0.25) for c in rots)
    sigmas = [p[1].blur_sigma for p in pw if p[1].blur_sigma is not None]
    assert 0.1 <= min(sigmas) and max(sigmas) <= 2.0 and abs(np.mean(sigmas) - 1.05) < 0.05
    jit = np.array([p[0].jitter[1:] for p in pw if p[0].jitter is not None])
    assert jit[:, 0].min() >= 0.6 and jit[:, 0].max() <= 1.4 and jit[:, 2].min() >= 0.8 and jit[:, 3].max() <= 0.1
    # crop areas within the configured scale ranges (up to rounding of the box sides)
    for params, k, (lo, hi) in ((pw, 0, (0.32, 1.0)), (pw, 2, (0.05, 0.32))):
        areas = np.array([p[k].height * p[k].width / 64**2 for p in params])
        assert areas.min() >= lo * 0.9 and areas.max() <= hi * 1.1
        assert abs(np.median(areas) - (lo + hi) / 2) < 0.1 * (hi - lo) + 0.02


def test_applied_operations_follow_the_parameters(monkeypatch):
    """Count the real blur/solarize/grayscale calls during full augmentations: they match the drawn flags."""
    calls = {"gaussian_blur": 0, "solarize": 0, "rgb_to_grayscale": 0}
    for name in calls:
        orig = getattr(TF, name)

        def wrapped(*a, _orig=orig, _name=name, **k):
            calls[_name] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(TF, name, wrapped)
    aug = DataAugmentationDINO(global_crops_size=16, local_crops_size=8, local_crops_number=2)
    img = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8)
    flags = {"gaussian_blur": 0, "solarize": 0, "rgb_to_grayscale": 0}
    for i in range(150):
        out = aug(img, seed=i, return_params=True)
        flags["gaussian_blur"] += sum(p.blur_sigma is not None for p in out["params"])
        flags["solarize"] += sum(p.solarize for p in out["params"])
        flags["rgb_to_grayscale"] += sum(p.grayscale for p in out["params"])
    assert calls == flags and flags["gaussian_blur"] > 100 and flags["solarize"] > 10
    # A grayscale crop has identical channels (after normalisation is undone).
    for i in range(50):
        out = aug(img, seed=i, return_params=True)
        for crop, p in zip(out["global_crops"] + out["local_crops"], out["params"]):
            mean, std = aug.normalization.tensors()
            x = crop * std + mean
            if p.grayscale:
                assert torch.allclose(x[0], x[1], atol=1e-5) and torch.allclose(x[1], x[2], atol=1e-5)


def test_multiband_input_with_custom_normalization():
    norm = Normalization("4band", (0.3, 0.3, 0.3, 0.4), (0.2, 0.2, 0.2, 0.2))
    aug = DataAugmentationDINO(global_crops_size=32, local_crops_size=16, local_crops_number=2,
                               normalization=norm, satellite=True)
    img = torch.randint(0, 256, (4, 48, 48), dtype=torch.uint8)
    out = aug(img, seed=0)
    assert out["global_crops"][0].shape == (4, 32, 32) and out["local_crops"][1].shape == (4, 16, 16)
    f = aug(img.float() / 255, seed=0)  # float input in [0, 1] works too
    assert f["global_crops"][0].shape == (4, 32, 32)
    with pytest.raises(ValueError, match="4 bands|bands"):
        DataAugmentationDINO(global_crops_size=32, local_crops_size=16)(img, seed=0)


def test_data_config_instantiates():
    """configs/data/sat493m.yaml maps 1:1 onto the data classes."""
    import yaml

    from eo_dinov3.data.prepare import PrepareConfig
    from eo_dinov3.data.tiles import TileOptions

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "data" / "sat493m.yaml").read_text())
    aug = DataAugmentationDINO(**cfg["augmentation"])
    assert aug.grayscale_p == 0.0 and aug.rot90 and aug.vertical_flips and not aug.horizontal_flips
    gram = DataAugmentationDINO(**{**cfg["augmentation"], **cfg["gram_anchoring"]})
    assert gram.global_crop_max_size == 512
    prep = PrepareConfig(**{**cfg["prepare"], "bands": tuple(cfg["prepare"]["bands"])})
    assert prep.tile_size == 512 and prep.step == 512
    opts = {k: v for k, v in cfg["tiles"].items() if k in TileOptions.__dataclass_fields__}
    assert TileOptions(**{**opts, "bands": tuple(opts["bands"])}).max_nodata_fraction == 0.1
