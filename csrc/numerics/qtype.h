#pragma once
#include <string>

#include "numerics/host_device.h"

namespace qwix {

// How values are snapped to the grid; the kernels are templated on it.
enum class QKind : int { Int = 0, Float = 1, NF4 = 2 };

// Plain-old-data view of a qtype, passed by value into CPU and CUDA kernels.
struct QParams {
  QKind kind;
  float qmin;    // Int: lowest grid value; Float/NF4: -max
  float qmax;    // Int: highest grid value; Float/NF4: +max
  float bound;   // symmetric bound B: scale = absmax / B
  int mantissa_bits;  // Float: explicit mantissa bits
  int min_exponent;   // Float: unbiased exponent of the smallest normal
  // Block formats: blocks of `block` elements along the last axis (0: not one).
  // mxfp8/mxfp4: each block has a power-of-two (E8M0) scale (pow2_scale).
  int block;
  bool pow2_scale;
};

struct QType {
  std::string name;  // canonical name
  QParams p;
  bool is_integer() const { return p.kind == QKind::Int; }
  // nvfp4: e2m1 elements, one e4m3 scale per block of 16 times one fp32 tensor
  // scale (computed by composing the ops, csrc/ops/nvfp4.cpp).
  bool two_level = false;
  bool is_block_format() const { return p.block > 0; }
};

// Blocks of an MX qtype (Qwix, OCP MX): 32 elements along the last axis.
constexpr int kMxBlock = 32;
// Blocks of nvfp4: 16 elements along the last axis.
constexpr int kNvfp4Block = 16;

// Parses a qtype name (Qwix spelling or an accepted alias). Throws a
// c10::Error naming the bad value and listing the valid names.
QType parse_qtype(const std::string& name);

// The valid names, comma separated, for error messages and docs.
const std::string& valid_qtype_names();

}  // namespace qwix
