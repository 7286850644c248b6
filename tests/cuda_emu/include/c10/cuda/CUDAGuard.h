#pragma once
// CUDA emulator stand-in: the emulated device is the CPU, there is nothing to switch.
#include <c10/core/Device.h>
namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10
