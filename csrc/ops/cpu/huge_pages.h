#pragma once
// Large fresh outputs on Linux are page-faulted 4 KiB at a time, which can cost
// more than the kernel itself. Asking for transparent huge pages on the
// output's range (where THP is in "madvise" mode) cuts the faults ~500x.
#include <ATen/core/Tensor.h>

#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace qwix {
namespace cpu {

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const size_t bytes = t.numel() * t.element_size();
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(t.data_ptr()) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(t.data_ptr()) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // a hint: errors are harmless
#else
  (void)t;
#endif
}

}  // namespace cpu
}  // namespace qwix
