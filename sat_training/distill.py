#!/usr/bin/env python
"""Multi-student distillation from a frozen DINOv3 teacher (ViT and ConvNeXt students in one job).

    python sat_training/pretrain.py                       # once: trains the CPU-demo teacher into runs/demo_cpu
    python sat_training/distill.py                        # CPU demo: 2 students, outputs in runs/distill_demo/
    python sat_training/distill.py --config configs/distill/demo_cpu.yaml distill.teacher=/path/teacher_checkpoint.pth
    torchrun --nproc_per_node 8 sat_training/distill.py --config ...   # each student on its distill.students[i].ranks

Any key can be overridden as ``key=value`` (pretraining keys of eo_dinov3/ssl/default_config.yaml, plus
``distill.teacher``, ``distill.output_dir``). Runs resume from the newest common student checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eo_dinov3.errors import EODinoError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "distill" / "demo_cpu.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Multi-student distillation (DINO + iBOT + KoLeo against a frozen teacher, one teacher forward "
        "per step shared by all students). Without arguments: the CPU demo.",
        epilog="Overrides: key=value pairs, e.g. distill.teacher=runs/demo_cpu train.max_iterations=10",
    )
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    p.add_argument("--no-resume", action="store_true", help="ignore existing student checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics.jsonl per student)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from eo_dinov3.ssl.distill import distill, load_distill_config

    overrides = list(args.overrides)
    if args.no_resume:
        overrides.append("checkpointing.resume=never")
    try:
        dcfg = load_distill_config(args.config, overrides)
        if dcfg.base.data.path is None:
            from eo_dinov3.data.samples import sample_path

            dcfg.base.data.path = str(sample_path("tiles").parent)
        result = distill(dcfg, progress=not args.no_progress)
    except EODinoError as e:
        print(f"distill: error: {e}", file=sys.stderr)
        return 2
    print(f"finished at iteration {result.iteration}; teacher forwards: {result.teacher_forwards}")
    for name, losses in result.losses.items():
        first, last = (losses[0], losses[-1]) if losses else (float("nan"), float("nan"))
        print(f"  {name}: loss {first:.3f} -> {last:.3f}; backbone (EMA): {result.exports.get(name)}")
    print(f"  summary: {result.output_dir / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
