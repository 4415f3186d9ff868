"""Real-browser test of the canopy-height app: ``streamlit run`` as a server, headless Debian Chromium (Playwright
with ``executable_path``; never ``playwright install``), no internet needed.

Checks that the Leaflet map (inlined, offline) shows the RGB and canopy-height image overlays and the legend in
metres, and saves a screenshot under the test's output folder (``tmp_path``; also ``$EO_DINOV3_TEST_OUTPUT`` when
set). Skips only when ``/usr/bin/chromium`` is absent (CI installs it with ``apt-get install -y chromium``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "canopy_map.py"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed (/usr/bin/chromium missing; "
                                                     "apt-get install -y chromium)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} not up after {timeout} s")


def test_map_and_legend_render_in_chromium(tmp_path):
    pytest.importorskip("playwright")
    from playwright.sync_api import sync_playwright

    from eo_dinov3.data.samples import sample_path

    sample_path("yell_rgb_0p6m")  # the default region must exist (fetched by `eo-dinov3 samples fetch`)
    port = _free_port()
    env = {**os.environ, "EO_DINOV3_APP_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "streamlit.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
         "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none", "--global.developmentMode", "false"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    shot = tmp_path / "canopy_map.png"
    try:
        _wait_http(f"http://127.0.0.1:{port}/_stcore/health", proc, 60)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
                # the numbers appear once inference is done
                page.get_by_text("Mean height").first.wait_for(timeout=80_000)
                frame_el = page.wait_for_selector("iframe[title*='st_folium']", timeout=30_000)
                frame = frame_el.content_frame()
                frame.wait_for_selector(".leaflet-image-layer", state="attached", timeout=30_000)
                frame.wait_for_selector("#chm-legend", timeout=30_000)
                n_images = frame.locator("img.leaflet-image-layer").count()
                legend = frame.locator("#chm-legend").inner_text()
                loaded = frame.evaluate(
                    "() => Array.from(document.querySelectorAll('img.leaflet-image-layer'))"
                    ".map(i => [i.complete, i.naturalWidth, getComputedStyle(i).opacity])")
                has_leaflet = frame.evaluate("() => typeof window.L !== 'undefined' && !!window.L.version")
                frame_el.scroll_into_view_if_needed()
                time.sleep(0.5)
                page.screenshot(path=str(shot), full_page=True)
                map_shot = tmp_path / "map_only.png"
                frame_el.screenshot(path=str(map_shot))
            finally:
                browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    out_dir = os.environ.get("EO_DINOV3_TEST_OUTPUT")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(out_dir) / shot.name)
        shutil.copy(map_shot, Path(out_dir) / map_shot.name)

    assert has_leaflet, "Leaflet did not load (offline assets not inlined?)"
    assert n_images >= 2, f"expected RGB + canopy-height overlays, found {n_images}"
    shown = [x for x in loaded if float(x[2]) > 0]
    assert all(c and w > 0 for c, w, _ in shown), f"overlay images not decoded: {loaded}"
    assert "Canopy height (m)" in legend and "40" in legend and "DEMO" in legend, legend

    # the map pixels are really painted: the map screenshot has many colours (not a blank grey box)
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(map_shot).convert("RGB"))
    assert img.shape[0] > 300 and img.shape[1] > 300
    colours = np.unique(img.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 500, f"map screenshot looks blank ({len(colours)} colours)"
    # the overlays cover a good part of the frame with saturated colour (Leaflet's empty background is grey)
    sat = img.max(axis=2).astype(int) - img.min(axis=2).astype(int)
    assert (sat > 40).mean() > 0.1, f"only {(sat > 40).mean():.1%} coloured pixels in the map"
    assert shot.stat().st_size > 10_000
