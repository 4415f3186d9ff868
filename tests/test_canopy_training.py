"""Canopy-head training: SigLoss vs the official fixture, CHM↔image alignment by reprojection, identical
augmentation of image and target, spatial split, bin loss, and a tiny end-to-end run (learns a colour→height rule
better than the constant baseline, resumes, and its checkpoint predicts a GeoTIFF)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

FIX = Path(os.environ.get("EO_DINOV3_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "dinov3"))
requires_fix = pytest.mark.skipif(not FIX.is_dir(), reason=f"official fixtures not at {FIX}")

rasterio = pytest.importorskip("rasterio")
from rasterio.transform import from_origin  # noqa: E402

from eo_dinov3.canopy import datasets as ds  # noqa: E402
from eo_dinov3.canopy import training as tr  # noqa: E402
from eo_dinov3.errors import DataError  # noqa: E402


# ------------------------------------------------------------------------------------------------ losses
@requires_fix
def test_sigloss_matches_official_fixture():
    c = torch.load(FIX / "chmv2_tiny_cases.pt", weights_only=True)
    loss = tr.SigLoss(warm_up=True, warm_iter=100)
    first = loss(c["metrics.pred"], c["metrics.gt"], c["metrics.valid"])
    torch.testing.assert_close(first, c["sigloss.warmup_call"], rtol=1e-5, atol=0)
    for _ in range(99):
        loss(c["metrics.pred"], c["metrics.gt"], c["metrics.valid"])
    after = loss(c["metrics.pred"], c["metrics.gt"], c["metrics.valid"])
    torch.testing.assert_close(after, c["sigloss.after_warmup"], rtol=1e-5, atol=0)


def test_bin_cross_entropy_prefers_the_true_bin():
    bins = torch.linspace(0.0, 30.0, 16)
    target = torch.full((1, 1, 4, 4), 12.0)  # nearest bin: 12 = index 6
    valid = torch.ones_like(target, dtype=torch.bool)
    good = torch.zeros(1, 16, 4, 4)
    good[:, 6] = 8.0
    bad = torch.zeros(1, 16, 4, 4)
    bad[:, 0] = 8.0
    for norm in ("softmax", "linear", "chmv2_mixlog", "sigmoid"):
        lg = tr.bin_cross_entropy(good, target, valid, bins, norm)
        lb = tr.bin_cross_entropy(bad, target, valid, bins, norm)
        assert lg < lb, norm
    # nodata pixels do not count
    valid[..., :2] = False
    t2 = target.clone()
    t2[..., :2] = float("nan")
    assert torch.isfinite(tr.bin_cross_entropy(good, t2, valid, bins, "softmax"))


def test_masked_l1_ignores_nodata():
    pred = torch.tensor([[[[1.0, 5.0]]]])
    tgt = torch.tensor([[[[2.0, 0.0]]]])
    assert float(tr.masked_l1(pred, tgt, torch.tensor([[[[True, False]]]]))) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ data
def _write(path, arr, crs, transform, nodata=None):
    arr = arr if arr.ndim == 3 else arr[None]
    with rasterio.open(path, "w", driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0],
                       dtype=arr.dtype, crs=crs, transform=transform, nodata=nodata) as d:
        d.write(arr)
    return path


def _scene(size=192, seed=0):
    """Synthetic RGB + CHM with a learnable rule: green round 'crowns' are 15 m tall, brown ground is 0 m."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    chm = np.zeros((size, size), np.float32)
    for _ in range(size * size // 900):
        cy, cx, r = rng.integers(0, size), rng.integers(0, size), rng.integers(6, 14)
        chm[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 15.0
    tree = chm > 0
    rgb = np.empty((3, size, size), np.uint8)
    rgb[0] = np.where(tree, 40, 150)
    rgb[1] = np.where(tree, 140, 110)
    rgb[2] = np.where(tree, 40, 70)
    rgb = np.clip(rgb + rng.normal(0, 6, rgb.shape), 1, 255).astype(np.uint8)
    return rgb, chm


def test_load_pair_reprojects_target_to_image_grid(tmp_path):
    """CHM written in another CRS (EPSG:4326) on another grid comes back onto the UTM image grid."""
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    size = 96
    tf = from_origin(500000, 4900000, 0.6, 0.6)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    chm = (10 + 5 * np.sin(xx / 15) + 3 * np.cos(yy / 11)).astype(np.float32)  # smooth field, metres
    rgb = np.full((3, size, size), 100, np.uint8)
    _write(tmp_path / "rgb.tif", rgb, "EPSG:32610", tf)
    dst_tf, w, h = calculate_default_transform("EPSG:32610", "EPSG:4326", size, size,
                                               *rasterio.transform.array_bounds(size, size, tf))
    geo = np.full((h, w), np.nan, np.float32)
    reproject(chm, geo, src_transform=tf, src_crs="EPSG:32610", dst_transform=dst_tf, dst_crs="EPSG:4326",
              resampling=Resampling.bilinear, dst_nodata=np.nan)
    _write(tmp_path / "chm_4326.tif", geo, "EPSG:4326", dst_tf, nodata=float("nan"))
    pair = ds.load_pair(tmp_path / "rgb.tif", tmp_path / "chm_4326.tif")
    assert pair.target.shape == (size, size) and pair.image.shape == (3, size, size)
    inner = (slice(4, -4), slice(4, -4))
    got, want = pair.target[inner], chm[inner]
    assert np.isfinite(got).all()
    assert np.abs(got - want).mean() < 0.1  # a wrong grid/axis order would be metres off
    # a shifted (misaligned) comparison is much worse: the check above can fail
    assert np.abs(pair.target[4:-4, 8:] - chm[4:-4, 4:-4]).mean() > 0.3


def test_load_pair_masks_image_nodata_and_rejects_disjoint(tmp_path):
    tf = from_origin(500000, 4900000, 0.6, 0.6)
    rgb = np.full((3, 64, 64), 100, np.uint8)
    rgb[:, :, :10] = 0
    _write(tmp_path / "rgb.tif", rgb, "EPSG:32610", tf, nodata=0)
    _write(tmp_path / "chm.tif", np.full((64, 64), 5.0, np.float32), "EPSG:32610", tf)
    pair = ds.load_pair(tmp_path / "rgb.tif", tmp_path / "chm.tif")
    assert np.isnan(pair.target[:, :10]).all() and np.isfinite(pair.target[:, 10:]).all()
    far = from_origin(600000, 4900000, 0.6, 0.6)
    _write(tmp_path / "far.tif", np.full((64, 64), 5.0, np.float32), "EPSG:32610", far)
    from eo_dinov3.errors import DataError

    with pytest.raises(DataError, match="overlap"):
        ds.load_pair(tmp_path / "rgb.tif", tmp_path / "far.tif")


def test_augmentation_is_identical_for_image_and_target():
    rgb, chm = _scene(96)
    pair = ds.PairedRaster(rgb, chm, None, None, "s")
    region = ds.Region(0, 96, 0, 96)
    s = ds.ChipSampler(pair, region, 64, augment=True, seed=3)
    seen = set()
    for _ in range(40):
        ch = s.sample()
        seen.add((ch.k, ch.flip))
        plain = s.crop(ch.row, ch.col)
        np.testing.assert_array_equal(ch.image, ds.dihedral(plain.image, ch.k, ch.flip))
        np.testing.assert_array_equal(ch.target, ds.dihedral(plain.target, ch.k, ch.flip))
        # the colour→height rule still holds pixel by pixel after the transform
        tree = ch.target > 0
        assert (ch.image[1][tree].astype(int) > ch.image[0][tree]).all()
    assert len(seen) >= 6  # rotations and flips are both drawn


def test_spatial_split_and_grid_chips():
    train, val = ds.spatial_split((287, 601), 0.5, gap_px=32)
    assert train.col1 + 32 == val.col0 and train.col0 == 0 and val.col1 == 601
    chips = ds.grid_chips(val, 64)
    covered = np.zeros((287, 601), bool)
    for r, c in chips:
        assert val.col0 <= c and c + 64 <= val.col1 and r + 64 <= 287
        covered[r : r + 64, c : c + 64] = True
    assert covered[:, val.col0 :].all() and not covered[:, : val.col0].any()


def test_blocked_split_checkerboard_with_gap():
    shape, gap = (287, 601), 32
    for fold in (0, 1):
        train, val = ds.blocked_split(shape, block_px=128, gap_px=gap, fold=fold)
        lab = np.zeros(shape, int)  # 1 train, 2 val
        for regions, v in ((train, 1), (val, 2)):
            for r in regions:
                assert (lab[r.row0 : r.row1, r.col0 : r.col1] == 0).all()  # no overlap
                lab[r.row0 : r.row1, r.col0 : r.col1] = v
        assert len(train) + len(val) == 2 * 5 and abs(len(train) - len(val)) <= 1
        # nearest train and validation pixels are >= gap apart (Chebyshev distance)
        from scipy import ndimage

        d = ndimage.distance_transform_cdt(lab != 1, metric="chessboard")
        assert d[lab == 2].min() >= gap
        assert 0.45 < (lab > 0).mean() < 0.85  # the gaps cost something, not everything
    t0, v0 = ds.blocked_split(shape, 128, gap, 0)
    t1, v1 = ds.blocked_split(shape, 128, gap, 1)
    assert set(v0) == set(t1) and set(t0) == set(v1)  # the two folds swap roles
    assert ds.bounding_region(v0) == ds.Region(0, 287, 0, 601)
    with pytest.raises(DataError):
        ds.blocked_split(shape, 128, gap, fold=2)


def test_config_rejects_unknown_keys():
    from eo_dinov3.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown"):
        tr.load_config(None, ["train.epoch=3"])
    assert tr.load_config(None, ["train.epochs=3"])["train"]["epochs"] == 3
    assert tr.default_taps(24) == [5, 11, 17, 23] and tr.default_taps(12) == [2, 5, 8, 11]


# ------------------------------------------------------------------------------------------------ end to end
TINY = ["backbone.arch=dinov3_vits16", "backbone.overrides.embed_dim=64", "backbone.overrides.depth=4",
        "backbone.overrides.num_heads=2", "head.channels=16", "head.post_process_channels=[8,16,32,64]",
        "head.n_hidden_channels=16", "head.n_output_channels=16", "head.bins_strategy=linear",
        "head.norm_strategy=softmax", "head.max_depth=20.0", "data.chip=64", "data.train_chips=24",
        "data.gap_px=16", "train.batch_size=8", "train.cache_views=2", "optim.lr=3e-3", "optim.warmup_steps=2",
        "loss.bin_ce=0.1", "log.tensorboard=true"]


@pytest.mark.slow
def test_train_head_end_to_end_resume_and_predict(tmp_path):
    rgb, chm = _scene(160)
    tf = from_origin(500000, 4900000, 0.6, 0.6)
    _write(tmp_path / "rgb.tif", rgb, "EPSG:32610", tf)
    _write(tmp_path / "chm.tif", chm, "EPSG:32610", tf)
    out = tmp_path / "run"
    base = TINY + [f"output_dir={out}", f"data.pairs=[{{image: {tmp_path / 'rgb.tif'}, target: {tmp_path / 'chm.tif'}}}]"]
    logs: list[str] = []
    tr.train(tr.load_config(None, base + ["train.epochs=4"]), log=logs.append)
    m = tr.train(tr.load_config(None, base + ["train.epochs=6"]), log=logs.append)  # resumes after epoch 4
    assert any("resumed" in s and "epoch 4" in s for s in logs)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert m["mae"] < 0.6 * m["baseline_mean_mae"], m  # learned the colour→height rule
    assert np.isfinite(m["block_r2"]) and m["r2"] > 0.3
    assert list((out / "tb").iterdir())

    model = tr.load_head_checkpoint(out / "best.pt")
    assert tr.is_head_checkpoint(out / "best.pt") and not tr.is_head_checkpoint(tmp_path / "rgb.tif")
    from eo_dinov3.canopy.mapping import predict_raster

    dst = predict_raster(model, tmp_path / "rgb.tif", tmp_path / "pred.tif", tile=64, overlap=16, progress=False)
    with rasterio.open(dst) as d:
        pred = d.read(1)
        assert d.crs.to_epsg() == 32610 and pred.shape == chm.shape
    east = (slice(None), slice(96, None))  # validation half
    assert np.abs(pred[east] - chm[east]).mean() < np.abs(chm[east] - chm[:, :64].mean()).mean()
    # the same checkpoint is what `chm predict --model` and the app's "trained head" option load
    from eo_dinov3.canopy import app_service as svc

    loaded = svc.load_model(svc.ModelSpec(kind="trained", head=str(out / "best.pt")))
    assert "trained head" in loaded.info.name and not loaded.info.is_demo
    from eo_dinov3.cli import main as cli_main

    assert cli_main(["chm", "predict", str(tmp_path / "rgb.tif"), "--model", str(out / "best.pt"),
                     "--out", str(tmp_path / "pred_cli.tif"), "--tile", "64", "--overlap", "16"]) == 0


def test_train_head_blocked_split_scores_only_validation_blocks(tmp_path):
    rgb, chm = _scene(192, seed=3)
    tf = from_origin(500000, 4900000, 0.6, 0.6)
    _write(tmp_path / "rgb.tif", rgb, "EPSG:32610", tf)
    _write(tmp_path / "chm.tif", chm, "EPSG:32610", tf)
    pairs = f"data.pairs=[{{image: {tmp_path / 'rgb.tif'}, target: {tmp_path / 'chm.tif'}}}]"
    cfg = tr.load_config(None, TINY + [f"output_dir={tmp_path / 'run'}", "train.epochs=3", "data.split=blocks",
                                       "data.block_px=96", "data.gap_px=16", "log.tensorboard=false", pairs])
    t = tr.HeadTrainer(cfg, log=lambda *a: None)
    s = t.splits[0]
    assert len(s.train) == 2 and len(s.val) == 2 and s.val_mask.mean() < 0.5
    m = t.run()
    canvas = t.last_canvases[0]
    assert np.isfinite(canvas[s.val_mask]).all()  # every validation pixel predicted ...
    assert m["n_pixels"] == int(s.val_mask.sum())  # ... and only those are scored
    assert m["mae"] < m["baseline_mean_mae"], m
    with pytest.raises(tr.ConfigError, match="data.split"):
        tr.HeadTrainer(tr.load_config(None, ["data.split=random", f"output_dir={tmp_path / 'x'}", pairs]))
