// CPU kernels of hyperkern::hyper_l2_penalty and its backward (the formulas: csrc/penalty.h).
//
// Every layer's rows are cut into chunks of about kChunkElements weight elements; one
// at::parallel_for runs over the chunks of all layers. The forward reads each row of W and Delta once
// (||W_o||^2, W_o . D_o, ||D_o||^2 in one pass) and writes one partial sum per chunk, summed in chunk
// order afterwards, so the result does not depend on the number of threads. The backward's rows are
// independent: per row one pass for the dot products and one that writes dW_o and dD_o, plus the
// row's embedding (and bias) gradients. Accumulation in at::opmath_type (float for bfloat16 / half).
// No dispatched ATen op on the way for contiguous inputs: outputs come from at::detail::empty_cpu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../penalty.h"
#include "cpu_util.h"

namespace hyperkern {
namespace {

using at::Tensor;
using penalty::dot_m;
using penalty::Layer;
using penalty::OptTensorList;
using penalty::Problem;
using penalty::quad_m;
using PenaltyGrads = std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                                std::vector<Tensor>>;

constexpr int64_t kChunkElements = 16384;

struct Chunk {
  int64_t layer, o0, o1;
};

std::vector<Chunk> chunks(const Problem& p) {
  std::vector<Chunk> out;
  for (int64_t l = 0; l < int64_t(p.layers.size()); ++l) {
    const Layer& y = p.layers[l];
    const int64_t step = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(1, y.fan));
    for (int64_t o = 0; o < y.out; o += step) out.push_back({l, o, std::min(y.out, o + step)});
  }
  return out;
}

// Chunks per task: all of them (one thread) when the whole model's weights are too few to share out.
int64_t grain(const Problem& p, const std::vector<Chunk>& work) {
  int64_t elements = 0;
  for (const Layer& y : p.layers) elements += y.out * y.fan;
  return elements < 4 * kChunkElements ? std::max<int64_t>(1, int64_t(work.size())) : 1;
}

// ||w||^2, w . d, ||d||^2 of one row, widened to the accumulation type.
template <typename T>
HYPERKERN_INLINE void row_dots_body(const T* w, const T* d, int64_t n, at::opmath_type<T>* out) {
  using acc = at::opmath_type<T>;
  acc ww = 0, wd = 0, dd = 0;
#ifdef _OPENMP
#pragma omp simd reduction(+ : ww, wd, dd)
#endif
  for (int64_t i = 0; i < n; ++i) {
    const acc wi = cpu::widen(w[i]), di = cpu::widen(d[i]);
    ww += wi * wi;
    wd += wi * di;
    dd += di * di;
  }
  out[0] = ww;
  out[1] = wd;
  out[2] = dd;
}

// dW = s (mu w + a d), dD = s (a w + q d) over one row.
template <typename T>
HYPERKERN_INLINE void row_grads_body(const T* w, const T* d, T* dw, T* dd, int64_t n, at::opmath_type<T> s_mu,
                                     at::opmath_type<T> s_a, at::opmath_type<T> s_q) {
  using acc = at::opmath_type<T>;
  for (int64_t i = 0; i < n; ++i) {
    const acc wi = cpu::widen(w[i]), di = cpu::widen(d[i]);
    dw[i] = cpu::narrow_to<T>(s_mu * wi + s_a * di);
    dd[i] = cpu::narrow_to<T>(s_a * wi + s_q * di);
  }
}

// AVX-512 / AVX2 clones for the common dtypes; the template serves the rest (half).
#define HYPERKERN_PENALTY_ROWS(T)                                                                             \
  HYPERKERN_CPU_CLONES void row_dots(const T* w, const T* d, int64_t n, at::opmath_type<T>* out) {            \
    row_dots_body(w, d, n, out);                                                                              \
  }                                                                                                           \
  HYPERKERN_CPU_CLONES void row_grads(const T* w, const T* d, T* dw, T* dd, int64_t n, at::opmath_type<T> s_mu, \
                                      at::opmath_type<T> s_a, at::opmath_type<T> s_q) {                      \
    row_grads_body(w, d, dw, dd, n, s_mu, s_a, s_q);                                                          \
  }
HYPERKERN_PENALTY_ROWS(float)
HYPERKERN_PENALTY_ROWS(double)
HYPERKERN_PENALTY_ROWS(c10::BFloat16)
#undef HYPERKERN_PENALTY_ROWS
template <typename T>
void row_dots(const T* w, const T* d, int64_t n, at::opmath_type<T>* out) {
  row_dots_body(w, d, n, out);
}
template <typename T>
void row_grads(const T* w, const T* d, T* dw, T* dd, int64_t n, at::opmath_type<T> s_mu, at::opmath_type<T> s_a,
               at::opmath_type<T> s_q) {
  row_grads_body(w, d, dw, dd, n, s_mu, s_a, s_q);
}

// One layer's statistics: the kernel column's mu, c, M; the bias column's per member (member k at
// member + k * G * K: mu_k = [0], c_k = [1 .. m], M_k = [1 + m ..]).
template <typename T>
struct LayerStats {
  at::opmath_type<T> mu;
  const T *c, *M, *member;
};

template <typename T>
LayerStats<T> layer_stats(const Problem& p, const Layer& y) {
  const T* s = p.stats.const_data_ptr<T>() + y.kcol * p.K;
  return {at::opmath_type<T>(s[0]), s + 1, s + 1 + p.m, p.member_stats.const_data_ptr<T>() + y.bcol * p.K};
}

template <typename T>
at::opmath_type<T> forward_rows(const Problem& p, const Chunk& ch) {
  using acc = at::opmath_type<T>;
  const Layer& y = p.layers[ch.layer];
  const LayerStats<T> st = layer_stats<T>(p, y);
  const int64_t m = p.m, G = p.G, E = p.E, K = p.K;
  const T *W = y.w.const_data_ptr<T>(), *D = y.d.const_data_ptr<T>(), *A = y.a.const_data_ptr<T>();
  acc total = 0;
  for (int64_t o = ch.o0; o < ch.o1; ++o) {
    acc dots[3];
    row_dots(W + o * y.fan, D + o * y.fan, y.fan, dots);
    const T* a1 = A + o * m;
    const acc a = dot_m<acc>(a1, st.c, m), q = quad_m<acc>(a1, st.M, m);
    acc row = st.mu * dots[0] + acc(2) * dots[1] * a + dots[2] * q;
    if (y.has_bias) {
      const T *b = y.b.const_data_ptr<T>(), *db = y.db.const_data_ptr<T>(), *a2 = A + (y.out + o) * m;
      acc bias = 0;
      for (int64_t k = 0; k < E; ++k) {
        const T* sk = st.member + k * G * K;
        const acc bk = acc(b[k * y.out + o]), dbk = acc(db[k * y.out + o]);
        const acc a2k = dot_m<acc>(a2, sk + 1, m), q2k = quad_m<acc>(a2, sk + 1 + m, m);
        bias += acc(sk[0]) * bk * bk + acc(2) * bk * dbk * a2k + dbk * dbk * q2k;
      }
      row += bias / acc(E);
    }
    total += row;
  }
  return total;
}

Tensor hyper_l2_penalty_cpu(at::TensorList weights, at::TensorList deltas, at::TensorList embeddings,
                            const OptTensorList& biases, const OptTensorList& delta_biases, const Tensor& stats,
                            const Tensor& member_stats, at::IntArrayRef kernel_cols, at::IntArrayRef bias_cols) {
  const Problem p = penalty::make_problem("hyper_l2_penalty", weights, deltas, embeddings, biases, delta_biases, stats,
                                          member_stats, kernel_cols, bias_cols);
  TORCH_CHECK(p.device.is_cpu(), "hyper_l2_penalty: the CPU kernel got tensors on ", p.device);
  Tensor out(at::detail::empty_cpu({}, p.dtype));
  const std::vector<Chunk> work = chunks(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "hyper_l2_penalty_cpu", [&] {
    using acc = at::opmath_type<scalar_t>;
    std::vector<acc> partial(work.size(), acc(0));
    at::parallel_for(0, int64_t(work.size()), grain(p, work), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) partial[i] = forward_rows<scalar_t>(p, work[i]);
    });
    acc total = 0;
    for (const acc v : partial) total += v;  // chunk order: independent of the thread count
    *out.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(total);
  });
  return out;
}

template <typename T>
void backward_rows(const Problem& p, const Chunk& ch, at::opmath_type<T> g, const Tensor& dW, const Tensor& dD,
                   const Tensor& dA, const Tensor& db_out, const Tensor& ddb_out) {
  using acc = at::opmath_type<T>;
  const Layer& y = p.layers[ch.layer];
  const LayerStats<T> st = layer_stats<T>(p, y);
  const int64_t m = p.m, G = p.G, E = p.E, K = p.K;
  const T *W = y.w.const_data_ptr<T>(), *D = y.d.const_data_ptr<T>(), *A = y.a.const_data_ptr<T>();
  T *gW = dW.mutable_data_ptr<T>(), *gD = dD.mutable_data_ptr<T>(), *gA = dA.mutable_data_ptr<T>();
  std::vector<acc> dA2(y.has_bias ? m : 0);  // a bias row's embedding gradient, summed over members
  for (int64_t o = ch.o0; o < ch.o1; ++o) {
    acc dots[3];
    const T *w = W + o * y.fan, *d = D + o * y.fan;
    row_dots(w, d, y.fan, dots);
    const T* a1 = A + o * m;
    const acc a = dot_m<acc>(a1, st.c, m), q = quad_m<acc>(a1, st.M, m);
    row_grads(w, d, gW + o * y.fan, gD + o * y.fan, y.fan, acc(2) * g * st.mu, acc(2) * g * a, acc(2) * g * q);
    // dA1_o = g (2 (W_o . D_o) c + ||D_o||^2 (M + M^T) A1_o^T)
    for (int64_t j = 0; j < m; ++j) {
      acc sym = 0;
      for (int64_t k = 0; k < m; ++k) sym += (acc(st.M[j * m + k]) + acc(st.M[k * m + j])) * acc(a1[k]);
      gA[o * m + j] = static_cast<T>(g * (acc(2) * dots[1] * acc(st.c[j]) + dots[2] * sym));
    }
    if (!y.has_bias) continue;
    const T *b = y.b.const_data_ptr<T>(), *db = y.db.const_data_ptr<T>(), *a2 = A + (y.out + o) * m;
    T *gb = db_out.mutable_data_ptr<T>(), *gdb = ddb_out.mutable_data_ptr<T>();
    const acc s = g / acc(E);
    std::fill(dA2.begin(), dA2.end(), acc(0));
    for (int64_t k = 0; k < E; ++k) {
      const T *sk = st.member + k * G * K, *ck = sk + 1, *Mk = sk + 1 + m;
      const acc bk = acc(b[k * y.out + o]), dbk = acc(db[k * y.out + o]);
      const acc a2k = dot_m<acc>(a2, ck, m), q2k = quad_m<acc>(a2, Mk, m);
      gb[k * y.out + o] = static_cast<T>(acc(2) * s * (acc(sk[0]) * bk + a2k * dbk));
      gdb[k * y.out + o] = static_cast<T>(acc(2) * s * (a2k * bk + q2k * dbk));
      for (int64_t j = 0; j < m; ++j) {
        acc sym = 0;
        for (int64_t i = 0; i < m; ++i) sym += (acc(Mk[j * m + i]) + acc(Mk[i * m + j])) * acc(a2[i]);
        dA2[j] += acc(2) * bk * dbk * acc(ck[j]) + dbk * dbk * sym;
      }
    }
    for (int64_t j = 0; j < m; ++j) gA[(y.out + o) * m + j] = static_cast<T>(s * dA2[j]);
  }
}

PenaltyGrads hyper_l2_penalty_backward_cpu(const Tensor& grad, at::TensorList weights, at::TensorList deltas,
                                           at::TensorList embeddings, const OptTensorList& biases,
                                           const OptTensorList& delta_biases, const Tensor& stats,
                                           const Tensor& member_stats, at::IntArrayRef kernel_cols,
                                           at::IntArrayRef bias_cols) {
  const Problem p = penalty::make_problem("hyper_l2_penalty_backward", weights, deltas, embeddings, biases,
                                          delta_biases, stats, member_stats, kernel_cols, bias_cols);
  TORCH_CHECK(p.device.is_cpu(), "hyper_l2_penalty_backward: the CPU kernel got tensors on ", p.device);
  penalty::check_grad(grad, p);
  const size_t L = p.layers.size();
  std::vector<Tensor> dW(L), dD(L), dA(L), db(L), ddb(L);
  for (size_t l = 0; l < L; ++l) {
    const Layer& y = p.layers[l];
    dW[l] = Tensor(at::detail::empty_cpu(weights[l].sizes(), p.dtype));
    dD[l] = Tensor(at::detail::empty_cpu(weights[l].sizes(), p.dtype));
    dA[l] = Tensor(at::detail::empty_cpu(embeddings[l].sizes(), p.dtype));
    static const int64_t kEmpty[1] = {0};  // absent bias: an empty gradient
    const at::IntArrayRef bias_size = y.has_bias ? y.b.sizes() : at::IntArrayRef(kEmpty, 1);
    db[l] = Tensor(at::detail::empty_cpu(bias_size, p.dtype));
    ddb[l] = Tensor(at::detail::empty_cpu(bias_size, p.dtype));
  }
  const std::vector<Chunk> work = chunks(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "hyper_l2_penalty_backward_cpu", [&] {
    using acc = at::opmath_type<scalar_t>;
    const acc g = acc(*grad.const_data_ptr<scalar_t>());
    at::parallel_for(0, int64_t(work.size()), grain(p, work), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t l = work[i].layer;
        backward_rows<scalar_t>(p, work[i], g, dW[l], dD[l], dA[l], db[l], ddb[l]);
      }
    });
  });
  return {std::move(dW), std::move(dD), std::move(dA), std::move(db), std::move(ddb)};
}

}  // namespace

TORCH_LIBRARY_IMPL(hyperkern, CPU, m) {
  m.impl("hyper_l2_penalty", &hyper_l2_penalty_cpu);
  m.impl("hyper_l2_penalty_backward", &hyper_l2_penalty_backward_cpu);
}

}  // namespace hyperkern
