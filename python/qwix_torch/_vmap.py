"""vmap rules for the qwix ops that return a list or mutate (PyTorch's loop fallback handles neither).

Each rule runs the op once per sample, as ``torch.vmap`` means: per-sample calibrations and scales, and an
SRQ statistic update per sample (``count`` grows by the batch size, as a loop of single-sample forwards).
The other ops (``fake_quant``, ``fake_quant_with_scale``, their ``*_forward`` and the backward) take
PyTorch's own loop fallback.
"""
import torch


def _sample(arg, dim, i):
    if dim is None:
        return arg
    if isinstance(arg, (list, tuple)):
        return [a if d is None else a.select(d, i) for a, d in zip(arg, dim)]
    return arg.select(dim, i)


def _per_sample(op):
    name = op._schema.name

    def rule(info, in_dims, *args):
        if info.batch_size == 0:
            raise ValueError(f"qwix: vmap of {name} over a batch of size 0: there is no sample to run it on")
        if name == "qwix::update_quant_stat":
            stat_dims = [in_dims[0]] + list(in_dims[1] or [None] * len(args[1]))
            if len({d is None for d in stat_dims}) > 1:
                raise ValueError(f"qwix: vmap of {name} with count and sums batched differently (in_dims "
                                 f"{stat_dims}): batch all of them (a statistic per sample) or none (shared)")
        outs = [op(*(_sample(a, d, i) for a, d in zip(args, in_dims))) for i in range(info.batch_size)]
        if outs[0] is None:  # update_quant_stat: it mutated its (per-sample or shared) statistics
            return None, None
        stacked = [torch.stack(ts) for ts in zip(*outs)]
        return stacked, [0] * len(stacked)

    return rule


for _name in ("calibrate", "compute_scale", "srq_scale", "update_quant_stat"):
    _op = getattr(torch.ops.qwix, _name).default
    torch.library.register_vmap(_op, _per_sample(_op))
