#include "numerics/qtype.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <map>

namespace qwix {
namespace {

QType make_int(const std::string& name, int bits, bool is_unsigned) {
  const float levels = std::ldexp(1.0f, bits);  // 2^N
  QParams p{};
  p.kind = QKind::Int;
  p.qmin = is_unsigned ? 0.0f : -levels / 2;
  p.qmax = is_unsigned ? levels - 1 : levels / 2 - 1;
  p.bound = is_unsigned ? levels - 0.5f : levels / 2 - 0.5f;
  return {name, p};
}

QType make_float(const std::string& name, int mantissa_bits, int min_exponent, float max_value) {
  QParams p{};
  p.kind = QKind::Float;
  p.qmin = -max_value;
  p.qmax = max_value;
  p.bound = max_value;
  p.mantissa_bits = mantissa_bits;
  p.min_exponent = min_exponent;
  return {name, p};
}

// MX: the element format of `element` with one power-of-two scale per block of 32.
QType make_mx(const std::string& name, const QType& element) {
  QType q = element;
  q.name = name;
  q.p.block = kMxBlock;
  q.p.pow2_scale = true;
  return q;
}

// nvfp4: e2m1 elements, e4m3 scales per block of 16, an fp32 tensor scale.
QType make_nvfp4(const QType& e2m1) {
  QType q = e2m1;
  q.name = "nvfp4";
  q.p.block = kNvfp4Block;
  q.two_level = true;
  return q;
}

QType make_nf4() {
  QParams p{};
  p.kind = QKind::NF4;
  p.qmin = -1.0f;
  p.qmax = 1.0f;
  p.bound = 1.0f;
  return {"nf4", p};
}

const std::map<std::string, QType>& table() {
  static const std::map<std::string, QType> t = [] {
    std::map<std::string, QType> m;
    for (int bits = 2; bits <= 8; ++bits) {
      const std::string n = "int" + std::to_string(bits);
      m.emplace(n, make_int(n, bits, false));
    }
    m.emplace("int16", make_int("int16", 16, false));
    m.emplace("uint4", make_int("uint4", 4, true));
    m.emplace("uint8", make_int("uint8", 8, true));
    m.emplace("float8_e4m3fn", make_float("float8_e4m3fn", 3, -6, 448.0f));
    m.emplace("float8_e5m2", make_float("float8_e5m2", 2, -14, 57344.0f));
    m.emplace("float4_e2m1fn", make_float("float4_e2m1fn", 1, 0, 6.0f));
    m.emplace("nf4", make_nf4());
    m.emplace("mxfp8", make_mx("mxfp8", m.at("float8_e4m3fn")));
    m.emplace("mxfp4", make_mx("mxfp4", m.at("float4_e2m1fn")));
    m.emplace("nvfp4", make_nvfp4(m.at("float4_e2m1fn")));
    m.emplace("fp8_e4m3", m.at("float8_e4m3fn"));
    m.emplace("fp8_e5m2", m.at("float8_e5m2"));
    m.emplace("fp4_e2m1", m.at("float4_e2m1fn"));
    return m;
  }();
  return t;
}

}  // namespace

const std::string& valid_qtype_names() {
  static const std::string names =
      "int2, int3, int4, int5, int6, int7, int8, int16, uint4, uint8, float8_e4m3fn (fp8_e4m3), "
      "float8_e5m2 (fp8_e5m2), float4_e2m1fn (fp4_e2m1), nf4, mxfp8, mxfp4, nvfp4";
  return names;
}

QType parse_qtype(const std::string& name) {
  const auto& t = table();
  auto it = t.find(name);
  if (it == t.end()) {
    TORCH_CHECK_VALUE(false, "qwix: unknown qtype '", name, "'; valid qtypes: ", valid_qtype_names());
  }
  return it->second;
}

}  // namespace qwix
