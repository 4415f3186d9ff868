#!/usr/bin/env python
"""Throughput, peak memory and model FLOP utilisation (MFU) of one full DINOv3 pretraining step.

For each model (default ViT-S/16 and ViT-L/16) an :class:`eo_dinov3.ssl.meta_arch.SSLMetaArch` is built from the
package defaults (``eo_dinov3.ssl.config.load_config``) with the 7B recipe's crops — 2 global crops of 256 px and 8
local crops of 112 px per image — and the official heads (DINO and iBOT: 3 layers, 2048 wide, 256 bottleneck,
65 536 prototypes, ``--prototypes`` to change). One timed step is exactly what the trainer does per iteration:

    zero_grad → forward_backward (teacher fwd on globals + Sinkhorn-Knopp, student list fwd on globals (iBOT-masked)
    and locals, DINO + KoLeo + iBOT losses, backward) → per-sub-module grad clipping (3.0) → AdamW step (the real
    parameter groups: layer-wise lr decay, patch-embed multiplier, no wd on norms/biases) → EMA teacher update

Batches are synthetic: random crops collated by :func:`eo_dinov3.ssl.collate.collate_data_and_cast` with real iBOT
block masks (:class:`eo_dinov3.ssl.masking.MaskingGenerator`, mask probability 0.5, ratios 0.1–0.5); a few batches are
built once, moved to the device and cycled, so **data loading and augmentation are not timed**.

Analytic FLOPs per step (1 multiply-add = 2 FLOPs; ``shared/reference/performance.md`` §1–§2):

    F_bb(S) = 2·N_p·C·P²·D + L·(2·N·W_blk + 4·N²·D)      one crop of side S through the backbone
              N_p = (S/P)², N = N_p + 1 + n_storage, W_blk = Σ weights of a block's matmuls (= 12·D² for an MLP
              ViT: qkv 3D², proj D², MLP 8D²; so 2·N·W_blk = 24·N·D²), 4·N²·D = Q·Kᵀ + A·V
    F_head(T) = 2·T·W_head                               T tokens through a head, W_head = Σ its matmul weights
    step      = 3·B·(n_g·F_bb(S_g) + n_l·F_bb(S_l))       student forward + backward (backward = 2 × forward)
              + B·n_g·F_bb(S_g)                          teacher forward (no grad)
              + 3·F_dino(B·(n_g+n_l)) + F_dino(B·n_g)     DINO head on every student CLS / teacher global CLS
              + 3·F_ibot(M) + F_ibot(M)                  iBOT head on the M masked global patch tokens

Not counted: norms, softmax, GELU, RoPE, losses, Sinkhorn-Knopp, optimizer, EMA, and the recompute forward of
activation checkpointing (so MFU is *model* FLOP utilisation, performance.md convention).
MFU = step FLOPs / step time / device peak; peak = 989 TFLOP/s bf16 dense for H100 SXM / H200, 312 for A100
(``--peak-tflops`` overrides); on CPU the peak is *measured* by an fp32 matmul benchmark (``--cpu-peak-gflops``
overrides), so CPU MFU says how close the step gets to this machine's own matmul speed.

Peak memory: CUDA ``torch.cuda.max_memory_allocated()`` over warm-up + timed steps (weights, gradients, AdamW
state, activations); CPU the process's peak resident set size (``ru_maxrss``; it never decreases, so a later
model's value includes everything before it — models run smallest first).

Run ``python bench/pretrain_step.py`` (CPU, ~2 min: ViT-S batch 2, ViT-L batch 1) or
``python bench/pretrain_step.py --device cuda --batch 64 --compile`` on a GPU (bf16 autocast, TF32, fused AdamW,
SDPA flash attention). Importable: :func:`run_benchmark` returns one dict per model with the table's columns.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import random
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from eo_dinov3.ssl.collate import collate_data_and_cast
from eo_dinov3.ssl.config import load_config
from eo_dinov3.ssl.masking import MaskingGenerator
from eo_dinov3.ssl.meta_arch import SSLMetaArch
from eo_dinov3.ssl.param_groups import apply_optim_scheduler, fuse_params_groups

MODELS: dict[str, str] = {"vits16": "dinov3_vits16", "vitb16": "dinov3_vitb16", "vitl16": "dinov3_vitl16"}

# bf16 dense tensor-core peaks in TFLOP/s (vendor datasheets; performance.md conventions).
GPU_PEAK_TFLOPS: dict[str, float] = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}

COLUMNS: tuple[str, ...] = (
    "model", "batch", "device", "dtype", "prototypes", "compile", "act_ckpt",
    "imgs_per_s", "step_ms", "peak_mem_mb", "tflop_per_step", "achieved_tflops", "peak_tflops", "mfu_pct",
)


@dataclass(frozen=True)
class Recipe:
    """Multi-crop setting (7B recipe: 2 × 256 px + 8 × 112 px)."""

    global_size: int = 256
    local_size: int = 112
    n_global: int = 2
    n_local: int = 8
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)


# ---------------------------------------------------------------------------------------------------- FLOPs
def _matmul_weights(module: nn.Module) -> int:
    """Σ of the weight-matrix sizes (in·out) of every matmul layer in ``module`` (2-D ``weight`` parameters)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(getattr(m, "weight", None), Tensor)
               and m.weight.ndim == 2)


def backbone_forward_flops(backbone: nn.Module, size: int, attention: bool = True) -> float:
    """Forward FLOPs of one ``size × size`` crop through ``backbone`` (formula in the module doc); ``attention=False``
    leaves out the ``4·N²·D`` attention term (what ``FlopCounterMode`` sees when SDPA runs a kernel it does not
    count)."""
    P = backbone.patch_size
    D = backbone.embed_dim
    C = backbone.patch_embed.proj.weight.shape[1]
    n_storage = getattr(backbone, "n_storage_tokens", 0)
    n_p = (size // P) ** 2
    N = n_p + 1 + n_storage
    flops = 2.0 * n_p * C * P * P * D
    for blk in backbone.blocks:
        flops += 2.0 * N * _matmul_weights(blk) + (4.0 * N * N * D if attention else 0.0)
    return flops


def head_forward_flops(head: nn.Module, tokens: float) -> float:
    """Forward FLOPs of ``tokens`` vectors through a DINO/iBOT head."""
    return 2.0 * tokens * _matmul_weights(head)


def step_flops(model: SSLMetaArch, batch: int, recipe: Recipe, masked_tokens: float,
               attention: bool = True) -> dict[str, float]:
    """Analytic FLOPs of one training step by component (module doc formula); ``masked_tokens`` = M per step."""
    bb = model.student["backbone"]
    f_g = backbone_forward_flops(bb, recipe.global_size, attention)
    f_l = backbone_forward_flops(bb, recipe.local_size, attention)
    cls_student = batch * (recipe.n_global + recipe.n_local)
    parts = {
        "student_backbone": 3.0 * batch * (recipe.n_global * f_g + recipe.n_local * f_l),
        "teacher_backbone": batch * recipe.n_global * f_g,
        "dino_heads": 3.0 * head_forward_flops(model.student["dino_head"], cls_student)
        + head_forward_flops(model.teacher["dino_head"], batch * recipe.n_global),
        "ibot_heads": 4.0 * head_forward_flops(model.student["ibot_head"], masked_tokens),
    }
    parts["total"] = sum(parts.values())
    return parts


# ---------------------------------------------------------------------------------------------------- device peak
def measure_cpu_peak_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Best-of-``repeats`` fp32 ``n × n`` matmul speed on the CPU with torch's current thread count (GFLOP/s)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def gpu_peak_tflops(device: torch.device) -> tuple[float | None, str]:
    """bf16 dense peak of the current GPU from its name (``None`` when unknown) and the name."""
    name = torch.cuda.get_device_name(device)
    for key, value in GPU_PEAK_TFLOPS.items():
        if key in name.upper():
            return value, name
    return None, name


# ---------------------------------------------------------------------------------------------------- set-up
def build_config(arch: str, *, prototypes: int, recipe: Recipe, batch: int, extra: Sequence[str] = ()) -> Any:
    """Resolved training config for ``arch`` (a hub name or ``custom`` with ``student.arch_overrides`` in
    ``extra``)."""
    overrides = [
        f"student.arch={arch}",
        f"dino.head_n_prototypes={prototypes}",
        f"ibot.head_n_prototypes={prototypes}",
        f"crops.global_crops_size={recipe.global_size}",
        f"crops.local_crops_size={recipe.local_size}",
        f"crops.local_crops_number={recipe.n_local}",
        f"ibot.mask_sample_probability={recipe.mask_probability}",
        f"ibot.mask_ratio_min_max=[{recipe.mask_ratio[0]},{recipe.mask_ratio[1]}]",
        f"train.batch_size_per_gpu={batch}",
        *extra,
    ]
    return load_config(None, overrides)


def synthetic_batches(batch: int, recipe: Recipe, patch_size: int, in_chans: int, n_batches: int,
                      seed: int = 0) -> list[dict[str, Any]]:
    """``n_batches`` collated batches of random crops with real iBOT block masks (official collate)."""
    g = torch.Generator().manual_seed(seed)
    rng, np_rng = random.Random(seed), np.random.RandomState(seed)
    grid = recipe.global_size // patch_size
    mask_gen = MaskingGenerator((grid, grid), max_num_patches=0.5 * grid * grid, rng=rng, np_rng=np_rng)
    out = []
    for _ in range(n_batches):
        samples = [
            ({"global_crops": [torch.randn(in_chans, recipe.global_size, recipe.global_size, generator=g)
                               for _ in range(recipe.n_global)],
              "local_crops": [torch.randn(in_chans, recipe.local_size, recipe.local_size, generator=g)
                              for _ in range(recipe.n_local)]}, None)
            for _ in range(batch)
        ]
        out.append(collate_data_and_cast(samples, mask_ratio_tuple=recipe.mask_ratio,
                                         mask_probability=recipe.mask_probability, dtype=torch.float32,
                                         n_tokens=grid * grid, mask_generator=mask_gen, rng=rng))
    return out


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _activation_checkpointing(backbone: nn.Module) -> None:
    """Recompute every block in the backward (non-reentrant ``torch.utils.checkpoint``; as the trainer does)."""
    from torch.utils.checkpoint import checkpoint

    for blk in backbone.blocks:
        fwd = blk.forward
        blk.forward = lambda x, rope=None, _f=fwd: checkpoint(_f, x, rope, use_reentrant=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


# ---------------------------------------------------------------------------------------------------- benchmark
def bench_model(arch: str, *, batch: int, device: torch.device, prototypes: int = 65536, recipe: Recipe = Recipe(),
                warmup: int = 1, iters: int = 2, compile: bool = False, activation_checkpointing: bool = False,
                peak_tflops: float | None = None, extra_overrides: Sequence[str] = (), label: str | None = None,
                seed: int = 0, profile: int = 0) -> dict[str, Any]:
    """Time ``iters`` full training steps (after ``warmup``) of one model; returns one table row (see ``COLUMNS``)
    plus ``flops`` (per component) and ``step_ms_all``. ``peak_tflops`` is the device peak used for MFU.
    ``profile > 0``: afterwards run that many steps under ``torch.profiler`` and add its top-25 operator table
    (by device time on CUDA, CPU time otherwise) as ``row["profile"]``."""
    torch.manual_seed(seed)
    cfg = build_config(arch, prototypes=prototypes, recipe=recipe, batch=batch, extra=extra_overrides)
    model = SSLMetaArch(cfg)
    model.init_weights()
    model.to(device)
    model.train()
    bb = model.student["backbone"]
    if activation_checkpointing:
        _activation_checkpointing(bb)
    if compile:
        # 2 crop shapes × (student with grad, teacher without) per block: keep dynamo from falling back to eager
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for part in (model.student, model.teacher):
            for blk in part["backbone"].blocks:
                blk.compile()
    groups = fuse_params_groups(model.get_params_groups(float(cfg.optim.layerwise_decay),
                                                        float(cfg.optim.patch_embed_lr_mult)))
    opt_kw: dict[str, Any] = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(groups, betas=(float(cfg.optim.adamw_beta1), float(cfg.optim.adamw_beta2)),
                                  **opt_kw)
    apply_optim_scheduler(optimizer, lr=1e-4, wd=0.04, last_layer_lr=1e-4)
    clip = float(cfg.optim.clip_grad)

    n_distinct = 2
    batches = [_to_device(b, device) for b in
               synthetic_batches(batch, recipe, bb.patch_size, int(cfg.student.in_chans), n_distinct, seed)]
    masked = statistics.fmean(int(b["mask_indices_list"].numel()) for b in batches)
    flops = step_flops(model, batch, recipe, masked)

    use_bf16 = device.type == "cuda"

    def step(data: dict[str, Any]) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            model.forward_backward(data, teacher_temp=0.07, iteration=0)
        model.clip_gradients(clip)
        optimizer.step()
        model.update_ema(0.994)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cycle = itertools.cycle(batches)
    for _ in range(warmup):
        step(next(cycle))
    _sync(device)
    times = []
    for _ in range(iters):
        data = next(cycle)
        _sync(device)
        t0 = time.perf_counter()
        step(data)
        _sync(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    prof_table = None
    if profile > 0:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=acts) as prof:
            for _ in range(profile):
                step(next(cycle))
            _sync(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        prof_table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60)
    achieved = flops["total"] / step_s / 1e12
    row = {
        "model": label or arch.replace("dinov3_", ""),
        "batch": batch,
        "device": device.type,
        "dtype": "bf16-autocast" if use_bf16 else "fp32",
        "prototypes": prototypes,
        "compile": compile,
        "act_ckpt": activation_checkpointing,
        "imgs_per_s": batch / step_s,
        "step_ms": step_s * 1e3,
        "peak_mem_mb": _peak_mem_mb(device),
        "tflop_per_step": flops["total"] / 1e12,
        "achieved_tflops": achieved,
        "peak_tflops": peak_tflops,
        "mfu_pct": 100.0 * achieved / peak_tflops if peak_tflops else float("nan"),
        "flops": flops,
        "masked_tokens_per_step": masked,
        "step_ms_all": [t * 1e3 for t in times],
    }
    if prof_table is not None:
        row["profile"] = prof_table
    del model, optimizer, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run_benchmark(models: Sequence[str] = ("vits16", "vitl16"), *, batch: int | None = None, device: str = "cpu",
                  prototypes: int | dict[str, int] = 65536, warmup: int | None = None, iters: int | None = None,
                  compile: bool = False, activation_checkpointing: bool = False, peak_tflops: float | None = None,
                  cpu_peak_gflops: float | None = None, recipe: Recipe = Recipe(),
                  extra_overrides: Sequence[str] = (), profile: int = 0) -> list[dict[str, Any]]:
    """Benchmark each model (keys of ``MODELS``, or ``"custom"`` with ``student.arch_overrides`` in
    ``extra_overrides``); one row dict per model. Defaults: CPU batch 2 (1 for ViT-L), 1 warm-up and 2 timed steps
    (1 for ViT-L); CUDA batch 64 (32 for ViT-L), 3 warm-up (5 with ``compile``) and 10 timed steps."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if peak_tflops is None:
            peak_tflops, _ = gpu_peak_tflops(dev)
    elif peak_tflops is None:
        peak_tflops = (cpu_peak_gflops or measure_cpu_peak_gflops()) / 1e3
    rows = []
    for name in models:
        arch = MODELS.get(name, name)
        big = name == "vitl16"
        if dev.type == "cuda":
            b = batch or (32 if big else 64)
            w = warmup if warmup is not None else (5 if compile else 3)
            n = iters or 10
        else:
            b = batch or (1 if big else 2)
            w = warmup if warmup is not None else 1
            n = iters or (1 if big else 2)
        k = prototypes[name] if isinstance(prototypes, dict) else prototypes
        rows.append(bench_model(arch, batch=b, device=dev, prototypes=k, recipe=recipe, warmup=w, iters=n,
                                compile=compile, activation_checkpointing=activation_checkpointing,
                                peak_tflops=peak_tflops, extra_overrides=extra_overrides,
                                label=name if arch != name else None, profile=profile))
    return rows


# ---------------------------------------------------------------------------------------------------- output
def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ("model", "batch", "protos", "compile", "AC", "imgs/s", "step ms", "peak MB", "TFLOP/step", "TFLOP/s",
            "peak TFLOP/s", "MFU %")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["model"], str(r["batch"]), str(r["prototypes"]), "yes" if r["compile"] else "no",
            "yes" if r["act_ckpt"] else "no", f"{r['imgs_per_s']:.3g}", f"{r['step_ms']:.0f}",
            f"{r['peak_mem_mb']:.0f}", f"{r['tflop_per_step']:.4g}", f"{r['achieved_tflops']:.4g}",
            f"{r['peak_tflops']:.3g}" if r["peak_tflops"] else "?",
            f"{r['mfu_pct']:.1f}" if r["peak_tflops"] else "?",
        ]) + " |")
    return "\n".join(lines)


FORMULA_NOTE = (
    "FLOPs/step = 3·B·(2·F(256) + 8·F(112)) [student fwd+bwd] + 2·B·F(256) [teacher fwd] "
    "+ 3·F_dino(10·B) + F_dino(2·B) + 4·F_ibot(M); F(S) = 2·N_p·C·P²·D + L·(24·N·D² + 4·N²·D), "
    "N = (S/16)² + 1 + 4 registers; F_head(T) = 2·T·Σ head weights; M = masked global patches per step. "
    "1 MAC = 2 FLOPs; norms/softmax/losses/optimizer not counted; MFU = FLOPs/step ÷ step time ÷ peak."
)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="vits16,vitl16", help=f"comma list from {sorted(MODELS)}")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--batch", type=int, default=None,
                    help="images per step (default: CPU 2, ViT-L 1; CUDA 64, ViT-L 32)")
    ap.add_argument("--prototypes", type=int, default=65536, help="DINO and iBOT head prototypes (official 65536)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (CPU 1; CUDA 3, 5 with --compile)")
    ap.add_argument("--iters", type=int, default=None, help="timed steps (CPU 2, ViT-L 1; CUDA 10)")
    ap.add_argument("--compile", action="store_true", help="torch.compile every student and teacher block")
    ap.add_argument("--activation-checkpointing", action="store_true", help="recompute student blocks in backward")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="device peak for MFU (default: bf16 dense from the GPU name, e.g. H100/H200 989)")
    ap.add_argument("--cpu-peak-gflops", type=float, default=None,
                    help="CPU peak for MFU (default: measured with an fp32 1024² matmul, current thread count)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="after timing, profile this many steps and print the top operators (find what limits MFU)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--json", metavar="OUT", default=None, help="also write the rows + environment as JSON")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")

    peak_note = ""
    cpu_peak = args.cpu_peak_gflops
    if args.device == "cpu" and args.peak_tflops is None and cpu_peak is None:
        cpu_peak = measure_cpu_peak_gflops()
        peak_note = (f"CPU peak = {cpu_peak:.1f} GFLOP/s measured (fp32 1024×1024 matmul, "
                     f"{torch.get_num_threads()} threads); MFU is relative to it.")
    elif args.device == "cpu":
        peak_note = f"CPU peak = {args.peak_tflops * 1e3 if args.peak_tflops else cpu_peak:.1f} GFLOP/s (given)."
    rows = run_benchmark(models, batch=args.batch, device=args.device, prototypes=args.prototypes,
                         warmup=args.warmup, iters=args.iters, compile=args.compile,
                         activation_checkpointing=args.activation_checkpointing, peak_tflops=args.peak_tflops,
                         cpu_peak_gflops=cpu_peak, profile=args.profile)
    if args.device == "cuda":
        name = torch.cuda.get_device_name(0)
        peak = rows[0]["peak_tflops"]
        peak_note = (f"GPU {name}: peak {peak} TFLOP/s bf16 dense" if peak else
                     f"GPU {name}: unknown peak, pass --peak-tflops") + "; bf16 autocast, TF32, fused AdamW, SDPA."
    env = f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {torch.get_num_threads()}"
    print(f"DINOv3 pretraining step — crops 2×256 + 8×112, synthetic on-device batches ({env})")
    print(peak_note)
    print(format_table(rows))
    print(FORMULA_NOTE)
    for r in rows:
        f = r["flops"]
        print(f"  {r['model']}: " + ", ".join(f"{k} {v / 1e12:.3f}" for k, v in f.items() if k != "total")
              + f" TFLOP; M = {r['masked_tokens_per_step']:.0f} masked tokens/step; step ms "
              + ", ".join(f"{t:.0f}" for t in r["step_ms_all"]))
    for r in rows:
        if "profile" in r:
            print(f"\nprofile of {r['model']} (top operators):\n{r['profile']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"env": env, "peak_note": peak_note,
                       "rows": [{k: v for k, v in r.items() if k != "profile"} for r in rows]}, fh, indent=2,
                      default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
