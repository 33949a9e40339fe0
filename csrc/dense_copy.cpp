#include "dense_copy.h"

#include <algorithm>
#include <cstring>

#include "thread_pool.h"

namespace tileattn {

// Rows (the last axis) are handed out in tasks of ~256 KiB: enough work per
// task that the pool's hand-off is negligible, enough tasks to share
// between threads. Page faults of a freshly allocated dst are taken by
// whichever thread writes the page, so they are spread too.
void copy_dense(const void* src, const int64_t shape[4], const int64_t src_strides[4],
                int64_t itemsize, void* dst) {
  const int64_t rows = shape[0] * shape[1] * shape[2], row_bytes = shape[3] * itemsize;
  if (rows == 0 || row_bytes == 0) return;
  const int64_t per_task = std::max<int64_t>(1, (256 * 1024) / row_bytes);
  const int64_t tasks = (rows + per_task - 1) / per_task;
  const bool unit = src_strides[3] == itemsize;
  const char* s = static_cast<const char*>(src);
  char* d = static_cast<char*>(dst);
  parallel_for(tasks, [&](int64_t task, int) {
    const int64_t r0 = task * per_task, r1 = std::min(rows, r0 + per_task);
    // The task's first row as (i0, i1, i2), then stepped row by row.
    int64_t i2 = r0 % shape[2], i1 = (r0 / shape[2]) % shape[1], i0 = r0 / (shape[2] * shape[1]);
    for (int64_t r = r0; r < r1; ++r) {
      const char* from = s + i0 * src_strides[0] + i1 * src_strides[1] + i2 * src_strides[2];
      char* to = d + r * row_bytes;
      if (unit) {
        std::memcpy(to, from, static_cast<size_t>(row_bytes));
      } else {
        for (int64_t e = 0; e < shape[3]; ++e)
          std::memcpy(to + e * itemsize, from + e * src_strides[3], static_cast<size_t>(itemsize));
      }
      if (++i2 == shape[2]) {
        i2 = 0;
        if (++i1 == shape[1]) {
          i1 = 0;
          ++i0;
        }
      }
    }
  });
}

}  // namespace tileattn
