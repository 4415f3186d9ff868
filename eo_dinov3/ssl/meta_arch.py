"""The DINOv3 self-supervised meta-architecture: student, EMA teacher, optional Gram teacher, and the losses.

One training step (official ``SSLMetaArch.forward_backward``), with ``n_g = 2`` global crops, ``n_l`` local crops,
``B`` images per process and ``P`` patches per global crop:

1. Teacher (eval mode, no grad) on the ``n_g·B`` global crops → CLS → DINO head → Sinkhorn-Knopp targets
   ``[n_g, B, K]``; patch tokens at the masked positions → iBOT head → Sinkhorn-Knopp targets ``[M, K']``.
2. Student on ``[global crops (masked), local crops]`` in one list forward → DINO head on all CLS tokens (global and
   local, shared head); iBOT head on the masked global patch tokens.
3. Gram teacher (if enabled) on the Gram crops → patch tokens, bicubically resized to the student grid.
4. ``L = w_l·L_DINO_local + w_g·L_DINO_global + w_koleo·Σ_c KoLeo(CLS_c) + w_ibot·L_iBOT + w_gram·L_Gram`` with
   ``w_l = T_l/(T_g+T_l)·w_dino·λ_loc``, ``w_g = T_g/(T_g+T_l)·w_dino`` (``T_l = n_g·n_l``, ``T_g = n_g(n_g−1)``),
   then ``backward``.

The trainer then clips gradients per student sub-module, steps AdamW and calls :meth:`SSLMetaArch.update_ema`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from eo_dinov3.hub import ARCHS, arch_config
from eo_dinov3.losses.dino import DINOLoss, dino_loss_weights
from eo_dinov3.losses.gram import GramLoss, resize_gram_teacher_features
from eo_dinov3.losses.ibot import iBOTPatchLoss
from eo_dinov3.losses.koleo import KoLeoLoss, KoLeoLossDistributed
from eo_dinov3.models.heads import DINOHead
from eo_dinov3.models.vision_transformer import DinoVisionTransformer, ViTConfig


def _get(cfg: Any, path: str, default: Any = None) -> Any:
    """``cfg.a.b`` for dicts or OmegaConf configs, ``default`` when absent."""
    node = cfg
    for part in path.split("."):
        if node is None:
            return default
        if isinstance(node, Mapping) or hasattr(node, "get"):
            node = node.get(part, None)
        else:
            node = getattr(node, part, None)
    return default if node is None else node


def student_backbone_config(cfg: Any) -> ViTConfig:
    """:class:`ViTConfig` of the student from ``cfg.student``.

    ``student.arch`` is an official hub name (``dinov3_vits16`` …) or ``custom``; ``student.arch_overrides`` (a dict)
    and the recipe keys (``drop_path_rate``, ``layerscale``, ``pos_embed_rope_*``, ``untie_global_and_local_cls_norm``,
    ``in_chans``, ``ffn_layer``, ``ffn_ratio``, ``n_storage_tokens`` …) override it."""
    s = cfg["student"]
    arch = s.get("arch", "dinov3_vits16")
    base = arch_config(arch) if arch in ARCHS else ViTConfig()
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    overrides: dict[str, Any] = {}
    for key in fields:
        if key in s and s[key] is not None:
            overrides[key] = s[key]
    if s.get("layerscale", None) is not None:
        overrides["layerscale_init"] = s["layerscale"]
    for key in ("pos_embed_rope_rescale_coords", "pos_embed_rope_shift_coords", "pos_embed_rope_jitter_coords"):
        if key in s:  # an explicit null switches the augmentation off
            overrides[key] = s[key]
    for key, value in dict(s.get("arch_overrides", None) or {}).items():
        if key not in fields:
            raise ValueError(f"student.arch_overrides.{key} is not a ViT setting; valid: {sorted(fields)}")
        overrides[key] = value
    return dataclasses.replace(base, **overrides)


def _reshard(module: nn.Module) -> None:
    """Reshard every FSDP2 sub-module (no-op without FSDP) so parameters are DTensor shards again."""
    for m in module.modules():
        if hasattr(m, "reshard") and callable(m.reshard) and type(m).__name__.startswith("FSDP"):
            m.reshard()


def _build_head(cfg: Any, section: str, in_dim: int) -> DINOHead:
    return DINOHead(
        in_dim,
        int(cfg[section]["head_n_prototypes"]),
        hidden_dim=int(cfg[section]["head_hidden_dim"]),
        bottleneck_dim=int(cfg[section]["head_bottleneck_dim"]),
        nlayers=int(cfg[section]["head_nlayers"]),
    )


class SSLMetaArch(nn.Module):
    """Student/teacher/Gram-teacher container with the DINOv3 losses. ``cfg`` is the resolved training config
    (sections ``student``, ``dino``, ``ibot``, ``gram``, ``crops``); see ``configs/pretrain/*.yaml``."""

    def __init__(self, cfg: Any, *, process_group=None):
        super().__init__()
        self.cfg = cfg
        backbone_cfg = student_backbone_config(cfg)
        self.student = nn.ModuleDict(
            {
                "backbone": DinoVisionTransformer(backbone_cfg),
                "dino_head": _build_head(cfg, "dino", backbone_cfg.embed_dim),
                "ibot_head": _build_head(cfg, "ibot", backbone_cfg.embed_dim),
            }
        )
        teacher_cfg = dataclasses.replace(backbone_cfg, drop_path_rate=0.0)
        self.teacher = nn.ModuleDict(
            {
                "backbone": DinoVisionTransformer(teacher_cfg),
                "dino_head": _build_head(cfg, "dino", backbone_cfg.embed_dim),
                "ibot_head": _build_head(cfg, "ibot", backbone_cfg.embed_dim),
            }
        )
        self.use_gram = bool(_get(cfg, "gram.use_loss", False))
        self.gram_from_ema = bool(_get(cfg, "gram.ema_teacher", False))
        self.gram_teacher = None
        if self.use_gram and not self.gram_from_ema:
            self.gram_teacher = nn.ModuleDict({"backbone": DinoVisionTransformer(teacher_cfg)})
        for module in (self.teacher, self.gram_teacher):
            if module is not None:
                module.requires_grad_(False)

        self.n_global_crops = 2
        self.n_local_crops = int(_get(cfg, "crops.local_crops_number", 8))
        self.dino_loss_weight = float(_get(cfg, "dino.loss_weight", 1.0))
        self.dino_global_ignore_diagonal = bool(_get(cfg, "dino.global_ignore_diagonal", True))
        self.koleo_loss_weight = float(_get(cfg, "dino.koleo_loss_weight", 0.1))
        self.ibot_loss_weight = float(_get(cfg, "ibot.loss_weight", 1.0))
        self.gram_loss_weight = float(_get(cfg, "gram.loss_weight", 1.0))
        self.dino_loss = DINOLoss(int(cfg["dino"]["head_n_prototypes"]), group=process_group)
        self.ibot_patch_loss = iBOTPatchLoss(int(cfg["ibot"]["head_n_prototypes"]), group=process_group)
        if _get(cfg, "dino.koleo_loss_distributed", False):
            self.koleo_loss = KoLeoLossDistributed(
                topk=int(_get(cfg, "dino.koleo_topk", 1)),
                loss_group_size=_get(cfg, "dino.koleo_distributed_loss_group_size", None),
                group=process_group,
            )
        else:
            self.koleo_loss = KoLeoLoss()
        self.gram_loss = GramLoss(
            apply_norm=bool(_get(cfg, "gram.normalized", True)),
            img_level=bool(_get(cfg, "gram.img_level", True)),
            remove_neg=bool(_get(cfg, "gram.remove_neg", False)),
            remove_only_teacher_neg=bool(_get(cfg, "gram.remove_only_teacher_neg", False)),
        )
        self.gram_resize_antialias = bool(_get(cfg, "gram.global_teacher_resize_antialias", False))
        self.gram_resize_method = str(_get(cfg, "gram.global_teacher_resize_method", "bicubic"))

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def init_weights(self) -> None:
        """Official init of the student; teacher (and Gram teacher backbone) start as exact copies."""
        self.student["backbone"].init_weights()
        self.student["dino_head"].init_weights()
        self.student["ibot_head"].init_weights()
        self.dino_loss.init_weights()
        self.ibot_patch_loss.init_weights()
        self.teacher.load_state_dict(self.student.state_dict())
        if self.gram_teacher is not None:
            self.gram_teacher["backbone"].load_state_dict(self.student["backbone"].state_dict())

    def train(self, mode: bool = True) -> "SSLMetaArch":
        """Student follows ``mode``; the teacher and Gram teacher always stay in eval mode (no RoPE augmentation)."""
        super().train(mode)
        self.teacher.eval()
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        return self

    @torch.no_grad()
    def update_ema(self, momentum: float) -> None:
        """``θ_teacher ← m·θ_teacher + (1−m)·θ_student`` over the parameters (not buffers) of all sub-modules."""
        _reshard(self.teacher)  # FSDP2: a root module can stay unsharded after forward
        t_params, s_params = [], []
        for name in ("backbone", "dino_head", "ibot_head"):
            t_params += list(self.teacher[name].parameters())
            s_params += list(self.student[name].parameters())
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, s_params, alpha=1 - momentum)

    @torch.no_grad()
    def update_gram(self, momentum: float = 0.0) -> None:
        """Refresh the Gram teacher from the EMA teacher's backbone (``m = 0``: a plain copy)."""
        if self.gram_teacher is None:
            return
        _reshard(self.gram_teacher)
        _reshard(self.teacher)
        t = list(self.gram_teacher["backbone"].parameters())
        s = list(self.teacher["backbone"].parameters())
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1 - momentum)

    def clip_gradients(self, max_norm: float | None) -> dict[str, Tensor]:
        """Per-sub-module gradient norms before clipping (official: backbone, dino_head, ibot_head clipped apart).
        ``max_norm`` None/0 measures without clipping."""
        norms = {}
        for name in ("backbone", "dino_head", "ibot_head"):
            params = [p for p in self.student[name].parameters() if p.grad is not None]
            if max_norm:
                norms[name] = torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm)
            else:
                norms[name] = torch.nn.utils.get_total_norm([p.grad for p in params])
        return norms

    def get_params_groups(self, layerwise_decay: float, patch_embed_lr_mult: float) -> list[dict]:
        """Per-parameter AdamW groups (layer-wise lr decay, patch-embed multiplier, weight-decay rules, last layer)."""
        from eo_dinov3.ssl.param_groups import get_params_groups_with_decay

        groups = []
        for name in ("backbone", "dino_head", "ibot_head"):
            groups += get_params_groups_with_decay(
                self.student[name], lr_decay_rate=layerwise_decay, patch_embed_lr_mult=patch_embed_lr_mult
            )
        return groups

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def teacher_output(self, data: Mapping[str, Tensor], teacher_temp: float) -> dict[str, Tensor]:
        """Teacher CLS/patch features, head logits and Sinkhorn-Knopp targets on the global crops."""
        crops = data["collated_global_crops"]
        n_g = self.n_global_crops
        B = crops.shape[0] // n_g
        out = self.teacher["backbone"](crops, is_training=True)
        cls, patch = out["x_norm_clstoken"], out["x_norm_patchtokens"]
        idx = data["mask_indices_list"]
        masked_patch = patch.flatten(0, 1).index_select(0, idx)
        cls_after_head = self.teacher["dino_head"](cls)
        masked_after_head = self.teacher["ibot_head"](masked_patch)
        cls_centered = self.dino_loss.sinkhorn_knopp_teacher(cls_after_head, teacher_temp)
        masked_centered = self.ibot_patch_loss.sinkhorn_knopp_teacher(
            masked_after_head, teacher_temp, data["n_masked_patches"]
        )
        return {
            "cls_pre_head": cls.unflatten(0, (n_g, B)),
            "reg_pre_head": out["x_storage_tokens"].unflatten(0, (n_g, B)),
            "patch_pre_head": patch.unflatten(0, (n_g, B)),
            "cls_after_head": cls_after_head.unflatten(0, (n_g, B)),
            "cls_centered": cls_centered.unflatten(0, (n_g, B)),
            "masked_patch_after_head": masked_after_head,
            "masked_patch_centered": masked_centered,
        }

    def student_output(self, data: Mapping[str, Tensor], *, mask: bool = True) -> tuple[dict, dict]:
        """Student list forward on ``[global (masked), local]`` crops and the two heads."""
        g, l = data["collated_global_crops"], data["collated_local_crops"]
        n_g, n_l = self.n_global_crops, self.n_local_crops
        B = g.shape[0] // n_g
        masks = data["collated_masks"] if mask else None
        g_out, l_out = self.student["backbone"]([g, l], masks=[masks, None], is_training=True)
        g_cls, l_cls = g_out["x_norm_clstoken"], l_out["x_norm_clstoken"]
        g_patch = g_out["x_norm_patchtokens"]
        masked_patch = g_patch.flatten(0, 1).index_select(0, data["mask_indices_list"])
        masked_after_head = self.student["ibot_head"](masked_patch)
        cls_after_head = self.student["dino_head"](torch.cat([g_cls, l_cls]))
        g_after, l_after = cls_after_head.split([g_cls.shape[0], l_cls.shape[0]])
        student_global = {
            "cls_pre_head": g_cls.unflatten(0, (n_g, B)),
            "reg_pre_head": g_out["x_storage_tokens"].unflatten(0, (n_g, B)),
            "patch_pre_head": g_patch.unflatten(0, (n_g, B)),
            "cls_after_head": g_after.unflatten(0, (n_g, B)),
            "masked_patch_pre_head": masked_patch,
            "masked_patch_after_head": masked_after_head,
        }
        student_local = {
            "cls_pre_head": l_cls.unflatten(0, (n_l, B)),
            "reg_pre_head": l_out["x_storage_tokens"].unflatten(0, (n_l, B)),
            "patch_pre_head": l_out["x_norm_patchtokens"].unflatten(0, (n_l, B)),
            "cls_after_head": l_after.unflatten(0, (n_l, B)),
        }
        return student_global, student_local

    @torch.no_grad()
    def gram_teacher_output(self, data: Mapping[str, Tensor], student_grid: tuple[int, int]) -> Tensor:
        """Gram targets ``[n_g·B, P, D]``: Gram-teacher (or EMA-teacher) patch tokens on the Gram crops, resized
        bicubically (before any normalisation) to the student's patch grid when the resolutions differ."""
        crops = data.get("collated_gram_teacher_crops")
        if crops is None:
            crops = data["collated_global_crops"]
        teacher = self.teacher if self.gram_from_ema else self.gram_teacher
        feats = teacher["backbone"](crops, is_training=True)["x_norm_patchtokens"]
        p = teacher["backbone"].patch_size
        src_grid = (crops.shape[-2] // p, crops.shape[-1] // p)
        if src_grid != tuple(student_grid):
            feats = resize_gram_teacher_features(
                feats,
                student_grid,
                source_grid=src_grid,
                mode=self.gram_resize_method,
                antialias=self.gram_resize_antialias,
            )
        return feats

    def compute_losses(
        self,
        teacher: dict,
        student_global: dict,
        student_local: dict,
        data: Mapping[str, Tensor],
        *,
        gram_targets: Tensor | None = None,
        dino_local_weight: float = 1.0,
        gram_weight: float | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted total loss and the unweighted terms (see module doc)."""
        n_g, n_l = self.n_global_crops, self.n_local_crops
        w_local, w_global = dino_loss_weights(n_g, n_l, self.dino_global_ignore_diagonal)
        terms: dict[str, Tensor] = {}
        total = torch.zeros((), device=teacher["cls_centered"].device)
        if n_l > 0:
            terms["dino_local_crops_loss"] = self.dino_loss(student_local["cls_after_head"], teacher["cls_centered"])
            total = total + self.dino_loss_weight * dino_local_weight * w_local * terms["dino_local_crops_loss"]
        terms["dino_global_crops_loss"] = self.dino_loss(
            student_global["cls_after_head"], teacher["cls_centered"], ignore_diagonal=self.dino_global_ignore_diagonal
        )
        total = total + self.dino_loss_weight * w_global * terms["dino_global_crops_loss"]
        if self.koleo_loss_weight > 0:
            per_crop = torch.stack([self.koleo_loss(c) for c in student_global["cls_pre_head"]])
            terms["koleo_per_crop"] = per_crop
            terms["koleo_loss"] = per_crop.mean()
            total = total + self.koleo_loss_weight * n_g * terms["koleo_loss"]
        if self.ibot_loss_weight > 0:
            terms["ibot_loss"] = self.ibot_patch_loss.forward_masked(
                student_global["masked_patch_after_head"],
                teacher["masked_patch_centered"],
                student_masks_flat=data["collated_masks"],
                n_masked_patches=int(data["mask_indices_list"].shape[0]),
                masks_weight=data["masks_weight"],
            )
            total = total + self.ibot_loss_weight * terms["ibot_loss"]
        if gram_targets is not None:
            student_patches = student_global["patch_pre_head"].flatten(0, 1)
            terms["gram_loss"] = self.gram_loss(student_patches, gram_targets)
            w = self.gram_loss_weight if gram_weight is None else gram_weight
            total = total + w * terms["gram_loss"]
        terms["total"] = total
        return total, terms

    def forward_backward(
        self,
        data: Mapping[str, Tensor],
        *,
        teacher_temp: float,
        iteration: int = 0,
        dino_local_weight: float = 1.0,
        gram_weight: float | None = None,
        backward: bool = True,
    ) -> tuple[Tensor, dict[str, Any]]:
        """One step's forward and backward. Returns ``(total_loss, outputs)`` where ``outputs`` holds the loss
        terms (``outputs["losses"]``) and the teacher/student/Gram intermediates (for monitors and tests)."""
        del iteration
        teacher = self.teacher_output(data, teacher_temp)
        student_global, student_local = self.student_output(data)
        gram_targets = None
        if self.use_gram and (gram_weight is None or gram_weight > 0 or self.gram_loss_weight > 0):
            grid = data["collated_global_crops"].shape[-2:]
            p = self.student["backbone"].patch_size
            gram_targets = self.gram_teacher_output(data, (grid[0] // p, grid[1] // p))
        total, terms = self.compute_losses(
            teacher,
            student_global,
            student_local,
            data,
            gram_targets=gram_targets,
            dino_local_weight=dino_local_weight,
            gram_weight=gram_weight,
        )
        if backward:
            total.backward()
        return total, {
            "losses": {k: v.detach() for k, v in terms.items()},
            "teacher": teacher,
            "student_global": {k: v.detach() for k, v in student_global.items()},
            "student_local": {k: v.detach() for k, v in student_local.items()},
            "gram_targets": gram_targets,
        }

    # ------------------------------------------------------------------ export
    def teacher_checkpoint(self) -> dict[str, Tensor]:
        """The official ``teacher_checkpoint.pth`` payload: ``{"teacher": {backbone.*, dino_head.*, ibot_head.*}}``."""
        return {"teacher": {k: v.detach().clone() for k, v in self.teacher.state_dict().items()}}

    def copy_backbone_to_teacher(self) -> None:
        """Make the teacher an exact copy of the student (used after loading initial weights into the student)."""
        self.teacher.load_state_dict(copy.deepcopy(self.student.state_dict()))
