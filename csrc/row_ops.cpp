#include "row_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "thread_pool.h"

namespace tileattn {
namespace {

// Partial sums per row: independent chains the compiler keeps in one
// vector register (no reassociation needed, so no -ffast-math).
constexpr int kLanes = 16;

template <typename T>
T row_sum(const T* x, int64_t e) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= e; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += x[i + j];
  for (int j = 0; i < e; ++i, ++j) acc[j] += x[i];
  T s = 0;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

template <typename T>
T row_sum_squares(const T* x, int64_t e) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= e; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += x[i + j] * x[i + j];
  for (int j = 0; i < e; ++i, ++j) acc[j] += x[i] * x[i];
  T s = 0;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

template <typename T>
void layer_norm_typed(int64_t M, int64_t E, T* rows, int64_t ld, const T* weight, const T* bias,
                      T eps, T* inv_std) {
  const T inv_e = T(1) / static_cast<T>(E);
  // ~64 KiB of rows per task: enough to amortise the hand-off.
  const int64_t per_task = std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, E * sizeof(T)));
  const int64_t tasks = (M + per_task - 1) / per_task;
  parallel_for(tasks, [&](int64_t task, int) {
    const int64_t m1 = std::min(M, (task + 1) * per_task);
    for (int64_t m = task * per_task; m < m1; ++m) {
      T* x = rows + m * ld;
      const T mean = row_sum(x, E) * inv_e;
      for (int64_t i = 0; i < E; ++i) x[i] -= mean;
      const T inv = T(1) / std::sqrt(row_sum_squares(x, E) * inv_e + eps);
      if (inv_std) inv_std[m] = inv;
      if (weight && bias)
        for (int64_t i = 0; i < E; ++i) x[i] = x[i] * inv * weight[i] + bias[i];
      else if (weight)
        for (int64_t i = 0; i < E; ++i) x[i] = x[i] * inv * weight[i];
      else
        for (int64_t i = 0; i < E; ++i) x[i] = x[i] * inv;
    }
  });
}

}  // namespace

void move_rows(const char* src, int64_t src_stride, const int64_t* src_index, char* dst,
               int64_t dst_stride, const int64_t* dst_index, int64_t n, int64_t row_bytes,
               const int64_t* zero_index, int64_t n_zero) {
  if (row_bytes == 0) return;
  // ~256 KiB per task, as copy_dense.
  const int64_t per_task = std::max<int64_t>(1, (256 * 1024) / row_bytes);
  const int64_t copy_tasks = (n + per_task - 1) / per_task;
  const int64_t zero_tasks = (n_zero + per_task - 1) / per_task;
  parallel_for(copy_tasks + zero_tasks, [&](int64_t task, int) {
    if (task < copy_tasks) {
      const int64_t i1 = std::min(n, (task + 1) * per_task);
      for (int64_t i = task * per_task; i < i1; ++i) {
        const int64_t s = src_index ? src_index[i] : i, d = dst_index ? dst_index[i] : i;
        std::memcpy(dst + d * dst_stride, src + s * src_stride, static_cast<size_t>(row_bytes));
      }
    } else {
      const int64_t z0 = (task - copy_tasks) * per_task, z1 = std::min(n_zero, z0 + per_task);
      for (int64_t j = z0; j < z1; ++j)
        std::memset(dst + zero_index[j] * dst_stride, 0, static_cast<size_t>(row_bytes));
    }
  });
}

void layer_norm_rows(DType dtype, int64_t M, int64_t E, void* rows, int64_t ld,
                     const void* weight, const void* bias, double eps, void* inv_std) {
  if (M == 0 || E == 0) return;
  if (dtype == DType::f64)
    layer_norm_typed<double>(M, E, static_cast<double*>(rows), ld,
                             static_cast<const double*>(weight), static_cast<const double*>(bias),
                             eps, static_cast<double*>(inv_std));
  else
    layer_norm_typed<float>(M, E, static_cast<float*>(rows), ld, static_cast<const float*>(weight),
                            static_cast<const float*>(bias), static_cast<float>(eps),
                            static_cast<float*>(inv_std));
}

}  // namespace tileattn
