"""torch.hub entry points: ``torch.hub.load(repo_dir, "dinov3_vitl16", source="local", weights=PATH)``."""

dependencies = ["torch"]

from eo_dinov3.hub import (  # noqa: E402,F401
    dinov3_convnext_base,
    dinov3_convnext_large,
    dinov3_convnext_small,
    dinov3_convnext_tiny,
    dinov3_vit7b16,
    dinov3_vitb16,
    dinov3_vith16plus,
    dinov3_vitl16,
    dinov3_vitl16plus,
    dinov3_vits16,
    dinov3_vits16plus,
)
