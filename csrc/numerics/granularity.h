#pragma once
// Which elements share a scale. Per logical axis a "group count": the axis'
// size (channelwise), size / tile (tiled) or 1 (reduced). The calibration
// tensor has exactly these sizes (keepdim), and a given scale tensor's shape
// is read the same way.
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <vector>

namespace qwix {

using Groups = std::vector<int64_t>;

// Validates and resolves channelwise axes and {axis: tile} (tiles in elements).
Groups groups_from_axes(c10::IntArrayRef sizes, c10::IntArrayRef channelwise_axes, c10::IntArrayRef tiled_axes,
                        c10::IntArrayRef tile_sizes);

// Reads the groups off a scale (or zero point) tensor's shape; shapes align to
// the right as in broadcasting, each dim 1, the axis' size, or a divisor of it.
Groups groups_from_scale_shape(c10::IntArrayRef sizes, c10::IntArrayRef scale_sizes, const char* what);

// x's elements in memory order, cut into alternating segments of kept (group)
// and reduced extents; consecutive axes of the same kind are merged. Group ids
// are row-major over the kept segments, i.e. the calibration tensor permuted to
// x's memory order and made contiguous.
struct Layout {
  std::vector<int64_t> seg_size;  // outermost first
  std::vector<bool> seg_kept;
  std::vector<int64_t> perm;      // logical axes, outermost in memory first
  int64_t num_groups = 1;
  int64_t numel = 0;

  int64_t inner() const { return seg_size.empty() ? 1 : seg_size.back(); }
  bool inner_kept() const { return !seg_kept.empty() && seg_kept.back(); }
  int64_t runs() const { return numel / inner(); }
  // Group id of the first element of run r (runs are the innermost segments).
  int64_t group_of_run(int64_t r) const;
  // One contiguous run per group: [kept..., reduced] or [reduced].
  bool rows() const { return !inner_kept() && seg_size.size() <= 2; }
};

// `strides` are those of the dense tensor the kernel walks.
Layout make_layout(c10::IntArrayRef sizes, c10::IntArrayRef strides, const Groups& groups);

}  // namespace qwix
