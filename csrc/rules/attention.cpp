// scaled_dot_product_attention decomposed into its two matmuls, so that the rules can quantize them
// (qwix.h, "Attention"). Two forms of one function: C++ (the LibTorch QatOps) and TorchScript source
// (the TorchScript pass inlines it; the Python path execs it as Python). They must stay step for step
// the same: tests compare the three paths bit for bit.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>

#include "qwix/qwix.h"

namespace qwix {

// Names it uses besides the builtins, which each environment provides: torch, Tensor, Optional,
// ValueError, safe_softmax (aten::_safe_softmax: a fully masked row gives 0) and bool_dtype (torch.bool).
const std::string& decomposed_attention_source() {
  static const std::string source = R"PY(
def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise ValueError("qwix: scaled_dot_product_attention: query, key and value need rank >= 2 "
                         "(..., sequence, features), got ranks {}, {}, {}".format(query.dim(), key.dim(), value.dim()))
    if is_causal and attn_mask is not None:
        raise ValueError("qwix: scaled_dot_product_attention: attn_mask must be None when is_causal=True")
    if not (dropout_p >= 0.0 and dropout_p <= 1.0):
        raise ValueError("qwix: scaled_dot_product_attention: dropout_p must be in [0, 1], got {}".format(dropout_p))
    if enable_gqa:
        if query.dim() < 3 or key.dim() < 3 or value.dim() < 3:
            raise ValueError("qwix: scaled_dot_product_attention: enable_gqa needs a heads axis (rank >= 3), got "
                             "ranks {}, {}, {}".format(query.dim(), key.dim(), value.dim()))
        heads = query.size(-3)
        kv_heads = key.size(-3)
        if kv_heads == 0 or heads % kv_heads != 0 or value.size(-3) != kv_heads:
            raise ValueError("qwix: scaled_dot_product_attention: enable_gqa needs key and value heads that "
                             "divide the query's, got {} query, {} key and {} value heads".format(
                                 heads, kv_heads, value.size(-3)))
        key = key.repeat_interleave(heads // kv_heads, -3)
        value = value.repeat_interleave(heads // kv_heads, -3)
    factor = 1.0 / float(query.size(-1)) ** 0.5 if scale is None else scale
    attn = torch.matmul(query, key.transpose(-2, -1))
    attn.mul_(factor)  # in place: no second [L, S] buffer (the product's backward does not need it)
    if is_causal:
        above = attn.new_ones([attn.size(-2), attn.size(-1)]).tril() == 0
        attn.masked_fill_(above, float("-inf"))
    if attn_mask is not None:  # in place: the mask broadcasts to the scores' shape, never beyond it
        if attn_mask.dtype == bool_dtype:
            attn.masked_fill_(attn_mask.logical_not(), float("-inf"))
        elif attn_mask.is_floating_point():
            attn.add_(attn_mask)  # in the scores' dtype, as sdpa's math backend
        else:
            raise ValueError("qwix: scaled_dot_product_attention: attn_mask must be bool or floating point")
    attn = safe_softmax(attn, -1)
    if dropout_p > 0.0:
        attn = torch.dropout(attn, dropout_p, True)
    return torch.matmul(attn, value)
)PY";
  return source;
}

at::Tensor decomposed_attention(const MatmulFn& matmul, const at::Tensor& query, const at::Tensor& key_in,
                                const at::Tensor& value_in, const std::optional<at::Tensor>& attn_mask,
                                double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa) {
  TORCH_CHECK_VALUE(query.dim() >= 2 && key_in.dim() >= 2 && value_in.dim() >= 2,
                    "qwix: scaled_dot_product_attention: query, key and value need rank >= 2 (..., sequence, "
                    "features), got ranks ", query.dim(), ", ", key_in.dim(), ", ", value_in.dim());
  TORCH_CHECK_VALUE(!(is_causal && attn_mask.has_value()),
                    "qwix: scaled_dot_product_attention: attn_mask must be None when is_causal=True");
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p <= 1.0,
                    "qwix: scaled_dot_product_attention: dropout_p must be in [0, 1], got ", dropout_p);
  at::Tensor key = key_in, value = value_in;
  if (enable_gqa) {
    TORCH_CHECK_VALUE(query.dim() >= 3 && key.dim() >= 3 && value.dim() >= 3,
                      "qwix: scaled_dot_product_attention: enable_gqa needs a heads axis (rank >= 3), got ranks ",
                      query.dim(), ", ", key.dim(), ", ", value.dim());
    const int64_t heads = query.size(-3), kv_heads = key.size(-3);
    TORCH_CHECK_VALUE(kv_heads != 0 && heads % kv_heads == 0 && value.size(-3) == kv_heads,
                      "qwix: scaled_dot_product_attention: enable_gqa needs key and value heads that divide the "
                      "query's, got ", heads, " query, ", kv_heads, " key and ", value.size(-3), " value heads");
    key = key.repeat_interleave(heads / kv_heads, -3);
    value = value.repeat_interleave(heads / kv_heads, -3);
  }
  // As the source's `1.0 / float(E) ** 0.5` (TorchScript and CPython both call pow).
  const double factor = scale ? *scale : 1.0 / std::pow(static_cast<double>(query.size(-1)), 0.5);
  at::Tensor attn = matmul(query, key.transpose(-2, -1));
  attn.mul_(factor);
  const double neg_inf = -std::numeric_limits<double>::infinity();
  if (is_causal) {
    at::Tensor above = attn.new_ones({attn.size(-2), attn.size(-1)}).tril() == 0;
    attn.masked_fill_(above, neg_inf);
  }
  if (attn_mask) {
    if (attn_mask->scalar_type() == at::kBool) {
      attn.masked_fill_(attn_mask->logical_not(), neg_inf);
    } else {
      TORCH_CHECK_VALUE(attn_mask->is_floating_point(),
                        "qwix: scaled_dot_product_attention: attn_mask must be bool or floating point");
      attn.add_(*attn_mask);
    }
  }
  attn = at::_safe_softmax(attn, -1);
  if (dropout_p > 0.0) attn = at::dropout(attn, dropout_p, /*train=*/true);
  return matmul(attn, value);
}

}  // namespace qwix
