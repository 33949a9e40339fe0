#include "thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__GLIBCXX__)
#include <cxxabi.h>
#endif

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif

namespace tileattn {
namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kPollInterval = std::chrono::milliseconds(50);
// How long a worker watches for the next job after finishing one.
constexpr auto kSpinFor = std::chrono::microseconds(100);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// What the threads working on one job share about cancelling it.
struct JobContext {
  std::atomic<bool> cancelled{false};
  const std::function<bool()>* poll = nullptr;  // run by the caller only
  Clock::time_point last_poll = Clock::now();

  // The caller's check: polls at most every kPollInterval.
  bool poll_now() {
    if (!poll || !*poll) return false;
    const Clock::time_point now = Clock::now();
    if (now - last_poll < kPollInterval) return false;
    last_poll = now;
    if ((*poll)()) cancelled.store(true, std::memory_order_relaxed);
    return cancelled.load(std::memory_order_relaxed);
  }
};

thread_local JobContext* tl_job = nullptr;  // the job this thread is working on
thread_local bool tl_is_caller = false;     // this thread called parallel_for
thread_local std::function<bool()> tl_poll;  // installed by ScopedPoll

// Marks the current thread as working on `job` for its lifetime.
struct JobScope {
  JobContext* saved_job;
  bool saved_caller;
  JobScope(JobContext* job, bool caller) : saved_job(tl_job), saved_caller(tl_is_caller) {
    tl_job = job;
    tl_is_caller = caller;
  }
  ~JobScope() {
    tl_job = saved_job;
    tl_is_caller = saved_caller;
  }
};

// One parallel_for on the pool. It lives on the caller's stack; a worker
// may touch it only after joining it (users, under the pool's mutex), and
// the caller returns only once every joined worker has left.
struct Job {
  const TaskFn* fn;
  JobContext* ctx;
  int64_t num_tasks;
  std::atomic<int64_t> next{0};
  std::exception_ptr error;  // the first task's exception, under the mutex
  std::atomic<int> users{0};  // workers inside work(); changed under the mutex
};

class ThreadPool {
 public:
  explicit ThreadPool(int threads) : size_(std::max(1, threads)) {
    for (int w = 1; w < size_; ++w) workers_.emplace_back([this, w] { worker_loop(w); });
  }

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  int size() const { return size_; }

  // Why the caller waits only for workers that joined: a worker's wake-up
  // can take a scheduler slice on a loaded machine, and small calls (a
  // decode step) used to wait ~1-2 ms for workers that then found nothing
  // left to do. A late worker finds the job withdrawn and sleeps again.
  void run(int64_t num_tasks, const TaskFn& fn, JobContext& ctx) {
    // One job at a time; concurrent callers queue here. The caller always
    // takes part, so a job finishes even if every worker is slow to wake.
    std::lock_guard<std::mutex> job_lock(job_mutex_);
    Job job;
    job.fn = &fn;
    job.ctx = &ctx;
    job.num_tasks = num_tasks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &job;
      ++generation_;
      published_.store(generation_, std::memory_order_release);
    }
    wake_.notify_all();
    work(job, 0, true);
    std::unique_lock<std::mutex> lock(mutex_);
    job_ = nullptr;  // no worker joins from here on
    // A worker that joined is on its last task: watch it finish (up to
    // kSpinFor) before sleeping on done_, whose wake-up doubled a small
    // call (2 threads, (2, 1, 16, 64): 18 -> 33 us once workers joined
    // at once).
    if (job.users.load() != 0) {
      lock.unlock();
      const auto until = std::chrono::steady_clock::now() + kSpinFor;
      while (job.users.load(std::memory_order_acquire) != 0 &&
             std::chrono::steady_clock::now() < until)
        for (int i = 0; i < 16; ++i) cpu_relax();
      lock.lock();
    }
    // While the joined workers finish, keep polling so a cancel is seen.
    while (!done_.wait_for(lock, kPollInterval, [&] { return job.users == 0; })) {
      lock.unlock();
      if (ctx.poll_now()) job.next.store(num_tasks, std::memory_order_relaxed);
      lock.lock();
    }
    if (job.error) std::rethrow_exception(job.error);
  }

 private:
  void worker_loop(int w) {
    uint64_t seen = 0;
    for (;;) {
      Job* job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
        if (stopping_) return;
        seen = generation_;
        job = job_;
        if (!job) continue;  // woke after its job was withdrawn
        ++job->users;
      }
      work(*job, w, false);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (--job->users == 0) done_.notify_one();
      }
      spin_for_next_job(seen);
    }
  }

  // Why a worker watches for the next job a little before it sleeps: a
  // decode step is ~100 small jobs in a row, each ~10-60 us, and waking a
  // sleeping worker takes about as long, so it used to join each job late
  // or not at all (Linear(768, 768) at M = 1: 55 us on 1 thread and on 2).
  // The watch is bounded (kSpinFor after each job), so an idle pool costs
  // nothing, unlike BLAS pools that spin ~0.1 s after every call.
  void spin_for_next_job(uint64_t seen) {
    const auto until = std::chrono::steady_clock::now() + kSpinFor;
    while (published_.load(std::memory_order_acquire) == seen) {
      for (int i = 0; i < 64; ++i) cpu_relax();
      if (std::chrono::steady_clock::now() >= until) return;
    }
  }

  void work(Job& job, int w, bool caller) {
    JobScope scope(job.ctx, caller);
    for (;;) {
      const int64_t t = job.next.fetch_add(1, std::memory_order_relaxed);
      if (t >= job.num_tasks) return;
      try {
        cancellation_point();
        (*job.fn)(t, w);
#if defined(__GLIBCXX__)
      } catch (abi::__forced_unwind&) {
        throw;  // a thread ended by pthread_exit (interpreter shutdown) must unwind
#endif
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!job.error) job.error = std::current_exception();
        job.next.store(job.num_tasks, std::memory_order_relaxed);  // stop handing out
      }
    }
  }

  const int size_;
  std::vector<std::thread> workers_;
  std::mutex job_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  Job* job_ = nullptr;
  uint64_t generation_ = 0;
  std::atomic<uint64_t> published_{0};  // generation_, for the watch without the mutex
  bool stopping_ = false;
};

int cpus_available() {
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

int env_num_threads() {
  const char* s = std::getenv("TILEATTN_NUM_THREADS");
  if (!s || !*s) return 0;
  char* end = nullptr;
  const long n = std::strtol(s, &end, 10);
  if (*end != '\0' || n < 1 || n > 4096) return 0;  // the Python layer warns
  return static_cast<int>(n);
}

// The pool is created lazily and never destroyed at exit: worker threads
// blocked at interpreter shutdown must not be joined from a static
// destructor. Callers hold a shared_ptr while their job runs, so
// set_num_threads can swap in a new pool at any time and the old one is
// joined only once its last job has finished. After fork() the child has
// none of the parent's threads: it leaks the parent's pool object (joining
// threads that do not exist would hang) and builds a fresh one on first use.
std::mutex g_pool_mutex;
std::shared_ptr<ThreadPool>* g_pool = new std::shared_ptr<ThreadPool>();
int g_requested = 0;

void forget_pool_in_child() {
  g_pool = new std::shared_ptr<ThreadPool>();
  new (&g_pool_mutex) std::mutex();  // the parent may have held it at fork
}

std::shared_ptr<ThreadPool> pool() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (!*g_pool) {
#if defined(__linux__)
    static bool registered = (pthread_atfork(nullptr, nullptr, forget_pool_in_child), true);
    (void)registered;
#endif
    *g_pool = std::make_shared<ThreadPool>(g_requested > 0 ? g_requested : default_num_threads());
  }
  return *g_pool;
}

}  // namespace

int default_num_threads() {
  const int env = env_num_threads();
  return env > 0 ? env : cpus_available();
}

int num_threads() { return pool()->size(); }

void set_num_threads(int n) {
  if (n < 1) n = 1;
  std::shared_ptr<ThreadPool> old;
  {
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    g_requested = n;
    if (*g_pool && (*g_pool)->size() != n) {
      old = std::move(*g_pool);
      *g_pool = std::make_shared<ThreadPool>(n);
    }
  }
  // `old` is released here, outside the lock; if a job still runs on it,
  // that job's caller joins it when done.
}

void parallel_for(int64_t num_tasks, const TaskFn& fn) {
  if (num_tasks <= 0) return;
  JobContext ctx;
  ctx.poll = &tl_poll;
  std::shared_ptr<ThreadPool> p = pool();
  if (num_tasks == 1 || p->size() == 1) {
    JobScope scope(&ctx, true);
    for (int64_t t = 0; t < num_tasks; ++t) {
      cancellation_point();
      fn(t, 0);
    }
    return;
  }
  p->run(num_tasks, fn, ctx);
}

void cancellation_point() {
  JobContext* job = tl_job;
  if (!job) return;
  if (job->cancelled.load(std::memory_order_relaxed) || (tl_is_caller && job->poll_now()))
    throw Cancelled();
}

ScopedPoll::ScopedPoll(std::function<bool()> poll) : previous_(std::move(tl_poll)) {
  tl_poll = std::move(poll);
}

ScopedPoll::~ScopedPoll() { tl_poll = std::move(previous_); }

}  // namespace tileattn
