"""``eo-dinov3 pretrain`` (same as ``python sat_training/pretrain.py``): DINOv3 pretraining on satellite tiles."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eo_dinov3.errors import EODinoError

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "demo_cpu.yaml"

DESCRIPTION = (
    "DINOv3 pretraining (DINO/Sinkhorn-Knopp + iBOT + KoLeo, EMA teacher, multi-crop, optional Gram anchoring) on "
    "satellite tiles. Without arguments: the CPU demo config on the sample tiles (eo-dinov3 samples fetch)."
)
EPILOG = (
    "Overrides: key=value pairs (keys of eo_dinov3/ssl/default_config.yaml), e.g. optim.lr=5e-4 "
    "train.batch_size_per_gpu=32 data.path=/data/tiles. Scale out: torchrun --nproc_per_node 8 "
    "sat_training/pretrain.py --config ... [train.sharding=fsdp]. Runs resume from the newest checkpoint in "
    "run.output_dir unless --no-resume."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=str(DEMO_CONFIG),
                   help="YAML config (default: the CPU demo, %(default)s; *demo_cpu.yaml configs use the sample tiles)")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in run.output_dir")
    p.add_argument("--output-dir", help="shortcut for run.output_dir=...")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to metrics.jsonl)")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def run(args: argparse.Namespace) -> int:
    from eo_dinov3.ssl.config import load_config
    from eo_dinov3.ssl.trainer import train

    overrides = list(args.overrides)
    if args.no_resume:
        overrides.append("checkpointing.resume=never")
    if args.output_dir:
        overrides.append(f"run.output_dir={args.output_dir}")
    cfg = load_config(args.config, overrides)
    if cfg.data.path is None:
        if not Path(args.config).name.endswith("demo_cpu.yaml"):
            raise EODinoError("data.path is not set: pass data.path=<folder of tiles | manifest.parquet | scenes>")
        from eo_dinov3.data.samples import sample_path

        cfg.data.path = str(sample_path("tiles").parent)
    result = train(cfg, progress=not args.no_progress)
    out = result.output_dir
    print(f"finished at iteration {result.iteration} ({result.skipped_steps} non-finite steps skipped)")
    print(f"  run folder:       {out.resolve()}")
    print(f"  checkpoint:       {result.last_checkpoint}")
    print(f"  teacher backbone: {result.teacher_export}  (load: eo_dinov3.checkpoints.load_backbone(path))")
    if result.pca_pictures:
        print(f"  PCA pictures:     {result.pca_pictures[0]} ... {result.pca_pictures[-1]}")
    print(f"  metrics:          {out / 'metrics.jsonl'}  (tensorboard --logdir {out / 'tb'})")
    if result.collapse_warnings:
        print(f"  collapse warnings: {len(result.collapse_warnings)} (first: {result.collapse_warnings[0]})")
    return 0


def run_pca(args: argparse.Namespace) -> int:
    """PCA picture of a backbone's patch features on one GeoTIFF/PNG (any size: features at 1024 px and beyond)."""
    import torch

    from eo_dinov3.checkpoints import load_backbone
    from eo_dinov3.data.normalization import normalize
    from eo_dinov3.data.raster_io import open_raster
    from eo_dinov3.ssl.monitors import save_pca_picture

    backbone = load_backbone(args.weights).eval()
    with open_raster(args.image) as src:
        if src.count < 3:
            raise EODinoError(f"{args.image}: needs 3 bands (RGB), has {src.count}")
        data = src.read([1, 2, 3], out_shape=(3, args.size, args.size)) if args.size else src.read([1, 2, 3])
    x = torch.from_numpy(data).float() / (255.0 if data.dtype.name == "uint8" else float(data.max() or 1))
    path = save_pca_picture(backbone, normalize(x, args.normalization), args.out,
                            title=f"{args.weights} on {args.image} ({x.shape[-2]}x{x.shape[-1]} px)")
    print(f"wrote {path}")
    return 0


def run_plot_probe(args: argparse.Namespace) -> int:
    from eo_dinov3.ssl.monitors import plot_dense_probe

    runs = {}
    for item in args.runs:
        label, _, path = item.rpartition("=")
        runs[label or Path(path).name] = path
    print(f"wrote {plot_dense_probe(runs, args.out, args.metric)}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("pretrain", help="DINOv3 self-supervised pretraining", description=DESCRIPTION,
                              epilog=EPILOG)
    add_arguments(p)
    p.set_defaults(func=run)
    q = subparsers.add_parser(
        "pca", help="PCA picture of patch features on an image",
        description="Run a backbone (any checkpoint load_backbone reads) on an RGB raster, resized to --size px, "
        "and save the image beside the first three PCA components of its patch features (PNG).")
    q.add_argument("weights", help="backbone checkpoint (official/timm/HF/ours, e.g. runs/demo_cpu/eval/.../teacher_backbone.pth)")
    q.add_argument("image", help="RGB GeoTIFF/PNG")
    q.add_argument("--size", type=int, default=1024, help="resize the image to SIZE x SIZE px first (default 1024; 0 = keep)")
    q.add_argument("--normalization", default="sat493m", help="normalisation preset (default sat493m)")
    q.add_argument("--out", default="pca.png", help="output PNG (default pca.png)")
    q.set_defaults(func=run_pca)
    r = subparsers.add_parser(
        "plot-probe", help="plot the dense-probe curves of training runs",
        description="Plot dense_probe.jsonl (written with evaluation.dense_probe_every=N) or, for the crown_knn "
        "metrics, knn_probe.jsonl (evaluation.knn_probe_every_checkpoint=true) of one or more runs, e.g. a phase with "
        "and without Gram anchoring.")
    r.add_argument("runs", nargs="+", help="run folders, optionally labelled: 'with Gram=runs/gram_demo_cpu'")
    r.add_argument("--metric", default="probe/crown_auc", choices=["probe/crown_auc", "probe/crown_balanced_accuracy",
                                                                 "probe/crown_knn_auc",
                                                                 "probe/crown_knn_balanced_accuracy"])
    r.add_argument("--out", default="dense_probe.png", help="output PNG (default %(default)s)")
    r.set_defaults(func=run_plot_probe)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pretrain.py", description=DESCRIPTION, epilog=EPILOG)
    add_arguments(p)
    from eo_dinov3.cli import run_standalone

    return run_standalone(p, run, argv)


if __name__ == "__main__":
    sys.exit(main())
