// A persistent pool of the library's own threads. We do not use OpenMP so
// that we never fight NumPy's BLAS or PyTorch's runtime over the cores.
//
// parallel_for hands out task indices dynamically from an atomic counter,
// the calling thread works too, and the first exception a task throws is
// carried back to the caller after every worker has stopped.
//
// Long jobs are cancellable: kernels call cancellation_point() between
// blocks. On the thread that called parallel_for it runs the caller's poll
// function (see ScopedPoll) at most every 50 ms; when that returns true,
// every thread throws Cancelled at its next cancellation point and
// parallel_for throws Cancelled.
#pragma once

#include <cstdint>
#include <exception>
#include <functional>

namespace tileattn {

// fn(task_index, worker_index); worker_index is in [0, num_threads()).
using TaskFn = std::function<void(int64_t, int)>;

void parallel_for(int64_t num_tasks, const TaskFn& fn);

struct Cancelled : std::exception {
  const char* what() const noexcept override { return "tileattn: computation cancelled"; }
};

// Within a task: throws Cancelled if the job has been cancelled.
void cancellation_point();

// Installs, for the current thread's next parallel_for calls, a function
// that says whether to cancel (e.g. "a signal is pending in Python").
class ScopedPoll {
 public:
  explicit ScopedPoll(std::function<bool()> poll);
  ~ScopedPoll();
  ScopedPoll(const ScopedPoll&) = delete;
  ScopedPoll& operator=(const ScopedPoll&) = delete;

 private:
  std::function<bool()> previous_;
};

int num_threads();
void set_num_threads(int n);
int default_num_threads();

}  // namespace tileattn
