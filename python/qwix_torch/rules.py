"""Qwix's QuantizationRule and QatProvider (DESIGN section 3).

The rules are validated, matched and turned into per-operand plans by the C++
engine in ``csrc/rules`` (bound as ``qwix_torch._C``); this module only holds
the Python-facing dataclass and converts it.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, List, NamedTuple, Optional, Tuple, Union

from qwix_torch import _C

__all__ = ["QuantizationRule", "QatProvider", "OperandPlan", "OpPlan"]


def _bad(field: str, value: Any, what: str) -> ValueError:
    return ValueError(f"qwix: QuantizationRule.{field}={value!r}: {what}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizationRule:
    """Which modules and ops to quantize, and how (Qwix's fields and defaults).

    ``module_path`` is a regex matched in full against the dotted module path
    from ``named_modules()`` (the root is ``''``); ``op_names`` (empty: all)
    picks among ``linear, conv1d, conv2d, conv3d, conv_transpose1d, conv_transpose2d, conv_transpose3d,
    matmul, bmm, einsum``. Weights
    (parameters and views of them) use ``weight_qtype`` and
    ``weight_calibration_method``; every other floating operand uses
    ``act_qtype`` and ``act_calibration_method``, with a static (SRQ) scale when
    ``act_static_scale``. ``tile_size`` tiles the contracting axis (an int counts
    elements, a float in (0, 1) is a fraction of the axis). ``act_batch_axes``
    are the activation axes SRQ statistics average over. ``clip_gradient``
    (ours) overrides whether the straight-through gradient is masked to the
    quantization range. Invalid values raise ``ValueError`` at construction.
    """

    module_path: str = ".*"
    op_names: Tuple[str, ...] = ()
    weight_qtype: Optional[str] = None
    act_qtype: Optional[str] = None
    tile_size: Optional[Union[int, float]] = None
    act_static_scale: bool = False
    weight_calibration_method: str = "absmax"
    act_calibration_method: str = "absmax"
    act_batch_axes: Tuple[int, ...] = (0,)
    clip_gradient: Optional[bool] = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen)
        if not isinstance(self.module_path, str):
            raise _bad("module_path", self.module_path, "must be a str (a regex)")
        try:
            re.compile(self.module_path)
        except re.error as e:
            raise _bad("module_path", self.module_path, f"is not a valid regular expression: {e}") from None
        op_names = self.op_names
        if isinstance(op_names, str):
            op_names = (op_names,)
        try:
            op_names = tuple(op_names)
        except TypeError:
            raise _bad("op_names", self.op_names, "must be a sequence of op names") from None
        for n in op_names:
            if not isinstance(n, str):
                raise _bad("op_names", self.op_names, f"{n!r} is not a str")
        set_("op_names", op_names)
        for field in ("weight_qtype", "act_qtype"):
            v = getattr(self, field)
            if v is not None and not isinstance(v, str):
                raise _bad(field, v, "must be a qtype name (str) or None")
        for field in ("weight_calibration_method", "act_calibration_method"):
            if not isinstance(getattr(self, field), str):
                raise _bad(field, getattr(self, field), "must be a str such as 'absmax' or 'minmax,0.9'")
        t = self.tile_size
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, (int, float)):
                raise _bad("tile_size", t, "must be an int (elements), a float in (0, 1) (fraction of the axis) or None")
            if isinstance(t, float) and not 0.0 < t < 1.0:
                raise _bad("tile_size", t, "a float tile_size is a fraction of the axis and must be in (0, 1); "
                                           "use an int to count elements")
            if _is_int(t) and t < 1:
                raise _bad("tile_size", t, "must be positive")
        for field in ("act_static_scale",):
            if not isinstance(getattr(self, field), bool):
                raise _bad(field, getattr(self, field), "must be a bool")
        if self.clip_gradient is not None and not isinstance(self.clip_gradient, bool):
            raise _bad("clip_gradient", self.clip_gradient, "must be a bool or None")
        axes = self.act_batch_axes
        if _is_int(axes):
            axes = (axes,)
        try:
            axes = tuple(axes)
        except TypeError:
            raise _bad("act_batch_axes", self.act_batch_axes, "must be a sequence of ints") from None
        if not all(_is_int(a) for a in axes):
            raise _bad("act_batch_axes", self.act_batch_axes, "must be a sequence of ints")
        set_("act_batch_axes", axes)
        _C.validate_rule(self._to_cpp())  # the value checks live in C++ (csrc/rules)

    def _to_cpp(self) -> "_C.QuantizationRule":
        r = _C.QuantizationRule()
        r.module_path = self.module_path
        r.op_names = list(self.op_names)
        r.weight_qtype = self.weight_qtype
        r.act_qtype = self.act_qtype
        r.tile_size = None if self.tile_size is None else float(self.tile_size)
        r.act_static_scale = self.act_static_scale
        r.weight_calibration_method = self.weight_calibration_method
        r.act_calibration_method = self.act_calibration_method
        r.act_batch_axes = list(self.act_batch_axes)
        r.clip_gradient = self.clip_gradient
        return r


class OperandPlan(NamedTuple):
    """The C++ engine's decision for one operand, as plain Python values (traceable by Dynamo)."""

    quantize: bool
    is_weight: bool
    qtype: str
    calibration_method: str
    channelwise_axes: Tuple[int, ...]
    tiled_axes: Tuple[Tuple[int, Union[int, float]], ...]  # ((axis, tile),): int elements or float fraction
    static_scale: bool
    batch_axes: Tuple[int, ...]
    clip_gradient: Optional[bool]

    @staticmethod
    def from_cpp(p: "_C.OperandPlan") -> "OperandPlan":
        tiles = tuple((a, t if t < 1.0 else int(t)) for a, t in p.tiled_axes)
        return OperandPlan(p.quantize, p.is_weight, p.qtype, p.calibration_method, tuple(p.channelwise_axes),
                           tiles, p.static_scale, tuple(p.batch_axes), p.clip_gradient)


class OpPlan(NamedTuple):
    rule_index: int
    lhs: OperandPlan
    rhs: OperandPlan


class QatProvider:
    """An ordered list of rules; for each intercepted op the first rule whose
    ``module_path`` fully matches and whose ``op_names`` (if any) include the op
    wins. ``get_unused_rules()`` lists the rules that matched no op so far."""

    def __init__(self, rules):
        if isinstance(rules, QuantizationRule):
            raise TypeError("qwix: QatProvider takes a list of QuantizationRules, got one: write QatProvider([rule])")
        rules = list(rules)
        for i, r in enumerate(rules):
            if not isinstance(r, QuantizationRule):
                raise ValueError(f"qwix: QatProvider rule {i} is a {type(r).__name__}, not a QuantizationRule: {r!r}")
        self._rules: Tuple[QuantizationRule, ...] = tuple(rules)
        self._cpp = _C.QatProvider([r._to_cpp() for r in self._rules])

    @property
    def rules(self) -> Tuple[QuantizationRule, ...]:
        return self._rules

    def get_unused_rules(self) -> List[QuantizationRule]:
        return [self._rules[i] for i in self._cpp.unused_rule_indices()]

    def find_rule(self, module_path: str, op_name: str) -> Optional[QuantizationRule]:
        """The rule for ``op_name`` in module ``module_path`` (marks it used), or None."""
        i = self._cpp.find_rule(module_path, op_name)
        return None if i is None else self._rules[i]

    def plan(self, module_path: str, op_name: str, lhs_rank: int, lhs_is_weight: bool, rhs_rank: int,
             rhs_is_weight: bool, einsum_equation: str = "", groups: int = 1) -> Optional[OpPlan]:
        """The C++ engine's plan for one op (None: no rule matches). Marks the rule used. ``groups``: the
        op's feature groups (a conv_transpose weight's per-output-channel scales depend on it)."""
        p = self._cpp.plan(module_path, op_name, lhs_rank, lhs_is_weight, rhs_rank, rhs_is_weight, einsum_equation,
                           groups)
        if p is None:
            return None
        return OpPlan(p.rule_index, OperandPlan.from_cpp(p.lhs), OperandPlan.from_cpp(p.rhs))

    def decomposes_attention(self, module_path: str) -> bool:
        """Whether ``F.scaled_dot_product_attention`` in this module's forward runs as two quantizable
        ``matmul`` ops: the first rule matching (``module_path``, ``"matmul"``) has an ``act_qtype``."""
        return self._cpp.decomposes_attention(module_path)

    def __repr__(self) -> str:
        return f"QatProvider({list(self._rules)!r})"

    # deepcopy / pickle: the rules and which of them were used.
    def __getstate__(self):
        return {"rules": self._rules, "used": [self._cpp.is_used(i) for i in range(len(self._rules))]}

    def __setstate__(self, state):
        self.__init__(state["rules"])
        for i, used in enumerate(state["used"]):
            if used:
                self._cpp.mark_used(i)
