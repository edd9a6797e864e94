// hyperkern::hyper_l2_penalty: the L2 penalty of every hyper layer of a model in one op (schemas and
// autograd in csrc/penalty.cpp, kernels in csrc/cpu/penalty.cpp and csrc/cuda/penalty.cu).
//
// Per layer l, with W, D its weight and delta as (out, fan_in) rows, A1 = embedding rows [0, out),
// A2 = rows [out, 2*out) (present with a bias), g = kernel_cols[l], h = bias_cols[l], and the rows'
// statistics of hyperkern.ops.penalty_stats, K = 1 + m + m^2 values per strength column,
// [mean | c (m) | M (m x m, row-major)]: stats (G, K) over all rows, member_stats (E, G, K) over each
// member's rows. mu, c, M below are stats[g]'s pieces; mu_k, c_k, M_k those of member_stats[k, h]:
//
//   a_o = A1_o . c,   q_o = A1_o M A1_o^T,   a2_ko = A2_o . c_k,   q2_ko = A2_o M_k A2_o^T
//   P_l = mu ||W||^2 + 2 sum_o (W_o . D_o) a_o + sum_o ||D_o||^2 q_o
//       + 1/E sum_k [ mu_k ||b_k||^2 + 2 sum_o b_ko db_ko a2_ko + sum_o db_ko^2 q2_ko ]
//
// and the op returns sum_l P_l. Its gradients, per row o (each row's are independent of the others'):
//   dW_o  = 2 (mu W_o + a_o D_o),       dD_o = 2 (a_o W_o + q_o D_o)
//   dA1_o = 2 (W_o . D_o) c + ||D_o||^2 (M + M^T) A1_o^T
//   db_ko = 2/E (mu_k b_ko + a2_ko db_ko),   ddb_ko = 2/E (a2_ko b_ko + q2_ko db_ko)
//   dA2_o = 1/E sum_k [ 2 b_ko db_ko c_k + db_ko^2 (M_k + M_k^T) A2_o^T ]
// (times the incoming gradient).
//
// This header turns the op's arguments into a Problem both kernels walk: it checks what would
// otherwise be memory-unsafe (hyperkern.ops.hyper_l2_penalty validated the rest, with messages that
// name the argument), and calls no dispatched ATen op for contiguous inputs.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace hyperkern {
namespace penalty {

using at::Tensor;
using OptTensorList = c10::List<std::optional<Tensor>>;

struct Layer {
  Tensor w, d, a, b, db;  // contiguous; b, db undefined without a bias
  int64_t out = 0, fan = 0, kcol = 0, bcol = 0;
  bool has_bias = false;
};

struct Problem {
  std::vector<Layer> layers;
  Tensor stats, member_stats;  // contiguous, (G, K) and (E, G, K)
  int64_t G = 0, m = 0, E = 0, K = 0;
  int64_t rows = 0;  // sum of the layers' out
  at::ScalarType dtype;
  at::Device device{at::kCPU};
};

inline bool present(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

inline Problem make_problem(const char* op, at::TensorList weights, at::TensorList deltas, at::TensorList embeddings,
                            const OptTensorList& biases, const OptTensorList& delta_biases, const Tensor& stats,
                            const Tensor& member_stats, at::IntArrayRef kernel_cols, at::IntArrayRef bias_cols) {
  const size_t L = weights.size();
  TORCH_CHECK(L >= 1, op, ": weights must list at least one layer");
  TORCH_CHECK(deltas.size() == L && embeddings.size() == L && biases.size() == L && delta_biases.size() == L &&
                  kernel_cols.size() == L && bias_cols.size() == L,
              op, ": weights, deltas, embeddings, biases, delta_biases, kernel_cols and bias_cols must have one entry "
              "per layer; got ", L, ", ", deltas.size(), ", ", embeddings.size(), ", ", biases.size(), ", ",
              delta_biases.size(), ", ", kernel_cols.size(), " and ", bias_cols.size());
  Problem p;
  p.dtype = weights[0].scalar_type();
  p.device = weights[0].device();
  // name[index] (or name when index < 0) shares weights[0]'s dtype and device
  auto same = [&](const Tensor& t, const char* name, int64_t index = -1) {
    const std::string what = index < 0 ? std::string(name) : std::string(name) + "[" + std::to_string(index) + "]";
    TORCH_CHECK(t.defined(), op, ": ", what, " is undefined");
    TORCH_CHECK(t.scalar_type() == p.dtype && t.device() == p.device, op, ": ", what, " must have weights[0]'s dtype ",
                p.dtype, " and device ", p.device, ", got ", t.scalar_type(), " on ", t.device());
  };
  same(stats, "stats");
  same(member_stats, "member_stats");
  same(embeddings[0], "embeddings", 0);
  TORCH_CHECK(embeddings[0].dim() == 2, op, ": embeddings[0] must be 2-D, got ", embeddings[0].sizes());
  p.m = embeddings[0].size(1);
  p.K = 1 + p.m + p.m * p.m;
  TORCH_CHECK(stats.dim() == 2 && stats.size(1) == p.K && member_stats.dim() == 3 &&
                  member_stats.size(1) == stats.size(0) && member_stats.size(2) == p.K,
              op, ": stats must be (G, K) and member_stats (E, G, K) with K = 1 + m + m^2 = ", p.K, " for m = ", p.m,
              " (the embeddings' width), got ", stats.sizes(), " and ", member_stats.sizes());
  p.G = stats.size(0);
  p.E = member_stats.size(0);
  const int64_t G = p.G, m = p.m, E = p.E;
  p.stats = stats.contiguous();
  p.member_stats = member_stats.contiguous();
  p.layers.resize(L);
  for (size_t l = 0; l < L; ++l) {
    Layer& y = p.layers[l];
    same(weights[l], "weights", l);
    same(deltas[l], "deltas", l);
    same(embeddings[l], "embeddings", l);
    TORCH_CHECK(weights[l].dim() >= 1 && deltas[l].sizes() == weights[l].sizes(), op, ": deltas[", l,
                "] must have weights[", l, "]'s shape ", weights[l].sizes(), ", got ", deltas[l].sizes());
    y.out = weights[l].size(0);
    y.fan = y.out > 0 ? weights[l].numel() / y.out : 0;
    y.has_bias = present(biases[l]);
    TORCH_CHECK(y.has_bias == present(delta_biases[l]), op, ": biases[", l, "] and delta_biases[", l,
                "] must be both given or both None");
    const Tensor& a = embeddings[l];
    TORCH_CHECK(a.dim() == 2 && a.size(0) == (y.has_bias ? 2 : 1) * y.out && a.size(1) == m, op, ": embeddings[", l,
                "] must be (", (y.has_bias ? 2 : 1) * y.out, ", ", m, ") (out rows, twice that with a bias; m = "
                "embeddings[0].size(1)), got ", a.sizes());
    y.kcol = kernel_cols[l];
    TORCH_CHECK(y.kcol >= 0 && y.kcol < G, op, ": kernel_cols[", l, "] = ", y.kcol, " is not a column of the ", G,
                " statistics");
    y.w = weights[l].contiguous();
    y.d = deltas[l].contiguous();
    y.a = a.contiguous();
    if (y.has_bias) {
      const Tensor& b = *biases[l];
      const Tensor& db = *delta_biases[l];
      same(b, "biases", l);
      same(db, "delta_biases", l);
      TORCH_CHECK(b.sizes() == at::IntArrayRef({E, y.out}) && db.sizes() == b.sizes(), op, ": biases[", l,
                  "] and delta_biases[", l, "] must be (E, out) = (", E, ", ", y.out, "), got ", b.sizes(), " and ",
                  db.sizes());
      y.bcol = bias_cols[l];
      TORCH_CHECK(y.bcol >= 0 && y.bcol < G, op, ": bias_cols[", l, "] = ", y.bcol, " is not a column of the ", G,
                  " statistics");
      y.b = b.contiguous();
      y.db = db.contiguous();
    }
    p.rows += y.out;
  }
  return p;
}

// The backward ops' incoming gradient: one element, in the weights' dtype, on their device.
inline void check_grad(const Tensor& grad, const Problem& p) {
  TORCH_CHECK(grad.numel() == 1 && grad.scalar_type() == p.dtype && grad.device() == p.device,
              "hyper_l2_penalty_backward: grad must be a one-element tensor of the weights' dtype and device, got ",
              grad.sizes(), " ", grad.scalar_type(), " on ", grad.device());
}

// The per-row pieces (acc: the accumulation type): a . c and a M a^T for a row a[0..m), c (m,), M (m, m).
template <typename acc, typename T>
inline acc dot_m(const T* a, const T* c, int64_t m) {
  acc s = 0;
  for (int64_t j = 0; j < m; ++j) s += acc(a[j]) * acc(c[j]);
  return s;
}
template <typename acc, typename T>
inline acc quad_m(const T* a, const T* M, int64_t m) {
  acc s = 0;
  for (int64_t j = 0; j < m; ++j) {
    acc t = 0;
    for (int64_t k = 0; k < m; ++k) t += acc(M[j * m + k]) * acc(a[k]);
    s += acc(a[j]) * t;
  }
  return s;
}

}  // namespace penalty
}  // namespace hyperkern
