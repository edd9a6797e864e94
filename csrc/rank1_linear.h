// Shared by csrc/cpu/rank1_linear.cpp and csrc/cuda/rank1_linear.cu: the memory-safety checks of
// the rank-1 linear ops. hyperkern.ops validates every argument with readable errors before a
// kernel runs; these TORCH_CHECKs only stop a direct torch.ops.hyperkern call with inconsistent
// shapes from reading or writing out of bounds.
//
// Layout: x is (E*B, in), member-major (rows k*B .. (k+1)*B-1 belong to member k); weight and
// delta are (out, in); r, u are (E, in); s, v, bias, delta_bias are (E, out); e1, e2, delta_out and
// the output are (E*B, out).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace hyperkern {
namespace rank1_linear {

struct Dims {
  int64_t E, B, N, in, out;
};

inline void check_same_kind(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "hyperkern rank-1 linear: ", name, " has dtype ",
              t.scalar_type(), " but x has dtype ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "hyperkern rank-1 linear: ", name, " is on ", t.device(),
              " but x is on ", ref.device());
}

inline void check_shape(const at::Tensor& t, int64_t rows, int64_t cols, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "hyperkern rank-1 linear: ", name,
              " must have shape (", rows, ", ", cols, "), got ", t.sizes());
}

// Checks the inputs shared by both ops and returns the problem's dimensions.
inline Dims check_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& r, const at::Tensor& s) {
  TORCH_CHECK(x.dim() == 2, "hyperkern rank-1 linear: x must be 2-D (E*B, in), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2, "hyperkern rank-1 linear: weight must be 2-D (out, in), got ", weight.sizes());
  TORCH_CHECK(r.dim() == 2 && r.size(0) >= 1, "hyperkern rank-1 linear: r must be (E, in) with E >= 1, got ",
              r.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "hyperkern rank-1 linear: x must be floating point, got ",
              x.scalar_type());
  Dims d;
  d.E = r.size(0);
  d.N = x.size(0);
  d.in = x.size(1);
  d.out = weight.size(0);
  TORCH_CHECK(d.N % d.E == 0, "hyperkern rank-1 linear: x.size(0) = ", d.N,
              " must be divisible by the ensemble size E = r.size(0) = ", d.E);
  d.B = d.N / d.E;
  check_shape(weight, d.out, d.in, "weight");
  check_shape(r, d.E, d.in, "r");
  check_shape(s, d.E, d.out, "s");
  check_same_kind(x, weight, "weight");
  check_same_kind(x, r, "r");
  check_same_kind(x, s, "s");
  return d;
}

inline void check_optional(const std::optional<at::Tensor>& t, const at::Tensor& x, int64_t rows, int64_t cols,
                           const char* name) {
  if (t.has_value() && t->defined()) {
    check_shape(*t, rows, cols, name);
    check_same_kind(x, *t, name);
  }
}

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The Delta-branch weights both hyper ops take: delta (out, in), u (E, in), v (E, out).
inline void check_delta_branch(const Dims& d, const at::Tensor& x, const at::Tensor& delta, const at::Tensor& u,
                               const at::Tensor& v) {
  check_shape(delta, d.out, d.in, "delta");
  check_shape(u, d.E, d.in, "u");
  check_shape(v, d.E, d.out, "v");
  check_same_kind(x, delta, "delta");
  check_same_kind(x, u, "u");
  check_same_kind(x, v, "v");
}

inline void check_hyper(const Dims& d, const at::Tensor& x, const at::Tensor& delta, const at::Tensor& u,
                        const at::Tensor& v, const at::Tensor& e1, const std::optional<at::Tensor>& delta_bias,
                        const std::optional<at::Tensor>& e2) {
  check_delta_branch(d, x, delta, u, v);
  check_shape(e1, d.N, d.out, "e1");
  check_same_kind(x, e1, "e1");
  check_optional(delta_bias, x, d.E, d.out, "delta_bias");
  check_optional(e2, x, d.N, d.out, "e2");
  TORCH_CHECK(present(delta_bias) == present(e2), "hyperkern rank-1 linear: delta_bias and e2 must be given together");
}

// The embedding op's inputs (hyper_batch_ensemble_linear_hp): delta, u, v as check_hyper; hparams
// (E*B, m), one row of normalised hyperparameters per input row; embedding (out, m), or (2*out, m)
// with delta_bias (rows out .. 2*out-1 give e2). Returns m.
inline int64_t check_hyper_embedding(const Dims& d, const at::Tensor& x, const at::Tensor& delta, const at::Tensor& u,
                                     const at::Tensor& v, const at::Tensor& hparams, const at::Tensor& embedding,
                                     const std::optional<at::Tensor>& delta_bias) {
  check_delta_branch(d, x, delta, u, v);
  TORCH_CHECK(hparams.dim() == 2 && hparams.size(0) == d.N, "hyperkern rank-1 linear: hparams must have shape (", d.N,
              ", num_hparams), one row per row of x, got ", hparams.sizes());
  const int64_t m = hparams.size(1);
  const bool has_db = present(delta_bias);
  check_shape(embedding, has_db ? 2 * d.out : d.out, m, has_db ? "embedding (2*out rows with delta_bias)" : "embedding");
  check_same_kind(x, hparams, "hparams");
  check_same_kind(x, embedding, "embedding");
  check_optional(delta_bias, x, d.E, d.out, "delta_bias");
  return m;
}

// A backward's per-row inputs: the output gradient and, for the hyper ops, the kept delta_out, both (E*B, out).
inline void check_backward_rows(const Dims& d, const at::Tensor& x, const at::Tensor& grad_out,
                                const at::Tensor* delta_out = nullptr) {
  check_shape(grad_out, d.N, d.out, "grad_out");
  check_same_kind(x, grad_out, "grad_out");
  if (delta_out != nullptr) {
    check_shape(*delta_out, d.N, d.out, "delta_out");
    check_same_kind(x, *delta_out, "delta_out");
  }
}

// The hp op's dimensions and its number of hyperparameters m.
struct HpDims : Dims {
  int64_t m;
};

// Every check of the hp op's forward (bias given, grad_out null) or backward (bias nullopt, grad_out and
// delta_out given), shared by the CPU and CUDA entry points.
inline HpDims check_hp(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& delta, const at::Tensor& r,
                       const at::Tensor& s, const at::Tensor& u, const at::Tensor& v, const at::Tensor& hparams,
                       const at::Tensor& embedding, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& delta_bias, const at::Tensor* grad_out = nullptr,
                       const at::Tensor* delta_out = nullptr) {
  HpDims h{check_linear(x, weight, r, s), 0};
  check_optional(bias, x, h.E, h.out, "bias");
  h.m = check_hyper_embedding(h, x, delta, u, v, hparams, embedding, delta_bias);
  if (grad_out != nullptr) check_backward_rows(h, x, *grad_out, delta_out);
  return h;
}

}  // namespace rank1_linear
}  // namespace hyperkern
