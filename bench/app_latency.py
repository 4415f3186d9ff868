"""Latency of the Streamlit canopy-height app (``apps/canopy_map.py``): time to the first map.

Measures, on this machine, with a fresh results cache:

1. **service** (in-process, no browser): the steps the app runs for the default region — model load, input checks,
   tiled inference (``predict_raster`` + COG), whole-image statistics, Web-Mercator overlays, folium map HTML;
2. **browser** (end-to-end, needs ``/usr/bin/chromium`` + Playwright): ``streamlit run`` as a server, headless
   Chromium opens it, time until the Leaflet map shows the canopy-height overlay (cold: empty cache, first page
   load; warm: page reload, result cached);
3. **upload** (browser): a ``SIZE x SIZE`` GeoTIFF (default 5 000 x 5 000 px, 0.6 m, built by mirror-tiling the real
   NEON sample) uploaded through the file uploader, time until its map is shown (the app's own "computed in" time
   for the inference is reported too). Without a browser (``--skip-browser`` or no Chromium) the same raster is
   timed in-process through the app's service calls instead.

    python bench/app_latency.py                         # all three, CPU
    python bench/app_latency.py --skip-upload           # only the default region
    python bench/app_latency.py --device cuda --skip-browser   # GPU (bf16 autocast), in-process timings only
    python bench/app_latency.py --size 2000 --json out.json

Prints a table; never asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "canopy_map.py"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def build_upload(sample: Path, dst: Path, size: int) -> None:
    """``size x size`` RGB GeoTIFF at the sample's GSD/CRS: the real sample mirror-tiled (no synthetic texture)."""
    import rasterio

    with rasterio.open(sample) as s:
        rgb = s.read()
        prof = s.profile
    reps = (size // rgb.shape[1] + 2, size // rgb.shape[2] + 2)
    tiles_y = [rgb if i % 2 == 0 else rgb[:, ::-1] for i in range(reps[0])]
    col = np.concatenate(tiles_y, axis=1)
    tiles_x = [col if j % 2 == 0 else col[:, :, ::-1] for j in range(reps[1])]
    big = np.concatenate(tiles_x, axis=2)[:, :size, :size]
    prof.update(width=size, height=size, tiled=True, blockxsize=512, blockysize=512, compress="deflate",
                zlevel=1)
    with rasterio.open(dst, "w", **prof) as d:
        d.write(big)


def service_timing(cache: Path, device: str | None) -> dict[str, float]:
    """Seconds per app step for the default region, in-process (fresh cache)."""
    t = {}
    t0 = time.perf_counter()
    from eo_dinov3.canopy import app_service as svc
    from eo_dinov3.data.samples import sample_path

    t["app imports (torch already loaded)"] = time.perf_counter() - t0
    s = time.perf_counter()
    loaded = svc.load_model(svc.ModelSpec("demo"))
    t["model load"] = time.perf_counter() - s
    s = time.perf_counter()
    inp = svc.validate_raster(sample_path("yell_rgb_0p6m"))
    t["input checks + sha256"] = time.perf_counter() - s
    s = time.perf_counter()
    res = svc.run_chm(inp, loaded, svc.RunParams(device=device), cache)
    t["inference + COG + summary"] = time.perf_counter() - s
    s = time.perf_counter()
    rgb = svc.raster_overlay(inp.path, kind="rgb")
    chm = svc.raster_overlay(res.path, kind="chm")
    assets = svc.offline_assets()
    m = svc.build_map([svc.MapLayer("rgb", rgb.array, rgb.bounds), svc.MapLayer("chm", svc.colorize(chm.array),
                                                                                 chm.bounds, 0.7)],
                      assets=assets, legend=svc.legend_html(demo=True))
    m.get_root().render()
    t["overlays + map HTML"] = time.perf_counter() - s
    s = time.perf_counter()
    svc.run_chm(inp, loaded, svc.RunParams(device=device), cache)
    t["cached rerun of inference"] = time.perf_counter() - s
    t["total (first map, in-process)"] = time.perf_counter() - t0 - t["cached rerun of inference"]
    return t


def upload_timing(path: Path, cache: Path, device: str | None) -> dict[str, float]:
    """In-process seconds of the app's steps for an uploaded raster (no browser): store + checks, inference, map."""
    from eo_dinov3.canopy import app_service as svc

    t: dict[str, float] = {}
    size = path.stem.split("_")[-1]
    loaded = svc.load_model(svc.ModelSpec("demo"))
    s = time.perf_counter()
    stored = svc.save_upload(path.read_bytes(), cache, max_mb=10_000)
    inp = svc.validate_raster(stored, sha256=stored.stem)
    t[f"upload {size}: store + checks"] = time.perf_counter() - s
    s = time.perf_counter()
    res = svc.run_chm(inp, loaded, svc.RunParams(device=device), cache)
    t[f"upload {size}: inference + COG + summary"] = time.perf_counter() - s
    s = time.perf_counter()
    svc.raster_overlay(inp.path, kind="rgb")
    svc.raster_overlay(res.path, kind="chm")
    t[f"upload {size}: overlays"] = time.perf_counter() - s
    return t


def _free_port() -> int:
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        return so.getsockname()[1]


def browser_timing(cache: Path, device: str | None, upload: Path | None, timeout_s: float) -> dict[str, float]:
    """End-to-end seconds measured in headless Chromium against a real ``streamlit run`` server."""
    import urllib.request

    from playwright.sync_api import sync_playwright

    out: dict[str, float] = {}
    port = _free_port()
    env = {**os.environ, "EO_DINOV3_APP_CACHE": str(cache), "EO_DINOV3_MAX_UPLOAD_MB": "1000"}
    if device:
        env["EO_DINOV3_DEVICE"] = device
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true", "--server.address",
         "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none", "--server.maxUploadSize", "1000"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - t0 > 120:
                    raise RuntimeError("streamlit server did not start")
                time.sleep(0.2)
        out["server start (process → health OK)"] = time.perf_counter() - t0
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})

            def wait_map(text: str) -> None:
                try:
                    page.get_by_text(text).first.wait_for(timeout=timeout_s * 1000)
                except Exception:
                    shot = Path(tempfile.gettempdir()) / "app_latency_failure.png"
                    page.screenshot(path=str(shot), full_page=True)
                    print(f"  waiting for {text!r} failed; screenshot {shot}", file=sys.stderr)
                    raise
                fr = page.wait_for_selector("iframe[title*='st_folium']", timeout=timeout_s * 1000).content_frame()
                fr.wait_for_selector("#chm-legend", timeout=timeout_s * 1000)
                fr.wait_for_function("() => Array.from(document.querySelectorAll('img.leaflet-image-layer'))"
                                     ".filter(i => i.complete && i.naturalWidth > 0).length >= 2",
                                     timeout=timeout_s * 1000)

            log = lambda msg: print(f"  [{time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)
            s = time.perf_counter()
            log("opening the app")
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            wait_map("383 x 412 px")
            out["first map, default region (cold: page open → map)"] = time.perf_counter() - s
            log("first map shown; reloading")
            s = time.perf_counter()
            page.reload(wait_until="domcontentloaded")
            wait_map("result from cache")
            out["default region again (warm: reload → map)"] = time.perf_counter() - s
            if upload is not None:
                log("warm map shown; uploading")
                page.get_by_text("Upload a GeoTIFF").first.click()
                button = page.locator("[data-testid='stSidebar'] [data-testid='stFileUploader'] button").first
                button.wait_for(timeout=60_000)
                s = time.perf_counter()
                with page.expect_file_chooser() as chooser:
                    button.click()
                chooser.value.set_files(str(upload))
                log(f"file set: {upload.name}")
                size = upload.stem.split("_")[-1]
                wait_map(f"{size} x {size} px")
                out[f"upload {size} x {size} px (file chosen → map)"] = time.perf_counter() - s
                cap = page.get_by_text("computed in").first.inner_text()
                try:
                    out[f"  of which inference (app's 'computed in')"] = float(cap.split("computed in")[1].split()[0])
                except (IndexError, ValueError):
                    pass
            browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    ap.add_argument("--size", type=int, default=5000, help="side of the uploaded test raster in px (default 5000)")
    ap.add_argument("--skip-upload", action="store_true")
    ap.add_argument("--skip-browser", action="store_true")
    ap.add_argument("--timeout", type=float, default=3600, help="browser wait limit per step, seconds")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the in-process step")
    ap.add_argument("--json", help="also write the numbers as JSON")
    a = ap.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    rows: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows.update({f"service: {k}": v for k, v in service_timing(tmp / "cache_service", a.device).items()})
        up = None
        if not a.skip_upload:
            from eo_dinov3.data.samples import sample_path

            up = tmp / f"upload_{a.size}.tif"
            s = time.perf_counter()
            build_upload(Path(sample_path("yell_rgb_0p6m")), up, a.size)
            print(f"(built {up.name}: {up.stat().st_size / 2**20:.0f} MB in {time.perf_counter() - s:.1f} s)")
        if up is not None and (a.skip_browser or not CHROMIUM.exists()):
            rows.update({f"service: {k}": v for k, v in upload_timing(up, tmp / "cache_up", a.device).items()})
        if not a.skip_browser:
            if not CHROMIUM.exists():
                print("(browser timings skipped: /usr/bin/chromium missing)", file=sys.stderr)
            else:
                rows.update({f"browser: {k}": v for k, v in
                             browser_timing(tmp / "cache_browser", a.device, up, a.timeout).items()})
    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"\napp latency — device {dev}, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    w = max(len(k) for k in rows)
    print(f"{'step':<{w}}  seconds")
    for k, v in rows.items():
        print(f"{k:<{w}}  {v:8.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": dev, "seconds": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
