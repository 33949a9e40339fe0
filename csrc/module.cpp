// The private tileattn._core extension. It receives arrays that the Python
// layer has already validated and shaped to 4-D (masks as broadcast views),
// re-checks what it relies on, fills an AttentionParams and runs the kernel
// with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__GLIBCXX__)
#include <cxxabi.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>  // madvise
#endif
#if defined(__GLIBC__)
#include <malloc.h>    // malloc_trim
#endif

#include "array_checks.h"
#include "attention_params.h"
#include "backward_params.h"
#include "cpu_features.h"
#include "dense_copy.h"
#include "row_ops.h"

#include <cmath>
#include "dispatch.h"
#include "linear_params.h"
#include "thread_pool.h"

namespace py = pybind11;
using namespace tileattn;

namespace {

bool interpreter_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

// Runs fn with the GIL released. The GIL is given up and re-taken by hand,
// not by a scoped guard: when the interpreter finalizes, CPython ends a
// daemon thread that asks for the GIL with pthread_exit, and that forced
// unwind must not start inside a destructor (noexcept: std::terminate, the
// process aborts). It is let through untouched; the thread is ending.
template <typename Fn>
void without_gil(Fn&& fn) {
  PyThreadState* state = PyEval_SaveThread();
  try {
    fn();
#if defined(__GLIBCXX__)
  } catch (abi::__forced_unwind&) {
    throw;
#endif
  } catch (...) {
    PyEval_RestoreThread(state);
    throw;
  }
  PyEval_RestoreThread(state);
}

// Runs fn without the GIL. While it runs, the calling thread checks for
// Python signals every ~50 ms (taking the GIL briefly, but never while the
// interpreter finalizes), so Ctrl-C stops a long call within a fraction of
// a second and raises KeyboardInterrupt.
template <typename Fn>
void run_cancellable(Fn&& fn) {
  bool cancelled = false;
  without_gil([&] {
    ScopedPoll poll([] {
      if (interpreter_finalizing()) return false;
      py::gil_scoped_acquire gil;
      return PyErr_CheckSignals() != 0;
    });
    try {
      fn();
    } catch (const Cancelled&) {
      cancelled = true;
    }
  });
  if (cancelled) {
    if (PyErr_Occurred()) throw py::error_already_set();
    throw std::runtime_error("tileattn: computation cancelled");
  }
}

// The compute dtype of the call, from its first array (`name` for the message).
DType dtype_of(const py::array& a, const char* name) {
  if (a.dtype().equal(py::dtype::of<float>())) return DType::f32;
  if (a.dtype().equal(py::dtype::of<double>())) return DType::f64;
  throw std::invalid_argument(std::string(name) + ": expected float32 or float64, got " +
                              py::str(a.dtype()).cast<std::string>());
}

void set_mask(AttentionParams& p, const py::object& mask_obj, const py::dtype& dt) {
  if (mask_obj.is_none()) return;
  py::array mask = mask_obj.cast<py::array>();
  require_shape(mask, {p.B, p.Hq, p.Lq, p.Lk}, "attn_mask");
  if (mask.dtype().equal(py::dtype::of<bool>())) {
    p.mask_kind = MaskKind::boolean;
  } else {
    require_dtype(mask, dt, "attn_mask");
    p.mask_kind = MaskKind::additive;
  }
  p.mask = mask.data();
  p.mask_stride = strides_of(mask, "attn_mask");
}

void set_key_padding(AttentionParams& p, const py::object& kpm_obj) {
  if (kpm_obj.is_none()) return;
  py::array kpm = kpm_obj.cast<py::array>();
  require_shape(kpm, {p.B, p.Lk}, "key_padding_mask");
  require_dtype(kpm, py::dtype::of<bool>(), "key_padding_mask");
  p.key_padding = static_cast<const uint8_t*>(kpm.data());
  p.key_padding_stride_b = kpm.strides(0);
  p.key_padding_stride_k = kpm.strides(1);
}

void set_key_lengths(AttentionParams& p, const py::object& obj) {
  if (obj.is_none()) return;
  py::array lengths = obj.cast<py::array>();
  require_shape(lengths, {p.B}, "key_lengths");
  require_dtype(lengths, py::dtype::of<int64_t>(), "key_lengths");
  if (lengths.strides(0) != static_cast<py::ssize_t>(sizeof(int64_t)) && p.B > 1)
    throw std::invalid_argument("key_lengths: expected a contiguous array");
  const int64_t* n = static_cast<const int64_t*>(lengths.data());
  for (int64_t b = 0; b < p.B; ++b)
    if (n[b] < 0 || n[b] > p.Lk)
      throw std::invalid_argument("key_lengths: entry " + std::to_string(b) + " is " +
                                  std::to_string(n[b]) + ", expected 0 <= length <= Lk = " +
                                  std::to_string(p.Lk));
  p.key_lengths = n;
}

// ml_dtypes.bfloat16 (a NumPy extension dtype, told by its name).
bool is_bfloat16(const py::array& a) {
  return a.itemsize() == 2 && py::str(a.dtype().attr("name")).cast<std::string>() == "bfloat16";
}

// The options of one attention call as Python hands them over: declared once
// here and bound as _core.AttentionOptions. tileattn/_call.py fills one
// object per call after checking every value, and the forward and the
// backward both read it, so the option list is written in one place.
struct AttentionOptions {
  double scale = 1.0;
  int64_t window_left = -1, window_right = -1;  // -1: unbounded
  bool top_left = false;                        // the bounds' alignment
  py::object mask = py::none();         // (B, Hq, Lq, Lk) bool, or the compute dtype
  py::object key_padding = py::none();  // (B, Lk) bool, True = real token
  py::object key_lengths = py::none();  // (B,) int64
  double dropout_p = 0.0;
  uint64_t seed = 0;
  bool bf16 = false;  // products on bf16 operands (float32 calls; forward only)
};

// The description of a call from q, k, v, out (B, Hq, Lq, Dv) and the mask
// and dropout options; shared by the forward and the backward (which reads
// `out` instead of writing it).
AttentionParams params_from(py::array q, py::array k, py::array v, py::array out,
                            const AttentionOptions& o) {
  AttentionParams p;
  p.dtype = dtype_of(q, "q");
  const py::dtype dt = q.dtype();
  p.q_stride = strides_of(q, "q");
  p.k_stride = strides_of(k, "k");
  p.v_stride = strides_of(v, "v");
  p.out_stride = strides_of(out, "out");
  // K/V share q's dtype, or are float16 or bfloat16 (a half-size cache)
  // with float32 q.
  p.kv_half = p.dtype == DType::f32 && k.dtype().equal(py::dtype("float16"));
  p.kv_bf16 = p.dtype == DType::f32 && is_bfloat16(k);
  const py::dtype kv_dt = p.kv_half ? py::dtype("float16") : p.kv_bf16 ? k.dtype() : dt;
  require_dtype(k, kv_dt, "k");
  require_dtype(v, kv_dt, "v");
  require_dtype(out, dt, "out");
  p.B = q.shape(0);
  p.Hq = q.shape(1);
  p.Lq = q.shape(2);
  p.D = q.shape(3);
  p.Hkv = k.shape(1);
  p.Lk = k.shape(2);
  p.Dv = v.shape(3);
  require_shape(k, {p.B, p.Hkv, p.Lk, p.D}, "k");
  require_shape(v, {p.B, p.Hkv, p.Lk, p.Dv}, "v");
  require_shape(out, {p.B, p.Hq, p.Lq, p.Dv}, "out");
  if (p.Hkv == 0 ? p.Hq != 0 : p.Hq % p.Hkv != 0)
    throw std::invalid_argument("q/k: query heads must be a multiple of key/value heads");
  if (o.window_left < -1 || o.window_right < -1)
    throw std::invalid_argument("window: bounds must be >= -1");
  if (!(o.dropout_p >= 0.0 && o.dropout_p <= 1.0))
    throw std::invalid_argument("dropout_p: expected a value in [0, 1]");
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.out = out.mutable_data();
  p.scale = o.scale;
  // A bound of Lq + Lk or more hides no key on its side: it is the same as
  // unbounded, and stored as -1 so the kernel's index arithmetic
  // (i + shift + right, j - shift + left) cannot overflow near INT64_MAX.
  const int64_t unbounded_from = p.Lq + p.Lk;
  p.window_left = o.window_left >= unbounded_from ? -1 : o.window_left;
  p.window_right = o.window_right >= unbounded_from ? -1 : o.window_right;
  p.top_left = o.top_left;
  set_mask(p, o.mask, dt);
  set_key_padding(p, o.key_padding);
  set_key_lengths(p, o.key_lengths);
  p.dropout_p = o.dropout_p;
  p.seed = o.seed;
  if (o.bf16) {
    if (p.dtype != DType::f32)
      throw std::invalid_argument("q: bf16 products take float32 (or float16) inputs");
    p.products = Products::bf16;
  }
  return p;
}

void attention_forward_py(py::array q, py::array k, py::array v, py::array out,
                          const AttentionOptions& options, py::object weights, py::object lse) {
  require_writeable(out, "out");
  AttentionParams p = params_from(q, k, v, out, options);
  const py::dtype dt = q.dtype();
  if (!weights.is_none()) {
    py::array w = weights.cast<py::array>();
    require_shape(w, {p.B, p.Hq, p.Lq, p.Lk}, "weights");
    require_dtype(w, dt, "weights");
    require_writeable(w, "weights");
    p.weights = w.mutable_data();
    p.weights_stride = strides_of(w, "weights");
  }
  if (!lse.is_none()) {
    py::array l = lse.cast<py::array>();
    require_shape(l, {p.B, p.Hq, p.Lq, 1}, "lse");
    require_dtype(l, py::dtype::of<double>(), "lse");
    require_writeable(l, "lse");
    p.lse = static_cast<double*>(l.mutable_data());
    p.lse_stride = strides_of(l, "lse");
  }
  run_cancellable([&] { kernels().attention_forward(p); });
}

// Offsets of sequences packed end to end: `name` is (n + 1,) int64,
// contiguous, from 0 up to `total` without decreasing. Returns n.
int64_t check_offsets(const py::array& a, int64_t total, const char* name) {
  require_ndim(a, 1, name);
  require_dtype(a, py::dtype::of<int64_t>(), name);
  const int64_t n = a.shape(0) - 1;
  if (n < 0) throw std::invalid_argument(std::string(name) + ": expected at least one entry (0)");
  if (n > 0 && a.strides(0) != static_cast<py::ssize_t>(sizeof(int64_t)))
    throw std::invalid_argument(std::string(name) + ": expected a contiguous array");
  const int64_t* c = static_cast<const int64_t*>(a.data());
  if (c[0] != 0 || c[n] != total)
    throw std::invalid_argument(std::string(name) + ": expected to run from 0 to " +
                                std::to_string(total) + ", got " + std::to_string(c[0]) +
                                " to " + std::to_string(c[n]));
  for (int64_t i = 0; i < n; ++i)
    if (c[i + 1] < c[i])
      throw std::invalid_argument(std::string(name) + ": entry " + std::to_string(i + 1) +
                                  " is below entry " + std::to_string(i));
  return n;
}

// Sequences of different lengths packed end to end (flash-attention's
// variable-length layout), each attended as if alone: q (1, Hq, Tq, D),
// k (1, Hkv, Tk, D), v (1, Hkv, Tk, Dv), out (1, Hq, Tq, Dv) are head-major
// views of (T, H, D) rows; sequence i is rows [cu_q[i], cu_q[i+1]) of q and
// out and [cu_k[i], cu_k[i+1]) of k and v. Causal and window bounds align
// within each sequence; no mask, key padding, key lengths or dropout (the
// offsets say where each sequence ends). No padding is computed or read.
void attention_varlen_py(py::array q, py::array k, py::array v, py::array out, py::array cu_q,
                         py::array cu_k, const AttentionOptions& options) {
  require_writeable(out, "out");
  const AttentionParams p = params_from(q, k, v, out, options);
  if (p.B != 1) throw std::invalid_argument("q: expected one packed batch (B = 1)");
  if (p.mask || p.key_padding || p.key_lengths || p.dropout_p != 0.0)
    throw std::invalid_argument(
        "options: variable-length attention takes no mask, key padding, key lengths or dropout");
  const int64_t n = check_offsets(cu_q, p.Lq, "cu_seqlens_q");
  if (check_offsets(cu_k, p.Lk, "cu_seqlens_k") != n)
    throw std::invalid_argument("cu_seqlens_k: expected as many sequences as cu_seqlens_q (" +
                                std::to_string(n) + ")");
  const int64_t* oq = static_cast<const int64_t*>(cu_q.data());
  const int64_t* ok = static_cast<const int64_t*>(cu_k.data());
  const int64_t q_item = p.dtype == DType::f64 ? sizeof(double) : sizeof(float);
  const int64_t kv_item = p.kv_narrow() ? 2 : q_item;
  std::vector<AttentionParams> items(static_cast<size_t>(n), p);
  for (int64_t i = 0; i < n; ++i) {
    AttentionParams& it = items[i];
    it.Lq = oq[i + 1] - oq[i];
    it.Lk = ok[i + 1] - ok[i];
    it.q = static_cast<const char*>(p.q) + oq[i] * p.q_stride.r * q_item;
    it.out = static_cast<char*>(p.out) + oq[i] * p.out_stride.r * q_item;
    it.k = static_cast<const char*>(p.k) + ok[i] * p.k_stride.r * kv_item;
    it.v = static_cast<const char*>(p.v) + ok[i] * p.v_stride.r * kv_item;
  }
  run_cancellable([&] { kernels().attention_forward_items(items.data(), n); });
}

// One gradient output: `name` of `shape` in the compute dtype, writeable.
Strides4 grad_output(const py::array& a, const std::vector<int64_t>& shape, const py::dtype& dt,
                     const char* name) {
  require_shape(a, shape, name);
  require_dtype(a, dt, name);
  require_writeable(a, name);
  return strides_of(a, name);
}

void attention_backward_py(py::array q, py::array k, py::array v, py::array out, py::array lse,
                           py::array dout, py::array dq, py::array dk, py::array dv,
                           const AttentionOptions& options, py::object dscores) {
  BackwardParams bp;
  bp.fwd = params_from(q, k, v, out, options);
  AttentionParams& p = bp.fwd;
  const py::dtype dt = q.dtype();
  if (p.kv_narrow()) throw std::invalid_argument("k: the backward needs k and v in q's dtype");
  require_shape(lse, {p.B, p.Hq, p.Lq, 1}, "lse");
  require_dtype(lse, py::dtype::of<double>(), "lse");
  p.lse = const_cast<double*>(static_cast<const double*>(lse.data()));
  p.lse_stride = strides_of(lse, "lse");
  require_shape(dout, {p.B, p.Hq, p.Lq, p.Dv}, "dout");
  require_dtype(dout, dt, "dout");
  bp.dout = dout.data();
  bp.dout_stride = strides_of(dout, "dout");
  bp.dq_stride = grad_output(dq, {p.B, p.Hq, p.Lq, p.D}, dt, "dq");
  bp.dk_stride = grad_output(dk, {p.B, p.Hkv, p.Lk, p.D}, dt, "dk");
  bp.dv_stride = grad_output(dv, {p.B, p.Hkv, p.Lk, p.Dv}, dt, "dv");
  bp.dq = dq.mutable_data();
  bp.dk = dk.mutable_data();
  bp.dv = dv.mutable_data();
  if (!dscores.is_none()) {
    py::array ds = dscores.cast<py::array>();
    bp.dscores_stride = grad_output(ds, {p.B, p.Hq, p.Lq, p.Lk}, dt, "dscores");
    bp.dscores = ds.mutable_data();
  }
  run_cancellable([&] { kernels().attention_backward(bp); });
}

// Rows of a 2-D array whose elements within a row are contiguous: the row
// stride in elements (throws otherwise).
int64_t row_stride(const py::array& a, const char* name) {
  require_ndim(a, 2, name);
  const int64_t item = a.itemsize();
  if (a.shape(1) > 1 && a.strides(1) != item)
    throw std::invalid_argument(std::string(name) + ": expected contiguous rows");
  if (a.strides(0) % item != 0 || a.strides(0) < 0)
    throw std::invalid_argument(std::string(name) + ": expected a non-negative row stride");
  return a.strides(0) / item;
}

// A weight packed once for the projections' GEMM (linear_forward_packed):
// the active path's panel layout, so it is valid for that path only. Its
// storage: the dtype's own values, or bf16 pairs (Products::bf16, for
// float32 rows), half the bytes.
class PackedLinear {
  static constexpr size_t kHugePage = size_t(2) << 20;

 public:
  explicit PackedLinear(const LinearParams& lp)
      : dtype_(lp.dtype), products_(lp.products), n_(lp.N), k_(lp.K), isa_(active_isa()) {
    bytes_ = static_cast<size_t>(std::max<int64_t>(kernels().linear_packed_bytes(lp), 1));
    // A large weight in 2 MiB pages: the skinny path streams it from memory,
    // and with 4 KiB pages every 4 KiB of the stream is a TLB miss that
    // hardware prefetching does not cross (measured in BENCHMARKS.md,
    // "Projections"). NumPy asks the same for its large arrays.
    // Only the start is aligned to a huge page: rounding the size up too
    // (aligned_alloc's rule) added up to 2 MiB per weight, 18% of GPT-2
    // small's packed float32 weights; the pages past the end are never
    // touched, and the whole 2 MiB pages before them still get huge pages.
    const size_t align = bytes_ >= kHugePage ? kHugePage : 64;
    bytes_ = (bytes_ + 63) / 64 * 64;
    void* p = nullptr;
    if (posix_memalign(&p, align, bytes_) != 0) throw std::bad_alloc();
    data_.reset(static_cast<char*>(p));
#ifdef MADV_HUGEPAGE
    if (align == kHugePage) madvise(data_.get(), bytes_, MADV_HUGEPAGE);  // a hint: may be refused
#endif
  }
  DType dtype() const { return dtype_; }
  Products products() const { return products_; }
  int64_t out_features() const { return n_; }
  int64_t in_features() const { return k_; }
  Isa isa() const { return isa_; }
  size_t nbytes() const { return bytes_; }
  void* data() const { return data_.get(); }

 private:
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  DType dtype_;
  Products products_;
  int64_t n_, k_;
  Isa isa_;
  size_t bytes_ = 0;
  std::unique_ptr<char, Free> data_;
};

// The checked description of out (M x N) = x (M x K) w^T (+ bias (N,)),
// w being `n` x `k` of `dt`.
LinearParams linear_params(const py::array& x, int64_t n, int64_t k, const py::dtype& dt,
                           const py::object& bias, py::array& out) {
  LinearParams lp;
  lp.dtype = dtype_of(x, "x");
  require_dtype(x, dt, "x");
  lp.x_ld = row_stride(x, "x");
  lp.out_ld = row_stride(out, "out");
  lp.M = x.shape(0);
  lp.K = k;
  lp.N = n;
  require_shape(x, {lp.M, lp.K}, "x");
  require_shape(out, {lp.M, lp.N}, "out");
  require_dtype(out, dt, "out");
  require_writeable(out, "out");
  if (!bias.is_none()) {
    py::array b = bias.cast<py::array>();
    require_shape(b, {lp.N}, "bias");
    require_dtype(b, dt, "bias");
    if (lp.N > 1 && b.strides(0) != b.itemsize())
      throw std::invalid_argument("bias: expected a contiguous vector");
    lp.bias = b.data();
  }
  lp.x = x.data();
  lp.out = out.mutable_data();
  return lp;
}

// out (M x N) = x (M x K) w^T (w: N x K) (+ bias (N,)), on the pool, GIL released.
void linear_forward_py(py::array x, py::array w, py::object bias, py::array out) {
  require_ndim(x, 2, "x");
  require_ndim(w, 2, "w");
  dtype_of(x, "x");
  const int64_t n = w.shape(0), k = x.shape(1);
  require_shape(w, {n, k}, "w");
  require_dtype(w, x.dtype(), "w");
  LinearParams lp = linear_params(x, n, k, w.dtype(), bias, out);
  lp.w_ld = row_stride(w, "w");
  lp.w = w.data();
  run_cancellable([&] { kernels().linear_forward(lp); });
}

// w (N x K) packed for the active path: the product then reads it once.
// bf16: for products on bf16 operands (w float32, rounded as it is packed,
// or ml_dtypes.bfloat16).
PackedLinear pack_linear_py(py::array w, bool bf16) {
  require_ndim(w, 2, "w");
  LinearParams lp;
  if (bf16) {
    lp.products = Products::bf16;
    lp.w_bf16 = is_bfloat16(w);
    if (!lp.w_bf16 && !w.dtype().equal(py::dtype::of<float>()))
      throw std::invalid_argument("w: expected float32 or bfloat16 for bf16 products, got " +
                                  py::str(w.dtype()).cast<std::string>());
  } else {
    lp.dtype = dtype_of(w, "w");
  }
  lp.N = w.shape(0);
  lp.K = w.shape(1);
  lp.w_ld = row_stride(w, "w");
  lp.w = w.data();
  PackedLinear packed(lp);
  run_cancellable([&] { kernels().linear_pack(lp, packed.data()); });
  return packed;
}

// Rows [start, stop) (default: all) of the weight `w` was packed from,
// row-major: float32 (the bf16 values, widened exactly) or float64; read
// with the kernels of the path that packed it, whichever is active now.
py::array unpack_linear_py(const PackedLinear& w, int64_t start, py::object stop_arg) {
  const int64_t stop = stop_arg.is_none() ? w.out_features() : stop_arg.cast<int64_t>();
  if (start < 0 || stop < start || stop > w.out_features())
    throw std::invalid_argument("start, stop: expected 0 <= start <= stop <= " +
                                std::to_string(w.out_features()) + ", got " +
                                std::to_string(start) + ", " + std::to_string(stop));
  LinearParams lp;
  lp.dtype = w.dtype();
  lp.products = w.products();
  lp.N = w.out_features();
  lp.K = w.in_features();
  lp.packed = w.data();
  const std::vector<py::ssize_t> shape{stop - start, lp.K};
  py::array out = w.dtype() == DType::f64 ? py::array(py::dtype::of<double>(), shape)
                                          : py::array(py::dtype::of<float>(), shape);
  void* dst = out.mutable_data();
  run_cancellable([&] { kernels_for(w.isa()).linear_unpack(lp, start, stop, dst); });
  return out;
}

// The same product with a weight packed by pack_linear on this path.
void linear_forward_packed_py(py::array x, const PackedLinear& w, py::object bias,
                              py::array out) {
  if (w.isa() != active_isa())
    throw std::invalid_argument(std::string("w: packed for the '") + isa_name(w.isa()) +
                                "' path, but '" + isa_name(active_isa()) +
                                "' is active; pack it again");
  const py::dtype dt = w.dtype() == DType::f64 ? py::dtype::of<double>() : py::dtype::of<float>();
  LinearParams lp = linear_params(x, w.out_features(), w.in_features(), dt, bias, out);
  lp.products = w.products();
  lp.packed = w.data();
  run_cancellable([&] { kernels().linear_forward(lp); });
}

// A contiguous vector of n values of rows' dtype, or null for None.
const void* optional_vector(const py::object& v, int64_t n, const py::dtype& dt,
                            const char* name, bool writeable = false) {
  if (v.is_none()) return nullptr;
  py::array a = v.cast<py::array>();
  require_shape(a, {n}, name);
  require_dtype(a, dt, name);
  if (n > 1 && a.strides(0) != a.itemsize())
    throw std::invalid_argument(std::string(name) + ": expected a contiguous vector");
  if (writeable) {
    require_writeable(a, name);
    return a.mutable_data();
  }
  return a.data();
}

// act(rows + bias) in place for float32 rows (M x N), on the pool, GIL
// released; kind: "gelu", "gelu_tanh" or "silu".
void activation_rows_py(py::array rows, const std::string& kind, py::object bias) {
  ActivationParams ap;
  if (kind == "gelu")
    ap.kind = ActivationKind::gelu;
  else if (kind == "gelu_tanh")
    ap.kind = ActivationKind::gelu_tanh;
  else if (kind == "silu")
    ap.kind = ActivationKind::silu;
  else
    throw std::invalid_argument("kind: expected 'gelu', 'gelu_tanh' or 'silu', got '" + kind + "'");
  require_ndim(rows, 2, "rows");
  require_dtype(rows, py::dtype::of<float>(), "rows");
  require_writeable(rows, "rows");
  ap.rows = rows.shape(0);
  ap.cols = rows.shape(1);
  ap.ld = row_stride(rows, "rows");
  ap.bias = static_cast<const float*>(optional_vector(bias, ap.cols, rows.dtype(), "bias"));
  ap.x = static_cast<float*>(rows.mutable_data());
  run_cancellable([&] { kernels().activation(ap); });
}

// An int64 index vector whose entries are in [0, bound), or null for None.
const int64_t* row_index(const py::object& v, int64_t n, int64_t bound, const char* name) {
  if (v.is_none()) return nullptr;
  py::array a = v.cast<py::array>();
  require_shape(a, {n}, name);
  require_dtype(a, py::dtype::of<int64_t>(), name);
  if (n > 1 && a.strides(0) != a.itemsize())
    throw std::invalid_argument(std::string(name) + ": expected a contiguous vector");
  const int64_t* idx = static_cast<const int64_t*>(a.data());
  for (int64_t i = 0; i < n; ++i)
    if (idx[i] < 0 || idx[i] >= bound)
      throw std::invalid_argument(std::string(name) + ": entry " + std::to_string(i) + " (" +
                                  std::to_string(idx[i]) + ") is outside [0, " +
                                  std::to_string(bound) + ")");
  return idx;
}

// dst[dst_index[i]] = src[src_index[i]] row by row (an absent index: i),
// then dst[zero_index] = 0; 2-D arrays of one dtype and width, on the pool.
void move_rows_py(py::array src, py::object src_index, py::array dst, py::object dst_index,
                  py::object zero_index) {
  require_ndim(src, 2, "src");
  require_ndim(dst, 2, "dst");
  require_dtype(dst, src.dtype(), "dst");
  require_writeable(dst, "dst");
  if (dst.shape(1) != src.shape(1))
    throw std::invalid_argument("dst: expected " + std::to_string(src.shape(1)) +
                                " columns like src, got shape " + shape_string(dst));
  const int64_t item = src.itemsize(), cols = src.shape(1);
  row_stride(src, "src");
  row_stride(dst, "dst");
  const int64_t n = src_index.is_none() ? (dst_index.is_none() ? std::min(src.shape(0), dst.shape(0))
                                                                : dst_index.cast<py::array>().shape(0))
                                        : src_index.cast<py::array>().shape(0);
  const int64_t* si = row_index(src_index, n, src.shape(0), "src_index");
  const int64_t* di = row_index(dst_index, n, dst.shape(0), "dst_index");
  if (!si && n > src.shape(0)) throw std::invalid_argument("src: fewer rows than the index");
  if (!di && n > dst.shape(0)) throw std::invalid_argument("dst: fewer rows than the index");
  const int64_t nz = zero_index.is_none() ? 0 : zero_index.cast<py::array>().shape(0);
  const int64_t* zi = row_index(zero_index, nz, dst.shape(0), "zero_index");
  const char* s = static_cast<const char*>(src.data());
  char* d = static_cast<char*>(dst.mutable_data());
  const int64_t ss = src.shape(0) > 1 ? src.strides(0) : 0, ds = dst.shape(0) > 1 ? dst.strides(0) : 0;
  run_cancellable([&] { move_rows(s, ss, si, d, ds, di, n, cols * item, zi, nz); });
}

// Layer norm of rows (M x E) in place, on the pool, GIL released; inv_std
// (M,), if given, receives each row's 1 / sqrt(var + eps).
void layer_norm_rows_py(py::array rows, py::object weight, py::object bias, double eps,
                        py::object inv_std) {
  require_ndim(rows, 2, "rows");
  const DType dtype = dtype_of(rows, "rows");
  require_writeable(rows, "rows");
  const int64_t m = rows.shape(0), e = rows.shape(1), ld = row_stride(rows, "rows");
  if (!(eps >= 0) || !std::isfinite(eps))
    throw std::invalid_argument("eps: expected a finite number >= 0");
  const py::dtype dt = rows.dtype();
  const void* w = optional_vector(weight, e, dt, "weight");
  const void* b = optional_vector(bias, e, dt, "bias");
  if (b && !w) throw std::invalid_argument("bias: needs a weight");
  void* inv = const_cast<void*>(optional_vector(inv_std, m, dt, "inv_std", true));
  void* x = rows.mutable_data();
  run_cancellable([&] { layer_norm_rows(dtype, m, e, x, ld, w, b, eps, inv); });
}

// dst (a C-contiguous 4-D array) = src (any 4-D array of its shape and
// dtype), on the pool, GIL released.
void copy_dense_py(py::array src, py::array dst) {
  require_ndim(src, 4, "src");
  require_ndim(dst, 4, "dst");
  require_dtype(dst, src.dtype(), "dst");
  require_shape(dst, {src.shape(0), src.shape(1), src.shape(2), src.shape(3)}, "dst");
  require_writeable(dst, "dst");
  if (!(dst.flags() & py::array::c_style))
    throw std::invalid_argument("dst: expected a C-contiguous array");
  int64_t shape[4], strides[4];
  for (int i = 0; i < 4; ++i) {
    shape[i] = src.shape(i);
    strides[i] = src.strides(i);
  }
  const void* from = src.data();
  void* to = dst.mutable_data();
  const int64_t item = src.itemsize();
  run_cancellable([&] { copy_dense(from, shape, strides, item, to); });
}

Isa isa_from_name(const std::string& name) {
  for (Isa isa : {Isa::baseline, Isa::avx2, Isa::avx512, Isa::avx512_bf16})
    if (name == isa_name(isa)) return isa;
  throw std::invalid_argument("unknown ISA path '" + name +
                              "'; expected 'avx512_bf16', 'avx512', 'avx2' or 'baseline'");
}


py::dict build_info() {
  py::dict d;
  d["compiler"] = TILEATTN_COMPILER;
  d["flags"] = TILEATTN_BUILD_FLAGS;
  py::list built;
  for (Isa isa : isas_built()) built.append(isa_name(isa));
  d["isas_built"] = built;
  return d;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "tileattn's C++ core (private; use the tileattn package)";
  // AttentionOptions(scale=..., ...): each field by name, with the defaults
  // of the struct (named arguments parse in C++: ~1 us, where setting each
  // field from Python took ~4 us of a small call's ~40).
  const AttentionOptions defaults;
  py::class_<AttentionOptions>(m, "AttentionOptions")
      .def(py::init([](double scale, int64_t window_left, int64_t window_right, bool top_left,
                       py::object mask, py::object key_padding, py::object key_lengths,
                       double dropout_p, uint64_t seed, bool bf16) {
             return AttentionOptions{scale,           window_left,           window_right,
                                     top_left,        std::move(mask),       std::move(key_padding),
                                     std::move(key_lengths), dropout_p,      seed, bf16};
           }),
           py::kw_only(), py::arg("scale") = defaults.scale,
           py::arg("window_left") = defaults.window_left,
           py::arg("window_right") = defaults.window_right,
           py::arg("top_left") = defaults.top_left, py::arg("mask") = py::none(),
           py::arg("key_padding") = py::none(), py::arg("key_lengths") = py::none(),
           py::arg("dropout_p") = defaults.dropout_p, py::arg("seed") = defaults.seed,
           py::arg("bf16") = defaults.bf16)
      .def_readwrite("scale", &AttentionOptions::scale)
      .def_readwrite("window_left", &AttentionOptions::window_left)
      .def_readwrite("window_right", &AttentionOptions::window_right)
      .def_readwrite("top_left", &AttentionOptions::top_left)
      .def_readwrite("mask", &AttentionOptions::mask)
      .def_readwrite("key_padding", &AttentionOptions::key_padding)
      .def_readwrite("key_lengths", &AttentionOptions::key_lengths)
      .def_readwrite("dropout_p", &AttentionOptions::dropout_p)
      .def_readwrite("seed", &AttentionOptions::seed)
      .def_readwrite("bf16", &AttentionOptions::bf16);
  m.def("attention_forward", &attention_forward_py, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("options"), py::arg("weights") = py::none(),
        py::arg("lse") = py::none());
  m.def("attention_varlen", &attention_varlen_py, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("options"));
  m.def("attention_backward", &attention_backward_py, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("dout"), py::arg("dq"), py::arg("dk"),
        py::arg("dv"), py::arg("options"), py::arg("dscores") = py::none());
  m.def("linear_forward", &linear_forward_py, py::arg("x"), py::arg("w"), py::arg("bias"),
        py::arg("out"));
  py::class_<PackedLinear>(m, "PackedLinear")
      .def_property_readonly("out_features", &PackedLinear::out_features)
      .def_property_readonly("in_features", &PackedLinear::in_features)
      .def_property_readonly("isa", [](const PackedLinear& w) { return std::string(isa_name(w.isa())); })
      .def_property_readonly("nbytes", &PackedLinear::nbytes)
      .def_property_readonly("bf16", [](const PackedLinear& w) { return w.products() == Products::bf16; })
      .def_property_readonly("dtype", [](const PackedLinear& w) {
        return w.dtype() == DType::f64 ? py::dtype::of<double>() : py::dtype::of<float>();
      });
  m.def("pack_linear", &pack_linear_py, py::arg("w"), py::arg("bf16") = false);
  m.def("unpack_linear", &unpack_linear_py, py::arg("w"), py::arg("start") = 0,
        py::arg("stop") = py::none());
  m.def("linear_forward_packed", &linear_forward_packed_py, py::arg("x"), py::arg("w"),
        py::arg("bias"), py::arg("out"));
  m.def("copy_dense", &copy_dense_py, py::arg("src"), py::arg("dst"));
  m.def("activation_rows", &activation_rows_py, py::arg("rows"), py::arg("kind"),
        py::arg("bias") = py::none());
  m.def("move_rows", &move_rows_py, py::arg("src"), py::arg("src_index"), py::arg("dst"),
        py::arg("dst_index"), py::arg("zero_index") = py::none());
  m.def("layer_norm_rows", &layer_norm_rows_py, py::arg("rows"), py::arg("weight"),
        py::arg("bias"), py::arg("eps"), py::arg("inv_std") = py::none());
  m.def("num_threads", &num_threads);
  m.def("set_num_threads", [](int n) {
    if (n < 1) throw std::invalid_argument("num_threads must be >= 1");
    without_gil([n] { set_num_threads(n); });  // may wait for a running job
  });
  m.def("default_num_threads", &default_num_threads);
  // Hands the allocator's free memory back to the system. glibc keeps
  // what large arrays freed (its mmap threshold rises after such frees),
  // so the row-major weights a freeze() lets go stayed resident: GPT-2
  // small's 340 MB came back only by this (BENCHMARKS.md, "Frozen").
  m.def("release_free_memory", [] {
#if defined(__GLIBC__)
    py::gil_scoped_release release;  // it walks the whole heap
    malloc_trim(0);
#endif
  });
  m.def("isa", [] { return std::string(isa_name(active_isa())); });
  m.def("set_isa", [](const std::string& name) { set_active_isa(isa_from_name(name)); });
  m.def("isas_built", [] {
    std::vector<std::string> names;
    for (Isa isa : isas_built()) names.push_back(isa_name(isa));
    return names;
  });
  m.def("isas_supported", [] {
    std::vector<std::string> names;
    for (Isa isa : isas_built())
      if (cpu_supports(isa)) names.push_back(isa_name(isa));
    return names;
  });
  m.def("cpu_features", [] {
    py::dict d;
    for (auto& kv : cpu_feature_list()) d[py::str(kv.first)] = kv.second;
    return d;
  });
  m.def("build_info", &build_info);
  // For the tests: runs num_tasks empty tasks on the pool; task fail_at
  // throws, and the exception must reach Python after the workers stop.
  m.def("_parallel_probe", [](int64_t num_tasks, int64_t fail_at) {
    std::atomic<int64_t> ran{0};
    without_gil([&] {
      parallel_for(num_tasks, [&](int64_t t, int) {
        if (t == fail_at) throw std::runtime_error("task " + std::to_string(t) + " failed");
        ran.fetch_add(1, std::memory_order_relaxed);
      });
    });
    return ran.load();
  });
  // For the tests: tasks that spin for `seconds` each, with cancellation
  // points, run cancellably like the kernels.
  m.def("_spin_probe", [](int64_t num_tasks, double seconds) {
    run_cancellable([&] {
      parallel_for(num_tasks, [&](int64_t, int) {
        const auto end = std::chrono::steady_clock::now() +
                         std::chrono::duration<double>(seconds);
        while (std::chrono::steady_clock::now() < end) cancellation_point();
      });
    });
  });
}
