"""Multi-student distillation: one frozen teacher (a tiny ViT from a real pretraining run folder), a ViT and a
ConvNeXt student trained together on the sample tiles; teacher forward once per step, unmasked students, exports
loadable through the hub loaders, and the torchrun rank-group path (2 gloo processes) reproducing the
single-process losses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from eo_dinov3.errors import ConfigError
from eo_dinov3.models.convnext import ConvNeXt, load_convnext
from eo_dinov3.models.vision_transformer import DinoVisionTransformer
from eo_dinov3.ssl.distill import DistillRun, load_distill_config, resolve_teacher_path

STEPS = 3
STUDENTS = ("[{name: vit, student: {arch: custom, arch_overrides: {embed_dim: 24, depth: 2, num_heads: 2}}}, "
            "{name: cnx, student: {arch: convnext, arch_overrides: {depths: [1, 1, 1, 1], dims: [8, 16, 24, 32]}}, "
            "optim: {layerwise_decay: 1.0}}]")


@pytest.fixture(scope="module")
def tiles_dir():
    from eo_dinov3.data.samples import fetch_samples, sample_path

    fetch_samples(progress=False)
    return sample_path("tiles").parent


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, tiles_dir):
    """A real (tiny) pretraining run folder: 2 steps of the pretraining loop, teacher exported."""
    from eo_dinov3.ssl.config import load_config
    from eo_dinov3.ssl.trainer import train
    from tests.test_pretrain_loop import tiny_overrides

    out = tmp_path_factory.mktemp("teacher_run")
    train(load_config(None, tiny_overrides(out, tiles_dir, iters=2)), progress=False)
    return out


def _overrides(teacher: Path, out: Path, tiles: Path, extra=()) -> list[str]:
    return [
        f"distill.teacher={teacher}", f"distill.output_dir={out}", f"distill.students={STUDENTS}",
        "run.device=cpu", "crops.global_crops_size=64", "crops.local_crops_size=32", "crops.local_crops_number=2",
        "train.batch_size_per_gpu=4", "train.OFFICIAL_EPOCH_LENGTH=4", "train.num_workers=0", "optim.epochs=2",
        "optim.warmup_epochs=0", "optim.scaling_rule=null", f"train.max_iterations={STEPS}",
        "checkpointing.period=100", "checkpointing.resume=never", "data.kind=folder", f"data.path={tiles}",
        *extra,
    ]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, teacher_run, tiles_dir):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("distill")
    run = DistillRun(load_distill_config(None, _overrides(teacher_run, out, tiles_dir)), progress=False)
    calls = {"teacher": 0, "masks": []}
    run.teacher.teacher["backbone"].register_forward_hook(lambda *a: calls.__setitem__("teacher", calls["teacher"] + 1))
    for s in run.students:
        s.student["backbone"].register_forward_pre_hook(
            lambda m, args, kwargs: calls["masks"].append(kwargs.get("masks")), with_kwargs=True)
    teacher_before = {k: v.clone() for k, v in run.teacher.state_dict().items()}
    init = {s.name: {k: v.clone() for k, v in s.student.state_dict().items()} for s in run.students}
    result = run.run()
    return run, result, calls, teacher_before, init


def test_teacher_forward_once_per_step_and_students_unmasked(single_run):
    run, result, calls, teacher_before, _ = single_run
    assert calls["teacher"] == STEPS == result.teacher_forwards
    assert len(calls["masks"]) == 2 * STEPS  # one list forward per student per step
    assert all(m == [None, None] for m in calls["masks"])  # global crops not masked (official distillation)
    after = run.teacher.state_dict()
    assert all(torch.equal(after[k], v) for k, v in teacher_before.items())  # frozen
    assert run.teacher.heads_from_checkpoint
    assert not any(p.requires_grad for p in run.teacher.parameters())


def test_both_students_learn_with_the_teachers_head_sizes(single_run):
    run, result, _, _, init = single_run
    sizes = run.teacher.head_sizes()
    assert {s.name for s in run.students} == {"vit", "cnx"}
    assert isinstance(run.students[1].student["backbone"], ConvNeXt)
    for s in run.students:
        for head, key in (("dino_head", "dino"), ("ibot_head", "ibot")):
            h = s.student[head]
            assert h.last_layer.weight.shape == (sizes[key]["head_n_prototypes"], sizes[key]["head_bottleneck_dim"])
        losses = result.losses[s.name]
        assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
        assert losses[-1] != losses[0]
        moved = [k for k, v in s.student.state_dict().items() if not torch.equal(v, init[s.name][k])]
        assert any(k.startswith("backbone.") for k in moved) and any(k.startswith("ibot_head.") for k in moved)
        recs = [json.loads(x) for x in (Path(s.cfg.run.output_dir) / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in recs] == list(range(STEPS))
        assert {"loss/dino_local_crops_loss", "loss/dino_global_crops_loss", "loss/koleo_loss",
                "loss/ibot_loss"} <= set(recs[0])
        assert all(r["loss/ibot_loss"] > 0 for r in recs)


def test_exports_load_through_hub_loaders(single_run):
    from eo_dinov3.checkpoints import load_backbone

    run, result, _, _, _ = single_run
    vit, cnx = run.students
    m = load_backbone(result.exports["vit"])
    assert isinstance(m, DinoVisionTransformer)
    ema = vit.model_ema["backbone"].state_dict()
    assert all(torch.equal(m.state_dict()[k], v) for k, v in ema.items())
    c = load_convnext(result.exports["cnx"])
    assert isinstance(c, ConvNeXt) and c.config.dims == [8, 16, 24, 32]
    ema = cnx.model_ema["backbone"].state_dict()
    assert all(torch.equal(c.state_dict()[k], v) for k, v in ema.items())
    # the EMA (exported) differs from the student after a few steps with momentum < 1
    assert any(not torch.equal(v, cnx.student["backbone"].state_dict()[k]) for k, v in ema.items())
    x = torch.randn(1, 3, 64, 64)
    assert c(x).shape == (1, 32) and m(x).shape == (1, 24)
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert set(summary["students"]) == {"vit", "cnx"}


def test_config_errors(tmp_path, teacher_run, tiles_dir):
    bad = _overrides(teacher_run, tmp_path, tiles_dir, ["distill.students=[{name: a, student: {archh: custom}}]"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_distill_config(None, bad)
    bad = _overrides(teacher_run, tmp_path, tiles_dir,
                     ["distill.students=[{name: a, schedules: {teacher_temp: {start: 0.1}}}]"])
    with pytest.raises(ConfigError, match="teacher temperature"):
        load_distill_config(None, bad)
    with pytest.raises(ConfigError, match="pretrain.py"):
        resolve_teacher_path(tmp_path / "runs" / "demo_cpu")
    assert resolve_teacher_path(teacher_run).name == "teacher_checkpoint.pth"


def _worker(rank: int, world: int, init_file: str, args: list[str], out: str) -> None:
    import torch.distributed as dist

    from eo_dinov3.ssl.distributed import DistInfo

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        run = DistillRun(load_distill_config(None, args), dist_info=DistInfo(rank=rank, world_size=world),
                         progress=False)
        result = run.run()
        Path(out, f"rank{rank}.json").write_text(json.dumps({"losses": result.losses,
                                                             "teacher_forwards": result.teacher_forwards}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_rank_groups_two_processes_match_single_process(tmp_path, single_run, teacher_run, tiles_dir):
    """torchrun path: student ``vit`` on rank 0 (computes the teacher), ``cnx`` on rank 1 (receives the targets by
    broadcast). Same data, same targets, same seeds → the same per-step losses as the single-process run."""
    _, single, _, _, _ = single_run
    students = STUDENTS.replace("{name: vit,", "{name: vit, ranks: [0, 1],").replace("{name: cnx,",
                                                                                     "{name: cnx, ranks: [1, 2],")
    args = _overrides(teacher_run, tmp_path / "out", tiles_dir, [f"distill.students={students}"])
    env_before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        mp.start_processes(_worker, args=(2, str(tmp_path / "init"), args, str(tmp_path)), nprocs=2, join=True,
                           start_method="spawn")
    finally:
        if env_before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_before
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["teacher_forwards"] == STEPS and r1["teacher_forwards"] == 0  # teacher only on the first group
    torch.testing.assert_close(torch.tensor(r0["losses"]["vit"]), torch.tensor(single.losses["vit"]),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(r1["losses"]["cnx"]), torch.tensor(single.losses["cnx"]),
                               rtol=1e-5, atol=1e-5)


def test_teacher_sources(teacher_run):
    """Our ckpt/<it>.pt and the official-format teacher export give the same teacher (heads included); a bare
    backbone file gets fresh heads of the configured sizes."""
    from eo_dinov3.ssl.distill import build_teacher

    cfg = load_distill_config(None, ["distill.students=[{name: a}]", "dino.head_n_prototypes=32",
                                     "dino.head_hidden_dim=16", "dino.head_bottleneck_dim=8"]).base
    from_ckpt = build_teacher(teacher_run / "ckpt" / "2.pt", cfg)
    from_export = build_teacher(teacher_run, cfg)
    a, b = from_ckpt.state_dict(), from_export.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert from_ckpt.heads_from_checkpoint and from_ckpt.head_sizes()["dino"]["head_n_prototypes"] == 64
    bare = build_teacher(teacher_run / "eval" / "training_2" / "teacher_backbone.pth", cfg)
    assert not bare.heads_from_checkpoint
    assert bare.head_sizes()["dino"] == {"head_n_prototypes": 32, "head_hidden_dim": 16, "head_bottleneck_dim": 8,
                                         "head_nlayers": 3}
    bb = bare.state_dict()
    assert all(torch.equal(bb[k], v) for k, v in a.items() if k.startswith("teacher.backbone."))
