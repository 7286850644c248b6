"""qwix-torch: quantization-aware training for PyTorch with Qwix's rules-based workflow."""
import torch  # noqa: F401  (loads libtorch before the extension)

from qwix_torch import _C  # noqa: F401  (registers torch.ops.qwix.*)
from qwix_torch.ops import (
    compute_calibration,
    compute_scale,
    fake_quant,
    fake_quant_with_scale,
    resolve_tiled_axes,
    srq_scale,
    update_quant_stat_,
)

__all__ = [
    "compute_calibration",
    "compute_scale",
    "fake_quant",
    "fake_quant_with_scale",
    "resolve_tiled_axes",
    "srq_scale",
    "update_quant_stat_",
]
