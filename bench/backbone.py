#!/usr/bin/env python
"""Forward-pass throughput and peak memory of the DINOv3 ViT: eo_dinov3 vs timm vs Hugging Face transformers.

For every (model, image size) the three implementations of the *same architecture* (random weights; patch 16,
CLS + 4 storage/register tokens, RoPE, LayerScale, qkv bias) are built side by side and their full feature pass is
timed under ``torch.inference_mode()`` in eval mode:

* ours: ``eo_dinov3.hub.dinov3_<arch>(pretrained=False).forward_features(x)``
* timm: ``timm.create_model("vit_<size>_patch16_dinov3_qkvb").forward_features(x)`` (the ``_qkvb`` variant has the qkv
  bias of the released checkpoints; the plain timm name drops it)
* HF:   ``transformers.DINOv3ViTModel(DINOv3ViTConfig(...))(pixel_values=x)`` (SDPA attention)

Repetitions are interleaved (ours, timm, HF, then rotated order) so that load from other processes on a shared machine
hits all three alike; images/s is ``batch / median(seconds per forward)``. CPU runs in fp32 by default and never
touches CUDA; ``--device cuda`` uses bf16 autocast, TF32 matmuls, SDPA (flash / memory-efficient kernels) and
``torch.cuda.synchronize()`` around every timed forward.

Peak memory is the extra memory one forward needs above the weights and the input batch (activations, attention
workspace, outputs): on CUDA ``torch.cuda.max_memory_allocated() - memory_allocated()`` before the call; on CPU the
highest running total of PyTorch CPU-allocator bytes recorded by ``torch.profiler`` (``profile_memory=True``) during
the last warm-up forward (the first one with the default ``--warmup 1``). Both count tensor memory held by PyTorch's
allocator, not allocator caching or RSS.

Run ``python bench/backbone.py`` (about 2-3 minutes on a 2-core CPU) or ``python bench/backbone.py --device cuda``.
Importable: :func:`run_benchmark` returns one dict per (model, size) with the columns of the printed table.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

IMPLS: tuple[str, ...] = ("ours", "timm", "hf")


@dataclass(frozen=True)
class Arch:
    """One backbone in the three libraries' vocabularies."""

    hub: str  # eo_dinov3.hub constructor name
    timm: str  # timm model name (timm >= 1.0.20)
    dim: int
    depth: int
    heads: int
    ffn_ratio: float = 4.0


MODELS: dict[str, Arch] = {
    "vits16": Arch("dinov3_vits16", "vit_small_patch16_dinov3_qkvb", 384, 12, 6),
    "vitb16": Arch("dinov3_vitb16", "vit_base_patch16_dinov3_qkvb", 768, 12, 12),
    "vitl16": Arch("dinov3_vitl16", "vit_large_patch16_dinov3_qkvb", 1024, 24, 16),
}

# Default batch per (model, size, device kind): small on the CPU so that a full default run stays under ~3 minutes,
# the inference batches of shared/reference/performance.md §4 on a GPU.
_CPU_BATCH = {("vits16", 224): 8, ("vits16", 512): 2, ("vitb16", 224): 4, ("vitb16", 512): 1,
              ("vitl16", 224): 2, ("vitl16", 512): 1}
_CUDA_BATCH = {("vits16", 224): 256, ("vits16", 512): 32, ("vitb16", 224): 256, ("vitb16", 512): 32,
               ("vitl16", 224): 128, ("vitl16", 512): 16}

COLUMNS: tuple[str, ...] = (
    "model", "size", "batch", "device", "dtype",
    "ips_ours", "ips_timm", "ips_hf", "ratio_timm", "ratio_hf",
    "mem_mb_ours", "mem_mb_timm", "mem_mb_hf",
)


def default_batch(model: str, size: int, device: str) -> int:
    """Batch used when none is given: small on CPU, performance.md §4 batches on CUDA; 1 for unlisted sizes ≥ 512."""
    table = _CUDA_BATCH if device == "cuda" else _CPU_BATCH
    if (model, size) in table:
        return table[(model, size)]
    ref = table[(model, 224)]
    return max(1, int(ref * (224 / size) ** 2))


# ---------------------------------------------------------------------------------------------------- builders
def build(impl: str, model: str, device: torch.device) -> tuple[nn.Module, Callable[[Tensor], Any]]:
    """``(module, forward)`` for one implementation, eval mode, on ``device``; ``forward(x [B,3,H,W])`` runs the full
    feature pass (final norm included)."""
    arch = MODELS[model]
    if impl == "ours":
        from eo_dinov3 import hub

        m = getattr(hub, arch.hub)(pretrained=False)
        fwd = m.forward_features
    elif impl == "timm":
        import timm

        m = timm.create_model(arch.timm, pretrained=False, num_classes=0)
        fwd = m.forward_features
    elif impl == "hf":
        from transformers import DINOv3ViTConfig, DINOv3ViTModel

        cfg = DINOv3ViTConfig(
            hidden_size=arch.dim,
            num_hidden_layers=arch.depth,
            num_attention_heads=arch.heads,
            intermediate_size=int(arch.dim * arch.ffn_ratio),
            num_register_tokens=4,
            layerscale_value=1e-5,
            patch_size=16,
            image_size=224,
            query_bias=True,
            key_bias=False,
            value_bias=True,
            proj_bias=True,
            mlp_bias=True,
        )
        cfg._attn_implementation = "sdpa"
        m = DINOv3ViTModel(cfg)

        def fwd(x: Tensor, _m: nn.Module = m) -> Tensor:
            return _m(pixel_values=x).last_hidden_state

    else:
        raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLS}")
    m = m.to(device).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m, fwd


# ---------------------------------------------------------------------------------------------------- measuring
@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence C++ writes to fd 2 (the Kineto profiler logs start/stop lines there)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # pytest capture etc.
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def _cpu_peak_bytes(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``fn`` under the profiler; highest running total of CPU-allocator bytes above the start level."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
            out = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"]
    events.sort(key=lambda e: e.start_ns())
    total = peak = 0
    for e in events:
        total += e.nbytes()
        peak = max(peak, total)
    return peak, out


def _peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> tuple[int, Any]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, out
    return _cpu_peak_bytes(fn)


def _n_tokens(out: Any) -> int:
    t = out["x_prenorm"] if isinstance(out, dict) else out
    return int(t.shape[1])


def run_benchmark(
    models: Sequence[str] = ("vits16", "vitl16"),
    sizes: Sequence[int] = (224, 512),
    *,
    batch: int | None = None,
    iters: int | None = None,
    warmup: int | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    threads: int | None = None,
    impls: Sequence[str] = IMPLS,
    log: Callable[[str], None] | None = print,
) -> list[dict]:
    """Time the feature pass of each implementation for every (model, size); one dict per pair with :data:`COLUMNS`.

    ``ips_<impl>`` images/s (batch / median seconds per forward), ``ratio_<peer>`` = ``ips_ours / ips_<peer>``,
    ``mem_mb_<impl>`` peak extra memory of one forward in MiB (module doc). Implementations left out of ``impls`` get
    ``None``. ``batch``/``iters``/``warmup`` default to small CPU values (3 timed reps, 1 warm-up) and to
    performance.md batches with 20 reps / 5 warm-ups on CUDA; ``dtype`` defaults to fp32 on CPU and bf16 on CUDA.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    dtype = dtype or ("bf16" if dev.type == "cuda" else "fp32")
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be fp32 or bf16, got {dtype!r}")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {sorted(MODELS)}")
    bad = [i for i in impls if i not in IMPLS]
    if bad or "ours" not in impls:
        raise ValueError(f"impls must include 'ours' and come from {IMPLS}, got {list(impls)}")
    iters = iters if iters is not None else (20 if dev.type == "cuda" else 3)
    warmup = max(1, warmup if warmup is not None else (5 if dev.type == "cuda" else 1))
    if threads:
        torch.set_num_threads(threads)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = (
        (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if dtype == "bf16" else contextlib.nullcontext
    )
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    say = log or (lambda s: None)

    rows: list[dict] = []
    for model in models:
        built = {}
        for impl in impls:
            torch.manual_seed(0)
            try:
                built[impl] = build(impl, model, dev)
            except (ImportError, RuntimeError) as e:  # a peer library missing or too old: its columns read n/a
                if impl == "ours":
                    raise
                say(f"# {impl} skipped for {model}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        run = [i for i in impls if i in built]
        for size in sizes:
            b = batch or default_batch(model, size, dev.type)
            x = torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(size)).to(dev)
            row: dict[str, Any] = {"model": model, "size": size, "batch": b, "device": dev.type, "dtype": dtype}
            times: dict[str, list[float]] = {i: [] for i in run}
            tokens = {}
            with torch.inference_mode(), autocast():
                for impl in run:  # warm-up; its last forward gives the peak memory (after cuBLAS/cuDNN set-up)
                    fwd = built[impl][1]
                    for _ in range(warmup - 1):
                        fwd(x)
                    gc.collect()
                    peak, out = _peak_memory_bytes(lambda: fwd(x), dev)
                    tokens[impl] = _n_tokens(out)
                    del out
                    row[f"mem_mb_{impl}"] = peak / 2**20
                    sync()
                if len(set(tokens.values())) != 1:
                    raise RuntimeError(f"implementations disagree on the token count: {tokens}")
                for rep in range(iters):
                    order = run[rep % len(run):] + run[: rep % len(run)]
                    for impl in order:
                        fwd = built[impl][1]
                        sync()
                        t0 = time.perf_counter()
                        fwd(x)
                        sync()
                        times[impl].append(time.perf_counter() - t0)
            for impl in IMPLS:
                row[f"ips_{impl}"] = b / statistics.median(times[impl]) if times.get(impl) else None
                row.setdefault(f"mem_mb_{impl}", None)
            for peer in ("timm", "hf"):
                ips = row[f"ips_{peer}"]
                row[f"ratio_{peer}"] = row["ips_ours"] / ips if ips and row["ips_ours"] else None
            rows.append({k: row[k] for k in COLUMNS})
            say(format_row(rows[-1]))
            del x
        del built
        gc.collect()
    return rows


# ---------------------------------------------------------------------------------------------------- output
_HEADER = (
    f"{'model':<7} {'px':>4} {'batch':>5} | {'img/s ours':>10} {'timm':>8} {'HF':>8} | {'ours/timm':>9} {'ours/HF':>8} "
    f"| {'peak MB ours':>12} {'timm':>8} {'HF':>8}"
)


def _f(v: float | None, fmt: str) -> str:
    if v is None:
        return "n/a"
    if fmt == "ips":  # 3-4 significant digits without exponents: 19328 / 123.4 / 2.38 / 0.0312
        fmt = ".0f" if v >= 1000 else ".1f" if v >= 100 else ".2f" if v >= 1 else ".3g"
    return format(v, fmt)


def format_row(r: dict) -> str:
    return (
        f"{r['model']:<7} {r['size']:>4} {r['batch']:>5} | {_f(r['ips_ours'], 'ips'):>10} {_f(r['ips_timm'], 'ips'):>8} "
        f"{_f(r['ips_hf'], 'ips'):>8} | {_f(r['ratio_timm'], '.3f'):>9} {_f(r['ratio_hf'], '.3f'):>8} | "
        f"{_f(r['mem_mb_ours'], '.1f'):>12} {_f(r['mem_mb_timm'], '.1f'):>8} {_f(r['mem_mb_hf'], '.1f'):>8}"
    )


def format_table(rows: Sequence[dict], *, iters: int | None = None) -> str:
    """The printed table with a footer that says how each number was measured."""
    if not rows:
        return "(no rows)"
    r0 = rows[0]
    dev = r0["device"]
    lines = [_HEADER, "-" * len(_HEADER), *(format_row(r) for r in rows)]
    mem = (
        "torch.cuda.max_memory_allocated() minus memory_allocated() before the forward"
        if dev == "cuda"
        else "highest running total of PyTorch CPU-allocator bytes (torch.profiler, profile_memory=True) during the "
        "last warm-up forward"
    )
    lines += [
        "",
        f"img/s = batch / median wall time of {iters if iters is not None else 'N'} interleaved forwards "
        f"(ours/timm/HF, rotating order), torch.inference_mode, eval, {r0['dtype']}"
        + (" autocast" if r0["dtype"] == "bf16" else "") + f", device {dev}.",
        f"peak MB = extra memory of one forward above weights + input (MiB): {mem}; allocator caches/RSS not counted.",
        "ours = eo_dinov3 forward_features; timm = vit_*_patch16_dinov3_qkvb forward_features; "
        "HF = DINOv3ViTModel (sdpa). Same architecture, random weights.",
    ]
    return "\n".join(lines)


def environment(device: str) -> dict[str, Any]:
    """Versions and hardware, stored with ``--json`` output."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    for name in ("timm", "transformers"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="vits16,vitl16", help=f"comma list from {sorted(MODELS)}")
    ap.add_argument("--sizes", default="224,512", help="comma list of square image sizes in pixels")
    ap.add_argument("--batch", type=int, default=None, help="images per forward (default: per model/size/device)")
    ap.add_argument("--iters", type=int, default=None, help="timed forwards per implementation (CPU 3, CUDA 20)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up forwards per implementation (CPU 1, CUDA 5)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: fp32 on cpu, bf16 on cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma list; 'ours' is required")
    ap.add_argument("--json", metavar="OUT", default=None, help="also write rows + environment to this JSON file")
    a = ap.parse_args(argv)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    impls = [i.strip() for i in a.impls.split(",") if i.strip()]
    print(_HEADER, flush=True)
    print("-" * len(_HEADER), flush=True)
    t0 = time.perf_counter()
    rows = run_benchmark(
        models, sizes, batch=a.batch, iters=a.iters, warmup=a.warmup, device=a.device, dtype=a.dtype,
        threads=a.threads, impls=impls, log=lambda s: print(s, flush=True),
    )
    iters = a.iters if a.iters is not None else (20 if a.device == "cuda" else 3)
    print("\n" + format_table(rows, iters=iters).split("\n\n", 1)[1])
    env = environment(a.device)
    print(f"\n{env} | total {time.perf_counter() - t0:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "environment": env, "argv": list(argv or sys.argv[1:])}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
