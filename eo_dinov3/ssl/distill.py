"""Multi-student distillation: one FROZEN teacher, several students (ViTs and ConvNeXts) trained in the same job.

Official design (``dinov3/train/multidist_meta_arch.py``, recipe §3.11): the teacher (a ViT in eval mode, frozen)
is run **once per step** on the global crops; its DINO/iBOT heads + Sinkhorn-Knopp give the targets that every
student uses. Each student has its own DINO and iBOT heads (same prototype counts ``K``, hidden and bottleneck
sizes as the teacher's heads), its own AdamW (param groups of :mod:`eo_dinov3.ssl.param_groups`), schedules and an
EMA copy ``model_ema`` of itself; the EMA is what gets exported. Per student the loss is the DINOv3 objective
without Gram (:meth:`SSLMetaArch.compute_losses`)::

    L_s = w_l·L_DINO_local + w_g·L_DINO_global + 0.1·Σ_c KoLeo(CLS_c) + 1.0·L_iBOT

with the student's global crops **not masked** (official: ``masks=None`` when distillation is enabled); iBOT is
evaluated at the collated "masked" token positions, i.e. patch-level distillation on a random subset of tokens.

Teacher heads: a teacher given as one of our training checkpoints / an official ``teacher_checkpoint.pth`` brings
its heads (sizes read from the tensors). A plain backbone file (hub ``.pth``, timm, HF) has no heads: they are
freshly initialised (official init, seed ``run.seed``) and frozen, and their sizes come from the config
(``dino.head_*``, ``ibot.head_*``) — distillation then matches random projections of the teacher features
(what the official code does with ``distillation.checkpoint_path: ignore``, "for testing purposes").

ConvNeXt students: their final map has stride 32; with ``patch_tokens_on_patch_grid`` it is resized (bilinear,
antialiased, as the official ``get_intermediate_layers`` does for ``patch_size=16``) to the teacher's patch-16 grid
so that the iBOT positions (collated on that grid) address the same image regions.

Processes:

* one process (CPU or one GPU): all students live in the process; the teacher output is computed once per step and
  reused by every student (each student then runs forward, backward, clipping, AdamW and EMA in turn);
* ``torchrun``: each student owns a contiguous rank range (``distill.students[i].ranks``, same size for every
  student). Ranks at the same position of their range read the same batch; the first student's ranks run the
  teacher (Sinkhorn-Knopp over their group = the whole global batch) and **broadcast** the targets to the ranks at
  the same position of the other students (``torch.distributed.new_group`` per position). Gradients are averaged
  inside each student's group. (The official code shards the teacher forward over the whole world and all-gathers
  head bottlenecks; here the first group computes it once and the others receive it — same teacher FLOPs per global
  batch, not load-balanced.)

Outputs (``distill.output_dir``): ``<student>/ckpt/<it>.pt`` (student + EMA + AdamW + RNG; the teacher is not
saved, as officially), ``<student>/eval/training_<it>/backbone.pth`` (EMA backbone: ``eo_dinov3`` file for ViTs →
:func:`eo_dinov3.checkpoints.load_backbone`; ConvNeXt file → :func:`eo_dinov3.models.convnext.load_convnext`),
``<student>/eval/training_<it>/teacher_checkpoint.pth`` (official ``{"teacher": EMA state}`` payload),
``<student>/metrics.jsonl`` and ``summary.json``.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from eo_dinov3.data.manifest import derive_seed
from eo_dinov3.errors import CheckpointError, ConfigError
from eo_dinov3.losses.dino import DINOLoss
from eo_dinov3.losses.ibot import iBOTPatchLoss
from eo_dinov3.losses.koleo import KoLeoLoss
from eo_dinov3.models.convnext import CONVNEXT_SIZES, ConvNeXt, ConvNeXtConfig, save_convnext
from eo_dinov3.models.heads import DINOHead
from eo_dinov3.models.vision_transformer import DinoVisionTransformer
from eo_dinov3.ssl import checkpointing as ckpt
from eo_dinov3.ssl.config import default_config, save_config
from eo_dinov3.ssl.data import STEP_STREAM
from eo_dinov3.ssl.distributed import DistInfo, init_distributed
from eo_dinov3.ssl.meta_arch import SSLMetaArch, _build_head, _get, student_backbone_config
from eo_dinov3.ssl.param_groups import apply_optim_scheduler, fuse_params_groups
from eo_dinov3.ssl.schedules import ScheduleSet

#: keys of the ``distill`` section (defaults)
DISTILL_DEFAULTS: dict[str, Any] = {
    "teacher": None,        # run folder, teacher_checkpoint.pth, our ckpt/<it>.pt, or a backbone file
    "teacher_arch": None,   # hub name for a plain backbone file whose architecture cannot be inferred
    "output_dir": "runs/distill",
    "students": [],         # [{name, ranks: [a, b], <any config section overrides: student, optim, schedules…>}]
}
_STUDENT_KEYS = {"name", "ranks"}


# ----------------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------------


def _unknown(defaults: Any, given: Any, prefix: str = "") -> list[str]:
    if not isinstance(given, Mapping) or not isinstance(defaults, Mapping) or not defaults:
        return []
    bad = []
    for k, v in given.items():
        if k not in defaults:
            bad.append(prefix + str(k))
        else:
            bad += _unknown(defaults[k], v, f"{prefix}{k}.")
    return bad


@dataclass
class DistillConfig:
    """``base``: the shared training config (crops, masks, schedules, data …); ``students``: one resolved config
    per student (base ⊕ that student's overrides ⊕ the teacher's head sizes, filled in by :class:`FrozenTeacher`);
    ``names``/``ranks``: per student; ``teacher``/``teacher_arch``/``output_dir`` from the ``distill`` section."""

    base: DictConfig
    students: list[DictConfig]
    names: list[str]
    ranks: list[tuple[int, int] | None]
    teacher: str | None
    teacher_arch: str | None
    output_dir: Path


def load_distill_config(path: str | Path | None, overrides: list[str] = ()) -> DistillConfig:
    """Read a distillation YAML: the usual pretraining sections plus ``distill`` (see :data:`DISTILL_DEFAULTS`).
    ``overrides`` are ``key=value`` pairs (``distill.teacher=…``, ``train.max_iterations=…``). Unknown keys raise
    :class:`ConfigError`."""
    raw = OmegaConf.create({})
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        raw = OmegaConf.load(path)
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides)))
    given = OmegaConf.to_container(raw)
    d = {**DISTILL_DEFAULTS, **(given.pop("distill", None) or {})}
    bad = sorted(set(d) - set(DISTILL_DEFAULTS))
    if bad:
        raise ConfigError(f"unknown distill key(s) {bad}; valid: {sorted(DISTILL_DEFAULTS)}")
    defaults = OmegaConf.to_container(default_config())
    bad = _unknown(defaults, given)
    if bad:
        raise ConfigError(f"unknown config key(s) {bad} (valid keys: eo_dinov3/ssl/default_config.yaml + distill)")
    base = OmegaConf.merge(default_config(), given)
    students_raw = list(d["students"] or [])
    if not students_raw:
        raise ConfigError("distill.students is empty: list at least one student ({name, student: {arch: …}})")
    students, names, ranks = [], [], []
    for i, s in enumerate(students_raw):
        s = dict(s)
        name = str(s.get("name") or f"student{i}")
        if name in names or "/" in name:
            raise ConfigError(f"student name {name!r} is duplicated or contains '/'")
        sect = {k: v for k, v in s.items() if k not in _STUDENT_KEYS}
        bad = _unknown(defaults, sect)
        if bad:
            raise ConfigError(f"unknown key(s) {bad} in distill.students[{i}] ({name})")
        tt = [_get(sect, k) for k in ("schedules.teacher_temp", "teacher.teacher_temp", "teacher.warmup_teacher_temp",
                                      "teacher.warmup_teacher_temp_epochs")]
        if any(v is not None for v in tt):
            raise ConfigError(f"distill.students[{i}] ({name}) sets the teacher temperature; it is shared by all "
                              "students (the teacher targets are computed once): set it at the top level")
        cfg = OmegaConf.merge(base, sect)
        cfg.run.output_dir = str(Path(d["output_dir"]) / name)
        cfg.run.name = name
        cfg.run.phase = "distill"
        students.append(cfg)
        names.append(name)
        r = s.get("ranks")
        ranks.append((int(r[0]), int(r[1])) if r is not None else None)
    return DistillConfig(base, students, names, ranks, d["teacher"], d["teacher_arch"], Path(d["output_dir"]))


# ----------------------------------------------------------------------------------------------------------------
# teacher
# ----------------------------------------------------------------------------------------------------------------


def _head_sizes(sd: Mapping[str, Tensor], prefix: str) -> dict[str, int]:
    """``head_n_prototypes``, ``head_hidden_dim``, ``head_bottleneck_dim``, ``head_nlayers`` from a DINOHead
    state dict (keys ``<prefix>mlp.{0,2,…}.weight``, ``<prefix>last_layer.weight``)."""
    linears = sorted(int(k[len(prefix) + 4:].split(".")[0]) for k in sd
                     if k.startswith(prefix + "mlp.") and k.endswith(".weight"))
    if not linears or prefix + "last_layer.weight" not in sd:
        raise CheckpointError(f"teacher checkpoint has no complete {prefix.rstrip('.')} (mlp.*, last_layer.weight)")
    K, bottleneck = sd[prefix + "last_layer.weight"].shape
    hidden = sd[f"{prefix}mlp.0.weight"].shape[0] if len(linears) > 1 else bottleneck
    return {"head_n_prototypes": int(K), "head_hidden_dim": int(hidden), "head_bottleneck_dim": int(bottleneck),
            "head_nlayers": len(linears)}


def resolve_teacher_path(spec: str | Path) -> Path:
    """A run folder → its newest ``eval/training_<it>/teacher_checkpoint.pth`` (else newest ``ckpt/<it>.pt``);
    a file → itself."""
    p = Path(spec).expanduser()
    if p.is_dir():
        exports = []
        for d in (p / "eval").glob("training_*"):
            f = d / "teacher_checkpoint.pth"
            if f.is_file() and d.name.split("_")[-1].isdigit():
                exports.append((int(d.name.split("_")[-1]), f))
        if exports:
            return max(exports)[1]
        latest = ckpt.latest_checkpoint(p / "ckpt")
        if latest is not None:
            return latest
        raise ConfigError(f"distill.teacher={spec}: no eval/training_*/teacher_checkpoint.pth or ckpt/<it>.pt in "
                          "that run folder (train a teacher first: python sat_training/pretrain.py)")
    if not p.is_file():
        hint = " (run `python sat_training/pretrain.py` first to train the demo teacher)" if "demo_cpu" in str(p) else ""
        raise ConfigError(f"distill.teacher={spec}: no such file or run folder{hint}")
    return p


class FrozenTeacher(nn.Module):
    """The frozen teacher ``{backbone, dino_head, ibot_head}`` (eval mode, ``requires_grad=False``) and the
    Sinkhorn-Knopp target builders. :meth:`targets` is :meth:`SSLMetaArch.teacher_output` on this container."""

    n_global_crops = 2
    teacher_output = SSLMetaArch.teacher_output

    def __init__(self, backbone: DinoVisionTransformer, dino_head: DINOHead, ibot_head: DINOHead, *,
                 source: str, heads_from_checkpoint: bool, process_group=None):
        super().__init__()
        self.teacher = nn.ModuleDict({"backbone": backbone, "dino_head": dino_head, "ibot_head": ibot_head})
        self.teacher.requires_grad_(False)
        self.dino_loss = DINOLoss(dino_head.out_dim, group=process_group)
        self.ibot_patch_loss = iBOTPatchLoss(ibot_head.out_dim, group=process_group)
        self.source = source
        self.heads_from_checkpoint = heads_from_checkpoint
        self.eval()

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)  # always eval (no RoPE augmentation, no drop path)

    @property
    def patch_size(self) -> int:
        return int(self.teacher["backbone"].patch_size)

    def head_sizes(self) -> dict[str, dict[str, int]]:
        sd = self.teacher.state_dict()
        return {"dino": _head_sizes(sd, "dino_head."), "ibot": _head_sizes(sd, "ibot_head.")}

    @torch.no_grad()
    def targets(self, data: Mapping[str, Tensor], teacher_temp: float) -> dict[str, Tensor]:
        """Teacher outputs on the global crops (see :meth:`SSLMetaArch.teacher_output`): ``cls_centered``
        ``[n_g, B, K]``, ``masked_patch_centered`` ``[M, K']`` (+ pre-head features and logits)."""
        return self.teacher_output(data, teacher_temp)


def build_teacher(spec: str | Path, cfg: DictConfig, *, arch: str | None = None, device: torch.device | None = None,
                  process_group=None) -> FrozenTeacher:
    """Load the frozen teacher from ``spec`` (see :func:`resolve_teacher_path`); heads from the checkpoint when it
    has them, else fresh (official init, seed ``run.seed``) with the sizes of ``cfg.dino``/``cfg.ibot``."""
    path = resolve_teacher_path(spec)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    payload: dict[str, Tensor] | None = None
    backbone = None
    if isinstance(raw, dict) and raw.get("format") == "eo_dinov3.train":  # our training checkpoint
        payload = {k.removeprefix("teacher."): v for k, v in raw["model"].items() if k.startswith("teacher.")}
        train_cfg = OmegaConf.create(raw["config"])
        bcfg = student_backbone_config(train_cfg)
        backbone = DinoVisionTransformer(bcfg, drop_path_rate=0.0)
        backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in payload.items()
                                  if k.startswith("backbone.")}, strict=True)
    elif isinstance(raw, dict) and isinstance(raw.get("teacher"), dict):  # official teacher_checkpoint.pth
        payload = {k.removeprefix("module."): v for k, v in raw["teacher"].items()}
    if backbone is None:
        from eo_dinov3.checkpoints import load_backbone

        backbone = load_backbone(path, arch=arch, drop_path_rate=0.0)
    if payload is not None and any(k.startswith("dino_head.") for k in payload):
        sizes = {"dino": _head_sizes(payload, "dino_head."), "ibot": _head_sizes(payload, "ibot_head.")}
        heads = {}
        for name, key in (("dino_head", "dino"), ("ibot_head", "ibot")):
            s = sizes[key]
            heads[name] = DINOHead(backbone.embed_dim, s["head_n_prototypes"], hidden_dim=s["head_hidden_dim"],
                                   bottleneck_dim=s["head_bottleneck_dim"], nlayers=s["head_nlayers"])
            heads[name].load_state_dict({k[len(name) + 1:]: v for k, v in payload.items()
                                         if k.startswith(name + ".")}, strict=True)
        from_ckpt = True
    else:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(int(cfg.run.seed))
        heads = {"dino_head": _build_head(cfg, "dino", backbone.embed_dim),
                 "ibot_head": _build_head(cfg, "ibot", backbone.embed_dim)}
        for h in heads.values():
            h.init_weights()
        torch.random.set_rng_state(gen_state)
        from_ckpt = False
    teacher = FrozenTeacher(backbone, heads["dino_head"], heads["ibot_head"], source=str(path),
                            heads_from_checkpoint=from_ckpt, process_group=process_group)
    if device is not None:
        teacher.to(device)
    return teacher


# ----------------------------------------------------------------------------------------------------------------
# students
# ----------------------------------------------------------------------------------------------------------------


def is_convnext_arch(arch: str) -> bool:
    return "convnext" in str(arch)


def build_student_backbone(cfg: DictConfig, patch_size: int) -> nn.Module:
    """``student.arch``: an official ViT hub name / ``custom`` (ViT, :func:`student_backbone_config`), or
    ``convnext_tiny|small|base|large`` / ``convnext`` (``student.arch_overrides``: ConvNeXt fields such as
    ``depths``, ``dims``). ConvNeXts get ``patch_size`` = the teacher's and patch tokens on that grid."""
    s = cfg.student
    arch = str(s.arch)
    if not is_convnext_arch(arch):
        bcfg = student_backbone_config(cfg)
        if bcfg.patch_size != patch_size:
            raise ConfigError(f"student patch size {bcfg.patch_size} != teacher patch size {patch_size}")
        return DinoVisionTransformer(bcfg)
    size = arch.removeprefix("dinov3_").removeprefix("convnext").lstrip("_")
    base = dict(CONVNEXT_SIZES[size]) if size else {}
    if size and size not in CONVNEXT_SIZES:
        raise ConfigError(f"unknown ConvNeXt size in student.arch={arch}; choose convnext_{{tiny,small,base,large}}")
    over = dict(OmegaConf.to_container(s.arch_overrides) if isinstance(s.arch_overrides, DictConfig)
                else (s.arch_overrides or {}))
    try:
        ccfg = ConvNeXtConfig(**{**base, **over, "in_chans": int(s.in_chans), "patch_size": patch_size,
                                 "drop_path_rate": float(s.drop_path_rate)})
    except TypeError as e:
        raise ConfigError(f"student.arch_overrides for a ConvNeXt: {e}") from None
    model = ConvNeXt(ccfg)
    model.patch_tokens_on_patch_grid = True
    return model


class DistillStudent(nn.Module):
    """One student ``{backbone, dino_head, ibot_head}``, its EMA ``model_ema`` (exported) and its losses.

    The step reuses the meta-architecture's code on this container: :meth:`SSLMetaArch.student_output` (called with
    ``mask=False``), :meth:`SSLMetaArch.compute_losses` (no Gram), :meth:`SSLMetaArch.clip_gradients` and
    :meth:`SSLMetaArch.get_params_groups`."""

    student_output = SSLMetaArch.student_output
    compute_losses = SSLMetaArch.compute_losses
    clip_gradients = SSLMetaArch.clip_gradients
    get_params_groups = SSLMetaArch.get_params_groups

    def __init__(self, name: str, cfg: DictConfig, patch_size: int):
        super().__init__()
        self.name, self.cfg = name, cfg
        backbone = build_student_backbone(cfg, patch_size)
        D = backbone.embed_dim
        self.student = nn.ModuleDict({"backbone": backbone, "dino_head": _build_head(cfg, "dino", D),
                                      "ibot_head": _build_head(cfg, "ibot", D)})
        for m in self.student.values():
            m.init_weights()
        self.model_ema = copy.deepcopy(self.student)
        self.model_ema.requires_grad_(False)
        self.n_global_crops = 2
        self.n_local_crops = int(_get(cfg, "crops.local_crops_number", 8))
        self.dino_loss_weight = float(_get(cfg, "dino.loss_weight", 1.0))
        self.dino_global_ignore_diagonal = bool(_get(cfg, "dino.global_ignore_diagonal", True))
        self.koleo_loss_weight = float(_get(cfg, "dino.koleo_loss_weight", 0.1))
        self.ibot_loss_weight = float(_get(cfg, "ibot.loss_weight", 1.0))
        self.dino_loss = DINOLoss(int(cfg.dino.head_n_prototypes))
        self.ibot_patch_loss = iBOTPatchLoss(int(cfg.ibot.head_n_prototypes))
        self.koleo_loss = KoLeoLoss()  # official: always per-GPU in multi-distillation

    @property
    def is_convnext(self) -> bool:
        return isinstance(self.student["backbone"], ConvNeXt)

    def train(self, mode: bool = True) -> "DistillStudent":
        super().train(mode)
        self.model_ema.eval()
        return self

    def forward_backward(self, data: Mapping[str, Tensor], teacher: Mapping[str, Tensor], *, backward: bool = True
                         ) -> tuple[Tensor, dict[str, Tensor]]:
        """Student forward on unmasked global + local crops, the DINO/KoLeo/iBOT losses against the shared teacher
        targets, backward. Returns ``(total, terms)`` (terms detached)."""
        sg, sl = self.student_output(data, mask=False)
        P_s = sg["patch_pre_head"].shape[2]
        P_t = data["collated_masks"].shape[1]
        if P_s != P_t:
            raise ConfigError(f"student {self.name} gives {P_s} patch tokens per global crop, the teacher grid has "
                              f"{P_t}: use the teacher's patch size and crop sizes divisible by it")
        total, terms = self.compute_losses(teacher, sg, sl, data)
        if backward:
            total.backward()
        return total, {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def update_ema(self, momentum: float) -> None:
        """``θ_ema ← m·θ_ema + (1−m)·θ_student`` over all parameters (buffers not averaged), as the official EMA."""
        ema = [p for m in self.model_ema.values() for p in m.parameters()]
        cur = [p for m in self.student.values() for p in m.parameters()]
        torch._foreach_mul_(ema, momentum)
        torch._foreach_add_(ema, cur, alpha=1 - momentum)

    def export_backbone(self, path: Path) -> Path:
        """EMA backbone → ``path``: ConvNeXt in our ConvNeXt format (config + official keys), ViT in the
        ``eo_dinov3`` format of :func:`eo_dinov3.checkpoints.save_backbone`."""
        bb = self.model_ema["backbone"]
        if isinstance(bb, ConvNeXt):
            return save_convnext(bb, path, format="eo")
        from eo_dinov3.checkpoints import save_backbone

        return save_backbone(bb, path, format="eo")


# ----------------------------------------------------------------------------------------------------------------
# distributed plumbing (rank groups)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RankLayout:
    """Which student this rank trains and the process groups of the rank-group path (None on one process)."""

    student_index: int | None = None  # None: all students in this process
    position: int = 0                 # rank inside the student's range
    group_size: int = 1               # ranks per student
    student_group: Any = None         # this student's ranks (gradient averaging)
    position_group: Any = None        # ranks at this position across students (teacher-target broadcast)
    leader_rank: int = 0              # global rank computing the teacher for this position
    is_leader: bool = True            # this rank computes the teacher
    is_group_main: bool = True        # writes this student's files


def make_rank_layout(ranks: list[tuple[int, int] | None], world: int, rank: int) -> RankLayout:
    """Partition ``world`` ranks into contiguous, equal student ranges (``None`` ranges: split evenly) and create
    the groups (every rank must call this, collectively)."""
    n = len(ranks)
    if world <= 1:
        return RankLayout()
    if world % n:
        raise ConfigError(f"{world} processes cannot be split evenly over {n} students")
    g = world // n
    ranges = [r if r is not None else (i * g, (i + 1) * g) for i, r in enumerate(ranks)]
    if sorted(ranges) != [(i * g, (i + 1) * g) for i in range(n)]:
        raise ConfigError(f"distill.students[*].ranks {ranges} must split 0..{world} into {n} contiguous ranges of "
                          f"{g} ranks")
    s = next(i for i, (a, b) in enumerate(ranges) if a <= rank < b)
    student_groups = [dist.new_group(list(range(a, b))) for a, b in ranges]
    position_groups = [dist.new_group([a + j for a, _ in ranges]) for j in range(g)]
    j = rank - ranges[s][0]
    return RankLayout(student_index=s, position=j, group_size=g, student_group=student_groups[s],
                      position_group=position_groups[j], leader_rank=ranges[0][0] + j, is_leader=(s == 0),
                      is_group_main=(j == 0))


def _group_average_(params, group, size: int) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if size <= 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= size
    off = 0
    for g in grads:
        g.copy_(flat[off: off + g.numel()].view_as(g))
        off += g.numel()


def _group_all_true(flag: bool, group, device) -> bool:
    if group is None:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t, group=group)
    return t.item() == 0.0


# ----------------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DistillResult:
    output_dir: Path
    iteration: int
    losses: dict[str, list[float]] = field(default_factory=dict)
    exports: dict[str, Path] = field(default_factory=dict)
    checkpoints: dict[str, Path] = field(default_factory=dict)
    teacher_forwards: int = 0


class DistillRun:
    """Build the teacher, the students (all, or this rank's), optimisers and schedules; :meth:`run` trains."""

    def __init__(self, dcfg: DistillConfig, *, batches: Iterator[dict] | None = None,
                 dist_info: DistInfo | None = None, progress: bool = True):
        self.dcfg = dcfg
        base = dcfg.base
        self.dist = dist_info or init_distributed(str(base.run.device))
        self.device = self.dist.device
        self.layout = make_rank_layout(dcfg.ranks, self.dist.world_size, self.dist.rank)
        self.progress = progress and self.dist.is_main
        self.seed = int(base.run.seed)
        self._batches = batches
        precision = str(base.train.precision)
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        if precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision must be auto, fp32 or bf16, got {precision!r}")
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        if not dcfg.teacher:
            raise ConfigError("distill.teacher is not set: give a run folder, teacher_checkpoint.pth or backbone file")
        self.teacher = None
        if self.layout.is_leader:
            leader_group = self.layout.student_group
            self.teacher = build_teacher(dcfg.teacher, base, arch=dcfg.teacher_arch, device=self.device,
                                         process_group=leader_group)
            sizes = self.teacher.head_sizes()
            patch = self.teacher.patch_size
        else:
            sizes, patch = None, None
        if self.layout.student_index is not None:  # every rank needs the head sizes and patch size
            box = [(sizes, patch)]
            dist.broadcast_object_list(box, src=0)
            sizes, patch = box[0]
        self.teacher_sizes, self.patch_size = sizes, patch
        mine = range(len(dcfg.names)) if self.layout.student_index is None else [self.layout.student_index]
        self.students: list[DistillStudent] = []
        self.optimizers, self.schedules = [], []
        for i in mine:
            cfg = dcfg.students[i]
            for sec in ("dino", "ibot"):
                for k, v in sizes[sec].items():
                    cfg[sec][k] = v
            torch.manual_seed(derive_seed(self.seed, 101, i))
            s = DistillStudent(dcfg.names[i], cfg, patch).to(self.device)
            groups = fuse_params_groups(s.get_params_groups(float(cfg.optim.layerwise_decay),
                                                            float(cfg.optim.patch_embed_lr_mult)))
            self.optimizers.append(torch.optim.AdamW(groups, betas=(float(cfg.optim.adamw_beta1),
                                                                    float(cfg.optim.adamw_beta2))))
            self.schedules.append(ScheduleSet.from_config(cfg, world_size=self.layout.group_size))
            self.students.append(s)
        self.student_ids = list(mine)
        self.base_schedule = ScheduleSet.from_config(base, world_size=self.layout.group_size)
        total = self.base_schedule.total_iterations
        max_it = base.train.max_iterations
        self.stop_iteration = min(total, int(max_it)) if max_it else total
        self.iteration = 0
        self.teacher_forwards = 0
        self.result = DistillResult(output_dir=dcfg.output_dir, iteration=0,
                                    losses={s.name: [] for s in self.students})

    # ------------------------------------------------------------------ helpers
    def _log(self, msg: str) -> None:
        if self.dist.is_main:
            print(f"[eo_dinov3 distill] {msg}", file=sys.stderr, flush=True)

    def _out(self, s: DistillStudent) -> Path:
        return Path(s.cfg.run.output_dir)

    def _stream(self) -> Iterator[dict]:
        if self._batches is not None:
            return iter(self._batches)
        from eo_dinov3.ssl.pipeline import build_batch_stream

        info = DistInfo(rank=self.layout.position, world_size=self.layout.group_size, local_rank=self.dist.local_rank,
                        device=self.device)
        stream, _, _ = build_batch_stream(self.dcfg.base, info, start_step=self.iteration)
        return stream

    def _teacher_targets(self, data: dict, teacher_temp: float) -> dict[str, Tensor]:
        out = None
        if self.layout.is_leader:
            self.teacher_forwards += 1
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                enabled=self.autocast_dtype is not None):
                out = self.teacher.targets(data, teacher_temp)
        if self.layout.position_group is None:
            return out
        n_g = 2
        B = data["collated_global_crops"].shape[0] // n_g
        K = self.teacher_sizes["dino"]["head_n_prototypes"]
        K2 = self.teacher_sizes["ibot"]["head_n_prototypes"]
        M = int(data["mask_indices_list"].shape[0])
        cls = out["cls_centered"].float().contiguous() if out else torch.empty(n_g, B, K, device=self.device)
        patch = (out["masked_patch_centered"].float().contiguous() if out
                 else torch.empty(M, K2, device=self.device))
        dist.broadcast(cls, src=self.layout.leader_rank, group=self.layout.position_group)
        dist.broadcast(patch, src=self.layout.leader_rank, group=self.layout.position_group)
        return {"cls_centered": cls, "masked_patch_centered": patch}

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        for s, opt in zip(self.students, self.optimizers):
            if not self.layout.is_group_main:
                continue
            out = self._out(s)
            model = {f"student.{k}": v for k, v in s.student.state_dict().items()}
            model.update({f"model_ema.{k}": v for k, v in s.model_ema.state_dict().items()})
            state = {"format": "eo_dinov3.distill", "iteration": self.iteration, "student": s.name, "model": model,
                     "optimizer": opt.state_dict(), "rng": ckpt.rng_state(), "teacher_source":
                     self.teacher.source if self.teacher is not None else str(self.dcfg.teacher),
                     "config": OmegaConf.to_yaml(s.cfg, resolve=True)}
            path = ckpt.atomic_save(state, out / "ckpt" / f"{self.iteration}.pt")
            ckpt.rotate_checkpoints(out / "ckpt", int(s.cfg.checkpointing.max_to_keep), s.cfg.checkpointing.keep_every)
            d = out / "eval" / f"training_{self.iteration}"
            ckpt.atomic_save({"teacher": {k: v.detach().clone() for k, v in s.model_ema.state_dict().items()}},
                             d / "teacher_checkpoint.pth")
            self.result.exports[s.name] = s.export_backbone(d / "backbone.pth")
            self.result.checkpoints[s.name] = path
        if self.dist.enabled:
            dist.barrier()

    def resume(self) -> bool:
        """Resume every student from the newest iteration that all of this process's students saved."""
        if str(self.dcfg.base.checkpointing.resume) == "never":
            return False
        common = None
        for s in self.students:
            its = {it for it, _ in ckpt.list_checkpoints(self._out(s) / "ckpt")}
            common = its if common is None else common & its
        if self.dist.enabled:
            box = [sorted(common or [])]
            gathered = [None] * self.dist.world_size
            dist.all_gather_object(gathered, box[0])
            common = set.intersection(*[set(g) for g in gathered])
        if not common:
            return False
        it = max(common)
        for s, opt in zip(self.students, self.optimizers):
            obj = ckpt.load_training_checkpoint(self._out(s) / "ckpt" / f"{it}.pt")
            m = obj["model"]
            s.student.load_state_dict({k[8:]: v for k, v in m.items() if k.startswith("student.")}, strict=True)
            s.model_ema.load_state_dict({k[10:]: v for k, v in m.items() if k.startswith("model_ema.")}, strict=True)
            opt.load_state_dict(obj["optimizer"])
        self.iteration = it
        self._log(f"resumed all students at iteration {it}")
        return True

    # ------------------------------------------------------------------ loop
    def run(self) -> DistillResult:
        base = self.dcfg.base
        for s in self.students:
            if self.layout.is_group_main:
                self._out(s).mkdir(parents=True, exist_ok=True)
                save_config(s.cfg, self._out(s) / "config.yaml")
        self.resume()
        stream = self._stream()
        clip = {s.name: (float(s.cfg.optim.clip_grad) if s.cfg.optim.clip_grad else None) for s in self.students}
        period = int(base.checkpointing.period)
        metrics = {s.name: open(self._out(s) / "metrics.jsonl", "a") if self.layout.is_group_main else None
                   for s in self.students}
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.stop_iteration, initial=self.iteration, desc="distill", unit="it",
                       dynamic_ncols=True)
        for s in self.students:
            s.train()
        try:
            while self.iteration < self.stop_iteration:
                it = self.iteration
                t0 = time.perf_counter()
                data = {k: (v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v)
                        for k, v in next(stream).items()}
                teacher_temp = self.base_schedule[it]["teacher_temp"]
                targets = self._teacher_targets(data, teacher_temp)
                postfix = {}
                for idx, s, opt, sched in zip(self.student_ids, self.students, self.optimizers, self.schedules):
                    torch.manual_seed(derive_seed(self.seed, STEP_STREAM, it, idx))
                    sch = sched[it]
                    apply_optim_scheduler(opt, sch["lr"], sch["wd"], sch["last_layer_lr"])
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                        enabled=self.autocast_dtype is not None):
                        loss, terms = s.forward_backward(data, targets)
                    if self.layout.student_group is not None:
                        _group_average_(s.student.parameters(), self.layout.student_group, self.layout.group_size)
                        dist.all_reduce(loss.detach(), group=self.layout.student_group)
                        loss = loss.detach() / self.layout.group_size
                    norms = s.clip_gradients(clip[s.name])
                    finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(n)) for n in norms.values())
                    finite = _group_all_true(finite, self.layout.student_group, self.device)
                    if finite:
                        opt.step()
                        s.update_ema(sch["momentum"])
                        self.result.losses[s.name].append(float(loss.detach()))
                    else:
                        opt.zero_grad(set_to_none=True)
                        self._log(f"{s.name}: non-finite step {it} skipped")
                    rec = {"iteration": it, "finite": finite, "loss/total": float(loss.detach()),
                           **{f"loss/{k}": float(v) for k, v in terms.items() if v.ndim == 0 and k != "total"},
                           **{f"grad_norm/{k}": float(v) for k, v in norms.items()},
                           **{f"sched/{k}": v for k, v in sch.items()}, "sched/teacher_temp": teacher_temp}
                    if metrics[s.name] is not None:
                        metrics[s.name].write(json.dumps(rec) + "\n")
                        metrics[s.name].flush()
                    postfix[s.name] = f"{float(loss.detach()):.3f}"
                self.iteration = it + 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(**postfix, s_per_it=f"{time.perf_counter() - t0:.2f}")
                if self.iteration % period == 0 or self.iteration == self.stop_iteration:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
            for f in metrics.values():
                if f is not None:
                    f.close()
        self.result.iteration = self.iteration
        self.result.teacher_forwards = self.teacher_forwards
        if self.dist.is_main:
            summary = {
                "output_dir": str(self.dcfg.output_dir), "iterations": self.iteration,
                "teacher": self.teacher.source if self.teacher is not None else str(self.dcfg.teacher),
                "teacher_heads_from_checkpoint": self.teacher.heads_from_checkpoint if self.teacher else None,
                "students": {s.name: {"arch": str(s.cfg.student.arch), "convnext": s.is_convnext,
                                      "params": sum(p.numel() for p in s.student["backbone"].parameters()),
                                      "export": str(self.result.exports.get(s.name)),
                                      "first_loss": (self.result.losses[s.name] or [math.nan])[0],
                                      "last_loss": (self.result.losses[s.name] or [math.nan])[-1]}
                             for s in self.students},
            }
            self.dcfg.output_dir.mkdir(parents=True, exist_ok=True)
            (self.dcfg.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return self.result


def distill(dcfg: DistillConfig, *, batches: Iterator[dict] | None = None, progress: bool = True) -> DistillResult:
    """Run multi-student distillation described by ``dcfg`` (see :func:`load_distill_config`)."""
    return DistillRun(dcfg, batches=batches, progress=progress).run()


def load_student_export(path: str | Path) -> nn.Module:
    """Load an exported student backbone (``<student>/eval/training_<it>/backbone.pth``) with the hub loaders."""
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(raw, dict) and raw.get("format") == "eo_dinov3.convnext":
        from eo_dinov3.models.convnext import load_convnext

        return load_convnext(path)
    from eo_dinov3.checkpoints import load_backbone

    return load_backbone(path)
