"""Quantization-aware training for ``torch.nn.Module`` models (DESIGN sections 1 and 3).

``quantize_model`` keeps the model as it is (same classes, same parameter
names) and adds forward hooks: while the model runs, a
``torch.overrides.TorchFunctionMode`` intercepts ``linear``, ``conv1d/2d/3d``,
``conv_transpose1d/2d/3d``, ``matmul`` / ``@`` (and ``mm``, ``addmm``'s product), ``bmm`` (and
``baddbmm``'s product), two-operand ``einsum`` (also inside ``F.multi_head_attention_forward``,
whose body it runs op by op, and inside ``F.scaled_dot_product_attention``, run decomposed where a
rule quantizes matmul activations) and attributes each call to the innermost module whose forward is running (a module stack kept by
forward pre/post hooks on every submodule), so an op belongs to its module's
own forward, never to a parent's. The per-op decision (rule, qtypes,
calibration, channelwise and tiled axes, static or dynamic, SRQ batch axes,
clip_gradient) comes from the C++ engine (``csrc/rules``, via ``QatProvider``);
this module only intercepts, names ops, keeps ``QuantStat`` modules and calls
the ``torch.ops.qwix`` operators. Dynamo traces all of it, so
``torch.compile(qat_model, fullgraph=True)`` works, SRQ updates included.
"""
from __future__ import annotations

import collections.abc
import copy
import functools
import itertools
import sys
import threading
import types
import warnings
import weakref
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from qwix_torch import _C
from qwix_torch.ops import resolve_tiled_axes
from qwix_torch.rules import OpPlan, OperandPlan, QatProvider

__all__ = ["QuantStat", "quantize_model", "set_quant_stats_update", "calibrate", "is_quantized"]


# ------------------------------------------------------------------------------------------------
# SRQ statistics
# ------------------------------------------------------------------------------------------------


class QuantStat(nn.Module):
    """Running statistics of one quantized activation (SRQ, ``act_static_scale=True``).

    Buffers: ``count`` (int32 scalar: how many updates) and ``sum_of_absmax``
    (symmetric calibrations) or ``sum_of_min`` and ``sum_of_max`` (asymmetric
    ones), float32, shaped like the activation's calibration averaged over the
    rule's ``act_batch_axes`` (keepdim). The static scale is computed from
    ``sum / count``; while ``count`` is 0 the scale is dynamic.

    The statistics stay float32 when the model is cast (``model.to(bfloat16)``,
    ``.half()``): only device moves apply to them. Loading a state_dict that
    lacks them (an fp checkpoint) keeps the current values instead of reporting
    missing keys, so fp checkpoints load into QAT models with ``strict=True``.
    """

    def __init__(self, shape: Sequence[int], symmetric: bool = True, device: Optional[torch.device] = None):
        super().__init__()
        self.symmetric = bool(symmetric)
        self.register_buffer("count", torch.zeros((), dtype=torch.int32, device=device))
        if self.symmetric:
            self.register_buffer("sum_of_absmax", torch.zeros(tuple(shape), dtype=torch.float32, device=device))
        else:
            self.register_buffer("sum_of_min", torch.zeros(tuple(shape), dtype=torch.float32, device=device))
            self.register_buffer("sum_of_max", torch.zeros(tuple(shape), dtype=torch.float32, device=device))

    @property
    def sums(self) -> List[torch.Tensor]:
        """``[sum_of_absmax]`` or ``[sum_of_min, sum_of_max]`` (the order the ops use)."""
        if self.symmetric:
            return [self.sum_of_absmax]
        return [self.sum_of_min, self.sum_of_max]

    def average(self) -> dict:
        """The averaged calibration ``{'absmax': ...}`` or ``{'min': ..., 'max': ...}`` (NaN while count is 0)."""
        c = self.count.to(torch.float32)
        if self.symmetric:
            return {"absmax": self.sum_of_absmax / c}
        return {"min": self.sum_of_min / c, "max": self.sum_of_max / c}

    def reset(self) -> None:
        """Forgets the statistics (count 0: the scale is dynamic again)."""
        with torch.no_grad():
            self.count.zero_()
            for s in self.sums:
                s.zero_()

    def reset_parameters(self) -> None:
        """:meth:`reset`, under the name meta-device initialization recipes call after ``to_empty``
        (whose buffers hold uninitialized memory; loading an fp checkpoint keeps the statistics as they are)."""
        self.reset()

    def forward(self, x):
        """Passes ``x`` through: a module whose forward iterates its children (an ``nn.Sequential`` subclass
        that runs an op of its own) meets its statistics among them."""
        return x

    def extra_repr(self) -> str:
        names = ["sum_of_absmax"] if self.symmetric else ["sum_of_min", "sum_of_max"]
        shape = tuple(self.sums[0].shape)
        count = int(self.count) if self.count.device.type != "meta" else "?"
        return f"count={count}, " + ", ".join(f"{n}=<float32 {list(shape)}>" for n in names)

    def _apply(self, fn, recurse=True):
        # Casts (model.to(dtype), .half()) would lose the statistics' precision: apply device moves only.
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            new = fn(buf)
            if new.dtype != buf.dtype:
                new = buf.to(device=new.device)
            self._buffers[name] = new
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        ours = [prefix + n for n in self._buffers]
        absent = [k for k in ours if k not in state_dict]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if len(absent) == len(ours):  # an fp checkpoint: keep the statistics (a partial one stays an error)
            for k in absent:
                if k in missing_keys:
                    missing_keys.remove(k)


# ------------------------------------------------------------------------------------------------
# Model state and interception
# ------------------------------------------------------------------------------------------------


class _Run:
    """The module frames of a running forward and what its ops look up."""

    __slots__ = ("stack", "entry_frame", "swapped", "swapped_tensors")

    def __init__(self):
        self.stack: list = []  # (module, path, op counts, mode or None) of the running forwards
        self.entry_frame = None  # the Python frame that called the outermost running forward
        # The non-Parameter tensors in the parameter slots for this forward (functional_call): their ids in eager
        # mode, the tensors themselves while compiling (Dynamo compares them at trace time).
        self.swapped: frozenset = frozenset()
        self.swapped_tensors: tuple = ()


class _QatState:
    """Per QAT model: the provider, the plans, flags and the running forwards."""

    def __init__(self, provider: QatProvider):
        self.provider = provider
        self.provider_key = _register_provider(provider)
        self.plans: dict = {}  # (path, op, lhs_rank, lhs_w, rhs_rank, rhs_w, equation, groups) -> OpPlan | None
        self.attention: dict = {}  # path -> whether its scaled_dot_product_attention runs decomposed
        self.force_update = False  # calibrate(): update in eval mode too
        self.creating = False  # quantize_model's example forward: create QuantStats, update nothing
        # Eager forwards run per thread (torch's mode stack is per thread too): a thread-local _Run, so threads
        # may run forwards of one model at once. Traced ones (torch.compile) use `traced`: Dynamo cannot read
        # thread-locals, and compiled code leaves it as it found it (empty), whatever thread runs it.
        self.local = threading.local()
        self.traced = _Run()

    def __getstate__(self):
        d = dict(self.__dict__)
        del d["local"]
        d["traced"] = _Run()
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self.local = threading.local()
        self.provider_key = _register_provider(self.provider)  # (the copy's provider is a new object)


# The providers by a key of their own: the functions that Dynamo runs at trace time take the key, a constant
# (torch 2.11's Dynamo cannot pass a QatProvider to an assume_constant_result function: "not a constant").
_PROVIDERS: "weakref.WeakValueDictionary[int, QatProvider]" = weakref.WeakValueDictionary()
_PROVIDER_KEYS = itertools.count(1)


def _register_provider(provider: QatProvider) -> int:
    key = next(_PROVIDER_KEYS)
    _PROVIDERS[key] = provider
    return key


# The QAT modes of this thread's running eager forwards, outermost first. A QAT model called inside another
# one's forward (a distillation teacher kept out of the student's modules) runs as it does alone: while its
# forward runs, the outer model's mode lets every op through (it would see the inner one's quantized ops).
_ACTIVE = threading.local()


def _active_modes() -> list:
    modes = getattr(_ACTIVE, "modes", None)
    if modes is None:
        modes = _ACTIVE.modes = []
    return modes


def _forget_mode(mode) -> None:
    modes = _active_modes()
    for i in range(len(modes) - 1, -1, -1):
        if modes[i] is mode:
            del modes[i]
            return


def _inside_another_model(mode) -> bool:
    """Whether the op comes from the running forward of another QAT model called inside this mode's."""
    modes = getattr(_ACTIVE, "modes", None)
    if not modes or modes[-1] is mode:
        return False
    inner = modes[-1]
    return inner.state is not mode.state and bool(inner.run.stack) and _forward_running(inner.run)


def _eager_run(state: _QatState) -> _Run:
    """This thread's run (eager mode)."""
    run = getattr(state.local, "run", None)
    if run is None:
        run = state.local.run = _Run()
    return run


@torch.compiler.assume_constant_result
def _make_plan(provider_key: int, path: str, op: str, lhs_rank: int, lhs_w: bool, rhs_rank: int, rhs_w: bool,
               equation: str, groups: int) -> Optional[OpPlan]:
    # Under torch.compile this runs at trace time and its result is a constant of the graph.
    return _PROVIDERS[provider_key].plan(path, op, lhs_rank, lhs_w, rhs_rank, rhs_w, equation, groups)


@torch.compiler.assume_constant_result
def _decomposes_attention(provider_key: int, path: str) -> bool:
    return _PROVIDERS[provider_key].decomposes_attention(path)


def _pre_hook(state: _QatState, path: Optional[str], param_dicts: list, module: nn.Module, args=None) -> None:
    # param_dicts: the _parameters dicts of the module's subtree (where functional_call swaps tensors in). Each
    # module's hook holds its own subtree's, so a copy or pickle of a submodule holds only that submodule.
    if args is None:  # a model pickled before 2026-11-28: (state, path) hooks, the model's dicts in the state
        param_dicts, module, args = state.__dict__.get("param_dicts", []), param_dicts, module
    compiling = torch.compiler.is_compiling()
    if not compiling and _FX_SYMBOLIC_TRACE._is_fx_tracing_flag and any(isinstance(a, torch.fx.Proxy) for a in args):
        _refuse_fx_tracing()  # a module inside the traced one (the root's name refused already); make_fx passes
    if compiling:
        run = state.traced
    else:
        run = _eager_run(state)
        if state.traced.stack and _innermost_run(state) is state.traced:
            run = state.traced  # a compiled forward of this thread runs eager code (a graph break)
        elif run.stack and not _forward_running(run):
            _drop_stale_frames(run)
    mode = None
    if not run.stack:
        mode = _QatMode(state, run)
        mode.__enter__()
        if compiling:
            run.entry_frame = None
            run.swapped_tensors = _swapped_parameters(param_dicts)
        else:
            run.entry_frame = sys._getframe(1)
            run.swapped = frozenset(id(t) for t in _swapped_parameters(param_dicts))
            _active_modes().append(mode)
    run.stack.append((module, path, {}, mode))


def _innermost_run(state: _QatState) -> Optional[_Run]:
    """The run of this thread's innermost mode of this model (mode stacks are per thread): the traced run
    while a compiled forward of this thread runs eager code after a graph break."""
    for m in reversed(torch.overrides._get_current_function_mode_stack()):
        if isinstance(m, _QatMode) and m.state is state:
            return m.run
    return None


def _drop_stale_frames(run: _Run) -> None:
    """A forward starts while frames of one that is no longer running remain: it was left by a BaseException
    (KeyboardInterrupt), which skips always_call forward hooks (torch runs them for Exception only). Its
    frames and its mode go now."""
    mode = run.stack[0][3]
    run.stack.clear()
    run.entry_frame = None
    _forget_mode(mode)
    if mode is not None and any(m is mode for m in torch.overrides._get_current_function_mode_stack()):
        # wherever it sits: a nested QAT model's interrupted forward left its own mode above it
        above = []
        while True:
            top = torch._C._pop_torch_function_stack()
            if top is mode:
                break
            above.append(top)
        for m in reversed(above):
            torch._C._push_on_torch_function_stack(m)


def _forward_running(run: _Run) -> bool:
    """Whether the outermost forward is still running: its caller's frame is on the Python stack (a walk of
    about three frames per module level). After a KeyboardInterrupt left the forward (and its mode stayed
    on), ops outside any forward pass through untouched until the next forward drops the stale frames."""
    entry = run.entry_frame
    if entry is None or torch.compiler.is_compiling():
        return True
    f = sys._getframe(1)
    while f is not None:
        if f is entry:
            return True
        f = f.f_back
    return False


def _post_hook(state: _QatState, path: Optional[str], module: nn.Module, args, output) -> None:
    if torch.compiler.is_compiling():
        run = state.traced
    else:
        run = _eager_run(state)
        if state.traced.stack and (not run.stack or _innermost_run(state) is state.traced):
            run = state.traced  # a compiled forward's frame, finished eagerly (a graph break, a failed compile)
    if not run.stack:  # its frames were dropped as stale (an interrupted forward)
        return
    frame = run.stack.pop()
    if frame[3] is not None:
        run.entry_frame = None
        run.swapped = frozenset()
        run.swapped_tensors = ()
        if not torch.compiler.is_compiling():
            _forget_mode(frame[3])
        frame[3].__exit__(None, None, None)


def _swapped_parameters(param_dicts: list) -> tuple:
    """The plain tensors that stand in parameters' slots for this forward: ``torch.func.functional_call`` (and
    ``torch.nn.utils.stateless``) put the tensors it is given there, and ``torch.func.grad`` wraps them."""
    return tuple(t for d in param_dicts for t in d.values() if t is not None and not isinstance(t, nn.Parameter))


def _is_weight(run: _Run, t: torch.Tensor) -> bool:
    """A parameter, or a view of one (``self.w.t()``, ``self.w[None]``, ...), or a tensor in a parameter's slot."""
    if isinstance(t, nn.Parameter):
        return True
    base = t._base
    if base is not None and isinstance(base, nn.Parameter):
        return True
    if torch.compiler.is_compiling():
        return any(s is t or s is base for s in run.swapped_tensors)
    if not run.swapped:
        return False
    return id(t) in run.swapped or (base is not None and id(base) in run.swapped)


# The intercepted torch functions and their op names (some are renamed in _intercept).
_OP_NAMES = {
    F.linear: "linear",
    torch.matmul: "matmul", torch.Tensor.matmul: "matmul", torch.Tensor.__matmul__: "matmul",
    torch.Tensor.__rmatmul__: "rmatmul",  # a.__rmatmul__(b) is b @ a
    torch.mm: "mm", torch.Tensor.mm: "mm",  # a 2-D matmul
    torch.addmm: "addmm", torch.Tensor.addmm: "addmm",  # input + mat1 @ mat2 (GPT-2's Conv1D): a matmul
    torch.bmm: "bmm", torch.Tensor.bmm: "bmm",
    torch.baddbmm: "baddbmm", torch.Tensor.baddbmm: "baddbmm",  # input + batch1 @ batch2: a bmm
    torch.conv1d: "conv1d", torch.conv2d: "conv2d", torch.conv3d: "conv3d",
    torch.conv_transpose1d: "conv_transpose1d", torch.conv_transpose2d: "conv_transpose2d",
    torch.conv_transpose3d: "conv_transpose3d",
    torch.einsum: "einsum",
}


def _body_without_dispatch(func):
    """A copy of the Python function ``func`` whose own ``has_torch_function`` check is always false.

    ``F.multi_head_attention_forward`` hands itself to an active mode as one call; the mode runs with
    itself popped, so the ops inside (the projections' ``linear``, ``bmm``) would never be seen. Running
    this copy with the mode pushed again makes them visible, as TorchScript's inlining does (DESIGN
    section 3: an op belongs to the module whose forward runs it)."""
    env = dict(func.__globals__)
    env["has_torch_function"] = lambda *args: False
    body = types.FunctionType(func.__code__, env, func.__name__, func.__defaults__, func.__closure__)
    body.__kwdefaults__ = func.__kwdefaults__
    return body


# Python functions of torch whose ops the rules quantize (nn.MultiheadAttention's forward calls this one).
_COMPOSITES = {F.multi_head_attention_forward: _body_without_dispatch(F.multi_head_attention_forward)}


def _load_decomposed_attention():
    """F.scaled_dot_product_attention as two matmuls: the engine's TorchScript source (the TorchScript
    pass inlines the same text), run as Python so that the mode sees the matmuls."""
    env = {"torch": torch, "Tensor": torch.Tensor, "Optional": Optional, "ValueError": ValueError,
           "safe_softmax": torch.ops.aten._safe_softmax, "bool_dtype": torch.bool}  # (Dynamo traces torch.ops)
    exec(compile(_C.decomposed_attention_source(), "<qwix decomposed_attention>", "exec"), env)
    return env["scaled_dot_product_attention"]


_DECOMPOSED_ATTENTION = _load_decomposed_attention()


class _QatMode(TorchFunctionMode):
    """The ops of one running forward (its thread's _Run)."""

    def __init__(self, state: _QatState, run: _Run):
        super().__init__()
        self.state = state
        self.run = run

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        run = self.run
        if run.stack and run.stack[0][3] is not self and not torch.compiler.is_compiling():
            return func(*args, **kwargs)  # a stale mode (an interrupted forward's) beside its run's current one
        if run.stack and run.stack[-1][1] is not None:  # (None: inside a parametrization)
            op = _OP_NAMES.get(func)
            body = _COMPOSITES.get(func)
            if (op is not None or body is not None or func is F.scaled_dot_product_attention) and \
                    not torch.compiler.is_compiling() and _inside_another_model(self):
                return func(*args, **kwargs)
            # out= calls are not intercepted: they have no autograd, and inductor's compiled code makes them
            # (extern_kernels.mm/bmm/addmm are torch.mm(..., out=buf)) while this mode is on the stack.
            if op is not None and "out" not in kwargs and _forward_running(run):
                return _intercept(self.state, run, op, func, args, kwargs)
            if body is None and func is F.scaled_dot_product_attention and self._decomposes_attention():
                body = _DECOMPOSED_ATTENTION  # its q·kᵀ and weights·v become this module's next two matmuls
            if body is not None and _forward_running(run):
                with self:  # this mode is popped while its __torch_function__ runs: the body's ops must see it
                    return body(*args, **kwargs)
            if func is F.scaled_dot_product_attention and run is self.state.traced:
                # passed on as the aten overload, as _call does: under torch.compile the thread check above is off,
                # and the mode of a QAT model calling this one would decompose it with its own rules
                return torch.ops.aten.scaled_dot_product_attention(*args, **kwargs)
        if func is torch.Tensor.unflatten:
            # Python ending in super().unflatten(...), which Dynamo (torch 2.13) cannot trace when a mode
            # dispatched the call (pytorch/pytorch#179853): call torch.unflatten, the same op.
            func = torch.unflatten
        return func(*args, **kwargs)

    def _decomposes_attention(self) -> bool:
        path = self.run.stack[-1][1]
        decomposed = self.state.attention.get(path)
        if decomposed is None:
            decomposed = _decomposes_attention(self.state.provider_key, path)
            if not torch.compiler.is_compiling():
                self.state.attention[path] = decomposed
        return decomposed


# Each op's operand parameters (positional, or by these names); addmm / baddbmm add `input` first.
_OPERAND_NAMES = {
    "linear": ("input", "weight"),
    "conv1d": ("input", "weight"),
    "conv2d": ("input", "weight"),
    "conv3d": ("input", "weight"),
    "conv_transpose1d": ("input", "weight"),
    "conv_transpose2d": ("input", "weight"),
    "conv_transpose3d": ("input", "weight"),
    "matmul": ("input", "other"),
    "mm": ("input", "mat2"),
    "addmm": ("input", "mat1", "mat2"),
    "bmm": ("input", "mat2"),
    "baddbmm": ("input", "batch1", "batch2"),
}
_RENAMED = {"mm": "matmul", "addmm": "matmul", "baddbmm": "bmm"}  # quantized as these ops


def _bind(names, args, kwargs):
    """(values of `names`, the remaining positional args, the remaining kwargs), taking the names first from
    args then from kwargs; None if one is missing."""
    values = list(args[:len(names)])
    kwargs = dict(kwargs)
    for name in names[len(values):]:
        if name not in kwargs:
            return None
        values.append(kwargs.pop(name))
    return values, tuple(args[len(names):]), kwargs


def _intercept(state: _QatState, run: _Run, op: str, func, args, kwargs):
    equation = ""
    kw = kwargs  # what the call gets besides its operands (the original args/kwargs serve the pass-throughs)
    if op == "einsum":
        # torch.einsum(eq, a, b) or torch.einsum(eq, [a, b]); other forms pass through.
        operands = args[1:]
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = tuple(operands[0])
        if len(args) < 1 or not isinstance(args[0], str) or len(operands) != 2 or kwargs:
            return func(*args, **kwargs)
        equation = args[0]
        lhs, rhs = operands
        rest: tuple = ()
    elif op == "rmatmul":  # a.__rmatmul__(b) is b @ a
        if len(args) != 2:
            return func(*args, **kwargs)
        op = "matmul"
        lhs, rhs = args[1], args[0]
        rest = ()
    else:
        bound = _bind(_OPERAND_NAMES[op], args, kwargs)
        if bound is None:
            return func(*args, **kwargs)
        values, rest, kw = bound
        if not all(isinstance(v, torch.Tensor) for v in values):  # e.g. the deprecated addmm(beta, input, m1, m2)
            return func(*args, **kwargs)
        lhs, rhs = values[-2:]
        if len(values) == 3:  # addmm / baddbmm: input + m1 @ m2, the product a matmul / bmm of m1, m2
            rest = (values[0],) + rest
        op = _RENAMED.get(op, op)
    if not isinstance(lhs, torch.Tensor) or not isinstance(rhs, torch.Tensor):
        return func(*args, **kwargs)
    if lhs.layout != torch.strided or rhs.layout != torch.strided:
        return func(*args, **kwargs)  # sparse operands (a GNN's adjacency in torch.mm) cannot be fake-quantized

    module, path, counts, _ = run.stack[-1]
    n = counts.get(op, 0)
    counts[op] = n + 1

    lhs_w, rhs_w = _is_weight(run, lhs), _is_weight(run, rhs)
    groups = 1
    if op.startswith("conv_transpose"):  # (input, weight, bias, stride, padding, output_padding, groups, dilation)
        groups = rest[4] if len(rest) > 4 else kw.get("groups", 1)
    key = (path, op, lhs.dim(), lhs_w, rhs.dim(), rhs_w, equation, groups)
    if key in state.plans:
        plan = state.plans[key]
    else:
        plan = _make_plan(state.provider_key, path, op, lhs.dim(), lhs_w, rhs.dim(), rhs_w, equation, groups)
        if not torch.compiler.is_compiling():
            state.plans[key] = plan
    if plan is None:
        return _call(func, op, equation, lhs, rhs, rest, kw, run is state.traced)

    op_id = f"{op}{n}"
    try:
        lhs = _quantize(state, module, path, op_id + "_lhs", lhs, plan.lhs)
        rhs = _quantize(state, module, path, op_id + "_rhs", rhs, plan.rhs)
    except ValueError as e:  # the op's own message (a tile that does not divide, a statistic's shape) + where
        rule = state.provider.rules[plan.rule_index]._to_cpp()  # the short repr the C++ paths print
        message = str(e).removeprefix("qwix: ")
        raise ValueError(f"qwix: module {path!r}, op {op_id} (rule {rule!r}): {message}") from None
    return _call(func, op, equation, lhs, rhs, rest, kw, run is state.traced)


# Under torch.compile the ops go into the graph as aten overloads: Dynamo runs the graph with this mode
# on the stack (the root module's pre-hook runs eagerly), and a backend that executes the graph in Python
# (backend="eager") would hand torch-level calls to the mode again and quantize twice; the mode lets
# aten overloads through.
_ATEN = {"linear": torch.ops.aten.linear, "conv1d": torch.ops.aten.conv1d, "conv2d": torch.ops.aten.conv2d,
         "conv3d": torch.ops.aten.conv3d, "conv_transpose1d": torch.ops.aten.conv_transpose1d,
         "conv_transpose2d": torch.ops.aten.conv_transpose2d, "conv_transpose3d": torch.ops.aten.conv_transpose3d,
         "matmul": torch.ops.aten.matmul, "mm": torch.ops.aten.mm, "addmm": torch.ops.aten.addmm,
         "bmm": torch.ops.aten.bmm, "baddbmm": torch.ops.aten.baddbmm}


def _call(func, op, equation, lhs, rhs, rest, kwargs, traced_run: bool):
    # The aten overloads, which no QAT mode intercepts, while compiling, and for a traced run's op in eager
    # code (a graph break under regional compilation: the eager forward's mode below would quantize it again).
    compiling = traced_run or torch.compiler.is_compiling()
    if op == "einsum":
        return torch.ops.aten.einsum(equation, [lhs, rhs]) if compiling else func(equation, lhs, rhs)
    if func is torch.Tensor.__rmatmul__:  # b @ a: lhs is b
        return (torch.ops.aten.matmul if compiling else torch.matmul)(lhs, rhs)
    name = _OP_NAMES[func]  # the function's own op (op may be the one it is quantized as)
    call = _ATEN[name] if compiling else func
    if name in ("addmm", "baddbmm"):  # input + m1 @ m2: `input` is rest[0]
        return call(rest[0], lhs, rhs, *rest[1:], **kwargs)
    return call(lhs, rhs, *rest, **kwargs)


def _quantize(state: _QatState, module: nn.Module, path: str, name: str, x: torch.Tensor, p: OperandPlan):
    if not p.quantize or not x.is_floating_point():
        return x
    if p.tiled_axes:
        axes, tiles = resolve_tiled_axes(x.shape, dict(p.tiled_axes))
    else:
        axes, tiles = [], []
    cw = list(p.channelwise_axes)
    if not p.static_scale:
        return torch.ops.qwix.fake_quant(x, p.qtype, p.calibration_method, cw, axes, tiles, p.clip_gradient)

    stat = module._modules.get(name)
    if stat is None:
        stat = _create_stat(module, path, name, x, p, cw, axes, tiles)
    xd = x.detach()
    if not state.creating and (state.force_update or (module.training and getattr(module, "_qwix_update", True))) \
            and not _recomputing_in_backward():
        _update_stat(stat, xd, p, cw, axes, tiles)
    scale = torch.ops.qwix.srq_scale(xd, stat.count, stat.sums, p.qtype, p.calibration_method, cw, axes, tiles)
    zero_point = scale[1] if len(scale) > 1 else None
    return torch.ops.qwix.fake_quant_with_scale(x, scale[0], zero_point, p.qtype, bool(p.clip_gradient))


def _recomputing_in_backward() -> bool:
    """True while the autograd engine runs a forward again: gradient checkpointing recomputes its
    segment in the backward, which must read the scale the first forward used, not update again.
    (Not checked inside torch.compile, where the engine query cannot be traced.)"""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _create_stat(module, path, name, x, p, cw, axes, tiles) -> QuantStat:
    if torch.compiler.is_compiling():
        raise RuntimeError(
            f"qwix: the QuantStat {path + '.' if path else ''}{name} does not exist yet and cannot be created "
            "inside torch.compile: give quantize_model example inputs (or run the model once eagerly) first")
    with torch.no_grad():
        cal = torch.ops.qwix.calibrate(x.detach(), p.calibration_method, cw, axes, tiles)
    shape = list(cal[0].shape)
    for a in p.batch_axes:
        shape[a] = 1
    with torch.inference_mode(False):  # made under inference_mode, the buffers could never be updated later
        stat = QuantStat(shape, symmetric=len(cal) == 1, device=x.device)
    module.add_module(name, stat)
    return stat


def _update_stat(stat: QuantStat, x: torch.Tensor, p: OperandPlan, cw, axes, tiles) -> None:
    """Update-before-read: count += 1 (world size), sums += the batch's calibration averaged over the batch axes.
    An empty batch (an op that got no tokens) adds nothing; update_quant_stat leaves out a NaN/Inf one."""
    world = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
    compiling = torch.compiler.is_compiling()
    if world == 1 and not compiling:
        if x.numel() > 0:
            cal = torch.ops.qwix.calibrate(x, p.calibration_method, cw, axes, tiles)
            torch.ops.qwix.update_quant_stat(stat.count, stat.sums, cal, list(p.batch_axes), 1)
        return
    cal = torch.ops.qwix.calibrate(x, p.calibration_method, cw, axes, tiles)
    # Emptiness as a device value: compiling, a data-dependent token count is not known on the host.
    has_data = torch.scalar_tensor(x.numel(), device=x.device) > 0
    batch_axes = list(p.batch_axes)
    if world == 1:  # compiling: an empty batch's NaN is left out by update_quant_stat
        cal = [torch.where(has_data, c, float("nan")) for c in cal]
        torch.ops.qwix.update_quant_stat(stat.count, stat.sums, cal, batch_axes, 1)
        return
    # Every rank adds the sum over ranks of their batch averages: the same statistics on every rank, equal to one
    # process gathering all the batches. A rank whose batch is empty (or non-finite) still joins the collective,
    # with zeros and a 0 in the last slot, which counts the ranks that had data; their average stands in for it.
    averages = [c.mean(dim=batch_axes, keepdim=True) if batch_axes else c for c in cal]
    for a in averages:
        has_data = has_data & torch.isfinite(a).all()
    flat = torch.cat([torch.where(has_data, a, 0.0).reshape(-1) for a in averages] +
                     [has_data.to(torch.float32).reshape(1)])
    torch.distributed.all_reduce(flat)
    ranks_with_data = flat[-1]
    totals = [t.reshape(a.shape) for t, a in zip(flat[:-1].split([a.numel() for a in averages]), averages)]
    # x 1.0 exactly when every rank had data; NaN when none had, which update_quant_stat leaves out entirely.
    # (A true division: `world / tensor` would be a reciprocal times world, not always exactly 1.)
    spread = torch.where(ranks_with_data > 0, torch.full_like(ranks_with_data, world) / ranks_with_data,
                         float("nan"))
    torch.ops.qwix.update_quant_stat(stat.count, stat.sums, [t * spread for t in totals], batch_axes, world)


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------


def _states(model: nn.Module) -> List[_QatState]:
    out = []
    for m in model.modules():
        s = m.__dict__.get("_qwix_state")
        if s is not None and all(s is not o for o in out):
            out.append(s)
    return out


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` (or a submodule, e.g. inside DDP or torch.compile) was returned by quantize_model."""
    if isinstance(model, torch.jit.ScriptModule):
        from qwix_torch.jit import jit_is_quantized

        return jit_is_quantized(model)
    return bool(_states(model))


def quantize_model(model: nn.Module, provider: QatProvider, *example_inputs: Any, inplace: bool = False,
                   example_kwargs: Optional[dict] = None) -> nn.Module:
    """Returns a QAT version of ``model`` (a deep copy unless ``inplace``).

    The returned model has the same classes, submodules and parameter names;
    inside each module's own forward the ops ``linear``, ``conv1d/2d/3d``, ``conv_transpose1d/2d/3d``,
    ``matmul`` / ``@`` (and ``mm``, ``addmm``'s product), ``bmm`` (and ``baddbmm``'s product) and
    two-operand ``einsum`` are fake-quantized as
    the provider's first matching rule says (``F.scaled_dot_product_attention`` runs as two
    ``matmul`` ops where that rule for ``matmul`` has an ``act_qtype``). With ``example_inputs`` the model
    runs once in its current mode (no gradients, no statistics updates; buffers such as
    batch-norm statistics and the RNG state are restored afterwards) so that rules are matched
    and every SRQ ``QuantStat`` (``<module>.<op id>_lhs`` / ``_rhs``) exists
    before an optimizer, a state_dict or ``torch.compile`` sees the model. ``example_kwargs`` are
    passed as keyword arguments of that forward (``input_ids=..., attention_mask=...``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"qwix: quantize_model needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):  # the C++ TorchScript pass (csrc/jit)
        from qwix_torch.jit import jit_quantize_model

        return jit_quantize_model(model, provider, *example_inputs, inplace=inplace, example_kwargs=example_kwargs)
    if not isinstance(provider, QatProvider):
        raise TypeError(f"qwix: quantize_model needs a QatProvider, got {type(provider).__name__}")
    _refuse_compiled_modules(model)
    example_kwargs = _check_example_kwargs(example_kwargs)
    for path, module in model.named_modules():
        if "_qwix_state" in module.__dict__:
            what = f"its submodule {path!r} is" if path else "this model is"
            raise ValueError(f"qwix: {what} already quantized (quantize_model was applied to it); quantizing again "
                             "would fake-quantize its ops twice: quantize the floating-point model instead")
    if not inplace:
        try:
            with torch.inference_mode(False):  # (copies made under inference_mode could not be trained)
                model = copy.deepcopy(model)
        except ValueError as e:
            if "uninitialized" not in str(e):
                raise
            raise ValueError("qwix: quantize_model copies the model (inplace=False), and a lazy module with "
                             "uninitialized buffers (nn.LazyBatchNorm*, ...) cannot be copied before its first "
                             "forward: run the model once first, or pass inplace=True") from e
    state = _QatState(provider)
    # A parametrization (torch.nn.utils.parametrize: orthogonal, weight_norm, ...) computes a weight whenever it
    # is read, inside a forward or not: its ops are not the model's ops, so its frames quantize nothing.
    inside_parametrization = {id(m) for p in model.modules() if isinstance(p, parametrize.ParametrizationList)
                              for m in p.modules()}
    hooked, scripted = _python_modules(model)
    hooked_ids = {id(m) for _, m in hooked}
    for path, module in hooked:
        frame_path = None if id(module) in inside_parametrization else path
        subtree = [m._parameters for m in module.modules() if id(m) in hooked_ids]
        module.register_forward_pre_hook(functools.partial(_pre_hook, state, frame_path, subtree), prepend=True)
        module.register_forward_hook(functools.partial(_post_hook, state, frame_path), always_call=True)
        module._qwix_state = state  # every module: a model built around one is refused, helpers accept it
        module._qwix_update = True  # set_quant_stats_update (per module, as on the TorchScript path)
        module.__prepare_scriptable__ = _refuse_scripting  # torch.jit.script calls it first
        module._get_name = _NameRefusingFxTracing(module)  # torch.fx's Tracer.trace calls it first
    _warn_about_scripted_submodules(model, provider, scripted)
    ran = bool(example_inputs or example_kwargs)
    if ran:
        _example_forward(model, state, example_inputs, example_kwargs)
    warning = provider._cpp.nothing_matched_warning([p for p, _ in model.named_modules()], ran)
    if warning:
        warnings.warn(warning, stacklevel=2)
    if isinstance(model, torch.fx.GraphModule) and (not ran or any(
            k[0] == "" and plan is not None for k, plan in state.plans.items())):
        warnings.warn("qwix: ops that rules quantize in a GraphModule's own graph (not inside a submodule) lose their "
                      "quantization on copy.deepcopy, pickling and torch.export (GraphModule rebuilds its root without "
                      "the QAT hooks and statistics): train and save (state_dict) this object itself, or quantize the "
                      "original nn.Module", stacklevel=2)
    return model


def _refuse_compiled_modules(model: nn.Module) -> None:
    """A torch.compile wrapper (OptimizedModule) would run the QAT hooks both eagerly and traced, and its
    `_orig_mod.` path prefix would change which rules match: quantize first, then compile."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
    if eval_frame is None:
        return
    for path, module in model.named_modules():
        if isinstance(module, eval_frame.OptimizedModule):
            what = f"its submodule {path!r} is" if path else "this model is"
            raise TypeError(f"qwix: {what} a torch.compile wrapper (OptimizedModule); quantize the module itself "
                            "and compile the QAT model afterwards: qat = quantize_model(compiled._orig_mod, provider, "
                            "...), then torch.compile(qat)")


def _python_modules(model: nn.Module) -> Tuple[List[Tuple[str, nn.Module]], Dict[str, List[str]]]:
    """The (path, module) pairs the pass hooks, and for each TorchScript submodule (its forward runs in
    TorchScript, where the pass sees no op; hooks cannot be added to it) the paths of its subtree."""
    hooked, scripted = [], {}
    for path, module in model.named_modules():
        top = next((p for p in scripted if path.startswith(p + ".")), None)
        if top is not None:
            scripted[top].append(path)
        elif isinstance(module, torch.jit.ScriptModule):
            scripted[path] = [path]
        else:
            hooked.append((path, module))
    return hooked, scripted


def _warn_about_scripted_submodules(model: nn.Module, provider: QatProvider, scripted: Dict[str, List[str]]) -> None:
    from qwix_torch.jit import jit_is_quantized

    for top, paths in scripted.items():
        if jit_is_quantized(model.get_submodule(top)):  # quantized by the TorchScript pass already
            continue
        if provider._cpp.may_quantize(paths):
            warnings.warn(f"qwix: submodule {top!r} is a TorchScript module: its ops run in TorchScript, where "
                          "quantize_model's Python pass cannot see them, so they stay floating-point. Quantize that "
                          "ScriptModule with the TorchScript pass (quantize_model(script_module, provider, example_inputs)) "
                          "before putting it in the model, or keep it a Python module", stacklevel=3)


def _refuse_scripting():
    raise TypeError("qwix: torch.jit.script of a model quantized by quantize_model's Python pass is not supported "
                    "(its quantization lives in Python hooks): script the floating-point model and quantize the "
                    "ScriptModule, quantize_model(torch.jit.script(model), provider, example_inputs)")


_FX_TRACE_CODE = torch.fx.Tracer.trace.__code__
_FX_SYMBOLIC_TRACE = torch.fx._symbolic_trace  # (its _is_fx_tracing_flag: is_fx_symbolic_tracing() without a call)
_FX_CODE_ONLY = torch.fx.graph_module._CodeOnlyModule


class _NameRefusingFxTracing:
    """A QAT module's ``_get_name``: the module's own, except for torch.fx's ``Tracer.trace``, which asks its
    root first. fx calls the root's forward without hooks, so its ops would be graph nodes that run
    unquantized (torch.fx.symbolic_trace, torchvision's create_feature_extractor). fx's re-trace of an
    unpickled GraphModule's code (a ``_CodeOnlyModule`` root carrying this attribute) is not refused."""

    def __init__(self, module: nn.Module):
        self.module_ref = weakref.ref(module)  # (the module holds this object: no cycle)
        self.name = type(module).__name__

    def __call__(self) -> str:
        frame = sys._getframe(1)
        if frame.f_code is _FX_TRACE_CODE and not isinstance(frame.f_locals.get("root"), _FX_CODE_ONLY):
            _refuse_fx_tracing()
        module = self.module_ref()
        return self.name if module is None else type(module)._get_name(module)

    def __getstate__(self):
        return {"name": self.name}

    def __setstate__(self, d):
        self.name = d["name"]
        self.module_ref = lambda: None


def _refuse_fx_tracing():
    raise TypeError("qwix: torch.fx.symbolic_trace cannot trace a QAT model (the GraphModule would run its modules' "
                    "own ops unquantized); quantize the floating-point model itself, or use torch.export / "
                    "torch.compile on the QAT model")


def _check_example_kwargs(example_kwargs) -> dict:
    """A dict of the example keyword inputs (any mapping: HF's BatchEncoding is a UserDict)."""
    if example_kwargs is None:
        return {}
    if not isinstance(example_kwargs, collections.abc.Mapping):
        raise TypeError(f"qwix: example_kwargs must be a mapping of keyword inputs, got {type(example_kwargs).__name__}")
    return dict(example_kwargs)


def _example_forward(model: nn.Module, state: _QatState, example_inputs, example_kwargs: dict) -> None:
    """Runs the model once in its current mode to match rules and create QuantStats, and leaves
    everything else as it was: no gradients, buffers restored (batch-norm statistics), RNG restored."""
    # The buffer objects themselves and their values: a forward may replace a buffer (a rotary or causal-mask
    # cache grown for a longer input); lazy modules' uninitialized buffers have no values yet and stay as the
    # forward leaves them.
    saved = [(m, name, b, b.clone()) for m in model.modules() for name, b in m._buffers.items()
             if b is not None and not isinstance(b, nn.parameter.UninitializedBuffer)]
    lazy_stats = [m for m in model.modules() if hasattr(m, "reset_running_stats") and _has_uninitialized_buffers(m)]
    cuda = sorted({t.device.index or 0 for t in list(model.parameters()) + list(model.buffers()) if t.is_cuda})
    state.creating = True
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            model(*example_inputs, **example_kwargs)
    finally:
        state.creating = False
        with torch.no_grad():
            for m, name, b, value in saved:
                m._buffers[name] = b
                b.copy_(value)
            for m in lazy_stats:  # materialized by this forward, then updated by it: back to their initial values
                if not _has_uninitialized_buffers(m):
                    m.reset_running_stats()


def _has_uninitialized_buffers(m: nn.Module) -> bool:
    return any(isinstance(b, nn.parameter.UninitializedBuffer) for b in m._buffers.values())


def set_quant_stats_update(model: nn.Module, enabled: bool) -> None:
    """Enables or disables SRQ statistics updates in training mode (they never happen in eval mode,
    except inside :func:`calibrate`)."""
    if isinstance(model, torch.jit.ScriptModule):
        from qwix_torch.jit import jit_set_quant_stats_update

        return jit_set_quant_stats_update(model, enabled)
    if not _states(model):
        raise ValueError("qwix: set_quant_stats_update needs a model returned by quantize_model")
    check_enabled_flag(enabled)
    for m in model.modules():  # the given module's subtree (as on the TorchScript path)
        if "_qwix_state" in m.__dict__:
            m._qwix_update = bool(enabled)


def check_enabled_flag(enabled: Any) -> None:
    if not isinstance(enabled, bool):  # (bool("no") is True), as nn.Module.train(mode)
        raise TypeError(f"qwix: set_quant_stats_update's enabled must be True or False, got {enabled!r}")


def run_batches(model: Any, batches: Iterable[Any], progress: bool) -> None:
    """Forward-only over ``batches`` (``model(b)``, ``model(*b)`` or ``model(**b)``) with a tqdm bar."""
    from tqdm.auto import tqdm

    if isinstance(batches, torch.Tensor):
        raise TypeError(f"qwix: calibrate needs an iterable of batches ([x], a DataLoader, ...), got a tensor of shape "
                        f"{list(batches.shape)}, whose rows it would take as batches; pass [x] for one batch")

    total = len(batches) if hasattr(batches, "__len__") else None
    with torch.no_grad():
        for batch in tqdm(batches, total=total, desc="qwix calibrate", disable=not progress, leave=False):
            if isinstance(batch, collections.abc.Mapping):  # a dict, HF's BatchEncoding (a UserDict), ...
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                try:
                    model(*batch)
                except TypeError as e:
                    raise TypeError(f"qwix: calibrate called model(*batch) for a {type(batch).__name__} batch of "
                                    f"{len(batch)} items and it failed ({e}); for a loader of (inputs, labels) "
                                    "pairs, pass (x for x, _ in loader)") from e
            else:
                model(batch)


def calibrate(model: nn.Module, batches: Iterable[Any], *, progress: bool = True) -> nn.Module:
    """Standalone SRQ calibration: runs ``model`` forward only over ``batches``
    under ``torch.no_grad()`` with every module in eval mode (dropout off,
    batch-norm statistics frozen) while the QuantStats update; restores the
    modules' modes afterwards. A batch is passed as ``model(batch)``,
    ``model(*batch)`` (tuple or list) or ``model(**batch)`` (any mapping).
    Shows a tqdm progress bar unless ``progress=False``.
    """
    if isinstance(model, torch.jit.ScriptModule):
        from qwix_torch.jit import jit_calibrate

        return jit_calibrate(model, batches, progress=progress)
    states = _states(model)
    if not states:
        raise ValueError("qwix: calibrate needs a model returned by quantize_model")
    modes = [(m, m.training) for m in model.modules()]
    forced = [s.force_update for s in states]
    try:
        model.eval()
        for s in states:
            s.force_update = True
        run_batches(model, batches, progress)
    finally:
        for s, f in zip(states, forced):
            s.force_update = f
        for m, t in modes:
            m.training = t
    return model
