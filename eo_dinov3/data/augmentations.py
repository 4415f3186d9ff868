"""DINOv3 multi-crop augmentation on tensors, reproducible per sample, with satellite options.

Reproduces ``dinov3/data/augmentations.py`` (``DataAugmentationDINO``) of the official code (recipe §3.3/§3.5) with
its *effective* probabilities:

* global crops: ``RandomResizedCrop(max(global, gram), scale=(0.32, 1), ratio=(3/4, 4/3), bicubic)`` + horizontal
  flip p=0.5 when ``horizontal_flips`` (true in the default/IN-1k configs, false in all 7B/distillation configs);
  local crops: ``RandomResizedCrop(local, scale=(0.05, 0.32))`` + the same flip rule;
* colour: ``ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)`` with p=0.8 (the four
  adjustments in a random order, as torchvision), then grayscale p=0.2;
* **Gaussian blur, inverted-probability quirk**: the official ``GaussianBlur(p)`` wrapper passes ``1 - p`` to
  ``RandomApply``. The configured values (1.0 / 0.1 / 0.5) therefore act as **global crop 1: never blurred,
  global crop 2: blurred with p=0.9, local crops: p=0.5**; released checkpoints were trained this way (dinov3
  issue #286 / PR #342). ``blur_p`` here holds the *effective* probabilities, default ``(0.0, 0.9, 0.5)``.
  Blur: 9×9 kernel, σ ~ U(0.1, 2.0);
* global crop 2 only: ``RandomSolarize(threshold=128, p=0.2)``;
* normalise: ``x / 255`` then ``(x - mean) / std`` (default preset ``sat493m``);
* Gram crops (``gram_teacher_crops_size``): the global crop is taken at ``max(global, gram)`` px. With
  ``gram_teacher_no_distortions=True`` the student/teacher crop is that crop resized to ``global_crops_size``
  and then distorted, while the Gram crop is the *same* crop resized to the Gram size and only normalised; with
  ``False`` both are resized copies of the distorted, normalised crop.
* teacher and student see the same two global crops (``global_crops_teacher`` is the same list).

Satellite options (``satellite=True`` switches all three on; each can be set on its own): random 90° rotations
(k ~ U{0,1,2,3}) and vertical flips p=0.5 in the geometric part (nadir imagery has no canonical "up"), and no
random grayscale (colour carries the signal for vegetation/water). For inputs with C ≠ 3 bands, saturation, hue
and grayscale are skipped and contrast blends towards the mean over all bands.

Reproducibility: every random choice is drawn from one ``torch.Generator`` per call, in a fixed order (global 1,
global 2, then each local crop; per crop geometry then colour). A data pipeline makes sample ``i`` reproducible by
calling ``aug(image, seed=derive_seed(base_seed, i))`` (``eo_dinov3.data.manifest.derive_seed``) — the tile
datasets of :mod:`eo_dinov3.data.tiles` do exactly that with the sample's global stream position, so a resumed
run re-creates identical crops without saving any RNG state. ``return_params=True`` adds the drawn parameters
(``output["params"]``) for inspection and tests.

Input: ``uint8`` tensor ``[C, H, W]`` (values 0–255) or float tensor in ``[0, 1]``. Output crops: float32
``[C, S, S]`` normalised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode

from eo_dinov3.data.normalization import Normalization, get_normalization

_BICUBIC = InterpolationMode.BICUBIC


@dataclass(frozen=True)
class CropParams:
    """Random draws for one crop. Boxes in input pixels; ``jitter`` is ``None`` (not applied) or
    ``(order, brightness, contrast, saturation, hue)`` with ``order`` a permutation of ``0..3``."""

    top: int
    left: int
    height: int
    width: int
    hflip: bool
    vflip: bool
    rot90: int
    jitter: tuple[tuple[int, ...], float, float, float, float] | None
    grayscale: bool
    blur_sigma: float | None
    solarize: bool


class DataAugmentationDINO:
    """Multi-crop DINOv3 augmentation (see module docstring).

    Args:
        global_crops_scale / local_crops_scale: area fractions for ``RandomResizedCrop``.
        local_crops_number: number of local crops (official: 8).
        global_crops_size / local_crops_size: output sizes in pixels (7B / SAT recipe: 256 / 112).
        gram_teacher_crops_size: size of the Gram-teacher crops (e.g. 512), ``None`` for none.
        gram_teacher_no_distortions: Gram crops undistorted (7B configs: True).
        horizontal_flips: horizontal flips p=0.5 (official default True; 7B configs False).
        normalization: preset name (``"sat493m"``, ``"lvd1689m"``, ``"chmv2"``) or a ``Normalization``.
        satellite: default for ``vertical_flips``/``rot90`` (on) and ``grayscale_p`` (0.0).
        vertical_flips, rot90, grayscale_p: override the satellite defaults.
        color_jitter_p, color_jitter: probability and (brightness, contrast, saturation, hue) strengths.
        blur_p: *effective* blur probabilities for (global 1, global 2, local), see the quirk above.
        blur_sigma: σ range of the 9×9 Gaussian kernel.
        solarize_p: solarisation probability of global crop 2.
        ratio: aspect-ratio range of the random resized crops.
    """

    def __init__(
        self,
        global_crops_scale: Sequence[float] = (0.32, 1.0),
        local_crops_scale: Sequence[float] = (0.05, 0.32),
        local_crops_number: int = 8,
        global_crops_size: int = 256,
        local_crops_size: int = 112,
        gram_teacher_crops_size: int | None = None,
        gram_teacher_no_distortions: bool = False,
        horizontal_flips: bool = True,
        normalization: str | Normalization = "sat493m",
        satellite: bool = False,
        vertical_flips: bool | None = None,
        rot90: bool | None = None,
        grayscale_p: float | None = None,
        color_jitter_p: float = 0.8,
        color_jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
        blur_p: Sequence[float] = (0.0, 0.9, 0.5),
        blur_sigma: Sequence[float] = (0.1, 2.0),
        solarize_p: float = 0.2,
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    ) -> None:
        self.global_crops_scale = tuple(float(s) for s in global_crops_scale)
        self.local_crops_scale = tuple(float(s) for s in local_crops_scale)
        self.local_crops_number = int(local_crops_number)
        self.global_crops_size = int(global_crops_size)
        self.local_crops_size = int(local_crops_size)
        self.gram_teacher_crops_size = int(gram_teacher_crops_size) if gram_teacher_crops_size else None
        self.gram_teacher_no_distortions = bool(gram_teacher_no_distortions)
        self.horizontal_flips = bool(horizontal_flips)
        self.normalization = get_normalization(normalization) if isinstance(normalization, str) else normalization
        self.satellite = bool(satellite)
        self.vertical_flips = self.satellite if vertical_flips is None else bool(vertical_flips)
        self.rot90 = self.satellite if rot90 is None else bool(rot90)
        self.grayscale_p = (0.0 if self.satellite else 0.2) if grayscale_p is None else float(grayscale_p)
        self.color_jitter_p = float(color_jitter_p)
        b, c, s, h = (float(v) for v in color_jitter)
        self.jitter_ranges = ((max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c), (max(0.0, 1 - s), 1 + s), (-h, h))
        if len(blur_p) != 3:
            raise ValueError("blur_p needs 3 effective probabilities: (global crop 1, global crop 2, local crops)")
        self.blur_p = tuple(float(p) for p in blur_p)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.solarize_p = float(solarize_p)
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.global_crop_max_size = max(self.global_crops_size, self.gram_teacher_crops_size or 0)

    def __repr__(self) -> str:
        return (
            f"DataAugmentationDINO(global={self.global_crops_size} {self.global_crops_scale}, "
            f"local={self.local_crops_number}x{self.local_crops_size} {self.local_crops_scale}, "
            f"gram={self.gram_teacher_crops_size} no_distortions={self.gram_teacher_no_distortions}, "
            f"hflip={self.horizontal_flips}, vflip={self.vertical_flips}, rot90={self.rot90}, "
            f"gray_p={self.grayscale_p}, blur_p={self.blur_p}, norm={self.normalization.name})"
        )

    # ------------------------------------------------------------------------------------------ sampling
    @staticmethod
    def _u(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
        return lo + (hi - lo) * float(torch.rand(1, generator=g).item())

    def _crop_box(self, g: torch.Generator, h: int, w: int, scale: tuple[float, float]) -> tuple[int, int, int, int]:
        """torchvision's ``RandomResizedCrop.get_params`` algorithm, drawn from ``g``: (top, left, height, width)."""
        area = h * w
        for _ in range(10):
            target = area * self._u(g, *scale)
            aspect = math.exp(self._u(g, *self.log_ratio))
            cw = int(round(math.sqrt(target * aspect)))
            ch = int(round(math.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (1,), generator=g).item())
                left = int(torch.randint(0, w - cw + 1, (1,), generator=g).item())
                return top, left, ch, cw
        in_ratio = w / h
        rmin, rmax = math.exp(self.log_ratio[0]), math.exp(self.log_ratio[1])
        if in_ratio < rmin:
            cw, ch = w, int(round(w / rmin))
        elif in_ratio > rmax:
            ch, cw = h, int(round(h * rmax))
        else:
            cw, ch = w, h
        return (h - ch) // 2, (w - cw) // 2, ch, cw

    def _sample_crop(self, g: torch.Generator, h: int, w: int, kind: str, rgb: bool) -> CropParams:
        scale = self.local_crops_scale if kind == "local" else self.global_crops_scale
        top, left, ch, cw = self._crop_box(g, h, w, scale)
        hflip = self.horizontal_flips and self._u(g) < 0.5
        vflip = self.vertical_flips and self._u(g) < 0.5
        rot = int(torch.randint(0, 4, (1,), generator=g).item()) if self.rot90 else 0
        jitter = None
        if self._u(g) < self.color_jitter_p:
            order = tuple(int(i) for i in torch.randperm(4, generator=g).tolist())
            jitter = (order, *(self._u(g, lo, hi) for lo, hi in self.jitter_ranges))
        gray = rgb and self.grayscale_p > 0 and self._u(g) < self.grayscale_p
        p_blur = {"global1": self.blur_p[0], "global2": self.blur_p[1], "local": self.blur_p[2]}[kind]
        blur = self._u(g, *self.blur_sigma) if (p_blur > 0 and self._u(g) < p_blur) else None
        sol = kind == "global2" and self.solarize_p > 0 and self._u(g) < self.solarize_p
        return CropParams(top, left, ch, cw, hflip, vflip, rot, jitter, gray, blur, sol)

    def sample_params(self, generator: torch.Generator, height: int, width: int, channels: int = 3) -> list[CropParams]:
        """Parameters of all crops for an input of ``height × width`` px: ``[global1, global2, local1..N]``."""
        rgb = channels == 3
        kinds = ["global1", "global2"] + ["local"] * self.local_crops_number
        return [self._sample_crop(generator, height, width, k, rgb) for k in kinds]

    # ------------------------------------------------------------------------------------------ applying
    @staticmethod
    def _geometric(img: Tensor, p: CropParams, size: int) -> Tensor:
        out = TF.resized_crop(img, p.top, p.left, p.height, p.width, [size, size], interpolation=_BICUBIC,
                              antialias=True)
        if p.hflip:
            out = TF.horizontal_flip(out)
        if p.vflip:
            out = TF.vertical_flip(out)
        if p.rot90:
            out = torch.rot90(out, p.rot90, dims=(-2, -1))
        return out

    @staticmethod
    def _blend_nband(img: Tensor, factor: float, other: Tensor | float) -> Tensor:
        """``factor * img + (1 - factor) * other`` clamped to the value range (any number of bands)."""
        out = factor * img.float() + (1.0 - factor) * other
        if img.dtype == torch.uint8:
            return out.round_().clamp_(0, 255).to(torch.uint8)
        return out.clamp_(0.0, 1.0).to(img.dtype)

    def _brightness(self, img: Tensor, factor: float) -> Tensor:
        if img.shape[-3] in (1, 3):
            return TF.adjust_brightness(img, factor)
        return self._blend_nband(img, factor, 0.0)

    def _contrast(self, img: Tensor, factor: float) -> Tensor:
        if img.shape[-3] in (1, 3):
            return TF.adjust_contrast(img, factor)
        return self._blend_nband(img, factor, img.float().mean(dim=(-3, -2, -1), keepdim=True))

    def _photometric(self, img: Tensor, p: CropParams) -> Tensor:
        rgb = img.shape[-3] == 3
        if p.jitter is not None:
            order, b, c, s, h = p.jitter
            for fn in order:
                if fn == 0:
                    img = self._brightness(img, b)
                elif fn == 1:
                    img = self._contrast(img, c)
                elif fn == 2 and rgb:
                    img = TF.adjust_saturation(img, s)
                elif fn == 3 and rgb:
                    img = TF.adjust_hue(img, h)
        if p.grayscale and rgb:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if p.blur_sigma is not None:
            img = TF.gaussian_blur(img, kernel_size=[9, 9], sigma=[p.blur_sigma, p.blur_sigma])
        if p.solarize:
            img = TF.solarize(img, threshold=128 if img.dtype == torch.uint8 else 0.5)
        return img

    def normalize(self, img: Tensor) -> Tensor:
        """uint8 ``[C, H, W]`` (or float in [0, 1]) → normalised float32."""
        x = img.to(torch.float32) / 255.0 if img.dtype == torch.uint8 else img.to(torch.float32)
        n = self.normalization
        if len(n.mean) != x.shape[-3]:
            raise ValueError(f"normalisation {n.name!r} has {len(n.mean)} bands, the image {x.shape[-3]}")
        mean, std = n.tensors(dtype=torch.float32)
        return (x - mean) / std

    @staticmethod
    def _resize(img: Tensor, size: int) -> Tensor:
        if img.shape[-1] == size and img.shape[-2] == size:
            return img
        return TF.resize(img, [size, size], interpolation=_BICUBIC, antialias=True)

    def __call__(
        self,
        image: Tensor,
        generator: torch.Generator | None = None,
        *,
        seed: int | None = None,
        return_params: bool = False,
    ) -> dict[str, Any]:
        """Augment one image ``[C, H, W]`` (uint8, or float in [0, 1]).

        Returns the official dict: ``global_crops`` (2 × ``[C, G, G]``), ``global_crops_teacher`` (same),
        ``local_crops`` (N × ``[C, L, L]``), ``offsets`` (``()``), ``gram_teacher_crops`` (2 × ``[C, R, R]``,
        only with ``gram_teacher_crops_size``), ``weak_flag`` (True, as the official code); plus ``params``
        (list of :class:`CropParams`) when ``return_params``.
        """
        if image.ndim != 3:
            raise ValueError(f"expected an image [C, H, W], got shape {tuple(image.shape)}")
        if generator is None:
            s = seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            generator = torch.Generator().manual_seed(int(s))
        c, h, w = image.shape
        params = self.sample_params(generator, h, w, c)
        gram = self.gram_teacher_crops_size
        out: dict[str, Any] = {"weak_flag": True}
        globals_, grams = [], []
        for p in params[:2]:
            base = self._geometric(image, p, self.global_crop_max_size)
            if gram is not None and self.gram_teacher_no_distortions:
                crop = self.normalize(self._photometric(self._resize(base, self.global_crops_size), p))
                grams.append(self.normalize(self._resize(base, gram)))
            else:
                distorted = self.normalize(self._photometric(base, p))
                crop = self._resize(distorted, self.global_crops_size)
                if gram is not None:
                    grams.append(self._resize(distorted, gram))
            globals_.append(crop)
        out["global_crops"] = globals_
        out["global_crops_teacher"] = globals_
        if gram is not None:
            out["gram_teacher_crops"] = grams
        out["local_crops"] = [
            self.normalize(self._photometric(self._geometric(image, p, self.local_crops_size), p)) for p in params[2:]
        ]
        out["offsets"] = ()
        if return_params:
            out["params"] = params
        return out
