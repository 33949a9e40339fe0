// A persistent pool of the library's own threads. We do not use OpenMP so
// that we never fight NumPy's BLAS or PyTorch's runtime over the cores.
//
// parallel_for hands out task indices dynamically from an atomic counter,
// the calling thread works too, and the first exception a task throws is
// carried back to the caller after every worker has stopped.
#pragma once

#include <cstdint>
#include <functional>

namespace tileattn {

// fn(task_index, worker_index); worker_index is in [0, num_threads()).
using TaskFn = std::function<void(int64_t, int)>;

void parallel_for(int64_t num_tasks, const TaskFn& fn);

int num_threads();
void set_num_threads(int n);
int default_num_threads();

}  // namespace tileattn
