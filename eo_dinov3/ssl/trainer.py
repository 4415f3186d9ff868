"""The pretraining loop: schedules, AdamW, EMA, gradient clipping, non-finite guard, checkpoints, logging.

``train(cfg)`` runs one phase (pretrain / gram / hires) on this process or under ``torchrun`` (DDP-style gradient
averaging, or FSDP2 with ``train.sharding=fsdp``). Every step is a pure function of ``(model state, seed,
iteration)``: the global torch RNG is re-seeded from ``(seed, iteration)`` before each step (RoPE box augmentation,
stochastic depth), and the data stream is position-addressed (:mod:`eo_dinov3.ssl.data`), so a run killed at any
point and resumed from its last checkpoint reproduces the uninterrupted run's per-step losses bit for bit (CPU).

Outputs in ``run.output_dir``: ``config.yaml``, ``metrics.jsonl`` (one line per step), ``tb/`` (TensorBoard),
``ckpt/<iteration>.pt``, ``eval/training_<iteration>/teacher_checkpoint.pth`` (official format) and
``teacher_backbone.pth`` (hub format, loadable by :func:`eo_dinov3.checkpoints.load_backbone`), ``pca/*.png``,
``skipped.jsonl`` (non-finite steps with their sample ids) and ``summary.json``.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from eo_dinov3.errors import ConfigError, EODinoError
from eo_dinov3.ssl import checkpointing as ckpt
from eo_dinov3.ssl.config import save_config
from eo_dinov3.data.manifest import derive_seed
from eo_dinov3.ssl.data import STEP_STREAM
from eo_dinov3.ssl.faults import FaultPlan, restart_count
from eo_dinov3.ssl.distributed import (
    DistInfo,
    all_reduce_gradients,
    all_true,
    barrier,
    init_distributed,
    mean_over_ranks,
)
from eo_dinov3.ssl.meta_arch import SSLMetaArch
from eo_dinov3.ssl.monitors import (
    batch_target_entropy,
    cls_effective_rank,
    cls_std,
    collapse_flags,
    save_pca_picture,
    teacher_target_entropy,
)
from eo_dinov3.ssl.param_groups import apply_optim_scheduler, fuse_params_groups
from eo_dinov3.ssl.schedules import ScheduleSet, linear_warmup_cosine_decay


class TrainingStopped(EODinoError):
    """Training stopped on purpose (too many consecutive non-finite steps); the last good checkpoint is kept."""


@dataclass
class TrainResult:
    output_dir: Path
    iteration: int
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    stopped_by_signal: bool = False
    last_checkpoint: Path | None = None
    teacher_export: Path | None = None
    pca_pictures: list[Path] = field(default_factory=list)
    collapse_warnings: list[str] = field(default_factory=list)
    dense_probe: list[dict] = field(default_factory=list)
    knn_probe: list[dict] = field(default_factory=list)


class _SignalFlag:
    """SIGTERM / SIGUSR1 (preemption notices) set a flag; the loop saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def _weight_schedule(spec: Any, total: int, epoch_length: int, default: float) -> Any:
    """Per-iteration weight from a ``{start, peak, end, warmup_epochs, cosine_epochs}`` spec (or a constant)."""
    if spec is None:
        return None
    s = OmegaConf.to_container(spec) if isinstance(spec, DictConfig) else dict(spec)
    arr = linear_warmup_cosine_decay(
        start=s.get("start", default),
        peak=s.get("peak", default),
        end=s.get("end", default),
        warmup_iterations=int(round(s.get("warmup_epochs", 0) * epoch_length)),
        total_iterations=total,
        cosine_iterations=int(round(s["cosine_epochs"] * epoch_length)) if "cosine_epochs" in s else None,
    )
    return arr


def _to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype | None) -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if dtype is not None and v.is_floating_point() and k.startswith("collated_") and k.endswith("crops"):
                v = v.to(dtype)
        out[k] = v
    return out


class Trainer:
    """Build everything from ``cfg`` (see ``eo_dinov3/ssl/default_config.yaml``) and run the loop.

    ``batches`` may inject an iterator of collated batches (tests, benchmarks); by default the data stream is
    built from ``cfg.data`` with :func:`eo_dinov3.ssl.pipeline.build_batch_stream`."""

    def __init__(self, cfg: DictConfig, *, batches: Iterator[dict] | None = None, dist_info: DistInfo | None = None,
                 progress: bool = True):
        self.cfg = cfg
        self.dist = dist_info or init_distributed(str(cfg.run.device))
        self.device = self.dist.device
        self.out = Path(cfg.run.output_dir)
        self.progress = progress and self.dist.is_main
        self.seed = int(cfg.run.seed)
        self._external_batches = batches
        precision = str(cfg.train.precision)
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        if precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision must be auto, fp32 or bf16, got {precision!r}")
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None

        torch.manual_seed(self.seed)
        self.model = SSLMetaArch(cfg)
        self.model.init_weights()
        self.model.to(self.device)
        if cfg.train.sharding not in ("ddp", "fsdp"):
            raise ConfigError(f"train.sharding must be ddp or fsdp, got {cfg.train.sharding!r}")
        self.fsdp = cfg.train.sharding == "fsdp" and self.dist.enabled
        self.optimizer: torch.optim.Optimizer | None = None  # built by _setup_parallel (after weights are loaded)
        self.schedules = ScheduleSet.from_config(cfg, world_size=self.dist.world_size)
        self.total_iterations = self.schedules.total_iterations
        max_it = cfg.train.max_iterations
        self.stop_iteration = min(self.total_iterations, int(max_it)) if max_it else self.total_iterations
        ep = int(cfg.train.OFFICIAL_EPOCH_LENGTH)
        self.local_weight = (
            _weight_schedule(cfg.dino.local_loss_weight_schedule, self.total_iterations, ep, 1.0)
            if cfg.dino.reweight_dino_local_loss
            else None
        )
        self.gram_weight = _weight_schedule(cfg.gram.loss_weight_schedule, self.total_iterations, ep,
                                            float(cfg.gram.loss_weight))
        warm = cfg.schedules.lr.warmup_epochs if cfg.schedules else cfg.optim.warmup_epochs
        # collapse monitors are meaningful once the warm-up is over (at init, LayerScale 1e-5 makes every image's
        # CLS token nearly identical by construction)
        self.monitor_start = int(round(float(warm) * ep))
        self.iteration = 0
        self.skipped = 0
        self.consecutive_nonfinite = 0
        self.gram_updates = 0
        self.result = TrainResult(output_dir=self.out, iteration=0)
        self.restart_count = restart_count()  # torchrun --max-restarts: 0 on the first attempt
        self.fault = FaultPlan.from_env()  # EO_DINOV3_FAULT_AT_STEP drills (eo_dinov3.ssl.faults); None normally

    # ------------------------------------------------------------------ set-up helpers
    def _setup_parallel(self, optimizer_state: dict | None = None) -> None:
        """FSDP2 sharding, activation checkpointing, compilation, then AdamW over the (possibly sharded) student;
        runs after the weights are loaded (init_from / resume), so loading always sees plain tensors."""
        cfg = self.cfg
        if self.fsdp:
            self._apply_fsdp()
        if cfg.train.activation_checkpointing:
            self._apply_activation_checkpointing()
        if cfg.train.compile:
            for blk in self.model.student["backbone"].blocks:
                blk.compile()
        groups = fuse_params_groups(
            self.model.get_params_groups(float(cfg.optim.layerwise_decay), float(cfg.optim.patch_embed_lr_mult))
        )
        fused = {"fused": True} if self.device.type == "cuda" and not self.fsdp else {}
        self.optimizer = torch.optim.AdamW(groups, betas=(float(cfg.optim.adamw_beta1), float(cfg.optim.adamw_beta2)),
                                           **fused)
        if optimizer_state is not None:
            if self.fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(self.model.student, self.optimizer, optimizer_state,
                                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
            else:
                self.optimizer.load_state_dict(optimizer_state)

    def _full_state_dict(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Plain (unsharded, CPU) state dict; under FSDP2 a collective that every rank must call."""
        if not self.fsdp:
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _full_optimizer_state(self) -> dict:
        if not self.fsdp:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model.student, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _apply_fsdp(self) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.device.type == "cuda" else None
        kw = {"mp_policy": mp} if mp is not None else {}
        for part in (self.model.student, self.model.teacher):
            for blk in part["backbone"].blocks:
                fully_shard(blk, **kw)
            for name in ("backbone", "dino_head", "ibot_head"):
                fully_shard(part[name], **kw)
        if self.model.gram_teacher is not None:
            fully_shard(self.model.gram_teacher["backbone"], **kw)

    def _apply_activation_checkpointing(self) -> None:
        from torch.utils.checkpoint import checkpoint

        for blk in self.model.student["backbone"].blocks:
            fwd = blk.forward
            blk.forward = lambda x, rope=None, _f=fwd: checkpoint(_f, x, rope, use_reentrant=False)

    def init_from(self, path: str) -> None:
        """Start student and teacher from released weights (official/timm/HF backbone: heads fresh) or from one of
        our training checkpoints / teacher exports (heads included)."""
        p = Path(path)
        if p.is_dir():
            latest = ckpt.latest_checkpoint(p / "ckpt")
            if latest is None:
                raise ConfigError(f"model.init_from={path}: no ckpt/<iteration>.pt in that run folder")
            p = latest
        obj = None
        try:
            obj = ckpt.load_training_checkpoint(p)
        except EODinoError:
            pass
        if obj is not None:
            teacher = {k.removeprefix("teacher."): v for k, v in obj["model"].items() if k.startswith("teacher.")}
            self.model.student.load_state_dict(teacher, strict=True)
            self.model.teacher.load_state_dict(teacher, strict=True)
            source = f"teacher of our checkpoint {p} (heads included)"
        else:
            raw = torch.load(p, map_location="cpu", weights_only=True) if p.suffix == ".pth" else None
            if isinstance(raw, dict) and "teacher" in raw and any(k.startswith("dino_head.") for k in raw["teacher"]):
                payload = {k.removeprefix("module."): v for k, v in raw["teacher"].items()}
                self.model.student.load_state_dict(payload, strict=True)
                self.model.teacher.load_state_dict(payload, strict=True)
                source = f"official teacher_checkpoint {p} (heads included)"
            else:
                from eo_dinov3.checkpoints import load_backbone

                backbone = load_backbone(p)
                sd = backbone.state_dict()
                self.model.student["backbone"].load_state_dict(sd, strict=True)
                self.model.teacher["backbone"].load_state_dict(sd, strict=True)
                self.model.teacher["dino_head"].load_state_dict(self.model.student["dino_head"].state_dict())
                self.model.teacher["ibot_head"].load_state_dict(self.model.student["ibot_head"].state_dict())
                source = f"backbone {p} (heads freshly initialised; last layer frozen per optim.freeze_last_layer_epochs)"
        if self.model.gram_teacher is not None:
            self.model.gram_teacher["backbone"].load_state_dict(self.model.teacher["backbone"].state_dict())
        self._log_line(f"initialised from {source}")

    def _gram_init(self) -> None:
        g = self.cfg.gram
        if self.model.gram_teacher is None:
            return
        if g.ckpt:
            raw = torch.load(g.ckpt, map_location="cpu", weights_only=True)
            if isinstance(raw, dict) and raw.get("format") == "eo_dinov3.train":
                sd = {k.removeprefix("teacher.backbone."): v for k, v in raw["model"].items()
                      if k.startswith("teacher.backbone.")}
            elif isinstance(raw, dict) and "teacher" in raw:
                sd = {k.removeprefix("backbone."): v for k, v in raw["teacher"].items() if k.startswith("backbone.")}
            else:
                from eo_dinov3.checkpoints import load_backbone

                sd = load_backbone(g.ckpt).state_dict()
            self.model.gram_teacher["backbone"].load_state_dict(sd, strict=True)
            self._log_line(f"Gram teacher loaded from {g.ckpt}")

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict[str, Any]:
        model_sd = {}
        parts = [("student", self.model.student), ("teacher", self.model.teacher)]
        if self.model.gram_teacher is not None:
            parts.append(("gram_teacher", self.model.gram_teacher))
        for name, module in parts:
            for k, v in self._full_state_dict(module).items():
                model_sd[f"{name}.{k}"] = v
        return {
            "format": "eo_dinov3.train",
            "iteration": self.iteration,
            "model": model_sd,
            "optimizer": self._full_optimizer_state(),
            "rng": ckpt.rng_state(),
            "data_position": self.iteration * int(self.cfg.train.batch_size_per_gpu) * self.dist.world_size,
            "counters": {"skipped": self.skipped, "consecutive_nonfinite": self.consecutive_nonfinite,
                         "gram_updates": self.gram_updates},
            "config": OmegaConf.to_yaml(self.cfg, resolve=True),
        }

    def save_checkpoint(self) -> Path | None:
        path = None
        state = self._state()  # collective under FSDP2: every rank takes part
        if self.dist.is_main:
            path = ckpt.atomic_save(state, self.out / "ckpt" / f"{self.iteration}.pt")
            ckpt.rotate_checkpoints(self.out / "ckpt", int(self.cfg.checkpointing.max_to_keep),
                                    self.cfg.checkpointing.keep_every)
            self.result.last_checkpoint = path
            teacher = {k[len("teacher."):]: v for k, v in state["model"].items() if k.startswith("teacher.")}
            self.export_teacher(teacher)
        if self.cfg.evaluation.pca_every_checkpoint:
            self._pca_picture()
        barrier()
        return path

    def export_teacher(self, teacher_state: dict[str, torch.Tensor] | None = None) -> Path:
        """``eval/training_<it>/teacher_checkpoint.pth`` (official) + ``teacher_backbone.pth`` (hub file)."""
        if teacher_state is None:
            teacher_state = self._full_state_dict(self.model.teacher)
        d = self.out / "eval" / f"training_{self.iteration}"
        ckpt.atomic_save({"teacher": teacher_state}, d / "teacher_checkpoint.pth")
        backbone_sd = {k[len("backbone."):]: v for k, v in teacher_state.items() if k.startswith("backbone.")}
        path = ckpt.atomic_save(backbone_sd, d / "teacher_backbone.pth")
        self.result.teacher_export = path
        return path

    def resume(self) -> bool:
        mode = str(self.cfg.checkpointing.resume)
        if mode == "never":
            return False
        path = ckpt.latest_checkpoint(self.out / "ckpt") if mode == "auto" else Path(mode)
        if path is None:
            return False
        obj = ckpt.load_training_checkpoint(path)
        model = obj["model"]
        for name in ("student", "teacher"):
            getattr(self.model, name).load_state_dict(
                {k[len(name) + 1 :]: v for k, v in model.items() if k.startswith(name + ".")}, strict=True
            )
        if self.model.gram_teacher is not None:
            self.model.gram_teacher.load_state_dict(
                {k[len("gram_teacher.") :]: v for k, v in model.items() if k.startswith("gram_teacher.")}, strict=True
            )
        self._resume_optimizer_state = obj["optimizer"]
        ckpt.set_rng_state(obj["rng"])
        self.iteration = int(obj["iteration"])
        c = obj["counters"]
        self.skipped, self.consecutive_nonfinite, self.gram_updates = (
            int(c["skipped"]), int(c["consecutive_nonfinite"]), int(c["gram_updates"]))
        self._log_line(f"resumed from {path} at iteration {self.iteration}")
        return True

    # ------------------------------------------------------------------ logging
    def _log_line(self, msg: str) -> None:
        if self.dist.is_main:
            print(f"[eo_dinov3] {msg}", file=sys.stderr, flush=True)

    def _dense_probe(self, writer, metrics_file, classifier: str = "logreg") -> None:
        """Tree-crown presence probe on the teacher's patch features (NEON samples): the dense-feature monitor
        (``classifier="logreg"``, every ``evaluation.dense_probe_every`` iterations) or the k-NN probe at checkpoints
        (``"knn"``, ``evaluation.knn_probe_every_checkpoint``). Records go to ``dense_probe.jsonl`` / TensorBoard as
        ``probe/crown_auc`` … or ``probe/crown_knn_auc`` …."""
        from eo_dinov3.evaluation.crown_probe import crown_probe

        r = crown_probe(self.model.teacher["backbone"], normalization=str(self.cfg.crops.normalization),
                        device=self.device, seed=int(self.cfg.run.seed), classifier=classifier)
        tag = "crown_knn" if classifier == "knn" else "crown"
        rec = {"iteration": self.iteration, f"probe/{tag}_auc": r["auc"],
               f"probe/{tag}_balanced_accuracy": r["balanced_accuracy"]}
        (self.result.knn_probe if classifier == "knn" else self.result.dense_probe).append(rec)
        if metrics_file is not None:
            with open(self.out / ("knn_probe.jsonl" if classifier == "knn" else "dense_probe.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")
        if writer is not None:
            writer.add_scalar(f"probe/{tag}_auc", r["auc"], self.iteration)
            writer.add_scalar(f"probe/{tag}_balanced_accuracy", r["balanced_accuracy"], self.iteration)
        name = "k-NN probe" if classifier == "knn" else "dense probe"
        self._log_line(f"{name} at iteration {self.iteration}: crown AUC {r['auc']:.3f}, "
                       f"balanced accuracy {r['balanced_accuracy']:.3f}")

    def _pca_picture(self) -> None:
        """Rank 0 saves the picture; under FSDP2 the other ranks run the same forward (it is a collective)."""
        image = getattr(self, "pca_image", None)
        if image is None or not (self.dist.is_main or self.fsdp):
            return
        path = self.out / "pca" / f"pca_{self.iteration:07d}.png"
        if not self.dist.is_main:
            with torch.no_grad():
                self.model.teacher["backbone"].eval().forward_features(image[None].to(self.device))
            return
        save_pca_picture(self.model.teacher["backbone"], image.to(self.device), path,
                         title=f"teacher, iteration {self.iteration}")
        self.result.pca_pictures.append(path)

    # ------------------------------------------------------------------ loop
    def _gram_refresh(self, it: int) -> None:
        g = self.cfg.gram
        if self.model.gram_teacher is None:
            return
        if g.it_load_ema_teacher is not None and int(g.it_load_ema_teacher) >= 0 and it == int(g.it_load_ema_teacher):
            self.model.update_gram(0.0)
            self._log_line(f"Gram teacher copied from the EMA teacher at iteration {it}")
        if g.rep_update and (it + 1) >= int(g.it_first_update) and (it + 1) % int(g.update_frequency) == 0:
            if g.max_updates is None or self.gram_updates < int(g.max_updates):
                self.model.update_gram(0.0)
                self.gram_updates += 1
                self._log_line(f"Gram teacher refreshed ({self.gram_updates}) after iteration {it}")

    def run(self, batches: Iterator[dict] | None = None) -> TrainResult:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            save_config(cfg, self.out / "config.yaml")
        self._resume_optimizer_state = None
        resumed = self.resume()
        if self.restart_count:
            self._log_line(f"elastic restart {self.restart_count} (TORCHELASTIC_RESTART_COUNT): starting at iteration "
                           f"{self.iteration}" + ("" if resumed else " (no checkpoint yet)"))
        if self.fault is not None:
            self._log_line(f"fault injection armed: rank {self.fault.rank} will SIGKILL itself after step "
                           f"{self.fault.step} (EO_DINOV3_FAULT_AT_STEP)")
        if not resumed:
            if cfg.model.init_from and cfg.phase.init_from:
                raise ConfigError("set either model.init_from or phase.init_from, not both")
            if cfg.model.init_from or cfg.phase.init_from:
                self.init_from(str(cfg.model.init_from or cfg.phase.init_from))
            self._gram_init()
        self._setup_parallel(self._resume_optimizer_state)
        stream = batches or self._external_batches
        if stream is None:
            from eo_dinov3.ssl.pipeline import build_batch_stream

            stream, self.pca_image, self.dataset_stats = build_batch_stream(cfg, self.dist, start_step=self.iteration)
        writer = None
        metrics_file = None
        if self.dist.is_main:
            metrics_file = open(self.out / "metrics.jsonl", "a")
            try:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(self.out / "tb"))
            except Exception as e:  # tensorboard missing: keep JSONL
                self._log_line(f"TensorBoard disabled: {e}")
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.stop_iteration, initial=self.iteration, desc="pretrain", unit="it",
                       dynamic_ncols=True)
        period = int(cfg.checkpointing.period)
        clip = float(cfg.optim.clip_grad) if cfg.optim.clip_grad else None
        B = int(cfg.train.batch_size_per_gpu)
        t_last = time.perf_counter()
        self.model.train()
        if self.iteration == 0 and self.cfg.evaluation.pca_every_checkpoint:
            self._pca_picture()  # "before" picture (random init)
        probe_every = cfg.evaluation.dense_probe_every
        knn_at_ckpt = bool(cfg.evaluation.get("knn_probe_every_checkpoint", False))
        if (probe_every or knn_at_ckpt) and self.fsdp:
            raise ConfigError("evaluation.dense_probe_every / knn_probe_every_checkpoint are not supported with "
                              "train.sharding=fsdp; probe the exported teacher_backbone.pth instead")
        if probe_every and self.dist.is_main and self.iteration == 0:
            self._dense_probe(writer, metrics_file)
        try:
            with _SignalFlag() as sig:
                while self.iteration < self.stop_iteration:
                    it = self.iteration
                    batch = next(stream)
                    torch.manual_seed(derive_seed(self.seed, STEP_STREAM, it))
                    s = self.schedules[it]
                    apply_optim_scheduler(self.optimizer, s["lr"], s["wd"], s["last_layer_lr"])
                    self.optimizer.zero_grad(set_to_none=True)
                    data = _to_device(batch, self.device, None)
                    local_w = float(self.local_weight[it]) if self.local_weight is not None else 1.0
                    gram_w = float(self.gram_weight[it]) if self.gram_weight is not None else None
                    with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                        enabled=self.autocast_dtype is not None):
                        loss, out = self.model.forward_backward(
                            data, teacher_temp=s["teacher_temp"], iteration=it, dino_local_weight=local_w,
                            gram_weight=gram_w)
                    if not self.fsdp:
                        all_reduce_gradients(self.model.student.parameters(), self.dist.world_size)
                    norms = self.model.clip_gradients(clip)
                    finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(n)) for n in norms.values())
                    finite = all_true(finite, self.device)
                    if finite:
                        self.optimizer.step()
                        self.model.update_ema(s["momentum"])
                        self.consecutive_nonfinite = 0
                    else:
                        self._skip_step(it, batch, loss, norms)
                    self._gram_refresh(it)
                    self.iteration = it + 1
                    now = time.perf_counter()
                    ips = B * self.dist.world_size / max(now - t_last, 1e-9)
                    t_last = now
                    rec = self._metrics(it, loss, out, norms, s, ips, finite)
                    rec["crops/global_px"] = int(data["collated_global_crops"].shape[-1])
                    if metrics_file is not None:
                        metrics_file.write(json.dumps(rec) + "\n")
                        metrics_file.flush()
                    if writer is not None and it % int(cfg.train.log_every) == 0:
                        for k, v in rec.items():
                            if isinstance(v, (int, float)) and k != "iteration" and math.isfinite(v):
                                writer.add_scalar(k, v, it)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{rec['loss/total']:.3f}", dino=f"{rec.get('loss/dino_global_crops_loss', 0):.2f}",
                                        ibot=f"{rec.get('loss/ibot_loss', 0):.2f}", lr=f"{s['lr']:.2e}",
                                        ips=f"{ips:.1f}")
                    if finite:
                        self.result.losses.append(rec["loss/total"])
                    # no periodic checkpoint in the middle of a non-finite streak: the previous one stays the newest
                    due = self.iteration % period == 0 and self.consecutive_nonfinite == 0
                    if due or self.iteration == self.stop_iteration:
                        self.save_checkpoint()
                        if knn_at_ckpt and self.dist.is_main:
                            self._dense_probe(writer, metrics_file, classifier="knn")
                    if probe_every and self.dist.is_main and self.iteration % int(probe_every) == 0:
                        self._dense_probe(writer, metrics_file)
                    if self.fault is not None:
                        self.fault.maybe_fire(self.iteration, self.dist.rank)
                    if sig.received is not None:
                        self._log_line(f"signal {sig.received} received: checkpoint saved at iteration {self.iteration}, exiting")
                        if self.iteration % period != 0 and self.iteration != self.stop_iteration:
                            self.save_checkpoint()
                        self.result.stopped_by_signal = True
                        break
        finally:
            if bar is not None:
                bar.close()
            if metrics_file is not None:
                metrics_file.close()
            if writer is not None:
                writer.close()
        self.result.iteration = self.iteration
        self.result.skipped_steps = self.skipped
        if self.dist.is_main:
            summary = {
                "output_dir": str(self.out),
                "iterations": self.iteration,
                "skipped_nonfinite_steps": self.skipped,
                "last_checkpoint": str(self.result.last_checkpoint) if self.result.last_checkpoint else None,
                "teacher_backbone": str(self.result.teacher_export) if self.result.teacher_export else None,
                "pca_pictures": [str(p) for p in self.result.pca_pictures],
                "collapse_warnings": self.result.collapse_warnings,
                "skipped_inputs": getattr(self, "dataset_stats", lambda: {})(),
                "dense_probe": self.result.dense_probe,
                "knn_probe": self.result.knn_probe,
                "elastic_restart_count": self.restart_count,
            }
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return self.result

    def _skip_step(self, it: int, batch: dict, loss, norms) -> None:
        self.skipped += 1
        self.consecutive_nonfinite += 1
        self.optimizer.zero_grad(set_to_none=True)
        rec = {"iteration": it, "loss": float(loss.detach()), "grad_norms": {k: float(v) for k, v in norms.items()},
               "sample_ids": list(batch.get("sample_ids", []))}
        if self.dist.is_main:
            with open(self.out / "skipped.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        self._log_line(f"non-finite step {it} skipped (loss={float(loss.detach())}, samples={rec['sample_ids'][:8]})")
        limit = int(self.cfg.train.max_nonfinite_steps)
        if self.consecutive_nonfinite >= limit:
            last = ckpt.latest_checkpoint(self.out / "ckpt")
            raise TrainingStopped(
                f"{self.consecutive_nonfinite} consecutive non-finite steps (limit train.max_nonfinite_steps={limit}) "
                f"at iteration {it}; last good checkpoint: {last}. Lower optim.lr, check the data (skipped.jsonl "
                "lists the sample ids) or use fp32."
            )

    def _metrics(self, it, loss, out, norms, s, ips, finite) -> dict[str, Any]:
        rec: dict[str, Any] = {"iteration": it, "finite": finite, "imgs_per_s": ips}
        scalars = {k: v for k, v in out["losses"].items() if v.ndim == 0}
        for k, v in mean_over_ranks(scalars, self.device).items():  # global-batch means under torchrun
            rec[f"loss/{k}"] = v
        for k, v in norms.items():
            rec[f"grad_norm/{k}"] = float(v)
        rec.update({f"sched/{k}": float(v) for k, v in s.items()})
        t = out["teacher"]
        rec["monitor/teacher_target_entropy"] = teacher_target_entropy(t["cls_centered"])
        rec["monitor/batch_target_entropy"] = batch_target_entropy(t["cls_centered"])
        rec["monitor/cls_std"] = cls_std(t["cls_pre_head"])
        rec["monitor/cls_effective_rank"] = cls_effective_rank(t["cls_pre_head"])
        flags = collapse_flags(rec)
        if flags and it >= self.monitor_start:
            msg = f"iteration {it}: possible collapse: " + "; ".join(flags)
            self.result.collapse_warnings.append(msg)
            self._log_line(msg)
        return rec


def train(cfg: DictConfig, *, batches: Iterator[dict] | None = None, progress: bool = True) -> TrainResult:
    """Run a pretraining phase described by ``cfg``; returns a :class:`TrainResult` (paths, losses, counters)."""
    trainer = Trainer(cfg, batches=batches, progress=progress)
    return trainer.run()
