"""An independent plain-PyTorch reference of the qwix numerics contract (DESIGN section 2).

Nothing here imports qwix_torch: the tests compare the C++ kernels against this
file. Every fp32 arithmetic step is done the way the contract orders it. To make
each step a correctly rounded IEEE fp32 operation regardless of how PyTorch
implements a kernel (e.g. division by a scalar as a multiply by its reciprocal),
the binary operations are evaluated in float64 on fp32 operands and rounded back
to fp32 once: for +, -, *, / that is exactly the fp32 result (53 >= 2 * 24 + 2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

# sqrt(FLT_MIN) = 2^-63: smaller scales (and non-positive ones) become 1.
MIN_SCALE = 1.0842021724855044e-19
assert MIN_SCALE == 2.0**-63

TiledAxes = Optional[Mapping[int, Union[int, float]]]

# ----------------------------------------------------------------------------------------------
# QTypes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QType:
    name: str
    kind: str  # "int", "float" or "nf4"
    qmin: float  # int: lowest grid value; float/nf4: -max
    qmax: float  # int: highest grid value; float/nf4: +max
    bound: float  # symmetric bound B: scale = absmax / B
    element: str = ""  # MX: the element format's qtype name
    block: int = 0  # MX: elements per block (last axis); power-of-two scales

    @property
    def is_integer(self) -> bool:
        return self.kind == "int"


def _int_qtype(name: str, bits: int, unsigned: bool) -> QType:
    if unsigned:
        return QType(name, "int", 0.0, float(2**bits - 1), 2.0**bits - 0.5)
    return QType(name, "int", float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1), 2.0 ** (bits - 1) - 0.5)


QTYPES: Dict[str, QType] = {}
for _bits in range(2, 9):
    QTYPES[f"int{_bits}"] = _int_qtype(f"int{_bits}", _bits, False)
QTYPES["int16"] = _int_qtype("int16", 16, False)
QTYPES["uint4"] = _int_qtype("uint4", 4, True)
QTYPES["uint8"] = _int_qtype("uint8", 8, True)
QTYPES["float8_e4m3fn"] = QType("float8_e4m3fn", "float", -448.0, 448.0, 448.0)
QTYPES["float8_e5m2"] = QType("float8_e5m2", "float", -57344.0, 57344.0, 57344.0)
QTYPES["float4_e2m1fn"] = QType("float4_e2m1fn", "float", -6.0, 6.0, 6.0)
QTYPES["nf4"] = QType("nf4", "nf4", -1.0, 1.0, 1.0)

ALIASES = {"fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2", "fp4_e2m1": "float4_e2m1fn"}

# MX block formats (Qwix): blocks of 32 along the last axis, scale = 2^ceil(log2(absmax / B)).
# Kept out of QTYPES (and so of the generic parametrized tests): their layout is fixed.
MX_QTYPES: Dict[str, QType] = {
    "mxfp8": QType("mxfp8", "float", -448.0, 448.0, 448.0, element="float8_e4m3fn", block=32),
    "mxfp4": QType("mxfp4", "float", -6.0, 6.0, 6.0, element="float4_e2m1fn", block=32),
}

INT_QTYPES = [n for n, q in QTYPES.items() if q.kind == "int"]
FLOAT_QTYPES = [n for n, q in QTYPES.items() if q.kind != "int"]  # symmetric-only qtypes (nf4 included)
ALL_QTYPES = list(QTYPES)


def get_qtype(name: str) -> QType:
    name = ALIASES.get(name, name)
    if name in MX_QTYPES:
        return MX_QTYPES[name]
    if name not in QTYPES:
        raise ValueError(f"unknown qtype {name!r}; valid: {', '.join(list(QTYPES) + list(ALIASES))}")
    return QTYPES[name]


NVFP4_BLOCK = 16


def ref_nvfp4(x: torch.Tensor) -> torch.Tensor:
    """nvfp4 fake quant: tensor_scale = absmax / (448 * 6); block_scale = e4m3(absmax(block of 16 along the
    last axis) / 6 / tensor_scale) * tensor_scale (saturating; scales < sqrt(FLT_MIN) -> 1 at each level);
    y = e2m1(x / block_scale) * block_scale, and 0 in a block whose e4m3 scale rounded to 0 (as nvfp4 decodes
    it)."""
    if x.dim() == 0 or x.shape[-1] % NVFP4_BLOCK:
        raise ValueError(f"nvfp4 needs a last axis that is a multiple of {NVFP4_BLOCK}, got {tuple(x.shape)}")
    xf = x.detach().to(torch.float32)
    tensor_amax = ref_calibrate(xf, "absmax")["absmax"]
    block_amax = ref_calibrate(xf, "absmax", tuple(range(x.dim() - 1)), {x.dim() - 1: NVFP4_BLOCK})["absmax"]
    tensor_scale = div32(tensor_amax, 448.0 * 6.0)
    block_scale = ref_fake_quant_with_scale(div32(block_amax, 6.0), tensor_scale, "float8_e4m3fn")
    y = ref_fake_quant_with_scale(x, block_scale, "float4_e2m1fn")
    zero_block = (block_scale == 0).repeat_interleave(NVFP4_BLOCK, dim=-1)
    return torch.where(zero_block, torch.zeros((), dtype=y.dtype), y)


def pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= s (positive, finite; NaN/Inf stay), exactly, via frexp."""
    m, e = torch.frexp(s.to(torch.float64))  # s = m * 2^e, m in [0.5, 1)
    p = torch.where(m == 0.5, s.to(torch.float64), torch.ldexp(torch.ones_like(m), e))
    return torch.where(torch.isfinite(s), p.to(torch.float32), s)


def mx_axes(q: QType, rank: int) -> Tuple[Tuple[int, ...], Dict[int, int]]:
    """The fixed layout of an MX qtype: every axis but the last channelwise, the last in blocks."""
    return tuple(range(rank - 1)), {rank - 1: q.block}


# NF4 levels (QLoRA, Appendix E), as float32 values.
NF4_LEVELS = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]

# float4_e2m1fn magnitudes by code (code = 2 * exponent_field + mantissa_bit).
E2M1_MAGNITUDES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]

# ----------------------------------------------------------------------------------------------
# Calibration methods
# ----------------------------------------------------------------------------------------------


def _f32(v: float) -> float:
    """A Python float rounded to the nearest float32."""
    return torch.tensor(v, dtype=torch.float32).item()


@dataclass(frozen=True)
class Method:
    kind: str  # "absmax", "minmax", "rms" or "fixed"
    s: float = 1.0  # the scale factor, a float32 value
    lo: float = 0.0  # fixed range (float32 values)
    hi: float = 0.0

    @property
    def symmetric(self) -> bool:
        return self.kind in ("absmax", "rms") or (self.kind == "fixed" and self.lo == -self.hi)

    @property
    def can_clip(self) -> bool:
        return self.kind in ("rms", "fixed") or self.s < 1.0

    @property
    def is_fixed(self) -> bool:
        return self.kind == "fixed"


def _number(text: str, method: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"malformed calibration method {method!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"malformed calibration method {method!r}")
    return v


def parse_method(method: str) -> Method:
    parts = method.lower().split(",")
    name, args = parts[0].strip(), [_number(p.strip(), method) for p in parts[1:]]
    if name in ("absmax", "minmax", "rms"):
        if len(args) > 1:
            raise ValueError(f"malformed calibration method {method!r}")
        s = args[0] if args else 1.0
        if not s > 0:
            raise ValueError(f"calibration method {method!r}: scale factor must be > 0")
        return Method(name, _f32(s))
    if name == "fixed":
        if len(args) == 1:
            if not args[0] > 0:
                raise ValueError(f"calibration method {method!r}: fixed,a needs a > 0")
            return Method("fixed", 1.0, _f32(-args[0]), _f32(args[0]))
        if len(args) == 2:
            lo, hi = args
            if not (lo <= 0 <= hi and lo < hi):
                raise ValueError(f"calibration method {method!r}: the range must contain 0")
            return Method("fixed", 1.0, _f32(lo), _f32(hi))
        raise ValueError(f"malformed calibration method {method!r}")
    raise ValueError(f"malformed calibration method {method!r}")


# ----------------------------------------------------------------------------------------------
# Correctly rounded fp32 arithmetic (see the module docstring)
# ----------------------------------------------------------------------------------------------


def _as64(a, like: torch.Tensor) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.to(torch.float64)
    # A Python number becomes a full tensor (not a 0-dim/stride-0 "scalar" operand) first.
    return torch.full(like.shape, _f32(float(a)), dtype=torch.float64)


def _bcast(a, b):
    ta = a if isinstance(a, torch.Tensor) else None
    tb = b if isinstance(b, torch.Tensor) else None
    like = ta if ta is not None else tb
    if ta is not None and tb is not None:
        ta, tb = torch.broadcast_tensors(ta, tb)
        return ta.to(torch.float64).contiguous(), tb.to(torch.float64).contiguous()
    return _as64(a, like), _as64(b, like)


def div32(a, b) -> torch.Tensor:
    x, y = _bcast(a, b)
    return (x / y).to(torch.float32)


def mul32(a, b) -> torch.Tensor:
    x, y = _bcast(a, b)
    return (x * y).to(torch.float32)


def add32(a, b) -> torch.Tensor:
    x, y = _bcast(a, b)
    return (x + y).to(torch.float32)


def sub32(a, b) -> torch.Tensor:
    x, y = _bcast(a, b)
    return (x - y).to(torch.float32)


def guard_scale(scale: torch.Tensor) -> torch.Tensor:
    """Scales below sqrt(FLT_MIN) (zero and negative ones included) become 1; NaN stays NaN."""
    return torch.where(scale < MIN_SCALE, torch.ones_like(scale), scale)


# ----------------------------------------------------------------------------------------------
# Rounding to the grids
# ----------------------------------------------------------------------------------------------


def round_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Rounds fp32 values with |v| <= 6 to float4_e2m1fn: nearest, ties to the even code."""
    mag = v.abs().to(torch.float64)
    # Even codes first, so that argmin (first minimum) breaks ties towards even mantissas.
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    cand = torch.tensor([E2M1_MAGNITUDES[c] for c in order], dtype=torch.float64)
    idx = (mag.unsqueeze(-1) - cand).abs().argmin(dim=-1)
    r = cand[idx].to(torch.float32)
    r = torch.where(v < 0, -r, r)  # sign of the input (a negative tie to 0 gives -0; equal to 0 anyway)
    return torch.where(torch.isnan(v), v, r)


def round_nf4(v: torch.Tensor) -> torch.Tensor:
    """Nearest NF4 level of fp32 values in [-1, 1]; exactly between two levels: the lower one.

    Distances are computed in float64, where the difference of two nearby fp32
    values is exact, so "nearest" and "tie" are decided exactly."""
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32).to(torch.float64)  # ascending: argmin picks the lower
    idx = (v.to(torch.float64).unsqueeze(-1) - levels).abs().argmin(dim=-1)
    r = levels[idx].to(torch.float32)
    return torch.where(torch.isnan(v), v, r)


def round_to_grid(v: torch.Tensor, q: QType) -> torch.Tensor:
    """v: fp32, already clamped to the grid's range."""
    if q.kind == "int":
        return torch.round(v)  # half to even
    if q.block:
        return round_to_grid(v, get_qtype(q.element))
    if q.name == "float8_e4m3fn":
        return v.to(torch.float8_e4m3fn).to(torch.float32)
    if q.name == "float8_e5m2":
        return v.to(torch.float8_e5m2).to(torch.float32)
    if q.name == "float4_e2m1fn":
        return round_e2m1(v)
    if q.kind == "nf4":
        return round_nf4(v)
    raise AssertionError(q)


# ----------------------------------------------------------------------------------------------
# Granularity
# ----------------------------------------------------------------------------------------------


def resolve_tiles(shape: Sequence[int], tiled_axes: TiledAxes) -> Dict[int, int]:
    """{axis: tile} with non-negative axes and tiles in elements (a float tile is a fraction)."""
    out: Dict[int, int] = {}
    rank = len(shape)
    for axis, tile in (tiled_axes or {}).items():
        if not -rank <= axis < rank:
            raise IndexError(f"tiled axis {axis} out of range")
        a = axis % rank
        if isinstance(tile, float):
            tile = round(shape[a] * tile)
        if tile <= 0 or shape[a] % tile:
            raise ValueError(f"tile {tile} does not divide axis {axis} of size {shape[a]}")
        out[a] = int(tile)
    return out


@dataclass
class Layout:
    expanded: List[int]  # x's shape with each tiled axis split into [dim / tile, tile]
    reduce_dims: List[int]  # dims of `expanded` that a group reduces over
    calib_shape: List[int]  # keepdim shape of the calibration (tiled axes: dim / tile)


def layout(shape: Sequence[int], channelwise_axes: Sequence[int] = (), tiled_axes: TiledAxes = None) -> Layout:
    rank = len(shape)
    chan = set()
    for a in channelwise_axes:
        if not -rank <= a < rank:
            raise IndexError(f"channelwise axis {a} out of range")
        if a % rank in chan:
            raise ValueError(f"axis {a} repeated")
        chan.add(a % rank)
    tiles = resolve_tiles(shape, tiled_axes)
    if chan & set(tiles):
        raise ValueError("axis both channelwise and tiled")
    expanded, reduce_dims, calib_shape = [], [], []
    for a, d in enumerate(shape):
        if a in tiles:
            t = tiles[a]
            expanded += [d // t, t]
            reduce_dims.append(len(expanded) - 1)
            calib_shape.append(d // t)
        elif a in chan:
            expanded.append(d)
            calib_shape.append(d)
        else:
            expanded.append(d)
            reduce_dims.append(len(expanded) - 1)
            calib_shape.append(1)
    return Layout(expanded, reduce_dims, calib_shape)


def _reduce(t: torch.Tensor, dims: List[int], fn: str) -> torch.Tensor:
    if not dims:  # every element is its own group (torch's amax(dim=[]) would reduce everything)
        return t.clone()
    if fn == "amax":
        return t.amax(dim=dims, keepdim=True)
    if fn == "amin":
        return t.amin(dim=dims, keepdim=True)
    if fn == "mean":
        return t.mean(dim=dims, keepdim=True)
    raise AssertionError(fn)


def _nonfinite_groups(xf: torch.Tensor, lay: Layout) -> torch.Tensor:
    """Bool, in the expanded keepdim shape: whether the group holds NaN or +-Inf."""
    bad = (~torch.isfinite(xf.reshape(lay.expanded))).to(torch.uint8)
    return _reduce(bad, lay.reduce_dims, "amax").bool()


# ----------------------------------------------------------------------------------------------
# Calibration and scales
# ----------------------------------------------------------------------------------------------


def _calibrate_expanded(xf: torch.Tensor, m: Method, lay: Layout) -> Dict[str, torch.Tensor]:
    """Calibration in the expanded keepdim shape (broadcastable against xf.reshape(expanded))."""
    if m.is_fixed:
        shape = [1] * len(lay.expanded)
        if m.symmetric:
            return {"absmax": torch.full(shape, m.hi, dtype=torch.float32)}
        return {"min": torch.full(shape, m.lo, dtype=torch.float32), "max": torch.full(shape, m.hi, dtype=torch.float32)}
    keep = [1 if i in lay.reduce_dims else d for i, d in enumerate(lay.expanded)]
    if xf.numel() == 0:  # empty groups (only reachable with an empty tensor)
        z = torch.zeros(keep, dtype=torch.float32)
        return {"absmax": z} if m.kind != "minmax" else {"min": z, "max": z.clone()}
    xe = xf.reshape(lay.expanded)
    # A group holding NaN or +-Inf calibrates to NaN, whatever the method (DESIGN: such a group yields NaN).
    bad = _reduce((~torch.isfinite(xe)).to(torch.float32), lay.reduce_dims, "amax") > 0

    def finite_groups(v: torch.Tensor) -> torch.Tensor:
        return mul32(torch.where(bad, torch.full_like(v, float("nan")), v), m.s)

    if m.kind == "absmax":
        return {"absmax": finite_groups(_reduce(xe.abs(), lay.reduce_dims, "amax"))}
    if m.kind == "minmax":
        return {"min": finite_groups(_reduce(xe, lay.reduce_dims, "amin")),
                "max": finite_groups(_reduce(xe, lay.reduce_dims, "amax"))}
    if m.kind == "rms":
        return {"absmax": finite_groups(_reduce(xe.double().square(), lay.reduce_dims, "mean").sqrt().float())}
    raise AssertionError(m)


def ref_calibrate(
    x: torch.Tensor, method: str = "absmax", channelwise_axes: Sequence[int] = (), tiled_axes: TiledAxes = None
) -> Dict[str, torch.Tensor]:
    """{'absmax': t} or {'min': t, 'max': t}: float32, keepdim shapes (tiled axes: dim / tile
    entries; a fixed method: all ones), the method's factor applied."""
    m = parse_method(method)
    lay = layout(x.shape, channelwise_axes, tiled_axes)
    cal = _calibrate_expanded(x.detach().to(torch.float32), m, lay)
    shape = [1] * x.dim() if m.is_fixed else lay.calib_shape
    return {k: v.reshape(shape) for k, v in cal.items()}


def ref_compute_scale(calibration: Mapping[str, torch.Tensor], qtype: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(scale, zero_point): zero_point is None for a symmetric ({'absmax'}) calibration."""
    q = get_qtype(qtype)
    if set(calibration) == {"absmax"}:
        absmax = calibration["absmax"].to(torch.float32)
        scale = guard_scale(div32(absmax, q.bound))
        return (pow2_ceil(scale) if q.block else scale), None
    if not q.is_integer:
        raise ValueError(f"asymmetric calibration needs an integer qtype, got {qtype}")
    mn, mx = calibration["min"].to(torch.float32), calibration["max"].to(torch.float32)
    lo = torch.minimum(mn, torch.zeros_like(mn))  # NaN-propagating
    hi = torch.maximum(mx, torch.zeros_like(mx))
    scale = guard_scale(div32(sub32(hi, lo), q.qmax - q.qmin))
    zp = torch.round(torch.clamp(sub32(q.qmin, div32(lo, scale)), q.qmin, q.qmax))
    return scale, zp


def _quant_dequant(xf: torch.Tensor, scale: torch.Tensor, zp: Optional[torch.Tensor], q: QType) -> torch.Tensor:
    """fp32 fake quant with (broadcastable) fp32 scale / zero point, in the contract's op order."""
    if q.is_integer:
        v = div32(xf, scale)
        if zp is not None:
            v = add32(v, zp)
        r = torch.round(torch.clamp(v, q.qmin, q.qmax))
        if zp is not None:
            r = sub32(r, zp)
        return mul32(r, scale)
    v = torch.clamp(div32(xf, scale), q.qmin, q.qmax)
    return mul32(round_to_grid(v, q), scale)


def ref_fake_quant(
    x: torch.Tensor,
    qtype: str,
    method: str = "absmax",
    channelwise_axes: Sequence[int] = (),
    tiled_axes: TiledAxes = None,
) -> torch.Tensor:
    """Dynamic fake quant: computed in float32, returned in x.dtype."""
    q = get_qtype(qtype)
    m = parse_method(method)
    if not m.symmetric and not q.is_integer:
        raise ValueError(f"asymmetric method {method!r} needs an integer qtype, got {qtype}")
    if q.block:  # MX: the qtype fixes the blocks; the given axes are ignored (as in Qwix)
        if x.dim() == 0 or x.shape[-1] % q.block:
            raise ValueError(f"{qtype} needs a last axis that is a multiple of {q.block}, got {tuple(x.shape)}")
        channelwise_axes, tiled_axes = mx_axes(q, x.dim())
    lay = layout(x.shape, channelwise_axes, tiled_axes)
    xf = x.detach().to(torch.float32)
    if xf.numel() == 0:
        return x.detach().clone()
    cal = _calibrate_expanded(xf, m, lay)
    scale, zp = ref_compute_scale(cal, q.name)
    xe = xf.reshape(lay.expanded)
    y = _quant_dequant(xe, scale, zp, q)
    if not m.is_fixed:  # data-dependent scale: a group holding NaN/Inf becomes all NaN
        y = torch.where(_nonfinite_groups(xf, lay), torch.full_like(y, float("nan")), y)
    return y.reshape(x.shape).to(x.dtype)


def expand_param(p: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A scale / zero point read as in fake_quant_with_scale: right-aligned; per dim 1 (shared),
    the dim's size (per channel) or a divisor g of it (g tiles of dim / g elements)."""
    p = p.detach().to(torch.float32)
    rank = len(shape)
    if p.dim() > rank:
        raise ValueError("scale has more dims than x")
    p = p.reshape([1] * (rank - p.dim()) + list(p.shape))
    for a in range(rank):
        g, d = p.shape[a], shape[a]
        if g == 1 or g == d:
            continue
        if g <= 0 or d % g:
            raise ValueError(f"scale dim {a} of size {g} does not fit {d}")
        p = p.repeat_interleave(d // g, dim=a)
    return p


def ref_fake_quant_with_scale(
    x: torch.Tensor, scale: torch.Tensor, qtype: str, zero_point: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Fake quant with a given scale (guarded: < sqrt(FLT_MIN) -> 1) and zero point; elements are
    independent (NaN stays NaN, +-Inf saturates)."""
    q = get_qtype(qtype)
    if zero_point is not None and not q.is_integer:
        raise ValueError("zero point with a float qtype")
    xf = x.detach().to(torch.float32)
    s = guard_scale(expand_param(scale, x.shape))
    zp = None if zero_point is None else expand_param(zero_point, x.shape)
    return _quant_dequant(xf, s, zp, q).expand(x.shape).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Straight-through gradient masks
# ----------------------------------------------------------------------------------------------


def ref_grad_mask(
    x: torch.Tensor,
    qtype: str,
    method: str = "absmax",
    channelwise_axes: Sequence[int] = (),
    tiled_axes: TiledAxes = None,
    clip_gradient: Optional[bool] = None,
) -> torch.Tensor:
    """Bool mask of x's shape: where the gradient of fake_quant passes.

    Masked to the calibrated range [lo, hi] (inclusive) when the method can clip
    (absmax,s / minmax,s with s < 1, rms, fixed) or clip_gradient=True (and
    clip_gradient=False turns it off); otherwise the identity."""
    q = get_qtype(qtype)
    m = parse_method(method)
    enabled = m.can_clip if clip_gradient is None else clip_gradient
    if not enabled:
        return torch.ones(x.shape, dtype=torch.bool)
    if q.block:
        channelwise_axes, tiled_axes = mx_axes(q, x.dim())
    return ref_range_mask(x, method, channelwise_axes, tiled_axes)


def ref_range_mask(
    x: torch.Tensor, method: str = "absmax", channelwise_axes: Sequence[int] = (), tiled_axes: TiledAxes = None
) -> torch.Tensor:
    """lo <= x <= hi: symmetric [-absmax, absmax]; asymmetric [min(min*s, 0), max(max*s, 0)]."""
    m = parse_method(method)
    lay = layout(x.shape, channelwise_axes, tiled_axes)
    xf = x.detach().to(torch.float32)
    if xf.numel() == 0:
        return torch.ones(x.shape, dtype=torch.bool)
    cal = _calibrate_expanded(xf, m, lay)
    if "absmax" in cal:
        lo, hi = -cal["absmax"], cal["absmax"]
    else:
        lo = torch.minimum(cal["min"], torch.zeros_like(cal["min"]))
        hi = torch.maximum(cal["max"], torch.zeros_like(cal["max"]))
    xe = xf.reshape(lay.expanded)
    return ((xe >= lo) & (xe <= hi)).reshape(x.shape)


def ref_with_scale_mask(
    x: torch.Tensor,
    scale: torch.Tensor,
    qtype: str,
    zero_point: Optional[torch.Tensor] = None,
    clip_gradient: bool = False,
) -> torch.Tensor:
    """The grid's range [(qmin - zp) * s, (qmax - zp) * s] (floats: [-max * s, max * s])."""
    q = get_qtype(qtype)
    if not clip_gradient:
        return torch.ones(x.shape, dtype=torch.bool)
    xf = x.detach().to(torch.float32)
    s = guard_scale(expand_param(scale, x.shape))
    if q.is_integer:
        zp = torch.zeros_like(s) if zero_point is None else expand_param(zero_point, x.shape)
        lo, hi = mul32(sub32(q.qmin, zp), s), mul32(sub32(q.qmax, zp), s)
    else:
        lo, hi = mul32(q.qmin, s), mul32(q.qmax, s)
    return ((xf >= lo) & (xf <= hi)).expand(x.shape)


# ----------------------------------------------------------------------------------------------
# Bit-packed masks and SRQ statistics
# ----------------------------------------------------------------------------------------------


def memory_order(x: torch.Tensor) -> torch.Tensor:
    """For a dense (non-overlapping) x: an int64 tensor of x's shape giving each element's
    position in memory order (0 .. numel-1)."""
    off = torch.zeros(x.shape, dtype=torch.int64)
    for a, (n, st) in enumerate(zip(x.shape, x.stride())):
        view = [1] * x.dim()
        view[a] = n
        off = off + torch.arange(n, dtype=torch.int64).reshape(view) * st
    return off


def unpack_mask(mask: torch.Tensor, numel: int) -> torch.Tensor:
    """Bit-packed uint8 (bit i LSB first = element i) -> bool of length numel."""
    b = mask.reshape(-1).to(torch.int64)
    bits = (b.unsqueeze(-1) >> torch.arange(8, dtype=torch.int64)) & 1
    return bits.reshape(-1)[:numel].bool()


def pack_mask(bits: torch.Tensor) -> torch.Tensor:
    """bool (element i = bit i, LSB first) -> uint8 of ceil(n / 8) bytes."""
    b = bits.reshape(-1).to(torch.int64)
    n = b.numel()
    pad = torch.zeros((-n) % 8, dtype=torch.int64)
    b = torch.cat([b, pad]).reshape(-1, 8)
    return (b << torch.arange(8, dtype=torch.int64)).sum(-1).to(torch.uint8)


def mask_in_memory_order(mask_of_x: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bool mask (x's shape) listed in x's memory order (x dense)."""
    out = torch.zeros(x.numel(), dtype=torch.bool)
    out[memory_order(x).reshape(-1)] = mask_of_x.reshape(-1)
    return out


def ref_srq_scale(
    x: torch.Tensor,
    count: int,
    sums: Sequence[torch.Tensor],
    qtype: str,
    method: str = "absmax",
    channelwise_axes: Sequence[int] = (),
    tiled_axes: TiledAxes = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """compute_scale(sums / count) expanded to x's calibration shape, or x's dynamic scale when count == 0."""
    cal = ref_calibrate(x, method, channelwise_axes, tiled_axes)
    shape = next(iter(cal.values())).shape
    if count == 0:
        return ref_compute_scale(cal, qtype)
    avg = [div32(s.float(), float(count)) for s in sums]
    avg_cal = {"absmax": avg[0]} if len(avg) == 1 else {"min": avg[0], "max": avg[1]}
    scale, zp = ref_compute_scale(avg_cal, qtype)
    return scale.expand(shape), (None if zp is None else zp.expand(shape))
