#!/usr/bin/env python
"""Feature-extraction throughput per GEO-Bench task and the speed-up of a second probe thanks to the feature cache.

For each task: extract train/valid/test features once (images/s of the frozen backbone incl. HDF5 reading and
preprocessing), read them back from the cache, and time one probe (logistic regression for classification, linear
seg head for segmentation). "1st run" = extraction + probe; "2nd run" (another probe or seed) = cache read + probe.
Prints a table; no assertions.

    python bench/geobench_features.py                                   # synthetic fixtures, tiny ViT, CPU
    python bench/geobench_features.py --backbone dinov3_vitl16 --weights W.pth --benchmark-dir $GEO_BENCH_DIR \\
        --device cuda --image-size 224                                  # real data on a GPU (bf16 autocast)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from eo_dinov3.evaluation import features as feat
from eo_dinov3.evaluation import geobench_format as gf
from eo_dinov3.evaluation import probes


def _probe(task: gf.GeoBenchTask, fs: dict, device: str) -> None:
    if task.info.is_segmentation:
        sp = {s: (fs[s].maps, fs[s].map_cls, fs[s].labels) for s in gf.SPLITS}
        probes.seg_probe(sp["train"], sp["valid"], sp["test"], task.n_classes, lrs=(1e-2,), iters=50, device=device)
    else:
        x = {s: torch.cat([fs[s].cls, fs[s].mean], 1) for s in gf.SPLITS}
        probes.logreg_probe(x["train"], fs["train"].labels, x["valid"], fs["valid"].labels, x["test"],
                            task.n_classes, multilabel=task.info.kind == "multilabel", Cs=[1e-2, 1, 100],
                            device=device)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="dinov3_vits16")
    p.add_argument("--weights", default=None)
    p.add_argument("--arch", default='{"embed_dim": 64, "depth": 2, "num_heads": 2}',
                   help="JSON architecture overrides ('{}' for the real architecture)")
    p.add_argument("--benchmark-dir", default=None, help="GEO-Bench root; default: generate the fixtures")
    p.add_argument("--tasks", default="all")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    root = Path(args.benchmark_dir) if args.benchmark_dir else None
    if root is None:
        from eo_dinov3.evaluation.geobench_fixtures import make_fixtures

        root = make_fixtures(Path(tmp.name) / "gb", tasks=args.tasks, size=32)
    bb = feat.load_frozen_backbone(args.backbone, args.weights, device=args.device,
                                   arch_overrides=json.loads(args.arch))  # fmt: skip
    cache = feat.FeatureCache(Path(tmp.name) / "cache")
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"backbone {args.backbone} ({bb.embed_dim}-d, {bb.depth} blocks), {args.image_size} px, {dev_name}, "
          f"{'bf16 autocast' if args.device == 'cuda' else 'fp32'}")  # fmt: skip
    print(f"{'task':<16}{'images':>7}{'extract s':>10}{'img/s':>9}{'cache read s':>13}{'probe s':>9}"
          f"{'1st run s':>10}{'2nd run s':>10}{'speed-up':>9}")  # fmt: skip
    for name in gf.resolve_tasks(args.tasks):
        task = gf.GeoBenchTask(name, root)
        pre = feat.Preprocess(tuple(task.select_bands("rgb")), args.image_size, "dataset")
        layers = [bb.depth - 1] if task.info.is_segmentation else []
        t0 = time.perf_counter()
        fs = {s: feat.cached_features(cache, task, s, "default", bb, pre, layers=layers, batch_size=args.batch_size,
                                      device=args.device) for s in gf.SPLITS}  # fmt: skip
        extract = time.perf_counter() - t0
        n = sum(len(f.names) for f in fs.values())
        t1 = time.perf_counter()
        fs2 = {s: feat.cached_features(cache, task, s, "default", bb, pre, layers=layers, device=args.device)
               for s in gf.SPLITS}  # fmt: skip
        read = time.perf_counter() - t1
        old = torch.get_num_threads()
        torch.set_num_threads(1 if args.device == "cpu" else old)  # probes run single-threaded on CPU (runner)
        t2 = time.perf_counter()
        _probe(task, fs2, args.device)
        probe = time.perf_counter() - t2
        torch.set_num_threads(old)
        first, second = extract + probe, read + probe
        print(f"{name:<16}{n:>7}{extract:>10.2f}{n / max(extract, 1e-9):>9.1f}{read:>13.3f}{probe:>9.2f}"
              f"{first:>10.2f}{second:>10.2f}{first / max(second, 1e-9):>8.1f}x")  # fmt: skip
    print(f"cache: {cache.misses} backbone passes, {cache.hits} cache reads")


if __name__ == "__main__":
    main()
