#pragma once
// Helpers shared by the rules sources (not part of the public API).
#include <c10/util/Exception.h>

#include <cstdint>
#include <regex>
#include <string>
#include <vector>

namespace qwix {
struct QuantizationRule;
}

namespace qwix::rules_internal {

std::string join(const std::vector<std::string>& parts, const char* sep);
std::string format_number(double v);
// A c10::Error's message without its "qwix: " prefix, to nest it in another.
std::string message(const c10::Error& e);
// An op's c10::ValueError with where it ran, as the Python path words it:
// "qwix: <site> (rule <repr>): <message>", site as "module 'fc', op linear0".
[[noreturn]] void throw_at_site(const c10::ValueError& e, const std::string& site, const QuantizationRule& rule);
// std::regex (ECMAScript); a c10::ValueError naming the pattern when it does not compile.
std::regex compile_module_path(const std::string& pattern);

// The axes of one einsum operand, from the equation (two operands, "->" optional,
// "..." allowed). kept: the label appears in the output; contracting: the label
// appears in the other operand and not in the output, in the order of the lhs.
struct EinsumOperandAxes {
  std::vector<int64_t> kept;         // channelwise
  std::vector<int64_t> contracting;  // ordered by the lhs' label order (the same labels for both operands)
};
EinsumOperandAxes einsum_operand_axes(const std::string& equation, int operand, int64_t rank);

}  // namespace qwix::rules_internal
