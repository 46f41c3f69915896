// varlen_attention on CPU: flash attention over packed variable-length sequences.
//
// Work is split into (sequence, head) tasks (the forward also splits a head's queries when there
// are too few heads to go round) that the calling thread and pool helpers claim one at a time,
// largest first, because sequence lengths vary and a static split leaves threads idle. A task
// owns every row it writes (its sequence's rows of its head), so there are no races on data.
//
// Inside a task, queries are tiled and, within a query tile, keys are tiled: the products per
// tile (S = Q K^T and O += P V forward; five backward) run on the BLAS behind at::mm_out, on
// views of the packed tensors (fp32) or of fp32 copies (fp16/bf16), and the softmax is online
// (running max and sum, rescaling O) so scratch stays one [kBlockQ, kBlockK] tile whatever the
// length. The backward recomputes P from the saved log-sum-exp, as flash attention does.
//
// The elementwise passes (exp, softmax, dS) are written with the 8-float vectors of vec8.h and
// compiled twice, for AVX2 + FMA and for the baseline ISA, picked at run time: the extension is
// built with plain -O3, and a scalar std::exp per logit would cost as much as the matrix products.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "vec8.h"

namespace bus_kernels {
namespace {

using namespace vec8;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();

// Largest query / key tile. A backward step holds two [block_q, block_k] fp32 tiles (P and dS),
// 256 KB at these sizes, which with the operand panels stays within a core's L2; sequences up
// to kBlockK keys need no online rescaling at all.
constexpr int64_t kBlockQ = 128;
constexpr int64_t kBlockK = 256;

// ------------------------------------------------------------------------------ row helpers
BUS_INLINE float dot(const float* a, const float* b, int64_t n) {
  vf acc = splat(0.f);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) acc += loadu(a + j) * loadu(b + j);
  float s = hsum(acc);
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

// fp32 <-> storage dtype for one row of `n` values. fp32 and bf16 8 at a time (load8 / store8);
// Half goes through c10's scalar conversion.
template <typename scalar_t>
BUS_INLINE void row_to_float(const scalar_t* src, int64_t n, float* dst) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    int64_t j = 0;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      for (; j + kLanes <= n; j += kLanes) storeu(dst + j, load8(src + j));
    }
    for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
  }
}

template <typename scalar_t>
BUS_INLINE void row_from_float(const float* src, int64_t n, float mul, scalar_t* dst) {
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
    for (; j + kLanes <= n; j += kLanes) store8(dst + j, loadu(src + j) * mul);
  }
  for (; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j] * mul);
}

// `rows` rows of `cols` values, source rows `ld` apart, into contiguous fp32.
template <typename scalar_t>
BUS_INLINE void rows_to_float(const scalar_t* src, int64_t ld, int64_t rows, int64_t cols, float* dst) {
  for (int64_t i = 0; i < rows; ++i) row_to_float(src + i * ld, cols, dst + i * cols);
}

// Keys of row i that causal masking leaves (query q0 + i sees keys <= q0 + i), within the tile
// that starts at key k0: diag = q0 - k0.
BUS_INLINE int64_t visible(bool causal, int64_t i, int64_t diag, int64_t cols) {
  return causal ? std::min(std::max<int64_t>(i + diag + 1, 0), cols) : cols;
}

// ------------------------------------------------------------------------ elementwise passes
// Forward tile: turns raw dots S into P = exp(scale S + bias - m_new) in place, updating each
// row's running max m and sum l; alpha = exp(m_old - m_new) rescales what O already holds.
BUS_INLINE void softmax_tile(float* s, int64_t rows, int64_t cols, float scale, const float* bias,
                             bool causal, int64_t diag, float* m, float* l, float* alpha) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = s + i * cols;
    const int64_t valid = visible(causal, i, diag, cols);
    vf vmx = splat(kNegInf);
    int64_t j = 0;
    for (; j + kLanes <= valid; j += kLanes) {
      const vf x = loadu(row + j) * scale + loadu(bias + j);
      storeu(row + j, x);
      vmx = vmax(vmx, x);
    }
    float mx = hmax(vmx);
    for (; j < valid; ++j) {
      const float x = row[j] * scale + bias[j];
      row[j] = x;
      mx = x > mx ? x : mx;
    }
    const float m_new = m[i] > mx ? m[i] : mx;
    // A row with no finite logit yet keeps P = 0 (exp(-inf - 0)) instead of NaN.
    const float m_use = m_new == kNegInf ? 0.f : m_new;
    vf vsum = splat(0.f);
    j = 0;
    for (; j + kLanes <= valid; j += kLanes) {
      const vf p = vexp(loadu(row + j) - m_use);
      storeu(row + j, p);
      vsum += p;
    }
    if (j < valid) {
      vf x = splat(kNegInf);
      for (int64_t t = 0; t < valid - j; ++t) x[t] = row[j + t] - m_use;
      const vf p = vexp(x);
      for (int64_t t = 0; t < valid - j; ++t) row[j + t] = p[t];
      vsum += p;
    }
    for (j = valid; j < cols; ++j) row[j] = 0.f;
    const float a = exp1(m[i] - m_use);
    alpha[i] = a;
    l[i] = l[i] * a + hsum(vsum);
    m[i] = m_new;
  }
}

// Backward tile: S -> P = exp(scale S + bias - lse) in place (lse = +inf for rows that saw no key).
BUS_INLINE void probs_tile(float* s, int64_t rows, int64_t cols, float scale, const float* bias,
                           bool causal, int64_t diag, const float* lse) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = s + i * cols;
    const int64_t valid = visible(causal, i, diag, cols);
    const float li = lse[i];
    int64_t j = 0;
    for (; j + kLanes <= valid; j += kLanes) storeu(row + j, vexp(loadu(row + j) * scale + loadu(bias + j) - li));
    if (j < valid) {
      vf x = splat(kNegInf);
      for (int64_t t = 0; t < valid - j; ++t) x[t] = row[j + t] * scale + bias[j + t] - li;
      const vf p = vexp(x);
      for (int64_t t = 0; t < valid - j; ++t) row[j + t] = p[t];
    }
    for (j = valid; j < cols; ++j) row[j] = 0.f;
  }
}

// dP -> dS = P (dP - delta) in place; dbias (when given) accumulates the column sums. When the
// tile holds each row's every key, delta = sum_j P_ij dP_ij is computed here from the tile, in
// fp32 (`tile_delta`); otherwise it was computed from the output, delta_i = dO_i . O_i.
BUS_INLINE void dscores_tile(const float* p, float* dp, int64_t rows, int64_t cols, bool tile_delta,
                             float* delta, float* dbias) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* prow = p + i * cols;
    float* row = dp + i * cols;
    if (tile_delta) delta[i] = dot(prow, row, cols);
    const float di = delta[i];
    int64_t j = 0;
    if (dbias != nullptr) {
      for (; j + kLanes <= cols; j += kLanes) {
        const vf ds = loadu(prow + j) * (loadu(row + j) - di);
        storeu(row + j, ds);
        storeu(dbias + j, loadu(dbias + j) + ds);
      }
      for (; j < cols; ++j) {
        const float ds = prow[j] * (row[j] - di);
        row[j] = ds;
        dbias[j] += ds;
      }
    } else {
      for (; j + kLanes <= cols; j += kLanes) storeu(row + j, loadu(prow + j) * (loadu(row + j) - di));
      for (; j < cols; ++j) row[j] = prow[j] * (row[j] - di);
    }
  }
}

// ------------------------------------------------------------------------------------- GEMM
// C[m, n] = alpha op(A) op(B) + beta C on row-major fp32 with leading dimensions. op(A) is m x k,
// stored [m, k] or, when trans_a, [k, m]; op(B) is k x n, stored [k, n] or, when trans_b, [n, k].
// Strided views go to BLAS as they are (no copies): a head's rows in the packed layout are a
// matrix with leading dimension H * d. Out of line and on the baseline ISA: the cost is BLAS's.
__attribute__((noinline)) void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                                    const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                                    float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (k == 0) {
    if (beta == 0.f) {
      C.zero_();
    } else if (beta != 1.f) {
      C.mul_(beta);
    }
    return;
  }
  float* pa = const_cast<float*>(a);
  float* pb = const_cast<float*>(b);
  const at::Tensor A = trans_a ? at::from_blob(pa, {m, k}, {1, lda}, opts) : at::from_blob(pa, {m, k}, {lda, 1}, opts);
  const at::Tensor B = trans_b ? at::from_blob(pb, {k, n}, {1, ldb}, opts) : at::from_blob(pb, {k, n}, {ldb, 1}, opts);
  if (beta == 0.f && alpha == 1.f) {
    at::mm_out(C, A, B);
  } else {
    at::addmm_out(C, C, A, B, beta, alpha);
  }
}

// Splits n into the fewest tiles of at most `max_tile`, of near-equal size (a multiple of 8
// where possible), so that no tile is a sliver that costs a BLAS call for little work.
BUS_INLINE int64_t tile_size(int64_t n, int64_t max_tile) {
  if (n <= max_tile) return std::max<int64_t>(n, 1);
  const int64_t tiles = (n + max_tile - 1) / max_tile;
  const int64_t size = (n + tiles - 1) / tiles;
  return std::min(max_tile, (size + 7) / 8 * 8);
}

// --------------------------------------------------------------------------------- problem
struct Task {
  int64_t b, h, q_begin, q_end, cost;
};

struct Problem {
  const int32_t* cu;
  int64_t H, d;
  int64_t longest;  // longest sequence actually present (sizes the scratch)
  float scale;
  bool causal;
  bool has_bias;
  const float* bias;  // fp32 [total, H] or [total] (null when empty, as data_ptr of no elements is)
  bool bias_per_head;
  std::vector<Task> tasks;
};

// Key bias of sequence rows [start, start + n) for head h, as a contiguous fp32 row (zeros if none).
BUS_INLINE void gather_bias(const Problem& p, int64_t start, int64_t n, int64_t h, float* dst) {
  if (!p.has_bias) {
    std::fill(dst, dst + n, 0.f);
  } else if (p.bias_per_head) {
    for (int64_t j = 0; j < n; ++j) dst[j] = p.bias[(start + j) * p.H + h];
  } else {
    std::memcpy(dst, p.bias + start, n * sizeof(float));
  }
}

// (sequence, head) tasks, split along queries (forward only: the backward's dK/dV rows belong
// to the whole sequence) when there are too few to keep every thread busy. Largest first.
std::vector<Task> make_tasks(const int32_t* cu, int64_t B, int64_t H, bool causal, bool split_queries) {
  std::vector<Task> tasks;
  int64_t pieces = 1;
  if (split_queries) {
    const int64_t want = 4 * int64_t(at::get_num_threads());
    const int64_t heads = std::max<int64_t>(B * H, 1);
    pieces = std::max<int64_t>((want + heads - 1) / heads, 1);
  }
  tasks.reserve(B * H * pieces);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = int64_t(cu[b + 1]) - cu[b];
    if (n == 0) continue;
    // Chunks of whole query tiles, so a chunk boundary never adds a tile.
    const int64_t tiles = (n + kBlockQ - 1) / kBlockQ;
    const int64_t chunks = std::min(pieces, tiles);
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t q0 = std::min(n, (tiles * c / chunks) * kBlockQ);
        const int64_t q1 = std::min(n, (tiles * (c + 1) / chunks) * kBlockQ);
        // Keys seen: all n, or up to the query for causal.
        const int64_t keys = causal ? (q1 + q0 + 1) / 2 : n;
        tasks.push_back({b, h, q0, q1, (q1 - q0) * keys});
      }
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& x, const Task& y) { return x.cost > y.cost; });
  return tasks;
}

// Workers call MKL from their own threads; PyTorch turns MKL's dynamic threading off, so MKL
// would start a team of threads per product, and on a busy machine every product then waits on
// oversubscribed, spinning threads (forward passes went from 30 ms to seconds). Each worker asks
// MKL for one thread, on its own thread only, through MKL's C interface (the lower-case export
// is the Fortran one, which takes a pointer). Weak: a torch built on another BLAS lacks it.
#if defined(__linux__) && defined(__GNUC__)
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
#endif

class SingleThreadedBlas {
 public:
  SingleThreadedBlas() {
#if defined(__linux__) && defined(__GNUC__)
    if (&MKL_Set_Num_Threads_Local != nullptr) {
      previous_ = MKL_Set_Num_Threads_Local(1);
      active_ = true;
    }
#endif
  }
  ~SingleThreadedBlas() {
#if defined(__linux__) && defined(__GNUC__)
    if (active_) MKL_Set_Num_Threads_Local(previous_);  // 0 restores the global setting
#endif
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_ = 0;
  bool active_ = false;
};

// Tasks handed out one at a time, in order (largest first), to whichever worker asks next.
class TaskQueue {
 public:
  explicit TaskQueue(int64_t num_tasks) : num_tasks_(num_tasks) {}

  // The next task, or -1 once all are handed out.
  int64_t claim() {
    const int64_t t = next_.fetch_add(1, std::memory_order_relaxed);
    return t < num_tasks_ ? t : -1;
  }

  // Marks a claimed task done, with the error it raised if any.
  void finish(std::exception_ptr error) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (error && !error_) error_ = error;
    if (++done_ == num_tasks_) all_done_.notify_all();
  }

  // Waits for every task; rethrows the first error.
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    all_done_.wait(lock, [&] { return done_ == num_tasks_; });
    if (error_) std::rethrow_exception(error_);
  }

 private:
  const int64_t num_tasks_;
  std::atomic<int64_t> next_{0};
  std::mutex mutex_;
  std::condition_variable all_done_;
  int64_t done_ = 0;
  std::exception_ptr error_;
};

// Runs the tasks on the calling thread and at::get_num_threads() - 1 helpers from PyTorch's
// inter-op pool. Not at::parallel_for: its OpenMP implementation lives in headers and needs
// -fopenmp, which this extension is not built with, so there it runs on the calling thread only.
// `worker(queue, first)` runs task `first`, then claims more until none are left. A helper claims
// its first task before touching anything of the caller's, and the caller returns only once
// every claimed task is done, so a helper that starts late finds the queue empty and leaves.
template <typename F>
void run_workers(int64_t num_tasks, const F& worker) {
  if (num_tasks == 0) return;
  auto queue = std::make_shared<TaskQueue>(num_tasks);
  const int64_t helpers = at::in_parallel_region() ? 0 : std::min<int64_t>(at::get_num_threads(), num_tasks) - 1;
  for (int64_t i = 0; i < helpers; ++i) {
    try {
      at::launch([queue, worker] {
        const int64_t first = queue->claim();
        if (first >= 0) worker(*queue, first);
      });
    } catch (...) {
      break;  // no pool: the calling thread does the rest
    }
  }
  const int64_t first = queue->claim();
  if (first >= 0) worker(*queue, first);
  queue->wait();
}

// Per worker thread: one BLAS thread, and no autograd or view tracking on the internal products.
struct WorkerGuards {
  SingleThreadedBlas one_blas_thread;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
};

// -------------------------------------------------------------------------------- forward
struct ForwardScratch;

// A forward call: the tensors of every task.
template <typename scalar_t>
struct Forward {
  using Scratch = ForwardScratch;
  const Problem& p;
  const scalar_t *q, *k, *v;
  scalar_t* out;
  float* lse;
};

// One worker's fp32 scratch for the forward.
struct ForwardScratch {
  std::unique_ptr<float[]> memory;
  float *kbuf, *vbuf, *qbuf;  // half types: a head's K and V, one Q tile
  float *s, *o, *m, *l, *alpha, *bias;

  ForwardScratch(int64_t L, int64_t d, bool convert) {
    const int64_t converted = convert ? 2 * L * d + kBlockQ * d : 0;
    memory.reset(new float[converted + kBlockQ * kBlockK + kBlockQ * d + 3 * kBlockQ + L]);
    kbuf = memory.get();
    vbuf = kbuf + L * d;
    qbuf = vbuf + L * d;
    s = memory.get() + converted;
    o = s + kBlockQ * kBlockK;
    m = o + kBlockQ * d;
    l = m + kBlockQ;
    alpha = l + kBlockQ;
    bias = alpha + kBlockQ;
  }
};


// A forward task: out and lse of query rows [q_begin, q_end) of sequence b, head h.
template <typename scalar_t>
BUS_INLINE void run_task(const Forward<scalar_t>& f, const Task& task, const ForwardScratch& w) {
  const Problem& p = f.p;
  const int64_t H = p.H, d = p.d, ld = H * d;
  const int64_t start = p.cu[task.b], n = int64_t(p.cu[task.b + 1]) - start, h = task.h;
  const int64_t keys = p.causal ? task.q_end : n;
  const scalar_t* qh = f.q + start * ld + h * d;
  const scalar_t* kh = f.k + start * ld + h * d;
  const scalar_t* vh = f.v + start * ld + h * d;
  // fp32 goes to BLAS in place (rows H * d apart); half types convert a head's K and V once.
  const float *K, *V;
  int64_t ldkv;
  if constexpr (std::is_same_v<scalar_t, float>) {
    K = kh;
    V = vh;
    ldkv = ld;
  } else {
    rows_to_float(kh, ld, keys, d, w.kbuf);
    rows_to_float(vh, ld, keys, d, w.vbuf);
    K = w.kbuf;
    V = w.vbuf;
    ldkv = d;
  }
  gather_bias(p, start, keys, h, w.bias);

  for (int64_t q0 = task.q_begin; q0 < task.q_end; q0 += kBlockQ) {
    const int64_t bq = std::min(kBlockQ, task.q_end - q0);
    const float* Q;
    int64_t ldq;
    if constexpr (std::is_same_v<scalar_t, float>) {
      Q = qh + q0 * ld;
      ldq = ld;
    } else {
      rows_to_float(qh + q0 * ld, ld, bq, d, w.qbuf);
      Q = w.qbuf;
      ldq = d;
    }
    const int64_t k_end = p.causal ? q0 + bq : n;
    const int64_t bk = tile_size(k_end, kBlockK);
    std::fill(w.m, w.m + bq, kNegInf);
    std::fill(w.l, w.l + bq, 0.f);
    for (int64_t k0 = 0; k0 < k_end; k0 += bk) {
      const int64_t kb = std::min(bk, k_end - k0);
      gemm(false, true, bq, kb, d, 1.f, Q, ldq, K + k0 * ldkv, ldkv, 0.f, w.s, kb);  // S = Q K^T
      softmax_tile(w.s, bq, kb, p.scale, w.bias + k0, p.causal, q0 - k0, w.m, w.l, w.alpha);
      if (k0 > 0) {  // a later key tile raised some row maxima: rescale what O holds
        for (int64_t i = 0; i < bq; ++i) {
          float* row = w.o + i * d;
          const float a = w.alpha[i];
          for (int64_t c = 0; c < d; ++c) row[c] *= a;
        }
      }
      gemm(false, false, bq, d, kb, 1.f, w.s, kb, V + k0 * ldkv, ldkv, k0 > 0 ? 1.f : 0.f, w.o, d);  // O += P V
    }
    for (int64_t i = 0; i < bq; ++i) {
      const int64_t row = start + q0 + i;
      // l = 0: every key masked (a -inf bias): zeros and lse = -inf, as the reference.
      const float inv = w.l[i] > 0.f ? 1.f / w.l[i] : 0.f;
      row_from_float(w.o + i * d, d, inv, f.out + row * ld + h * d);
      f.lse[row * H + h] = w.l[i] > 0.f ? w.m[i] + std::log(w.l[i]) : kNegInf;
    }
  }
}

// ------------------------------------------------------------------------------- backward
struct BackwardScratch;

// A backward call: the tensors of every task.
template <typename scalar_t>
struct Backward {
  using Scratch = BackwardScratch;
  const Problem& p;
  const scalar_t *grad, *q, *k, *v, *out;
  const float* lse;
  scalar_t *dq, *dk, *dv;
  float* dbias;  // fp32 [total, H], or null
};

// One worker's fp32 scratch for the backward.
struct BackwardScratch {
  std::unique_ptr<float[]> memory;
  float *qbuf, *kbuf, *vbuf, *gbuf;  // half types: a head's Q, K, V, dO
  float *dq, *dk, *dv;               // accumulators, rows d apart
  float *s, *ds, *delta, *lse, *bias, *dbias, *orow;

  BackwardScratch(int64_t L, int64_t d, bool convert) {
    const int64_t converted = convert ? 4 * L * d : 0;
    memory.reset(new float[converted + 3 * L * d + 2 * kBlockQ * kBlockK + 4 * L + d]);
    qbuf = memory.get();
    kbuf = qbuf + L * d;
    vbuf = kbuf + L * d;
    gbuf = vbuf + L * d;
    dq = memory.get() + converted;
    dk = dq + L * d;
    dv = dk + L * d;
    s = dv + L * d;
    ds = s + kBlockQ * kBlockK;
    delta = ds + kBlockQ * kBlockK;
    lse = delta + L;
    bias = lse + L;
    dbias = bias + L;
    orow = dbias + L;
  }
};


// A backward task: dq, dk, dv (and the dbias column h) of every row of sequence b, head h.
template <typename scalar_t>
BUS_INLINE void run_task(const Backward<scalar_t>& g, const Task& task, const BackwardScratch& w) {
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  const Problem& p = g.p;
  const int64_t H = p.H, d = p.d, ld = H * d;
  const int64_t start = p.cu[task.b], n = int64_t(p.cu[task.b + 1]) - start, h = task.h;
  const int64_t off = start * ld + h * d;
  const float *Q, *K, *V, *dO;
  int64_t ldx;
  if constexpr (kFloat) {
    Q = g.q + off;
    K = g.k + off;
    V = g.v + off;
    dO = g.grad + off;
    ldx = ld;
  } else {
    rows_to_float(g.q + off, ld, n, d, w.qbuf);
    rows_to_float(g.k + off, ld, n, d, w.kbuf);
    rows_to_float(g.v + off, ld, n, d, w.vbuf);
    rows_to_float(g.grad + off, ld, n, d, w.gbuf);
    Q = w.qbuf;
    K = w.kbuf;
    V = w.vbuf;
    dO = w.gbuf;
    ldx = d;
  }
  for (int64_t i = 0; i < n; ++i) {
    const float li = g.lse[(start + i) * H + h];
    w.lse[i] = li == kNegInf ? kPosInf : li;  // a row that saw no key: P = exp(-inf) = 0
  }
  gather_bias(p, start, n, h, w.bias);
  for (float* acc : {w.dq, w.dk, w.dv}) std::fill(acc, acc + n * d, 0.f);
  std::fill(w.dbias, w.dbias + n, 0.f);

  for (int64_t q0 = 0; q0 < n; q0 += kBlockQ) {
    const int64_t bq = std::min(kBlockQ, n - q0);
    const float* Qb = Q + q0 * ldx;
    const float* dOb = dO + q0 * ldx;
    const int64_t k_end = p.causal ? q0 + bq : n;
    const int64_t bk = tile_size(k_end, kBlockK);
    // delta_i = sum_j P_ij dP_ij. With one key tile it comes from the tile itself. Otherwise it is
    // needed before the last tile is seen, and comes from the output: delta_i = dO_i . O_i, which
    // for fp16/bf16 carries O's rounding (as in flash attention), the reason to prefer the tile.
    const bool tile_delta = bk >= k_end;
    if (!tile_delta) {
      for (int64_t i = q0; i < q0 + bq; ++i) {
        const scalar_t* o = g.out + off + i * ld;
        if constexpr (kFloat) {
          w.delta[i] = dot(dO + i * ldx, o, d);
        } else {
          row_to_float(o, d, w.orow);
          w.delta[i] = dot(dO + i * ldx, w.orow, d);
        }
      }
    }
    for (int64_t k0 = 0; k0 < k_end; k0 += bk) {
      const int64_t kb = std::min(bk, k_end - k0);
      const float* Kb = K + k0 * ldx;
      const float* Vb = V + k0 * ldx;
      gemm(false, true, bq, kb, d, 1.f, Qb, ldx, Kb, ldx, 0.f, w.s, kb);  // S = Q K^T
      probs_tile(w.s, bq, kb, p.scale, w.bias + k0, p.causal, q0 - k0, w.lse + q0);
      gemm(true, false, kb, d, bq, 1.f, w.s, kb, dOb, ldx, 1.f, w.dv + k0 * d, d);  // dV += P^T dO
      gemm(false, true, bq, kb, d, 1.f, dOb, ldx, Vb, ldx, 0.f, w.ds, kb);          // dP = dO V^T
      dscores_tile(w.s, w.ds, bq, kb, tile_delta, w.delta + q0, p.has_bias ? w.dbias + k0 : nullptr);
      gemm(false, false, bq, d, kb, p.scale, w.ds, kb, Kb, ldx, 1.f, w.dq + q0 * d, d);  // dQ += s dS K
      gemm(true, false, kb, d, bq, p.scale, w.ds, kb, Qb, ldx, 1.f, w.dk + k0 * d, d);   // dK += s dS^T Q
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    row_from_float(w.dq + i * d, d, 1.f, g.dq + off + i * ld);
    row_from_float(w.dk + i * d, d, 1.f, g.dk + off + i * ld);
    row_from_float(w.dv + i * d, d, 1.f, g.dv + off + i * ld);
  }
  if (p.has_bias) {
    for (int64_t j = 0; j < n; ++j) g.dbias[(start + j) * H + h] = w.dbias[j];
  }
}

// ------------------------------------------------------------------------------- workers
// Runs task `t` of `job` (a Forward or a Backward), then claims more until none are left.
template <template <typename> class Job, typename scalar_t>
BUS_INLINE void worker(const Job<scalar_t>& job, TaskQueue& queue, int64_t t) {
  WorkerGuards guards;
  const typename Job<scalar_t>::Scratch w(job.p.longest, job.p.d, !std::is_same_v<scalar_t, float>);
  for (; t >= 0; t = queue.claim()) {
    std::exception_ptr error;
    try {
      run_task(job, job.p.tasks[t], w);
    } catch (...) {
      error = std::current_exception();
    }
    queue.finish(error);
  }
}

// The same worker compiled for the baseline and for AVX2 + FMA.
template <typename Job>
void worker_baseline(const Job& job, TaskQueue& queue, int64_t t) {
  worker(job, queue, t);
}

#ifdef BUS_X86_DISPATCH
template <typename Job>
BUS_TARGET_AVX2 void worker_avx2(const Job& job, TaskQueue& queue, int64_t t) {
  worker(job, queue, t);
}
#endif

// Runs every task of `job` on the calling thread and the pool, with the variant this CPU runs.
template <typename Job>
void run_job(const Job& job) {
  const int64_t num_tasks = int64_t(job.p.tasks.size());
#ifdef BUS_X86_DISPATCH
  if (has_avx2_fma()) {
    run_workers(num_tasks, [&](TaskQueue& queue, int64_t t) { worker_avx2(job, queue, t); });
    return;
  }
#endif
  run_workers(num_tasks, [&](TaskQueue& queue, int64_t t) { worker_baseline(job, queue, t); });
}

// ------------------------------------------------------------------------ argument checks
void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 3, op, ": q must be [total, H, d], got ", q.sizes());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": q must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(q.device().is_cpu(), op, ": q must be a CPU tensor, got ", q.device());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"v", v}}) {
    TORCH_CHECK(t.sizes() == q.sizes(), op, ": ", name, " must have q's shape ", q.sizes(), ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == dt, op, ": ", name, " must have q's dtype ", dt, ", got ", t.scalar_type());
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  }
}

// Validates cu_seqlens, max_seqlen and key_bias; fills the shape fields of `p` and returns the
// contiguous cu_seqlens and the fp32 key bias (undefined if none).
std::pair<at::Tensor, at::Tensor> check_problem(const char* op, const at::Tensor& q, const at::Tensor& cu_seqlens,
                                                int64_t max_seqlen, const std::optional<at::Tensor>& key_bias,
                                                Problem& p) {
  const int64_t total = q.size(0), H = q.size(1);
  TORCH_CHECK(max_seqlen >= 0, op, ": max_seqlen must be >= 0, got ", max_seqlen);
  check_cu_seqlens_meta(op, cu_seqlens, q);
  at::Tensor cu = cu_seqlens.contiguous();
  const int64_t B = cu.numel() - 1;
  const int32_t* c = cu.data_ptr<int32_t>();
  check_cu_seqlens_values(op, c, B, total, max_seqlen);
  at::Tensor bias;
  if (key_bias.has_value() && key_bias->defined()) {
    const at::Tensor& kb = *key_bias;
    TORCH_CHECK(kb.device().is_cpu(), op, ": key_bias must be a CPU tensor, got ", kb.device());
    TORCH_CHECK(at::isFloatingType(kb.scalar_type()), op, ": key_bias must be a float tensor, got ", kb.scalar_type());
    const bool per_head = kb.dim() == 2 && kb.size(0) == total && kb.size(1) == H;
    const bool per_key = kb.dim() == 1 && kb.size(0) == total;
    TORCH_CHECK(per_head || per_key, op, ": key_bias must be [total=", total, ", H=", H, "] or [total=", total,
                "], got ", kb.sizes());
    bias = kb.to(at::kFloat).contiguous();
    p.has_bias = true;
    p.bias = bias.data_ptr<float>();
    p.bias_per_head = per_head;
  } else {
    p.has_bias = false;
    p.bias = nullptr;
    p.bias_per_head = false;
  }
  p.cu = c;
  p.H = H;
  p.d = q.size(2);
  p.longest = 0;
  for (int64_t b = 0; b < B; ++b) p.longest = std::max<int64_t>(p.longest, int64_t(c[b + 1]) - c[b]);
  return {cu, bias};
}

// ------------------------------------------------------------------------------ entry points
// Calls f(scalar_t{}) for the three supported dtypes (checked before).
template <typename F>
void dispatch_dtype(at::ScalarType dt, const F& f) {
  switch (dt) {
    case at::kFloat:
      return f(float{});
    case at::kHalf:
      return f(c10::Half{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    default:
      TORCH_CHECK(false, "bus_kernels_C::varlen_attention: unsupported dtype ", dt);
  }
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in, const at::Tensor& cu_seqlens,
                                                        int64_t max_seqlen, double scale, bool causal,
                                                        const std::optional<at::Tensor>& key_bias) {
  const char* op = "bus_kernels_C::varlen_attention";
  check_qkv(op, q_in, k_in, v_in);
  Problem p;
  const auto keep_alive = check_problem(op, q_in, cu_seqlens, max_seqlen, key_bias, p);
  p.scale = float(scale);
  p.causal = causal;
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  p.tasks = make_tasks(p.cu, cu_seqlens.numel() - 1, p.H, causal, /*split_queries=*/true);
  dispatch_dtype(q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const Forward<scalar_t> f{p, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                              out.data_ptr<scalar_t>(), lse.data_ptr<float>()};
    run_job(f);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& cu_seqlens, int64_t max_seqlen,
    double scale, bool causal, const std::optional<at::Tensor>& key_bias) {
  const char* op = "bus_kernels_C::varlen_attention_backward";
  check_qkv(op, q_in, k_in, v_in);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"grad", grad_in}, {"out", out_in}}) {
    TORCH_CHECK(t.sizes() == q_in.sizes(), op, ": ", name, " must have q's shape ", q_in.sizes(), ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == q_in.scalar_type(), op, ": ", name, " must have q's dtype ", q_in.scalar_type(),
                ", got ", t.scalar_type());
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  }
  TORCH_CHECK(lse_in.dim() == 2 && lse_in.size(0) == q_in.size(0) && lse_in.size(1) == q_in.size(1), op,
              ": lse must be [total=", q_in.size(0), ", H=", q_in.size(1), "], got ", lse_in.sizes());
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse_in.scalar_type());
  TORCH_CHECK(lse_in.device().is_cpu(), op, ": lse must be a CPU tensor, got ", lse_in.device());
  Problem p;
  const auto keep_alive = check_problem(op, q_in, cu_seqlens, max_seqlen, key_bias, p);
  p.scale = float(scale);
  p.causal = causal;
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor grad = grad_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const bool has_bias = p.has_bias;
  // Per head, then summed over heads for a per-key bias: each task writes only its own column.
  at::Tensor dbias_heads = has_bias ? at::empty({q.size(0), p.H}, q.options().dtype(at::kFloat)) : at::Tensor();
  p.tasks = make_tasks(p.cu, cu_seqlens.numel() - 1, p.H, causal, /*split_queries=*/false);
  dispatch_dtype(q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const Backward<scalar_t> g{p,
                               grad.data_ptr<scalar_t>(),
                               q.data_ptr<scalar_t>(),
                               k.data_ptr<scalar_t>(),
                               v.data_ptr<scalar_t>(),
                               out.data_ptr<scalar_t>(),
                               lse.data_ptr<float>(),
                               dq.data_ptr<scalar_t>(),
                               dk.data_ptr<scalar_t>(),
                               dv.data_ptr<scalar_t>(),
                               has_bias ? dbias_heads.data_ptr<float>() : nullptr};
    run_job(g);
  });
  if (!has_bias) return {dq, dk, dv, at::empty({0}, q_in.options())};
  const at::Tensor summed = p.bias_per_head ? dbias_heads : dbias_heads.sum(1);
  return {dq, dk, dv, summed.to(key_bias->scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(bus_kernels_C, CPU, m) {
  m.impl("varlen_attention", &varlen_attention_cpu);
  m.impl("varlen_attention_backward", &varlen_attention_backward_cpu);
}

}  // namespace bus_kernels
