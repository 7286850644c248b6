#pragma once
// Work splitting for the CPU kernels. Chunk boundaries depend only on the
// sizes (never on the thread count), so results are identical for any number
// of threads, and they fall on multiples of `align` elements so that chunks
// never share a byte of a bit-packed mask.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <numeric>

#include "numerics/granularity.h"

namespace qwix {
namespace cpu {

constexpr int64_t kMinChunk = 1 << 16;  // elements
constexpr int64_t kMaxChunks = 64;

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

inline int64_t chunk_size(int64_t total, int64_t align, int64_t min_chunk) {
  const int64_t c = std::max<int64_t>(min_chunk, (total + kMaxChunks - 1) / kMaxChunks);
  return round_up(std::max<int64_t>(c, 1), align);
}

// f(chunk_index, begin, end) for chunks of [0, total).
template <typename F>
void parallel_chunks(int64_t total, int64_t align, int64_t min_chunk, const F& f) {
  if (total <= 0) return;
  const int64_t chunk = chunk_size(total, align, min_chunk);
  const int64_t n = (total + chunk - 1) / chunk;
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) f(c, c * chunk, std::min(total, (c + 1) * chunk));
  });
}

inline int64_t num_chunks(int64_t total, int64_t align, int64_t min_chunk) {
  if (total <= 0) return 0;
  const int64_t chunk = chunk_size(total, align, min_chunk);
  return (total + chunk - 1) / chunk;
}

// f(pos, len, group): the pieces of [begin, end) that lie in one innermost run.
// With an inner reduced segment the whole piece is `group`; with an inner kept
// segment element i of the piece is group + i.
template <typename F>
void for_each_piece(const Layout& l, int64_t begin, int64_t end, const F& f) {
  const int64_t L = l.inner();
  const bool kept = l.inner_kept();
  int64_t pos = begin;
  while (pos < end) {
    const int64_t run = pos / L, off = pos - run * L;
    const int64_t len = std::min(L - off, end - pos);
    f(pos, len, l.group_of_run(run) + (kept ? off : 0));
    pos += len;
  }
}

// Rows per block so that each block starts on a multiple of 8 elements.
inline int64_t rows_align(int64_t row_len) { return 8 / std::gcd<int64_t>(row_len, 8); }

}  // namespace cpu
}  // namespace qwix
