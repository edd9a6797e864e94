// CUDA kernels of hyperkern::hyper_l2_penalty and its backward (the formulas: csrc/penalty.h).
//
// One launch covers up to kMaxLayers layers: their pointers and sizes travel in the kernel's
// parameters (a table, no host-to-device copy), and block b handles row b of the layers' rows laid
// end to end. A model with more layers takes one launch per kMaxLayers of them.
//   penalty_rows_kernel      per row o: ||W_o||^2, W_o . D_o, ||D_o||^2 (a block reduction), then the
//                            row's kernel and bias terms; one partial per row
//   penalty_sum_kernel       one block sums the partials in a fixed order into the 0-d output: no
//                            atomics, so the result is the same run to run
//   penalty_backward_kernel  per row o: one pass that writes dW_o, dD_o and reduces W_o . D_o and
//                            ||D_o||^2, then the row's embedding gradients (and its bias gradients)
// The incoming gradient is read on the device (no sync). Accumulation in float (double for double).
// Outputs come from at::detail::empty_cuda: no dispatched ATen op on the way for contiguous inputs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/EmptyTensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../penalty.h"

namespace hyperkern {
namespace {

using at::Tensor;
using penalty::Layer;
using penalty::OptTensorList;
using penalty::Problem;
using PenaltyGrads = std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                                std::vector<Tensor>>;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxLayers = 24;  // per launch: the table below stays well inside the 4 KiB of kernel parameters

template <typename T>
struct LayerPtrs {
  const T *w, *d, *a, *b, *db;  // b, db null without a bias
  T *gw, *gd, *ga, *gb, *gdb;   // the backward's outputs (null in the forward)
  int64_t out, fan, row0;       // row0: the layer's first row among the launch's rows
  int32_t kcol, bcol;
};

template <typename T>
struct Table {
  LayerPtrs<T> layer[kMaxLayers];
  const T *stats, *member;  // (G, K), (E, G, K): [mean | c (m) | M (m x m)] per column
  int64_t G, m, E, K;
  int32_t num_layers;
};

template <typename acc, typename T>
__device__ __forceinline__ acc dot(const T* a, const T* c, int64_t m) {
  acc s = 0;
  for (int64_t j = 0; j < m; ++j) s += acc(a[j]) * acc(c[j]);
  return s;
}

template <typename acc, typename T>
__device__ __forceinline__ acc quad(const T* a, const T* M, int64_t m) {
  acc s = 0;
  for (int64_t j = 0; j < m; ++j) {
    acc t = 0;
    for (int64_t k = 0; k < m; ++k) t += acc(M[j * m + k]) * acc(a[k]);
    s += acc(a[j]) * t;
  }
  return s;
}

// The block's sum of N values per thread, in a fixed order; every thread gets the result.
template <typename acc, int N>
__device__ __forceinline__ void block_sum(acc (&v)[N]) {
  __shared__ acc shared[N][kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    for (int off = 16; off > 0; off /= 2) v[i] += __shfl_down_sync(0xffffffffu, v[i], off);
    if (lane == 0) shared[i][warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    acc s = 0;
    for (int w = 0; w < kWarps; ++w) s += shared[i][w];
    v[i] = s;
  }
  __syncthreads();
}

// Which layer row `row` of the launch belongs to.
template <typename T>
__device__ __forceinline__ int find_layer(const Table<T>& t, int64_t row) {
  int l = 0;
  while (l + 1 < t.num_layers && row >= t.layer[l + 1].row0) ++l;
  return l;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) penalty_rows_kernel(const __grid_constant__ Table<T> t,
                                                                 at::opmath_type<T>* partial) {
  using acc = at::opmath_type<T>;
  const int64_t row = blockIdx.x;
  const LayerPtrs<T>& y = t.layer[find_layer(t, row)];
  const int64_t o = row - y.row0, m = t.m, G = t.G, K = t.K;
  const T *w = y.w + o * y.fan, *d = y.d + o * y.fan;
  acc v[3] = {0, 0, 0};
  for (int64_t i = threadIdx.x; i < y.fan; i += kThreads) {
    const acc wi = acc(w[i]), di = acc(d[i]);
    v[0] += wi * wi;
    v[1] += wi * di;
    v[2] += di * di;
  }
  block_sum<acc, 3>(v);
  if (threadIdx.x != 0) return;
  const T* a1 = y.a + o * m;
  const T* s = t.stats + y.kcol * K;
  const acc a = dot<acc>(a1, s + 1, m), q = quad<acc>(a1, s + 1 + m, m);
  acc total = acc(s[0]) * v[0] + acc(2) * v[1] * a + v[2] * q;
  if (y.b != nullptr) {
    const T* a2 = y.a + (y.out + o) * m;
    acc bias = 0;
    for (int64_t k = 0; k < t.E; ++k) {
      const T* sk = t.member + (k * G + y.bcol) * K;
      const acc bk = acc(y.b[k * y.out + o]), dbk = acc(y.db[k * y.out + o]);
      const acc a2k = dot<acc>(a2, sk + 1, m), q2k = quad<acc>(a2, sk + 1 + m, m);
      bias += acc(sk[0]) * bk * bk + acc(2) * bk * dbk * a2k + dbk * dbk * q2k;
    }
    total += bias / acc(t.E);
  }
  partial[row] = total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) penalty_sum_kernel(const at::opmath_type<T>* partial, int64_t n,
                                                                T* out) {
  using acc = at::opmath_type<T>;
  acc v[1] = {0};
  for (int64_t i = threadIdx.x; i < n; i += kThreads) v[0] += partial[i];
  block_sum<acc, 1>(v);
  if (threadIdx.x == 0) *out = static_cast<T>(v[0]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) penalty_backward_kernel(const __grid_constant__ Table<T> t,
                                                                     const T* grad) {
  using acc = at::opmath_type<T>;
  const int64_t row = blockIdx.x;
  const LayerPtrs<T>& y = t.layer[find_layer(t, row)];
  const int64_t o = row - y.row0, m = t.m, G = t.G, E = t.E, K = t.K;
  const acc g = acc(*grad);
  const T* a1 = y.a + o * m;
  const T *col = t.stats + y.kcol * K, *c = col + 1, *M = col + 1 + m;  // [mean | c | M]
  const acc a = dot<acc>(a1, c, m), q = quad<acc>(a1, M, m);  // every thread: m^2, no wait for one
  const acc s_mu = acc(2) * g * acc(col[0]), s_a = acc(2) * g * a, s_q = acc(2) * g * q;
  const T *w = y.w + o * y.fan, *d = y.d + o * y.fan;
  T *gw = y.gw + o * y.fan, *gd = y.gd + o * y.fan;
  acc v[2] = {0, 0};
  for (int64_t i = threadIdx.x; i < y.fan; i += kThreads) {
    const acc wi = acc(w[i]), di = acc(d[i]);
    gw[i] = static_cast<T>(s_mu * wi + s_a * di);
    gd[i] = static_cast<T>(s_a * wi + s_q * di);
    v[0] += wi * di;
    v[1] += di * di;
  }
  block_sum<acc, 2>(v);
  // dA1_o = g (2 (W_o . D_o) c + ||D_o||^2 (M + M^T) A1_o^T)
  for (int64_t j = threadIdx.x; j < m; j += kThreads) {
    acc sym = 0;
    for (int64_t k = 0; k < m; ++k) sym += (acc(M[j * m + k]) + acc(M[k * m + j])) * acc(a1[k]);
    y.ga[o * m + j] = static_cast<T>(g * (acc(2) * v[0] * acc(c[j]) + v[1] * sym));
  }
  if (y.b == nullptr) return;
  const T* a2 = y.a + (y.out + o) * m;
  const acc s = g / acc(E);
  for (int64_t k = threadIdx.x; k < E; k += kThreads) {
    const T *sk = t.member + (k * G + y.bcol) * K, *ck = sk + 1, *Mk = sk + 1 + m;
    const acc bk = acc(y.b[k * y.out + o]), dbk = acc(y.db[k * y.out + o]);
    const acc a2k = dot<acc>(a2, ck, m), q2k = quad<acc>(a2, Mk, m);
    y.gb[k * y.out + o] = static_cast<T>(acc(2) * s * (acc(sk[0]) * bk + a2k * dbk));
    y.gdb[k * y.out + o] = static_cast<T>(acc(2) * s * (a2k * bk + q2k * dbk));
  }
  // dA2_o = g/E sum_k [2 b_ko db_ko c_k + db_ko^2 (M_k + M_k^T) A2_o^T]
  for (int64_t j = threadIdx.x; j < m; j += kThreads) {
    acc sum = 0;
    for (int64_t k = 0; k < E; ++k) {
      const T *ck = t.member + (k * G + y.bcol) * K + 1, *Mk = ck + m;
      const acc bk = acc(y.b[k * y.out + o]), dbk = acc(y.db[k * y.out + o]);
      acc sym = 0;
      for (int64_t i = 0; i < m; ++i) sym += (acc(Mk[j * m + i]) + acc(Mk[i * m + j])) * acc(a2[i]);
      sum += acc(2) * bk * dbk * acc(ck[j]) + dbk * dbk * sym;
    }
    y.ga[(y.out + o) * m + j] = static_cast<T>(s * sum);
  }
}

// The launches' tables: layers [first, first + kMaxLayers) each, with their rows counted from 0.
// `grads` (the backward's outputs) may be null.
template <typename T>
std::vector<std::pair<Table<T>, int64_t>> tables(const Problem& p, const std::vector<Tensor>* grads) {
  std::vector<std::pair<Table<T>, int64_t>> out;
  const int64_t L = int64_t(p.layers.size());
  for (int64_t first = 0; first < L; first += kMaxLayers) {
    Table<T> t{};
    t.stats = p.stats.const_data_ptr<T>();
    t.member = p.member_stats.const_data_ptr<T>();
    t.G = p.G;
    t.m = p.m;
    t.E = p.E;
    t.K = p.K;
    int64_t rows = 0;
    const int64_t n = std::min<int64_t>(kMaxLayers, L - first);
    for (int64_t i = 0; i < n; ++i) {
      const Layer& y = p.layers[first + i];
      LayerPtrs<T>& e = t.layer[t.num_layers++];
      e.w = y.w.const_data_ptr<T>();
      e.d = y.d.const_data_ptr<T>();
      e.a = y.a.const_data_ptr<T>();
      e.b = y.has_bias ? y.b.const_data_ptr<T>() : nullptr;
      e.db = y.has_bias ? y.db.const_data_ptr<T>() : nullptr;
      if (grads != nullptr) {  // grads[0..4]: dW, dD, dA, db, ddb lists
        e.gw = grads[0][first + i].mutable_data_ptr<T>();
        e.gd = grads[1][first + i].mutable_data_ptr<T>();
        e.ga = grads[2][first + i].mutable_data_ptr<T>();
        e.gb = y.has_bias ? grads[3][first + i].mutable_data_ptr<T>() : nullptr;
        e.gdb = y.has_bias ? grads[4][first + i].mutable_data_ptr<T>() : nullptr;
      }
      e.out = y.out;
      e.fan = y.fan;
      e.row0 = rows;
      e.kcol = int32_t(y.kcol);
      e.bcol = int32_t(y.bcol);
      rows += y.out;
    }
    out.emplace_back(t, rows);
  }
  return out;
}

Tensor hyper_l2_penalty_cuda(at::TensorList weights, at::TensorList deltas, at::TensorList embeddings,
                             const OptTensorList& biases, const OptTensorList& delta_biases, const Tensor& stats,
                             const Tensor& member_stats, at::IntArrayRef kernel_cols, at::IntArrayRef bias_cols) {
  const Problem p = penalty::make_problem("hyper_l2_penalty", weights, deltas, embeddings, biases, delta_biases, stats,
                                          member_stats, kernel_cols, bias_cols);
  TORCH_CHECK(p.device.is_cuda(), "hyper_l2_penalty: the CUDA kernel got tensors on ", p.device);
  TORCH_CHECK(p.rows < (int64_t(1) << 31), "hyper_l2_penalty: too many rows (", p.rows, ") for one grid");
  const c10::cuda::CUDAGuard guard(p.device);
  auto stream = at::cuda::getCurrentCUDAStream();
  Tensor out(at::detail::empty_cuda({}, p.dtype, p.device, std::nullopt));
  Tensor partial(at::detail::empty_cuda({std::max<int64_t>(1, p.rows)}, at::toOpMathType(p.dtype), p.device,
                                        std::nullopt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "hyper_l2_penalty_cuda", [&] {
    using acc = at::opmath_type<scalar_t>;
    acc* part = partial.mutable_data_ptr<acc>();
    int64_t offset = 0;
    for (const auto& [table, rows] : tables<scalar_t>(p, nullptr)) {
      if (rows > 0) {
        penalty_rows_kernel<scalar_t><<<dim3(unsigned(rows)), kThreads, 0, stream>>>(table, part + offset);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      offset += rows;
    }
    penalty_sum_kernel<scalar_t><<<1, kThreads, 0, stream>>>(part, p.rows, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

PenaltyGrads hyper_l2_penalty_backward_cuda(const Tensor& grad, at::TensorList weights, at::TensorList deltas,
                                            at::TensorList embeddings, const OptTensorList& biases,
                                            const OptTensorList& delta_biases, const Tensor& stats,
                                            const Tensor& member_stats, at::IntArrayRef kernel_cols,
                                            at::IntArrayRef bias_cols) {
  const Problem p = penalty::make_problem("hyper_l2_penalty_backward", weights, deltas, embeddings, biases,
                                          delta_biases, stats, member_stats, kernel_cols, bias_cols);
  TORCH_CHECK(p.device.is_cuda(), "hyper_l2_penalty_backward: the CUDA kernel got tensors on ", p.device);
  penalty::check_grad(grad, p);
  TORCH_CHECK(p.rows < (int64_t(1) << 31), "hyper_l2_penalty_backward: too many rows (", p.rows, ") for one grid");
  const c10::cuda::CUDAGuard guard(p.device);
  auto stream = at::cuda::getCurrentCUDAStream();
  const size_t L = p.layers.size();
  std::vector<Tensor> grads[5];
  for (auto& list : grads) list.resize(L);
  static const int64_t kEmpty[1] = {0};  // absent bias: an empty gradient
  for (size_t l = 0; l < L; ++l) {
    const Layer& y = p.layers[l];
    auto empty = [&](at::IntArrayRef size) { return Tensor(at::detail::empty_cuda(size, p.dtype, p.device, std::nullopt)); };
    grads[0][l] = empty(weights[l].sizes());
    grads[1][l] = empty(weights[l].sizes());
    grads[2][l] = empty(embeddings[l].sizes());
    grads[3][l] = empty(y.has_bias ? y.b.sizes() : at::IntArrayRef(kEmpty, 1));
    grads[4][l] = empty(y.has_bias ? y.b.sizes() : at::IntArrayRef(kEmpty, 1));
  }
  const Tensor g = grad.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "hyper_l2_penalty_backward_cuda", [&] {
    for (const auto& [table, rows] : tables<scalar_t>(p, grads)) {
      if (rows == 0) continue;
      penalty_backward_kernel<scalar_t><<<dim3(unsigned(rows)), kThreads, 0, stream>>>(table, g.const_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {std::move(grads[0]), std::move(grads[1]), std::move(grads[2]), std::move(grads[3]), std::move(grads[4])};
}

}  // namespace

TORCH_LIBRARY_IMPL(hyperkern, CUDA, m) {
  m.impl("hyper_l2_penalty", &hyper_l2_penalty_cuda);
  m.impl("hyper_l2_penalty_backward", &hyper_l2_penalty_backward_cuda);
}

}  // namespace hyperkern
