"""torch.compile(fullgraph=True) of QAT models: same values as eager, SRQ updates included,
gradients, and plans made at trace time when no eager forward came first."""
import copy

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_same
from reference import ref_fake_quant
from test_qat_models import MLP, TransformerBlock, ref_mlp

import qwix_torch as qwix
from qwix_torch import QatProvider, QuantizationRule


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _srq_rules():
    return [
        QuantizationRule(module_path="attn", act_qtype="int8", act_static_scale=True),
        QuantizationRule(module_path=r".*(qkv|proj)", weight_qtype="int4", act_qtype="uint8",
                         act_calibration_method="minmax", act_static_scale=True, tile_size=8),
        QuantizationRule(module_path=r"fc\d", weight_qtype="int8", act_qtype="int8"),
    ]


def test_srq_training_under_compile_matches_eager():
    torch.manual_seed(0)
    m, x = TransformerBlock(), torch.randn(2, 6, 16)
    eager = qwix.quantize_model(m, QatProvider(_srq_rules()), x)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
    opt_c = torch.optim.SGD(compiled_model.parameters(), lr=0.05)
    eager.train()
    compiled_model.train()
    for step in range(3):
        xb = torch.randn(2, 6, 16) * (step + 1)
        for model, opt in ((eager, opt_e), (compiled, opt_c)):
            opt.zero_grad()
            F.mse_loss(model(xb), xb).backward()
            opt.step()
    for (n, a), (_, b) in zip(eager.state_dict().items(), compiled_model.state_dict().items()):
        assert_same(b, a, n)
    assert int(compiled_model.attn.matmul0_rhs.count) == 3
    assert int(compiled_model.attn.qkv.linear0_lhs.count) == 3
    # eval: reads only
    eager.eval()
    compiled_model.eval()
    assert_same(compiled(x), eager(x), "eval")
    assert int(compiled_model.attn.matmul0_rhs.count) == 3


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_training_step(backend):
    torch.manual_seed(0)
    m, x = TransformerBlock(), torch.randn(2, 6, 16)
    q = qwix.quantize_model(m, QatProvider(_srq_rules()), x)
    ref = copy.deepcopy(q)
    q.train()
    ref.train()
    compiled = torch.compile(q, fullgraph=True, backend=backend)
    y = compiled(x)
    y.sum().backward()
    y_ref = ref(x)
    y_ref.sum().backward()
    assert int(q.attn.einsum0_lhs.count) == 1
    if backend == "aot_eager":  # the captured forward and backward graphs on eager kernels: bit-exact
        assert torch.equal(y, y_ref) and torch.equal(q.fc1.weight.grad, ref.fc1.weight.grad)
        for (name, b), b_ref in zip(q.named_buffers(), ref.buffers()):
            assert torch.equal(b, b_ref), name
        return
    # inductor fuses the layer norm and the softmax, whose last bits differ from eager's; a fake quant then
    # lands one grid step away now and then (torch 2.11: 14 of 192 outputs, by up to 2.2e-3; 2.13: none).
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-2)
    assert ((y - y_ref).abs() > 1e-4).float().mean() < 0.2
    torch.testing.assert_close(q.fc1.weight.grad, ref.fc1.weight.grad, rtol=0, atol=0.05)
    torch.testing.assert_close(q.attn.einsum0_lhs.sum_of_absmax, ref.attn.einsum0_lhs.sum_of_absmax)


def test_plans_made_at_trace_time_and_rules_marked_used():
    torch.manual_seed(0)
    m, x = MLP(), torch.randn(4, 16)
    used = QuantizationRule(module_path="fc.", weight_qtype="int8", act_qtype="int8")
    unused = QuantizationRule(module_path="nothing", weight_qtype="int8")
    p = QatProvider([used, unused])
    q = qwix.quantize_model(m, p)  # no example inputs: nothing planned yet
    assert p.get_unused_rules() == [used, unused]
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    assert_same(compiled(x), ref_mlp(m, x), "compiled without an eager forward")
    assert p.get_unused_rules() == [unused]


def test_missing_quant_stat_inside_compile_is_a_clear_error():
    q = qwix.quantize_model(MLP(), QatProvider([QuantizationRule(act_qtype="int8", act_static_scale=True)]))
    with pytest.raises(Exception, match="example inputs"):
        torch.compile(q, fullgraph=True, backend="aot_eager")(torch.randn(2, 16))


def test_compiled_set_quant_stats_update_and_calibrate():
    torch.manual_seed(0)
    q = qwix.quantize_model(MLP(), QatProvider([QuantizationRule(act_qtype="int8", act_static_scale=True)]),
                            torch.randn(2, 16))
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    q.train()
    compiled(torch.randn(2, 16))
    qwix.set_quant_stats_update(q, False)
    compiled(torch.randn(2, 16))
    assert int(q.fc1.linear0_lhs.count) == 1
    qwix.calibrate(compiled, [torch.randn(2, 16)] * 2, progress=False)
    assert int(q.fc1.linear0_lhs.count) == 3 and q.training


class _Unflatten(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(x).unflatten(-1, (2, 8)).sum(-1)  # Tensor.unflatten: Python ending in super()


def test_tensor_unflatten_under_the_mode_compiles():
    # Dynamo (torch 2.13) cannot trace Tensor.unflatten's super() call when a mode dispatched it
    # (pytorch/pytorch#179853); the mode calls torch.unflatten instead. nn.MultiheadAttention needs it.
    torch.manual_seed(0)
    m, x = _Unflatten(), torch.randn(3, 16)
    q = qwix.quantize_model(m, QatProvider([QuantizationRule(weight_qtype="int8", act_qtype="int8")]), x)
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    assert_same(compiled(x), q(x), "unflatten")
    ref = F.linear(ref_fake_quant(x, "int8", "absmax", (0,)), ref_fake_quant(m.fc.weight, "int8", "absmax", (0,)),
                   m.fc.bias)
    assert_same(q(x), ref.unflatten(-1, (2, 8)).sum(-1), "reference")


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_python_backends_do_not_quantize_twice(backend):
    # Dynamo runs the graph under the QAT mode (the root's pre-hook runs eagerly); a backend that runs
    # the FX graph in Python must not hand its calls to the mode again.
    from test_qat_models import TorchAttention

    torch.manual_seed(0)
    for model, args, rules in [
        (TransformerBlock(), (torch.randn(2, 6, 16),), _srq_rules()),
        (TorchAttention(), (torch.randn(2, 5, 16), True, torch.triu(torch.full((5, 5), float("-inf")), 1)),
         [QuantizationRule(weight_qtype="int8", act_qtype="int8")]),
    ]:
        q = qwix.quantize_model(model, QatProvider(rules), *args)
        q.eval()  # statistics frozen: eager and compiled see the same scales
        compiled = torch.compile(q, fullgraph=True, backend=backend)
        assert_same(compiled(*args), q(*args), f"{type(model).__name__} {backend}")


def test_inductor_extern_kernels_are_not_quantized_again():
    # Inductor's compiled code calls extern_kernels.mm / bmm / addmm, i.e. torch.mm(a, b, out=buf), while the
    # QAT mode is on the stack: out= calls pass through (they have no autograd, so no QAT model makes them).
    from test_qat_models import MmBlock

    torch.manual_seed(0)
    m, x = MmBlock(), torch.randn(2, 3, 16)
    rules = [QuantizationRule(weight_qtype="int8", act_qtype="int8", act_static_scale=True)]
    eager = qwix.quantize_model(m, QatProvider(rules), x)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    for _ in range(2):
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)
    for (n, a), (_, b) in zip(eager.named_buffers(), compiled_model.named_buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=0, msg=n)  # each statistic updated once per forward

    class OutMm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(16, 4))

        def forward(self, x):
            out = torch.empty(x.size(0), 4)
            return torch.mm(x, self.w, out=out)

    q = qwix.quantize_model(OutMm(), QatProvider(rules))
    with torch.no_grad():
        assert_same(q(x[0]), x[0] @ q.w, "out= passes through")
        ts = qwix.jit_quantize_model(torch.jit.script(OutMm()), QatProvider(rules), x[0])
        assert_same(ts(x[0]), x[0] @ ts.w, "TorchScript: aten::mm.out passes through too")


def test_torch_export_eval_and_srq_training():
    # torch.export: the QAT ops appear in the graph as torch.ops.qwix.*; the SRQ update is an in-place op on
    # the statistics buffers, which run_decompositions functionalizes into buffer mutations.
    torch.manual_seed(0)
    m, x = TransformerBlock(), torch.randn(2, 6, 16)
    q = qwix.quantize_model(m, QatProvider(_srq_rules()), x)
    q.eval()
    ep = torch.export.export(q, (x,))
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"qwix.fake_quant.default", "qwix.fake_quant_with_scale.default"} <= ops, ops
    assert_same(ep.module()(x), q(x), "exported eval")

    q.train()
    ref = copy.deepcopy(q)
    ep = torch.export.export(q, (x,)).run_decompositions()
    assert int(q.attn.qkv.linear0_lhs.count) == 0  # exporting ran no real update
    mutated = set(ep.graph_signature.buffers_to_mutate.values())
    assert {"attn.qkv.linear0_lhs.count", "attn.qkv.linear0_lhs.sum_of_min", "attn.matmul0_rhs.count"} <= mutated
    exported = ep.module()  # shares q's parameters and buffers, as torch.export does
    for step in range(2):
        xb = torch.randn(2, 6, 16) * (step + 2)
        assert_same(exported(xb), ref(xb), f"exported training step {step}")
    for (n, a), (_, b) in zip(ref.named_buffers(), exported.named_buffers()):
        assert_same(b, a, n)
    assert int(exported.attn.qkv.linear0_lhs.count) == 2


def test_update_quant_stat_with_dynamic_shapes():
    # Its shape check compared concrete sizes, which a symbolic (dynamic=True) statistic does not have.
    def update(count, sums, cal):
        torch.ops.qwix.update_quant_stat(count, [sums], [cal], [0], 1)
        return sums + 0

    compiled = torch.compile(update, fullgraph=True, dynamic=True)
    for width in (8, 12):
        count, cal = torch.tensor(0, dtype=torch.int32), torch.rand(4, width)
        assert_same(compiled(count, torch.zeros(1, width), cal), cal.mean(0, keepdim=True), f"width {width}")
        assert int(count) == 1


def test_srq_with_dynamic_shapes_compiles_once_and_exports_with_dims():
    # srq_scale's kernel read concrete sizes: every new batch size (or sequence length, with act_batch_axes
    # covering it) recompiled, and fullgraph failed at the recompile limit; torch.export with a Dim failed.
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    rules = [QuantizationRule(weight_qtype="int8", act_qtype="int8", act_static_scale=True, act_batch_axes=(0, 1))]
    eager = qwix.quantize_model(MLP(), QatProvider(rules), torch.randn(2, 3, 16)).train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=True, backend="aot_eager")
    counters.clear()
    for b, t in [(2, 3), (3, 5), (4, 7), (5, 9)]:
        x = torch.randn(b, t, 16)
        assert_same(compiled(x), eager(x), f"[{b}, {t}]")
    assert counters["stats"]["unique_graphs"] == 1
    assert int(compiled_model.fc1.linear0_lhs.count) == 4
    eager.eval()
    batch = torch.export.Dim("batch", min=2)
    ep = torch.export.export(eager, (torch.randn(2, 3, 16),), dynamic_shapes=({0: batch},))
    x = torch.randn(6, 3, 16)
    assert_same(ep.module()(x), eager(x), "exported with a dynamic batch")


class _Routed(torch.nn.Module):
    """An expert that gets a data-dependent number of tokens (MoE routing)."""

    def __init__(self):
        super().__init__()
        self.expert = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.expert(x[x[:, 0] > 0]).sum(0)


def test_srq_with_a_data_dependent_token_count_compiles():
    torch.manual_seed(0)
    rules = [QuantizationRule(weight_qtype="int8", act_qtype="int8", act_static_scale=True)]
    eager = qwix.quantize_model(_Routed(), QatProvider(rules), torch.randn(6, 8)).train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    # (config.patch: monkeypatch's undo left the option hidden, and later compiles failed reading it)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        for x in (torch.randn(6, 8), torch.randn(6, 8), -torch.ones(6, 8)):  # the last routes no token
            assert_same(compiled(x), eager(x))
    assert int(compiled_model.expert.linear0_lhs.count) == int(eager.expert.linear0_lhs.count) == 2
    assert_same(compiled_model.expert.linear0_lhs.sum_of_absmax, eager.expert.linear0_lhs.sum_of_absmax)


@pytest.mark.parametrize("method", ["absmax,0.8", "absmax"])
def test_gradient_compiles_once_with_dynamic_shapes(method):
    # The straight-through backward keeps the mask's memory order as symbolic strides: no guard on sizes.
    from torch._dynamo.utils import counters
    from reference import ref_grad_mask
    from _helpers import make_input

    def f(x):
        return qwix.fake_quant(x, "int8", calibration_method=method, channelwise_axes=(0,))

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    counters.clear()
    for n in (3, 5, 7, 9):
        x, g = make_input((n, 16), n).requires_grad_(), make_input((n, 16), n + 1)
        y = compiled(x)
        y.backward(g)
        assert_same(y, f(x), f"n={n}")
        mask = ref_grad_mask(x.detach(), "int8", method, (0,))
        assert_same(x.grad, torch.where(mask, g, torch.zeros_like(g)), f"n={n} gradient")
    assert counters["stats"]["unique_graphs"] == 1


@torch.compiler.disable
def _eager_call(module, x):
    return module(x)


class _SubWithEagerCall(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.fc2 = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        return _eager_call(self.fc2, self.fc(x))  # a graph break that calls a submodule eagerly


class _WithSub(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.sub = _SubWithEagerCall()

    def forward(self, x):
        return self.sub(x)


def test_a_submodule_called_eagerly_inside_compiled_code_is_quantized_once():
    # Its frame went onto this thread's eager run while the compiled forward's mode (innermost) attributed its
    # linear to `sub`; under regional compilation the eager root's mode quantized it a second time.
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    rules = [QuantizationRule(module_path="sub.fc2", weight_qtype="int8"),
             QuantizationRule(weight_qtype="int2", act_qtype="int2")]
    for regional in (False, True):
        q = qwix.quantize_model(_WithSub(), QatProvider(rules), x)
        with torch.no_grad():
            eager = q(x)
            if regional:
                q.sub.compile(backend="eager")
                compiled = q(x)
            else:
                compiled = torch.compile(q, backend="eager")(x)
        assert_same(compiled, eager, f"regional={regional}")
        state = q._qwix_state
        assert not state.traced.stack and not state.local.run.stack
        assert not torch.overrides._get_current_function_mode_stack()

