"""vmap rules for the qwix ops: every op runs per sample, as ``torch.vmap`` means (none takes PyTorch's loop
fallback, which refuses list outputs and mutations and warns of its cost).

The fake-quant ops run once on the whole batch with the batch axis made channelwise (one calibration
group per sample and per channel / tile: the per-sample result, in one kernel call). Their masks are
per sample, in the sample's row-major order (``fake_quant_backward`` under vmap reads them so). A loop
over the samples runs instead for nvfp4 (one tensor scale per sample, not a channel), masks whose samples
end inside a byte, MX formats of 0-d samples, and arguments the op refuses (so its own error is raised).

``calibrate``, ``compute_scale``, ``srq_scale`` and ``update_quant_stat`` run the loop: per-sample
calibrations and scales, and one SRQ statistic update per sample (``count`` grows by the batch size, as a
loop of single-sample forwards).
"""
import torch

_ops = torch.ops.qwix
_FORCE_LOOP = False  # benchmarks/bench_func.py times the per-sample loop (one op call per sample) with it


def _sample(arg, dim, i):
    if dim is None:
        return arg
    if isinstance(arg, (list, tuple)):
        return [a if d is None else a.select(d, i) for a, d in zip(arg, dim)]
    return arg.select(dim, i)


def _check_batch(info, name):
    if info.batch_size == 0:
        raise ValueError(f"qwix: vmap of {name} over a batch of size 0: there is no sample to run it on")


def _loop(op, info, in_dims, args, dense=()):
    """The op per sample, outputs stacked along 0. Arguments at the indices in `dense` are made contiguous, so
    masks come out in each sample's row-major order."""
    outs = []
    for i in range(info.batch_size):
        sample = [_sample(a, d, i) for a, d in zip(args, in_dims)]
        for k in dense:
            sample[k] = sample[k].contiguous()
        outs.append(op(*sample))
    if outs[0] is None:  # update_quant_stat: it mutated its (per-sample or shared) statistics
        return None, None
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs), 0
    stacked = [torch.stack(ts) for ts in zip(*outs)]
    if isinstance(outs[0], tuple):
        return tuple(stacked), (0,) * len(stacked)
    return stacked, [0] * len(stacked)


def _loop_rule(op):
    def rule(info, in_dims, *args):
        _check_batch(info, op._schema.name)
        return _loop(op, info, in_dims, args)

    return rule


def _update_quant_stat_rule(info, in_dims, count, sums, *rest):
    op = _ops.update_quant_stat.default
    _check_batch(info, op._schema.name)
    stat_dims = [in_dims[0]] + list(in_dims[1] or [None] * len(sums))
    if len({d is None for d in stat_dims}) > 1:
        raise ValueError(f"qwix: vmap of qwix::update_quant_stat with count and sums batched differently (in_dims "
                         f"{stat_dims}): batch all of them (a statistic per sample) or none (shared)")
    return _loop(op, info, in_dims, (count, sums) + rest)


for _name in ("calibrate", "compute_scale", "srq_scale"):
    torch.library.register_vmap(getattr(_ops, _name).default, _loop_rule(getattr(_ops, _name).default))
torch.library.register_vmap(_ops.update_quant_stat.default, _update_quant_stat_rule)


# ------------------------------------------------------------------------------------------------
# The fake-quant ops: the whole batch at once
# ------------------------------------------------------------------------------------------------


def _flag(positional, kwargs, name, default):
    """The ops' last argument (clip_gradient or with_mask), passed by position or by name, or its default."""
    return positional[0] if positional else kwargs.get(name, default)


def _sample_size(x, bdim):
    """(rank, numel) of one sample of x."""
    if bdim is None:
        return x.dim(), x.numel()
    return x.dim() - 1, x.numel() // x.shape[bdim]


def _must_loop(qtype, masked, numel):
    """nvfp4 (its tensor scale is per sample, not a channel) and masks whose samples end inside a byte run the
    loop (so does the benchmark's switch)."""
    return qtype == "nvfp4" or (masked and numel % 8 != 0) or _FORCE_LOOP


def _batched_x(x, bdim, batch_size, masked):
    """x with the batch at axis 0; row-major when a mask is made (the masks' order under vmap), else as it is
    (the kernels read any layout: no copy)."""
    x = x.movedim(bdim, 0) if bdim is not None else x.expand(batch_size, *x.shape)
    return x.contiguous() if masked else x


def _shifted(axes, rank):
    """Axes of a sample as axes of the batch (None when one is out of range: the op's own check reports it)."""
    if any(not -rank <= a < rank for a in axes):
        return None
    return [a % rank + 1 for a in axes]


def _group_axes(qtype, ch, tiled, tiles, rank):
    """(channelwise, tiled) axes for the batch, the batch axis channelwise; None: run the loop (MX formats of
    0-d samples, where the batch axis would be the blocked last axis; arguments the op refuses)."""
    if (qtype in ("mxfp8", "mxfp4") and rank == 0) or len(tiled) != len(tiles):
        return None
    ch1, tiled1 = _shifted(ch, rank), _shifted(tiled, rank)
    if ch1 is None or tiled1 is None:
        return None
    return [0] + ch1, tiled1


def _batch_result(out, with_mask_output, masked, batch_size, numel):
    """The op's output for the batch as vmap's (output, out_dims): a whole-batch mask as per-sample masks
    (each sample fills numel / 8 bytes), an empty one per sample too."""
    if not with_mask_output:
        return out, 0
    y, mask = out
    mask = mask.reshape(batch_size, numel // 8) if masked else mask.expand(batch_size, 0)
    return (y, mask), (0, 0)


def _fake_quant_rule(with_mask_output):
    op = _ops.fake_quant_forward.default if with_mask_output else _ops.fake_quant.default

    # (the schemas' defaults: the vmap rule gets the arguments as they were passed)
    def rule(info, in_dims, x, qtype, calibration_method="absmax", channelwise_axes=(), tiled_axes=(), tile_sizes=(),
             *flag, **kwargs):
        _check_batch(info, op._schema.name)
        flag = _flag(flag, kwargs, "with_mask" if with_mask_output else "clip_gradient", None)
        args = (x, qtype, calibration_method, list(channelwise_axes), list(tiled_axes), list(tile_sizes), flag)
        x_dim = in_dims[0]
        rank, numel = _sample_size(x, x_dim)
        masked = with_mask_output and bool(flag)
        axes = _group_axes(qtype, args[3], args[4], args[5], rank)
        if axes is None or _must_loop(qtype, masked, numel):
            return _loop(op, info, (x_dim,) + (None,) * 6, args, dense=(0,) if masked else ())
        xb = _batched_x(x, x_dim, info.batch_size, masked)
        out = op(xb, qtype, calibration_method, axes[0], axes[1], args[5], flag)
        return _batch_result(out, with_mask_output, masked, info.batch_size, numel)

    return rule


def _batched_param(p, pdim, rank, batch_size):
    """A scale or zero point for the batch: shared ones broadcast as they are (right-aligned), per-sample ones
    get the batch axis in front, right-aligned to the sample's rank."""
    if p is None or pdim is None:
        return p
    p = p.movedim(pdim, 0)
    return p.reshape(batch_size, *([1] * (rank - (p.dim() - 1))), *p.shape[1:])


def _with_scale_rule(with_mask_output):
    op = _ops.fake_quant_with_scale_forward.default if with_mask_output else _ops.fake_quant_with_scale.default

    def rule(info, in_dims, x, scale, zero_point, qtype, *flag, **kwargs):
        _check_batch(info, op._schema.name)
        flag = _flag(flag, kwargs, "with_mask" if with_mask_output else "clip_gradient", False)
        x_dim, s_dim, z_dim = in_dims[:3]
        rank, numel = _sample_size(x, x_dim)
        masked = with_mask_output and bool(flag)
        # a parameter with more dims than the sample: the op's own error, from the loop
        params_fit = all(p is None or p.dim() - (d is not None) <= rank
                         for p, d in ((scale, s_dim), (zero_point, z_dim)))
        if not params_fit or _must_loop(qtype, masked, numel):
            return _loop(op, info, (x_dim, s_dim, z_dim, None, None), (x, scale, zero_point, qtype, flag),
                         dense=(0,) if masked else ())
        if zero_point is not None and (s_dim is None) != (z_dim is None):  # the op wants them the same shape
            if s_dim is None:
                scale, s_dim = scale.expand(info.batch_size, *scale.shape), 0
            else:
                zero_point, z_dim = zero_point.expand(info.batch_size, *zero_point.shape), 0
        out = op(_batched_x(x, x_dim, info.batch_size, masked), _batched_param(scale, s_dim, rank, info.batch_size),
                 _batched_param(zero_point, z_dim, rank, info.batch_size), qtype, flag)
        return _batch_result(out, with_mask_output, masked, info.batch_size, numel)

    return rule


def _dense(t):
    """Non-overlapping and dense (strides a permutation of a contiguous layout)."""
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _backward_rule(info, in_dims, grad, mask):
    """grad * unpack(mask) per sample. Masks made under vmap are per sample, row-major; a mask shared by every
    sample (made outside vmap: a weight's) is in the order the autograd node laid each sample's gradient out."""
    op = _ops.fake_quant_backward.default
    _check_batch(info, op._schema.name)
    g_dim, m_dim = in_dims
    if g_dim is None or _FORCE_LOOP:  # (a shared gradient meets per-sample masks: read row-major, as they are)
        return _loop(op, info, in_dims, (grad, mask), dense=(0,) if m_dim is not None else ())
    g = grad.movedim(g_dim, 0)
    numel = g[0].numel()
    if m_dim is not None:
        m = mask.movedim(m_dim, 0)
        if numel % 8 == 0:
            return op(g.contiguous(), m.reshape(-1)), 0
        return _loop(op, info, (0, 0), (g, m), dense=(0,))
    if numel % 8 == 0 and _dense(g) and (g.shape[0] == 1 or g.stride(0) == numel):
        return op(g, mask.repeat(info.batch_size)), 0  # batch outermost: each sample in its own order
    return _loop(op, info, (0, None), (g, mask))


torch.library.register_vmap(_ops.fake_quant.default, _fake_quant_rule(False))
torch.library.register_vmap(_ops.fake_quant_forward.default, _fake_quant_rule(True))
torch.library.register_vmap(_ops.fake_quant_with_scale.default, _with_scale_rule(False))
torch.library.register_vmap(_ops.fake_quant_with_scale_forward.default, _with_scale_rule(True))
torch.library.register_vmap(_ops.fake_quant_backward.default, _backward_rule)
