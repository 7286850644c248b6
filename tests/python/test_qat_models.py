"""End to end: an MLP, a small CNN and a small transformer block. The QAT forward equals a
hand-built reference (tests/python/reference.py, plain PyTorch) for the same weights; training
lowers the loss; weights are parameters or views of them; state_dict, deepcopy, pickle,
bf16 casts and autocast."""
import copy
import functools
import io
import math
import threading
import warnings
from typing import Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from _helpers import assert_same
from reference import ref_fake_quant

import qwix_torch as qwix
from qwix_torch import QatProvider, QuantizationRule


def fq(t, qtype, channelwise_axes, tiled_axes=None, method="absmax"):
    return ref_fake_quant(t, qtype, method, channelwise_axes, tiled_axes)


# ---- models ---------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, d_in=16, d_hidden=32, d_out=4):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def ref_mlp(m, x, wq="int8", aq="int8", tile=None):
    def lin(layer, h):
        a_tiles = {h.dim() - 1: tile} if tile else None
        w_tiles = {1: tile} if tile else None
        return F.linear(fq(h, aq, tuple(range(h.dim() - 1)), a_tiles), fq(layer.weight, wq, (0,), w_tiles), layer.bias)

    return lin(m.fc2, torch.relu(lin(m.fc1, x)))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, groups=2)
        self.head = nn.Linear(8 * 3 * 3, 5)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(x.flatten(1))


def ref_cnn(m, x, wq="int8", aq="int8"):
    def conv(c, h):
        return F.conv2d(fq(h, aq, (0,)), fq(c.weight, wq, (0,)), c.bias, c.stride, c.padding, c.dilation, c.groups)

    x = torch.relu(conv(m.conv1, x))
    x = torch.relu(conv(m.conv2, x))
    h = x.flatten(1)
    return F.linear(fq(h, aq, (0,)), fq(m.head.weight, wq, (0,)), m.head.bias)


class Decoder(nn.Module):
    """Transposed convolutions (a decoder / U-Net upsampling path): 1-D, grouped 2-D with output_padding, 3-D."""

    def __init__(self):
        super().__init__()
        self.up1 = nn.ConvTranspose1d(2, 4, 3, stride=2)
        self.up2 = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.up3 = nn.ConvTranspose3d(1, 2, 2, stride=2, bias=False)

    def forward(self, x1, x2, x3):
        return self.up1(x1), self.up2(x2, output_size=[10, 10]), self.up3(x3)


def ref_decoder(m, x1, x2, x3, wq="int8", aq="int8"):
    """The weight [in, out/groups, k...] per output channel: per axis 1 and per group's block of axis 0; the
    input per batch item."""
    def up(c, h, f, output_padding):
        groups = {0: c.in_channels // c.groups} if c.groups > 1 else None
        return f(fq(h, aq, (0,)), fq(c.weight, wq, (1,), groups), c.bias, c.stride, c.padding, output_padding,
                 c.groups, c.dilation)

    return (up(m.up1, x1, F.conv_transpose1d, 0), up(m.up2, x2, F.conv_transpose2d, 1),
            up(m.up3, x3, F.conv_transpose3d, 0))


class Attention(nn.Module):
    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # indexing, not unpacking: TorchScript scripts it too (test_jit)
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(d // self.heads)  # activation x activation
        y = scores.softmax(-1) @ v  # activation x activation
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    def __init__(self, d=16, heads=2):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


TRANSFORMER_RULES = [
    # The attention module's own ops: the einsum and the matmul, both activation x activation.
    QuantizationRule(module_path="attn", act_qtype="int8"),
    # Every linear: int4 weights and int8 activations, tiles of 8 on the contracting axis.
    QuantizationRule(module_path=r".*(qkv|proj|fc1|fc2)", weight_qtype="int4", act_qtype="int8", tile_size=8),
]


def ref_transformer(m, x):
    def lin(layer, h):
        return F.linear(fq(h, "int8", (0, 1), {2: 8}), fq(layer.weight, "int4", (0,), {1: 8}), layer.bias)

    a = m.attn
    h = m.ln1(x)
    b, t, d = h.shape
    q, k, v = lin(a.qkv, h).reshape(b, t, 3, a.heads, d // a.heads).permute(2, 0, 3, 1, 4)
    scores = torch.einsum("bhqd,bhkd->bhqk", fq(q, "int8", (0, 1, 2)), fq(k, "int8", (0, 1, 2)))
    scores = scores / math.sqrt(d // a.heads)
    y = fq(scores.softmax(-1), "int8", (0, 1, 2)) @ fq(v, "int8", (0, 1, 3))
    x = x + lin(a.proj, y.transpose(1, 2).reshape(b, t, d))
    return x + lin(m.fc2, F.gelu(lin(m.fc1, m.ln2(x))))


def _w8a8():
    return QatProvider([QuantizationRule(weight_qtype="int8", act_qtype="int8")])


# ---- forward equals the reference ------------------------------------------------------------------


def test_mlp_matches_reference():
    torch.manual_seed(0)
    m, x = MLP(), torch.randn(8, 16)
    q = qwix.quantize_model(m, _w8a8(), x)
    assert_same(q(x), ref_mlp(m, x), "mlp")
    x3 = torch.randn(2, 5, 16)  # [B, T, in]: per token
    assert_same(q(x3), ref_mlp(m, x3), "mlp 3d")


def test_mlp_tiled_and_int4_weights():
    torch.manual_seed(0)
    m, x = MLP(), torch.randn(8, 16)
    q = qwix.quantize_model(m, QatProvider([QuantizationRule(weight_qtype="int4", act_qtype="int8", tile_size=8)]))
    assert_same(q(x), ref_mlp(m, x, wq="int4", tile=8), "tiled")
    qf = qwix.quantize_model(m, QatProvider([QuantizationRule(weight_qtype="int4", act_qtype="int8", tile_size=0.5)]))
    # fraction 0.5: 8 of fc1's 16 inputs, 16 of fc2's 32.
    h = torch.relu(F.linear(fq(x, "int8", (0,), {1: 8}), fq(m.fc1.weight, "int4", (0,), {1: 8}), m.fc1.bias))
    ref = F.linear(fq(h, "int8", (0,), {1: 16}), fq(m.fc2.weight, "int4", (0,), {1: 16}), m.fc2.bias)
    assert_same(qf(x), ref, "fractional tiles")


def test_cnn_matches_reference():
    torch.manual_seed(0)
    m, x = CNN(), torch.randn(3, 1, 8, 8)
    q = qwix.quantize_model(m, _w8a8(), x)
    assert_same(q(x), ref_cnn(m, x), "cnn")


def test_transformer_block_matches_reference():
    torch.manual_seed(0)
    m, x = TransformerBlock(), torch.randn(2, 6, 16)
    p = QatProvider(TRANSFORMER_RULES)
    q = qwix.quantize_model(m, p, x)
    assert p.get_unused_rules() == []
    assert_same(q(x), ref_transformer(m, x), "transformer")


class TorchAttention(nn.Module):
    """nn.MultiheadAttention: its ops run inside F.multi_head_attention_forward, a Python function of torch."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.fc = nn.Linear(d, 4)

    def forward(self, x, need_weights: bool = False, mask: Optional[torch.Tensor] = None):
        y, _ = self.attn(x, x, x, need_weights=need_weights, attn_mask=mask)
        return self.fc(y)


def ref_torch_attention(m, x):
    """Self-attention with int8 (per-channel weights, per-token activations) projections, in MHA's own layout."""
    a, (b, t, d) = m.attn, x.shape
    hd = d // a.num_heads
    xt = x.transpose(0, 1)  # MHA works sequence-first
    qkv = F.linear(fq(xt, "int8", (0, 1)), fq(a.in_proj_weight, "int8", (0,)), a.in_proj_bias)
    q, k, v = (u.reshape(t, b * a.num_heads, hd).transpose(0, 1).view(b, a.num_heads, t, hd) for u in qkv.chunk(3, -1))
    o = F.scaled_dot_product_attention(q, k, v).permute(2, 0, 1, 3).reshape(t * b, d)
    o = F.linear(fq(o, "int8", (0,)), fq(a.out_proj.weight, "int8", (0,)), a.out_proj.bias)
    return m.fc(o.view(t, b, d).transpose(0, 1))


def test_torch_multihead_attention_projections_are_quantized():
    torch.manual_seed(0)
    m, x = TorchAttention(), torch.randn(2, 5, 16)
    p = QatProvider([QuantizationRule(module_path="attn", weight_qtype="int8", act_qtype="int8", op_names=("linear",))])
    q = qwix.quantize_model(m, p, x)
    assert p.get_unused_rules() == []
    assert_same(q(x), ref_torch_attention(m, x), "nn.MultiheadAttention")
    assert (q(x) - m(x)).abs().max() > 1e-4  # quantized, not the float model
    with torch.no_grad():  # eval: the mode keeps nn.MultiheadAttention off its fused fast path
        q.eval()
        torch.testing.assert_close(q(x), ref_torch_attention(m, x), rtol=0, atol=1e-6)
        q.train()
    # need_weights=True takes the bmm path: both products are activation x activation ops of the module.
    srq = qwix.quantize_model(m, QatProvider([QuantizationRule(module_path="attn", act_qtype="int8",
                                                               act_static_scale=True)]), x, True)
    assert {n for n, _ in srq.attn.named_children()} >= {"linear0_lhs", "bmm0_lhs", "bmm0_rhs", "bmm1_lhs",
                                                         "bmm1_rhs", "linear1_lhs"}
    # With a mask, q·k is torch.baddbmm(mask, q, k): still bmm0, so the op ids (and the SRQ statistics)
    # do not depend on the mask.
    counts = {n: int(c.count) for n, c in srq.attn.named_children() if n.endswith(("_lhs", "_rhs"))}
    mask = torch.triu(torch.full((5, 5), float("-inf")), 1)
    srq(x, True, mask)
    assert {n: int(c.count) for n, c in srq.attn.named_children() if n.endswith(("_lhs", "_rhs"))} == {
        n: c + 1 for n, c in counts.items()}
    compiled = torch.compile(q, fullgraph=True)
    assert_same(compiled(x), q(x), "compiled")


class GPT2Conv1D(nn.Module):
    """HF transformers' Conv1D (GPT-2's projections): weight [in, out], y = torch.addmm(bias, x, weight)."""

    def __init__(self, nx: int, nf: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        y = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)
        return y.view(x.size(0), x.size(1), -1)


class MmBlock(nn.Module):
    """2-D products: torch.addmm in a child, Tensor.mm, Tensor.addmm with beta/alpha, then a matmul."""

    def __init__(self):
        super().__init__()
        self.c_fc = GPT2Conv1D(16, 32)
        self.w = nn.Parameter(torch.randn(32, 8) * 0.2)
        self.w2 = nn.Parameter(torch.randn(4, 8) * 0.2)
        self.b = nn.Parameter(torch.full((4,), 0.1))

    def forward(self, x):
        h = torch.relu(self.c_fc(x)).reshape(-1, 32).mm(self.w)  # matmul0
        y = self.b.addmm(h, self.w2.t(), beta=0.5, alpha=2.0)  # matmul1 (the weight is a view)
        return torch.matmul(y, y.t())  # matmul2: two activations


def ref_mm_block(m, x):
    """int8 weights per output column ([in, out] layout), int8 activations per row."""
    h = torch.addmm(m.c_fc.bias, fq(x.reshape(-1, 16), "int8", (0,)), fq(m.c_fc.weight, "int8", (1,)))
    h = torch.mm(fq(torch.relu(h), "int8", (0,)), fq(m.w, "int8", (1,)))
    # (per column of a transposed view = per row of the tensor, transposed: the op keeps the view's strides,
    # and BLAS rounds differently for another layout)
    y = torch.addmm(m.b, fq(h, "int8", (0,)), fq(m.w2, "int8", (0,)).t(), beta=0.5, alpha=2.0)
    return torch.matmul(fq(y, "int8", (0,)), fq(y, "int8", (0,)).t())


def test_mm_and_addmm_are_quantized_as_matmuls():
    # torch.mm / Tensor.mm and the product of torch.addmm / Tensor.addmm (HF GPT-2's Conv1D) are matmul
    # ops: the same op name for rules, the same op ids and per-op defaults.
    torch.manual_seed(0)
    m, x = MmBlock(), torch.randn(2, 3, 16)
    p = _w8a8()
    q = qwix.quantize_model(m, p)
    assert_same(q(x), ref_mm_block(m, x), "mm block")
    assert p.get_unused_rules() == []
    q(x).sum().backward()
    assert all(t.grad.abs().sum() > 0 for t in (q.c_fc.weight, q.w, q.w2, q.b))
    only_linear = qwix.quantize_model(m, QatProvider([QuantizationRule(weight_qtype="int8", op_names=("linear",))]))
    assert_same(only_linear(x), m(x), "op_names without matmul")
    srq = qwix.quantize_model(m, QatProvider([QuantizationRule(weight_qtype="int8", act_qtype="int8",
                                                               act_static_scale=True)]), x)
    assert {n for n, _ in srq.named_children() if n.endswith(("_lhs", "_rhs"))} == {
        "matmul0_lhs", "matmul1_lhs", "matmul2_lhs", "matmul2_rhs"}
    assert {n for n, _ in srq.c_fc.named_children()} == {"matmul0_lhs"}
    compiled = torch.compile(copy.deepcopy(srq), fullgraph=True, backend="aot_eager")
    eager = copy.deepcopy(srq)
    for _ in range(2):
        assert_same(compiled(x), eager(x), "compiled")

    class SparseMm(nn.Module):  # a GNN's sparse adjacency times the features: not quantizable, passed through
        def forward(self, adj, h):
            return torch.mm(adj, h)

    adj, h = torch.eye(4).to_sparse(), torch.randn(4, 3)
    assert_same(qwix.quantize_model(SparseMm(), _w8a8())(adj, h), h, "sparse")

    class Keywords(MmBlock):  # operands by keyword are the same ops
        def forward(self, x):
            h = torch.relu(self.c_fc(x)).reshape(-1, 32)
            h = torch.mm(h, mat2=self.w)
            y = torch.addmm(input=self.b, mat1=h, mat2=self.w2.t(), beta=0.5, alpha=2.0)
            return torch.matmul(input=y, other=y.t())

    kw = Keywords()
    kw.load_state_dict(m.state_dict())
    assert_same(qwix.quantize_model(kw, _w8a8())(x), ref_mm_block(m, x), "keyword operands")

    class OtherForms(nn.Module):  # forms that are not quantized pass through unchanged
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3))
            self.b = nn.Parameter(torch.randn(3))

        def forward(self, x, adj):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the deprecated scalar-first overload
                y = torch.addmm(0.5, self.b.expand(2, 3), x, self.w)
            return y, self.w.__rmatmul__(adj)  # adj @ w with a sparse adj

    other, adj = OtherForms(), torch.eye(4).to_sparse()
    x2 = torch.randn(2, 4)
    got = qwix.quantize_model(other, _w8a8())(x2, adj)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same(got[0], torch.addmm(0.5, other.b.expand(2, 3), x2, other.w), "deprecated addmm")
    assert_same(got[1], adj @ other.w, "sparse rmatmul")

    class OutDtype(nn.Module):  # extra arguments reach the op (aten::mm.dtype has no CPU kernel: the same error)
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3))

        def forward(self, x, add: bool):
            if add:
                return torch.addmm(self.w[0], x, self.w, torch.float32)
            return torch.mm(x, self.w, out_dtype=torch.float32)

    for add, name in ((False, "mm"), (True, "addmm")):
        with pytest.raises(NotImplementedError, match=rf"aten::{name}\.dtype"):
            qwix.quantize_model(OutDtype(), _w8a8())(x2, add)


def test_transposed_convolutions_are_quantized():
    torch.manual_seed(0)
    m = Decoder()
    xs = (torch.randn(2, 2, 5), torch.randn(2, 4, 5, 5), torch.randn(2, 1, 3, 3, 3))
    p = _w8a8()
    q = qwix.quantize_model(m, p)
    for got, want, name in zip(q(*xs), ref_decoder(m, *xs), ("1d", "2d", "3d")):
        assert_same(got, want, name)
        assert got.requires_grad
    assert p.get_unused_rules() == []
    sum(y.sum() for y in q(*xs)).backward()
    assert all(c.weight.grad.abs().sum() > 0 for c in (q.up1, q.up2, q.up3))
    # The op names a rule can select, SRQ statistics named after them.
    srq = qwix.quantize_model(m, QatProvider([QuantizationRule(op_names=("conv_transpose2d",), weight_qtype="int8",
                                                               act_qtype="int8", act_static_scale=True)]), *xs)
    assert [n for n, _ in srq.named_modules() if n.endswith("_lhs")] == ["up2.conv_transpose2d0_lhs"]
    assert_same(srq(*xs)[0], m(*xs)[0], "1d not selected")
    compiled = torch.compile(copy.deepcopy(q), fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(*xs), q(*xs)):
        assert_same(got, want, "compiled")
    with pytest.raises(ValueError, match="tile_size .* is not supported for conv_transpose1d"):
        qwix.quantize_model(m, QatProvider([QuantizationRule(weight_qtype="int8", tile_size=2)]), *xs)
    # Depthwise (groups = channels, W [C, 1, k, k]): one scale per output channel, as a depthwise conv's.
    dw = nn.ConvTranspose2d(8, 8, 3, groups=8)
    with torch.no_grad():
        dw.weight.mul_(torch.logspace(-3, 0, 8).view(8, 1, 1, 1))  # channels of very different magnitudes
    x = torch.randn(2, 8, 4, 4)
    qdw = qwix.quantize_model(dw, QatProvider([QuantizationRule(weight_qtype="int4")]))
    assert_same(qdw(x), F.conv_transpose2d(x, fq(dw.weight, "int4", (0,)), dw.bias, groups=8), "depthwise")


def test_torch_transformer_encoder_eval_is_quantized_too():
    # In eval mode under no_grad, nn.TransformerEncoderLayer would run its fused fast path
    # (torch._transformer_encoder_layer_fwd), invisible to any interception; the QAT mode keeps it on
    # the module path, so eval quantizes exactly as training does.
    torch.manual_seed(0)
    m = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2)
    x = torch.randn(2, 5, 16)
    q = qwix.quantize_model(m, _w8a8(), x)
    y_train = q(x)
    q.eval()
    m.eval()
    with torch.no_grad():
        # (no_grad may pick another attention kernel: equal to float rounding)
        torch.testing.assert_close(q(x), y_train.detach(), rtol=0, atol=1e-5)
        assert (q(x) - m(x)).abs().max() > 1e-3  # not the float fast path


def test_weights_only_and_activations_only():
    torch.manual_seed(0)
    m, x = MLP(), torch.randn(4, 16)
    wo = qwix.quantize_model(m, QatProvider([QuantizationRule(weight_qtype="int8")]))
    ref = F.linear(torch.relu(F.linear(x, fq(m.fc1.weight, "int8", (0,)), m.fc1.bias)), fq(m.fc2.weight, "int8", (0,)),
                   m.fc2.bias)
    assert_same(wo(x), ref, "weights only")
    ao = qwix.quantize_model(m, QatProvider([QuantizationRule(act_qtype="int8")]))  # ours: still quantizes activations
    ref = F.linear(fq(torch.relu(F.linear(fq(x, "int8", (0,)), m.fc1.weight, m.fc1.bias)), "int8", (0,)),
                   m.fc2.weight, m.fc2.bias)
    assert_same(ao(x), ref, "activations only")


class Functional(nn.Module):
    """Weights used through views and functional calls, and an activation view."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(12, 8) * 0.3)  # [out, in]
        self.u = nn.Parameter(torch.randn(8, 12) * 0.3)  # [in, out]
        self.k = nn.Parameter(torch.randn(3, 8, 8) * 0.3)

    def forward(self, x):  # x [B, 8]
        a = x @ self.w.t()  # matmul0: rhs a view of a parameter -> weight, per output channel
        b = F.linear(x, self.u.T)  # linear0: a view through .T
        c = torch.bmm(x.expand(3, -1, -1), self.k)  # bmm0: rhs parameter
        d = x.t() @ x  # matmul1: both activations (x.t() is a view of an activation)
        e = torch.einsum("bi,oi->bo", x, self.w)  # einsum0
        return a.sum() + b.sum() + c.sum() + d.sum() + e.sum()


def test_parameter_views_are_weights_and_other_operands_activations():
    torch.manual_seed(0)
    m, x = Functional(), torch.randn(4, 8)
    q = qwix.quantize_model(m, QatProvider([QuantizationRule(weight_qtype="int4", act_qtype="int8")]))
    A = lambda t, cw: fq(t, "int8", cw)  # noqa: E731
    W = lambda t, cw: fq(t, "int4", cw)  # noqa: E731
    a = A(x, (0,)) @ W(m.w.t(), (1,))
    b = F.linear(A(x, (0,)), W(m.u.T, (0,)))
    c = torch.bmm(A(x.expand(3, -1, -1), (0, 1)), W(m.k, (0, 2)))
    d = A(x.t(), (0,)) @ A(x, (1,))
    e = torch.einsum("bi,oi->bo", A(x, (0,)), W(m.w, (0,)))
    assert_same(q(x), a.sum() + b.sum() + c.sum() + d.sum() + e.sum(), "functional")


def test_conv1d_conv3d_and_matmul_weight():
    torch.manual_seed(0)

    class Convs(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(2, 3, 3)
            self.c3 = nn.Conv3d(2, 3, 2)
            self.w = nn.Parameter(torch.randn(2, 4))

        def forward(self, x1, x3):
            return self.c1(x1).sum() + self.c3(x3).sum() + (x1[0].t() @ self.w).sum()

    m = Convs()
    x1, x3 = torch.randn(2, 2, 6), torch.randn(2, 2, 3, 3, 3)
    q = qwix.quantize_model(m, _w8a8())
    ref = (F.conv1d(fq(x1, "int8", (0,)), fq(m.c1.weight, "int8", (0,)), m.c1.bias).sum()
           + F.conv3d(fq(x3, "int8", (0,)), fq(m.c3.weight, "int8", (0,)), m.c3.bias).sum()
           + (fq(x1[0].t(), "int8", (0,)) @ fq(m.w, "int8", (1,))).sum())
    assert_same(q(x1, x3), ref, "convs")


def test_tile_size_on_conv_is_an_error():
    m = CNN()
    with pytest.raises(ValueError, match=r"module 'conv1'.*tile_size.*conv2d"):
        qwix.quantize_model(m, QatProvider([QuantizationRule(weight_qtype="int8", tile_size=4)]),
                            torch.randn(1, 1, 8, 8))


# ---- training ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_training_lowers_the_loss(name):
    torch.manual_seed(0)
    if name == "mlp":
        m, x, provider = MLP(), torch.randn(32, 16), _w8a8()
        target = torch.randn(32, 4)
    elif name == "cnn":
        m, x, provider = CNN(), torch.randn(16, 1, 8, 8), _w8a8()
        target = torch.randn(16, 5)
    else:
        m, x, provider = TransformerBlock(), torch.randn(4, 6, 16), QatProvider(TRANSFORMER_RULES)
        target = torch.randn(4, 6, 16)
    q = qwix.quantize_model(m, provider, x)
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.mse_loss(q(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(p.grad is not None for p in q.parameters())


def test_copy_by_default_inplace_on_request():
    torch.manual_seed(0)
    m, x = MLP(), torch.randn(4, 16)
    y = m(x)
    q = qwix.quantize_model(m, _w8a8(), x)
    assert q is not m and not qwix.is_quantized(m) and qwix.is_quantized(q)
    assert torch.equal(m(x), y) and not torch.equal(q(x), y)
    assert not m._forward_pre_hooks
    assert [n for n, _ in q.named_parameters()] == [n for n, _ in m.named_parameters()]
    assert all(a is not b for a, b in zip(q.parameters(), m.parameters()))
    same = qwix.quantize_model(m, _w8a8(), inplace=True)
    assert same is m and qwix.is_quantized(m)
    with pytest.raises(ValueError, match="already quantized"):
        qwix.quantize_model(m, _w8a8())


def test_optimizer_trains_the_tensors_the_forward_uses():
    torch.manual_seed(0)
    m, x = MLP(), torch.randn(4, 16)
    q = qwix.quantize_model(m, _w8a8(), x)
    opt = torch.optim.SGD(q.parameters(), lr=0.5)
    F.mse_loss(q(x), torch.zeros(4, 4)).backward()
    opt.step()
    assert not torch.equal(q.fc1.weight, m.fc1.weight)
    assert_same(q(x), ref_mlp(q, x), "after a step")


# ---- checkpoints, copies, dtypes ------------------------------------------------------------------------


def _srq_mlp():
    torch.manual_seed(0)
    m, x = MLP(), torch.randn(4, 16)
    rule = QuantizationRule(weight_qtype="int8", act_qtype="int8", act_static_scale=True)
    q = qwix.quantize_model(m, QatProvider([rule]), x)
    q.train()
    for _ in range(3):
        q(torch.randn(4, 16))
    return m, q, x


def test_state_dict_both_ways():
    m, q, x = _srq_mlp()
    stat_keys = {"fc1.linear0_lhs.count", "fc1.linear0_lhs.sum_of_absmax", "fc2.linear0_lhs.count",
                 "fc2.linear0_lhs.sum_of_absmax"}
    sd = q.state_dict()
    assert set(sd) == set(m.state_dict()) | stat_keys
    # QAT -> fp: the stats are the only unexpected keys.
    fp = MLP()
    res = fp.load_state_dict(sd, strict=False)
    assert res.missing_keys == [] and set(res.unexpected_keys) == stat_keys
    assert torch.equal(fp.fc1.weight, q.fc1.weight)
    # fp -> QAT, strict: QuantStat tolerates its absence and keeps its statistics.
    torch.manual_seed(1)
    other = MLP()
    count = q.fc1.linear0_lhs.count.clone()
    q.load_state_dict(other.state_dict())
    assert torch.equal(q.fc1.weight, other.fc1.weight) and torch.equal(q.fc1.linear0_lhs.count, count)
    # QAT -> QAT, through torch.save.
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    _, q2, _ = _srq_mlp()
    q2.fc1.linear0_lhs.reset()
    q2.load_state_dict(torch.load(buf))
    assert int(q2.fc1.linear0_lhs.count) == 3
    assert torch.equal(q2.fc2.linear0_lhs.sum_of_absmax, sd["fc2.linear0_lhs.sum_of_absmax"])
    # A partial QuantStat entry is still an error.
    bad = dict(sd)
    del bad["fc1.linear0_lhs.count"]
    with pytest.raises(RuntimeError, match="fc1.linear0_lhs.count"):
        q2.load_state_dict(bad)


def test_deepcopy_and_pickle():
    m, q, x = _srq_mlp()
    q.eval()
    y = q(x)
    c = copy.deepcopy(q)
    assert_same(c(x), y, "deepcopy")
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    p = torch.load(buf, weights_only=False)
    assert_same(p(x), y, "pickle")
    # The copies are independent QAT models: training one updates only its statistics.
    c.train()
    c(x)
    assert int(c.fc1.linear0_lhs.count) == 4 and int(q.fc1.linear0_lhs.count) == 3
    assert c._qwix_state is not q._qwix_state


def test_a_copy_of_a_submodule_holds_only_that_submodule():
    # Each hook holds its own subtree's parameter dicts (functional_call's swaps): a copy or pickle of a submodule
    # used to carry every parameter of the model (torch.save(q.head) 4 MB for a 2.7 kB head).
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 8)
            self.body = nn.Linear(300, 300)

        def forward(self, x):
            return self.head(x)

    torch.manual_seed(0)
    fp, x = Model(), torch.randn(2, 8)
    q = qwix.quantize_model(fp, _w8a8(), x)

    def saved(obj) -> int:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.tell()

    assert saved(q.head) < saved(fp.head) + 4000 < saved(fp.body)  # (the provider and plans: ~1 kB)
    head = copy.deepcopy(q.head)
    assert_same(head(x), q(x), "a copied submodule")
    assert_same(head(x), F.linear(fq(x, "int8", (0,)), fq(fp.head.weight, "int8", (0,)), fp.head.bias), "reference")
    # functional_call still finds the swapped tensors, on the model and on the copy.
    w = fp.head.weight.detach() * 2
    for m in (q, head):
        prefix = "head." if m is q else ""
        y = torch.func.functional_call(m, {prefix + "weight": w}, (x,))
        assert_same(y, F.linear(fq(x, "int8", (0,)), fq(w, "int8", (0,)), fp.head.bias), "functional_call")


def test_a_model_pickled_with_the_earlier_hooks_loads_and_runs():
    # Before 2026-11-28 the pre-hooks were partial(_pre_hook, state, path) and the state held every module's
    # parameter dicts: such a pickle is rebuilt here and must load and run (functional_call included).
    from qwix_torch import qat as qat_impl

    m, q, x = _srq_mlp()
    q.eval()
    y = q(x)
    state = q._qwix_state
    state.param_dicts = [mod._parameters for mod in q.modules() if "_qwix_state" in mod.__dict__]
    for path, mod in q.named_modules():
        if "_qwix_state" not in mod.__dict__:
            continue
        (key, hook), = [(k, h) for k, h in mod._forward_pre_hooks.items() if getattr(h, "func", None) is
                        qat_impl._pre_hook]
        mod._forward_pre_hooks[key] = functools.partial(qat_impl._pre_hook, state, hook.args[1])
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    old = torch.load(buf, weights_only=False)
    assert_same(old(x), y, "an earlier pickle")
    w = {"fc1.weight": q.fc1.weight.detach() * 2}
    assert_same(torch.func.functional_call(old, w, (x,)), torch.func.functional_call(q, w, (x,)), "functional_call")
    old.train()
    old(x)
    assert int(old.fc1.linear0_lhs.count) == 4


def test_a_qat_model_called_inside_another_runs_as_alone():
    # Distillation: a separately quantized teacher, kept out of the student's modules, called in its forward. The
    # student's mode quantized the teacher's (already quantized) ops again as the student root's op.
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    teacher_fp = nn.Linear(8, 8)
    teacher = qwix.quantize_model(teacher_fp, _w8a8(), x)

    class Student(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.outside = [teacher]  # not a submodule

        def forward(self, x):
            h = self.fc(x)
            return h, self.outside[0](x), h @ self.fc.weight  # the root's own matmul, after the teacher returned

    int4_srq = QuantizationRule(weight_qtype="int4", act_qtype="int4", act_static_scale=True)
    s = qwix.quantize_model(Student(), QatProvider([int4_srq]), x)
    expected = F.linear(fq(x, "int8", (0,)), fq(teacher_fp.weight, "int8", (0,)), teacher_fp.bias)
    s.train()
    h, t, r = s(x)
    assert_same(t, expected, "the teacher inside the student")
    assert_same(t, teacher(x), "the teacher alone")
    # The student's own ops are quantized: its fc, and its root's matmul (one op: the teacher's is not counted).
    assert sorted(n for n, c in s.named_modules() if isinstance(c, qwix.QuantStat)) == ["fc.linear0_lhs",
                                                                                        "matmul0_lhs"]
    assert int(s.matmul0_lhs.count) == 1 and not torch.equal(h, s.fc.__class__.forward(s.fc, x))


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return F.scaled_dot_product_attention(q, k, v)


class _Student(nn.Module):
    def __init__(self, teacher):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.outside = [teacher]  # not a submodule

    def forward(self, x):
        return self.fc(x) + self.outside[0](x)


def test_a_qat_model_called_inside_a_compiled_one_runs_as_alone():
    # The teacher's rules leave its attention fused; the student's (matmul activations) decompose attention. Under
    # torch.compile the student's mode decomposed and quantized the teacher's attention (off by 0.17 of 1.18).
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8)
    teacher = qwix.quantize_model(_Attn(), QatProvider([QuantizationRule(op_names=["linear"], weight_qtype="int8")]),
                                  x).eval()
    s = qwix.quantize_model(_Student(teacher), QatProvider([QuantizationRule(weight_qtype="int4", act_qtype="int4")]),
                            x, inplace=True).eval()
    alone = teacher(x)
    eager = s(x)
    with torch.no_grad():
        compiled = torch.compile(s, fullgraph=True, backend="aot_eager")(x)
        student_part = s.fc(x)
    assert torch.equal(compiled, eager)
    torch.testing.assert_close(compiled - student_part, alone, rtol=0, atol=1e-6)


def test_an_interrupted_nested_forward_leaves_nothing_behind():
    # A KeyboardInterrupt inside a teacher running in a student's forward skips both models' always_call hooks:
    # the student's stale mode sat under the teacher's, was never removed, and quantized every later forward twice.
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    teacher = qwix.quantize_model(_Interruptible(), _w8a8(), x)
    s = qwix.quantize_model(_Student(teacher), QatProvider([QuantizationRule(weight_qtype="int4", act_qtype="int4")]),
                            x, inplace=True).eval()
    before = s(x)
    teacher.interrupt = True
    with pytest.raises(KeyboardInterrupt):
        s(x)
    assert len(torch.overrides._get_current_function_mode_stack()) == 2  # both modes were left behind
    teacher.interrupt = False
    assert torch.equal(s(x), before)
    assert torch.overrides._get_current_function_mode_stack() == []


def test_fx_symbolic_trace_of_a_qat_model_is_refused():
    # fx calls the root's forward without hooks: the GraphModule ran `fc(x) @ self.w` unquantized (off by 0.4).
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.w = nn.Parameter(torch.randn(8, 4))

        def forward(self, x):
            return self.fc(x) @ self.w

    class Wrapper(nn.Module):  # a float model around a QAT one: its matched ops are refused where they run
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) + 1

    x = torch.randn(3, 8)
    fp = Net()
    q = qwix.quantize_model(fp, _w8a8(), x)
    for model in (q, Wrapper(q)):
        with pytest.raises(TypeError, match="symbolic_trace cannot trace a QAT model.*floating-point model itself"):
            torch.fx.symbolic_trace(model)
    assert repr(q).startswith("Net(") and q._get_name() == "Net"
    # make_fx (an fx Tracer too) traces the QAT forward: its graph holds the qwix ops.
    from torch.fx.experimental.proxy_tensor import make_fx
    g = make_fx(lambda t: q(t))(x)
    assert_same(g(x), q(x), "make_fx")
    assert any("qwix" in str(n.target) for n in g.graph.nodes)
    # A quantized GraphModule works, but its copies lose the quantization of its own graph's ops: a warning.
    gm_fp = torch.fx.symbolic_trace(fp)
    with pytest.warns(UserWarning, match="in a GraphModule's own graph .* lose their quantization on copy.deepcopy"):
        gm = qwix.quantize_model(gm_fp, _w8a8(), x)
    assert_same(gm(x), q(x), "the quantized GraphModule")
    # One whose graph only calls (leaf) modules keeps everything, and a pickle of it loads (fx re-traces its code
    # on loading, which is not refused).
    leafy = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gq = qwix.quantize_model(leafy, _w8a8(), x)
    buf = io.BytesIO()
    torch.save(gq, buf)
    buf.seek(0)
    assert_same(torch.load(buf, weights_only=False)(x), gq(x), "a pickled quantized GraphModule")
    assert_same(copy.deepcopy(gq)(x), gq(x), "a deep-copied quantized GraphModule")


def test_a_qat_module_keeps_its_own_name():
    class Named(nn.Linear):
        def _get_name(self):
            return "Custom"

    q = qwix.quantize_model(nn.Sequential(nn.LazyLinear(4), Named(4, 4)), _w8a8())
    q(torch.randn(2, 8))  # LazyLinear becomes a Linear
    assert repr(q).splitlines()[1:3] == ["  (0): Linear(in_features=8, out_features=4, bias=True)",
                                         "  (1): Custom(in_features=4, out_features=4, bias=True)"]


def test_model_to_bfloat16_keeps_fp32_statistics():
    m, q, x = _srq_mlp()
    m16 = copy.deepcopy(m).to(torch.bfloat16)
    q.to(torch.bfloat16)
    assert q.fc1.weight.dtype == torch.bfloat16
    assert q.fc1.linear0_lhs.sum_of_absmax.dtype == torch.float32
    assert q.fc1.linear0_lhs.count.dtype == torch.int32
    x16 = x.to(torch.bfloat16)
    y = q(x16)  # training mode: the statistics update from a bf16 activation
    assert y.dtype == torch.bfloat16 and int(q.fc1.linear0_lhs.count) == 4
    y.float().sum().backward()
    assert q.fc1.weight.grad.dtype == torch.bfloat16
    # Dynamic (no SRQ) bf16 forward equals the reference in bf16.
    d = qwix.quantize_model(m16, _w8a8())
    assert_same(d(x16), ref_mlp(m16, x16), "bf16")


def _no_running_forward(q) -> bool:  # (on this thread, and no traced frames)
    run = getattr(q._qwix_state.local, "run", None)
    return (run is None or run.stack == []) and q._qwix_state.traced.stack == []


def test_autocast_bfloat16():
    torch.manual_seed(0)
    m, x = MLP(), torch.randn(4, 16)
    q = qwix.quantize_model(m, _w8a8(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
        h = torch.relu(F.linear(fq(x, "int8", (0,)), fq(m.fc1.weight, "int8", (0,)), m.fc1.bias))
        ref = F.linear(fq(h, "int8", (0,)), fq(m.fc2.weight, "int8", (0,)), m.fc2.bias)
    assert y.dtype == torch.bfloat16
    assert_same(y, ref, "autocast")
    y.float().sum().backward()
    assert q.fc1.weight.grad is not None


def test_exceptions_leave_the_model_usable():
    torch.manual_seed(0)
    m, x = MLP(), torch.randn(4, 16)
    q = qwix.quantize_model(m, _w8a8())
    with pytest.raises(RuntimeError):
        q(torch.randn(4, 7))  # shape error inside fc1
    assert _no_running_forward(q)
    assert_same(q(x), ref_mlp(m, x), "after an error")
    assert not torch.overrides._get_current_function_mode_stack()


class _Interruptible(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.interrupt = False

    def forward(self, x):
        h = self.fc(x)
        if self.interrupt:
            raise KeyboardInterrupt  # a BaseException: torch skips always_call hooks for it
        return h


def test_keyboard_interrupt_does_not_leave_quantization_on():
    torch.manual_seed(0)
    m, x = _Interruptible(), torch.randn(2, 8)
    rules = [QuantizationRule(weight_qtype="int4", act_qtype="int4", act_static_scale=True)]
    q = qwix.quantize_model(m, QatProvider(rules), x)
    q.train()
    q.interrupt = True
    with pytest.raises(KeyboardInterrupt):
        q(x)
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    assert_same(a @ b, torch.mm(a, b), "an op outside the model after the interrupt")
    assert [n for n, _ in q.named_children()] == ["fc"]  # no QuantStat made for it at the root
    q.interrupt = False
    q.eval()
    ref = qwix.quantize_model(m, QatProvider(rules), x).train()  # one training forward, not interrupted
    ref(x)
    assert_same(q(x), ref.eval()(x), "the next forward")
    assert _no_running_forward(q) and not torch.overrides._get_current_function_mode_stack()


class _TestTimeAugmented(nn.Module):
    """The root calls itself (test-time augmentation): a nested root forward, not a stale one."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x, tta: bool = True):
        if not tta:
            return self.fc(x)
        return (self(x, tta=False) + self(x.flip(0), tta=False).flip(0)) @ self.w


def test_a_root_that_calls_itself_and_a_submodule_called_after_an_interrupt():
    torch.manual_seed(0)
    m, x = _TestTimeAugmented(), torch.randn(2, 8)
    q = qwix.quantize_model(m, _w8a8(), x)
    h = F.linear(fq(x, "int8", (0,)), fq(m.fc.weight, "int8", (0,)), m.fc.bias)
    h2 = F.linear(fq(x.flip(0), "int8", (0,)), fq(m.fc.weight, "int8", (0,)), m.fc.bias).flip(0)
    assert_same(q(x), fq(h + h2, "int8", (0,)) @ fq(m.w, "int8", (1,)), "nested root forwards")
    interrupted = qwix.quantize_model(_Interruptible(), _w8a8(), x)
    interrupted.interrupt = True
    with pytest.raises(KeyboardInterrupt):
        interrupted(x)
    fc = interrupted.fc  # called alone next: its forward drops the stale frames and quantizes
    assert_same(fc(x), F.linear(fq(x, "int8", (0,)), fq(fc.weight, "int8", (0,)), fc.bias), "submodule")
    assert _no_running_forward(interrupted) and not torch.overrides._get_current_function_mode_stack()


class _Threaded(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            ya, yb = pool.map(lambda f: f(x), [self.a, self.b])
        return ya + yb


def _w8a8_linear(x, fc):
    return F.linear(fq(x, "int8", (0,)), fq(fc.weight, "int8", (0,)), fc.bias)


def test_submodules_called_from_worker_threads_are_quantized():
    # Each thread runs its own forward: a module called on a worker thread within a forward is quantized
    # there (it ran unquantized when the running forward was one per model).
    torch.manual_seed(0)
    m, x = _Threaded(), torch.randn(2, 8)
    q = qwix.quantize_model(m, _w8a8())
    assert_same(q(x), _w8a8_linear(x, m.a) + _w8a8_linear(x, m.b), "worker threads")
    assert_same(q.a(x), _w8a8_linear(x, m.a), "afterwards")
    assert _no_running_forward(q) and not torch.overrides._get_current_function_mode_stack()


class _Gate(nn.Module):
    """Holds the forward of the thread named 'held' until released."""

    def __init__(self):
        super().__init__()
        self.inside, self.release = threading.Event(), threading.Event()

    def forward(self, x):
        if not torch.compiler.is_compiling() and threading.current_thread().name == "held":
            self.inside.set()
            assert self.release.wait(60)
        return x


def test_threads_run_forwards_of_one_model_at_once():
    # Inference serving: a second thread's forward while the first is inside the model. The second took the
    # first's frames (its ops were attributed to the first's module, or ran unquantized).
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), _Gate(), nn.Linear(8, 4))
    x1, x2 = torch.randn(3, 8), torch.randn(5, 8)
    q = qwix.quantize_model(m, _w8a8(), x1, inplace=True).eval()  # (events do not deep-copy)

    def expected(x):
        return _w8a8_linear(_w8a8_linear(x, m[0]), m[2])

    other, held = _beside_a_held_forward(q, x1, lambda: q(x2))
    assert_same(other, expected(x2), "the other thread's forward")
    assert_same(held, expected(x1), "the held forward")
    assert _no_running_forward(q) and not torch.overrides._get_current_function_mode_stack()

    # A compiled forward while another thread's eager forward is inside the model (compiled code guarded on
    # the frames the eager one had pushed, retraced and ran unquantized).
    compiled = torch.compile(q, fullgraph=True, backend="eager")
    with torch.no_grad():
        compiled(x2)
    other, held = _beside_a_held_forward(q, x1, lambda: compiled(x2))
    assert_same(other, expected(x2), "compiled, beside an eager forward")
    assert_same(held, expected(x1), "the held eager forward")


def _beside_a_held_forward(q, x, call):
    """(call(), q(x)): q(x) runs on a thread named 'held' and waits inside q's _Gate q[1] while call() runs."""
    gate, out = q[1], {}
    gate.inside.clear()
    gate.release.clear()
    held = threading.Thread(target=lambda: out.setdefault("held", q(x)), name="held")
    with torch.no_grad():
        held.start()
        try:
            assert gate.inside.wait(60)
            other = call()
        finally:
            gate.release.set()
            held.join(60)
    return other, out["held"]


def test_threads_starting_forwards_together():
    # Two threads entering the model at the same moment both took one shared stack of frames.
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(4)])
    q = qwix.quantize_model(m, QatProvider([QuantizationRule(weight_qtype="int4", act_qtype="int4")]),
                            torch.randn(2, 16)).eval()
    xs = [torch.randn(3, 16) for _ in range(2)]
    with torch.no_grad():
        expected = [q(x) for x in xs]
    start, wrong = threading.Barrier(2), []

    def worker(i):
        with torch.no_grad():
            for _ in range(100):
                start.wait(60)
                if not torch.equal(q(xs[i]), expected[i]):
                    wrong.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert wrong == [] and _no_running_forward(q)


class _Symmetric(nn.Module):
    def forward(self, w):
        return w @ w.T


def test_parametrizations_are_not_quantized():
    # A parametrization runs whenever its weight is read, inside a forward or not: its own ops (this matmul,
    # orthogonal's) are not the model's.
    torch.manual_seed(0)
    m, x = nn.Linear(8, 8), torch.randn(2, 8)
    parametrize.register_parametrization(m, "weight", _Symmetric())
    q = qwix.quantize_model(m, _w8a8(), x)
    assert_same(q.weight, m.weight, "read outside a forward")
    assert torch.equal(q.weight, q.weight.T)
    # The linear's weight is a computed tensor, not a parameter: quantized by act_qtype (docs: Limitations).
    assert_same(q(x), F.linear(fq(x, "int8", (0,)), fq(m.weight, "int8", (0,)), m.bias), "the linear")


class _GrowingCache(nn.Module):
    """A non-persistent cache grown for longer inputs (rotary tables, causal masks)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.ones(4, 8), persistent=False)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if x.shape[1] > self.cache.shape[0]:
            self.register_buffer("cache", torch.ones(x.shape[1], 8) * 2, persistent=False)
        return self.fc(x * self.cache[:x.shape[1]])


def test_example_forward_restores_replaced_buffers_and_handles_lazy_modules():
    m = _GrowingCache()
    q = qwix.quantize_model(m, _w8a8(), torch.randn(2, 6, 8))
    assert q.cache.shape == (4, 8)  # the buffer object it had (was: a copy_ into it, a shape error)
    q = qwix.quantize_model(nn.Sequential(nn.LazyLinear(8), nn.Linear(8, 4)), _w8a8(), torch.randn(2, 16))
    x = torch.randn(2, 16)
    assert_same(q[0](x), F.linear(fq(x, "int8", (0,)), fq(q[0].weight, "int8", (0,)), q[0].bias), "materialized")
    # Uninitialized buffers cannot be deep-copied (torch): a clear error; in place, the example forward that
    # materializes them leaves their initial values (running stats), as it leaves every other buffer.
    lazy = nn.Sequential(nn.LazyLinear(8), nn.LazyBatchNorm1d(), nn.Linear(8, 4)).train()
    with pytest.raises(ValueError, match=r"lazy module with uninitialized buffers .*pass inplace=True"):
        qwix.quantize_model(lazy, _w8a8(), torch.randn(4, 16))
    unreached = nn.ModuleDict({"used": nn.Linear(16, 4), "aux": nn.LazyBatchNorm1d()})
    unreached.forward = lambda x: unreached["used"](x)  # aux stays uninitialized: nothing to reset
    qwix.quantize_model(unreached, _w8a8(), torch.randn(4, 16), inplace=True)
    q = qwix.quantize_model(lazy, _w8a8(), torch.randn(4, 16) * 5 + 3, inplace=True)
    assert q[0].weight.shape == (8, 16) and int(q[1].num_batches_tracked) == 0
    assert_same(q[1].running_mean, torch.zeros(8))
    assert_same(q[1].running_var, torch.ones(8))


def test_a_model_built_around_a_quantized_module_is_refused():
    torch.manual_seed(0)
    x = torch.randn(2, 16)
    qat = qwix.quantize_model(MLP(), QatProvider([QuantizationRule(act_qtype="int8", act_static_scale=True)]), x)
    assert qwix.is_quantized(qat.fc1)
    with pytest.raises(ValueError, match="its submodule '0' is already quantized"):
        qwix.quantize_model(nn.Sequential(qat, nn.Linear(4, 2)), _w8a8(), x)
    qwix.calibrate(qat.fc1, [x], progress=False)  # the helpers accept a submodule of a QAT model
    assert int(qat.fc1.linear0_lhs.count) == 1


def test_example_forward_changes_nothing():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Dropout(0.5), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(4, 1, 8, 8) * 5
    rng = torch.get_rng_state()
    q = qwix.quantize_model(m, QatProvider([QuantizationRule(weight_qtype="int8", act_qtype="int8",
                                                             act_static_scale=True)]), x)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in before.items():
        assert torch.equal(q.state_dict()[k], v), k
    assert q.training and int(q[0].conv2d0_lhs.count) == 0
    assert all(p.grad is None for p in q.parameters())
