"""Streamlit canopy-height app (``apps/canopy_map.py``) driven with ``streamlit.testing.v1.AppTest``, plus unit tests
of the library services it uses (:mod:`eo_dinov3.canopy.app_service`).

One AppTest session (module fixture) opens the default map (NEON Yellowstone sample + demo model), then the tests
inject an AOI, upload a GeoTIFF, upload bad files, and fetch every download. Shown numbers are compared with
numbers computed independently from the downloaded COG (``eo_dinov3.canopy.stats.zonal_stats``) and with a direct
run of the tiled mapper. Download payloads are captured where Streamlit registers them (its media-file manager).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
gpd = pytest.importorskip("geopandas")
pytest.importorskip("streamlit")
from streamlit.runtime.media_file_manager import MediaFileManager  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from eo_dinov3.canopy import app_service as svc  # noqa: E402
from eo_dinov3.errors import DataError  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "apps" / "canopy_map.py"
TIMEOUT = 180


# ------------------------------------------------------------------------------------------------------- helpers
class Downloads:
    """Captures what download buttons hand to Streamlit: file name → bytes (deferred callables are called)."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[str | None, object]] = {}
        self._add, self._deferred = MediaFileManager.add, MediaFileManager.add_deferred

    def __enter__(self) -> "Downloads":
        cap = self

        def add(mgr, path_or_data, mimetype, coordinates, file_name=None, is_for_static_download=False):
            if is_for_static_download and file_name:
                cap.files[file_name] = (mimetype, path_or_data)
            return cap._add(mgr, path_or_data, mimetype, coordinates, file_name, is_for_static_download)

        def add_deferred(mgr, data_callable, mimetype, coordinates, file_name=None, **kw):
            if file_name:
                cap.files[file_name] = (mimetype, data_callable)
            return cap._deferred(mgr, data_callable, mimetype, coordinates, file_name, **kw)

        MediaFileManager.add, MediaFileManager.add_deferred = add, add_deferred
        return self

    def __exit__(self, *exc) -> None:
        MediaFileManager.add, MediaFileManager.add_deferred = self._add, self._deferred

    def get(self, suffix: str) -> tuple[str, bytes]:
        names = [n for n in self.files if n.endswith(suffix)]
        assert names, f"no download ending in {suffix}: {list(self.files)}"
        mime, data = self.files[names[-1]]
        data = data() if callable(data) else data
        return names[-1], data.encode() if isinstance(data, str) else bytes(data)


def metric_values(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def parse_m(text: str) -> float:
    return float(text.split()[0])


def run(at, dl: Downloads | None = None):
    if dl is None:
        at.run(timeout=TIMEOUT)
    else:
        with dl:
            at.run(timeout=TIMEOUT)
    assert not at.exception, [e.value for e in at.exception]
    return at


def crop_geotiff(src_path: Path, dst: Path, size: int = 240) -> bytes:
    """A real crop (top-left ``size`` px) of the sample as a GeoTIFF; returns its bytes."""
    from rasterio.windows import Window

    with rasterio.open(src_path) as s:
        w = Window(0, 0, size, size)
        prof = s.profile | {"width": size, "height": size, "transform": s.window_transform(w)}
        with rasterio.open(dst, "w", **prof) as d:
            d.write(s.read(window=w))
    return dst.read_bytes()


@pytest.fixture(scope="module")
def sample() -> Path:
    from eo_dinov3.data.samples import sample_path

    return Path(sample_path("yell_rgb_0p6m"))


@pytest.fixture(scope="module")
def app(tmp_path_factory, sample):
    """The app after its first run on the default region, with a private cache and data folder."""
    tmp = tmp_path_factory.mktemp("app")
    data = tmp / "data"
    (data / "sub").mkdir(parents=True)
    crop_geotiff(sample, data / "sub" / "crop.tif", 200)
    mp = pytest.MonkeyPatch()
    mp.setenv("EO_DINOV3_APP_CACHE", str(tmp / "cache"))
    mp.setenv("EO_DINOV3_DATA_DIR", str(data))
    mp.setenv("EO_DINOV3_APP_SETTINGS", str(tmp / "none.toml"))
    (tmp / "none.toml").write_text("max_upload_mb = 5\n")
    dl = Downloads()
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    run(at, dl)
    yield at, dl, tmp
    mp.undo()


# --------------------------------------------------------------------------------------------------- app tests
def test_default_map_shows_numbers_of_its_chm(app, sample, tmp_path):
    at, dl, _ = app
    assert at.title[0].value == "Canopy-height map"
    assert not at.error
    m = metric_values(at)
    assert set(m) >= {"Mean height (DEMO)", "P95 height (DEMO)", "Max height (DEMO)", "Cover ≥ 5 m (DEMO)",
                      "Forest area (DEMO)", "Image area (valid)"}
    assert any(svc.DEMO_LABEL in w.value for w in at.warning)
    assert any(svc.DEMO_LABEL in c.value for c in at.caption)
    # the downloaded COG is the map; its statistics are the shown numbers
    _, cog = dl.get(".tif")
    chm = tmp_path / "chm.tif"
    chm.write_bytes(cog)
    from eo_dinov3.canopy.stats import zonal_stats

    z = zonal_stats(chm, svc.footprint(chm)).iloc[0]
    assert parse_m(m["Mean height (DEMO)"]) == pytest.approx(z["mean_m"], abs=0.05)
    assert parse_m(m["P95 height (DEMO)"]) == pytest.approx(z["p95_m"], abs=0.05)
    assert parse_m(m["Max height (DEMO)"]) == pytest.approx(z["max_m"], abs=0.05)
    assert float(m["Cover ≥ 5 m (DEMO)"].split()[0]) == pytest.approx(z["cover_5m_pct"], abs=0.05)
    assert float(m["Forest area (DEMO)"].split()[0]) == pytest.approx(z["forest_area_ha"], abs=0.005)
    # 383 x 412 px of 0.6 m = 5.68 ha
    assert float(m["Image area (valid)"].split()[0]) == pytest.approx(383 * 412 * 0.36 / 1e4, abs=0.02)
    # ... and it is exactly what the library's tiled mapper writes for the demo model
    from eo_dinov3.canopy.cli import demo_model
    from eo_dinov3.canopy.mapping import predict_raster

    ref = predict_raster(demo_model(), sample, tmp_path / "ref.tif", progress=False)
    with rasterio.open(chm) as a, rasterio.open(ref) as b, rasterio.open(sample) as s:
        assert (a.width, a.height, a.crs, a.transform) == (s.width, s.height, s.crs, s.transform)
        np.testing.assert_allclose(a.read(1), b.read(1), atol=1e-4)
        assert "DEMO" in a.tags()
    # the area table defaults to the whole image, with the model column labelled as demo
    t = at.dataframe[0].value
    assert list(t["name"]) == ["whole image"]
    assert t["mean_m"].iloc[0] == pytest.approx(z["mean_m"], abs=0.01)
    # honesty panel: GSD, date, 60 m flag, demo statement
    honesty = at.table[0].value.to_string()
    assert "0.6 x 0.6 m vs 0.6 m" in honesty and "Imagery date" in honesty and "60 m" in honesty
    assert svc.DEMO_LABEL in honesty


def test_widget_change_reuses_cached_result(app):
    at, _, _ = app
    at.slider(key="opacity").set_value(0.4)
    run(at)
    assert any("result from cache" in c.value for c in at.caption)
    before = metric_values(at)
    at.slider(key="vmax").set_value(30)
    run(at)
    assert metric_values(at) == before
    assert any("result from cache" in c.value for c in at.caption)


def test_injected_aoi_gives_per_area_table_and_downloads(app, tmp_path):
    at, dl, _ = app
    _, cog = dl.get(".tif")
    chm = tmp_path / "chm.tif"
    chm.write_bytes(cog)
    fp = svc.footprint(chm).to_crs("EPSG:4326").geometry.iloc[0]
    x0, y0, x1, y1 = fp.bounds
    half = {"type": "Polygon", "coordinates": [[[x0, y0], [(x0 + x1) / 2, y0], [(x0 + x1) / 2, y1], [x0, y1],
                                                [x0, y0]]]}
    quarter = {"type": "Polygon", "coordinates": [[[x0, y0], [(x0 + x1) / 2, y0], [(x0 + x1) / 2, (y0 + y1) / 2],
                                                   [x0, (y0 + y1) / 2], [x0, y0]]]}
    at.session_state["drawn_aoi"] = [{"type": "Feature", "properties": {}, "geometry": half},
                                     {"type": "Feature", "properties": {"name": "SW plot"}, "geometry": quarter}]
    dl.files.clear()
    run(at, dl)
    t = at.dataframe[0].value
    assert list(t["name"]) == ["drawn 1", "SW plot"]
    from eo_dinov3.canopy.stats import zonal_stats

    expect = zonal_stats(chm, svc.aoi_from_geojson([{"type": "Feature", "geometry": half},
                                                    {"type": "Feature", "geometry": quarter}]))
    for col in ("mean_m", "median_m", "p95_m", "max_m", "cover_2m_pct", "cover_5m_pct", "forest_area_ha",
                "valid_area_ha"):
        np.testing.assert_allclose(t[col].to_numpy(float), expect[col].to_numpy(float), atol=0.01, err_msg=col)
    # polygon areas: half ≈ 2 × quarter, and close to the valid pixel area
    assert t["area_ha"].iloc[0] == pytest.approx(2 * t["area_ha"].iloc[1], rel=0.01)
    assert t["area_ha"].iloc[0] == pytest.approx(t["valid_area_ha"].iloc[0], rel=0.02)
    # CSV and GeoJSON downloads carry the same rows
    _, csv = dl.get(".csv")
    import pandas as pd

    c = pd.read_csv(io.BytesIO(csv))
    assert list(c["name"]) == ["drawn 1", "SW plot"]
    np.testing.assert_allclose(c["mean_m"], expect["mean_m"], atol=1e-6)
    assert (c["model"].str.contains("DEMO")).all()
    _, gj = dl.get(".geojson")
    fc = json.loads(gj)
    assert [f["properties"]["name"] for f in fc["features"]] == ["drawn 1", "SW plot"]
    assert fc["features"][1]["properties"]["p95_m"] == pytest.approx(expect["p95_m"].iloc[1], abs=1e-6)
    assert fc["features"][0]["geometry"]["type"] == "Polygon"
    # PNG of the map: a real PNG with the colour bar (viridis) and the RGB
    name, png = dl.get(".png")
    from PIL import Image

    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.width > 600 and img.height > 400
    arr = np.asarray(img.convert("RGB")).reshape(-1, 3).astype(int)
    dark_purple = (arr[:, 0] > 50) & (arr[:, 0] < 90) & (arr[:, 1] < 20) & (arr[:, 2] > 70) & (arr[:, 2] < 110)
    assert dark_purple.sum() > 50, "viridis colour bar (0 m end) missing from the PNG"
    # the COG download is a valid Cloud-Optimised GeoTIFF
    cogeo = pytest.importorskip("rio_cogeo.cogeo")
    ok, errors, _ = cogeo.cog_validate(str(chm))
    assert ok, errors
    # clearing the drawn areas returns to the whole-image row
    at.button(key="clear_drawn").click()
    run(at)
    assert list(at.dataframe[0].value["name"]) == ["whole image"]
    # uploaded polygons: a zipped shapefile in the raster's UTM CRS, then a GeoPackage; then a bad file
    import zipfile

    stands = gpd.GeoDataFrame({"name": ["stand A"]}, geometry=[svc.aoi_from_geojson(quarter).geometry.iloc[0]],
                              crs="EPSG:4326").to_crs("EPSG:32612")
    stands.to_file(tmp_path / "stands.shp")
    zpath = tmp_path / "stands.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for ext in ("shp", "shx", "dbf", "prj", "cpg"):
            if (tmp_path / f"stands.{ext}").exists():
                z.write(tmp_path / f"stands.{ext}", f"stands.{ext}")
    for name, payload in (("stands.zip", zpath.read_bytes()), ("stands.gpkg", None)):
        if payload is None:
            stands.to_file(tmp_path / name, driver="GPKG")
            payload = (tmp_path / name).read_bytes()
        at.file_uploader(key="aoi_file").set_value((name, payload, "application/octet-stream"))
        run(at)
        t = at.dataframe[0].value
        assert list(t["name"]) == ["stand A"], name
        assert t["mean_m"].iloc[0] == pytest.approx(expect["mean_m"].iloc[1], abs=0.01)
        assert t["area_ha"].iloc[0] == pytest.approx(t_quarter_area := expect["valid_area_ha"].iloc[1], rel=0.02)
    at.file_uploader(key="aoi_file").set_value(("points.geojson", json.dumps(
        {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {},
                                                    "geometry": {"type": "Point", "coordinates": [x0, y0]}}]}
    ).encode(), "application/geo+json"))
    run(at)
    assert any("Polygon/MultiPolygon" in e.value for e in at.error) and at.metric
    at.file_uploader(key="aoi_file").set_value(None)
    run(at)
    assert list(at.dataframe[0].value["name"]) == ["whole image"] and t_quarter_area > 0


def test_upload_geotiff_then_bad_uploads_keep_app_alive(app, sample, tmp_path):
    at, dl, _ = app
    at.radio(key="source").set_value("Upload a GeoTIFF")
    at.number_input(key="tile").set_value(256)
    run(at)
    assert any("Upload an RGB GeoTIFF" in i.value for i in at.info)
    good = crop_geotiff(sample, tmp_path / "crop.tif", 240)
    at.file_uploader(key="upload").set_value(("my crop.tif", good, "image/tiff"))
    dl.files.clear()
    run(at, dl)
    assert not at.error, [e.value for e in at.error]
    assert any("my crop.tif" in c.value and "240 x 240 px" in c.value for c in at.caption)
    m = metric_values(at)
    _, cog = dl.get("my_crop.tif")
    chm = tmp_path / "up_chm.tif"
    chm.write_bytes(cog)
    from eo_dinov3.canopy.stats import zonal_stats

    z = zonal_stats(chm, svc.footprint(chm)).iloc[0]
    assert parse_m(m["Mean height (DEMO)"]) == pytest.approx(z["mean_m"], abs=0.05)
    assert float(m["Image area (valid)"].split()[0]) == pytest.approx(240 * 240 * 0.36 / 1e4, abs=0.01)
    with rasterio.open(chm) as c:
        assert (c.width, c.height) == (240, 240) and c.tags()["TILE"] == "256"

    # not a TIFF at all
    at.file_uploader(key="upload").set_value(("evil.tif", b"<VRTDataset rasterXSize='1'/>", "image/tiff"))
    run(at)
    assert at.error and "not a TIFF" in at.error[0].value
    assert at.title[0].value == "Canopy-height map" and not at.metric
    # a real GeoTIFF the checks refuse: one band, geographic CRS
    from rasterio.transform import from_origin

    bad = tmp_path / "gray_wgs84.tif"
    with rasterio.open(bad, "w", driver="GTiff", width=64, height=64, count=1, dtype="uint8", crs="EPSG:4326",
                       transform=from_origin(-110.6, 44.96, 1e-5, 1e-5)) as d:
        d.write(np.zeros((1, 64, 64), np.uint8))
    at.file_uploader(key="upload").set_value(("gray.tif", bad.read_bytes(), "image/tiff"))
    run(at)
    assert at.error and "1 band" in at.error[0].value
    rgb_ll = tmp_path / "rgb_wgs84.tif"
    with rasterio.open(rgb_ll, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8", crs="EPSG:4326",
                       transform=from_origin(-110.6, 44.96, 1e-5, 1e-5)) as d:
        d.write(np.full((3, 64, 64), 90, np.uint8))
    at.file_uploader(key="upload").set_value(("rgb.tif", rgb_ll.read_bytes(), "image/tiff"))
    run(at)
    assert at.error and "geographic CRS" in at.error[0].value
    # over the size limit (5 MB from the settings file)
    at.file_uploader(key="upload").set_value(("big.tif", b"II*\x00" + bytes(6 * 2**20), "image/tiff"))
    run(at)
    assert at.error and "5 MB limit" in at.error[0].value
    # the app is still alive: the good file works again (from cache)
    at.file_uploader(key="upload").set_value(("my crop.tif", good, "image/tiff"))
    run(at)
    assert not at.error and metric_values(at)["Mean height (DEMO)"] == m["Mean height (DEMO)"]
    assert any("result from cache" in c.value for c in at.caption)


def test_data_folder_and_bad_model_paths(app):
    at, _, tmp = app
    at.radio(key="source").set_value("Data folder")
    run(at)
    assert at.selectbox(key="data_file").options == ["sub/crop.tif"]
    at.selectbox(key="data_file").set_value("sub/crop.tif")
    run(at)
    assert not at.error and any("sub/crop.tif" in c.value and "200 x 200 px" in c.value for c in at.caption)
    at.selectbox(key="model_kind").set_value("chmv2")
    run(at)
    assert at.error and "Model not loaded" in at.error[0].value and "head" in at.error[0].value
    at.text_input(key="head_path").set_value(str(tmp / "missing_head.pth"))
    at.text_input(key="backbone_path").set_value(str(tmp / "missing_bb.pth"))
    run(at)
    assert at.error and "does not exist" in at.error[0].value
    at.selectbox(key="model_kind").set_value("demo")
    run(at)
    assert not at.error and at.metric


# ------------------------------------------------------------------------------------------------- service tests
def test_data_folder_never_leaves_its_root(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.tif").write_bytes(b"II*\x00")
    outside = tmp_path / "secret.tif"
    outside.write_bytes(b"II*\x00")
    (root / "link.tif").symlink_to(outside)
    (root / "notes.txt").write_text("x")
    assert svc.list_data_files(root) == ["a/x.tif"]
    assert svc.resolve_data_file(root, "a/x.tif") == (root / "a" / "x.tif").resolve()
    for bad in ("../secret.tif", str(outside), "a/../../secret.tif", "link.tif", "notes.txt", "a\\..\\x.tif", ""):
        with pytest.raises(DataError):
            svc.resolve_data_file(root, bad)
    with pytest.raises(DataError, match="no data folder"):
        svc.resolve_data_file(None, "a/x.tif")


def test_upload_is_stored_under_server_name(tmp_path):
    data = b"II*\x00" + b"\x00" * 100
    p = svc.save_upload(data, tmp_path, max_mb=1)
    assert p.parent == tmp_path / "uploads" and p.name == f"{svc.hashlib.sha256(data).hexdigest()}.tif"
    assert p.read_bytes() == data
    with pytest.raises(DataError, match="empty"):
        svc.save_upload(b"", tmp_path, max_mb=1)
    with pytest.raises(DataError, match="not a TIFF"):
        svc.save_upload(b"\x89PNG\r\n\x1a\n", tmp_path, max_mb=1)


def test_run_key_and_progress(sample, tmp_path):
    p = svc.RunParams()
    k = svc.run_key("a" * 64, "demo", p)
    assert k != svc.run_key("b" * 64, "demo", p) != svc.run_key("a" * 64, "demo", svc.RunParams(tile=256))
    inp = svc.validate_raster(sample)
    assert inp.sha256 == svc.file_sha256(sample) and not inp.resampled
    # 383 x 412 px at tile 128 / overlap 32: 4 x 4 tiles, batch 3 -> 4 strips x 2 batches
    assert svc.count_batches(inp, svc.RunParams(tile=128, overlap=32, batch_size=3)) == 8
    pr = svc.Progress(2, 8, 10.0, 30.0)
    assert pr.fraction == 0.25 and "2/8" in pr.text() and "30 s left" in pr.text()


def test_sample_height_and_settings(tmp_path, sample):
    from rasterio.transform import from_origin
    from rasterio.warp import transform as wt

    chm = tmp_path / "chm.tif"
    h = np.arange(100, dtype=np.float32).reshape(10, 10)
    h[0, 0] = np.nan
    with rasterio.open(chm, "w", driver="GTiff", width=10, height=10, count=1, dtype="float32", crs="EPSG:32612",
                       transform=from_origin(528000, 4979000, 0.6, 0.6), nodata=np.nan) as d:
        d.write(h[None])
    lon, lat = wt("EPSG:32612", "EPSG:4326", [528000 + 0.6 * 3.5], [4979000 - 0.6 * 7.5])
    assert svc.sample_height(chm, lon[0], lat[0]) == 73.0
    lon, lat = wt("EPSG:32612", "EPSG:4326", [528000 + 0.3], [4979000 - 0.3])
    assert svc.sample_height(chm, lon[0], lat[0]) is None
    lon, lat = wt("EPSG:32612", "EPSG:4326", [527000], [4979000])
    assert svc.sample_height(chm, lon[0], lat[0]) is None
    s = tmp_path / "app.toml"
    s.write_text(f'data_dir = "{tmp_path}"\nmax_upload_mb = 50\ntile = 256\n')
    st = svc.load_settings({"EO_DINOV3_APP_SETTINGS": str(s), "EO_DINOV3_MAX_UPLOAD_MB": "7"})
    assert st.data_dir == tmp_path.resolve() and st.max_upload_mb == 7 and st.tile == 256
    s.write_text("bogus = 1\n")
    with pytest.raises(svc.ConfigError, match="unknown keys"):
        svc.load_settings({"EO_DINOV3_APP_SETTINGS": str(s)})


def test_height_histogram_counts_hectares_per_class(tmp_path):
    from rasterio.transform import from_origin
    from shapely.geometry import box

    chm = tmp_path / "chm.tif"
    h = np.full((20, 20), 3.5, np.float32)  # 0.6 m pixels
    h[:, 10:] = 12.2
    h[0, :] = np.nan
    h[19, 19] = 75.0  # above the last class: counted in it
    with rasterio.open(chm, "w", driver="GTiff", width=20, height=20, count=1, dtype="float32", crs="EPSG:32612",
                       transform=from_origin(528000, 4979000, 0.6, 0.6), nodata=np.nan) as d:
        d.write(h[None])
    aoi = gpd.GeoDataFrame({"name": ["all", "left"]}, crs="EPSG:32612",
                           geometry=[box(528000, 4979000 - 12, 528012, 4979000),
                                     box(528000, 4979000 - 12, 528006, 4979000)])
    hist = svc.height_histogram(chm, aoi, bin_m=1.0, max_m=60.0)
    px = 0.36 / 1e4
    assert list(hist.columns) == ["all", "left"] and hist.index[3] == 3.0
    assert hist.loc[3.0, "all"] == pytest.approx(19 * 10 * px, rel=1e-3)
    assert hist.loc[12.0, "all"] == pytest.approx((19 * 10 - 1) * px, rel=1e-3)
    assert hist.loc[59.0, "all"] == pytest.approx(px, rel=1e-3)
    assert hist["left"].sum() == pytest.approx(19 * 10 * px, rel=1e-3) and hist.loc[12.0, "left"] == 0


def test_colorize_legend_and_assets_are_offline():
    rgba = svc.colorize(np.array([[0.0, 20.0], [np.nan, 100.0]], np.float32), vmax=40)
    assert rgba[1, 0, 3] == 0 and rgba[0, 0, 3] == 255
    assert tuple(rgba[1, 1, :3]) == tuple(svc.colorize(np.array([[40.0]]), vmax=40)[0, 0, :3])  # clipped at vmax
    html = svc.legend_html(vmax=40, demo=True)
    assert "Canopy height (m)" in html and svc.DEMO_LABEL in html and "http" not in html
    assets = svc.offline_assets()
    assert all(v.startswith("data:") for v in assets.values())
    import base64

    css = base64.b64decode(assets["draw_css"].split(",", 1)[1]).decode()
    assert "images/spritesheet" not in css and "data:image/svg+xml" in css
    m = svc.build_map([svc.MapLayer("x", rgba, [[44.0, -110.0], [44.1, -109.9]])], assets=assets,
                      legend=html)
    page = m.get_root().render()
    assert "cdn.jsdelivr" not in json.dumps(m.default_js) and "ImageOverlay" in page.replace("imageOverlay",
                                                                                            "ImageOverlay")


def test_imagery_date_and_fmt():
    assert svc.imagery_date({"TIFFTAG_DATETIME": "2019:07:01 10:00:00"}).startswith("2019:07:01")
    assert svc.imagery_date({"ACQUISITION_DATE": "2021-06-30", "TIFFTAG_DATETIME": "x"}).startswith("2021-06-30")
    assert svc.imagery_date({"GSD_M": "0.6"}) is None
    assert svc.fmt_m(float("nan")) == "–" and svc.fmt_m(12.345) == "12.3 m" and not math.isnan(1.0)
