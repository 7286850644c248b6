#pragma once
#include <string>

namespace qwix {

// A calibration method in Qwix syntax: absmax[,s], minmax[,s], rms[,s], fixed,a[,b].
struct Calibration {
  enum class Kind { AbsMax, MinMax, Rms, Fixed };
  Kind kind = Kind::AbsMax;
  float multiplier = 1.0f;  // s
  float fixed_lo = 0.0f;    // fixed: the range [fixed_lo, fixed_hi]
  float fixed_hi = 0.0f;
  std::string text;         // as given, for messages

  // Symmetric methods produce one tensor (absmax); asymmetric ones min and max.
  bool symmetric() const {
    return kind == Kind::AbsMax || kind == Kind::Rms || (kind == Kind::Fixed && fixed_lo == -fixed_hi);
  }
  // Whether the calibrated range can be narrower than the data (then the
  // straight-through gradient is masked to it by default, as in Qwix).
  bool can_clip() const {
    return kind == Kind::Rms || kind == Kind::Fixed || multiplier < 1.0f;
  }
  // Data-independent (always per-tensor).
  bool is_fixed() const { return kind == Kind::Fixed; }
  // Plain `absmax` (no factor): what nvfp4's two-level scales are computed from.
  bool is_plain_absmax() const { return kind == Kind::AbsMax && multiplier == 1.0f; }
};

// Parses a method string (case-insensitive, spaces ignored). Throws a
// c10::ValueError naming the string and the accepted forms.
Calibration parse_calibration(const std::string& text);

}  // namespace qwix
