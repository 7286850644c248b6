// QuantizationRule validation and QatProvider matching (DESIGN section 3).
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <regex>
#include <sstream>

#include "numerics/calibration.h"
#include "numerics/qtype.h"
#include "qwix/qwix.h"
#include "rules/internal.h"

namespace qwix {

const std::vector<std::string>& valid_op_names() {
  static const std::vector<std::string> names = {"linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
                                                  "conv_transpose2d", "conv_transpose3d", "matmul", "bmm", "einsum"};
  return names;
}

namespace rules_internal {

std::string join(const std::vector<std::string>& parts, const char* sep) {
  std::string out;
  for (size_t i = 0; i < parts.size(); ++i) {
    if (i) out += sep;
    out += parts[i];
  }
  return out;
}

std::string format_number(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

std::string message(const c10::Error& e) {
  std::string m = e.what_without_backtrace();
  const std::string prefix = "qwix: ";
  if (m.rfind(prefix, 0) == 0) m = m.substr(prefix.size());
  return m;
}

void throw_at_site(const c10::ValueError& e, const std::string& site, const QuantizationRule& rule) {
  TORCH_CHECK_VALUE(false, "qwix: ", site, " (rule ", rule_repr(rule), "): ", message(e));
  throw;  // unreachable
}

std::regex compile_module_path(const std::string& pattern) {
  // Valid in both dialects but read differently: Python's anchors \A \Z are literal letters in ECMAScript,
  // and POSIX classes [[:alpha:]] are a plain character set in Python. The Python path validates with `re`
  // and matches with this regex, so either would silently match other paths there.
  for (size_t i = 0; i + 1 < pattern.size(); ++i) {
    if (pattern[i] != '\\') continue;
    TORCH_CHECK_VALUE(pattern[i + 1] != 'A' && pattern[i + 1] != 'Z' && pattern[i + 1] != 'z',
                      "qwix: QuantizationRule.module_path '", pattern, "' uses \\", pattern[i + 1],
                      ", which std::regex (ECMAScript) reads as a plain letter; module_path is a full match "
                      "already, so drop the anchor (or use ^ and $)");
    ++i;  // the escaped character
  }
  // A ']' first in a class ([]a], [^]a]) is a literal in Python and closes an empty class in ECMAScript.
  bool in_class = false;
  for (size_t i = 0; i < pattern.size(); ++i) {
    if (pattern[i] == '\\') {
      ++i;
    } else if (in_class) {
      in_class = pattern[i] != ']';
    } else if (pattern[i] == '[') {
      in_class = true;
      size_t first = i + 1;
      if (first < pattern.size() && pattern[first] == '^') ++first;
      TORCH_CHECK_VALUE(first >= pattern.size() || pattern[first] != ']', "qwix: QuantizationRule.module_path '",
                        pattern, "' starts a character class with ']', a literal in Python's re but an empty class "
                        "in std::regex (ECMAScript); escape it: \\]");
      i = first - 1;
    }
  }
  TORCH_CHECK_VALUE(!std::regex_search(pattern, std::regex(R"(\[:[a-z]+:\])")),
                    "qwix: QuantizationRule.module_path '", pattern, "' looks like a POSIX class ([[:alpha:]]), "
                    "which Python's re does not have; write the characters out ([A-Za-z])");
  try {
    return std::regex(pattern, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    TORCH_CHECK_VALUE(false, "qwix: QuantizationRule.module_path '", pattern,
                      "' is not a valid regular expression (std::regex ECMAScript syntax; Python-only syntax such as "
                      "(?P<name>...) or lookbehind is not supported): ",
                      e.what());
    throw;  // unreachable
  }
}

}  // namespace rules_internal

using rules_internal::format_number;
using rules_internal::join;

namespace {

std::string quote(const std::string& s) { return "'" + s + "'"; }

std::string axes_repr(const std::vector<int64_t>& axes) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < axes.size(); ++i) os << (i ? ", " : "") << axes[i];
  os << (axes.size() == 1 ? ",)" : ")");
  return os.str();
}

// Re-throws a ValueError of the numerics parsers with the rule field in front.
template <typename F>
auto with_field(const char* field, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const c10::ValueError& e) {
    TORCH_CHECK_VALUE(false, "qwix: QuantizationRule.", field, ": ", rules_internal::message(e));
    throw;  // unreachable
  }
}

}  // namespace

std::string rule_repr(const QuantizationRule& r) {
  std::ostringstream os;
  os << "QuantizationRule(module_path=" << quote(r.module_path);
  if (!r.op_names.empty()) {
    std::vector<std::string> q;
    for (const auto& n : r.op_names) q.push_back(quote(n));
    os << ", op_names=(" << join(q, ", ") << (q.size() == 1 ? ",)" : ")");
  }
  if (r.weight_qtype) os << ", weight_qtype=" << quote(*r.weight_qtype);
  if (r.act_qtype) os << ", act_qtype=" << quote(*r.act_qtype);
  if (r.tile_size) os << ", tile_size=" << format_number(*r.tile_size);
  if (r.act_static_scale) os << ", act_static_scale=True";
  if (r.weight_calibration_method != "absmax") os << ", weight_calibration_method=" << quote(r.weight_calibration_method);
  if (r.act_calibration_method != "absmax") os << ", act_calibration_method=" << quote(r.act_calibration_method);
  if (r.act_batch_axes != std::vector<int64_t>{0}) os << ", act_batch_axes=" << axes_repr(r.act_batch_axes);
  if (r.clip_gradient) os << ", clip_gradient=" << (*r.clip_gradient ? "True" : "False");
  os << ")";
  return os.str();
}

void validate_rule(const QuantizationRule& r) {
  rules_internal::compile_module_path(r.module_path);

  const auto& valid = valid_op_names();
  for (const auto& name : r.op_names) {
    TORCH_CHECK_VALUE(std::find(valid.begin(), valid.end(), name) != valid.end(), "qwix: QuantizationRule.op_names: ",
                      "unknown op name '", name, "'; valid op names: ", join(valid, ", "));
  }

  const auto check_pair = [](const char* qfield, const std::optional<std::string>& qtype, const char* cfield,
                             const std::string& method) {
    const Calibration c = with_field(cfield, [&] { return parse_calibration(method); });
    if (!qtype) return;
    const QType q = with_field(qfield, [&] { return parse_qtype(*qtype); });
    TORCH_CHECK_VALUE(!q.two_level || c.is_plain_absmax(),
                      "qwix: QuantizationRule.", cfield, " '", method, "' is not supported with ", qfield,
                      " 'nvfp4', whose two-level scales come from absmax (use 'absmax')");
    TORCH_CHECK_VALUE(q.is_integer() || c.symmetric(), "qwix: QuantizationRule.", cfield, " '", method,
                      "' is asymmetric, which needs an integer qtype, but ", qfield, " is '", *qtype,
                      "' (use absmax, rms or a symmetric fixed range)");
  };
  check_pair("weight_qtype", r.weight_qtype, "weight_calibration_method", r.weight_calibration_method);
  check_pair("act_qtype", r.act_qtype, "act_calibration_method", r.act_calibration_method);

  if (r.tile_size) {
    const double t = *r.tile_size;
    TORCH_CHECK_VALUE(std::isfinite(t) && t > 0.0, "qwix: QuantizationRule.tile_size must be positive, got ",
                      format_number(t));
    TORCH_CHECK_VALUE(t < 1.0 || (t == std::floor(t) && t <= 0x1p62), "qwix: QuantizationRule.tile_size ",
                      format_number(t), " must be an integer number of elements (>= 1, at most 2^62) or a fraction "
                      "of the axis in (0, 1)");
  }

  TORCH_CHECK_VALUE(!r.act_static_scale || r.act_qtype,
                    "qwix: QuantizationRule.act_static_scale=True needs an act_qtype (static scales are for "
                    "activations), but act_qtype is None");
  TORCH_CHECK_VALUE(!r.act_static_scale || !parse_qtype(*r.act_qtype).two_level,
                    "qwix: QuantizationRule.act_static_scale=True is not supported with act_qtype 'nvfp4', whose "
                    "two-level scales are dynamic (computed from each tensor)");

  std::vector<int64_t> axes = r.act_batch_axes;
  std::sort(axes.begin(), axes.end());
  TORCH_CHECK_VALUE(std::adjacent_find(axes.begin(), axes.end()) == axes.end(),
                    "qwix: QuantizationRule.act_batch_axes ", axes_repr(r.act_batch_axes), " repeats an axis");
}

struct QatProvider::Matchers {
  std::vector<std::regex> regexes;
};

QatProvider::QatProvider(std::vector<QuantizationRule> rules) : rules_(std::move(rules)) {
  auto matchers = std::make_shared<Matchers>();
  matchers->regexes.reserve(rules_.size());
  for (size_t i = 0; i < rules_.size(); ++i) {
    try {
      validate_rule(rules_[i]);
    } catch (const c10::ValueError& e) {
      TORCH_CHECK_VALUE(false, "qwix: QatProvider rule ", i, ": ", rules_internal::message(e));
      throw;  // unreachable
    }
    matchers->regexes.push_back(rules_internal::compile_module_path(rules_[i].module_path));
  }
  matchers_ = std::move(matchers);
  used_ = UsageFlags(rules_.size());
}

std::optional<int64_t> QatProvider::match_rule(const std::string& module_path, const std::string& op_name) const {
  for (size_t i = 0; i < rules_.size(); ++i) {
    const auto& names = rules_[i].op_names;
    if (!names.empty() && std::find(names.begin(), names.end(), op_name) == names.end()) continue;
    if (std::regex_match(module_path, matchers_->regexes[i])) return static_cast<int64_t>(i);
  }
  return std::nullopt;
}

bool QatProvider::decomposes_attention(const std::string& module_path) const {
  const auto i = match_rule(module_path, "matmul");
  return i && rules_[*i].act_qtype.has_value();
}

std::optional<int64_t> QatProvider::find_rule(const std::string& module_path, const std::string& op_name) {
  auto i = match_rule(module_path, op_name);
  if (i) used_.set(static_cast<size_t>(*i));
  return i;
}

std::optional<OpPlan> QatProvider::plan(const std::string& module_path, const std::string& op_name,
                                        const OperandInfo& lhs, const OperandInfo& rhs,
                                        const std::string& einsum_equation) {
  const auto& valid = valid_op_names();
  TORCH_CHECK_VALUE(std::find(valid.begin(), valid.end(), op_name) != valid.end(), "qwix: unknown op name '", op_name,
                    "'; valid op names: ", join(valid, ", "));
  const auto i = find_rule(module_path, op_name);
  if (!i) return std::nullopt;
  try {
    OpPlan p = plan_op(rules_[*i], op_name, lhs, rhs, einsum_equation);
    p.rule_index = *i;
    return p;
  } catch (const c10::ValueError& e) {
    TORCH_CHECK_VALUE(false, "qwix: module '", module_path, "' (", rule_repr(rules_[*i]), "): ",
                      rules_internal::message(e));
    throw;  // unreachable
  }
}

std::vector<int64_t> QatProvider::unused_rule_indices() const {
  std::vector<int64_t> out;
  for (size_t i = 0; i < used_.size(); ++i)
    if (!used_.get(i)) out.push_back(static_cast<int64_t>(i));
  return out;
}

std::vector<QuantizationRule> QatProvider::get_unused_rules() const {
  std::vector<QuantizationRule> out;
  for (int64_t i : unused_rule_indices()) out.push_back(rules_[i]);
  return out;
}

bool QatProvider::is_used(int64_t index) const {
  TORCH_CHECK_INDEX(index >= 0 && index < static_cast<int64_t>(used_.size()), "qwix: rule index ", index,
                    " out of range for ", used_.size(), " rules");
  return used_.get(static_cast<size_t>(index));
}

void QatProvider::mark_used(int64_t index) {
  TORCH_CHECK_INDEX(index >= 0 && index < static_cast<int64_t>(used_.size()), "qwix: rule index ", index,
                    " out of range for ", used_.size(), " rules");
  used_.set(static_cast<size_t>(index));
}

bool QatProvider::may_quantize(const std::vector<std::string>& module_paths) const {
  for (const auto& path : module_paths) {
    for (size_t i = 0; i < rules_.size(); ++i) {
      if (!std::regex_match(path, matchers_->regexes[i])) continue;
      if (rules_[i].weight_qtype || rules_[i].act_qtype) return true;
      if (rules_[i].op_names.empty()) break;  // excludes every op of this module
    }
  }
  return false;
}

std::string QatProvider::nothing_matched_warning(const std::vector<std::string>& module_paths,
                                                 bool ran_forward) const {
  if (rules_.empty()) return "";
  if (ran_forward) {
    if (unused_rule_indices().size() != rules_.size()) return "";
  } else {
    for (const auto& re : matchers_->regexes)
      for (const auto& path : module_paths)
        if (std::regex_match(path, re)) return "";
  }
  std::string shown;
  for (size_t i = 0; i < module_paths.size() && i < 6; ++i) shown += (i ? ", '" : "'") + module_paths[i] + "'";
  if (module_paths.size() > 6) shown += ", ...";
  return std::string("qwix: ") +
         (ran_forward ? "no rule matched any op of the example forward"
                      : "no rule's module_path matches any module of this model") +
         ", so nothing is quantized; module_path is a full match on module paths such as " + shown;
}

}  // namespace qwix
