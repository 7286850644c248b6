#include "numerics/calibration.h"

#include <c10/util/Exception.h>

#include <cctype>
#include <cmath>
#include <sstream>
#include <vector>

namespace qwix {
namespace {

constexpr const char* kForms = "expected one of 'absmax[,s]', 'minmax[,s]', 'rms[,s]', 'fixed,a[,b]'";

// A decimal number that float32 holds: finite after narrowing, and not a nonzero that narrows to 0
// (std::stod alone would also take hex, "inf" and "nan").
bool parse_number(const std::string& s, float* out) {
  if (s.empty()) return false;
  for (char c : s)
    if (!std::isdigit(static_cast<unsigned char>(c)) && c != '.' && c != 'e' && c != '+' && c != '-') return false;
  try {
    size_t used = 0;
    const double v = std::stod(s, &used);
    const float f = static_cast<float>(v);
    if (used != s.size() || !std::isfinite(f) || (f == 0.0f && v != 0.0)) return false;
    *out = f;
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace

Calibration parse_calibration(const std::string& text) {
  std::string norm;
  for (char c : text) {
    if (!std::isspace(static_cast<unsigned char>(c))) norm += static_cast<char>(std::tolower(c));
  }
  std::vector<std::string> parts;
  std::stringstream ss(norm);
  std::string item;
  while (std::getline(ss, item, ',')) parts.push_back(item);
  if (!norm.empty() && norm.back() == ',') parts.push_back("");

  Calibration c;
  c.text = text;
  const std::string name = parts.empty() ? "" : parts[0];
  std::vector<float> args;
  for (size_t i = 1; i < parts.size(); ++i) {
    float v;
    TORCH_CHECK_VALUE(parse_number(parts[i], &v), "qwix: malformed calibration method '", text, "': '", parts[i],
                      "' is not a decimal number that float32 can hold (finite, and not a nonzero that rounds to 0); ", kForms);
    args.push_back(v);
  }
  if (name == "absmax" || name == "minmax" || name == "rms") {
    c.kind = name == "absmax" ? Calibration::Kind::AbsMax
             : name == "minmax" ? Calibration::Kind::MinMax
                                : Calibration::Kind::Rms;
    TORCH_CHECK_VALUE(args.size() <= 1, "qwix: malformed calibration method '", text, "': '", name,
                      "' takes at most one scale factor; ", kForms);
    if (!args.empty()) c.multiplier = args[0];
    TORCH_CHECK_VALUE(c.multiplier > 0.0f, "qwix: calibration method '", text, "': the scale factor must be > 0, got ",
                      c.multiplier);
    return c;
  }
  if (name == "fixed") {
    TORCH_CHECK_VALUE(args.size() == 1 || args.size() == 2, "qwix: malformed calibration method '", text,
                      "': 'fixed' takes one or two numbers; ", kForms);
    c.kind = Calibration::Kind::Fixed;
    if (args.size() == 1) {
      TORCH_CHECK_VALUE(args[0] > 0.0f, "qwix: calibration method '", text,
                        "': 'fixed,a' needs a > 0 (range [-a, a]), got a = ", args[0]);
      c.fixed_lo = -args[0];
      c.fixed_hi = args[0];
    } else {
      TORCH_CHECK_VALUE(args[0] <= 0.0f && args[1] >= 0.0f && args[0] < args[1], "qwix: calibration method '", text,
                        "': the fixed range [", args[0], ", ", args[1], "] must contain 0 and be non-empty");
      c.fixed_lo = args[0];
      c.fixed_hi = args[1];
    }
    return c;
  }
  TORCH_CHECK_VALUE(false, "qwix: malformed calibration method '", text, "'; ", kForms);
}

}  // namespace qwix
