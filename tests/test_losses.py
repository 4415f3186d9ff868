"""DINO / iBOT / KoLeo / Gram losses and the DINO head against the official fixtures (shared/fixtures/dinov3),
plus a 2-process gloo run proving the Sinkhorn-Knopp and KoLeo all-reduces."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eo_dinov3.losses import (
    DINOLoss,
    GramLoss,
    KoLeoLoss,
    KoLeoLossDistributed,
    dino_loss_weights,
    iBOTPatchLoss,
    resize_gram_teacher_features,
    select_gram_tokens,
    sinkhorn_knopp,
)
from eo_dinov3.models.heads import DINOHead

FIX = Path(os.environ.get("EO_DINOV3_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "dinov3"))
requires_fixtures = pytest.mark.skipif(not FIX.is_dir(), reason=f"official DINOv3 fixtures not available at {FIX}")
TOL = dict(rtol=1e-6, atol=1e-7)  # fixture README: SK targets and fp32 losses


@pytest.fixture(scope="module")
def cases() -> dict[str, torch.Tensor]:
    return torch.load(FIX / "loss_cases.pt", weights_only=True)


@pytest.fixture(scope="module")
def scalars() -> dict:
    return json.loads((FIX / "scalars.json").read_text())


# ---------------------------------------------------------------- DINO
@requires_fixtures
def test_dino_sinkhorn_knopp_matches_official(cases):
    q = sinkhorn_knopp(cases["dino.teacher_logits"], teacher_temp=0.04, n_iterations=3)
    torch.testing.assert_close(q, cases["dino.sk_targets"], **TOL)
    torch.testing.assert_close(q.sum(-1), torch.ones(8), rtol=0, atol=1e-5)
    # a per-sample max subtraction is NOT equivalent (first row normalisation mixes samples)
    z = cases["dino.teacher_logits"]
    q_shifted = sinkhorn_knopp(z - z.max(dim=1, keepdim=True).values, 0.04)
    assert (q_shifted - q).abs().max() > 1e-4
    # a global constant shift is equivalent
    torch.testing.assert_close(sinkhorn_knopp(z - 0.5, 0.04), q, rtol=1e-5, atol=1e-6)


@requires_fixtures
def test_dino_loss_terms_match_official(cases, scalars):
    loss = DINOLoss(out_dim=32)
    targets = cases["dino.sk_targets"].unflatten(0, (2, 4))  # [n_g, B, K], crop-major
    local = loss(cases["dino.student_local_logits"], targets)
    glob = loss(cases["dino.student_global_logits"], targets, ignore_diagonal=True)
    glob_all = loss(list(cases["dino.student_global_logits"]), list(targets), ignore_diagonal=False)
    torch.testing.assert_close(local, cases["dino.loss_local"], **TOL)
    torch.testing.assert_close(glob, cases["dino.loss_global_ignore_diag"], **TOL)
    torch.testing.assert_close(glob_all, cases["dino.loss_global_all_pairs"], **TOL)
    assert local.item() == pytest.approx(scalars["losses"]["dino.loss_local"], rel=1e-6)
    assert local.dtype == torch.float32


@requires_fixtures
def test_dino_weights_reconstruct_official_total(scalars):
    assert dino_loss_weights(2, 8) == pytest.approx((16 / 18, 2 / 18))
    assert dino_loss_weights(2, 8, ignore_diagonal=False) == pytest.approx((16 / 20, 4 / 20))
    step = scalars["ssl_step"]
    w_local, w_global = dino_loss_weights(2, 2)  # the fixture step has 2 local crops
    ref_weights = step["loss_weights"]
    assert (w_local, w_global) == pytest.approx((ref_weights["dino_local"], ref_weights["dino_global"]))
    t = step["loss_terms"]
    total = (
        w_local * t["dino_local_crops_loss"]
        + w_global * t["dino_global_crops_loss"]
        + 0.1 * 2 * t["koleo_loss"]
        + t["ibot_loss"]
        + t["gram_loss"]
    )
    assert total == pytest.approx(t["total"], rel=1e-6)


@requires_fixtures
def test_dino_softmax_centering_matches_official(cases):
    loss = DINOLoss(out_dim=32)
    z = cases["dino.teacher_logits"]
    torch.testing.assert_close(loss.softmax_center_teacher(z, 0.04), cases["dino.softmax_center.first_call"], **TOL)
    loss.update_center(z)
    torch.testing.assert_close(loss.center, torch.zeros(1, 32))  # lazy: applied on the next call
    second = loss.softmax_center_teacher(z, 0.04)
    torch.testing.assert_close(loss.center, cases["dino.softmax_center.center_after_update"], **TOL)
    torch.testing.assert_close(second, cases["dino.softmax_center.second_call"], **TOL)


# ---------------------------------------------------------------- iBOT
@requires_fixtures
def test_ibot_sinkhorn_and_masked_loss_match_official(cases):
    loss = iBOTPatchLoss(patch_out_dim=24)
    n_masked = torch.tensor([11])
    q = loss.sinkhorn_knopp_teacher(cases["ibot.teacher_logits"], 0.04, n_masked)
    assert n_masked.item() == 11  # the caller's tensor is not modified
    torch.testing.assert_close(q, cases["ibot.sk_targets"], **TOL)
    masks = cases["ibot.masks"]
    assert torch.equal(masks.flatten().nonzero().flatten(), cases["ibot.mask_indices"])
    value = loss.forward_masked(
        cases["ibot.student_logits"], q, masks, n_masked_patches=11, masks_weight=cases["ibot.masks_weight"]
    )
    torch.testing.assert_close(value, cases["ibot.forward_masked"], **TOL)
    # weights rebuilt from the masks when not given; padded rows beyond n_masked_patches are ignored
    s_pad = torch.cat([cases["ibot.student_logits"], torch.randn(3, 24)])
    q_pad = torch.cat([q, torch.softmax(torch.randn(3, 24), -1)])
    value_pad = loss.forward_masked(s_pad, q_pad, masks, n_masked_patches=11)
    torch.testing.assert_close(value_pad, cases["ibot.forward_masked"], **TOL)
    dense = loss(cases["ibot.dense.student_logits"], cases["ibot.dense.teacher_probs"], masks)
    torch.testing.assert_close(dense, cases["ibot.forward_dense"], **TOL)


# ---------------------------------------------------------------- KoLeo
@requires_fixtures
def test_koleo_matches_official(cases):
    x = cases["koleo.input"]
    torch.testing.assert_close(KoLeoLoss()(x), cases["koleo"], **TOL)
    torch.testing.assert_close(KoLeoLossDistributed(topk=1)(x), cases["koleo_distributed_world1_topk1"], **TOL)
    torch.testing.assert_close(KoLeoLossDistributed(topk=2)(x), cases["koleo_distributed_world1_topk2"], **TOL)
    dup = KoLeoLoss()(cases["koleo.input_with_duplicate"])
    torch.testing.assert_close(dup, cases["koleo_with_duplicate"], rtol=1e-5, atol=1e-7)
    # loss groups equal to the local batch on one process: the plain loss per group
    torch.testing.assert_close(KoLeoLossDistributed(topk=1, loss_group_size=16)(x), cases["koleo"], **TOL)
    with pytest.raises(ValueError):
        KoLeoLossDistributed(loss_group_size=12)(x)


def test_koleo_upcasts_bf16_inputs():
    x = torch.randn(16, 32).bfloat16()
    out = KoLeoLoss()(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, KoLeoLoss()(x.float()), rtol=0, atol=0)


def test_koleo_gradient_flows():
    x = torch.randn(8, 16, requires_grad=True)
    KoLeoLoss()(x).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ---------------------------------------------------------------- Gram
GRAM_CASES = [
    ("normalized", dict(apply_norm=True)),
    ("normalized.remove_neg", dict(apply_norm=True, remove_neg=True)),
    ("normalized.remove_only_teacher_neg", dict(apply_norm=True, remove_only_teacher_neg=True)),
    ("unnormalized", dict(apply_norm=False)),
]


@requires_fixtures
@pytest.mark.parametrize("name,kwargs", GRAM_CASES, ids=[c[0] for c in GRAM_CASES])
@pytest.mark.parametrize("img_level", [True, False], ids=["img_level", "batch_level"])
def test_gram_loss_matches_official(cases, name, kwargs, img_level):
    loss = GramLoss(**kwargs)
    value = loss(cases["gram.student_feats"], cases["gram.teacher_feats"], img_level=img_level)
    torch.testing.assert_close(value, cases[f"gram.{name}.{'img_level' if img_level else 'batch_level'}"], **TOL)


@requires_fixtures
def test_gram_remove_only_teacher_neg_clamps_only_the_teacher(cases):
    s, t = cases["gram.student_feats"], cases["gram.teacher_feats"]
    # "as coded": zeroing the student where both are negative (before clamping the teacher) would give another value
    gs = torch.nn.functional.normalize(s, dim=-1) @ torch.nn.functional.normalize(s, dim=-1).transpose(1, 2)
    gt = torch.nn.functional.normalize(t, dim=-1) @ torch.nn.functional.normalize(t, dim=-1).transpose(1, 2)
    both_neg = (gs < 0) & (gt < 0)
    alt = torch.nn.functional.mse_loss(gs.masked_fill(both_neg, 0), gt.clamp(min=0))
    assert both_neg.any() and abs(alt.item() - cases["gram.normalized.remove_only_teacher_neg.img_level"].item()) > 1e-4
    with pytest.raises(ValueError):
        GramLoss(remove_neg=True, remove_only_teacher_neg=True)


@requires_fixtures
def test_gram_high_res_teacher_resize_matches_official(cases):
    out = resize_gram_teacher_features(cases["gram_hr.teacher_8x8"], 4)
    torch.testing.assert_close(out, cases["gram_hr.downsampled_4x4"], **TOL)
    same = cases["gram_hr.teacher_8x8"]
    assert resize_gram_teacher_features(same, (8, 8)) is same
    rect = resize_gram_teacher_features(torch.randn(2, 6 * 4, 16), (3, 2), source_grid=(6, 4))
    assert rect.shape == (2, 6, 16)


def test_gram_token_selection():
    s, t = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    masks = torch.zeros(3, 5, dtype=torch.bool)
    masks[0, 1] = masks[2, 4] = True
    assert select_gram_tokens(s, t, masks, "all")[0] is s
    sm, tm = select_gram_tokens(s, t, masks, "masked")
    assert torch.equal(sm, torch.stack([s[0, 1], s[2, 4]])) and torch.equal(tm, torch.stack([t[0, 1], t[2, 4]]))
    su, _ = select_gram_tokens(s, t, masks, "unmasked")
    assert su.shape == (13, 4)
    with pytest.raises(ValueError):
        select_gram_tokens(s, t, masks, "some")


# ---------------------------------------------------------------- DINOHead
@requires_fixtures
def test_dino_head_matches_official(cases):
    state = torch.load(FIX / "dino_head_tiny_state_dict.pt", weights_only=True)
    head = DINOHead(in_dim=16, out_dim=10, hidden_dim=12, bottleneck_dim=8, nlayers=3)
    head.load_state_dict(state, strict=True)
    assert sorted(head.state_dict()) == sorted(state)
    with torch.no_grad():
        out = head(cases["dino_head.input"])
        bottleneck = head(cases["dino_head.input"], no_last_layer=True)
        torch.testing.assert_close(out, cases["dino_head.output"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bottleneck, cases["dino_head.output_no_last_layer"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bottleneck.norm(dim=-1), torch.ones(5))
        torch.testing.assert_close(head(bottleneck, only_last_layer=True), out)


@requires_fixtures
def test_dino_head_init_reproduces_official_weights():
    state = torch.load(FIX / "dino_head_tiny_state_dict.pt", weights_only=True)
    torch.manual_seed(12)
    head = DINOHead(in_dim=16, out_dim=10, hidden_dim=12, bottleneck_dim=8, nlayers=3)
    head.init_weights()
    for k, v in head.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


# ---------------------------------------------------------------- 2-process gloo
def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str, z, zi, kx) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        res: dict[str, torch.Tensor] = {}
        # DINO SK: samples split 4/4 across the two ranks
        res["dino_sk"] = sinkhorn_knopp(z.chunk(world)[rank], 0.04)
        # iBOT SK: masked tokens split 5/6, each rank passes its own count
        parts = zi.split([5, 6])
        res["ibot_sk"] = iBOTPatchLoss(24).sinkhorn_knopp_teacher(parts[rank], 0.04, torch.tensor([len(parts[rank])]))
        # softmax-centering centre: all-reduced mean over both ranks' samples
        dl = DINOLoss(32)
        dl.update_center(z.chunk(world)[rank])
        dl.apply_center_update()
        res["center"] = dl.center.clone()
        # KoLeo over the global batch (16 = 8 per rank), gradients through the all-gather
        x = kx.chunk(world)[rank].clone().requires_grad_(True)
        loss = KoLeoLossDistributed(topk=1)(x)
        loss.backward()
        res["koleo_global"] = loss.detach()
        res["koleo_global_grad"] = x.grad.clone()
        # KoLeo with groups of the local batch: the plain loss on this rank's samples
        res["koleo_local_group"] = KoLeoLossDistributed(topk=1, loss_group_size=8)(kx.chunk(world)[rank]).detach()
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@requires_fixtures
def test_two_process_gloo_all_reduces(cases, tmp_path):
    z, zi, kx = cases["dino.teacher_logits"], cases["ibot.teacher_logits"], cases["koleo.input"]
    world = 2
    mp.spawn(
        _distributed_worker, args=(world, str(tmp_path / "pg_init"), str(tmp_path), z, zi, kx), nprocs=world, join=True
    )
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(world)]
    atol = dict(rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cat([r[0]["dino_sk"], r[1]["dino_sk"]]), sinkhorn_knopp(z, 0.04), **atol)
    torch.testing.assert_close(torch.cat([r[0]["dino_sk"], r[1]["dino_sk"]]), cases["dino.sk_targets"], **atol)
    single_ibot = iBOTPatchLoss(24).sinkhorn_knopp_teacher(zi, 0.04, torch.tensor([11]))
    torch.testing.assert_close(torch.cat([r[0]["ibot_sk"], r[1]["ibot_sk"]]), single_ibot, **atol)
    dl = DINOLoss(32)
    dl.update_center(z)
    dl.apply_center_update()
    for i in range(world):
        torch.testing.assert_close(r[i]["center"], dl.center, **atol)
    # KoLeo: mean over ranks of the per-rank losses = single-process loss on the whole batch
    torch.testing.assert_close((r[0]["koleo_global"] + r[1]["koleo_global"]) / 2, cases["koleo"], **atol)
    # gradient through the all-gather: rank r receives d(Σ_ranks loss)/dx_r = world · d(loss_whole)/dx_r
    x = kx.clone().requires_grad_(True)
    KoLeoLoss()(x).backward()
    grads = torch.cat([r[0]["koleo_global_grad"], r[1]["koleo_global_grad"]])
    torch.testing.assert_close(grads, world * x.grad, rtol=1e-5, atol=1e-6)
    for i in range(world):
        torch.testing.assert_close(r[i]["koleo_local_group"], KoLeoLoss()(kx.chunk(world)[i]), **atol)
