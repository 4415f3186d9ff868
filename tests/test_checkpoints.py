"""Checkpoint I/O (eo_dinov3.checkpoints): layouts, strict loading with coverage reports, conversions, safety."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from eo_dinov3 import checkpoints as ck
from eo_dinov3.checkpoints import (
    SAT_LABEL,
    LoadReport,
    convert_state_dict,
    inspect_checkpoint,
    load_backbone,
    save_backbone,
    save_layout,
)
from eo_dinov3.cli import main as cli_main
from eo_dinov3.errors import CheckpointError
from eo_dinov3.hub import arch_config, build_backbone, dinov3_vitl16, dinov3_vits16, official_weight_filename
from eo_dinov3.models.vision_transformer import DinoVisionTransformer
from tests.conftest import FIXTURES, REPO_ROOT, requires_fixtures


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Make every tensor matter (seeded by the caller): LayerScale ~ U(0.5, 1.5), norm weights ~ 1 + N(0, 0.1),
    biases (including the masked key third of ``qkv.bias``), tokens and mask token ~ N(0, 0.02)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            elif name.endswith("bias") or name.endswith("_token") or name.endswith("_tokens"):
                p.normal_(0.0, 0.02)
    return model


TINY = dict(embed_dim=64, depth=2, num_heads=2)


def tiny_model(seed: int = 0, **overrides) -> DinoVisionTransformer:
    torch.manual_seed(seed)
    return randomize_(build_backbone("dinov3_vits16", pretrained=False, **{**TINY, **overrides})).eval()


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]


def fake_file(path: Path, shapes: dict[str, tuple], wrap=None) -> Path:
    """A checkpoint with the given keys and shapes whose tensors are stride-0 views of one zero (a few kB on disk,
    loadable with assign=True): lets tests exercise full-size key sets without gigabytes."""
    one = torch.zeros(1)
    sd = {k: one.expand(*s) if s else one.reshape(()) for k, s in shapes.items()}
    torch.save(wrap(sd) if wrap else sd, path)
    return path


def meta_shapes(name: str, **overrides) -> dict[str, tuple]:
    model = DinoVisionTransformer(arch_config(name, **overrides), device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ official files
@requires_fixtures
def test_official_tiny_fixture_loads_with_inferred_arch_and_matches_official_outputs():
    cfg = json.loads((FIXTURES / "scalars.json").read_text())["vit_tiny"]["config"]
    model = load_backbone(FIXTURES / "vit_tiny_state_dict.pt").eval()
    for k, v in cfg.items():
        if k != "img_size":
            assert getattr(model.config, k) == v, k
    r = model.load_report
    assert (r.layout, r.loaded, r.expected, r.synthesized, r.ignored) == ("official", 55, 55, [], [])
    assert r.sat_variant is True  # the tiny fixture has local_cls_norm
    ref = torch.load(FIXTURES / "vit_tiny_cases.pt", weights_only=True)
    with torch.no_grad():
        out = model.forward_features(ref["input"])
    for k in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens"):
        torch.testing.assert_close(out[k], ref[f"eval.forward_features.{k}"], rtol=1e-5, atol=1e-5)


@requires_fixtures
@pytest.mark.parametrize("wrap", ["flat", "teacher", "teacher+module"])
def test_training_teacher_checkpoint_heads_are_ignored_and_reported(tmp_path, wrap):
    payload = torch.load(FIXTURES / "ssl_step_teacher_after_ema_state_dict.pt", weights_only=True)
    arch = json.loads((FIXTURES / "scalars.json").read_text())["ssl_step"]["arch"]
    if wrap == "teacher":
        payload = {"teacher": payload}
    elif wrap == "teacher+module":
        payload = {"teacher": {"module." + k: v for k, v in payload.items()}, "iteration": 9}
    torch.save(payload, tmp_path / "teacher_checkpoint.pth")
    model = load_backbone(tmp_path / "teacher_checkpoint.pth")
    r = model.load_report
    assert (model.embed_dim, model.n_blocks, model.num_heads) == (arch["embed_dim"], arch["depth"], arch["num_heads"])
    assert r.loaded == r.expected == 40
    assert "dino_head.* (7 tensors)" in " ".join(r.ignored) and "ibot_head.* (7 tensors)" in " ".join(r.ignored)
    assert r.prefix == ("module.backbone." if wrap == "teacher+module" else "backbone.")
    ref = torch.load(FIXTURES / "ssl_step_teacher_after_ema_state_dict.pt", weights_only=True)
    assert_same_tensors(model.state_dict(), {k[9:]: v for k, v in ref.items() if k.startswith("backbone.")})


@requires_fixtures
def test_full_size_official_key_lists_are_recognised(tmp_path):
    hub = json.loads((FIXTURES / "scalars.json").read_text())["hub"]
    sat = fake_file(tmp_path / "my_renamed_weights.pth", dict(hub["dinov3_vitl16_sat493m_state_dict"]))
    vits = fake_file(tmp_path / "weights.pth", dict(hub["dinov3_vits16_state_dict"]))
    # the official loader would build the LVD ViT-L for this file name and fail on local_cls_norm.*
    model = dinov3_vitl16(weights=sat)
    r = model.load_report
    assert (r.arch, r.sat_variant, r.loaded, r.expected) == (SAT_LABEL, True, 370, 370)
    assert model.untie_global_and_local_cls_norm and model.config.normalization == "sat493m"
    assert r.n_params == hub["param_counts"]["dinov3_vitl16_sat493m"]
    assert load_backbone(sat).load_report.arch == SAT_LABEL
    r = load_backbone(vits).load_report
    assert (r.arch, r.sat_variant, r.n_params) == ("dinov3_vits16", False, hub["param_counts"]["dinov3_vits16"])


def test_renamed_sat_style_file_loads_through_a_hub_constructor(tmp_path):
    sat = tiny_model(untie_global_and_local_cls_norm=True)
    path = save_backbone(sat, tmp_path / "backbone.pth", format="official")
    model = dinov3_vitl16(weights=path, **TINY)  # LVD arch asked for; local_cls_norm in the file decides
    assert model.untie_global_and_local_cls_norm and model.load_report.sat_variant is True
    assert any("local_cls_norm" in n for n in model.load_report.notes)
    assert_same_tensors(model.state_dict(), sat.state_dict())
    assert load_backbone(path).untie_global_and_local_cls_norm


def test_full_size_arch_is_inferred_and_a_wrong_arch_names_the_right_one(tmp_path):
    path = fake_file(tmp_path / "x.pth", meta_shapes("dinov3_vitb16"))
    assert load_backbone(path).load_report.arch == "dinov3_vitb16"
    with pytest.raises(CheckpointError) as e:
        dinov3_vitl16(weights=path)
    msg = str(e.value)
    assert "\n" not in msg
    assert "this looks like dinov3_vitb16 (matches 188/188 tensors), not dinov3_vitl16" in msg
    assert "mis-shaped" in msg and "missing" in msg


# ------------------------------------------------------------------------------------------------ strictness
def test_missing_unexpected_and_misshaped_keys_fail_loudly(tmp_path):
    sd = tiny_model().state_dict()
    partial = {k: v for k, v in sd.items() if not k.startswith("blocks.1.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing .*blocks\.1\..*ls2\.gamma|missing"):
        dinov3_vits16(weights=tmp_path / "partial.pth", **TINY)
    with pytest.raises(CheckpointError) as e:
        dinov3_vits16(weights=tmp_path / "partial.pth", **TINY)
    assert "only 23/38 tensors match" in str(e.value) and "15 missing (blocks.1." in str(e.value)

    torch.save({**sd, "blocks.0.attn.extra": torch.zeros(3)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"1 unexpected \(blocks\.0\.attn\.extra\)"):
        dinov3_vits16(weights=tmp_path / "extra.pth", **TINY)

    torch.save(sd, tmp_path / "tiny.pth")
    with pytest.raises(CheckpointError) as e:
        dinov3_vits16(weights=tmp_path / "tiny.pth")  # full ViT-S asked for, D=64 file given
    msg = str(e.value)
    assert "does not fit dinov3_vits16" in msg and "mis-shaped (cls_token [1, 1, 64] vs [1, 1, 384]" in msg
    assert "D=64, depth 2, 2 heads, mlp FFN (hidden 256)" in msg


def test_report_is_attached_and_logged(tmp_path, caplog):
    path = save_backbone(tiny_model(), tmp_path / "m.pth", format="official")
    with caplog.at_level("INFO", logger="eo_dinov3.checkpoints"):
        model = load_backbone(path)
    r = model.load_report
    assert isinstance(r, LoadReport) and r.loaded == r.expected == 38 and r.layout == "official"
    assert "loaded 38/38 tensors" in caplog.text
    assert json.loads(json.dumps(r.to_dict()))["expected"] == 38


# ------------------------------------------------------------------------------------------------ formats
def test_eo_and_safetensors_formats_record_eo_metadata(tmp_path):
    model = tiny_model(in_chans=4, bands=["blue", "green", "red", "nir"], normalization="sat493m", gsd_m=0.6)
    for fmt, name in (("eo", "m.pt"), ("safetensors", "m.safetensors")):
        path = save_backbone(model, tmp_path / name, format=fmt)
        loaded = load_backbone(path)
        assert loaded.config == model.config, fmt
        assert_same_tensors(loaded.state_dict(), model.state_dict())
        assert loaded.load_report.config_source == "config recorded in the file"
        # through a hub constructor: the architecture comes from the arch, the EO metadata from the file
        via_hub = dinov3_vits16(weights=path, **TINY)
        assert (via_hub.config.bands, via_hub.config.gsd_m, via_hub.config.in_chans) == (model.config.bands, 0.6, 4)
    plain = load_backbone(save_backbone(model, tmp_path / "plain.pth", format="official"))
    assert plain.config.in_chans == 4 and plain.config.bands is None  # official files carry no metadata


@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
def test_round_trip_official_ours_timm_hf_is_bit_exact(tmp_path, ffn):
    kw = dict(ffn_layer=ffn, ffn_ratio=4.0 if ffn == "mlp" else 6.0)
    model = tiny_model(**kw)
    with torch.no_grad():  # released-model conditions: the masked key bias and (timm) the mask token hold zeros
        for blk in model.blocks:
            blk.attn.qkv.bias[model.embed_dim : 2 * model.embed_dim] = 0
        model.mask_token.zero_()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    a = load_backbone(save_backbone(model, tmp_path / "official.pth", format="official"))
    b = load_backbone(save_layout(a, tmp_path / "timm.safetensors", "timm"))
    c = load_backbone(save_layout(b, tmp_path / "hf_dir", "hf"))
    d = load_backbone(save_backbone(c, tmp_path / "ours.pt", format="eo"))
    e = load_backbone(save_layout(d, tmp_path / "timm.pth", "timm"), num_heads=2)  # .pth: no config inside
    f = load_backbone(save_layout(e, tmp_path / "hf.safetensors", "hf"))
    for m, layout in ((a, "official"), (b, "timm"), (c, "hf"), (d, "eo"), (e, "timm"), (f, "hf")):
        assert m.load_report.layout == layout
        assert_same_tensors(m.state_dict(), ref)
    # safetensors files carry what timm/HF cannot hold in their header; a timm .pth (no header) rebuilds it
    assert not any(k.endswith("bias_mask") or k == "mask_token" for k in b.load_report.synthesized)
    assert "mask_token" not in c.load_report.synthesized
    assert "mask_token" in e.load_report.synthesized and "blocks.0.attn.qkv.bias_mask" in e.load_report.synthesized


def test_conversions_drop_only_what_the_layout_cannot_hold_and_keep_outputs(tmp_path):
    model = tiny_model(untie_global_and_local_cls_norm=True)  # non-zero key bias, mask token, local CLS norm
    sd = model.state_dict()
    for layout in ("timm", "hf"):
        back = convert_state_dict(convert_state_dict(sd, "official", layout), layout, "official")
        lost = sorted(set(sd) - set(back))
        expected_lost = ["local_cls_norm.bias", "local_cls_norm.weight", "rope_embed.periods"]
        expected_lost += [f"blocks.{i}.attn.qkv.bias_mask" for i in range(2)]
        expected_lost += ["mask_token"] if layout == "timm" else []
        assert lost == sorted(expected_lost), layout
        for k, v in back.items():
            if k.endswith("qkv.bias"):
                D = model.embed_dim
                assert torch.equal(v[:D], sd[k][:D]) and torch.equal(v[2 * D :], sd[k][2 * D :])
                assert not v[D : 2 * D].any()
            else:
                assert torch.equal(v, sd[k]), k
        assert convert_state_dict(convert_state_dict(sd, "official", layout), "auto", "official").keys() == back.keys()
        loaded = load_backbone(save_layout(model, tmp_path / f"{layout}.safetensors", layout)).eval()
        x = torch.randn(2, 3, 48, 32)
        with torch.no_grad():
            torch.testing.assert_close(
                loaded.forward_features(x)["x_norm_patchtokens"], model.forward_features(x)["x_norm_patchtokens"],
                rtol=0, atol=1e-6,
            )


def test_timm_file_without_qkv_bias_loads_into_the_official_arch(tmp_path):
    timm = pytest.importorskip("timm")
    model = tiny_model()
    name, kw = ck.timm_config(model.config)
    t = timm.create_model("vit_small_patch16_dinov3", pretrained=False, **{**kw, "qkv_bias": False})
    torch.save(t.state_dict(), tmp_path / "timm_nobias.pth")
    loaded = dinov3_vits16(weights=tmp_path / "timm_nobias.pth", **TINY)
    assert loaded.load_report.layout == "timm"
    assert "blocks.{i}.attn.qkv.bias (2)" in loaded.load_report.summary()
    assert not loaded.blocks[0].attn.qkv.bias.any()


def test_hf_folder_loads_in_transformers_and_back(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_model(ffn_layer="swiglu", ffn_ratio=6.0)
    assert cli_main(["convert-checkpoint", str(save_backbone(model, tmp_path / "m.pth", format="official")),
                     str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf = transformers.DINOv3ViTModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        ours = model.forward_features(x)["x_norm_patchtokens"]
        theirs = hf(pixel_values=x).last_hidden_state[:, 5:]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    back = load_backbone(tmp_path / "hf")
    assert back.load_report.layout == "hf" and back.num_heads == 2  # heads from config.json


# ------------------------------------------------------------------------------------------------ named weights
def test_named_weight_sets_are_looked_up_by_official_file_name(tmp_path, monkeypatch):
    wdir, hub_dir = tmp_path / "weights", tmp_path / "hub"
    monkeypatch.setenv("DINOV3_WEIGHTS_DIR", str(wdir))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub_dir))
    with pytest.raises(CheckpointError) as e:
        dinov3_vits16(weights="LVD1689M", **TINY)
    msg = str(e.value)
    assert official_weight_filename("dinov3_vits16", "lvd1689m") in msg
    assert str(wdir) in msg and str(hub_dir / "checkpoints") in msg
    with pytest.raises(CheckpointError, match="no sat493m weights for dinov3_vits16"):
        dinov3_vits16(weights="sat493m")
    model = tiny_model()
    (hub_dir / "checkpoints").mkdir(parents=True)
    name = official_weight_filename("dinov3_vits16", "lvd1689m")
    save_backbone(model, hub_dir / "checkpoints" / name, format="official")
    loaded = dinov3_vits16(weights="lvd1689m", **TINY)
    assert_same_tensors(loaded.state_dict(), model.state_dict())


def test_torch_hub_local_entry_points(tmp_path):
    model = torch.hub.load(str(REPO_ROOT), "dinov3_vits16", source="local", pretrained=False, **TINY)
    assert isinstance(model, DinoVisionTransformer) and model.embed_dim == 64
    path = save_backbone(tiny_model(), tmp_path / "w.pth", format="official")
    loaded = torch.hub.load(str(REPO_ROOT), "dinov3_vits16", source="local", weights=str(path), **TINY)
    assert_same_tensors(loaded.state_dict(), tiny_model().state_dict())


# ------------------------------------------------------------------------------------------------ unsafe / broken
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 8), "x": _Payload(marker)}, path)
    with pytest.raises(CheckpointError) as e:
        load_backbone(path)
    assert not marker.exists()
    msg = str(e.value)
    assert "refused as unsafe: its pickle would construct or call exec" in msg and "\n" not in msg
    with pytest.raises(CheckpointError, match="refused as unsafe"):
        inspect_checkpoint(path)
    assert not marker.exists()
    # the payload is live: an unsafe load would have run it
    live = tmp_path / "live.txt"
    torch.save({"x": _Payload(live)}, tmp_path / "evil2.pth")
    torch.load(tmp_path / "evil2.pth", weights_only=False)
    assert live.read_text() == "pwned"


def _broken_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = save_backbone(tiny_model(), tmp_path / "good.pth", format="official")
    data = good.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    st = save_backbone(tiny_model(), tmp_path / "good.safetensors", format="safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(st[: len(st) - 1000])
    (tmp_path / "random.bin").write_bytes(b"\xff" + torch.randint(0, 256, (4095,), dtype=torch.uint8).numpy().tobytes())
    (tmp_path / "page.pth").write_text("<html><body>404 Not Found</body></html>")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    with open(tmp_path / "legacy.pkl", "wb") as f:
        pickle.dump([1, 2, 3], f)
    torch.save({"optimizer": {"lr": 1.0}, "step": 3}, tmp_path / "notensors.pth")
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other_model.pth")
    return {
        "truncated": (tmp_path / "truncated.pth", "corrupt or truncated"),
        "truncated_st": (tmp_path / "truncated.safetensors", "corrupt or truncated safetensors"),
        "random": (tmp_path / "random.bin", "not a checkpoint"),
        "text": (tmp_path / "page.pth", "is a text file"),
        "json": (tmp_path / "config.json", "is a JSON file"),
        "empty": (tmp_path / "empty.pth", "is empty (0 bytes)"),
        "directory": (tmp_path / "folder", "is a directory"),
        "missing": (tmp_path / "nope.pth", "no such file"),
        "pickle_list": (tmp_path / "legacy.pkl", "not a torch.save checkpoint the safe loader can read"),
        "no_tensors": (tmp_path / "notensors.pth", "holds no tensors"),
        "other_model": (tmp_path / "other_model.pth", "no DINOv3 backbone found"),
    }


def test_broken_files_give_one_line_errors(tmp_path, capsys):
    for name, (path, words) in _broken_files(tmp_path).items():
        with pytest.raises(CheckpointError) as e:
            load_backbone(path)
        msg = str(e.value)
        assert words in msg and str(path) in msg and "\n" not in msg, (name, msg)
        assert e.value.__cause__ is None, name  # no torch stack behind it
        assert e.value.__context__ is None or e.value.__suppress_context__, name
        assert cli_main(["inspect-checkpoint", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and "Traceback" not in err, (name, err)


# ------------------------------------------------------------------------------------------------ CLI
@requires_fixtures
def test_inspect_checkpoint_cli_text_and_json(capsys):
    path = FIXTURES / "ssl_step_teacher_after_ema_state_dict.pt"
    assert cli_main(["inspect-checkpoint", str(path)]) == 0
    out = capsys.readouterr().out
    assert "layout:        official (prefix 'backbone.')" in out
    assert "D=64, depth 2, 2 heads, mlp FFN (hidden 256)" in out
    assert "dino_head.* (7 tensors)" in out and "local_cls_norm present" in out
    assert cli_main(["inspect-checkpoint", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "official" and info["prefix"] == "backbone." and info["arch"] == "custom"
    assert info["parameters"] == 150080 and info["dtypes"] == {"float32": 40} and info["sat_variant"] is True


def test_inspect_reports_full_size_arch_matches_and_eo_metadata(tmp_path, capsys):
    shapes = meta_shapes("dinov3_vitl16plus")
    path = fake_file(tmp_path / "x.pth", shapes, wrap=lambda sd: {"model": sd})
    info = inspect_checkpoint(path)
    assert info["arch"] == "dinov3_vitl16plus" and info["parameters"] == 403_915_776
    assert info["container"] == '{"model": …}' and info["layout"] == "official"
    n = len(shapes)
    assert info["nearest_official"][0] == {"arch": "dinov3_vitl16plus", "matched": n, "expected": n}
    eo = save_backbone(tiny_model(bands=["red", "green", "blue"], gsd_m=0.5), tmp_path / "eo.pt", format="eo")
    assert cli_main(["inspect-checkpoint", str(eo)]) == 0
    out = capsys.readouterr().out
    assert '"gsd_m": 0.5' in out and "layout:        eo" in out


@pytest.mark.parametrize("to", ["official", "safetensors", "eo", "timm", "hf"])
def test_convert_checkpoint_cli(tmp_path, capsys, to):
    model = tiny_model()
    src = save_backbone(model, tmp_path / "in.pth", format="official")
    out = tmp_path / ("out.safetensors" if to in ("safetensors", "hf") else "out.pth")
    assert cli_main(["convert-checkpoint", str(src), str(out), "--to", to]) == 0
    assert f"wrote {out} ({to})" in capsys.readouterr().out
    back = load_backbone(out, num_heads=2) if to == "timm" else load_backbone(out)
    assert back.load_report.layout == {"safetensors": "eo"}.get(to, to)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), model(x), rtol=0, atol=1e-6)


def test_file_round_trip_official_ours_timm_hf_is_lossless_for_every_tensor(tmp_path):
    """official -> ours -> timm file -> ours -> HF folder -> ours -> official keeps EVERY tensor bit for bit, including
    what timm/HF cannot hold (non-zero masked key bias, mask token, local_cls_norm, bf16-rounded RoPE periods):
    those ride in the safetensors header; timm and transformers still load the files strictly."""
    import timm
    import transformers
    from safetensors.torch import load_file

    from eo_dinov3.checkpoints import hf_config, load_backbone, save_backbone, save_layout, timm_config
    from eo_dinov3.models.vision_transformer import DinoVisionTransformer, ViTConfig

    torch.manual_seed(3)
    cfg = ViTConfig(embed_dim=64, depth=2, num_heads=2, n_storage_tokens=4, layerscale_init=1e-5,
                    norm_layer="layernormbf16", mask_k_bias=True, untie_global_and_local_cls_norm=True,
                    pos_embed_rope_rescale_coords=2.0)
    model = DinoVisionTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # every tensor non-trivial, incl. the masked key third of qkv.bias
        model.rope_embed.periods.copy_(model.rope_embed.periods.bfloat16().float())  # as in training exports
    official = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(b[64:128].abs().sum() > 0 for k, b in official.items() if k.endswith("qkv.bias"))

    save_backbone(model, tmp_path / "official.pth", format="official")
    ours = load_backbone(tmp_path / "official.pth")
    save_layout(ours, tmp_path / "timm.safetensors", "timm")
    from_timm = load_backbone(tmp_path / "timm.safetensors")
    save_layout(from_timm, tmp_path / "hf_folder", "hf")
    from_hf = load_backbone(tmp_path / "hf_folder")
    save_backbone(from_hf, tmp_path / "back.pth", format="official")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert set(back) == set(official)
    for k, v in official.items():
        assert v.dtype == back[k].dtype and torch.equal(v, back[k]), k
    assert not from_hf.load_report.synthesized  # nothing had to be rebuilt

    # the files are still ordinary timm / transformers checkpoints
    name, kwargs = timm_config(ours.config)
    tm = timm.create_model(name, pretrained=False, **kwargs)
    tm.load_state_dict(load_file(tmp_path / "timm.safetensors"), strict=True)
    hf = transformers.DINOv3ViTModel.from_pretrained(tmp_path / "hf_folder")
    assert isinstance(hf, transformers.DINOv3ViTModel)
