"""Curation report: cluster sizes before/after, duplicates removed, example tiles per cluster.

Files written to ``<output_dir>/report/``:

* ``report.json`` — counts, and per level: number of clusters, largest-cluster share and the *effective number of
  clusters* ``exp(H)`` (``H`` = entropy of the cluster-size distribution) before and after sampling;
* ``cluster_sizes.csv`` — ``level, cluster, size_before, size_after, duplicates``;
* ``cluster_sizes.png`` — top-level cluster sizes before/after (bar chart, log scale);
* ``clusters_grid.png`` — one row per top-level cluster (largest first, at most ``output.grid_clusters``): up to
  ``output.grid_examples`` tiles of the cluster, the ones nearest to their leaf centroids first.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from eo_dinov3.data.curation.hierarchy import Hierarchy
from eo_dinov3.data.curation.store import EmbeddingStore

log = logging.getLogger(__name__)


def balance_stats(sizes: np.ndarray) -> dict[str, float]:
    """``largest_share`` (fraction of points in the largest cluster) and ``effective_clusters`` = ``exp(entropy)``
    (equals the number of non-empty clusters when they are all the same size)."""
    sizes = np.asarray(sizes, np.float64)
    total = sizes.sum()
    if total <= 0:
        return {"largest_share": 0.0, "effective_clusters": 0.0}
    p = sizes[sizes > 0] / total
    return {"largest_share": round(float(p.max()), 4),
            "effective_clusters": round(float(np.exp(-(p * np.log(p)).sum())), 2)}


def _thumb(path: str, size: int, bands: tuple[int, ...]):
    from PIL import Image

    from eo_dinov3.data.tiles import BadTile, TileOptions, load_tile

    try:
        t = load_tile(path, TileOptions(bands=bands[:3] if len(bands) >= 3 else bands, max_nodata_fraction=1.0,
                                        min_std=0.0))
    except BadTile:
        return Image.new("RGB", (size, size), (60, 0, 0))
    a = t.numpy()
    a = np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a[:3]
    return Image.fromarray(np.ascontiguousarray(a.transpose(1, 2, 0))).resize((size, size), Image.BILINEAR)


def example_grid(paths_per_row: list[list[str]], labels: list[str], out: Path, *, thumb: int = 96,
                 bands: tuple[int, ...] = (1, 2, 3)) -> Path:
    """A PNG with one row of tile thumbnails (``thumb`` px) per cluster and a text label on the left."""
    from PIL import Image, ImageDraw

    cols = max((len(p) for p in paths_per_row), default=1)
    label_w, pad = 150, 4
    img = Image.new("RGB", (label_w + cols * (thumb + pad) + pad, len(paths_per_row) * (thumb + pad) + pad),
                    (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for r, (paths, label) in enumerate(zip(paths_per_row, labels)):
        y = pad + r * (thumb + pad)
        for i, line in enumerate(label.split("\n")):
            draw.text((pad, y + 4 + 14 * i), line, fill=(0, 0, 0))
        for c, p in enumerate(paths):
            img.paste(_thumb(p, thumb, bands), (label_w + pad + c * (thumb + pad), y))
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out


def _size_plot(before: np.ndarray, after: np.ndarray, out: Path) -> Path | None:
    try:
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is optional
        return None
    order = np.argsort(-before)
    x = np.arange(len(before))
    fig, ax = plt.subplots(figsize=(max(6, len(x) * 0.25), 3.5))
    ax.bar(x - 0.2, before[order], 0.4, label="all tiles")
    ax.bar(x + 0.2, after[order], 0.4, label="curated")
    ax.set_yscale("log")
    if len(x) <= 60:
        ax.set_xticks(x, [str(int(c)) for c in order])
    ax.set_xlabel("top-level cluster (largest first)")
    ax.set_ylabel("tiles")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_report(cfg: dict[str, Any], manifest: str, store: EmbeddingStore, h: Hierarchy, sel: dict[str, Any],
                 out: Path) -> dict[str, Any]:
    """Write the report files (module docstring); returns the ``report.json`` content."""
    from eo_dinov3.data.curation.pipeline import read_rows

    out.mkdir(parents=True, exist_ok=True)
    n = h.num_points
    chosen = np.zeros(n, bool)
    chosen[sel["positions"]] = True
    dup = sel["duplicates"]
    levels = []
    with open(out / "cluster_sizes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["level", "cluster", "size_before", "size_after", "duplicates"])
        for lv in range(h.n_levels):
            before, after, d = h.sizes(lv), h.sizes(lv, chosen), h.sizes(lv, dup)
            for c in range(len(before)):
                w.writerow([lv + 1, c, int(before[c]), int(after[c]), int(d[c])])
            levels.append({"level": lv + 1, "clusters": int(len(before)), "non_empty": int((before > 0).sum()),
                           "before": balance_stats(before), "after": balance_stats(after)})
    top = h.n_levels - 1
    before, after = h.sizes(top), h.sizes(top, chosen)
    files = {"sizes_csv": str(out / "cluster_sizes.csv")}
    plot = _size_plot(before, after, out / "cluster_sizes.png")
    if plot:
        files["sizes_png"] = str(plot)
    # example grid: tiles nearest their leaf centroid, per top-level cluster
    o = cfg["output"]
    top_lab = h.labels(top)
    rows_pos, labels = [], []
    for c in np.argsort(-before)[: int(o["grid_clusters"])]:
        if before[c] == 0:
            continue
        members = np.flatnonzero(top_lab == c)
        members = members[np.argsort(h.dist2[members], kind="stable")][: int(o["grid_examples"])]
        rows_pos.append(members)
        labels.append(f"cluster {int(c)}\n{int(before[c])} tiles\n-> {int(after[c])} kept")
    if rows_pos:
        ids = store.ids()
        flat = np.concatenate(rows_pos)
        e = cfg["embed"]
        df = read_rows(manifest, ids[flat], block_rows=int(e["block_rows"]),
                       csv_block_bytes=int(e["csv_block_bytes"]))
        paths = list(df["path"])
        split = np.cumsum([len(r) for r in rows_pos])[:-1]
        grid_paths = [list(p) for p in np.split(np.array(paths, dtype=object), split)]
        files["grid_png"] = str(example_grid(grid_paths, labels, out / "clusters_grid.png",
                                             bands=tuple(int(b) for b in e["bands"])))
    report = {"embedded": n, "duplicates_removed": int(dup.sum()), "selected": int(chosen.sum()),
              "retrieval": sel["n_retrieval"], "balanced": sel["n_balanced"], "levels": levels,
              "top_level_sizes_before": [int(x) for x in before], "top_level_sizes_after": [int(x) for x in after],
              "files": files}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return {"report": report}
