"""GEO-Bench v1 leaderboard runs on frozen features (library side of ``geobench/run.py`` / ``eo-dinov3 geobench run``).

One call of :func:`run` evaluates a backbone on the selected tasks × partitions × probes × seeds and writes, under
``out/``:

* ``results.jsonl`` — one row per (task, partition, method, seed, metric): value with its 95 % bootstrap CI over
  test samples and every setting needed to reproduce it; appended as results finish, so an interrupted run resumes
  where it stopped (rows are keyed by a fingerprint of the settings);
* ``summary.json`` — per task (mean over seeds, CI) and per suite (classification, segmentation, all): plain mean
  and the official normalised IQM with stratified-bootstrap CI;
* ``leaderboard.md`` — Markdown table; ``tgb_results.csv`` (torchgeo-bench columns);
  ``results_and_parameters.csv`` (GEO-Bench / GEO-Bench-2 leaderboard submission columns);
* ``scores.png`` — per-task bar chart with CIs;
* ``features/`` — the feature cache (reused by later runs with the same backbone weights and settings).

Protocols (:data:`PROTOCOLS`): ``fast`` (kNN-5/20, L-BFGS logistic regression, SGD linear probe, linear seg head;
5 seeds) and ``dinov3`` (the DINOv3 paper: RGB, SGD linear probe with cosine schedule 2 400 it / batch 32 / lr grid
1e-5…1, DPT head at 512 px with lr ∈ {3e-5, 1e-4, 3e-4, 1e-3}, wd 1e-4, 40k it, 10 seeds).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from eo_dinov3.errors import ConfigError
from eo_dinov3.evaluation import features as feat
from eo_dinov3.evaluation import geobench_format as gf
from eo_dinov3.evaluation import probes, scoring

CLS_METHODS = ("knn5", "knn20", "logreg", "linear")
SEG_METHODS = ("seg-linear", "seg-dpt")
DETERMINISTIC = {"knn5", "knn20", "logreg"}  # same result for every seed: computed once, one row per seed


@dataclass
class RunConfig:
    """All settings of a run (a protocol preset, then YAML/CLI overrides)."""

    backbone: str = "dinov3_vitl16"
    weights: str | None = None
    arch_overrides: dict = field(default_factory=dict)
    benchmark_dir: str | None = None
    tasks: str = "all"
    partitions: tuple[str, ...] = ("default",)
    protocol: str = "fast"
    cls_methods: tuple[str, ...] = ("knn5", "knn20", "logreg", "linear")
    seg_methods: tuple[str, ...] = ("seg-linear",)
    primary_cls: str = "logreg"
    primary_seg: str = "seg-linear"
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    bands: str = "rgb"
    normalization: str = "dataset"
    cls_image_size: int = 224
    seg_image_size: int = 224
    feature: str = "cls+mean"  # classification feature: cls | mean | cls+mean
    knn_temperature: float = 0.07
    logreg_Cs: int = 40
    sgd_iters: int = 2400
    sgd_batch: int = 32
    sgd_lrs: tuple[float, ...] = probes.DINOV3_LRS
    seg_iters: int = 500
    seg_batch: int = 8
    seg_lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    seg_dpt_lrs: tuple[float, ...] = (3e-5, 1e-4, 3e-4, 1e-3)
    seg_weight_decay: float = 1e-4
    dpt_channels: int = 256
    n_boot: int = 1000
    agg_boot: int = 1000
    batch_size: int = 32
    device: str = "auto"
    out: str = "results"
    cache_dir: str | None = None
    name: str | None = None
    progress: bool = True
    probe_threads: int = 1

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


PROTOCOLS: dict[str, dict[str, Any]] = {
    "fast": {},
    "dinov3": dict(cls_methods=("linear",), seg_methods=("seg-dpt",), primary_cls="linear", primary_seg="seg-dpt",
                   seeds=tuple(range(10)), bands="rgb", normalization="dataset", cls_image_size=224,
                   seg_image_size=512, sgd_iters=2400, sgd_batch=32, seg_iters=40000, seg_batch=32,
                   seg_dpt_lrs=(3e-5, 1e-4, 3e-4, 1e-3), seg_weight_decay=1e-4),  # fmt: skip
}


def make_config(protocol: str = "fast", config_file: str | os.PathLike | None = None, **overrides: Any) -> RunConfig:
    """Preset ``protocol``, then the keys of a YAML ``config_file``, then ``overrides`` (``None`` values ignored)."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; choose from {sorted(PROTOCOLS)}")
    values: dict[str, Any] = {"protocol": protocol, **PROTOCOLS[protocol]}
    if config_file is not None:
        import yaml

        data = yaml.safe_load(Path(config_file).read_text()) or {}
        if "protocol" in data and data["protocol"] != protocol:
            values = {"protocol": data["protocol"], **PROTOCOLS.get(data["protocol"], {})}
        values.update(data)
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown GEO-Bench run settings {sorted(unknown)}")
    for k in ("partitions", "cls_methods", "seg_methods", "seeds", "sgd_lrs", "seg_lrs", "seg_dpt_lrs"):
        if isinstance(values.get(k), (list, str)):
            v = values[k]
            values[k] = tuple(x.strip() for x in v.split(",") if x.strip()) if isinstance(v, str) else tuple(v)
    if "seeds" in values:
        values["seeds"] = tuple(int(s) for s in values["seeds"])
    cfg = RunConfig(**values)
    bad = [m for m in cfg.cls_methods if m not in CLS_METHODS] + [m for m in cfg.seg_methods if m not in SEG_METHODS]
    if bad:
        raise ConfigError(f"unknown methods {bad}; classification: {CLS_METHODS}, segmentation: {SEG_METHODS}")
    if cfg.feature not in ("cls", "mean", "cls+mean"):
        raise ConfigError(f"feature must be cls, mean or cls+mean, got {cfg.feature!r}")
    return cfg


def parse_seeds(spec: str | Sequence[int]) -> tuple[int, ...]:
    """``"0-4"`` / ``"0,1,2"`` / ``5`` (= 0..4) -> seeds."""
    if not isinstance(spec, str):
        return tuple(int(s) for s in spec)
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-")
            out += list(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return tuple(out)


# ------------------------------------------------------------------------------------------------ results I/O
def _fingerprint(cfg: RunConfig, checksum: str, method: str) -> str:
    relevant: dict[str, Any] = {"checksum": checksum, "backbone": cfg.backbone, "arch": cfg.arch_overrides,
                                "bands": cfg.bands, "normalization": cfg.normalization, "feature": cfg.feature,
                                "method": method}  # fmt: skip
    if method in CLS_METHODS:
        relevant["image_size"] = cfg.cls_image_size
        if method == "logreg":
            relevant["Cs"] = cfg.logreg_Cs
        if method == "linear":
            relevant.update(iters=cfg.sgd_iters, batch=cfg.sgd_batch, lrs=list(cfg.sgd_lrs))
        if method.startswith("knn"):
            relevant["T"] = cfg.knn_temperature
    else:
        relevant.update(image_size=cfg.seg_image_size, iters=cfg.seg_iters, batch=cfg.seg_batch,
                        lrs=list(cfg.seg_lrs if method == "seg-linear" else cfg.seg_dpt_lrs),
                        wd=cfg.seg_weight_decay, dpt_channels=cfg.dpt_channels)  # fmt: skip
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def read_results(path: str | os.PathLike) -> list[dict]:
    """Rows of a ``results.jsonl`` (a truncated last line from an interrupted run is skipped)."""
    p = Path(path)
    rows = []
    if p.is_file():
        for line in p.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _append(path: Path, rows: list[dict]) -> None:
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _code_version() -> str:
    from eo_dinov3 import __version__

    return str(__version__)


# ------------------------------------------------------------------------------------------------ run
def _cls_features(fs: feat.FeatureSet, which: str) -> torch.Tensor:
    return {"cls": fs.cls, "mean": fs.mean, "cls+mean": torch.cat([fs.cls, fs.mean], 1)}[which]


def run(cfg: RunConfig) -> dict:
    """Evaluate and write all outputs (module doc). Returns the summary dict."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    device = cfg.resolved_device()
    tasks = gf.resolve_tasks(cfg.tasks)
    root = gf.geo_bench_dir(cfg.benchmark_dir)
    for p in cfg.partitions:
        if p not in gf.PARTITIONS:
            raise ConfigError(f"unknown partition {p!r}; choose from {gf.PARTITIONS}")
    task_objs = [gf.GeoBenchTask(t, root) for t in tasks]  # fail early on a missing folder

    t_load = time.perf_counter()
    backbone = feat.load_frozen_backbone(cfg.backbone, cfg.weights, device=device, arch_overrides=cfg.arch_overrides)
    print(f"backbone {cfg.backbone} ({backbone.embed_dim}-d, {backbone.depth} blocks, checksum "
          f"{backbone.checksum[:16]}…) on {device} in {time.perf_counter() - t_load:.1f}s")  # fmt: skip
    cache = feat.FeatureCache(cfg.cache_dir or out / "features")
    done = {(r["fingerprint"], r["task"], r["partition"], r["method"], r["seed"]) for r in read_results(results_path)}
    seg_layers = feat.four_even_intervals(backbone.depth)
    timings: dict[str, dict] = {}

    for task in task_objs:
        info = task.info
        seg = info.is_segmentation
        methods = list(cfg.seg_methods if seg else cfg.cls_methods)
        if not methods:
            continue
        bands = task.select_bands(cfg.bands)
        size = cfg.seg_image_size if seg else cfg.cls_image_size
        if size % backbone.patch_size:
            raise ConfigError(f"image size {size} is not a multiple of the patch size {backbone.patch_size}")
        pre = feat.Preprocess(tuple(bands), size, cfg.normalization)
        need_dpt = "seg-dpt" in methods
        layers = seg_layers if need_dpt else ([backbone.depth - 1] if seg else [])
        todo = []
        for part in cfg.partitions:
            for m in methods:
                fp = _fingerprint(cfg, backbone.checksum, m)
                missing = [s for s in cfg.seeds if (fp, info.name, part, m, s) not in done]
                if missing:
                    todo.append((part, m, fp, missing))
        if not todo:
            print(f"{info.name}: all results present, skipped")
            continue
        if seg:
            _check_feature_memory(task, layers, backbone, size)
        n_units = sum(len(task.split(s, p)) for p in {t[0] for t in todo} for s in gf.SPLITS)
        n_units += sum(1 if m in DETERMINISTIC else len(ms) for _, m, _, ms in todo)
        bar = _progress(cfg.progress, total=n_units, desc=info.name)
        t0 = time.perf_counter()
        extract_s = 0.0
        n_img = 0
        for part in dict.fromkeys(t[0] for t in todo):
            fsets = {}
            for split in gf.SPLITS:
                fs = feat.cached_features(cache, task, split, part, backbone, pre, layers=layers,
                                          batch_size=cfg.batch_size, device=device, progress=bar.update)  # fmt: skip
                extract_s += fs.seconds
                n_img += 0 if fs.from_cache else len(fs.names)
                fsets[split] = fs
            for _, method, fp, seeds in (t for t in todo if t[0] == part):
                with _probe_threads(device, cfg.probe_threads):
                    rows = _evaluate(cfg, task, fsets, method, seeds, device, bar)
                common = _common_fields(cfg, backbone, task, part, method, fp, fsets, bands, size, layers)
                for r in rows:
                    r.update(common)
                _append(results_path, rows)
        bar.close()
        timings[info.name] = {"seconds": time.perf_counter() - t0, "extract_seconds": extract_s, "images": n_img}

    summary = summarize(read_results(results_path), cfg, root, backbone.checksum)
    summary["timings"] = timings
    summary["cache"] = {"hits": cache.hits, "misses": cache.misses}
    write_outputs(out, summary, read_results(results_path))
    return summary


def _check_feature_memory(task: gf.GeoBenchTask, layers: Sequence[int], backbone, size: int) -> None:
    """Segmentation caches fp16 patch maps ``[N, L, D, S/p, S/p]`` in memory: refuse clearly when they cannot fit."""
    import psutil

    n = max(len(task.split(s)) for s in gf.SPLITS)  # largest split is held with the others
    n_all = sum(len(task.split(s)) for s in gf.SPLITS)
    per_img = len(layers) * backbone.embed_dim * (size // backbone.patch_size) ** 2 * 2
    need = per_img * n_all
    avail = psutil.virtual_memory().available
    if need > 0.8 * avail:
        raise ConfigError(
            f"{task.name}: cached patch features need {need / 2**30:.1f} GiB ({len(layers)} layers × "
            f"{backbone.embed_dim} × {(size // backbone.patch_size) ** 2} tokens, fp16, {n_all} images; largest split "
            f"{n}) but {avail / 2**30:.1f} GiB are free; use a machine with more memory, --seg-image-size smaller, "
            "or seg-linear (1 layer) instead of seg-dpt (4 layers)"
        )


@contextlib.contextmanager
def _probe_threads(device: str, n: int):
    """Probes train on small feature tensors: on a (shared) CPU, torch intra-op threads mostly add contention, so
    they run with ``n`` threads (``probe_threads``; 0 = leave torch's setting)."""
    old = torch.get_num_threads()
    if device == "cpu" and n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _progress(enabled: bool, total: int, desc: str):
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"{desc:>15}", unit="it", leave=True, dynamic_ncols=True)

    class _Null:
        def update(self, n: int = 1) -> None:
            pass

        def close(self) -> None:
            pass

    return _Null()


def _common_fields(cfg, backbone, task, part, method, fp, fsets, bands, size, layers) -> dict:
    return {
        "benchmark": task.info.benchmark, "task": task.name, "split": "test", "partition": part, "method": method,
        "fingerprint": fp, "n_train": len(fsets["train"].names), "n_val": len(fsets["valid"].names),
        "n_test": len(fsets["test"].names), "bands": ",".join(bands), "image_size": size,
        "normalization": cfg.normalization, "feature": cfg.feature if method in CLS_METHODS else "patch",
        "layers": list(layers) if method == "seg-dpt" else ([backbone.depth - 1] if task.info.is_segmentation else []),
        "model_name": cfg.name or cfg.backbone, "backbone": cfg.backbone, "checkpoint_sha256": backbone.checksum,
        "protocol": cfg.protocol, "code_version": _code_version(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip


def _evaluate(cfg: RunConfig, task: gf.GeoBenchTask, fs: dict[str, feat.FeatureSet], method: str,
              seeds: Sequence[int], device: str, bar) -> list[dict]:  # fmt: skip
    info = task.info
    n_classes = task.n_classes
    rows: list[dict] = []

    def add(seed: int, metrics: dict, hparam: Any, extra: dict | None = None) -> None:
        for name, (v, lo, hi) in metrics.items():
            rows.append({"seed": int(seed), "metric_name": name, "value": v, "ci_low": lo, "ci_high": hi,
                         "n_boot": cfg.n_boot, "best_hparam": hparam, **(extra or {})})  # fmt: skip

    if info.is_segmentation:
        lrs = cfg.seg_lrs if method == "seg-linear" else cfg.seg_dpt_lrs
        head = "linear" if method == "seg-linear" else "dpt"
        split = {s: (fs[s].maps, fs[s].map_cls, fs[s].labels) for s in gf.SPLITS}
        for seed in seeds:
            res = probes.seg_probe(split["train"], split["valid"], split["test"], n_classes, head=head, lrs=lrs,
                                   iters=cfg.seg_iters, batch_size=cfg.seg_batch, seed=seed,
                                   weight_decay=cfg.seg_weight_decay, device=device,
                                   dpt_channels=cfg.dpt_channels)  # fmt: skip
            m = scoring.segmentation_metrics(res.confusions, with_excl0=info.ignore_class0, n_boot=cfg.n_boot, seed=seed)
            add(seed, m, res.best_hparam, {"valid_metric": res.valid_metric})
            bar.update(1)
        return rows

    multilabel = info.kind == "multilabel"
    xt, xv, xs = (_cls_features(fs[s], cfg.feature) for s in gf.SPLITS)
    yt, yv, ys = fs["train"].labels, fs["valid"].labels, fs["test"].labels
    ys_np = ys.numpy()
    if method in DETERMINISTIC:
        if method.startswith("knn"):
            k = int(method[3:])
            scores = probes.knn_scores(xt, yt, xs, n_classes, ks=(k,), temperature=cfg.knn_temperature,
                                       multilabel=multilabel)[k]  # fmt: skip
            hp = None
        else:
            res = probes.logreg_probe(xt, yt, xv, yv, xs, n_classes, multilabel=multilabel,
                                      Cs=np.logspace(-6, 4, cfg.logreg_Cs).tolist(), device=device)  # fmt: skip
            scores, hp = res.scores, res.best_hparam
        m = scoring.classification_metrics(scores, ys_np, multilabel=multilabel, n_boot=cfg.n_boot, seed=0)
        for seed in seeds:
            add(seed, m, hp, {"deterministic": True})
        bar.update(1)
        return rows
    for seed in seeds:  # SGD linear probe
        res = probes.sgd_linear_probe(xt, yt, xv, yv, xs, n_classes, multilabel=multilabel, lrs=cfg.sgd_lrs,
                                      iters=cfg.sgd_iters, batch_size=cfg.sgd_batch, seed=seed, device=device)  # fmt: skip
        m = scoring.classification_metrics(res.scores, ys_np, multilabel=multilabel, n_boot=cfg.n_boot, seed=seed)
        add(seed, m, res.best_hparam, {"valid_metric": res.valid_metric})
        bar.update(1)
    return rows


# ------------------------------------------------------------------------------------------------ summary
OFFICIAL_METRIC = {"accuracy": "Overall_Accuracy", "micro_f1": "Multilabel_F1_Score", "miou": "Multiclass_Jaccard_Index"}


def primary_metric(task: str) -> str:
    """The official GEO-Bench metric of a task: accuracy, micro-F1 (m-bigearthnet) or mIoU."""
    return gf.TASKS[task].metric


def _load_normalizers(root: Path) -> dict[str, tuple[float, float]]:
    norm: dict[str, tuple[float, float]] = {}
    for bench in (gf.CLASSIFICATION, gf.SEGMENTATION):
        p = root / bench / "normalizer.json"
        if p.is_file():
            norm.update(gf.load_normalizer(p))
    return norm


def summarize(rows: list[dict], cfg: RunConfig, root: Path, checksum: str) -> dict:
    """Per-task and per-suite summary of the rows of this backbone (see module doc)."""
    rows = [r for r in rows if r.get("checkpoint_sha256") == checksum]
    normalizer = _load_normalizers(root)
    tasks: dict[str, dict] = {}
    for r in rows:
        key = (r["task"], r["partition"], r["method"], r["metric_name"])
        tasks.setdefault("|".join(key), []).append(r)  # type: ignore[arg-type]
    per_task: dict[str, dict] = {}
    for key, rs in sorted(tasks.items()):
        task, part, method, metric = key.split("|")
        by_seed = {}
        for r in rs:
            by_seed[r["seed"]] = r  # last row per seed wins
        vals = np.array([r["value"] for r in by_seed.values()], dtype=np.float64)
        per_task.setdefault(task, {}).setdefault(part, {}).setdefault(method, {})[metric] = {
            "mean": float(vals.mean()), "std": float(vals.std()), "n_seeds": int(vals.size),
            "seeds": sorted(int(s) for s in by_seed), "values": [float(v) for v in vals],
            "ci_low": float(np.mean([r["ci_low"] for r in by_seed.values()])),
            "ci_high": float(np.mean([r["ci_high"] for r in by_seed.values()])),
            "best_hparam": [r.get("best_hparam") for r in by_seed.values()][0],
        }  # fmt: skip
    suites: dict[str, dict] = {}
    for part in cfg.partitions:
        for suite, names, method in (("classification", gf.CLASSIFICATION_TASKS, cfg.primary_cls),
                                     ("segmentation", gf.SEGMENTATION_TASKS, cfg.primary_seg)):  # fmt: skip
            scores = {t: per_task[t][part][method][primary_metric(t)]["values"] for t in names
                      if primary_metric(t) in per_task.get(t, {}).get(part, {}).get(method, {})}  # fmt: skip
            if scores:
                suites[f"{suite}/{part}"] = {"method": method,
                                             **scoring.aggregate_suite(scores, normalizer, cfg.agg_boot)}  # fmt: skip
        allscores = {}
        for t in gf.TASKS:
            m = cfg.primary_seg if gf.TASKS[t].is_segmentation else cfg.primary_cls
            d = per_task.get(t, {}).get(part, {}).get(m, {})
            if primary_metric(t) in d:
                allscores[t] = d[primary_metric(t)]["values"]
        if allscores:
            suites[f"all/{part}"] = {"method": f"{cfg.primary_cls}+{cfg.primary_seg}",
                                     **scoring.aggregate_suite(allscores, normalizer, cfg.agg_boot)}  # fmt: skip
    cfg_echo = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
    return {"backbone": cfg.backbone, "model_name": cfg.name or cfg.backbone, "checkpoint_sha256": checksum,
            "benchmark_dir": str(root), "normalizer": {k: list(v) for k, v in normalizer.items()},
            "tasks": per_task, "suites": suites, "config": cfg_echo}  # fmt: skip


def write_outputs(out: Path, summary: dict, rows: list[dict]) -> None:
    """``summary.json``, ``leaderboard.md``, ``tgb_results.csv``, ``results_and_parameters.csv``, ``scores.png``."""
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "leaderboard.md").write_text(leaderboard_markdown(summary))
    rows = [r for r in rows if r.get("checkpoint_sha256") == summary["checkpoint_sha256"]]
    _write_tgb_csv(out / "tgb_results.csv", rows)
    _write_leaderboard_csv(out / "results_and_parameters.csv", rows, summary)
    plot_scores(summary, out / "scores.png")


def leaderboard_markdown(summary: dict) -> str:
    cfg = summary["config"]
    lines = [f"## GEO-Bench v1 — {summary['model_name']} (frozen, {cfg['bands']}, protocol `{cfg['protocol']}`)", "",
             f"checkpoint sha256 `{summary['checkpoint_sha256'][:16]}…`; values ×100, mean over seeds "
             "[mean 95 % bootstrap CI over test samples]; normalised IQM with stratified bootstrap over seeds.", ""]  # fmt: skip
    for part in cfg["partitions"]:
        lines += [f"### partition `{part}`", "", "| task | method | metric | score | 95 % CI | seeds |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for task in gf.TASKS:
            for method, metrics in sorted(summary["tasks"].get(task, {}).get(part, {}).items()):
                for metric, d in metrics.items():
                    lines.append(f"| {task} | {method} | {metric} | {100 * d['mean']:.1f} | "
                                 f"[{100 * d['ci_low']:.1f}, {100 * d['ci_high']:.1f}] | {d['n_seeds']} |")  # fmt: skip
        lines += ["", "| suite | method | mean | normalised IQM | 95 % CI |", "|---|---|---|---|---|"]
        for name, s in summary["suites"].items():
            if not name.endswith("/" + part):
                continue
            n = s.get("normalized")
            iq = f"{100 * n['iqm']:.1f}" if n else "n/a (no normalizer)"
            ci = f"[{100 * n['ci_low']:.1f}, {100 * n['ci_high']:.1f}]" if n else ""
            lines.append(f"| {name.split('/')[0]} | {s['method']} | {100 * s['mean']:.1f} | {iq} | {ci} |")
        lines.append("")
    return "\n".join(lines) + "\n"


_TGB_COLUMNS = ["dataset", "method", "metric_name", "metric_value", "ci_lower", "ci_upper", "feature_dim", "best_c",
                "n_train", "n_val", "n_test", "seed", "model", "name", "normalization", "image_size", "interpolation",
                "partition", "bands", "bootstrap"]  # fmt: skip


def _write_tgb_csv(path: Path, rows: list[dict]) -> None:
    method_map = {"knn5": "knn", "knn20": "knn20", "logreg": "linear", "linear": "linear-sgd",
                  "seg-linear": "seg-linear", "seg-dpt": "seg-dpt"}  # fmt: skip
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_TGB_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({"dataset": r["task"], "method": method_map.get(r["method"], r["method"]),
                        "metric_name": r["metric_name"], "metric_value": r["value"], "ci_lower": r["ci_low"],
                        "ci_upper": r["ci_high"], "feature_dim": "", "best_c": r.get("best_hparam") or "",
                        "n_train": r["n_train"], "n_val": r["n_val"], "n_test": r["n_test"], "seed": r["seed"],
                        "model": r["backbone"], "name": r["model_name"], "normalization": r["normalization"],
                        "image_size": r["image_size"], "interpolation": "bilinear", "partition": r["partition"],
                        "bands": r["bands"], "bootstrap": r["n_boot"]})  # fmt: skip


_LB_COLUMNS = ["dataset", "Metric", "experiment_name", "partition name", "backbone", "decoder", "batch_size_selection",
               "early_stop_patience", "n_trials", "Seed", "data_percentages", "batch_size", "weight_decay", "lr",
               "test metric", "frozen_or_full_ft"]  # fmt: skip


def _write_leaderboard_csv(path: Path, rows: list[dict], summary: dict) -> None:
    """GEO-Bench(-2) leaderboard ``results_and_parameters.csv``: the primary method and official metric only."""
    cfg = summary["config"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_LB_COLUMNS)
        w.writeheader()
        for r in rows:
            seg = gf.TASKS[r["task"]].is_segmentation
            if r["method"] != (cfg["primary_seg"] if seg else cfg["primary_cls"]):
                continue
            if r["metric_name"] != primary_metric(r["task"]):
                continue
            part = r["partition"]
            pct = 1.0 if part == "default" else float(part.split("x")[0])
            is_lr = r["method"] in ("linear", "seg-linear", "seg-dpt")
            w.writerow({"dataset": r["task"], "Metric": OFFICIAL_METRIC[r["metric_name"]],
                        "experiment_name": summary["model_name"], "partition name": part.replace("_", " "),
                        "backbone": r["backbone"], "decoder": r["method"], "batch_size_selection": "fixed",
                        "early_stop_patience": "", "n_trials": 1, "Seed": r["seed"], "data_percentages": pct,
                        "batch_size": cfg["seg_batch"] if seg else cfg["sgd_batch"],
                        "weight_decay": cfg["seg_weight_decay"] if seg else 0.0,
                        "lr": r.get("best_hparam") if is_lr else "", "test metric": r["value"],
                        "frozen_or_full_ft": "frozen"})  # fmt: skip


def plot_scores(summary: dict, path: Path) -> None:
    """Bar chart of the primary metric per task (mean over seeds) with mean bootstrap CIs, one panel per suite."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cfg = summary["config"]
    part = cfg["partitions"][0]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, (suite, names, method) in zip(axes, (("classification", gf.CLASSIFICATION_TASKS, cfg["primary_cls"]),
                                                 ("segmentation", gf.SEGMENTATION_TASKS, cfg["primary_seg"]))):  # fmt: skip
        xs, ys, lo, hi = [], [], [], []
        for t in names:
            d = summary["tasks"].get(t, {}).get(part, {}).get(method, {}).get(primary_metric(t))
            if d is None:
                continue
            xs.append(t.removeprefix("m-"))
            ys.append(100 * d["mean"])
            lo.append(100 * (d["mean"] - d["ci_low"]))
            hi.append(100 * (d["ci_high"] - d["mean"]))
        ax.bar(xs, ys, yerr=[np.maximum(lo, 0), np.maximum(hi, 0)], capsize=3, color="#4477aa")
        ax.set_title(f"{suite} ({method})")
        ax.tick_params(axis="x", rotation=35)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("score ×100 (95 % CI)")
    fig.suptitle(f"GEO-Bench v1 — {summary['model_name']} ({part})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
