"""iBOT block masking and the SSL collate against the official fixtures (masking_cases.pt, scalars.json)."""

from __future__ import annotations

import json
import os
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from eo_dinov3.ssl.collate import collate_data_and_cast, mask_counts, mask_ratio_ladder
from eo_dinov3.ssl.masking import MaskingGenerator, official_max_num_patches

FIX = Path(os.environ.get("EO_DINOV3_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "dinov3"))
requires_fixtures = pytest.mark.skipif(not FIX.is_dir(), reason=f"official DINOv3 fixtures not available at {FIX}")
TARGETS = [13, 26, 51, 76, 102, 128]
STAT_NAMES = [
    "n_blocks_placed",
    "n_random_fill_patches",
    "n_4connected_components",
    "largest_component_fraction",
    "bbox_height",
    "bbox_width",
]


@pytest.fixture(scope="module")
def cases() -> dict[str, torch.Tensor]:
    return torch.load(FIX / "masking_cases.pt", weights_only=True)


@pytest.fixture(scope="module")
def masking_scalars() -> dict:
    return json.loads((FIX / "scalars.json").read_text())["masking"]


def _seed(s: int) -> None:
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _generator_16x16(**kw) -> MaskingGenerator:
    return MaskingGenerator((16, 16), max_num_patches=official_max_num_patches(256), **kw)


def _draw_stats(mg: MaskingGenerator, k: int, n_draws: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-draw statistics (as in scalars.json masking.stats_16x16) and the per-position frequency."""
    stats: dict[str, list] = {n: [] for n in STAT_NAMES}
    freq = np.zeros((16, 16))
    for _ in range(n_draws):
        blocks, n_blocks = mg.place_blocks(k)
        mask = mg.complete_mask_randomly(blocks, k)
        assert mask.sum() == k  # exact count, every draw
        assert (mask | ~blocks).all()  # completion only adds
        labels, n_comp = ndimage.label(mask)  # 4-connectivity
        rows, cols = np.where(mask.any(1))[0], np.where(mask.any(0))[0]
        stats["n_blocks_placed"].append(n_blocks)
        stats["n_random_fill_patches"].append(k - blocks.sum())
        stats["n_4connected_components"].append(n_comp)
        stats["largest_component_fraction"].append(np.bincount(labels.ravel())[1:].max() / k)
        stats["bbox_height"].append(rows[-1] - rows[0] + 1)
        stats["bbox_width"].append(cols[-1] - cols[0] + 1)
        freq += mask
    return {n: np.asarray(v, dtype=float) for n, v in stats.items()}, freq / n_draws


@requires_fixtures
def test_max_num_patches_by_crop_size(masking_scalars):
    for size, entry in masking_scalars["max_num_patches_by_crop_size"].items():
        assert official_max_num_patches(int(size)) == entry["max_num_patches"]
    assert official_max_num_patches(240) == 105.0  # not 112.5 (operator precedence in the official train.py)


@requires_fixtures
def test_example_masks_match_official_exactly(cases):
    mg = _generator_16x16()
    keys = [k for k in cases if k.startswith("example.")]
    assert len(keys) == 9
    for key in keys:
        _, k, seed = key.split(".")
        _seed(int(seed.removeprefix("seed")))
        mask = mg(int(k.removeprefix("k")))
        assert mask.dtype == bool and mask.shape == (16, 16)
        assert torch.equal(torch.from_numpy(mask), cases[key]), key


@requires_fixtures
@pytest.mark.parametrize("k", TARGETS)
def test_masking_statistics_reproduce_official_draws(cases, masking_scalars, k):
    ref = masking_scalars["stats_16x16"][f"k{k}"]
    _seed(ref["seed"])
    stats, freq = _draw_stats(_generator_16x16(), k, ref["n_draws"])
    np.testing.assert_allclose(freq, cases[f"stats.k{k}.position_freq"].double().numpy(), rtol=0, atol=1e-6)
    for name in STAT_NAMES:
        assert stats[name].mean() == pytest.approx(ref[name]["mean"], rel=1e-12, abs=1e-12), name


@requires_fixtures
@pytest.mark.parametrize("k", [13, 51, 128])
def test_masking_statistics_with_private_streams_within_4_standard_errors(masking_scalars, k):
    ref = masking_scalars["stats_16x16"][f"k{k}"]
    mg = _generator_16x16(rng=random.Random(4242 + k), np_rng=np.random.RandomState(4242 + k))
    state = (random.getstate(), np.random.get_state())
    stats, freq = _draw_stats(mg, k, 1000)
    assert random.getstate() == state[0]  # global generators untouched
    assert np.array_equal(np.random.get_state()[1], state[1][1])
    for name in STAT_NAMES:
        sem = np.hypot(ref[name]["sem"], stats[name].std() / np.sqrt(len(stats[name])))
        assert abs(stats[name].mean() - ref[name]["mean"]) <= 4 * sem + 1e-12, name
    border = np.ones((16, 16), dtype=bool)
    border[1:-1, 1:-1] = False
    center = np.zeros((16, 16), dtype=bool)
    center[6:10, 6:10] = True
    assert freq[center].mean() > 2 * freq[border].mean()  # blocks concentrate away from the border


def test_zero_patches_and_full_block_limits():
    mg = MaskingGenerator((4, 4), max_num_patches=8.0)
    _seed(0)
    assert mg(0).sum() == 0
    for k in range(17):
        assert mg(k).sum() == k


# ---------------------------------------------------------------- collate
def _fixture_samples(cases, with_gram: bool = False):
    g, loc = cases["collate.samples.global_crops"], cases["collate.samples.local_crops"]
    samples = []
    for i in range(g.shape[0]):
        crops = {"global_crops": list(g[i]), "local_crops": list(loc[i])}
        if with_gram:
            crops["gram_teacher_crops"] = [2 * c for c in g[i]]
        samples.append((crops, None))
    return samples


@requires_fixtures
def test_collate_case_matches_official_exactly(cases, masking_scalars):
    _seed(masking_scalars["collate_case"]["seed_before_collate"])
    mg = MaskingGenerator((4, 4), max_num_patches=official_max_num_patches(64))
    out = collate_data_and_cast(_fixture_samples(cases), (0.1, 0.5), 0.5, torch.float32, n_tokens=16, mask_generator=mg)
    keys = ["collated_global_crops", "collated_local_crops", "collated_masks", "mask_indices_list", "masks_weight"]
    for key in keys + ["n_masked_patches"]:
        assert out[key].dtype == cases[f"collate.{key}"].dtype, key
        assert torch.equal(out[key], cases[f"collate.{key}"]), key
    assert out["upperbound"] == int(cases["collate.upperbound"]) == masking_scalars["collate_case"]["upperbound"]
    assert out["collated_masks"].sum(-1).tolist() == masking_scalars["collate_case"]["mask_counts_per_crop_image"]


@requires_fixtures
def test_collate_crop_major_stacking_gram_crops_and_cast(cases):
    _seed(1)
    mg = MaskingGenerator((4, 4), max_num_patches=8.0)
    out = collate_data_and_cast(
        _fixture_samples(cases, with_gram=True), (0.1, 0.5), 0.5, torch.bfloat16, n_tokens=16, mask_generator=mg
    )
    g = cases["collate.samples.global_crops"]  # [B=4, n_g=2, ...]
    assert torch.equal(out["collated_global_crops"], g.transpose(0, 1).flatten(0, 1).bfloat16())
    assert torch.equal(out["collated_gram_teacher_crops"], (2 * g).transpose(0, 1).flatten(0, 1).bfloat16())
    assert out["collated_local_crops"].shape == (12, 3, 4, 4) and out["collated_local_crops"].dtype == torch.bfloat16
    assert sorted(out["collated_masks"].sum(-1).tolist()) == [0, 0, 0, 0, 3, 4, 6, 8]
    assert torch.equal(out["masks_weight"].sum(), torch.tensor(4.0))  # one unit of weight per masked image


@requires_fixtures
def test_collate_ratio_lists_match_official_float32_ladder(masking_scalars):
    lists = masking_scalars["collate_ratio_lists"]
    assert len(lists) == 54
    n_rounding_cases = 0
    for name, entry in lists.items():
        assert mask_ratio_ladder(entry["n_masked_images"], (0.1, 0.5)).tolist() == entry["ratios_fp32"], name
        counts = mask_counts(entry["n_tokens"], entry["n_crop_images"], (0.1, 0.5), 0.5)
        assert counts == entry["counts"] and sum(counts) == entry["upperbound"], name
        for i in entry["counts_differ_from_exact_rational"]:
            n = entry["n_masked_images"]
            exact = int(entry["n_tokens"] * (Fraction(1, 10) + Fraction(2, 5) * Fraction(i + 1, n)))
            assert counts[i] == exact - 1, name
            n_rounding_cases += 1
    assert lists["S160_B6"]["counts"][2] == 29  # float32 0.29999998 × 100, exact arithmetic would give 30
    assert n_rounding_cases >= 3


def test_collate_circular_shift_and_multidistillation_batch():
    rng = random.Random(3)
    mg = MaskingGenerator((4, 4), max_num_patches=8.0, rng=rng, np_rng=np.random.RandomState(3))
    samples = [({"global_crops": [torch.zeros(3, 8, 8)] * 2, "local_crops": [torch.zeros(3, 4, 4)]}, None)] * 4
    out = collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32, 16, mg, random_circular_shift=True, rng=rng)
    assert sorted(out["collated_masks"].sum(-1).tolist()) == [0, 0, 0, 0, 3, 4, 6, 8]
    assert out["n_masked_patches"].tolist() == [21]
    # multi-distillation: masks for n_g × local_batch_size images, independent of the loaded batch size
    out = collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32, 16, mg, local_batch_size=2, rng=rng)
    assert out["collated_masks"].shape == (4, 16)
    assert sorted(out["collated_masks"].sum(-1).tolist()) == [0, 0, 4, 8]
