#include "numerics/granularity.h"

#include <c10/util/Exception.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <numeric>

namespace qwix {
namespace {

int64_t normalize_axis(int64_t axis, int64_t rank, const char* what) {
  TORCH_CHECK_INDEX(axis >= -rank && axis < rank, "qwix: ", what, " axis ", axis, " is out of range for a tensor of rank ",
                    rank, " (allowed: ", -rank, " to ", rank - 1, ")");
  return axis < 0 ? axis + rank : axis;
}

}  // namespace

Groups groups_from_axes(c10::IntArrayRef sizes, c10::IntArrayRef channelwise_axes, c10::IntArrayRef tiled_axes,
                        c10::IntArrayRef tile_sizes) {
  const int64_t rank = static_cast<int64_t>(sizes.size());
  TORCH_CHECK_VALUE(tiled_axes.size() == tile_sizes.size(), "qwix: tiled_axes (", tiled_axes.size(),
                    " entries) and tile_sizes (", tile_sizes.size(), " entries) must have the same length");
  Groups groups(rank, 1);
  std::vector<bool> seen(rank, false);
  for (int64_t a : channelwise_axes) {
    const int64_t ax = normalize_axis(a, rank, "channelwise");
    TORCH_CHECK_VALUE(!seen[ax], "qwix: axis ", a, " is repeated in channelwise_axes/tiled_axes; each axis may appear once");
    seen[ax] = true;
    groups[ax] = sizes[ax];
  }
  for (const auto i : c10::irange(tiled_axes.size())) {
    const int64_t ax = normalize_axis(tiled_axes[i], rank, "tiled");
    TORCH_CHECK_VALUE(!seen[ax], "qwix: axis ", tiled_axes[i],
                      " is repeated in channelwise_axes/tiled_axes; each axis may appear once");
    seen[ax] = true;
    const int64_t tile = tile_sizes[i];
    TORCH_CHECK_VALUE(tile > 0, "qwix: tile size ", tile, " for axis ", tiled_axes[i], " must be a positive integer");
    TORCH_CHECK_VALUE(sizes[ax] % tile == 0, "qwix: tile size ", tile, " does not divide axis ", tiled_axes[i],
                      " of size ", sizes[ax]);
    groups[ax] = sizes[ax] / tile;
  }
  return groups;
}

Groups groups_from_scale_shape(c10::IntArrayRef sizes, c10::IntArrayRef scale_sizes, const char* what) {
  const int64_t rank = static_cast<int64_t>(sizes.size());
  const int64_t srank = static_cast<int64_t>(scale_sizes.size());
  TORCH_CHECK_VALUE(srank <= rank, "qwix: ", what, " of shape ", scale_sizes, " has more dims than the input of shape ",
                    sizes);
  Groups groups(rank, 1);
  for (int64_t i = 0; i < srank; ++i) {
    const int64_t ax = rank - srank + i;
    const int64_t g = scale_sizes[i];
    const bool ok = g == 1 || g == sizes[ax] || (g > 0 && sizes[ax] % g == 0);
    TORCH_CHECK_VALUE(ok, "qwix: ", what, " of shape ", scale_sizes, " does not fit the input of shape ", sizes,
                      ": dim ", ax, " is ", g, ", allowed are 1, ", sizes[ax], " or a divisor of it (one scale per tile)");
    groups[ax] = g;
  }
  return groups;
}

int64_t Layout::group_of_run(int64_t r) const {
  int64_t g = 0, gstride = inner_kept() ? inner() : 1;
  for (int64_t s = static_cast<int64_t>(seg_size.size()) - 2; s >= 0 && r > 0; --s) {
    const int64_t digit = r % seg_size[s];
    r /= seg_size[s];
    if (seg_kept[s]) {
      g += digit * gstride;
      gstride *= seg_size[s];
    }
  }
  return g;
}

Layout make_layout(c10::IntArrayRef sizes, c10::IntArrayRef strides, const Groups& groups) {
  Layout l;
  const int64_t rank = static_cast<int64_t>(sizes.size());
  l.perm.resize(rank);
  std::iota(l.perm.begin(), l.perm.end(), 0);
  // Memory order: larger strides first; size-1 axes carry no elements.
  std::stable_sort(l.perm.begin(), l.perm.end(), [&](int64_t a, int64_t b) {
    const bool a1 = sizes[a] == 1, b1 = sizes[b] == 1;
    if (a1 != b1) return b1;
    return a1 ? false : strides[a] > strides[b];
  });
  l.numel = 1;
  for (int64_t a : l.perm) l.numel *= sizes[a];
  l.num_groups = 1;
  for (int64_t a = 0; a < rank; ++a) l.num_groups *= groups[a];
  if (l.numel == 0) return l;
  auto push = [&](int64_t size, bool kept) {
    if (size == 1) return;
    if (!l.seg_size.empty() && l.seg_kept.back() == kept) {
      l.seg_size.back() *= size;
    } else {
      l.seg_size.push_back(size);
      l.seg_kept.push_back(kept);
    }
  };
  for (int64_t a : l.perm) {
    push(groups[a], true);
    push(sizes[a] / groups[a], false);
  }
  return l;
}

}  // namespace qwix
