"""``eo-dinov3 geobench {run,make-fixtures,score}`` — GEO-Bench v1 on frozen features from the command line.

``geobench/run.py`` is the same ``run`` parser as a stand-alone script.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from eo_dinov3.errors import ConfigError


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``geobench run`` (defaults come from ``--protocol``; a given option overrides it)."""
    p.add_argument("--backbone", default="dinov3_vitl16",
                   help="dinov3_vits16 … dinov3_vit7b16 (our ViT; official web/SAT-493M or our checkpoints via "
                        "--weights) or timm:NAME (any timm model, weights from --weights)")
    p.add_argument("--weights", default=None, help="local weights file (never downloaded); omit for random init")
    p.add_argument("--arch", default=None, metavar="JSON",
                   help='architecture overrides, e.g. \'{"embed_dim": 64, "depth": 2, "num_heads": 2}\'')
    p.add_argument("--benchmark-dir", default=None, help="GEO-Bench root (default: $GEO_BENCH_DIR, ~/dataset/geobench)")
    p.add_argument("--tasks", default="all", help="all | classification | segmentation | comma list (paper names ok)")
    p.add_argument("--partitions", default=None, help="default,0.01x_train,… (label-efficiency sweep)")
    p.add_argument("--protocol", default="fast", choices=["fast", "dinov3"],
                   help="fast: kNN + logistic regression + SGD linear probe + linear seg head, 5 seeds; "
                        "dinov3: the DINOv3 paper (SGD linear probe; DPT head at 512 px), 10 seeds")
    p.add_argument("--config", default=None, help="YAML file with run settings (configs/geobench/*.yaml)")
    p.add_argument("--methods", default=None,
                   help="comma list from knn5,knn20,logreg,linear,seg-linear,seg-dpt (overrides the protocol)")
    p.add_argument("--seeds", default=None, help="e.g. 0-4 or 0,1,2 (>= 5 for a leaderboard)")
    p.add_argument("--bands", default=None, help="rgb (default) | all | comma list (red,green,blue,nir,…)")
    p.add_argument("--normalization", default=None, choices=["dataset", "model", "none"])
    p.add_argument("--image-size", type=int, default=None, help="input side for classification (px)")
    p.add_argument("--seg-image-size", type=int, default=None, help="input side for segmentation (px)")
    p.add_argument("--sgd-iters", type=int, default=None)
    p.add_argument("--seg-iters", type=int, default=None)
    p.add_argument("--n-boot", type=int, default=None, help="bootstrap resamples of test samples (default 1000)")
    p.add_argument("--device", default=None, help="auto (default) | cpu | cuda")
    p.add_argument("--batch-size", type=int, default=None, help="backbone batch size")
    p.add_argument("--cache-dir", default=None, help="feature cache (default OUT/features)")
    p.add_argument("--name", default=None, help="model name in the result files")
    p.add_argument("--out", default="results", help="output folder (resumes if it holds results)")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace):
    from eo_dinov3.evaluation.geobench_run import make_config, parse_seeds

    arch = None
    if args.arch:
        try:
            arch = json.loads(args.arch)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--arch is not valid JSON: {e}") from None
    cls_m = seg_m = None
    if args.methods:
        ms = [m.strip() for m in args.methods.split(",") if m.strip()]
        cls_m = tuple(m for m in ms if not m.startswith("seg-"))
        seg_m = tuple(m for m in ms if m.startswith("seg-"))
    overrides = dict(
        backbone=args.backbone, weights=args.weights, arch_overrides=arch, benchmark_dir=args.benchmark_dir,
        tasks=args.tasks, partitions=args.partitions, cls_methods=cls_m, seg_methods=seg_m,
        seeds=parse_seeds(args.seeds) if args.seeds else None, bands=args.bands, normalization=args.normalization,
        cls_image_size=args.image_size, seg_image_size=args.seg_image_size, sgd_iters=args.sgd_iters,
        seg_iters=args.seg_iters, n_boot=args.n_boot, device=args.device, batch_size=args.batch_size,
        cache_dir=args.cache_dir, name=args.name, out=args.out, progress=False if args.no_progress else None,
    )
    if cls_m and args.methods:
        overrides["primary_cls"] = cls_m[0] if "logreg" not in cls_m else "logreg"
    if seg_m and args.methods:
        overrides["primary_seg"] = seg_m[-1]
    return make_config(args.protocol, args.config, **overrides)


def _run(args: argparse.Namespace) -> int:
    from eo_dinov3.evaluation.geobench_run import run

    cfg = config_from_args(args)
    t0 = time.perf_counter()
    summary = run(cfg)
    out = Path(cfg.out)
    print((out / "leaderboard.md").read_text())
    print(f"done in {time.perf_counter() - t0:.1f}s; wrote {out}/results.jsonl, summary.json, leaderboard.md, "
          "tgb_results.csv, results_and_parameters.csv, scores.png")  # fmt: skip
    del summary
    return 0


def _make_fixtures(args: argparse.Namespace) -> int:
    from eo_dinov3.evaluation.geobench_fixtures import make_fixtures

    t0 = time.perf_counter()
    root = make_fixtures(args.out, tasks=args.tasks, size=args.size, seed=args.seed)
    n = sum(1 for _ in Path(root).glob("*/*/*.hdf5"))
    print(f"wrote a synthetic GEO-Bench v1 ({n} samples) to {root} in {time.perf_counter() - t0:.1f}s; "
          f"use it with --benchmark-dir {root} or GEO_BENCH_DIR={root}")  # fmt: skip
    return 0


def _score(args: argparse.Namespace) -> int:
    """Recompute summary/leaderboard files from an existing results.jsonl (e.g. after merging runs)."""
    from eo_dinov3.evaluation import geobench_format as gf
    from eo_dinov3.evaluation.geobench_run import RunConfig, make_config, read_results, summarize, write_outputs

    out = Path(args.out)
    rows = read_results(out / "results.jsonl")
    if not rows:
        raise ConfigError(f"{out}/results.jsonl has no results")
    old = json.loads((out / "summary.json").read_text())["config"] if (out / "summary.json").is_file() else {}
    fields = set(RunConfig.__dataclass_fields__)
    kept = {k: v for k, v in old.items() if k in fields and k != "protocol"}
    cfg = make_config(old.get("protocol", "fast"), **kept)
    summary = summarize(rows, cfg, gf.geo_bench_dir(args.benchmark_dir or cfg.benchmark_dir),
                        rows[-1]["checkpoint_sha256"])  # fmt: skip
    write_outputs(out, summary, rows)
    print((out / "leaderboard.md").read_text())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``geobench {run,make-fixtures,score}`` to ``eo-dinov3``."""
    parser = subparsers.add_parser("geobench", help="GEO-Bench v1 leaderboard runs on frozen features",
                                   description=__doc__)  # fmt: skip
    actions = parser.add_subparsers(dest="geobench_action", metavar="<action>")
    r = actions.add_parser("run", help="evaluate a backbone on GEO-Bench (all outputs in --out)")
    add_run_arguments(r)
    r.set_defaults(func=_run)
    f = actions.add_parser("make-fixtures", help="write a small synthetic benchmark in the official format")
    f.add_argument("out", help="output folder (becomes a GEO_BENCH_DIR)")
    f.add_argument("--tasks", default="all")
    f.add_argument("--size", type=int, default=32, help="image side in pixels (multiple of 4)")
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=_make_fixtures)
    s = actions.add_parser("score", help="recompute summary.json / leaderboard / CSVs / PNG from results.jsonl")
    s.add_argument("out", help="a run's output folder")
    s.add_argument("--benchmark-dir", default=None, help="for normalizer.json (default: the run's)")
    s.set_defaults(func=_score)
    parser.set_defaults(func=lambda a: (parser.print_help(), 0)[1])


def run_main(argv: list[str] | None = None) -> int:
    """Entry point of ``geobench/run.py``."""

    p = argparse.ArgumentParser(prog="geobench/run.py", description="GEO-Bench v1 on frozen features "
                                "(same as 'eo-dinov3 geobench run')")  # fmt: skip
    add_run_arguments(p)
    from eo_dinov3.cli import run_standalone

    return run_standalone(p, _run, argv)
