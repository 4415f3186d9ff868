"""Training schedules, layer-wise lr/wd parameter groups and the per-iteration optimiser update against the
official fixtures (scalars.json ``schedules``, ``param_groups``, ``ssl_step``; SSL-step state dicts and grads)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from eo_dinov3.hub import arch_config
from eo_dinov3.models.heads import DINOHead
from eo_dinov3.models.vision_transformer import DinoVisionTransformer
from eo_dinov3.ssl.param_groups import (
    apply_optim_scheduler,
    clean_param_name,
    fuse_params_groups,
    get_params_groups_with_decay,
)
from eo_dinov3.ssl.schedules import CosineScheduler, ScheduleSet, linear_warmup_cosine_decay, lr_scale_factor

FIX = Path(os.environ.get("EO_DINOV3_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "dinov3"))
requires_fixtures = pytest.mark.skipif(not FIX.is_dir(), reason=f"official DINOv3 fixtures not available at {FIX}")


@pytest.fixture(scope="module")
def scalars() -> dict:
    return json.loads((FIX / "scalars.json").read_text())


def _assert_samples(sched, ref: dict) -> None:
    for it, value in zip(ref["at"], ref["values"]):
        assert float(sched[it]) == pytest.approx(value, rel=1e-13, abs=1e-18), it


# ---------------------------------------------------------------- schedules
@requires_fixtures
def test_v1_cosine_scheduler_matches_official(scalars):
    s = scalars["schedules"]
    _assert_samples(CosineScheduler(1e-3, 1e-6, 1000, warmup_iters=100, start_warmup_value=0), s["v1.lr"])
    _assert_samples(CosineScheduler(0.04, 0.4, 1000), s["v1.wd"])
    _assert_samples(CosineScheduler(0.992, 1.0, 1000), s["v1.momentum"])
    _assert_samples(CosineScheduler(0.07, 0.07, 300, warmup_iters=300, start_warmup_value=0.04), s["v1.teacher_temp"])
    with pytest.raises(ValueError):
        CosineScheduler(1.0, 0.0, 10, warmup_iters=11)


V2_KEYS = ["v2.lr_pretrain_unscaled", "v2.teacher_temp", "v2.gram_weight", "v2.lr_high_res_unscaled"]


@requires_fixtures
@pytest.mark.parametrize("key", V2_KEYS)
def test_v2_linear_warmup_cosine_decay_matches_official(scalars, key):
    ref = scalars["schedules"][key]
    arr = linear_warmup_cosine_decay(**ref["args"])
    assert arr.dtype == np.float64 and len(arr) == ref["length"]
    _assert_samples(arr, ref)


def test_cosine_trunc_extra_ends_at_final_value():
    s = CosineScheduler(1.0, 0.1, 100, warmup_iters=10, trunc_extra=0.25)
    assert s.schedule[10] == pytest.approx(1.0) and s.schedule[-1] == pytest.approx(0.1)
    assert np.all(np.diff(s.schedule[10:]) < 0)


@requires_fixtures
def test_schedule_set_v1_from_config(scalars):
    cfg = {
        "train": {"OFFICIAL_EPOCH_LENGTH": 10, "batch_size_per_gpu": 64},
        "optim": {"epochs": 100, "warmup_epochs": 10, "lr": 1e-3, "min_lr": 1e-6, "scaling_rule": None},
        "teacher": {"warmup_teacher_temp_epochs": 30},
    }
    ss = ScheduleSet.from_config(cfg)
    s = scalars["schedules"]
    assert ss.version == "v1" and ss.total_iterations == 1000
    for name in ["lr", "wd", "momentum", "teacher_temp"]:
        key = f"v1.{name}"
        for it, value in zip(s[key]["at"], s[key]["values"]):
            assert ss[it][name] == pytest.approx(value, rel=1e-13, abs=1e-18), (name, it)
    # last layer frozen for freeze_last_layer_epochs (default 1) = 10 iterations, then the lr schedule
    assert [ss[it]["last_layer_lr"] for it in range(10)] == [0.0] * 10
    assert ss[10]["last_layer_lr"] == ss[10]["lr"] > 0
    # lr scaling applies to the base lr only (min_lr unscaled)
    scaled = ScheduleSet.from_config({**cfg, "optim": {**cfg["optim"], "scaling_rule": "sqrt_wrt_1024"}}, world_size=32)
    assert scaled[100]["lr"] == pytest.approx(1e-3 * 4 * math.sqrt(64 * 32 / 1024))
    assert scaled[1000]["lr"] == pytest.approx(1e-6)


@requires_fixtures
def test_schedule_set_v2_from_config(scalars):
    ep = 10
    sch = {
        "lr": {"start": 0, "peak": 5e-5, "end": 5e-5, "warmup_epochs": 100, "freeze_last_layer_epochs": 5},
        "weight_decay": {"start": 0.04, "peak": 0.04, "end": 0.04, "warmup_epochs": 0},
        "teacher_temp": {"start": 0.04, "peak": 0.07, "end": 0.07, "warmup_epochs": 100},
        "momentum": {"start": 0.994, "peak": 0.994, "end": 0.994, "warmup_epochs": 0},
    }
    cfg = {
        "train": {"OFFICIAL_EPOCH_LENGTH": ep, "batch_size_per_gpu": 16},
        "optim": {"epochs": 1000, "scaling_rule": None},
        "schedules": sch,
    }
    ss = ScheduleSet.from_config(cfg)
    s = scalars["schedules"]
    assert ss.version == "v2" and len(ss.lr) == s["v2.lr_pretrain_unscaled"]["length"]
    _assert_samples(ss.lr, s["v2.lr_pretrain_unscaled"])
    _assert_samples(ss.teacher_temp, s["v2.teacher_temp"])
    assert ss[49]["last_layer_lr"] == 0.0 and ss[50]["last_layer_lr"] == ss[50]["lr"] > 0
    assert ss[5000]["wd"] == pytest.approx(0.04) and ss[5000]["momentum"] == pytest.approx(0.994)
    assert ss[10**6]["lr"] == pytest.approx(5e-5)  # past the end: the final value
    # 7B pretrain launch: 16 images x 256 GPUs, sqrt_wrt_1024 -> x8 on peak and end (start unscaled)
    cfg_scaled = {**cfg, "optim": {"epochs": 1000, "scaling_rule": "sqrt_wrt_1024"}}
    scaled = ScheduleSet.from_config(cfg_scaled, world_size=256)
    assert scaled[0]["lr"] == 0.0 and scaled[5000]["lr"] == pytest.approx(4e-4)
    assert lr_scale_factor("linear_wrt_256", 2048) == 8.0 and lr_scale_factor("none", 2048) == 1.0


# ---------------------------------------------------------------- parameter groups
def _vit_small() -> DinoVisionTransformer:
    # official training vit_small: D 384, depth 12, 6 heads, MLP ratio 4; the fixture's key list (storage_tokens,
    # ls*.gamma, local_cls_norm) implies 4 storage tokens, LayerScale and untied local CLS norm
    cfg = arch_config("dinov3_vits16", untie_global_and_local_cls_norm=True)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.ffn_ratio, cfg.n_storage_tokens) == (384, 12, 6, 4.0, 4)
    return DinoVisionTransformer(cfg, device="meta")


@requires_fixtures
@pytest.mark.parametrize("decay", ["0.9", "0.98", "0.99"])
def test_vit_small_layerwise_multipliers_match_official(scalars, decay):
    ref = scalars["param_groups"][f"vit_small_decay{decay}"]
    groups = get_params_groups_with_decay(_vit_small(), lr_decay_rate=float(decay), patch_embed_lr_mult=0.2)
    assert [g["name"] for g in groups] == [r["name"] for r in ref]
    for g, r in zip(groups, ref):
        assert g["lr_multiplier"] == pytest.approx(r["lr_multiplier"], rel=1e-14), r["name"]
        assert g["wd_multiplier"] == r["wd_multiplier"], r["name"]
        assert g["is_last_layer"] == r["is_last_layer"], r["name"]
    by_name = {g["name"]: g for g in groups}
    d = float(decay)
    assert by_name["cls_token"]["lr_multiplier"] == pytest.approx(d**13)
    assert by_name["patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.2 * d**13)
    assert by_name["blocks.11.mlp.fc1.weight"]["lr_multiplier"] == pytest.approx(d)
    assert by_name["norm.weight"]["lr_multiplier"] == 1.0


@requires_fixtures
def test_dino_head_groups_match_official(scalars):
    ref = scalars["param_groups"]["dino_head"]
    groups = get_params_groups_with_decay(DINOHead(384, 256, 64, 32), lr_decay_rate=0.9, patch_embed_lr_mult=0.2)
    assert [(g["name"], g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups] == [
        (r["name"], r["lr_multiplier"], r["wd_multiplier"], r["is_last_layer"]) for r in ref
    ]


def test_clean_param_name_and_fuse():
    name = "_orig_mod.blocks.0._checkpoint_wrapped_module.attn.qkv.weight"
    assert clean_param_name(name) == "blocks.0.attn.qkv.weight"
    assert clean_param_name("module.parametrizations.last_layer.weight.original") == "last_layer.weight"
    head = DINOHead(8, 4, 8, 4)
    fused = fuse_params_groups(get_params_groups_with_decay(head))
    summary = [(len(g["params"]), g["wd_multiplier"], g["is_last_layer"]) for g in fused]
    assert summary == [(3, 1.0, False), (3, 0.0, False), (1, 1.0, True)]


def _ssl_step_student() -> dict[str, torch.nn.Module]:
    """The fixture SSL step's student sub-modules with their initial weights."""
    backbone = DinoVisionTransformer(
        embed_dim=64, depth=2, num_heads=2, ffn_ratio=4.0, patch_size=16, layerscale_init=1.0,
        norm_layer="layernormbf16", n_storage_tokens=4, mask_k_bias=True, untie_global_and_local_cls_norm=True,
    )  # fmt: skip
    modules = {"backbone": backbone, "dino_head": DINOHead(64, 128, 64, 32), "ibot_head": DINOHead(64, 96, 64, 32)}
    state = torch.load(FIX / "ssl_step_student_init_state_dict.pt", weights_only=True)
    for prefix, m in modules.items():
        sub_state = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        m.load_state_dict(sub_state, strict=True)
    return modules


@requires_fixtures
def test_apply_optim_scheduler_and_adamw_step_match_official_ssl_step(scalars):
    step = scalars["ssl_step"]
    hp = step["hparams"]
    modules = _ssl_step_student()
    per_param = []
    for sub, m in modules.items():
        groups = get_params_groups_with_decay(m, lr_decay_rate=0.9, patch_embed_lr_mult=0.2)
        per_param += [{**g, "name": f"{sub}.{g['name']}"} for g in groups]
    ref = {f"{r['submodule']}.{r['name']}": r for r in step["param_groups"]}
    assert [g["name"] for g in per_param] == list(ref)

    optimizer = torch.optim.AdamW(fuse_params_groups(per_param), betas=tuple(hp["adamw_betas"]), eps=hp["adamw_eps"])
    apply_optim_scheduler(optimizer, lr=hp["lr"], wd=hp["wd"], last_layer_lr=hp["last_layer_lr"])
    id_to_name = {id(g["params"]): g["name"] for g in per_param}
    for group in optimizer.param_groups:
        for p in group["params"]:
            r = ref[id_to_name[id(p)]]
            assert group["lr"] == pytest.approx(r["lr"], rel=1e-14)
            assert group["weight_decay"] == pytest.approx(r["weight_decay"], rel=1e-14)

    # optimiser fed with the reference (clipped) gradients -> the official after-step weights (README: atol 1e-7)
    grads = torch.load(FIX / "ssl_step_grads.pt", weights_only=True)
    for g in per_param:
        g["params"].grad = grads[f"after_clip.{g['name']}"].clone()
    optimizer.step()
    after = torch.load(FIX / "ssl_step_student_after_step_state_dict.pt", weights_only=True)
    worst = 0.0
    for g in per_param:
        worst = max(worst, (g["params"].detach() - after[g["name"]]).abs().max().item())
    assert worst <= 1e-7
