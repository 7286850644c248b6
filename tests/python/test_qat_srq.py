"""SRQ (act_static_scale=True): QuantStat names, shapes and counts, update-before-read, the
dynamic scale while count is 0, when updates happen, standalone calibrate, asymmetric
statistics and the straight-through gradient of static scales."""
import collections

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _helpers import assert_same
from reference import div32, ref_calibrate, ref_compute_scale, ref_fake_quant, ref_fake_quant_with_scale
from test_qat_models import MLP, TransformerBlock

import qwix_torch as qwix
from qwix_torch import QatProvider, QuantizationRule, QuantStat


def srq(**kw):
    kw.setdefault("act_qtype", "int8")
    return QatProvider([QuantizationRule(act_static_scale=True, **kw)])


def static_fq(x, stat: QuantStat, qtype="int8", channelwise_axes=(0,)):
    """The reference static fake quant from a QuantStat's current sums and count."""
    count = int(stat.count)
    if count == 0:
        return ref_fake_quant(x, qtype, "absmax" if stat.symmetric else "minmax", channelwise_axes)
    avg = [div32(s, float(count)) for s in stat.sums]
    cal = {"absmax": avg[0]} if stat.symmetric else {"min": avg[0], "max": avg[1]}
    scale, zp = ref_compute_scale(cal, qtype)
    return ref_fake_quant_with_scale(x, scale, qtype, zp)


def test_names_shapes_and_creation_without_updates():
    torch.manual_seed(0)
    m, x = TransformerBlock(), torch.randn(2, 6, 16)
    rules = [QuantizationRule(module_path="attn", act_qtype="int8", act_static_scale=True),
             QuantizationRule(module_path=r"fc\d|attn\.qkv", weight_qtype="int8", act_qtype="int8",
                              act_static_scale=True)]
    q = qwix.quantize_model(m, QatProvider(rules), x)
    q.train()  # the example forward updates nothing, whatever the mode
    stats = {n: s for n, s in q.named_modules() if isinstance(s, QuantStat)}
    shapes = {n: tuple(s.sum_of_absmax.shape) for n, s in stats.items()}
    assert shapes == {
        "attn.qkv.linear0_lhs": (1, 6, 1),  # [B, T, in]: per token, averaged over the batch
        "attn.einsum0_lhs": (1, 2, 6, 1),  # q [B, h, T, d]: all non-contracting axes
        "attn.einsum0_rhs": (1, 2, 6, 1),
        "attn.matmul0_lhs": (1, 2, 6, 1),  # softmax [B, h, T, T]
        "attn.matmul0_rhs": (1, 2, 1, 8),  # v [B, h, T, d]: contracting axis -2
        "fc1.linear0_lhs": (1, 6, 1),
        "fc2.linear0_lhs": (1, 6, 1),
    }
    assert all(int(s.count) == 0 and s.count.dtype == torch.int32 and s.count.dim() == 0 for s in stats.values())
    assert all(not s.sum_of_absmax.any() and s.sum_of_absmax.dtype == torch.float32 for s in stats.values())
    assert isinstance(q.attn.qkv.linear0_lhs, QuantStat)
    assert "QuantStat(count=0, sum_of_absmax=<float32 [1, 6, 1]>)" == repr(q.fc1.linear0_lhs)
    assert all(not k.endswith("_rhs") for k in stats if "fc" in k)  # weights have no statistics


def test_op_ids_count_per_module_in_call_order():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.randn(8, 8))
            self.b = nn.Parameter(torch.randn(4, 8))

        def forward(self, x):
            h = F.linear(x, self.a)
            h = h @ h.t()
            return F.linear(h @ x, self.b)

    q = qwix.quantize_model(Two(), srq(), torch.randn(3, 8))
    names = [n for n, _ in q.named_children()]
    assert names == ["linear0_lhs", "matmul0_lhs", "matmul0_rhs", "matmul1_lhs", "matmul1_rhs", "linear1_lhs"]
    assert tuple(q.matmul0_rhs.sum_of_absmax.shape) == (1, 3)  # h.t() [8->3 cols]: per column, batch axis 0 averaged
    assert tuple(q.linear1_lhs.sum_of_absmax.shape) == (1, 1)


def test_update_before_read_and_average():
    torch.manual_seed(0)
    m = MLP()
    batches = [torch.randn(4, 16) * s for s in (1.0, 3.0, 0.5)]
    q = qwix.quantize_model(m, srq(weight_qtype="int8"), batches[0])
    q.train()
    expected_sum = torch.zeros(1, 1)
    for i, x in enumerate(batches):
        y = q(x)
        stat = q.fc1.linear0_lhs
        assert int(stat.count) == i + 1
        expected_sum = expected_sum + ref_calibrate(x, "absmax", (0,))["absmax"].mean(0, keepdim=True)
        torch.testing.assert_close(stat.sum_of_absmax, expected_sum, rtol=1e-6, atol=0)
        # The forward read the statistics after adding this batch.
        h = torch.relu(F.linear(static_fq(x, stat), ref_fake_quant(m.fc1.weight, "int8", "absmax", (0,)), m.fc1.bias))
        ref = F.linear(static_fq(h, q.fc2.linear0_lhs), ref_fake_quant(m.fc2.weight, "int8", "absmax", (0,)),
                       m.fc2.bias)
        assert_same(y, ref, f"step {i}")
    assert_same(q.fc1.linear0_lhs.average()["absmax"], div32(q.fc1.linear0_lhs.sum_of_absmax, 3.0), "average")


def test_dynamic_while_count_is_zero_and_eval_reads_only():
    torch.manual_seed(0)
    m, x = MLP(), torch.randn(4, 16)
    q = qwix.quantize_model(m, srq(), x)
    q.eval()
    h = torch.relu(F.linear(ref_fake_quant(x, "int8", "absmax", (0,)), m.fc1.weight, m.fc1.bias))
    ref = F.linear(ref_fake_quant(h, "int8", "absmax", (0,)), m.fc2.weight, m.fc2.bias)
    assert_same(q(x), ref, "count 0: dynamic per token")
    assert int(q.fc1.linear0_lhs.count) == 0
    q.train()
    q(x * 2)
    q.eval()
    before = q.fc1.linear0_lhs.sum_of_absmax.clone()
    y = q(x)
    assert int(q.fc1.linear0_lhs.count) == 1 and torch.equal(q.fc1.linear0_lhs.sum_of_absmax, before)
    h = torch.relu(F.linear(static_fq(x, q.fc1.linear0_lhs), m.fc1.weight, m.fc1.bias))
    assert_same(y, F.linear(static_fq(h, q.fc2.linear0_lhs), m.fc2.weight, m.fc2.bias), "eval: static")


def test_set_quant_stats_update():
    torch.manual_seed(0)
    q = qwix.quantize_model(MLP(), srq(), torch.randn(2, 16))
    q.train()
    q(torch.randn(2, 16))
    qwix.set_quant_stats_update(q, False)
    q(torch.randn(2, 16))
    assert int(q.fc1.linear0_lhs.count) == 1
    qwix.set_quant_stats_update(q, True)
    q(torch.randn(2, 16))
    assert int(q.fc1.linear0_lhs.count) == 2
    with pytest.raises(ValueError, match="quantize_model"):
        qwix.set_quant_stats_update(MLP(), False)
    qwix.set_quant_stats_update(q.fc1, False)  # a subtree only, as on the TorchScript path
    q(torch.randn(2, 16))
    assert int(q.fc1.linear0_lhs.count) == 2 and int(q.fc2.linear0_lhs.count) == 3
    qwix.set_quant_stats_update(nn.Sequential(q), False)  # a container (or DDP) around the QAT model
    q(torch.randn(2, 16))
    assert int(q.fc2.linear0_lhs.count) == 3
    ts = qwix.quantize_model(torch.jit.script(MLP()), srq(), torch.randn(2, 16))
    qwix.set_quant_stats_update(ts.fc1, False)
    ts(torch.randn(2, 16))
    assert int(ts.fc1.linear0_lhs.count) == 0 and int(ts.fc2.linear0_lhs.count) == 1


class DropMLP(MLP):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def test_calibrate():
    torch.manual_seed(0)
    m = DropMLP()
    batches = [torch.randn(4, 16) for _ in range(5)]
    q = qwix.quantize_model(m, srq(module_path="fc2"), batches[0])
    q.train()
    q.fc2.eval()  # a mixed state is restored as it was
    out = qwix.calibrate(q, batches, progress=False)
    assert out is q
    assert q.training and q.fc1.training and not q.fc2.training and q.drop.training
    assert int(q.fc2.linear0_lhs.count) == 5
    # Dropout was off: fc2's statistics are those of the eval-mode activations.
    exp = sum(ref_calibrate(torch.relu(m.fc1(x)), "absmax", (0,))["absmax"].mean(0, keepdim=True) for x in batches)
    torch.testing.assert_close(q.fc2.linear0_lhs.sum_of_absmax, exp.detach(), rtol=1e-5, atol=0)
    assert all(p.grad is None for p in q.parameters())
    # Updates are forced on even when disabled; tuples, mappings (a dict, HF's BatchEncoding is a UserDict) and
    # generators are accepted.
    qwix.set_quant_stats_update(q, False)
    qwix.calibrate(q, ((x,) for x in batches[:2]), progress=False)
    qwix.calibrate(q, [{"x": batches[0]}, collections.UserDict(x=batches[1])], progress=True)
    assert int(q.fc2.linear0_lhs.count) == 9
    q(batches[0])
    assert int(q.fc2.linear0_lhs.count) == 9  # disabled again after calibrate
    with pytest.raises(ValueError, match="quantize_model"):
        qwix.calibrate(MLP(), batches)


def test_calibrate_restores_modes_on_error():
    q = qwix.quantize_model(MLP(), srq(), torch.randn(2, 16))
    q.train()
    with pytest.raises(RuntimeError):
        qwix.calibrate(q, [torch.randn(2, 16), torch.randn(2, 5)], progress=False)
    assert q.training and q.fc1.training
    assert int(q.fc1.linear0_lhs.count) == 2  # the second batch updated fc1 before its linear failed


def test_minmax_statistics_uint8():
    torch.manual_seed(0)
    m, x = MLP(), torch.randn(4, 16) + 0.5
    q = qwix.quantize_model(m, srq(act_qtype="uint8", act_calibration_method="minmax"), x)
    stat = q.fc1.linear0_lhs
    assert not stat.symmetric and not hasattr(stat, "sum_of_absmax")
    assert tuple(stat.sum_of_min.shape) == (1, 1) and tuple(stat.sum_of_max.shape) == (1, 1)
    q.train()
    y = q(x)
    cal = ref_calibrate(x, "minmax", (0,))
    torch.testing.assert_close(stat.sum_of_min, cal["min"].mean(0, keepdim=True), rtol=1e-6, atol=0)
    torch.testing.assert_close(stat.sum_of_max, cal["max"].mean(0, keepdim=True), rtol=1e-6, atol=0)
    h = torch.relu(F.linear(static_fq(x, stat, "uint8"), m.fc1.weight, m.fc1.bias))
    assert_same(y, F.linear(static_fq(h, q.fc2.linear0_lhs, "uint8"), m.fc2.weight, m.fc2.bias), "minmax")


def test_batch_axes_and_tiles():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    q = qwix.quantize_model(MLP(), srq(act_batch_axes=(0, 1)), x)
    assert tuple(q.fc1.linear0_lhs.sum_of_absmax.shape) == (1, 1, 1)
    q = qwix.quantize_model(MLP(), srq(tile_size=4), x)
    assert tuple(q.fc1.linear0_lhs.sum_of_absmax.shape) == (1, 5, 4)
    assert tuple(q.fc2.linear0_lhs.sum_of_absmax.shape) == (1, 5, 8)
    q.train()
    q(x)
    with pytest.raises(ValueError, match="act_batch_axes"):
        qwix.quantize_model(MLP(), srq(act_batch_axes=(3,)), torch.randn(2, 16))


def test_lazy_creation_and_shape_mismatch():
    torch.manual_seed(0)
    q = qwix.quantize_model(MLP(), srq())  # no example inputs: created at the first forward
    assert not hasattr(q.fc1, "linear0_lhs")
    q.train()
    q(torch.randn(2, 5, 16))
    assert int(q.fc1.linear0_lhs.count) == 1 and tuple(q.fc1.linear0_lhs.sum_of_absmax.shape) == (1, 5, 1)
    with pytest.raises(ValueError, match="shape"):
        q(torch.randn(2, 6, 16))  # per-token statistics are tied to the sequence length


@pytest.mark.parametrize("path", ["python", "torchscript"])
@pytest.mark.parametrize("rule", [dict(), dict(act_calibration_method="minmax", act_qtype="uint8")])
def test_an_empty_batch_adds_nothing(path, rule):
    # An op that gets no tokens (an MoE expert, a detection head without proposals): averaging its empty
    # calibration gave NaN sums for good (and per-tensor ones a 0 with count + 1).
    torch.manual_seed(0)
    q = qwix.quantize_model(MLP() if path == "python" else torch.jit.script(MLP()), srq(**rule), torch.randn(4, 16))
    q.train()
    x = torch.randn(4, 16)
    q(x)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    assert q(torch.randn(0, 16)).shape == (0, 4)
    qwix.calibrate(q, [torch.randn(0, 16)], progress=False)
    for k, v in q.state_dict().items():
        assert_same(v, before[k], k)
    q.eval()
    assert torch.isfinite(q(x)).all()


@pytest.mark.parametrize("path", ["python", "torchscript"])
def test_a_non_finite_batch_is_left_out_of_the_statistics(path):
    # An fp16 overflow step (GradScaler skips its optimizer step) must not make every later scale NaN.
    torch.manual_seed(0)
    rule = dict(act_calibration_method="minmax", act_qtype="uint8")
    q = qwix.quantize_model(MLP() if path == "python" else torch.jit.script(MLP()), srq(**rule), torch.randn(4, 16))
    q.train()
    q(torch.randn(4, 16))
    before = {k: v.clone() for k, v in q.state_dict().items() if "fc1.linear0_lhs" in k}
    x = torch.randn(4, 16)
    x[1, 3] = float("inf")
    assert torch.isfinite(q(x)).all()  # the Inf clamps to the grid of the statistics' scale
    for k, v in before.items():
        assert_same(q.state_dict()[k], v, k)  # fc1 saw the Inf: left out (fc2 saw finite values)
    assert int(q.fc2.linear0_lhs.count) == 2
    q(torch.randn(4, 16))
    assert int(q.fc1.linear0_lhs.count) == 2 and torch.isfinite(q.fc1.linear0_lhs.sum_of_max).all()


def test_statistics_created_under_inference_mode_update_later():
    q = qwix.quantize_model(MLP(), srq())  # created at the first forward, here under inference_mode
    q.eval()
    with torch.inference_mode():
        q(torch.randn(2, 16))
    q.train()
    q(torch.randn(2, 16))
    assert int(q.fc1.linear0_lhs.count) == 1 and not q.fc1.linear0_lhs.count.is_inference()


def test_static_gradient_identity_unless_clip_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    for clip in (None, True):
        q = qwix.quantize_model(lin, srq(clip_gradient=clip), torch.randn(2, 4))
        q.train()
        q(torch.ones(2, 4))  # statistics: absmax 1
        q.eval()
        x = torch.tensor([[0.5, -3.0, 2.0, 0.25]], requires_grad=True)
        q(x).sum().backward()
        expected = lin.weight.sum(0, keepdim=True).detach()
        if clip:
            expected = expected * torch.tensor([[1.0, 0.0, 0.0, 1.0]])
        assert torch.equal(x.grad, expected), (clip, x.grad, expected)


class CkptMLP(nn.Module):
    """MLP -> head, the MLP under torch.utils.checkpoint when `ckpt` is set."""

    def __init__(self, ckpt: bool, reentrant: bool = False):
        super().__init__()
        self.inner, self.head = MLP(), nn.Linear(4, 2)
        self.ckpt, self.reentrant = ckpt, reentrant

    def forward(self, x):
        if self.ckpt:
            h = torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=self.reentrant)
        else:
            h = self.inner(x)
        return self.head(h)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_updates_statistics_once(reentrant):
    """The recomputation in the backward quantizes like the first forward and does not update the
    statistics a second time: same outputs, gradients and statistics as without checkpointing."""
    torch.manual_seed(0)
    plain = CkptMLP(ckpt=False)
    ckpt = CkptMLP(ckpt=True, reentrant=reentrant)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(8, 16, requires_grad=True)  # reentrant checkpointing needs an input that requires grad
    qp, qc = (qwix.quantize_model(m, srq(), x) for m in (plain, ckpt))
    for _ in range(3):
        outs = []
        for m in (qp, qc):
            m.zero_grad()
            y = m(x)
            y.sum().backward()
            outs.append(y.detach())
        assert_same(outs[1], outs[0])
        for (n, a), (_, b) in zip(qp.named_parameters(), qc.named_parameters()):
            assert_same(b.grad, a.grad, n)
    stats_p = {n: s for n, s in qp.named_modules() if isinstance(s, QuantStat)}
    stats_c = {n: s for n, s in qc.named_modules() if isinstance(s, QuantStat)}
    assert stats_p.keys() == stats_c.keys() and len(stats_p) == 3
    for n in stats_p:
        assert int(stats_c[n].count) == 3, n
        assert_same(stats_c[n].sums[0], stats_p[n].sums[0], n)


def test_meta_device_init_then_reset_parameters():
    # to_empty leaves the statistics uninitialized and an fp checkpoint does not cover them: the usual recipe's
    # reset_parameters() zeroes them.
    torch.manual_seed(0)
    fp = MLP()
    with torch.device("meta"):
        big = MLP()
    q = qwix.quantize_model(big, srq(), torch.randn(2, 16, device="meta"))
    q.to_empty(device="cpu")
    for m in q.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    q.load_state_dict(fp.state_dict())
    assert int(q.fc1.linear0_lhs.count) == 0 and not q.fc1.linear0_lhs.sum_of_absmax.any()
    ref = qwix.quantize_model(fp, srq(), torch.randn(2, 16))
    x = torch.randn(3, 16)
    assert_same(q.eval()(x), ref.eval()(x), "a fresh QAT model")


def test_calibrate_with_a_loader_of_pairs_says_what_to_pass():
    q = qwix.quantize_model(MLP(), srq(), torch.randn(2, 16))
    pairs = [(torch.randn(2, 16), torch.tensor([0, 1]))]
    with pytest.raises(TypeError, match=r"model\(\*batch\) for a tuple batch of 2 items.*\(x for x, _ in loader\)"):
        qwix.calibrate(q, pairs, progress=False)
    qwix.calibrate(q, (x for x, _ in pairs), progress=False)
    assert int(q.fc1.linear0_lhs.count) == 1


@pytest.mark.parametrize("script", [False, True])
def test_bad_arguments_to_calibrate_and_set_quant_stats_update(script):
    model = torch.jit.script(MLP()) if script else MLP()
    q = qwix.quantize_model(model, srq(), torch.randn(2, 16))
    # A bare tensor would be iterated row by row as 2 batches of shape [16].
    with pytest.raises(TypeError, match=r"iterable of batches.*tensor of shape \[2, 16\].*pass \[x\]"):
        qwix.calibrate(q, torch.randn(2, 16), progress=False)
    assert int(q.fc1.linear0_lhs.count) == 0
    for bad in ("no", 0, None):  # bool("no") is True: a typo would leave updates on
        with pytest.raises(TypeError, match=rf"enabled must be True or False, got {bad!r}"):
            qwix.set_quant_stats_update(q, bad)
    q.train()(torch.randn(2, 16))
    assert int(q.fc1.linear0_lhs.count) == 1


def test_a_torch_compile_wrapper_is_refused_with_what_to_do():
    # An OptimizedModule ran the QAT hooks eagerly and traced (Dynamo's AssertionError "already tracked for
    # mutation"), and its `_orig_mod.` prefix would change which rules match.
    rules = srq()
    compiled = torch.compile(MLP(), backend="eager")
    with pytest.raises(TypeError, match=r"this model is a torch.compile wrapper.*quantize_model\(compiled._orig_mod"):
        qwix.quantize_model(compiled, rules, torch.randn(2, 16))
    outer = nn.Sequential(MLP())
    outer[0] = torch.compile(outer[0], backend="eager")
    with pytest.raises(TypeError, match=r"its submodule '0' is a torch.compile wrapper"):
        qwix.quantize_model(outer, rules)
    q = torch.compile(qwix.quantize_model(compiled._orig_mod, rules, torch.randn(2, 16)), backend="eager")
    q.train()(torch.randn(2, 16))
    assert int(q.fc1.linear0_lhs.count) == 1


class _SequentialWithItsOwnOp(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(8, 8), nn.ReLU())
        self.w = nn.Parameter(torch.randn(8, 4))

    def forward(self, x):
        return super().forward(x) @ self.w


def test_a_sequential_that_runs_its_own_op_passes_through_its_statistics():
    # Its matmul's QuantStat is its child, so Sequential.forward calls it (it had no forward: an error).
    torch.manual_seed(0)
    m, x = _SequentialWithItsOwnOp(), torch.randn(3, 8)
    q = qwix.quantize_model(m, QatProvider([QuantizationRule(act_qtype="int8", act_static_scale=True)]), x)
    assert isinstance(q.matmul0_lhs, QuantStat)
    q.train()
    y = q(x)

    def static_fq(t):  # after one update-before-read: the batch's mean per-token absmax
        scale, _ = ref_compute_scale({"absmax": ref_calibrate(t, "absmax", (0,))["absmax"].mean(0, keepdim=True)},
                                     "int8")
        return ref_fake_quant_with_scale(t, scale, "int8")

    h = F.relu(F.linear(static_fq(x), m[0].weight, m[0].bias))
    assert int(q.matmul0_lhs.count) == 1 and int(q[0].linear0_lhs.count) == 1
    assert_same(y, static_fq(h) @ m.w, "own op after the children")
