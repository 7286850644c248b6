"""F.scaled_dot_product_attention under QAT. Where the first rule matching (module, "matmul") has an
act_qtype, the call runs decomposed (the engine's decomposed_attention) so that q·kᵀ and weights·v are
quantized as the module's next two matmul ops; otherwise the fused op runs untouched."""
from typing import Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _helpers import assert_same
from reference import ref_fake_quant

import qwix_torch as qwix
from qwix_torch import QatProvider, QuantizationRule, _C
from qwix_torch.qat import _DECOMPOSED_ATTENTION


def fq(t, channelwise_axes):
    return ref_fake_quant(t, "int8", "absmax", channelwise_axes, None)


class SdpaAttention(nn.Module):
    """Self-attention through F.scaled_dot_product_attention, as most current models write it."""

    def __init__(self, d: int = 16, heads: int = 2, kv_heads: int = 2):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, d // heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * kv_heads * self.hd)
        self.o = nn.Linear(d, d)

    def forward(self, x, mask: Optional[torch.Tensor] = None, causal: bool = False):
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        kv = self.kv(x).view(b, t, 2, self.kv_heads, self.hd).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.heads != self.kv_heads)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


def ref_sdpa_attention(m, x, mask=None, causal=False, quantize_products=True):
    """int8 everywhere (weights per output channel, activations per token / per non-contracting index)."""
    def lin(layer, h):
        return F.linear(fq(h, tuple(range(h.dim() - 1))), fq(layer.weight, (0,)), layer.bias)

    b, t, d = x.shape
    q = lin(m.q, x).view(b, t, m.heads, m.hd).transpose(1, 2)
    kv = lin(m.kv, x).view(b, t, 2, m.kv_heads, m.hd).permute(2, 0, 3, 1, 4)
    k, v = kv[0], kv[1]
    if not quantize_products:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=m.heads != m.kv_heads)
    else:
        k = k.repeat_interleave(m.heads // m.kv_heads, 1)
        v = v.repeat_interleave(m.heads // m.kv_heads, 1)
        s = torch.matmul(fq(q, (0, 1, 2)), fq(k.transpose(-2, -1), (0, 1, 3))) * (1.0 / m.hd ** 0.5)
        if causal:
            s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
        p = torch.ops.aten._safe_softmax(s, -1)
        y = torch.matmul(fq(p, (0, 1, 2)), fq(v, (0, 1, 3)))
    return lin(m.o, y.transpose(1, 2).reshape(b, t, d))


W8A8 = [QuantizationRule(weight_qtype="int8", act_qtype="int8")]


def _masks(t):
    g = torch.Generator().manual_seed(3)
    bool_mask = torch.rand(t, t, generator=g) > 0.4
    bool_mask[:, 0] = True
    return {"none": None, "bool": bool_mask, "float": torch.randn(1, 1, t, t, generator=g)}


# ---- the decomposition itself ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["plain", "causal", "bool", "bool_fully_masked_row", "float", "scale", "gqa",
                                  "rank3", "cross"])
def test_decomposition_matches_fused_sdpa_and_both_forms_agree(case):
    torch.manual_seed(1)
    lq, ls = (5, 7) if case == "cross" else (6, 6)
    q, k, v = torch.randn(2, 4, lq, 8), torch.randn(2, 4, ls, 8), torch.randn(2, 4, ls, 8)
    kw = {}
    if case == "causal":
        kw["is_causal"] = True
    elif case.startswith("bool"):
        kw["attn_mask"] = torch.rand(lq, ls) > 0.5
        if case == "bool_fully_masked_row":
            kw["attn_mask"][2] = False  # sdpa gives 0 there, not NaN
    elif case == "float":
        kw["attn_mask"] = torch.randn(2, 1, lq, ls)
    elif case == "scale":
        kw["scale"] = 0.3
    elif case == "gqa":
        k, v = k[:, :2], v[:, :2]
        kw["enable_gqa"] = True
    elif case == "rank3":
        q, k, v = q[0], k[0], v[0]
    python_form = _DECOMPOSED_ATTENTION(q, k, v, **kw)
    assert_same(_C.decomposed_attention(q, k, v, **kw), python_form, "C++ form vs TorchScript/Python source")
    torch.testing.assert_close(python_form, F.scaled_dot_product_attention(q, k, v, **kw), rtol=1e-5, atol=1e-6)
    if case == "bool_fully_masked_row":
        assert torch.equal(python_form[:, :, 2], torch.zeros_like(python_form[:, :, 2]))


def test_decomposition_mask_dtype_and_shape_as_sdpa():
    q, k, v = (torch.randn(2, 4, 5, 8, dtype=torch.bfloat16) for _ in range(3))
    mask = torch.randn(5, 5)  # fp32 mask on bf16 scores: added in the scores' dtype, as sdpa does
    for form in (_DECOMPOSED_ATTENTION, _C.decomposed_attention):
        out = form(q, k, v, attn_mask=mask)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=0.05, atol=0.05)
        with pytest.raises(RuntimeError):  # a mask that broadcasts beyond the scores is an error, as in sdpa
            form(q, k, v, attn_mask=torch.ones(3, 2, 4, 5, 5, dtype=torch.bool))


def test_decomposition_dropout_is_the_same_in_both_forms_and_applies_in_eval_too():
    q, k, v = torch.randn(3, 2, 5, 4, requires_grad=True), torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    torch.manual_seed(7)
    a = _DECOMPOSED_ATTENTION(q, k, v, dropout_p=0.5)
    torch.manual_seed(7)
    b = _C.decomposed_attention(q, k, v, dropout_p=0.5)
    assert_same(a, b, "dropout")
    assert not torch.allclose(a, _DECOMPOSED_ATTENTION(q, k, v))  # dropped, as sdpa's dropout_p always does
    a.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("kw, message", [
    (dict(is_causal=True, attn_mask=torch.ones(4, 4, dtype=torch.bool)), "attn_mask must be None when is_causal"),
    (dict(dropout_p=1.5), "dropout_p must be in \\[0, 1\\], got 1.5"),
    (dict(dropout_p=-0.1), "dropout_p must be in \\[0, 1\\], got -0.1"),
    (dict(enable_gqa=True, key_heads=3), "got 4 query, 3 key and 3 value heads"),
    (dict(attn_mask=torch.ones(4, 4, dtype=torch.int64)), "attn_mask must be bool or floating point"),
])
def test_decomposition_rejects_bad_arguments_by_name(kw, message):
    kw = dict(kw)
    kv_heads = kw.pop("key_heads", 4)
    q, k, v = torch.randn(1, 4, 4, 8), torch.randn(1, kv_heads, 4, 8), torch.randn(1, kv_heads, 4, 8)
    for form in (_DECOMPOSED_ATTENTION, _C.decomposed_attention):
        with pytest.raises(ValueError, match=message):
            form(q, k, v, **kw)


def test_decomposition_rejects_low_ranks():
    x, y = torch.randn(8), torch.randn(4, 8)
    for form in (_DECOMPOSED_ATTENTION, _C.decomposed_attention):
        with pytest.raises(ValueError, match="need rank >= 2 .* got ranks 1, 1, 1"):
            form(x, x, x)
        with pytest.raises(ValueError, match="enable_gqa needs a heads axis .* got ranks 2, 2, 2"):
            form(y, y, y, enable_gqa=True)


# ---- QAT models -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["none", "causal", "bool", "float", "gqa"])
def test_sdpa_products_are_quantized_as_two_matmuls(variant):
    torch.manual_seed(0)
    m = SdpaAttention(kv_heads=1 if variant == "gqa" else 2)
    x = torch.randn(2, 6, 16)
    mask = _masks(6).get(variant)
    causal = variant == "causal"
    p = QatProvider(W8A8)
    q = qwix.quantize_model(m, p)
    y = q(x, mask, causal)
    assert_same(y, ref_sdpa_attention(m, x, mask, causal), variant)
    assert (y - ref_sdpa_attention(m, x, mask, causal, quantize_products=False)).abs().max() > 1e-3
    y.sum().backward()  # straight through to every projection
    assert all(layer.weight.grad.abs().sum() > 0 for layer in (q.q, q.kv, q.o))


def test_sdpa_srq_statistics_take_the_next_matmul_ids():
    class AttentionThenMatmul(SdpaAttention):
        def forward(self, x, mask: Optional[torch.Tensor] = None, causal: bool = False):
            y = super().forward(x, mask, causal)
            return torch.matmul(y, y.transpose(1, 2))  # after the two products of the attention: matmul2

    torch.manual_seed(0)
    m, x = AttentionThenMatmul(), torch.randn(2, 5, 16)
    rules = [QuantizationRule(act_qtype="int8", act_static_scale=True, weight_qtype="int8")]
    q = qwix.quantize_model(m, QatProvider(rules), x)
    stats = {n: s for n, s in q.named_children() if n.endswith(("_lhs", "_rhs"))}
    # (the projections' statistics live in q.q, q.kv, q.o: their linear is their own op)
    assert set(stats) == {"matmul0_lhs", "matmul0_rhs", "matmul1_lhs", "matmul1_rhs", "matmul2_lhs", "matmul2_rhs"}
    assert list(stats["matmul0_rhs"].sum_of_absmax.shape) == [1, 2, 1, 5]  # kᵀ [B, H, E, S]: per (head, key)
    q(x)
    assert all(int(s.count) == 1 for s in stats.values())


def test_srq_attention_with_variable_sequence_lengths():
    # Per-(head, query) statistics tie the sequence length; averaging the sequence axes too does not (docs/qat.md).
    torch.manual_seed(0)
    rules = [QuantizationRule(op_names=("matmul",), act_qtype="int8", act_static_scale=True, act_batch_axes=(0, 2, 3)),
             QuantizationRule(weight_qtype="int8", act_qtype="int8", act_static_scale=True, act_batch_axes=(0, 1))]
    q = qwix.quantize_model(SdpaAttention(), QatProvider(rules), torch.randn(2, 5, 16))
    for t in (5, 7, 3):
        q(torch.randn(2, t, 16), None, True)
    stats = {n: s for n, s in q.named_children() if n.startswith("matmul")}
    assert {n: list(s.sum_of_absmax.shape) for n, s in stats.items()} == {
        n: [1, 2, 1, 1] for n in ("matmul0_lhs", "matmul0_rhs", "matmul1_lhs", "matmul1_rhs")}
    assert all(int(s.count) == 3 for s in stats.values())
    with pytest.raises(ValueError, match="statistic"):  # the default batch axes keep the query axis: T is fixed
        qwix.quantize_model(SdpaAttention(), QatProvider(rules[1:]), torch.randn(2, 5, 16))(torch.randn(2, 7, 16))


@pytest.mark.parametrize("rules", [
    [QuantizationRule(weight_qtype="int8")],  # weights only
    [QuantizationRule(weight_qtype="int8", act_qtype="int8", op_names=("linear",))],  # matmul not listed
    [QuantizationRule(op_names=("matmul",), weight_qtype="int8"),  # the first rule for matmul has no act_qtype
     QuantizationRule(weight_qtype="int8", act_qtype="int8")],
], ids=["weights_only", "linear_only", "first_matmul_rule_weights_only"])
def test_fused_sdpa_runs_untouched_where_no_rule_quantizes_its_products(rules):
    torch.manual_seed(0)
    m, x = SdpaAttention(), torch.randn(2, 6, 16)
    p = QatProvider(rules)
    q = qwix.quantize_model(m, p)
    assert not p.decomposes_attention("")
    quantized_acts = any(r.act_qtype for r in rules if not r.op_names or "linear" in r.op_names)
    y = q(x, None, True)
    if quantized_acts:
        assert_same(y, ref_sdpa_attention(m, x, None, True, quantize_products=False), "fused sdpa")
    else:  # weights only: the linears' inputs stay as they are
        h = F.linear(x, fq(m.q.weight, (0,)), m.q.bias).view(2, 6, 2, 8).transpose(1, 2)
        kv = F.linear(x, fq(m.kv.weight, (0,)), m.kv.bias).view(2, 6, 2, 2, 8).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(h, kv[0], kv[1], is_causal=True).transpose(1, 2).reshape(2, 6, 16)
        assert_same(y, F.linear(o, fq(m.o.weight, (0,)), m.o.bias), "fused sdpa, weights only")
    assert not any(n.startswith("matmul") for n, _ in q.named_children())


def test_transformer_encoder_layer_attention_products_are_quantized():
    # nn.TransformerEncoderLayer calls its attention with need_weights=False, which is
    # F.scaled_dot_product_attention inside F.multi_head_attention_forward.
    torch.manual_seed(0)
    m = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    x = torch.randn(2, 5, 16)
    rules = [QuantizationRule(module_path="self_attn", act_qtype="int8", act_static_scale=True)]
    q = qwix.quantize_model(m, QatProvider(rules), x)
    assert {n for n, _ in q.self_attn.named_children()} == {"out_proj", "linear0_lhs", "matmul0_lhs", "matmul0_rhs",
                                                            "matmul1_lhs", "matmul1_rhs", "linear1_lhs"}
    y = q(x)
    assert int(q.self_attn.matmul1_rhs.count) == 1
    assert (y - m(x)).abs().max() > 1e-3


def test_sdpa_under_compile_fullgraph():
    torch.manual_seed(0)
    m, x = SdpaAttention(), torch.randn(2, 6, 16)
    mask = _masks(6)["bool"]
    rules = [QuantizationRule(weight_qtype="int8", act_qtype="int8", act_static_scale=True)]
    eager = qwix.quantize_model(m, QatProvider(rules), x, mask)
    import copy
    compiled_model = copy.deepcopy(eager)
    # aot_eager runs the same kernels: bit for bit, SRQ statistics included.
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        assert_same(compiled(x, mask), eager(x, mask), "aot_eager")
    for (n, a), (_, b) in zip(eager.named_buffers(), compiled_model.named_buffers()):
        assert_same(b, a, n)
    # Inductor fuses and reorders float math; a product can then round to a neighbouring grid point.
    torch._dynamo.reset()
    inductor = torch.compile(copy.deepcopy(eager).eval(), fullgraph=True)
    torch.testing.assert_close(inductor(x, mask), eager.eval()(x, mask), rtol=0, atol=0.05)


def test_bench_attention_quick_runs(tmp_path):
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    import bench_attention

    out = tmp_path / "b.json"
    assert bench_attention.main(["--quick", "--json", str(out)]) == 0
    import json
    res = json.loads(out.read_text())["results"][0]
    assert set(res["median_s"]) == {"fp32", "qwix linear", "qwix all", "fp32 math"}


def test_multihead_attention_srq_with_other_batch_sizes_and_lengths():
    # MHA projects sequence-first ([L, B, E], also with batch_first=True): the default act_batch_axes (0,)
    # would average the sequence and tie the batch size; (0, 1) for its linears ties neither (docs/qat.md).
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    def rules(linear_axes):
        return [QuantizationRule(module_path="attn", op_names=("matmul",), act_qtype="int8", act_static_scale=True,
                                 act_batch_axes=(0, 2, 3)),
                QuantizationRule(module_path="attn", weight_qtype="int8", act_qtype="int8", act_static_scale=True,
                                 act_batch_axes=linear_axes)]

    torch.manual_seed(0)
    q = qwix.quantize_model(Wrapped(), QatProvider(rules((0, 1))), torch.randn(2, 5, 16))
    q(torch.randn(3, 7, 16))
    assert int(q.attn.linear0_lhs.count) == 1 and int(q.attn.matmul1_rhs.count) == 1
    tied = qwix.quantize_model(Wrapped(), QatProvider(rules((0,))), torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"statistic 0 has shape \[1, 2, 1\]"):
        tied(torch.randn(3, 7, 16))
