"""``eo-dinov3 curate``: balanced curation of a tile manifest (see :mod:`eo_dinov3.data.curation.pipeline`).

Examples::

    eo-dinov3 curate --config configs/curation/sample_tiles.yaml
    eo-dinov3 curate --config configs/curation/archive_vitl_sat.yaml manifest=/data/tiles.parquet \\
        output_dir=/data/curated sample.target_size=1000000
    torchrun --nproc-per-node 8 -m eo_dinov3 curate --config ... --steps embed,cluster,sample,report
    eo-dinov3 curate --config ... --dask tcp://scheduler:8786      # embed step on a dask.distributed cluster
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence

DESCRIPTION = ("Embed a tile manifest with a backbone, cluster the embeddings by hierarchical k-means and write a "
               "balanced (plus optional seed-retrieved) curated manifest with a report. Settings: a YAML file "
               "(configs/curation/) and key=value overrides. Steps whose outputs exist are skipped (resume).")

STEPS = ("embed", "cluster", "sample", "report")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (configs/curation/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. sample.target_size=5000")
    p.add_argument("--steps", default=",".join(STEPS),
                   help=f"comma-separated steps to run (default: all of {','.join(STEPS)})")
    p.add_argument("--dask", metavar="ADDRESS",
                   help="run the embed step on a dask.distributed scheduler (tcp://host:8786) or 'local:N' "
                        "(a local cluster of N worker processes)")


def run(args: argparse.Namespace) -> int:
    from eo_dinov3.data.curation.pipeline import load_config, run_curation
    from eo_dinov3.errors import ConfigError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    steps = tuple(s.strip() for s in args.steps.split(",") if s.strip())
    bad = [s for s in steps if s not in STEPS]
    if bad:
        raise ConfigError(f"unknown step(s) {bad}; choose from {list(STEPS)}")
    cfg = load_config(args.config, args.overrides)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per rank
        import torch

        if torch.cuda.is_available() and cfg["device"] in ("auto", "cuda"):
            cfg["device"] = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    client = None
    if args.dask:
        from distributed import Client, LocalCluster

        if args.dask.startswith("local:"):
            client = Client(LocalCluster(n_workers=int(args.dask[6:]), threads_per_worker=1))
        else:
            client = Client(args.dask)
    try:
        summary = run_curation(cfg, steps=steps, rank=rank, world_size=world, dask_client=client)
    finally:
        if client is not None:
            client.close()
    if rank == 0:
        short = {k: v for k, v in summary.items() if k != "report"}
        if "report" in summary:
            rep = summary["report"]
            short["levels"] = rep["levels"]
            short["files"] = rep["files"]
        print(json.dumps(short, indent=1, default=str))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("curate", help="balanced curation of a tile archive by hierarchical k-means",
                              description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:

    parser = argparse.ArgumentParser(prog="curate.py", description=DESCRIPTION)
    add_arguments(parser)
    from eo_dinov3.cli import run_standalone

    return run_standalone(parser, run, argv)
