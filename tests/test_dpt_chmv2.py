"""DPT head + CHMv2 canopy-height model against the official implementation (fixture) and Hugging Face.

* tiny official fixture (``chmv2_tiny_*``, README section (e)): padding, encoder taps, reassemble/fusion
  intermediates, 256-bin logits, mixlog heights, crop-vs-resize;
* the full-size CHMv2 decoder layout (68 keys, 33,747,200 parameters) on the meta device;
* HF ``CHMv2ForDepthEstimation`` (transformers) with the same weights converted: tiny round trip through an HF
  folder, and the ViT-L acceptance parity (slow).
"""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from eo_dinov3.canopy.model import CanopyHeightModel, read_official_head
from eo_dinov3.data.normalization import normalize
from eo_dinov3.errors import CheckpointError, ConfigError, DataError
from eo_dinov3.models.dpt import (
    DPTConfig,
    DPTHead,
    FeaturesToDepth,
    chmv2_mixlog_to_height,
    create_chmv2_mixlog_bins,
    make_bins,
)
from eo_dinov3.models.vision_transformer import DinoVisionTransformer
from tests.conftest import FIXTURES, requires_fixtures

ENC_TOL = dict(rtol=1e-5, atol=1e-5)
LOGIT_TOL = dict(rtol=0.0, atol=1e-4)
HEIGHT_TOL = dict(rtol=1e-5, atol=1e-4)  # metres


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def scalars():
    if not (FIXTURES / "scalars.json").is_file():
        pytest.skip(f"official DINOv3 fixtures not available at {FIXTURES}")
    return json.loads((FIXTURES / "scalars.json").read_text())["chmv2"]


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIXTURES / "chmv2_tiny_cases.pt", weights_only=True)


@pytest.fixture(scope="module")
def tiny(scalars):
    """The official tiny CHMv2 (24-block D=64 backbone, reduced-width decoder) as a CanopyHeightModel."""
    backbone = DinoVisionTransformer(**scalars["tiny"]["backbone_config"]).eval()
    backbone.load_state_dict(
        torch.load(FIXTURES / "chmv2_tiny_backbone_state_dict.pt", weights_only=True), strict=True
    )
    head = DPTHead(DPTConfig.from_official(scalars["tiny"]["decoder_config"], embed_dim=64)).eval()
    head.load_state_dict(torch.load(FIXTURES / "chmv2_tiny_decoder_state_dict.pt", weights_only=True), strict=True)
    return CanopyHeightModel(backbone, head).eval()


# --------------------------------------------------------------------------------------------- mixlog bins
@requires_fixtures
def test_mixlog_bins_and_heights_match_official(ref):
    bins = create_chmv2_mixlog_bins(0.001, 96.0, 256)
    torch.testing.assert_close(bins, ref["mixlog.bins"], rtol=1e-6, atol=1e-7)
    heights = chmv2_mixlog_to_height(ref["mixlog.random_logits"], bins)
    torch.testing.assert_close(heights, ref["mixlog.random_heights_m"], **HEIGHT_TOL)
    # ×8 convention: bin 0 = 0.008 m, last bin = 96 m after scaling; internal range [0.001, 12]
    assert bins[0].item() == pytest.approx(0.001) and bins[-1].item() == pytest.approx(12.0)
    one_hot = torch.zeros(1, 256, 1, 2)
    one_hot[0, 0, 0, 0] = 1e6
    one_hot[0, 255, 0, 1] = 1e6
    h = chmv2_mixlog_to_height(one_hot, bins)[0, 0, 0]
    assert h[0].item() == pytest.approx(0.008, rel=1e-3) and h[1].item() == pytest.approx(96.0, rel=1e-4)


def test_other_output_modes():
    # regression: ReLU(x) + min
    f = FeaturesToDepth(min_depth=0.5, max_depth=50.0)
    x = torch.tensor([-1.0, 0.0, 2.0]).view(1, 1, 1, 3)
    torch.testing.assert_close(f(x), torch.tensor([0.5, 0.5, 2.5]).view(1, 1, 1, 3))
    # linear / log bins; a dominant softmax logit picks its bin centre
    lin = make_bins("linear", 1.0, 100.0, 100)
    assert torch.allclose(lin.diff(), torch.full((99,), 1.0), atol=1e-5)
    log = make_bins("log", 1.0, 100.0, 5)
    torch.testing.assert_close(log, torch.tensor([1.0, 10**0.5, 10.0, 10**1.5, 100.0]), rtol=1e-5, atol=0)
    for bins_strategy, bins in (("linear", lin), ("log", make_bins("log", 1.0, 100.0, 100))):
        f = FeaturesToDepth(1.0, 100.0, bins_strategy=bins_strategy, norm_strategy="softmax")
        logits = torch.zeros(1, 100, 1, 1)
        logits[0, 37] = 50.0
        assert f(logits).item() == pytest.approx(bins[37].item(), rel=1e-4)
    # "linear" weights (ReLU + 0.1, sum-normalised): all-zero logits give the mean bin
    f = FeaturesToDepth(1.0, 100.0, "linear", "linear")
    assert f(torch.zeros(1, 100, 2, 2)).flatten().tolist() == pytest.approx([50.5] * 4, rel=1e-5)
    with pytest.raises(ValueError):
        FeaturesToDepth(bins_strategy="cubic")


# --------------------------------------------------------------------------------------------- tiny official model
@requires_fixtures
def test_tiny_decoder_intermediates_and_logits_match_official(tiny, ref):
    x = ref["input"]
    with torch.no_grad():
        xp, pads = tiny.pad(x)
        assert pads == (2, 2, 3, 3)
        torch.testing.assert_close(xp, ref["padded_input"], rtol=0, atol=0)
        feats = tiny.encode(xp)
        for i, (patch, cls) in enumerate(feats):
            torch.testing.assert_close(patch, ref[f"encoder.layer{i}.patch"], **ENC_TOL)
            torch.testing.assert_close(cls, ref[f"encoder.layer{i}.cls"], **ENC_TOL)
        # decoder on the official encoder outputs, so decoder errors are not masked by encoder noise
        official_feats = [(ref[f"encoder.layer{i}.patch"], ref[f"encoder.layer{i}.cls"]) for i in range(4)]
        _, inter = tiny.head.forward_features(official_feats, return_intermediates=True)
        for i in range(4):
            torch.testing.assert_close(inter[f"reassemble.{i}"], ref[f"decoder.reassemble.{i}"], **ENC_TOL)
            torch.testing.assert_close(inter[f"fusion{i}"], ref[f"decoder.fusion{i}"], **ENC_TOL)
        torch.testing.assert_close(tiny.head(official_feats), ref["decoder.logits"], **LOGIT_TOL)
        torch.testing.assert_close(tiny.head(feats), ref["decoder.logits"], **LOGIT_TOL)
        heights_padded, _ = tiny.forward_padded(x)
    torch.testing.assert_close(heights_padded, ref["height_m"], **HEIGHT_TOL)
    assert heights_padded.std() > 0.1  # a spatially varying map, not a constant


@requires_fixtures
def test_padding_is_cropped_not_resized(tiny, ref):
    with torch.no_grad():
        heights = tiny(ref["input"])  # 60x90 input -> 64x96 padded -> cropped back
    assert heights.shape == (1, 1, 60, 90)
    torch.testing.assert_close(heights, ref["height_m_cropped"], **HEIGHT_TOL)
    # the official notebook's bilinear resize of the padded map is a different (mis-registered) result
    assert (heights - ref["height_m_resized_notebook"]).abs().max() > 0.5


@requires_fixtures
def test_odd_patch_grid(tiny, scalars):
    case = scalars["tiny"]["odd_grid_case"]
    x = torch.randn(1, 3, *case["input_hw"])
    # official CenterPadding(16): 70x84 -> 80x96, 5x6 grid; the official DPT output is then 96x96 (distorted)
    official_pad = CanopyHeightModel(tiny.backbone, tiny.head, pad_multiple=16).eval()
    with torch.no_grad():
        xp, _ = official_pad.pad(x)
        assert list(xp.shape[-2:]) == case["padded_hw"]
        logits = tiny.head(official_pad.encode(xp))
        assert [1, 1, *logits.shape[-2:]] == case["output_shape"]
        with pytest.raises(ConfigError, match="odd"):
            official_pad(x)
        # default: pad to an even grid (96x96) and crop -> the input size, undistorted
        assert tiny.padding(*case["input_hw"]) == (13, 13, 6, 6)
        heights = tiny(x)
    assert heights.shape == (1, 1, *case["input_hw"])


@requires_fixtures
def test_predict_heights_normalises_uint8(tiny):
    g = torch.Generator().manual_seed(3)
    img = torch.randint(0, 256, (48, 64, 3), dtype=torch.uint8, generator=g)
    out = tiny.predict_heights(img.numpy())  # HWC numpy
    with torch.no_grad():
        expected = tiny(normalize(img.permute(2, 0, 1).float().unsqueeze(0) / 255.0, "chmv2"))
    assert out.shape == (1, 1, 48, 64)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(tiny.predict_heights(img.permute(2, 0, 1)), expected, rtol=0, atol=0)
    torch.testing.assert_close(tiny.predict_heights(img.permute(2, 0, 1).float() / 255), expected, **HEIGHT_TOL)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        tiny.predict_heights(img.float())
    with pytest.raises(DataError):
        tiny.predict_heights(np.zeros((8, 8, 4), dtype=np.uint8))
    md = tiny.metadata
    assert md["expected_gsd_m"] == 0.6 and md["normalization"] == "chmv2" and md["units"] == "m"
    assert md["mean"] == (0.420, 0.411, 0.296) and md["taps"] == [5, 11, 17, 23]


@requires_fixtures
def test_backbone_frozen_head_trainable(tiny):
    assert not any(p.requires_grad for p in tiny.backbone.parameters())
    assert all(p.requires_grad for p in tiny.head.parameters())


@requires_fixtures
def test_from_official_head_file(tiny, ref, scalars, tmp_path):
    sd = torch.load(FIXTURES / "chmv2_tiny_decoder_state_dict.pt", weights_only=True)
    cfg = DPTConfig.from_official(scalars["tiny"]["decoder_config"], embed_dim=64)
    # a full depther state dict (decoder.* + encoder.*) is accepted too
    torch.save({**{f"decoder.{k}": v for k, v in sd.items()}, "encoder.backbone.cls_token": torch.zeros(1)},
               tmp_path / "depther.pth")
    assert read_official_head(tmp_path / "depther.pth").keys() == sd.keys()
    torch.save(sd, tmp_path / "head.pth")
    model = CanopyHeightModel.from_official(tmp_path / "head.pth", tiny.backbone, head_config=cfg).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ref["input"]), ref["height_m_cropped"], **HEIGHT_TOL)
    # a head that does not fit (full-size CHMv2 config for a D=64 backbone) is a one-line CheckpointError
    with pytest.raises(CheckpointError, match="does not fit"):
        CanopyHeightModel.from_official(tmp_path / "head.pth", tiny.backbone)


def test_full_size_decoder_layout(scalars):
    head = DPTHead(DPTConfig.chmv2(embed_dim=1024), device="meta")
    sd = head.state_dict()
    ref = scalars["full_size_decoder"]
    assert [[k, list(v.shape)] for k, v in sd.items()] == [list(x) for x in ref["state_dict"]]
    assert len(sd) == ref["n_keys"] == 68
    assert sum(v.numel() for v in sd.values()) == ref["n_params"] == 33_747_200


def test_hub_constructor_errors():
    from eo_dinov3.hub import dinov3_vitl16_chmv2

    with pytest.raises(CheckpointError, match="weights"):
        dinov3_vitl16_chmv2()
    with pytest.raises(CheckpointError, match="backbone_weights"):
        dinov3_vitl16_chmv2(weights="dinov3_vitl16_chmv2_dpt_head-3703d643.pth")
    model = dinov3_vitl16_chmv2(pretrained=False, device="meta")
    assert model.taps == (5, 11, 17, 23) and model.backbone.local_cls_norm is not None
    assert sum(p.numel() for p in model.head.parameters()) == 33_747_200


# --------------------------------------------------------------------------------------------- Hugging Face
def _has_hf_chmv2() -> bool:
    try:
        return importlib.util.find_spec("transformers.models.chmv2") is not None
    except ModuleNotFoundError:
        return False


requires_hf_chmv2 = pytest.mark.skipif(not _has_hf_chmv2(), reason="transformers with CHMv2 (>= 5.x) not installed")


def _hf_model_from_folder(folder):
    from transformers import CHMv2ForDepthEstimation

    return CHMv2ForDepthEstimation.from_pretrained(folder).eval()


@requires_fixtures
@requires_hf_chmv2
def test_hf_round_trip_tiny(tiny, ref, tmp_path):
    """Our tiny official model → HF folder → transformers CHMv2 gives the official heights; and back."""
    from eo_dinov3.canopy.hf_chmv2 import save_hf_checkpoint

    save_hf_checkpoint(tiny, tmp_path / "hf")
    hf = _hf_model_from_folder(tmp_path / "hf")
    with torch.no_grad():
        hf_heights = hf(pixel_values=ref["padded_input"]).predicted_depth
    torch.testing.assert_close(hf_heights.unsqueeze(1), ref["height_m"], **HEIGHT_TOL)

    back = CanopyHeightModel.from_hf(tmp_path / "hf").eval()
    orig_bb, back_bb = tiny.backbone.state_dict(), back.backbone.state_dict()
    assert orig_bb.keys() == back_bb.keys()
    for k in orig_bb:
        if k.startswith("local_cls_norm.") or k.endswith("qkv.bias_mask"):
            continue  # local_cls_norm: training-only, no HF counterpart (filled from norm)
        a, b = back_bb[k], orig_bb[k]
        if k.endswith("qkv.bias"):  # the fixture perturbed the masked key third: compare the effective bias
            a, b = a * back_bb[k + "_mask"], b * orig_bb[k + "_mask"]
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    for k, v in tiny.head.state_dict().items():
        torch.testing.assert_close(back.head.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert back.head.config == tiny.head.config
    with torch.no_grad():
        torch.testing.assert_close(back(ref["input"]), ref["height_m_cropped"], **HEIGHT_TOL)


def test_hf_key_bias_and_rebuilt_buffers():
    """HF's key bias goes under the official (1, 0, 1) mask (a per-query constant: no effect on attention); back
    in HF it is the effective, masked bias (zero). RoPE periods are rebuilt; every other tensor is bit-identical."""
    from eo_dinov3.canopy.hf_chmv2 import hf_to_official_state_dicts, official_to_hf_state_dict

    D = 8
    hf = {f"backbone.model.layer.0.attention.{n}_proj.{p}": torch.randn(D, D) if p == "weight" else torch.randn(D)
          for n in "qkvo" for p in ("weight", "bias")}
    hf.update({"backbone.embeddings.cls_token": torch.randn(1, 1, D), "backbone.norm.weight": torch.randn(D),
               "backbone.norm.bias": torch.randn(D), "head.convs.0.weight": torch.randn(4, 2, 3, 3)})
    bb, head = hf_to_official_state_dicts(hf, num_heads=2)
    assert bb["blocks.0.attn.qkv.bias_mask"].tolist() == [1.0] * D + [0.0] * D + [1.0] * D
    assert torch.equal(bb["blocks.0.attn.qkv.bias"][D : 2 * D], hf["backbone.model.layer.0.attention.k_proj.bias"])
    torch.testing.assert_close(bb["rope_embed.periods"], torch.tensor([1.0]))  # head dim 4 -> one period, 100^0
    assert torch.equal(bb["local_cls_norm.weight"], bb["norm.weight"]) and "convs.0.conv.weight" in head
    back = official_to_hf_state_dict(bb, head)
    assert back.keys() >= hf.keys()
    for k in hf:
        expected = torch.zeros(D) if k.endswith("k_proj.bias") else hf[k]
        torch.testing.assert_close(back[k], expected, rtol=0, atol=0, msg=k)
    with pytest.raises(CheckpointError):
        hf_to_official_state_dicts({"classifier.weight": torch.zeros(1)})


def _random_chmv2_fast(seed: int = 0) -> CanopyHeightModel:
    """Full-size CHMv2 (ViT-L + head) with non-trivial random weights, filled quickly (no trunc-normal init):
    matrices N(0, 1/fan_in), LayerScale U(0.05, 0.3), norm weights 1 + N(0, 0.1), biases/tokens N(0, 0.02)."""
    from eo_dinov3.hub import dinov3_vitl16_chmv2

    model = dinov3_vitl16_chmv2(pretrained=False, device="meta").to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.uniform_(0.05, 0.3, generator=g)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1, generator=g)
            elif p.ndim == 1 or name.endswith(("_token", "_tokens")):
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
        model.backbone.rope_embed._init_weights()
        for m in model.backbone.modules():
            if hasattr(m, "reset_bias_mask"):
                m.reset_bias_mask()
    return model.eval()


@pytest.mark.slow
@requires_hf_chmv2
def test_acceptance_vitl16_chmv2_equals_transformers():
    """Acceptance: random-weight ``dinov3_vitl16_chmv2`` == transformers ``CHMv2ForDepthEstimation`` with the same
    weights converted, within 1e-3 m (CPU fp32). HF's processor pads after normalising (centre, extra pixel
    bottom/right, like ours) and its post-processing *resizes* back to the input size; we crop. So we compare
    (a) an input that is already a multiple of 32 (no padding on either side), (b) a 60x90 input: our cropped
    output vs HF's raw padded prediction cropped by the same padding, and (c) the whole uint8 pipelines."""
    from transformers import CHMv2Config, CHMv2ForDepthEstimation, CHMv2ImageProcessor
    from transformers.initialization import no_init_weights
    from transformers.modeling_outputs import DepthEstimatorOutput

    from eo_dinov3.canopy.hf_chmv2 import hf_config_dict, official_to_hf_state_dict

    ours = _random_chmv2_fast()
    cfg = hf_config_dict(ours.backbone, ours.head.config)
    kwargs = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}
    with no_init_weights():  # weights are loaded right after: skip HF's slow ViT-L initialisation
        hf = CHMv2ForDepthEstimation(CHMv2Config(**kwargs))
    hf.load_state_dict(official_to_hf_state_dict(ours.backbone.state_dict(), ours.head.state_dict()), strict=True)
    hf.eval()

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 64, 96, generator=g)
    with torch.no_grad():
        a_ours, a_hf = ours(x), hf(pixel_values=x).predicted_depth.unsqueeze(1)
    diff_a = (a_ours - a_hf).abs().max().item()
    assert a_ours.shape == (1, 1, 64, 96) and a_ours.std() > 0.1  # non-trivial map
    assert diff_a < 1e-3

    img = torch.randint(0, 256, (3, 60, 90), dtype=torch.uint8, generator=g)
    proc = CHMv2ImageProcessor()
    pixel_values = proc(images=img, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape[-2:] == (64, 96)
    xn = normalize(img.float().unsqueeze(0) / 255.0, "chmv2")
    xp, (t, b, l, r) = ours.pad(xn)
    assert (pixel_values - xp).abs().max() < 1e-5  # same normalisation and the same centre padding
    with torch.no_grad():
        b_ours = ours(xn)
        raw_hf = hf(pixel_values=pixel_values).predicted_depth.unsqueeze(1)
    diff_b = (b_ours - raw_hf[..., t : 64 - b, l : 96 - r]).abs().max().item()
    diff_c = (ours.predict_heights(img) - raw_hf[..., t : 64 - b, l : 96 - r]).abs().max().item()
    resized = proc.post_process_depth_estimation(
        DepthEstimatorOutput(predicted_depth=raw_hf[:, 0]), target_sizes=[(60, 90)]
    )[0]["predicted_depth"]
    diff_resize = (b_ours[0, 0] - resized).abs().max().item()
    print(f"\nmax |ours - HF| (m): multiple-of-32 {diff_a:.2e}, 60x90 cropped {diff_b:.2e}, uint8 path "
          f"{diff_c:.2e}; vs HF resize post-processing {diff_resize:.3f} m (expected to differ)")
    assert diff_b < 1e-3 and diff_c < 1e-3
    assert diff_resize > diff_b  # the resize post-processing is not what we do
