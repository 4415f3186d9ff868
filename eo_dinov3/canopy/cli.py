"""``eo-dinov3 chm …``: canopy-height maps from GeoTIFFs, lidar CHMs, accuracy metrics and zonal statistics.

* ``chm predict image.tif --model demo|HEAD_OR_HF --out chm.tif`` → COG of heights (:mod:`~eo_dinov3.canopy.mapping`)
* ``chm evaluate pred.tif truth.tif [--json out.json]`` → metric table (:mod:`~eo_dinov3.canopy.metrics`)
* ``chm from-lidar cloud.laz --resolution 0.6 --out chm.tif [--rgb-out rgb.tif]`` (:mod:`~eo_dinov3.canopy.lidar`)
* ``chm stats chm.tif --aoi areas.gpkg --out stats.csv`` (:mod:`~eo_dinov3.canopy.stats`)

Heavy modules (torch, rasterio, geopandas) are imported inside the handlers so ``eo-dinov3 --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from eo_dinov3.errors import ConfigError


def register(subparsers: Any) -> None:
    """Add ``chm`` and its sub-commands to the top-level CLI."""
    chm = subparsers.add_parser("chm", help="canopy height: predict maps, lidar CHMs, evaluate, zonal stats",
                                description=__doc__.split("\n\n")[0])
    sub = chm.add_subparsers(dest="chm_command", metavar="<chm command>")
    chm.set_defaults(func=lambda a: (chm.print_help(), 0)[1])

    p = sub.add_parser("predict", help="predict a canopy-height COG from an RGB GeoTIFF")
    p.add_argument("image", help="RGB GeoTIFF (uint8 or 16-bit; projected CRS; ~0.6 m GSD or it is resampled)")
    p.add_argument("--model", default="demo",
                   help="'demo' (random tiny model, for trying the pipeline), an official CHMv2 head .pth (with "
                        "--backbone) or a Hugging Face CHMv2 folder/.safetensors")
    p.add_argument("--head", help="official CHMv2 DPT head .pth (same as --model PATH)")
    p.add_argument("--backbone", help="official SAT-493M ViT-L backbone .pth for an official head")
    p.add_argument("--out", required=True, help="output COG path")
    p.add_argument("--tile", type=int, default=512, help="tile size in px, multiple of 16 (default 512)")
    p.add_argument("--overlap", type=int, default=64, help="overlap between tiles in px (default 64)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU; bf16 on a CPU with AVX512-BF16/AMX is ~1.9x "
                        "faster than fp32 for ViT-L CHMv2 (heights within ~0.05 m mean; bench/chm_predict.py)")
    p.add_argument("--normalization", default="chmv2")
    p.add_argument("--model-gsd", type=float, default=0.6, help="GSD the model expects, metres (default 0.6)")
    p.add_argument("--strict-gsd", action="store_true", help="refuse inputs whose GSD differs instead of resampling")
    p.add_argument("--allow-ungeoreferenced", action="store_true", help="accept rasters without CRS")
    p.add_argument("--dtype", choices=("float32", "uint8"), default="float32",
                   help="float32 metres (NaN nodata) or uint8 whole metres (255 nodata)")
    p.add_argument("--input-scale", type=float, default=None,
                   help="divide non-uint8 input by this (default: per-band 2-98 %% stretch)")
    p.add_argument("--workers", type=int, default=None, help="compute strips on a local dask cluster")
    p.add_argument("--scheduler", default=None, help="dask.distributed scheduler address")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="dynamic int8 quantisation of Linear layers (CPU only)")
    p.add_argument("--no-resume", action="store_true", help="ignore the sidecar files of an interrupted run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_predict)

    e = sub.add_parser("evaluate", help="compare a predicted CHM with a reference (lidar) CHM")
    e.add_argument("pred", help="predicted canopy height raster (metres)")
    e.add_argument("truth", help="reference canopy height raster (metres); aligned to the prediction grid")
    e.add_argument("--json", dest="json_out", help="also write the metrics as JSON")
    e.set_defaults(func=_evaluate)

    lz = sub.add_parser("from-lidar", help="canopy height model (GeoTIFF, metres) from a ground-classified LAS/LAZ")
    lz.add_argument("cloud", help="LAS/LAZ point cloud with class-2 ground points")
    lz.add_argument("--resolution", type=float, default=0.6, help="pixel size in metres (default 0.6)")
    lz.add_argument("--out", required=True, help="CHM GeoTIFF path")
    lz.add_argument("--rgb-out", help="also rasterise the point colours on the same grid")
    lz.add_argument("--returns", choices=("first", "all"), default="first")
    lz.add_argument("--gap-fill", type=int, default=4, help="fill empty cells within N px of data (default 4)")
    lz.add_argument("--min-coverage", type=float, default=0.5,
                    help="fill a gap only where >= this fraction of the cells within --gap-fill px hold returns "
                         "(default 0.5; keeps isolated returns over water from becoming discs; 0 = always fill)")
    lz.add_argument("--crs", help="CRS of the cloud when the header has none (e.g. EPSG:2994)")
    lz.add_argument("--z-unit", help="vertical unit when the header is wrong/silent: m, ft, us-ft")
    lz.set_defaults(func=_from_lidar)

    s = sub.add_parser("stats", help="per-polygon height, canopy cover and forest-area statistics")
    s.add_argument("chm", help="canopy height raster (metres)")
    s.add_argument("--aoi", required=True, help="polygons: GeoJSON, GPKG or zipped shapefile (any CRS)")
    s.add_argument("--out", required=True, help=".csv, .geojson or .gpkg")
    s.add_argument("--all-touched", action="store_true", help="count every pixel a polygon touches")
    s.set_defaults(func=_stats)

    from eo_dinov3.canopy.training import register_train_head

    register_train_head(sub)  # chm train-head (same as sat_training/train_canopy_head.py)


# ------------------------------------------------------------------------------------------------------ models
def demo_model(seed: int = 0):
    """A random-weight tiny ViT (64-d, 4 blocks) + CHMv2-style DPT head: exercises the pipeline, predicts nonsense.
    Labelled ``DEMO`` in the output tags (``is_demo``)."""
    import torch

    from eo_dinov3.canopy.model import CanopyHeightModel
    from eo_dinov3.hub import arch_config
    from eo_dinov3.models.dpt import DPTConfig, DPTHead
    from eo_dinov3.models.vision_transformer import DinoVisionTransformer

    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        bb = DinoVisionTransformer(arch_config("dinov3_vits16", embed_dim=64, depth=4, num_heads=2))
        head = DPTHead(DPTConfig.chmv2(embed_dim=64, channels=32, post_process_channels=(16, 32, 64, 64),
                                       n_hidden_channels=16, backbone_out_layers=(0, 1, 2, 3)))
    m = CanopyHeightModel(bb, head, name="DEMO tiny random (not a real model)")
    m.is_demo = True
    return m.eval()


def load_model(args: argparse.Namespace):
    """The model chosen by ``--model/--head/--backbone`` (+ ``--quantize``) of ``chm predict``."""
    import torch

    spec = args.head or args.model
    from eo_dinov3.canopy.training import is_head_checkpoint, load_head_checkpoint

    if spec == "demo":
        model = demo_model()
    elif is_head_checkpoint(spec):  # a head trained with train_canopy_head.py (backbone recorded inside)
        model = load_head_checkpoint(spec)
    else:
        from eo_dinov3.canopy.model import build_chmv2

        model = build_chmv2(weights=spec, backbone_weights=args.backbone)
        model.name = f"CHMv2 ({Path(spec).name})"
    if args.quantize == "int8":
        if args.device not in (None, "cpu"):
            raise ConfigError("--quantize int8 is for CPU inference; drop --device or use --device cpu")
        if getattr(args, "precision", "auto") == "bf16":
            raise ConfigError("--quantize int8 and --precision bf16 exclude each other; pick one")
        args.device = "cpu"
        from eo_dinov3.canopy.mapping import model_provenance

        sha = model_provenance(model)["WEIGHTS_SHA256"]  # of the float weights the user supplied
        q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        q.weights_sha256 = sha
        q.name = f"{getattr(model, 'name', 'model')} int8-dynamic"
        if getattr(model, "is_demo", False):
            q.is_demo = True
        model = q
    return model


# ---------------------------------------------------------------------------------------------------- handlers
def _predict(args: argparse.Namespace) -> int:
    from eo_dinov3.canopy.mapping import predict_raster

    model = load_model(args)
    t0 = time.perf_counter()
    out = predict_raster(
        model, args.image, args.out, tile=args.tile, overlap=args.overlap, batch_size=args.batch_size,
        normalization=args.normalization, device=args.device, precision=args.precision,
        strict_gsd=args.strict_gsd,
        model_gsd_m=args.model_gsd, allow_ungeoreferenced=args.allow_ungeoreferenced, out_dtype=args.dtype,
        input_scale=args.input_scale, workers=args.workers, scheduler=args.scheduler,
        progress=not args.quiet, resume=not args.no_resume,
    )
    dt = time.perf_counter() - t0
    import rasterio

    with rasterio.open(out) as d:
        mp = d.width * d.height / 1e6
        print(f"wrote {out} ({d.width} x {d.height} px, {d.dtypes[0]} metres, {d.crs}) in {dt:.1f} s "
              f"({mp / dt:.2f} Mpx/s)")
    if getattr(model, "is_demo", False):
        print("NOTE: --model demo uses random weights; the heights are meaningless (pipeline check only)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from eo_dinov3.canopy.metrics import evaluate_rasters, format_table

    m = evaluate_rasters(args.pred, args.truth)
    print(format_table(m))
    if m.get("truth_resampled"):
        print("(truth resampled to the prediction grid)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(_json_safe(m), indent=2))
        print(f"wrote {args.json_out}")
    return 0


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _from_lidar(args: argparse.Namespace) -> int:
    from eo_dinov3.canopy.lidar import chm_from_lidar

    z_unit: Any = args.z_unit
    r = chm_from_lidar(args.cloud, args.out, resolution_m=args.resolution, returns=args.returns,
                       gap_fill_px=args.gap_fill, min_coverage=args.min_coverage, rgb_out=args.rgb_out,
                       crs=args.crs, z_unit=z_unit)
    print(f"wrote {r.chm_path} ({r.grid.width} x {r.grid.height} px of {args.resolution} m = {r.grid.pixel:.4f} "
          f"CRS units; heights in metres, z x {r.z_to_metre:g} [{r.z_source}]); max {r.max_height_m:.1f} m, "
          f"{100 * r.valid_fraction:.0f}% of cells valid, {r.n_points} points ({r.n_ground} ground)")
    if r.rgb_path:
        print(f"wrote {r.rgb_path} (point colours, same grid)")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from eo_dinov3.canopy.stats import write_stats, zonal_stats

    gdf = zonal_stats(args.chm, args.aoi, all_touched=args.all_touched)
    write_stats(gdf, args.out)
    cols = [c for c in ("mean_m", "p95_m", "cover_5m_pct", "valid_area_ha", "forest_area_ha") if c in gdf]
    print(gdf[cols].round(2).to_string())
    print(f"wrote {args.out} ({len(gdf)} polygons)", file=sys.stderr)
    return 0
