"""Streamlit canopy-height map for forest analysts: ``streamlit run apps/canopy_map.py``.

Opens on the NEON Yellowstone forest sample (fetched by ``eo-dinov3 samples fetch``) with the offline demo model,
so a first-time user sees a map at once. All computation lives in :mod:`eo_dinov3.canopy.app_service`; this file is
only the user interface (sidebar → input → cached tiled inference → map → areas of interest → downloads → honesty
panel). Settings: sidebar, environment variables or a settings file (see ``docs/app.md``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import streamlit as st

from eo_dinov3.canopy import app_service as svc
from eo_dinov3.errors import EODinoError

SAMPLE_KEY = "yell_rgb_0p6m"
MODEL_KINDS = {
    "demo": f"Demo model (offline, random weights) — {svc.DEMO_LABEL}",
    "chmv2": "CHMv2 official: head + SAT-493M backbone (.pth files)",
    "trained": "Head trained with train_canopy_head.py + backbone",
    "hf": "CHMv2 Hugging Face folder / .safetensors",
}
SOURCES = ("Sample: NEON Yellowstone forest, 0.6 m", "Upload a GeoTIFF", "Data folder")


# ------------------------------------------------------------------------------------------------ cached services
@st.cache_resource(show_spinner="Loading the model…")
def get_model(spec: svc.ModelSpec, spec_key: str) -> svc.LoadedModel:  # spec_key: file identity (reload on change)
    return svc.load_model(spec)


@st.cache_resource
def get_assets() -> dict[str, str]:
    return svc.offline_assets()


@st.cache_data(show_spinner=False, max_entries=64)
def get_sha(path: str, size: int, mtime_ns: int) -> str:
    return svc.file_sha256(path)


@st.cache_data(show_spinner=False, max_entries=64)
def get_validated(path: str, sha: str, model_gsd_m: float) -> svc.ValidatedInput:
    return svc.validate_raster(path, model_gsd_m=model_gsd_m, sha256=sha)


@st.cache_data(show_spinner=False, max_entries=32)
def get_overlay(path: str, kind: str, key: str) -> svc.Overlay:  # key: file identity
    return svc.raster_overlay(path, kind=kind)


@st.cache_data(show_spinner=False, max_entries=32)
def get_table(chm_path: str, key: str, aoi_json: str, model: svc.ModelInfo):
    gdf = svc.aoi_from_geojson(json.loads(aoi_json))
    table = svc.area_table(chm_path, gdf, model=model)
    hist = svc.height_histogram(chm_path, gdf)
    return table, hist


# ------------------------------------------------------------------------------------------------------- helpers
def demo_tag(info: svc.ModelInfo) -> str:
    return " (DEMO)" if info.is_demo else ""


def demo_caption(info: svc.ModelInfo) -> None:
    if info.is_demo:
        st.caption(f":red[**{svc.DEMO_LABEL}**] — these numbers come from random weights.")


def sidebar(settings: svc.AppSettings) -> tuple[svc.ModelSpec, str, object, dict]:
    sb = st.sidebar
    sb.header("Model")
    kind = sb.selectbox("Model", list(MODEL_KINDS), format_func=MODEL_KINDS.get, key="model_kind")
    head = backbone = None
    locked = not settings.allow_model_paths
    if kind in ("chmv2", "trained"):
        head = sb.text_input("Head checkpoint (.pth)", value=str(settings.head or ""), key="head_path",
                             disabled=locked,
                             help="official dinov3_vitl16_chmv2_dpt_head-3703d643.pth, or a head saved by "
                                  "train_canopy_head.py; env EO_DINOV3_CHM_HEAD")
        backbone = sb.text_input("Backbone (.pth)", value=str(settings.backbone or ""), key="backbone_path",
                                 disabled=locked,
                                 help="dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth; env EO_DINOV3_CHM_BACKBONE")
    elif kind == "hf":
        head = sb.text_input("HF CHMv2 folder or .safetensors", value=str(settings.hf or ""), key="hf_path",
                             disabled=locked)
    spec = svc.ModelSpec(kind, head or None, backbone or None)

    sb.header("Input")
    source = sb.radio("Image", SOURCES, key="source")
    picked = None
    if source == SOURCES[1]:
        picked = sb.file_uploader(f"RGB GeoTIFF (≤ {settings.max_upload_mb} MB, projected CRS, ~0.6 m)",
                                  type=["tif", "tiff"], key="upload")
    elif source == SOURCES[2]:
        files = svc.list_data_files(settings.data_dir)
        if settings.data_dir is None:
            sb.info("No data folder configured: set EO_DINOV3_DATA_DIR or data_dir in the settings file.")
        picked = sb.selectbox("GeoTIFF in the data folder", files, index=None, key="data_file",
                              placeholder="choose a file" if files else "no .tif files found")

    sb.header("Display")
    view = {
        "opacity": sb.slider("Canopy-height opacity", 0.0, 1.0, 0.7, 0.05, key="opacity"),
        "vmax": float(sb.slider("Colour scale top (m)", 5, 80, int(svc.DEFAULT_VMAX_M), 5, key="vmax")),
        "cover_m": float(sb.radio("Cover map threshold", (5.0, 2.0), format_func=lambda v: f"≥ {v:g} m",
                                  horizontal=True, key="cover_m")),
        "basemap": sb.checkbox("OpenStreetMap basemap (needs internet)", value=False, key="basemap"),
    }
    with sb.expander("Inference settings"):
        view["tile"] = int(st.number_input("Tile (px, multiple of 16)", 64, 2048, settings.tile, 16, key="tile"))
        view["overlap"] = int(st.number_input("Overlap (px)", 0, 1024, settings.overlap, 16, key="overlap"))
        view["batch"] = int(st.number_input("Batch size", 1, 64, settings.batch_size, key="batch"))
    sb.caption(f"Settings from: {settings.source}. Results cache: {settings.cache_dir}")
    return spec, source, picked, view


def resolve_input(source: str, picked, settings: svc.AppSettings) -> tuple[str, str, str] | None:
    """(path, sha256, display name) of the chosen raster; None when nothing is chosen yet."""
    if source == SOURCES[0]:
        from eo_dinov3.data.samples import sample_path

        try:
            p = sample_path(SAMPLE_KEY)
        except Exception as e:  # noqa: BLE001 - samples missing: tell the user how to fetch them
            raise svc.DataError(f"the sample image is missing ({e}); run `eo-dinov3 samples fetch` once") from None
        name = "NEON YELL sample"
    elif source == SOURCES[1]:
        if picked is None:
            st.info("Upload an RGB GeoTIFF in the sidebar (uint8 or 16-bit, projected CRS, ideally ~0.6 m pixels).")
            return None
        p = svc.save_upload(picked.getvalue(), settings.cache_dir, max_mb=settings.max_upload_mb)
        return str(p), p.stem, Path(picked.name).name
    else:
        if not picked:
            st.info("Choose a GeoTIFF from the data folder in the sidebar.")
            return None
        p = svc.resolve_data_file(settings.data_dir, picked)
        name = picked
    stt = Path(p).stat()
    return str(p), get_sha(str(p), stt.st_size, stt.st_mtime_ns), name


def current_aoi(chm_overlay_bounds) -> tuple[dict | None, str]:
    """GeoJSON FeatureCollection of the areas of interest (drawn + uploaded) or None; and a description."""
    feats = list(st.session_state.get("drawn_aoi") or [])
    for i, f in enumerate(feats):
        f.setdefault("properties", {})
        f["properties"].setdefault("name", f"drawn {i + 1}")
    up = st.session_state.get("aoi_upload_geojson")
    if up:
        feats += up["features"]
    if not feats:
        return None, "whole image"
    return {"type": "FeatureCollection", "features": feats}, f"{len(feats)} area(s)"


# ---------------------------------------------------------------------------------------------------------- main
def main() -> None:
    st.set_page_config(page_title="Canopy height map", page_icon="🌲", layout="wide")
    st.title("Canopy-height map")
    settings = svc.load_settings()
    # the stated limit is the smaller of ours and Streamlit's own (server.maxUploadSize, MB)
    settings = dataclasses.replace(settings, max_upload_mb=min(settings.max_upload_mb,
                                                                   int(st.get_option("server.maxUploadSize"))))
    spec, source, picked, view = sidebar(settings)

    try:
        loaded = get_model(spec, spec.key())
    except EODinoError as e:
        st.error(f"Model not loaded: {e}")
        st.stop()
    except Exception as e:  # noqa: BLE001 - an unexpected file: say so, keep the app alive
        st.error(f"Model not loaded ({type(e).__name__}): {str(e).splitlines()[0][:300]}")
        st.stop()
    info = loaded.info
    if info.is_demo:
        st.warning(f"**{svc.DEMO_LABEL}.** The offline demo model has random weights: it shows how the app works, "
                   "not real heights. Choose the official CHMv2 model in the sidebar for real canopy heights.")
    try:
        chosen = resolve_input(source, picked, settings)
        if chosen is None:
            st.stop()
        path, sha, name = chosen
        inp = get_validated(path, sha, info.gsd_m)
    except EODinoError as e:
        st.error(f"Cannot use this image: {e}")
        st.stop()
    for note in inp.notes:
        st.warning(note)

    params = svc.RunParams(tile=view["tile"], overlap=view["overlap"], batch_size=view["batch"],
                           device=settings.device)
    bar = st.empty()
    try:
        bar.progress(0.0, text=f"canopy height: {inp.width} x {inp.height} px, "
                               f"{svc.count_batches(inp, params)} model batches…")
        result = svc.run_chm(inp, loaded, params, settings.cache_dir,
                             progress=lambda pr: bar.progress(pr.fraction, text=pr.text()))
    except EODinoError as e:
        bar.empty()
        st.error(f"Mapping failed: {e}")
        st.stop()
    except (RuntimeError, ValueError, OSError) as e:  # e.g. out of memory, model output shape
        bar.empty()
        st.error(f"Mapping failed ({type(e).__name__}): {str(e).splitlines()[0][:300]}")
        st.stop()
    bar.empty()
    st.session_state["result_key"] = result.key
    st.caption(f"**{name}** — {inp.width} x {inp.height} px, {inp.crs}, GSD {inp.gsd_m[0]:.2f} m; model "
               f"{info.label}; " + ("result from cache" if result.cached else f"computed in {result.seconds:.1f} s"))

    # ---- headline numbers (whole image)
    s = result.summary
    tag = demo_tag(info)
    cols = st.columns(6)
    cols[0].metric(f"Mean height{tag}", svc.fmt_m(s["mean_m"]))
    cols[1].metric(f"P95 height{tag}", svc.fmt_m(s["p95_m"]))
    cols[2].metric(f"Max height{tag}", svc.fmt_m(s["max_m"]))
    cols[3].metric(f"Cover ≥ 5 m{tag}", f"{s['cover_5m_pct']:.1f} %")
    cols[4].metric(f"Forest area{tag}", f"{s['forest_area_ha']:.2f} ha")
    cols[5].metric("Image area (valid)", f"{s['valid_area_ha']:.2f} ha")
    demo_caption(info)
    if s.get("suspect_pct", 0) > 0:
        st.warning(f"{s['suspect_pct']:.2f} % of pixels are above {svc.SUSPECT_HEIGHT_M:g} m: suspect (buildings, "
                   "towers or artefacts), not trees.")

    # ---- map
    key = result.key
    rgb = get_overlay(inp.path, "rgb", inp.sha256)
    chm = get_overlay(str(result.path), "chm", key)
    aoi_geojson, aoi_desc = current_aoi(chm.bounds)
    layers = [
        svc.MapLayer("RGB image", rgb.array, rgb.bounds, 1.0, True),
        svc.MapLayer(f"Canopy height (m){tag}", svc.colorize(chm.array, vmax=view["vmax"]), chm.bounds,
                     view["opacity"], True),
        svc.MapLayer(f"Canopy cover ≥ {view['cover_m']:g} m{tag}", svc.cover_overlay(chm, view["cover_m"]),
                     chm.bounds, view["opacity"], False),
    ]
    fmap = svc.build_map(layers, assets=get_assets(), aoi_geojson=aoi_geojson,
                         basemap=view["basemap"], legend=svc.legend_html(vmax=view["vmax"], demo=info.is_demo))
    left, right = st.columns([3, 1])
    with left:
        try:
            from streamlit_folium import st_folium

            out = st_folium(fmap, height=560, use_container_width=True, key="map",
                            returned_objects=["last_clicked", "all_drawings"]) or {}
        except Exception as e:  # noqa: BLE001 - the map component is optional for the numbers below
            st.error(f"Map component failed: {e}")
            out = {}
    drawn = out.get("all_drawings")
    if drawn:
        polys = [f for f in drawn if (f.get("geometry") or {}).get("type") in ("Polygon", "MultiPolygon")]
        if polys and polys != st.session_state.get("drawn_aoi"):
            st.session_state["drawn_aoi"] = polys
            st.rerun()
    clicked = out.get("last_clicked")
    with right:
        st.markdown("**Click the map to read a height**")
        if clicked:
            h = svc.sample_height(result.path, clicked["lng"], clicked["lat"])
            st.metric(f"Height at clicked point{tag}", svc.fmt_m(h) if h is not None else "no data")
            st.caption(f"lat {clicked['lat']:.6f}, lon {clicked['lng']:.6f}")
            demo_caption(info)
        st.caption("Layers: use the switch at the top right of the map. Draw polygons or rectangles with the tools "
                   "on the left to get per-area statistics.")

    # ---- areas of interest
    st.subheader("Areas of interest")
    c1, c2 = st.columns([2, 1])
    aoi_file = c1.file_uploader("Polygons: GeoJSON, GPKG or zipped shapefile", type=["geojson", "json", "gpkg", "zip"],
                                key="aoi_file")
    if aoi_file is not None:
        try:
            gdf = svc.read_aoi_bytes(aoi_file.name, aoi_file.getvalue(), settings.cache_dir)
            fc = json.loads(svc.stats_geojson_bytes(gdf[["name", "geometry"]]))
            if fc != st.session_state.get("aoi_upload_geojson"):
                st.session_state["aoi_upload_geojson"] = fc
                st.rerun()
        except EODinoError as e:
            st.error(f"Cannot use these polygons: {e}")
    elif st.session_state.get("aoi_upload_geojson") and st.session_state.get("_aoi_file_seen"):
        st.session_state["aoi_upload_geojson"] = None
        st.rerun()
    st.session_state["_aoi_file_seen"] = aoi_file is not None
    if c2.button("Clear drawn areas", key="clear_drawn"):
        st.session_state["drawn_aoi"] = []
        st.rerun()

    fc = aoi_geojson or json.loads(svc.stats_geojson_bytes(svc.footprint(result.path)))
    try:
        table, hist = get_table(str(result.path), key, json.dumps(fc, sort_keys=True), info)
    except EODinoError as e:
        st.error(f"Area statistics failed: {e}")
        st.stop()
    st.caption(f"Statistics per area ({aoi_desc}); the same numbers as `eo-dinov3 chm stats`. Cover = share of the "
               "valid area at or above the height; forest area = FAO definition on ~0.5 ha cells.")
    show = table.drop(columns="geometry")[[c for c in svc.TABLE_COLUMNS if c in table.columns]]
    st.dataframe(show.round(2), hide_index=True, width="stretch", key="area_table")
    demo_caption(info)
    st.markdown(f"**Height histogram per area** (hectares per 1 m class){tag}")
    st.bar_chart(hist, x_label="height (m)", y_label="area (ha)", height=220)

    # ---- downloads
    st.subheader("Downloads")
    stem = Path(name).stem.replace(" ", "_")
    d = st.columns(4)
    chm_path = result.path
    d[0].download_button("Canopy height (COG GeoTIFF)", data=lambda: Path(chm_path).read_bytes(),
                         file_name=f"canopy_height_{stem}.tif", mime="image/tiff", key="dl_cog")
    d[1].download_button("Area table (CSV)", data=svc.stats_csv_bytes(table), file_name=f"areas_{stem}.csv",
                         mime="text/csv", key="dl_csv")
    d[2].download_button("Area table (GeoJSON)", data=svc.stats_geojson_bytes(table),
                         file_name=f"areas_{stem}.geojson", mime="application/geo+json", key="dl_geojson")
    aoi_gdf = svc.aoi_from_geojson(aoi_geojson) if aoi_geojson else None
    vmax, opacity, demo, path_rgb = view["vmax"], view["opacity"], info.is_demo, inp.path
    d[3].download_button("Map (PNG with legend)",
                         data=lambda: svc.map_png(path_rgb, chm_path, vmax=vmax, opacity=opacity, aoi=aoi_gdf,
                                                  title=f"Canopy height — {name} ({info.name})", demo=demo),
                         file_name=f"canopy_map_{stem}.png", mime="image/png", key="dl_png")

    # ---- honesty panel
    with st.expander("About these numbers (model, GSD, date, artefacts)", expanded=True):
        rows = svc.honesty_rows(inp, result, info)
        st.table({"item": [r[0] for r in rows], "statement": [r[1] for r in rows]})
        for note in result.notes:
            st.caption(f"Mapper note: {note}")


main()
