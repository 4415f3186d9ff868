"""The pretrain -> gram -> hires workflow: phase chaining, Gram teacher refresh, mixed resolutions, dense probe."""

from __future__ import annotations

import json

import torch

from eo_dinov3.checkpoints import load_backbone
from eo_dinov3.ssl.config import load_config
from eo_dinov3.ssl.data import resolution_choice
from eo_dinov3.ssl.trainer import Trainer
from tests.test_pretrain_loop import tiny_overrides


def test_resolution_choice_is_rank_consistent_and_follows_probabilities():
    probs = [0.3, 0.3, 0.3, 0.05, 0.05]
    picks = [resolution_choice(7, step, probs) for step in range(4000)]
    assert picks == [resolution_choice(7, step, probs) for step in range(4000)]  # pure function of (seed, step)
    freq = torch.bincount(torch.tensor(picks), minlength=5).float() / len(picks)
    for f, p in zip(freq.tolist(), probs):
        assert abs(f - p) < 4 * (p * (1 - p) / len(picks)) ** 0.5 + 1e-9
    assert resolution_choice(7, 3, [1.0]) == 0


def test_gram_then_hires_phases_chain_and_visit_several_resolutions(tmp_path, tiles_dir):
    base = tiny_overrides(tmp_path / "pre", tiles_dir, iters=2)
    Trainer(load_config(None, base), progress=False).run()

    gram = load_config(None, tiny_overrides(tmp_path / "gram", tiles_dir, iters=4, extra=[
        f"phase.init_from={tmp_path / 'pre'}", "phase.name=gram", "gram.use_loss=true", "gram.loss_weight=2.0",
        "gram.rep_update=true", "gram.update_frequency=2", "gram.max_updates=1", "crops.gram_teacher_crops_size=64",
        "crops.gram_teacher_no_distortions=true"]))
    tr = Trainer(gram, progress=False)
    pre_teacher = load_backbone(tmp_path / "pre" / "eval" / "training_2" / "teacher_backbone.pth").state_dict()
    res = tr.run()
    assert res.iteration == 4 and tr.gram_updates == 1  # refreshed once (max_updates=1) after iteration 1
    rec = [json.loads(x) for x in (tmp_path / "gram" / "metrics.jsonl").read_text().splitlines()]
    assert all("loss/gram_loss" in r for r in rec)
    assert rec[0]["loss/gram_loss"] >= 0.0
    # phase start: the student began from the previous phase's teacher (first checkpoint differs only by training)
    assert set(pre_teacher) == set(tr.model.teacher["backbone"].state_dict())

    hires = load_config(None, tiny_overrides(tmp_path / "hires", tiles_dir, iters=8, extra=[
        f"phase.init_from={tmp_path / 'gram'}", "phase.name=hires", "gram.use_loss=true", "gram.rep_update=false",
        "crops.resolution_triples=[[32, 16, 48], [64, 16, 96], [48, 32, 64]]",
        "crops.resolution_probabilities=[0.4, 0.4, 0.2]", "crops.gram_teacher_crops_size=48",
        "crops.gram_teacher_no_distortions=true"]))
    Trainer(hires, progress=False).run()
    rec = [json.loads(x) for x in (tmp_path / "hires" / "metrics.jsonl").read_text().splitlines()]
    sizes = [r["crops/global_px"] for r in rec]
    assert len(rec) == 8 and len(set(sizes)) >= 2, sizes
    expected = [[32, 64, 48][resolution_choice(0, it, [0.4, 0.4, 0.2])] for it in range(8)]
    assert sizes == expected
    assert all(r["finite"] for r in rec)


def test_dense_probe_monitor_is_logged(tmp_path, tiles_dir):
    cfg = load_config(None, tiny_overrides(tmp_path / "probe", tiles_dir, iters=2,
                                           extra=["evaluation.dense_probe_every=2"]))
    result = Trainer(cfg, progress=False).run()
    lines = [json.loads(x) for x in (tmp_path / "probe" / "dense_probe.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [0, 2]
    assert all(0.0 <= r["probe/crown_auc"] <= 1.0 for r in lines)
    assert result.dense_probe == lines
    from eo_dinov3.cli import main

    assert main(["plot-probe", f"tiny={tmp_path / 'probe'}", "--out", str(tmp_path / "curve.png")]) == 0
    png = (tmp_path / "curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_knn_probe_runs_at_every_checkpoint(tmp_path, tiles_dir):
    """``evaluation.knn_probe_every_checkpoint=true``: one k-NN crown probe of the teacher per checkpoint, logged to
    knn_probe.jsonl, summary.json and plottable."""
    cfg = load_config(None, tiny_overrides(tmp_path / "knn", tiles_dir, iters=4,
                                           extra=["evaluation.knn_probe_every_checkpoint=true",
                                                  "checkpointing.period=2"]))
    result = Trainer(cfg, progress=False).run()
    lines = [json.loads(x) for x in (tmp_path / "knn" / "knn_probe.jsonl").read_text().splitlines()]
    ckpts = sorted(int(p.stem) for p in (tmp_path / "knn" / "ckpt").glob("*.pt"))
    assert [r["iteration"] for r in lines] == [2, 4] and ckpts[-1] == 4
    assert all(0.0 <= r["probe/crown_knn_auc"] <= 1.0 for r in lines)
    assert result.knn_probe == lines
    assert json.loads((tmp_path / "knn" / "summary.json").read_text())["knn_probe"] == lines
    from eo_dinov3.cli import main

    out = tmp_path / "knn.png"
    assert main(["plot-probe", f"tiny={tmp_path / 'knn'}", "--metric", "probe/crown_knn_auc", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
