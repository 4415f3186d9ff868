"""One full SSL training step against the official SSLMetaArch step (shared/fixtures/dinov3, section d)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from eo_dinov3.ssl.meta_arch import SSLMetaArch
from eo_dinov3.ssl.param_groups import apply_optim_scheduler, fuse_params_groups
from tests.conftest import FIXTURES, requires_fixtures

pytestmark = requires_fixtures


def _official_cfg() -> dict:
    cfg = yaml.safe_load((FIXTURES / "ssl_step_config.yaml").read_text())
    arch = json.loads((FIXTURES / "scalars.json").read_text())["ssl_step"]["arch"]
    cfg["student"]["arch"] = "custom"
    cfg["student"]["arch_overrides"] = {k: arch[k] for k in ("embed_dim", "depth", "num_heads", "ffn_ratio")}
    cfg["student"]["pos_embed_rope_dtype"] = "fp32"  # the fixture patched RoPE to fp32
    return cfg


@pytest.fixture(scope="module")
def step():
    torch.manual_seed(0)
    scal = json.loads((FIXTURES / "scalars.json").read_text())["ssl_step"]
    hp = scal["hparams"]
    model = SSLMetaArch(_official_cfg())
    init = torch.load(FIXTURES / "ssl_step_student_init_state_dict.pt", weights_only=True)
    model.student.load_state_dict(init, strict=True)
    model.teacher.load_state_dict(init, strict=True)
    model.gram_teacher["backbone"].load_state_dict(
        {k.removeprefix("backbone."): v for k, v in init.items() if k.startswith("backbone.")}, strict=True
    )
    model.train()
    batch = torch.load(FIXTURES / "ssl_step_batch.pt", weights_only=True)
    total, outputs = model.forward_backward(batch, teacher_temp=hp["teacher_temp"], iteration=hp["iteration"])
    grads_before = {f"{n}.{k}": p.grad.clone() for n in ("backbone", "dino_head", "ibot_head")
                    for k, p in model.student[n].named_parameters()}
    norms = model.clip_gradients(hp["clip_grad"])
    groups = fuse_params_groups(model.get_params_groups(layerwise_decay=0.9, patch_embed_lr_mult=0.2))
    opt = torch.optim.AdamW(groups, betas=tuple(hp["adamw_betas"]), eps=hp["adamw_eps"])
    apply_optim_scheduler(opt, lr=hp["lr"], wd=hp["wd"], last_layer_lr=hp["last_layer_lr"])
    grads_after = {f"{n}.{k}": p.grad.clone() for n in ("backbone", "dino_head", "ibot_head")
                   for k, p in model.student[n].named_parameters()}
    opt.step()
    model.update_ema(hp["ema_momentum"])
    return dict(model=model, total=total, outputs=outputs, norms=norms, grads_before=grads_before,
                grads_after=grads_after, scal=scal)


def test_loss_terms_match(step):
    ref = torch.load(FIXTURES / "ssl_step_outputs.pt", weights_only=True)
    losses = step["outputs"]["losses"]
    for k in ["dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "gram_loss", "total"]:
        torch.testing.assert_close(losses[k], ref[f"loss.{k}"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["koleo_per_crop"], ref["loss.koleo_per_crop"], rtol=1e-5, atol=1e-6)
    assert abs(step["total"].item() - step["scal"]["loss_terms"]["total"]) < 1e-5


def test_intermediates_match(step):
    ref = torch.load(FIXTURES / "ssl_step_outputs.pt", weights_only=True)
    o = step["outputs"]
    tol = dict(rtol=1e-5, atol=1e-6)
    for k in ["cls_pre_head", "reg_pre_head", "patch_pre_head", "cls_after_head", "masked_patch_after_head"]:
        torch.testing.assert_close(o["teacher"][k], ref[f"teacher.{k}"], **tol)
    for k in ["cls_centered", "masked_patch_centered"]:
        torch.testing.assert_close(o["teacher"][k], ref[f"teacher.{k}"], rtol=1e-5, atol=1e-7)
    for k in ["cls_pre_head", "reg_pre_head", "patch_pre_head", "cls_after_head", "masked_patch_after_head",
              "masked_patch_pre_head"]:
        torch.testing.assert_close(o["student_global"][k], ref[f"student_global.{k}"], **tol)
    for k in ["cls_pre_head", "reg_pre_head", "patch_pre_head", "cls_after_head"]:
        torch.testing.assert_close(o["student_local"][k], ref[f"student_local.{k}"], **tol)
    torch.testing.assert_close(o["gram_targets"], ref["gram.teacher_patches"], **tol)


def test_grad_norms_and_gradients_match(step):
    ref = torch.load(FIXTURES / "ssl_step_outputs.pt", weights_only=True)
    for name, value in step["norms"].items():
        torch.testing.assert_close(value, ref[f"grad_norm_before_clip.{name}"], rtol=1e-5, atol=1e-6)
    grads = torch.load(FIXTURES / "ssl_step_grads.pt", weights_only=True)
    assert len(grads) == 2 * len(step["grads_before"])
    for k, g in step["grads_before"].items():
        torch.testing.assert_close(g, grads[f"before_clip.{k}"], rtol=1e-4, atol=1e-7)
    for k, g in step["grads_after"].items():
        torch.testing.assert_close(g, grads[f"after_clip.{k}"], rtol=1e-4, atol=1e-7)


def test_after_step_and_after_ema_weights_match(step):
    grads = torch.load(FIXTURES / "ssl_step_grads.pt", weights_only=True)
    after = torch.load(FIXTURES / "ssl_step_student_after_step_state_dict.pt", weights_only=True)
    ema = torch.load(FIXTURES / "ssl_step_teacher_after_ema_state_dict.pt", weights_only=True)
    student = step["model"].student.state_dict()
    teacher = step["model"].teacher.state_dict()
    for k, ref in after.items():
        g = grads.get(f"after_clip.{k}")
        sel = (g.abs() >= 1e-6) if g is not None else torch.ones_like(ref, dtype=torch.bool)
        torch.testing.assert_close(student[k][sel], ref[sel], rtol=1e-5, atol=2e-6, msg=k)
    for k, ref in ema.items():
        g = grads.get(f"after_clip.{k}")
        sel = (g.abs() >= 1e-6) if g is not None else torch.ones_like(ref, dtype=torch.bool)
        torch.testing.assert_close(teacher[k][sel], ref[sel], rtol=1e-5, atol=1e-6, msg=k)


def test_optimizer_alone_with_reference_gradients():
    """AdamW + per-parameter groups fed the official clipped gradients reproduce the after-step weights to 1e-7."""
    hp = json.loads((FIXTURES / "scalars.json").read_text())["ssl_step"]["hparams"]
    model = SSLMetaArch(_official_cfg())
    model.student.load_state_dict(torch.load(FIXTURES / "ssl_step_student_init_state_dict.pt", weights_only=True))
    grads = torch.load(FIXTURES / "ssl_step_grads.pt", weights_only=True)
    for n in ("backbone", "dino_head", "ibot_head"):
        for k, p in model.student[n].named_parameters():
            p.grad = grads[f"after_clip.{n}.{k}"].clone()
    groups = fuse_params_groups(model.get_params_groups(layerwise_decay=0.9, patch_embed_lr_mult=0.2))
    opt = torch.optim.AdamW(groups, betas=tuple(hp["adamw_betas"]), eps=hp["adamw_eps"])
    apply_optim_scheduler(opt, lr=hp["lr"], wd=hp["wd"], last_layer_lr=hp["last_layer_lr"])
    opt.step()
    after = torch.load(FIXTURES / "ssl_step_student_after_step_state_dict.pt", weights_only=True)
    for k, v in model.student.state_dict().items():
        torch.testing.assert_close(v, after[k], rtol=0, atol=1e-7, msg=k)


def test_param_group_multipliers_match_official(step):
    ref = {(g["submodule"], g["name"]): g for g in step["scal"]["param_groups"]}
    ours = {}
    for sub in ("backbone", "dino_head", "ibot_head"):
        from eo_dinov3.ssl.param_groups import get_params_groups_with_decay

        for g in get_params_groups_with_decay(step["model"].student[sub], 0.9, 0.2):
            ours[(sub, g["name"])] = g
    assert set(ours) == set(ref)
    for key, g in ref.items():
        assert ours[key]["lr_multiplier"] == pytest.approx(g["lr_multiplier"], rel=1e-12), key
        assert ours[key]["wd_multiplier"] == g["wd_multiplier"], key
        assert ours[key]["is_last_layer"] == g["is_last_layer"], key
