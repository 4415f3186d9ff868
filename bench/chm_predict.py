"""Canopy-height mapping throughput: our tiled mapper vs the transformers CHMv2 pipeline, plus int8 and km²/h.

    python bench/chm_predict.py                          # CPU, fp32, reduced-width model (--arch tiny), 2048² raster
    python bench/chm_predict.py --device cuda            # GPU: ViT-L CHMv2 (random weights), bf16 autocast
    python bench/chm_predict.py --arch vitl --size 512   # CPU ViT-L: km²/h at 0.6 m (fp32, bf16, int8)

Both sides get the **same random weights** (ours → HF folder with :func:`eo_dinov3.canopy.hf_chmv2.save_hf_checkpoint`)
and the same tiles of a synthetic RGB GeoTIFF (uint8, UTM, 0.6 m). Ours: :func:`eo_dinov3.canopy.mapping.predict_raster`
(streamed strips, overlap blending, COG output). Peer: a loop over the same tile grid — rasterio window read →
``CHMv2ImageProcessor`` → ``CHMv2ForDepthEstimation`` → ``post_process_depth_estimation`` → write the window into a
float32 GeoTIFF (no blending). Reported: Mpx/s of raster area, peak RSS growth (CPU) or peak CUDA memory, the ratio
ours/peer (goal ≥ 1.5×), on CPU fp32 vs bf16 autocast vs int8: height difference (metres) and speed, km²/h at 0.6 m (1 km² = 2.78 Mpx).
No timing assertions; numbers depend on the machine (print them with the device).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from eo_dinov3.canopy.mapping import cpu_has_native_bf16

KM2_MPX_0P6 = 1e6 / 0.36 / 1e6  # 1 km² at 0.6 m = 2.78 Mpx


class PeakRSS:
    """Samples the process RSS every 10 ms; ``peak - start`` in MiB."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = self.start = self.proc.memory_info().rss
        self._stop = threading.Event()

    def __enter__(self):
        self.start = self.peak = self.proc.memory_info().rss
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *a):
        self._stop.set()
        self.t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 2**20


def build_model(arch: str, seed: int = 0):
    """Random-weight CHMv2 architecture: ``vitl`` (official ViT-L/16 + CHMv2 head) or ``tiny`` (ViT 192-d, 12 blocks,
    reduced head; same code paths)."""
    from eo_dinov3.canopy.model import CanopyHeightModel
    from eo_dinov3.hub import arch_config
    from eo_dinov3.models.dpt import DPTConfig, DPTHead
    from eo_dinov3.models.vision_transformer import DinoVisionTransformer

    torch.manual_seed(seed)
    if arch == "vitl":
        return CanopyHeightModel.chmv2().eval()
    if arch == "tiny":
        bb = DinoVisionTransformer(arch_config("dinov3_vitl16", embed_dim=192, depth=12, num_heads=3,
                                               untie_global_and_local_cls_norm=True))
        head = DPTHead(DPTConfig.chmv2(embed_dim=192, channels=64, post_process_channels=(32, 64, 128, 256),
                                       n_hidden_channels=32, backbone_out_layers=(2, 5, 8, 11)))
        return CanopyHeightModel(bb, head, name="bench tiny").eval()
    if arch == "micro":  # for the smoke test only
        bb = DinoVisionTransformer(arch_config("dinov3_vitl16", embed_dim=64, depth=4, num_heads=2,
                                               untie_global_and_local_cls_norm=True))
        head = DPTHead(DPTConfig.chmv2(embed_dim=64, channels=16, post_process_channels=(8, 16, 32, 64),
                                       n_hidden_channels=8, backbone_out_layers=(0, 1, 2, 3)))
        return CanopyHeightModel(bb, head, name="bench micro").eval()
    raise SystemExit(f"unknown --arch {arch!r}")


def synthetic_raster(path: Path, size: int, seed: int = 0) -> Path:
    """A ``size``² uint8 RGB GeoTIFF in EPSG:32610 at 0.6 m with smooth structure (blob 'crowns' on a gradient)."""
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = 80 + 60 * np.sin(6 * xx) * np.cos(5 * yy)
    noise = rng.normal(0, 12, (3, size, size)).astype(np.float32)
    rgb = np.clip(np.stack([base * 0.9, base * 1.1, base * 0.7]) + noise, 1, 255).astype(np.uint8)
    prof = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32610",
                transform=from_origin(500000, 4900000, 0.6, 0.6), tiled=True, blockxsize=256, blockysize=256,
                compress="deflate")
    with rasterio.open(path, "w", **prof) as d:
        d.write(rgb)
    return path


def run_ours(model, src: Path, dst: Path, tile: int, overlap: int, batch: int, device: str,
             precision: str = "auto") -> dict:
    from eo_dinov3.canopy.mapping import predict_raster

    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        predict_raster(model, src, dst, tile=tile, overlap=overlap, batch_size=batch, device=device,
                       precision=precision, progress=False, resume=False)
        dt = time.perf_counter() - t0
    return {"seconds": dt, "rss_mib": mem.mib,
            "cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None}


def tile_grid(n: int, tile: int, overlap: int) -> list[int]:
    from eo_dinov3.canopy.mapping import axis_starts

    return axis_starts(n, tile, overlap)


def run_peer(hf_dir: Path, src: Path, dst: Path, tile: int, overlap: int, device: str) -> dict:
    """transformers pipeline over the same tile grid, one tile at a time (its processor takes lists of images)."""
    import rasterio
    from rasterio.windows import Window
    from transformers import CHMv2ForDepthEstimation, CHMv2ImageProcessor

    model = CHMv2ForDepthEstimation.from_pretrained(hf_dir).eval().to(device)
    proc = CHMv2ImageProcessor()
    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        with rasterio.open(src) as s:
            prof = dict(driver="GTiff", width=s.width, height=s.height, count=1, dtype="float32", crs=s.crs,
                        transform=s.transform, tiled=True, blockxsize=256, blockysize=256, compress="deflate")
            rows, cols = tile_grid(s.height, tile, overlap), tile_grid(s.width, tile, overlap)
            with rasterio.open(dst, "w", **prof) as out:
                for r in rows:
                    for c in cols:
                        w = Window(c, r, min(tile, s.width - c), min(tile, s.height - r))
                        img = s.read([1, 2, 3], window=w).transpose(1, 2, 0)
                        inputs = proc(images=img, return_tensors="pt").to(device)
                        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16,
                                                                    enabled=device == "cuda"):
                            outputs = model(**inputs)
                        depth = proc.post_process_depth_estimation(outputs, target_sizes=[img.shape[:2]])
                        pred = depth[0]["predicted_depth"].float().cpu().numpy()
                        out.write(pred.reshape(1, *img.shape[:2]).astype(np.float32), window=w)
        dt = time.perf_counter() - t0
    return {"seconds": dt, "rss_mib": mem.mib,
            "cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None}


def cpu_variants(model, src: Path, tmp: Path, tile: int, overlap: int, batch: int, mpx: float,
                 fp32_run: dict) -> dict:
    """CPU fp32 (``fp32_run``: the result of :func:`run_ours` written to ``tmp/fp32.tif``) vs bf16 autocast vs
    dynamic int8 (Linear layers) of the same model: seconds, km²/h and the height difference to fp32 in metres
    (mean / max over valid pixels)."""
    import rasterio

    runs = {"fp32": fp32_run}
    if cpu_has_native_bf16():
        runs["bf16"] = run_ours(model, src, tmp / "bf16.tif", tile, overlap, batch, "cpu", "bf16")
    q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    runs["int8"] = run_ours(q, src, tmp / "int8.tif", tile, overlap, batch, "cpu", "fp32")
    with rasterio.open(tmp / "fp32.tif") as d:
        ref = d.read(1)
    out = {}
    for name, r in runs.items():
        with rasterio.open(tmp / f"{name}.tif") as d:
            y = d.read(1)
        diff = np.abs(ref - y)[np.isfinite(ref) & np.isfinite(y)]
        out[name] = {"seconds": r["seconds"], "km2_h": mpx / r["seconds"] * 3600 / KM2_MPX_0P6,
                     "speedup_vs_fp32": runs["fp32"]["seconds"] / r["seconds"], "mean_abs_diff_m": float(diff.mean()),
                     "max_abs_diff_m": float(diff.max()), "mean_height_m": float(np.nanmean(y))}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--arch", default=None, choices=("tiny", "vitl", "micro"),
                   help="model size (default: tiny on CPU, vitl on CUDA)")
    p.add_argument("--size", type=int, default=None, help="raster side in px (default 2048 CPU tiny, 512 ViT-L CPU, "
                                                          "4096 CUDA)")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--skip-variants", "--skip-int8", dest="skip_variants", action="store_true",
                   help="CPU: skip the fp32 / bf16 / int8 comparison")
    p.add_argument("--json", help="also write the results as JSON")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    arch = a.arch or ("vitl" if a.device == "cuda" else "tiny")
    size = a.size or (4096 if a.device == "cuda" else (512 if arch == "vitl" else 2048))
    model = build_model(arch)
    res: dict = {"device": a.device, "device_name": torch.cuda.get_device_name() if a.device == "cuda" else
                 f"CPU x{torch.get_num_threads()} threads", "arch": arch, "size": size, "tile": a.tile,
                 "overlap": a.overlap, "precision": "bf16 autocast" if a.device == "cuda" else "fp32"}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        src = synthetic_raster(tmp / "rgb.tif", size)
        mpx = size * size / 1e6
        if a.device == "cuda":
            model = model.to("cuda")
        ours = run_ours(model, src, tmp / "fp32.tif", a.tile, a.overlap, a.batch_size, a.device)
        res["ours"] = {**ours, "mpx_s": mpx / ours["seconds"], "km2_h": mpx / ours["seconds"] * 3600 / KM2_MPX_0P6}
        if not a.skip_peer:
            from eo_dinov3.canopy.hf_chmv2 import save_hf_checkpoint

            save_hf_checkpoint(model.cpu(), tmp / "hf")
            if a.device == "cuda":
                model.to("cuda")
            peer = run_peer(tmp / "hf", src, tmp / "peer.tif", a.tile, a.overlap, a.device)
            res["peer"] = {**peer, "mpx_s": mpx / peer["seconds"], "km2_h": mpx / peer["seconds"] * 3600 / KM2_MPX_0P6}
            res["ratio_ours_over_peer"] = res["ours"]["mpx_s"] / res["peer"]["mpx_s"]
        if not a.skip_variants and a.device == "cpu":
            res["cpu_variants"] = cpu_variants(model.cpu(), src, tmp, a.tile, a.overlap, a.batch_size, mpx, ours)
    print(f"chm_predict bench — {res['device_name']}, arch {arch}, {size}² px raster, tile {a.tile}, overlap "
          f"{a.overlap}, {res['precision']}")
    print(f"{'pipeline':<28}{'seconds':>9}{'Mpx/s':>9}{'km²/h @0.6m':>13}{'peak mem MiB':>14}")
    rows = [("ours (predict_raster)", res["ours"])] + ([("transformers CHMv2 loop", res["peer"])] if "peer" in res else [])
    for name, r in rows:
        mem = r["cuda_mib"] if r.get("cuda_mib") is not None else r["rss_mib"]
        print(f"{name:<28}{r['seconds']:>9.2f}{r['mpx_s']:>9.3f}{r['km2_h']:>13.2f}{mem:>14.0f}")
    if "ratio_ours_over_peer" in res:
        print(f"ratio ours/peer (Mpx/s): {res['ratio_ours_over_peer']:.2f}x  (goal >= 1.5x)")
    if "cpu_variants" in res:
        print(f"\nCPU precision variants of ours (same weights; bf16 only where the CPU has native bf16):")
        print(f"{'variant':<22}{'seconds':>9}{'km²/h @0.6m':>13}{'vs fp32':>9}{'mean |dh| m':>13}{'max |dh| m':>12}")
        labels = {"fp32": "fp32", "bf16": "bf16 autocast", "int8": "int8 dynamic (Linear)"}
        for name, v in res["cpu_variants"].items():
            print(f"{labels[name]:<22}{v['seconds']:>9.2f}{v['km2_h']:>13.2f}{v['speedup_vs_fp32']:>8.2f}x"
                  f"{v['mean_abs_diff_m']:>13.4f}{v['max_abs_diff_m']:>12.4f}")
        print(f"(fp32 mean height {res['cpu_variants']['fp32']['mean_height_m']:.2f} m; random weights)")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=float))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.exit(main())
