// The per-operand decision for linear / conv / matmul / bmm / einsum (DESIGN
// sections 2 and 3): qtype, calibration, channelwise and tiled axes, static or
// dynamic scale, SRQ batch axes and clip_gradient.
#include <c10/util/Exception.h>

#include <algorithm>
#include <numeric>
#include <cctype>
#include <optional>
#include <set>

#include "numerics/qtype.h"
#include "qwix/qwix.h"
#include "rules/internal.h"

namespace qwix {
namespace rules_internal {
namespace {

constexpr int kEllipsis = -1;

struct Term {
  std::vector<int> labels;  // a letter, or kEllipsis
  bool has_ellipsis = false;
};

Term parse_term(const std::string& equation, const std::string& term) {
  Term t;
  for (size_t i = 0; i < term.size();) {
    const unsigned char c = static_cast<unsigned char>(term[i]);
    if (std::isalpha(c)) {
      t.labels.push_back(c);
      ++i;
    } else if (term.compare(i, 3, "...") == 0) {
      TORCH_CHECK_VALUE(!t.has_ellipsis, "qwix: einsum equation '", equation, "': '", term,
                        "' has more than one '...'");
      t.has_ellipsis = true;
      t.labels.push_back(kEllipsis);
      i += 3;
    } else {
      TORCH_CHECK_VALUE(false, "qwix: einsum equation '", equation, "': unexpected character '", term[i], "' in '",
                        term, "' (labels are letters; '...' broadcasts)");
    }
  }
  return t;
}

}  // namespace

EinsumOperandAxes einsum_operand_axes(const std::string& equation_in, int operand, int64_t rank) {
  std::string eq;
  for (char c : equation_in)
    if (!std::isspace(static_cast<unsigned char>(c))) eq += c;
  const auto arrow = eq.find("->");
  const std::string inputs = eq.substr(0, arrow);
  const auto comma = inputs.find(',');
  TORCH_CHECK_VALUE(comma != std::string::npos && inputs.find(',', comma + 1) == std::string::npos,
                    "qwix: einsum equation '", equation_in, "' must have exactly two operands");
  const Term terms[2] = {parse_term(equation_in, inputs.substr(0, comma)), parse_term(equation_in, inputs.substr(comma + 1))};

  std::set<int> out_letters;
  bool out_ellipsis = false;
  if (arrow != std::string::npos) {
    const Term out = parse_term(equation_in, eq.substr(arrow + 2));
    out_ellipsis = out.has_ellipsis;
    for (int l : out.labels)
      if (l != kEllipsis) out_letters.insert(l);
  } else {  // implicit output: the letters that appear once, and the broadcast dims
    out_ellipsis = true;
    for (int l : terms[0].labels) {
      if (l == kEllipsis) continue;
      const auto n = std::count(terms[0].labels.begin(), terms[0].labels.end(), l) +
                     std::count(terms[1].labels.begin(), terms[1].labels.end(), l);
      if (n == 1) out_letters.insert(l);
    }
    for (int l : terms[1].labels) {
      if (l == kEllipsis) continue;
      const auto n = std::count(terms[0].labels.begin(), terms[0].labels.end(), l) +
                     std::count(terms[1].labels.begin(), terms[1].labels.end(), l);
      if (n == 1) out_letters.insert(l);
    }
  }

  const Term& self = terms[operand];
  const Term& other = terms[1 - operand];
  const int64_t letters = static_cast<int64_t>(self.labels.size()) - (self.has_ellipsis ? 1 : 0);
  TORCH_CHECK_VALUE(self.has_ellipsis ? rank >= letters : rank == letters, "qwix: einsum equation '", equation_in,
                    "': operand ", operand, " has rank ", rank, " but its subscripts name ", letters, " axes");

  // Axis of each label of `self`.
  EinsumOperandAxes out;
  std::vector<std::pair<int, int64_t>> contracting;  // (label, axis)
  int64_t axis = 0;
  for (int l : self.labels) {
    if (l == kEllipsis) {
      for (int64_t k = 0; k < rank - letters; ++k, ++axis)
        if (out_ellipsis) out.kept.push_back(axis);
      continue;
    }
    if (out_letters.count(l)) {
      out.kept.push_back(axis);
    } else if (std::find(other.labels.begin(), other.labels.end(), l) != other.labels.end()) {
      contracting.emplace_back(l, axis);
    }
    ++axis;
  }
  // Order the contracting axes by the lhs' label order, so both operands agree on the last one.
  const auto& lhs = terms[0].labels;
  std::stable_sort(contracting.begin(), contracting.end(), [&](const auto& a, const auto& b) {
    return std::find(lhs.begin(), lhs.end(), a.first) < std::find(lhs.begin(), lhs.end(), b.first);
  });
  for (const auto& [l, a] : contracting) out.contracting.push_back(a);
  return out;
}

}  // namespace rules_internal

namespace {

struct Layout {
  std::vector<int64_t> channelwise;
  std::optional<int64_t> tile_axis;  // the (last) contracting axis
  bool is_conv = false;
  bool group_tiled = false;  // a transposed conv weight: its groups split axis 0
};

std::vector<int64_t> iota_except(int64_t rank, int64_t skip) {
  std::vector<int64_t> v;
  for (int64_t i = 0; i < rank; ++i)
    if (i != skip) v.push_back(i);
  return v;
}

const char* operand_name(Operand o) { return o == Operand::Lhs ? "lhs" : "rhs"; }

Layout layout_of(const std::string& op, Operand operand, int64_t rank, const std::string& equation) {
  const bool lhs = operand == Operand::Lhs;
  Layout l;
  if (op == "linear") {
    // lhs [..., in]; rhs W [out, in] (or [in]).
    if (lhs) {
      TORCH_CHECK_VALUE(rank >= 1, "qwix: linear input must have rank >= 1, got ", rank);
      l.channelwise = iota_except(rank, rank - 1);
      l.tile_axis = rank - 1;
    } else {
      TORCH_CHECK_VALUE(rank == 1 || rank == 2, "qwix: linear weight must have rank 1 or 2, got ", rank);
      l.channelwise = rank == 2 ? std::vector<int64_t>{0} : std::vector<int64_t>{};
      l.tile_axis = rank - 1;
    }
  } else if (op == "conv1d" || op == "conv2d" || op == "conv3d" || op == "conv_transpose1d" ||
             op == "conv_transpose2d" || op == "conv_transpose3d") {
    const int64_t n = op[op.size() - 2] - '0';  // conv<n>d, conv_transpose<n>d
    l.is_conv = true;
    if (lhs) {
      TORCH_CHECK_VALUE(rank == n + 2 || rank == n + 1, "qwix: ", op, " input must have rank ", n + 2,
                        " (batched) or ", n + 1, " (unbatched), got ", rank);
      if (rank == n + 2) l.channelwise = {0};  // per batch item
    } else {
      TORCH_CHECK_VALUE(rank == n + 2, "qwix: ", op, " weight must have rank ", n + 2, ", got ", rank);
      // Per output channel: W [out, in/groups, k...], or transposed W [in, out/groups, k...] (axis 1; with
      // groups > 1 plan_operand also tiles axis 0 by group).
      const bool transposed = op[4] == '_';
      l.channelwise = {transposed ? int64_t{1} : int64_t{0}};
      l.group_tiled = transposed;
    }
  } else if (op == "matmul" || op == "bmm") {
    if (op == "bmm") TORCH_CHECK_VALUE(rank == 3, "qwix: bmm operands must have rank 3, got ", rank);
    TORCH_CHECK_VALUE(rank >= 1, "qwix: matmul operands must have rank >= 1, got ", rank);
    const int64_t contracting = rank == 1 ? 0 : (lhs ? rank - 1 : rank - 2);
    l.channelwise = iota_except(rank, contracting);
    l.tile_axis = contracting;
  } else if (op == "einsum") {
    const auto axes = rules_internal::einsum_operand_axes(equation, lhs ? 0 : 1, rank);
    l.channelwise = axes.kept;
    if (!axes.contracting.empty()) l.tile_axis = axes.contracting.back();
  } else {
    TORCH_CHECK_VALUE(false, "qwix: unknown op name '", op, "'; valid op names: ",
                      rules_internal::join(valid_op_names(), ", "));
  }
  return l;
}

}  // namespace

OperandPlan plan_operand(const QuantizationRule& rule, const std::string& op, Operand operand, bool is_weight,
                         int64_t rank, const std::string& equation, int64_t groups) {
  TORCH_CHECK_VALUE(groups >= 1, "qwix: ", op, " groups must be >= 1, got ", groups);
  OperandPlan p;
  p.is_weight = is_weight;
  const auto& qtype = is_weight ? rule.weight_qtype : rule.act_qtype;
  // The layout is checked even when the operand stays as is, so a bad call fails the same way.
  const Layout l = layout_of(op, operand, rank, equation);
  if (!qtype) return p;
  p.quantize = true;
  const QType qt = parse_qtype(*qtype);
  p.qtype = qt.name;
  p.calibration_method = is_weight ? rule.weight_calibration_method : rule.act_calibration_method;
  p.channelwise_axes = l.channelwise;
  if (qt.is_block_format()) {
    // Block qtypes fix their own blocks, as in Qwix for MX: every axis but the last
    // kept, the last in blocks (tile_size does not apply; the op checks the last axis).
    TORCH_CHECK_VALUE(rank >= 1, "qwix: qtype '", qt.name, "' needs an operand of rank >= 1 for ", op);
    p.channelwise_axes.resize(rank - 1);
    std::iota(p.channelwise_axes.begin(), p.channelwise_axes.end(), 0);
    p.tiled_axes.emplace_back(rank - 1, static_cast<double>(qt.p.block));
  } else if (rule.tile_size) {
    TORCH_CHECK_VALUE(!l.is_conv, "qwix: tile_size (", rules_internal::format_number(*rule.tile_size),
                      ") is not supported for ", op, " (conv scales are per output channel / per batch item)");
    if (l.tile_axis) p.tiled_axes.emplace_back(*l.tile_axis, *rule.tile_size);
  } else if (l.group_tiled && groups > 1) {  // output channel g * out/groups + j: axis 1 and a block of axis 0
    p.tiled_axes.emplace_back(0, 1.0 / static_cast<double>(groups));
  }
  p.static_scale = !is_weight && rule.act_static_scale;
  TORCH_CHECK_VALUE(!p.static_scale || !qt.two_level, "qwix: act_static_scale=True is not supported with act_qtype "
                    "'nvfp4' (its two-level scales are dynamic)");
  if (p.static_scale) {
    for (int64_t a : rule.act_batch_axes) {
      TORCH_CHECK_VALUE(a >= -rank && a < rank, "qwix: act_batch_axes: axis ", a, " is out of range for the rank-",
                        rank, " ", operand_name(operand), " of ", op);
      p.batch_axes.push_back(a < 0 ? a + rank : a);
    }
    std::sort(p.batch_axes.begin(), p.batch_axes.end());
    TORCH_CHECK_VALUE(std::adjacent_find(p.batch_axes.begin(), p.batch_axes.end()) == p.batch_axes.end(),
                      "qwix: act_batch_axes name the same axis twice for the rank-", rank, " ",
                      operand_name(operand), " of ", op);
    p.clip_gradient = rule.clip_gradient.value_or(false);
  } else {
    p.clip_gradient = rule.clip_gradient;
  }
  return p;
}

OpPlan plan_op(const QuantizationRule& rule, const std::string& op, const OperandInfo& lhs, const OperandInfo& rhs,
               const std::string& equation) {
  OpPlan p;
  p.lhs = plan_operand(rule, op, Operand::Lhs, lhs.is_weight, lhs.rank, equation, lhs.groups);
  p.rhs = plan_operand(rule, op, Operand::Rhs, rhs.is_weight, rhs.rank, equation, rhs.groups);
  return p;
}

}  // namespace qwix
