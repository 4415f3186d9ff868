"""SSL losses of DINOv3 (official behaviour, see each module's docstring for the exact formula).

* :mod:`~eo_dinov3.losses.dino`: Sinkhorn-Knopp teacher targets and the DINO CLS cross-entropy
* :mod:`~eo_dinov3.losses.ibot`: iBOT masked-patch loss
* :mod:`~eo_dinov3.losses.koleo`: KoLeo regulariser (per batch and distributed)
* :mod:`~eo_dinov3.losses.gram`: Gram anchoring loss and the high-res teacher resize
"""

from eo_dinov3.losses.dino import DINOLoss, dino_loss_weights, sinkhorn_knopp, sinkhorn_knopp_core
from eo_dinov3.losses.gram import GramLoss, resize_gram_teacher_features, select_gram_tokens
from eo_dinov3.losses.ibot import iBOTPatchLoss
from eo_dinov3.losses.koleo import KoLeoLoss, KoLeoLossDistributed

__all__ = [
    "DINOLoss",
    "GramLoss",
    "KoLeoLoss",
    "KoLeoLossDistributed",
    "dino_loss_weights",
    "iBOTPatchLoss",
    "resize_gram_teacher_features",
    "select_gram_tokens",
    "sinkhorn_knopp",
    "sinkhorn_knopp_core",
]
