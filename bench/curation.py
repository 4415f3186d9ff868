#!/usr/bin/env python
"""Benchmark of the curation pipeline on synthetic embeddings (prints a table; no assertion).

100 000 unit embeddings of dimension 384 in 10 "land-cover types" (type 0 = 90 % of the rows) are written to an
on-disk :class:`~eo_dinov3.data.curation.store.EmbeddingStore` (float16 shards, the embed step's storage path),
then, for each hierarchy in ``--levels`` (default 1000 → 10 and 1000 → 100 → 10, resampling on the upper levels),
clustered by hierarchical k-means, de-duplicated, retrieved from and sampled; the table gives the share of the
dominant type in the archive and in the curated sample against its fair share (1 / number of types).
Peak RSS is the process maximum (``ru_maxrss``); ``--stream`` keeps the rows on disk
and streams every k-means pass from the memory-mapped shards (bounded memory for archives larger than RAM).
``--embed-batches K`` also times the backbone forward (``--backbone``, random weights) on K random batches.

    python bench/curation.py                       # CPU, 2 and 3 levels
    python bench/curation.py --levels 1000,100,10  # one hierarchy
    python bench/curation.py --device cuda         # same code on the GPU (bf16 autocast for the backbone)
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eo_dinov3.data.curation.dedup import near_duplicates  # noqa: E402
from eo_dinov3.data.curation.hierarchy import LevelConfig, hierarchical_kmeans  # noqa: E402
from eo_dinov3.data.curation.retrieval import retrieve_nearest  # noqa: E402
from eo_dinov3.data.curation.sampling import balanced_sample  # noqa: E402
from eo_dinov3.data.curation.store import EmbeddingStore  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def synthetic_store(root: Path, n: int, dim: int, types: int, dominant: float, shard: int, seed: int = 0):
    """Write ``n`` unit embeddings (float16 shards of ``shard`` rows) → (store, true type ``[n]``)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(types, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    counts = np.full(types, int(n * (1 - dominant) / (types - 1)))
    counts[0] = n - counts[1:].sum()
    lab = rng.permutation(np.repeat(np.arange(types), counts))
    store = EmbeddingStore(root)
    store.init({"dim": dim, "num_units": (n + shard - 1) // shard, "dtype": "float16"})
    noise = 0.35 / np.sqrt(dim)  # within-type spread ~0.35 vs ~1.4 between types
    for u, s in enumerate(range(0, n, shard)):
        part = lab[s:s + shard]
        x = centres[part] + noise * rng.normal(size=(len(part), dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        store.write_unit(u, x.astype(np.float16), np.arange(s, s + len(part)), {"rows": len(part)})
    return store, lab


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--levels", nargs="+", default=["1000,10", "1000,100,10"],
                   help="one or more hierarchies, clusters per level bottom first (e.g. 1000,100,10)")
    p.add_argument("--types", type=int, default=10, help="land-cover types (type 0 holds 90 %% of the rows)")
    p.add_argument("--resamples", type=int, default=10, help="resampling steps on levels above the first")
    p.add_argument("--sample-size", type=int, default=3)
    p.add_argument("--n-iters", type=int, default=20)
    p.add_argument("--target", type=int, default=10_000, help="tiles to sample")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--stream", action="store_true", help="stream k-means passes from the shards (no RAM copy)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--embed-batches", type=int, default=0, help="also time K backbone forward passes")
    p.add_argument("--backbone", default="dinov3_vits16")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workdir", default=None, help="where the store is written (default: a temp dir)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    rows: list[tuple[str, str]] = [("python + torch after imports", f"{'':10}peak RSS {peak_rss_mib():7.0f} MiB")]

    def timed(name: str, fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows.append((name, f"{time.perf_counter() - t:8.1f} s   peak RSS {peak_rss_mib():7.0f} MiB"))
        print(f"{name}: {rows[-1][1]}", flush=True)
        return out

    if a.embed_batches:
        from eo_dinov3.data.curation.embedder import Embedder, EmbedderSpec

        emb = Embedder(EmbedderSpec(backbone=a.backbone), device)
        x = torch.rand(a.batch_size, 3, 224, 224)
        emb(x)  # warm-up
        timed(f"embed {a.embed_batches}x{a.batch_size} tiles 224px ({a.backbone})",
              lambda: [emb(x) for _ in range(a.embed_batches)])
        dt = float(rows[-1][1].split()[0])
        rows.append(("  -> throughput", f"{a.embed_batches * a.batch_size / dt:8.1f} tiles/s"))

    fair = 1.0 / a.types
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        store, lab = timed(f"write store ({a.n} x {a.dim} float16)",
                           lambda: synthetic_store(Path(tmp) / "emb", a.n, a.dim, a.types, 0.9, 10_000))
        shares = []
        for spec in a.levels:
            ks = [int(k) for k in spec.split(",")]
            levels = [LevelConfig(ks[0])] + [LevelConfig(k, n_resamples=a.resamples, sample_size=a.sample_size)
                                             for k in ks[1:]]
            tag = f"{len(ks)} levels {'-'.join(map(str, ks))}"
            h = timed(f"[{tag}] hierarchical k-means ({'streamed' if a.stream else 'resident'})",
                      lambda: hierarchical_kmeans(store, levels, n_iters=a.n_iters, seed=0, device=device,
                                                  resident_bytes=0 if a.stream else 4 << 30))
            dup = timed(f"[{tag}] near-duplicates (cos >= 0.98, per leaf)",
                        lambda: near_duplicates(store, h.parents[0], 0.98, priority=h.dist2, device=device))
            seeds = store.take(np.flatnonzero(lab == 3)[:20])
            ret, _ = timed(f"[{tag}] retrieval (k = 10 % of target, 20 seeds)",
                           lambda: retrieve_nearest(store, seeds, a.target // 10, mask=~dup, device=device))
            mask = ~dup
            mask[ret] = False
            pos = timed(f"[{tag}] balanced sample ({a.target - len(ret)})",
                        lambda: balanced_sample(h, a.target - len(ret), seed=0, mask=mask))
            share = np.bincount(lab[pos], minlength=a.types) / len(pos)
            top_types = np.bincount(h.labels(h.n_levels - 1), weights=lab == 0, minlength=ks[-1]) > 0
            whole = float((lab[np.concatenate([ret, pos])] == 0).mean())
            shares.append((tag, share, whole, int(top_types.sum()), len(ret), int(dup.sum()),
                           (lab[ret] == 3).mean()))
    rows.append(("", ""))
    for tag, share, whole, n_top0, n_ret, n_dup, ret_ok in shares:
        rows.append((f"[{tag}] dominant type share: archive -> balanced",
                     f"{(lab == 0).mean():.3f} -> {share[0]:.3f}  (fair {fair:.3f}; minor types "
                     f"{share[1:].min():.3f}-{share[1:].max():.3f}; dominant type in {n_top0} top clusters)"))
        rows.append((f"[{tag}] dominant type share of the whole curated set", f"{whole:.3f}  (with retrieval)"))
        rows.append((f"[{tag}] retrieved tiles of the seed type (type 3)", f"{ret_ok:.3f} of {n_ret}"))
        rows.append((f"[{tag}] duplicates removed", f"{n_dup}"))
    rows.append(("device / torch threads",
                 f"{device} / {torch.get_num_threads()}  (load avg {os.getloadavg()[0]:.1f})"))
    w = max(len(r[0]) for r in rows)
    print("\n" + "-" * (w + 50))
    for name, val in rows:
        print(f"{name:<{w}}  {val}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
