"""GEO-Bench runner end to end on the synthetic benchmark with tiny backbones (ours and timm)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

from eo_dinov3.evaluation import geobench_format as gf
from eo_dinov3.evaluation.cli import run_main
from eo_dinov3.evaluation.geobench_fixtures import make_fixtures
from eo_dinov3.evaluation.geobench_run import make_config, read_results, run

REPO = Path(__file__).resolve().parents[1]
TINY = '{"embed_dim": 64, "depth": 2, "num_heads": 2}'
TINY_D = {"embed_dim": 64, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return make_fixtures(tmp_path_factory.mktemp("gb"), size=32, seed=0)


def _best(summary: dict, task: str, method: str, metric: str) -> float:
    return summary["tasks"][task]["default"][method][metric]["mean"]


@pytest.mark.slow
def test_full_twelve_task_run_and_resume(bench, tmp_path):
    out = tmp_path / "res"
    args = ["--backbone", "dinov3_vits16", "--arch", TINY, "--benchmark-dir", str(bench), "--config",
            str(REPO / "configs/geobench/fixtures.yaml"), "--out", str(out), "--name", "tiny", "--no-progress"]  # fmt: skip
    assert run_main(args) == 0
    for f in ("results.jsonl", "summary.json", "leaderboard.md", "tgb_results.csv", "results_and_parameters.csv",
              "scores.png"):  # fmt: skip
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_results(out / "results.jsonl")
    assert {r["task"] for r in rows} == set(gf.TASKS)
    assert all(sorted({r["seed"] for r in rows if r["task"] == t}) == [0, 1, 2, 3, 4] for t in gf.TASKS)
    s = json.loads((out / "summary.json").read_text())
    # planted signal: a random tiny ViT + probe separates it
    for t in gf.CLASSIFICATION_TASKS:
        if t != "m-bigearthnet":
            assert _best(s, t, "logreg", "accuracy") >= 0.95, t
            assert _best(s, t, "knn5", "accuracy") >= 0.9, t
    assert _best(s, "m-bigearthnet", "logreg", "micro_f1") >= 0.7
    for t in ("m-NeonTree", "m-nz-cattle", "m-pv4ger-seg"):
        assert _best(s, t, "seg-linear", "miou") >= 0.8, t
    for t in ("m-cashew-plant", "m-chesapeake", "m-SA-crop-type"):
        assert _best(s, t, "seg-linear", "miou") >= 0.3, t  # 7–10 classes, chance ≈ 0.1
    assert "miou_excl0" in s["tasks"]["m-cashew-plant"]["default"]["seg-linear"]
    for suite in ("classification/default", "segmentation/default", "all/default"):
        n = s["suites"][suite]["normalized"]
        assert n is not None and n["ci_low"] <= n["iqm"] <= n["ci_high"]
    with open(out / "results_and_parameters.csv") as f:
        lb = list(csv.DictReader(f))
    assert len(lb) == 12 * 5 and {r["Metric"] for r in lb} == {"Overall_Accuracy", "Multilabel_F1_Score",
                                                               "Multiclass_Jaccard_Index"}  # fmt: skip
    with open(out / "tgb_results.csv") as f:
        assert next(csv.reader(f))[:6] == ["dataset", "method", "metric_name", "metric_value", "ci_lower", "ci_upper"]
    assert "| m-eurosat | logreg | accuracy |" in (out / "leaderboard.md").read_text()
    # resume: nothing recomputed, no backbone pass
    n_rows = len(rows)
    cfg = make_config("fast", REPO / "configs/geobench/fixtures.yaml", backbone="dinov3_vits16",
                      arch_overrides=TINY_D, benchmark_dir=str(bench), out=str(out), progress=False)  # fmt: skip
    s2 = run(cfg)
    assert len(read_results(out / "results.jsonl")) == n_rows and s2["timings"] == {}


def test_partitions_share_the_feature_cache(bench, tmp_path):
    cfg = make_config("fast", backbone="dinov3_vits16", arch_overrides=TINY_D, benchmark_dir=str(bench),
                      tasks="m-eurosat,m-pv4ger-seg", partitions="default,0.01x_train", seeds=(0, 1),
                      cls_methods=("knn5", "logreg"), seg_methods=("seg-linear",), logreg_Cs=4, seg_iters=20,
                      cls_image_size=64, seg_image_size=64, n_boot=50, agg_boot=50, out=str(tmp_path / "r"),
                      progress=False)  # fmt: skip
    s = run(cfg)
    assert s["cache"]["misses"] == 6  # 3 splits × 2 tasks; 0.01x_train is sliced from the default features
    rows = read_results(tmp_path / "r" / "results.jsonl")
    small = [r for r in rows if r["partition"] == "0.01x_train"]
    assert small and all(r["n_train"] < 5 for r in small)
    assert s["tasks"]["m-eurosat"]["default"]["logreg"]["accuracy"]["mean"] >= 0.95
    # a second run with another probe reuses every cached feature (no backbone pass)
    cfg2 = dataclasses.replace(cfg, cls_methods=("knn20",), seg_methods=())
    s2 = run(cfg2)
    assert s2["cache"]["misses"] == 0 and s2["timings"]["m-eurosat"]["images"] == 0
    from eo_dinov3.cli import main

    (tmp_path / "r" / "leaderboard.md").unlink()
    assert main(["geobench", "score", str(tmp_path / "r")]) == 0  # rebuilds the summary files from results.jsonl
    assert "| m-eurosat | knn20 | accuracy |" in (tmp_path / "r" / "leaderboard.md").read_text()


def test_timm_backbone_with_local_weights(bench, tmp_path):
    timm = pytest.importorskip("timm")
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64, depth=2)
    wfile = tmp_path / "vit_tiny.pth"
    torch.save(m.state_dict(), wfile)
    cfg = make_config("fast", backbone="timm:vit_tiny_patch16_224", weights=str(wfile),
                      arch_overrides={"img_size": 64, "depth": 2}, benchmark_dir=str(bench), tasks="m-eurosat",
                      seeds=(0,), cls_methods=("knn5", "logreg"), logreg_Cs=4, cls_image_size=64, n_boot=50,
                      agg_boot=50, out=str(tmp_path / "r"), progress=False)  # fmt: skip
    s = run(cfg)
    assert s["checkpoint_sha256"] == hashlib.sha256(wfile.read_bytes()).hexdigest()
    assert s["tasks"]["m-eurosat"]["default"]["logreg"]["accuracy"]["mean"] >= 0.9


def test_dpt_head_segmentation(bench, tmp_path):
    cfg = make_config("dinov3", backbone="dinov3_vits16", arch_overrides=TINY_D, benchmark_dir=str(bench),
                      tasks="m-nz-cattle,m-cashew-plant", seeds=(0,), seg_image_size=64, seg_iters=40, seg_batch=4,
                      seg_dpt_lrs=(1e-3,), dpt_channels=32, n_boot=50, agg_boot=50, out=str(tmp_path / "r"),
                      progress=False)  # fmt: skip
    s = run(cfg)
    rows = read_results(tmp_path / "r" / "results.jsonl")
    assert {r["method"] for r in rows} == {"seg-dpt"} and rows[0]["layers"] == [0, 0, 0, 1]
    assert s["tasks"]["m-nz-cattle"]["default"]["seg-dpt"]["miou"]["mean"] > 0.5
    assert "miou_excl0" in s["tasks"]["m-cashew-plant"]["default"]["seg-dpt"]


def test_presets_match_yaml_configs():
    for name in ("fast", "dinov3"):
        a = make_config(name)
        b = make_config("fast", REPO / f"configs/geobench/{name}.yaml")
        assert a == b, name
    d = make_config("dinov3")
    assert d.seg_image_size == 512 and d.sgd_iters == 2400 and len(d.seeds) == 10 and d.seg_iters == 40000


def test_cli_reports_missing_benchmark(tmp_path, capsys):
    from eo_dinov3.cli import main

    rc = main(["geobench", "run", "--benchmark-dir", str(tmp_path / "none"), "--tasks", "m-eurosat",
               "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 2
    assert "GEO_BENCH_DIR" in capsys.readouterr().err
    assert main(["geobench", "make-fixtures", str(tmp_path / "fx"), "--tasks", "m-pv4ger", "--size", "16"]) == 0
    assert (tmp_path / "fx" / gf.CLASSIFICATION / "m-pv4ger" / "task_specs.pkl").is_file()


def test_own_checkpoint_file_is_loaded_and_fingerprinted(tmp_path):
    pytest.importorskip("eo_dinov3.checkpoints")
    from eo_dinov3 import hub
    from eo_dinov3.evaluation.features import load_frozen_backbone

    model = hub.build_backbone("dinov3_vits16", pretrained=False, **TINY_D).eval()
    wfile = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), wfile)
    fb = load_frozen_backbone("dinov3_vits16", wfile, arch_overrides=TINY_D)
    assert fb.checksum == hashlib.sha256(wfile.read_bytes()).hexdigest()
    x = torch.randn(2, 3, 64, 64)
    out = fb(x, layers=[0, 1])
    ref = model(x, is_training=True)
    torch.testing.assert_close(out["cls"], ref["x_norm_clstoken"])
    torch.testing.assert_close(out["mean"], ref["x_norm_patchtokens"].mean(1))
    assert out["maps"][1][0].shape == (2, 64, 4, 4)
