"""Quantization-aware training for TorchScript modules (DESIGN section 1).

``jit_quantize_model(torch.jit.script(model), provider, *example_inputs)`` runs
the C++ graph pass ``qwix::jit::quantize_model`` (``csrc/jit``): in each
module's own ``forward`` the ops ``linear``, ``conv1d/2d/3d``, ``conv_transpose1d/2d/3d``,
``matmul`` / ``@`` (and ``mm``, ``addmm``'s product), ``bmm`` (and ``baddbmm``'s product), two-operand
``einsum`` and the two products of a decomposed ``scaled_dot_product_attention`` get ``torch.ops.qwix`` fake-quant
nodes as the provider's rules say, with the same plans, op ids and SRQ
``QuantStat`` submodules (``<op id>_lhs`` / ``_rhs``) as the Python
``nn.Module`` path, so both give the same forward values for the same weights.
The example inputs run through ``forward`` once (no gradients) to learn the
operands' ranks and the order of the ops. See docs/torchscript.md.
"""
from __future__ import annotations

from typing import Any, Optional, Iterable

import torch

from qwix_torch import _C
from qwix_torch.rules import QatProvider

__all__ = ["jit_quantize_model", "jit_is_quantized", "jit_set_quant_stats_update", "jit_calibrate"]

_UPDATE = "_qwix_update_stats"
_FORCE = "_qwix_force_update"


def _check_script_module(model: Any, what: str) -> None:
    if not isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"qwix: {what} needs a torch.jit.ScriptModule (torch.jit.script(model)), "
                        f"got {type(model).__name__}")


def jit_quantize_model(model: torch.jit.ScriptModule, provider: QatProvider, *example_inputs: Any,
                       inplace: bool = False, example_kwargs: Optional[dict] = None) -> torch.jit.ScriptModule:
    """Returns a QAT version of the TorchScript module ``model``.

    Parameter names (state_dict keys) do not change; SRQ adds ``QuantStat``
    submodules. ``example_inputs`` are passed to ``forward`` once to learn the
    operands' ranks and the op order (``example_kwargs`` as keyword arguments,
    bound by forward's schema); an op that a rule matches but that this
    forward does not run raises if it runs later (and a warning says so).

    TorchScript types cannot be changed in place, so a new module is always
    returned: with ``inplace=False`` (default) it holds copies of ``model``'s
    tensors; with ``inplace=True`` it holds the very same tensors (``model``
    itself keeps its floating-point code). The result saves with
    ``torch.jit.save`` and loads with ``torch.jit.load`` once ``qwix_torch`` is
    imported (C++: link the qwix_torch library), which registers the ops.
    Raises ``ValueError`` naming the module and op when an op cannot be handled.
    """
    _check_script_module(model, "jit_quantize_model")
    if not isinstance(provider, QatProvider):
        raise TypeError(f"qwix: jit_quantize_model needs a QatProvider, got {type(provider).__name__}")
    from qwix_torch.qat import _check_example_kwargs

    cpp = _C.jit_quantize_model(model, provider._cpp, tuple(example_inputs), bool(inplace),
                                _check_example_kwargs(example_kwargs))
    return torch.jit._recursive.wrap_cpp_module(cpp)


def jit_is_quantized(model: Any) -> bool:
    """Whether ``model`` is a TorchScript module returned by :func:`jit_quantize_model`."""
    return isinstance(model, torch.jit.ScriptModule) and bool(_C.jit_is_quantized(model))


def _flag_modules(model: torch.jit.ScriptModule, what: str):
    _check_script_module(model, what)
    if not jit_is_quantized(model):
        raise ValueError(f"qwix: {what} needs a model returned by quantize_model / jit_quantize_model")
    return [m for m in model.modules() if m._c.hasattr(_UPDATE)]


def jit_set_quant_stats_update(model: torch.jit.ScriptModule, enabled: bool) -> None:
    """Enables or disables SRQ statistics updates in training mode (never in eval mode, except
    inside :func:`jit_calibrate`)."""
    flagged = _flag_modules(model, "set_quant_stats_update")
    from qwix_torch.qat import check_enabled_flag

    check_enabled_flag(enabled)
    for m in flagged:
        m._c.setattr(_UPDATE, enabled)


def jit_calibrate(model: torch.jit.ScriptModule, batches: Iterable[Any], *, progress: bool = True):
    """Standalone SRQ calibration, as :func:`qwix_torch.calibrate`: forward only over ``batches``
    under ``torch.no_grad()`` with every module in eval mode while the QuantStats update; the
    modules' modes are restored afterwards."""
    flagged = _flag_modules(model, "calibrate")
    from qwix_torch.qat import run_batches

    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for m in flagged:
            m._c.setattr(_FORCE, True)
        run_batches(model, batches, progress)
    finally:
        for m in flagged:
            m._c.setattr(_FORCE, False)
        for m, t in modes:
            m.training = t
    return model
