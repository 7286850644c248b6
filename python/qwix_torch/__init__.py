"""qwix-torch: quantization-aware training for PyTorch with Qwix's rules-based workflow."""
import torch  # noqa: F401  (loads libtorch before the extension)

from qwix_torch import _C  # noqa: F401  (registers torch.ops.qwix.*)
from qwix_torch import _vmap  # noqa: F401  (the vmap rules of every op)
from qwix_torch.ops import (
    compute_calibration,
    compute_scale,
    fake_quant,
    fake_quant_with_scale,
    resolve_tiled_axes,
    srq_scale,
    update_quant_stat_,
)
from qwix_torch.qat import QuantStat, calibrate, is_quantized, quantize_model, set_quant_stats_update
from qwix_torch.rules import QatProvider, QuantizationRule
from qwix_torch.jit import jit_quantize_model  # noqa: F401  (the TorchScript path)

__all__ = [
    "QatProvider",
    "QuantStat",
    "QuantizationRule",
    "calibrate",
    "is_quantized",
    "quantize_model",
    "set_quant_stats_update",
    "compute_calibration",
    "compute_scale",
    "fake_quant",
    "fake_quant_with_scale",
    "resolve_tiled_axes",
    "srq_scale",
    "update_quant_stat_",
]
