"""Python wrappers of the ``torch.ops.qwix`` operators (numerics: DESIGN section 2)."""
from __future__ import annotations

import numbers
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

TiledAxes = Optional[Mapping[int, Union[int, float]]]


def resolve_tiled_axes(shape: Sequence[int], tiled_axes: TiledAxes) -> Tuple[List[int], List[int]]:
    """Turns ``{axis: tile}`` into the ops' ``(tiled_axes, tile_sizes)`` lists.

    An ``int`` tile counts elements; a ``float`` tile is a fraction of the axis
    (``tile = round(dim * f)``), as in Qwix.
    """
    if tiled_axes is None or (isinstance(tiled_axes, (Mapping, list, tuple)) and len(tiled_axes) == 0):
        return [], []
    if not isinstance(tiled_axes, Mapping):
        raise TypeError(f"qwix: tiled_axes must be a mapping {{axis: tile}} (or None), got {tiled_axes!r}")
    axes, tiles = [], []
    rank = len(shape)
    for axis, tile in tiled_axes.items():
        # Any integral type (numpy integers too: axes often come from shape arithmetic), as torch's dims.
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"qwix: tiled axis {axis!r} must be an int, got {type(axis).__name__}")
        axis = int(axis)
        if not -rank <= axis < rank:
            raise IndexError(f"qwix: tiled axis {axis} is out of range for a tensor of rank {rank}")
        if isinstance(tile, bool) or not isinstance(tile, numbers.Real):
            raise ValueError(f"qwix: tile {tile!r} for axis {axis} must be an int (elements) or a float (fraction)")
        if not isinstance(tile, numbers.Integral):
            tile = float(tile)
            if not 0.0 < tile < 1.0:  # (as in rules and the C++ API, where 1.0 is one element)
                raise ValueError(f"qwix: fractional tile {tile} for axis {axis} must be in (0, 1); use an int to "
                                 "count elements")
            tile = round(shape[axis] * tile)
            if tile == 0:
                raise ValueError(f"qwix: fractional tile for axis {axis} of size {shape[axis]} rounds to 0 elements")
        axes.append(axis)
        tiles.append(int(tile))
    return axes, tiles


def _axes(axes: Sequence[int], name: str) -> List[int]:
    """A list of ints, or a TypeError naming the argument (``channelwise_axes=0`` said "'int' object is not
    iterable")."""
    try:
        out = list(axes)
    except TypeError:
        out = None
    if out is None or not all(isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in out):
        raise TypeError(f"qwix: {name} must be a sequence of ints, got {axes!r}")
    return [int(a) for a in out]


def fake_quant(
    x: torch.Tensor,
    qtype: str,
    *,
    calibration_method: str = "absmax",
    channelwise_axes: Sequence[int] = (),
    tiled_axes: TiledAxes = None,
    clip_gradient: Optional[bool] = None,
) -> torch.Tensor:
    """Quantizes ``x`` to ``qtype`` with a scale computed from ``x`` itself, then dequantizes.

    Computed in float32, returned in ``x.dtype``. ``channelwise_axes`` keep one
    scale per index; ``tiled_axes`` (``{axis: tile}``) one scale per tile; all
    other axes share. The backward is straight-through, masked to the
    calibrated range when the calibration can clip (``absmax,s``/``minmax,s``
    with ``s < 1``, ``rms``, ``fixed``) or when ``clip_gradient=True``.
    """
    axes, tiles = resolve_tiled_axes(x.shape, tiled_axes)
    ch = _axes(channelwise_axes, "channelwise_axes")
    return torch.ops.qwix.fake_quant(x, qtype, calibration_method, ch, axes, tiles, clip_gradient)


def fake_quant_with_scale(
    x: torch.Tensor,
    scale: torch.Tensor,
    qtype: str,
    *,
    zero_point: Optional[torch.Tensor] = None,
    clip_gradient: bool = False,
) -> torch.Tensor:
    """Fake quant with a given (static) scale and optional zero point (integer qtypes).

    ``scale``'s shape says the granularity: per axis 1 (shared), the axis' size
    (per channel) or a divisor of it (one scale per tile); shapes align to the
    right. With ``clip_gradient`` the gradient is masked to what the grid covers.
    """
    return torch.ops.qwix.fake_quant_with_scale(x, scale, zero_point, qtype, clip_gradient)


def compute_calibration(
    x: torch.Tensor,
    calibration_method: str = "absmax",
    *,
    channelwise_axes: Sequence[int] = (),
    tiled_axes: TiledAxes = None,
) -> Dict[str, torch.Tensor]:
    """Calibrates ``x``: ``{'absmax': t}`` or ``{'min': t, 'max': t}``, float32, keepdim shapes
    (tiled axes have one entry per tile). The method's scale factor is applied."""
    axes, tiles = resolve_tiled_axes(x.shape, tiled_axes)
    out = torch.ops.qwix.calibrate(x, calibration_method, _axes(channelwise_axes, "channelwise_axes"), axes, tiles)
    return {"absmax": out[0]} if len(out) == 1 else {"min": out[0], "max": out[1]}


def _calibration_list(calibration: Mapping[str, torch.Tensor]) -> List[torch.Tensor]:
    if set(calibration) == {"absmax"}:
        return [calibration["absmax"]]
    if set(calibration) == {"min", "max"}:
        return [calibration["min"], calibration["max"]]
    raise ValueError(f"qwix: a calibration has keys {{'absmax'}} or {{'min', 'max'}}, got {sorted(calibration)}")


def compute_scale(calibration: Mapping[str, torch.Tensor], qtype: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(scale, zero_point)`` for a calibration; the zero point is ``None`` when symmetric."""
    out = torch.ops.qwix.compute_scale(_calibration_list(calibration), qtype)
    return out[0], (out[1] if len(out) == 2 else None)


def update_quant_stat_(
    count: torch.Tensor,
    sums: Sequence[torch.Tensor],
    calibration: Mapping[str, torch.Tensor],
    batch_axes: Sequence[int] = (0,),
    count_increment: int = 1,
) -> None:
    """In place: ``count += count_increment``; each sum += its calibration averaged over ``batch_axes``."""
    torch.ops.qwix.update_quant_stat(count, list(sums), _calibration_list(calibration), _axes(batch_axes, "batch_axes"),
                                     count_increment)


def srq_scale(
    x: torch.Tensor,
    count: torch.Tensor,
    sums: Sequence[torch.Tensor],
    qtype: str,
    calibration_method: str = "absmax",
    *,
    channelwise_axes: Sequence[int] = (),
    tiled_axes: TiledAxes = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The static (SRQ) scale from statistics: ``sums / count``, or ``x``'s own scale while count is 0.

    Shaped like ``x``'s calibration (no host sync: the choice happens in the kernel)."""
    axes, tiles = resolve_tiled_axes(x.shape, tiled_axes)
    ch = _axes(channelwise_axes, "channelwise_axes")
    out = torch.ops.qwix.srq_scale(x, count, list(sums), qtype, calibration_method, ch, axes, tiles)
    return out[0], (out[1] if len(out) == 2 else None)
