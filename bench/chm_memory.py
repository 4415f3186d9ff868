"""Peak memory and throughput of :func:`eo_dinov3.canopy.mapping.predict_raster` on a large synthetic GeoTIFF.

Builds a ``SIZE x SIZE`` 3-band uint8 GeoTIFF (UTM, 0.6 m, tiled 512, DEFLATE level 1) block by block from a cheap
pattern (never the whole array in memory), then maps it with a tiny stand-in model and reports peak RSS (the
kernel's ``ru_maxrss`` and a 20 Hz psutil sampler) and megapixels per second. Acceptance (issue "Canopy height"):
peak RSS < 2 GiB for 20 000 x 20 000 px.

    python bench/chm_memory.py                      # 20 000 x 20 000, CPU, conv stand-in
    python bench/chm_memory.py --size 4000 --json out.json
    python bench/chm_memory.py --device cuda --model demo   # bf16 autocast on the GPU

Models: ``conv`` (one 3 x 3 conv, ~free: measures the I/O + blending pipeline) or ``demo`` (the random tiny
ViT + DPT of ``eo-dinov3 chm predict --model demo``; slow on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def build_raster(path: Path, width: int, height: int, block: int = 1024) -> float:
    """Write the synthetic RGB GeoTIFF; returns seconds taken."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:block, :block]
    base = (110 + 50 * np.sin(xx / 41.0) * np.cos(yy / 29.0)).astype(np.float32)
    noise = rng.normal(0, 12, (3, block, block)).astype(np.float32)
    prof = dict(driver="GTiff", width=width, height=height, count=3, dtype="uint8", crs="EPSG:32633",
                transform=from_origin(500000.0, 5000000.0, 0.6, 0.6), tiled=True, blockxsize=512, blockysize=512,
                compress="deflate", zlevel=1, bigtiff="IF_SAFER", nodata=None)
    with rasterio.open(path, "w", **prof) as dst:
        for r0 in range(0, height, block):
            for c0 in range(0, width, block):
                h, w = min(block, height - r0), min(block, width - c0)
                shift = (r0 // block * 7 + c0 // block * 13) % 50
                img = np.clip(base[None, :h, :w] + noise[:, :h, :w] + shift + np.arange(3)[:, None, None] * 15,
                              0, 255).astype(np.uint8)
                dst.write(img, window=Window(c0, r0, w, h))
    return time.perf_counter() - t0


class ConvStandIn:
    """A single 3 x 3 conv (metres = 10 + 3 * conv(x)): nearly free, so the bench measures the I/O, blending and
    COG pipeline rather than a network."""

    name = "bench conv stand-in"

    def __init__(self, device: str):
        import torch

        torch.manual_seed(0)
        self.net = torch.nn.Conv2d(3, 1, 3, padding=1).to(device).eval()

    def __call__(self, x):
        return 10.0 + 3.0 * self.net(x)


class RSSSampler:
    """Samples the process RSS every ``interval`` s in a thread (psutil); ``peak`` in bytes."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "RSSSampler":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=20000, help="raster side in px (default 20000)")
    ap.add_argument("--height", type=int, default=None, help="raster height if different from --size")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", choices=("conv", "demo"), default="conv")
    ap.add_argument("--workdir", default=None, help="folder for the input/output rasters (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    tmp = tempfile.TemporaryDirectory(prefix="chm_bench_") if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    height = args.height or args.size
    src = work / f"synthetic_{args.size}x{height}.tif"
    gen_s = build_raster(src, args.size, height) if not src.exists() else 0.0
    from eo_dinov3.canopy.cli import demo_model
    from eo_dinov3.canopy.mapping import predict_raster

    model = ConvStandIn(args.device) if args.model == "conv" else demo_model().to(args.device)
    rss_before = _rss()
    dst = work / "chm.tif"
    t0 = time.perf_counter()
    with RSSSampler() as sampler:
        predict_raster(model, src, dst, tile=args.tile, overlap=args.overlap, batch_size=args.batch_size,
                       device=args.device, progress=False, resume=False)
    secs = time.perf_counter() - t0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    mpx = args.size * height / 1e6
    res = {
        "size_px": [height, args.size], "megapixels": mpx, "model": args.model, "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU x{os.cpu_count()}",
        "tile": args.tile, "overlap": args.overlap, "generate_s": round(gen_s, 1), "predict_s": round(secs, 1),
        "megapixels_per_s": round(mpx / secs, 3), "rss_before_predict_mib": round(rss_before / 2**20),
        "peak_rss_sampled_mib": round(sampler.peak / 2**20), "peak_rss_maxrss_mib": round(maxrss / 2**20),
        "input_mib": round(src.stat().st_size / 2**20, 1), "output_mib": round(dst.stat().st_size / 2**20, 1),
    }
    print(f"{'quantity':<26}{'value':>16}")
    for k, v in res.items():
        print(f"{k:<26}{str(v):>16}")
    ok = res["peak_rss_maxrss_mib"] < 2048
    print(f"acceptance (peak RSS < 2 GiB): {'PASS' if ok else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


if __name__ == "__main__":
    sys.exit(main())
