// hyperkern::hyper_l2_penalty: the L2 penalty of all hyper layers of a model in one op, with one
// backward op returning every layer's gradients (formulas: csrc/penalty.h; kernels:
// csrc/cpu/penalty.cpp, csrc/cuda/penalty.cu; fake kernels: hyperkern/ops/_cpp_penalty.py). This
// file defines the two schemas and their Autograd-key kernels, following csrc/autograd.cpp and
// csrc/composite.cpp:
//
//   forward   With no gradient to take, the kernel below autograd. With parameters that require grad,
//             an autograd Function whose backward calls hyper_l2_penalty_backward. When a statistic
//             requires grad (lam or hparams carry a graph: not the weight step, which samples them
//             with the distribution frozen), a differentiable ATen composition instead, so those
//             gradients come from ATen's autograd.
//   backward  A first-order backward runs the fused kernel; recorded (create_graph=True, or a direct
//             call with inputs that require grad), the same gradients as a differentiable composition,
//             so double backward works.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "autograd_util.h"
#include "penalty.h"

namespace hyperkern {
namespace {

using at::Tensor;
using penalty::OptTensorList;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using PenaltyGrads = std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                                std::vector<Tensor>>;
using PenaltyFn = Tensor(at::TensorList, at::TensorList, at::TensorList, const OptTensorList&, const OptTensorList&,
                         const Tensor&, const Tensor&, at::IntArrayRef, at::IntArrayRef);
using PenaltyBackwardFn = PenaltyGrads(const Tensor&, at::TensorList, at::TensorList, at::TensorList,
                                       const OptTensorList&, const OptTensorList&, const Tensor&, const Tensor&,
                                       at::IntArrayRef, at::IntArrayRef);

// The statistics: (G, K) over all rows, (E, G, K) per member, K = 1 + m + m^2 ([mean | c | M] per column).
struct Stats {
  const Tensor &all, &member;
};

bool any_requires_grad(at::TensorList ts) {
  for (const Tensor& t : ts) {
    if (t.defined() && t.requires_grad()) return true;
  }
  return false;
}
bool any_requires_grad(const OptTensorList& ts) {
  for (const std::optional<Tensor> t : ts) {
    if (present(t) && t->requires_grad()) return true;
  }
  return false;
}
bool any_requires_grad(const Stats& s) {
  return (s.all.defined() && s.all.requires_grad()) || (s.member.defined() && s.member.requires_grad());
}

// Checks of a composition's arguments the ATen ops would not make: the lists' lengths and the biases'
// pairing (select, narrow and mm raise for the rest, columns out of range included). No sizes are read
// here: under torch.compile the composition runs on tensors of symbolic shape.
void check_composite(const char* op, at::TensorList weights, at::TensorList deltas, at::TensorList embeddings,
                     const OptTensorList& biases, const OptTensorList& delta_biases, at::IntArrayRef kernel_cols,
                     at::IntArrayRef bias_cols) {
  const size_t L = weights.size();
  TORCH_CHECK(L >= 1, op, ": weights must list at least one layer");
  TORCH_CHECK(deltas.size() == L && embeddings.size() == L && biases.size() == L && delta_biases.size() == L &&
                  kernel_cols.size() == L && bias_cols.size() == L,
              op, ": weights, deltas, embeddings, biases, delta_biases, kernel_cols and bias_cols must have one entry "
              "per layer");
  for (size_t l = 0; l < L; ++l) {
    TORCH_CHECK(present(biases.get(l)) == present(delta_biases.get(l)), op, ": biases[", l, "] and delta_biases[", l,
                "] must be both given or both None");
  }
  TORCH_CHECK(embeddings[0].dim() == 2, op, ": embeddings[0] must be 2-D, got ", embeddings[0].dim(), "-D");
}

// Rows (out, fan_in) of a weight of any rank.
Tensor as_rows(const Tensor& w) { return w.dim() == 1 ? w.unsqueeze(1) : w.flatten(1); }

// ---- the differentiable compositions ---------------------------------------------------------------

// The pieces of one statistics column (K = 1 + m + m^2 along the last dimension): mean, c, M.
struct Column {
  Tensor mean, c, M;
};
Column column(const Tensor& s, const c10::SymInt& m) {
  const int64_t last = s.dim() - 1;
  std::vector<c10::SymInt> shape(s.sym_sizes().begin(), s.sym_sizes().end());
  shape.back() = m;
  shape.push_back(m);
  return {s.select(last, 0), s.narrow_symint(last, 1, m), s.narrow_symint(last, m + 1, m * m).reshape_symint(shape)};
}

// The penalty as ATen ops (hyperkern.ops.penalty's torch composition, in C++).
Tensor penalty_composite(at::TensorList weights, at::TensorList deltas, at::TensorList embeddings,
                         const OptTensorList& biases, const OptTensorList& delta_biases, const Stats& s,
                         at::IntArrayRef kernel_cols, at::IntArrayRef bias_cols) {
  check_composite("hyper_l2_penalty", weights, deltas, embeddings, biases, delta_biases, kernel_cols, bias_cols);
  const c10::SymInt m = embeddings[0].sym_size(1);
  Tensor total;
  for (size_t l = 0; l < weights.size(); ++l) {
    const Tensor W = as_rows(weights[l]), D = as_rows(deltas[l]);
    const c10::SymInt out = W.sym_size(0);
    const Column k = column(s.all.select(0, kernel_cols[l]), m);
    const Tensor A1 = embeddings[l].narrow_symint(0, 0, out);
    const Tensor a = at::mv(A1, k.c), q = (at::mm(A1, k.M) * A1).sum(1);
    Tensor P = k.mean * W.square().sum() + 2.0 * ((W * D).sum(1) * a).sum() + (D.square().sum(1) * q).sum();
    const std::optional<Tensor> bias = biases.get(l), delta_bias = delta_biases.get(l);
    if (present(bias)) {
      const Tensor &b = *bias, &db = *delta_bias;
      const Column h = column(s.member.select(1, bias_cols[l]), m);  // (E,), (E, m), (E, m, m)
      const Tensor A2 = embeddings[l].narrow_symint(0, out, out);
      const Tensor a2 = at::mm(h.c, A2.t());                 // (E, out)
      const Tensor q2 = (at::matmul(A2, h.M) * A2).sum(-1);  // (E, out)
      const Tensor per_member = h.mean * b.square().sum(1) + 2.0 * (b * db * a2).sum(1) + (db.square() * q2).sum(1);
      P = P + per_member.mean();
    }
    total = total.defined() ? total + P : P;
  }
  return total;
}

// The backward's gradients as ATen ops (differentiable in every input, grad included).
PenaltyGrads penalty_backward_composite(const Tensor& grad, at::TensorList weights, at::TensorList deltas,
                                        at::TensorList embeddings, const OptTensorList& biases,
                                        const OptTensorList& delta_biases, const Stats& s,
                                        at::IntArrayRef kernel_cols, at::IntArrayRef bias_cols) {
  check_composite("hyper_l2_penalty_backward", weights, deltas, embeddings, biases, delta_biases, kernel_cols,
                  bias_cols);
  const size_t L = weights.size();
  const c10::SymInt m = embeddings[0].sym_size(1);
  std::vector<Tensor> dW(L), dD(L), dA(L), db(L), ddb(L);
  const Tensor g = grad.reshape({});
  for (size_t l = 0; l < L; ++l) {
    const Tensor W = as_rows(weights[l]), D = as_rows(deltas[l]);
    const c10::SymInt out = W.sym_size(0);
    const Column k = column(s.all.select(0, kernel_cols[l]), m);
    const Tensor A1 = embeddings[l].narrow_symint(0, 0, out);
    const Tensor a = at::mv(A1, k.c).unsqueeze(1), q = (at::mm(A1, k.M) * A1).sum(1, true);  // (out, 1)
    dW[l] = (2.0 * g * (k.mean * W + a * D)).reshape_symint(weights[l].sym_sizes());
    dD[l] = (2.0 * g * (a * W + q * D)).reshape_symint(weights[l].sym_sizes());
    dA[l] = g * (2.0 * (W * D).sum(1, true) * k.c.unsqueeze(0) + D.square().sum(1, true) * at::mm(A1, k.M + k.M.t()));
    const std::optional<Tensor> bias = biases.get(l), delta_bias = delta_biases.get(l);
    if (!present(bias)) {
      db[l] = W.new_empty({0});
      ddb[l] = W.new_empty({0});
      continue;
    }
    const Tensor &b = *bias, &d = *delta_bias;
    const Column h = column(s.member.select(1, bias_cols[l]), m);  // (E,), (E, m), (E, m, m)
    const Tensor A2 = embeddings[l].narrow_symint(0, out, out);
    const Tensor a2 = at::mm(h.c, A2.t()), q2 = (at::matmul(A2, h.M) * A2).sum(-1);  // (E, out)
    const Tensor g_e = g / c10::Scalar(s.member.sym_size(0));  // grad / E: the mean over members
    db[l] = 2.0 * g_e * (h.mean.unsqueeze(1) * b + a2 * d);
    ddb[l] = 2.0 * g_e * (a2 * b + q2 * d);
    const Tensor dA2 = g_e * (2.0 * at::mm((b * d).t(), h.c) +
                              (d.square().unsqueeze(-1) * at::matmul(A2, h.M + h.M.transpose(1, 2))).sum(0));
    dA[l] = at::cat({dA[l], dA2}, 0);
  }
  return {std::move(dW), std::move(dD), std::move(dA), std::move(db), std::move(ddb)};
}

// ---- autograd ------------------------------------------------------------------------------------

// The layers' parameters as one list for the autograd Function: weights, deltas, embeddings, then the
// biases and delta biases of the layers that have them.
std::vector<Tensor> flatten(at::TensorList weights, at::TensorList deltas, at::TensorList embeddings,
                            const OptTensorList& biases, const OptTensorList& delta_biases,
                            std::vector<int64_t>& has_bias) {
  std::vector<Tensor> flat;
  flat.reserve(5 * weights.size());
  flat.insert(flat.end(), weights.begin(), weights.end());
  flat.insert(flat.end(), deltas.begin(), deltas.end());
  flat.insert(flat.end(), embeddings.begin(), embeddings.end());
  has_bias.assign(weights.size(), 0);
  for (size_t l = 0; l < weights.size(); ++l) {
    const std::optional<Tensor> b = biases.get(l);
    if (present(b)) {
      has_bias[l] = 1;
      flat.push_back(*b);
    }
  }
  for (size_t l = 0; l < weights.size(); ++l) {
    if (has_bias[l]) flat.push_back(*delta_biases.get(l));
  }
  return flat;
}

struct Unflat {
  std::vector<Tensor> weights, deltas, embeddings;
  OptTensorList biases, delta_biases;
};

Unflat unflatten(const variable_list& flat, const std::vector<int64_t>& has_bias) {
  const size_t L = has_bias.size();
  Unflat u;
  u.weights.assign(flat.begin(), flat.begin() + L);
  u.deltas.assign(flat.begin() + L, flat.begin() + 2 * L);
  u.embeddings.assign(flat.begin() + 2 * L, flat.begin() + 3 * L);
  size_t nb = 0;
  for (const int64_t hb : has_bias) nb += hb ? 1 : 0;
  size_t i = 3 * L;
  for (size_t l = 0; l < L; ++l) u.biases.push_back(has_bias[l] ? std::optional<Tensor>(flat[i++]) : std::nullopt);
  for (size_t l = 0; l < L; ++l)
    u.delta_biases.push_back(has_bias[l] ? std::optional<Tensor>(flat[i++]) : std::nullopt);
  TORCH_INTERNAL_ASSERT(i == 3 * L + 2 * nb);
  return u;
}

class HyperL2Penalty : public torch::autograd::Function<HyperL2Penalty> {
 public:
  static Tensor forward(AutogradContext* ctx, at::TensorList params, const Tensor& stats, const Tensor& member_stats,
                        const std::vector<int64_t>& kernel_cols, const std::vector<int64_t>& bias_cols,
                        const std::vector<int64_t>& has_bias) {
    static const auto op = find_op<PenaltyFn>("hyperkern::hyper_l2_penalty");
    at::AutoDispatchBelowADInplaceOrView guard;
    const Unflat u = unflatten(params.vec(), has_bias);
    variable_list saved = params.vec();
    saved.insert(saved.end(), {stats, member_stats});
    ctx->save_for_backward(saved);
    ctx->saved_data["kernel_cols"] = kernel_cols;
    ctx->saved_data["bias_cols"] = bias_cols;
    ctx->saved_data["has_bias"] = has_bias;
    return op.call(u.weights, u.deltas, u.embeddings, u.biases, u.delta_biases, stats, member_stats, kernel_cols,
                   bias_cols);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<PenaltyBackwardFn>("hyperkern::hyper_l2_penalty_backward");
    const std::vector<int64_t> has_bias = ctx->saved_data["has_bias"].toIntVector();
    const std::vector<int64_t> kernel_cols = ctx->saved_data["kernel_cols"].toIntVector();
    const std::vector<int64_t> bias_cols = ctx->saved_data["bias_cols"].toIntVector();
    variable_list saved = ctx->get_saved_variables();
    const size_t num_params = saved.size() - 2;
    variable_list out(num_params + 2 + 3);  // one per forward argument: the parameters, 2 statistics, 3 lists
    if (!grads[0].defined()) return out;
    const variable_list params(saved.begin(), saved.begin() + num_params);
    const Tensor* st = saved.data() + num_params;
    const Unflat u = unflatten(params, has_bias);
    auto [dW, dD, dA, db, ddb] = op.call(grads[0], u.weights, u.deltas, u.embeddings, u.biases, u.delta_biases, st[0],
                                         st[1], kernel_cols, bias_cols);
    const size_t L = has_bias.size();
    size_t i = 0;
    for (const auto* part : {&dW, &dD, &dA}) {
      for (size_t l = 0; l < L; ++l) out[i++] = (*part)[l];
    }
    for (const auto* part : {&db, &ddb}) {
      for (size_t l = 0; l < L; ++l) {
        if (has_bias[l]) out[i++] = (*part)[l];
      }
    }
    return out;
  }
};

Tensor hyper_l2_penalty_autograd(at::TensorList weights, at::TensorList deltas, at::TensorList embeddings,
                                 const OptTensorList& biases, const OptTensorList& delta_biases, const Tensor& stats,
                                 const Tensor& member_stats, at::IntArrayRef kernel_cols, at::IntArrayRef bias_cols) {
  const Stats s{stats, member_stats};
  const bool grad_mode = at::GradMode::is_enabled();
  if (grad_mode && any_requires_grad(s)) {
    return penalty_composite(weights, deltas, embeddings, biases, delta_biases, s, kernel_cols, bias_cols);
  }
  if (!grad_mode || !(any_requires_grad(weights) || any_requires_grad(deltas) || any_requires_grad(embeddings) ||
                      any_requires_grad(biases) || any_requires_grad(delta_biases))) {
    static const auto op = find_op<PenaltyFn>("hyperkern::hyper_l2_penalty");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(weights, deltas, embeddings, biases, delta_biases, stats, member_stats, kernel_cols, bias_cols);
  }
  TORCH_CHECK(weights.size() == deltas.size() && weights.size() == embeddings.size() &&
                  weights.size() == biases.size() && weights.size() == delta_biases.size(),
              "hyper_l2_penalty: weights, deltas, embeddings, biases and delta_biases must have one entry per layer");
  for (size_t l = 0; l < weights.size(); ++l) {
    TORCH_CHECK(present(biases.get(l)) == present(delta_biases.get(l)), "hyper_l2_penalty: biases[", l,
                "] and delta_biases[", l, "] must be both given or both None");
  }
  std::vector<int64_t> has_bias;
  const std::vector<Tensor> flat = flatten(weights, deltas, embeddings, biases, delta_biases, has_bias);
  return HyperL2Penalty::apply(at::TensorList(flat), stats, member_stats, kernel_cols.vec(), bias_cols.vec(),
                               has_bias);
}

PenaltyGrads hyper_l2_penalty_backward_autograd(const Tensor& grad, at::TensorList weights, at::TensorList deltas,
                                                at::TensorList embeddings, const OptTensorList& biases,
                                                const OptTensorList& delta_biases, const Tensor& stats,
                                                const Tensor& member_stats, at::IntArrayRef kernel_cols,
                                                at::IntArrayRef bias_cols) {
  const Stats s{stats, member_stats};
  const bool recorded = at::GradMode::is_enabled() &&
                        (grad.requires_grad() || any_requires_grad(weights) || any_requires_grad(deltas) ||
                         any_requires_grad(embeddings) || any_requires_grad(biases) ||
                         any_requires_grad(delta_biases) || any_requires_grad(s));
  if (!recorded) {
    static const auto op = find_op<PenaltyBackwardFn>("hyperkern::hyper_l2_penalty_backward");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(grad, weights, deltas, embeddings, biases, delta_biases, stats, member_stats, kernel_cols,
                   bias_cols);
  }
  return penalty_backward_composite(grad, weights, deltas, embeddings, biases, delta_biases, s, kernel_cols,
                                    bias_cols);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hyperkern, m) {
  // The L2 penalty of every hyper layer of a model (csrc/penalty.h has the formulas): the sum over
  // layers l of mean_i lam_i ||W_l + Delta_l e1_i||^2 plus the bias terms, from the rows' statistics
  // (hyperkern.ops.penalty_stats): stats (G, K) and member_stats (E, G, K), K = 1 + m + m^2.
  // weights[l], deltas[l]: (out, ...) any rank; embeddings[l]: (out, m), or (2*out, m) when biases[l] and
  // delta_biases[l] ((E, out)) are given; kernel_cols[l], bias_cols[l]: the statistics' columns of that
  // layer's strengths. Returns a 0-d tensor.
  m.def("hyper_l2_penalty(Tensor[] weights, Tensor[] deltas, Tensor[] embeddings, Tensor?[] biases, "
        "Tensor?[] delta_biases, Tensor stats, Tensor member_stats, int[] kernel_cols, int[] bias_cols) -> Tensor");
  // Every layer's gradients, scaled by grad_penalty (0-d): (weights, deltas, embeddings, biases, delta_biases), an
  // empty tensor in the bias lists for a layer without a bias. None for the statistics (their gradients,
  // when wanted, come from the forward's composition).
  m.def("hyper_l2_penalty_backward(Tensor grad_penalty, Tensor[] weights, Tensor[] deltas, Tensor[] embeddings, "
        "Tensor?[] biases, Tensor?[] delta_biases, Tensor stats, Tensor member_stats, int[] kernel_cols, "
        "int[] bias_cols) -> (Tensor[], Tensor[], Tensor[], Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(hyperkern, Autograd, m) {
  m.impl("hyper_l2_penalty", &hyper_l2_penalty_autograd);
  m.impl("hyper_l2_penalty_backward", &hyper_l2_penalty_backward_autograd);
}

}  // namespace hyperkern
