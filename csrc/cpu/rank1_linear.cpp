// CPU kernels of the rank-1 ensemble linear ops (BatchEnsemble and hyper-batch ensemble).
//
// Rows are member-major: x is (E*B, in) and rows k*B .. (k+1)*B-1 belong to member k.
//
//   batch_ensemble_linear:        y = ((x * r_k) @ W^T) * s_k + b_k
//   hyper_batch_ensemble_linear:  y = s_k * ((x * r_k) @ W^T) + (v_k * e1) * ((x * u_k) @ D^T)
//                                     + b_k + delta_bias_k * e2
//
// The per-member vectors are never expanded to per-row tensors. Every GEMM goes to at::mm / at::bmm
// (MKL or oneDNN, with their own threading); the rank-1 scalings are applied in one fused pass
// before the GEMM (the prologue: x * r_k into a scratch buffer) and one after it (the epilogue, in
// place on the GEMM output). Prologue/epilogue passes run under at::parallel_for, never around a
// GEMM, so MKL keeps all threads for the GEMMs.
//
// Backward of batch_ensemble_linear (g = grad of y, rows of member k: g_k, x_k):
//   dx_k = ((g_k * s_k) @ W) * r_k                              one GEMM, like a plain linear
//   G_k  = g_k^T x_k  (out x in)                                  E GEMMs with K = B: together one
//                                                                 plain dW GEMM
//   dW   = sum_k (s_k r_k^T) * G_k,  ds_k = rowsum(W * G_k * r_k^T),  dr_k = colsum(W * G_k * s_k)
//                                                                 one fused weight-sized pass
//   db_k = colsum(g_k)                                            fused into the pass over g
// so it saves only what a plain linear saves (x, weight, r, s) and runs the same GEMMs.
//
// The hyper op also saves delta_out = (x * u_k) @ D^T (it needs it per row: de1 = g * v_k * delta_out,
// dv_k = colsum(g * e1 * delta_out)); its Delta side then needs no weight-sized pass:
//   dx   = r_k * ((g * s_k) @ W) + u_k * ((g * v_k * e1) @ D)
//   dD   = (g * v_k * e1)^T (x * u_k)                            one GEMM over all rows
//   du_k = colsum(x * ((g * v_k * e1) @ D))                      fused into the dx epilogue
// and the W side is the BatchEnsemble one (G_k, weight pass).
//
// bfloat16 / float16: every elementwise pass computes in float; GEMM inputs are rounded to the
// storage dtype (MKL/oneDNN accumulate them in float); the weight-gradient reductions (G_k, dW,
// ds, dr) run entirely in float on float copies of g and x. float64 stays float64 throughout.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../rank1_linear.h"

namespace hyperkern {
namespace {

using at::Tensor;
using rank1_linear::Dims;
using rank1_linear::present;

// `#pragma omp simd` for loops inside AT_DISPATCH lambdas (a #pragma cannot appear in a macro argument).
#define HYPERKERN_SIMD _Pragma("omp simd")

// Elements of work per parallel chunk below which a pass stays on one thread.
constexpr int64_t kElementGrain = 1 << 14;

int64_t row_grain(int64_t width) { return std::max<int64_t>(1, kElementGrain / std::max<int64_t>(width, 1)); }

// Row scaling `out[i, :] = in[i, :] * scale[i / B, :]` (the GEMM prologue x * r_k).
template <typename scalar_t>
void scale_rows_by_member(const scalar_t* in, const scalar_t* scale, scalar_t* out, int64_t N, int64_t D,
                          int64_t B) {
  using opmath_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, N, row_grain(D), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const scalar_t* sc = scale + (i / B) * D;
      const scalar_t* a = in + i * D;
      scalar_t* o = out + i * D;
      HYPERKERN_SIMD
      for (int64_t j = 0; j < D; ++j) o[j] = static_cast<scalar_t>(opmath_t(a[j]) * opmath_t(sc[j]));
    }
  });
}

// Work split for passes that also reduce columns within each member (db_k = colsum(g_k), ...):
// tasks are (member, row chunk, column chunk); every task owns one slice of a partial-sum buffer
// laid out (E, row_chunks, D), so no two tasks write the same partial sum.
struct MemberTiling {
  int64_t E, B, D;
  int64_t rows_per_chunk, row_chunks, cols_per_chunk, col_chunks;

  MemberTiling(int64_t E_, int64_t B_, int64_t D_) : E(E_), B(B_), D(D_) {
    cols_per_chunk = D <= 512 ? std::max<int64_t>(D, 1) : 256;
    col_chunks = std::max<int64_t>(1, (D + cols_per_chunk - 1) / cols_per_chunk);
    const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
    row_chunks = 1;
    while (E * row_chunks * col_chunks < want && B / (2 * row_chunks) >= 32) row_chunks *= 2;
    rows_per_chunk = std::max<int64_t>(1, (B + row_chunks - 1) / row_chunks);
    row_chunks = std::max<int64_t>(1, (B + rows_per_chunk - 1) / rows_per_chunk);
  }
  int64_t tasks() const { return E * row_chunks * col_chunks; }

  struct Task {
    int64_t k, row_begin, row_end, col_begin, col_end, partial_offset;
  };
  Task task(int64_t t) const {
    const int64_t cc = t % col_chunks;
    const int64_t rc = (t / col_chunks) % row_chunks;
    const int64_t k = t / (col_chunks * row_chunks);
    Task out;
    out.k = k;
    out.row_begin = k * B + std::min(B, rc * rows_per_chunk);
    out.row_end = k * B + std::min(B, (rc + 1) * rows_per_chunk);
    out.col_begin = cc * cols_per_chunk;
    out.col_end = std::min(D, (cc + 1) * cols_per_chunk);
    out.partial_offset = (k * row_chunks + rc) * D;
    return out;
  }
  // Runs body(task) for every task in parallel.
  template <typename F>
  void run(const F& body) const {
    const int64_t work_per_task = std::max<int64_t>(1, rows_per_chunk * cols_per_chunk);
    at::parallel_for(0, tasks(), std::max<int64_t>(1, kElementGrain / work_per_task), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) body(task(t));
    });
  }
  // result[k, j] = sum over row chunks of partial[k, rc, j], cast to the result dtype.
  template <typename acc_t, typename out_t>
  void reduce(const std::vector<acc_t>& partial, out_t* result) const {
    for (int64_t k = 0; k < E; ++k) {
      for (int64_t j = 0; j < D; ++j) {
        acc_t total = 0;
        for (int64_t rc = 0; rc < row_chunks; ++rc) total += partial[(k * row_chunks + rc) * D + j];
        result[k * D + j] = static_cast<out_t>(total);
      }
    }
  }
  size_t partial_size() const { return static_cast<size_t>(E * row_chunks * D); }
};

// The weight-sized pass of the backward, all members at once (acc_t is float or double):
//   dW = sum_k (s_k r_k^T) * G_k,  ds_k[o] = sum_j W[o,j] G_k[o,j] r_k[j],  dr_k[j] = sum_o W[o,j] G_k[o,j] s_k[o]
// with G (E, out, in). Parallel over blocks of output rows; dr is summed per block then reduced.
template <typename acc_t>
void rank1_weight_grad_pass(const acc_t* G, const acc_t* W, const acc_t* r, const acc_t* s, acc_t* dW, acc_t* ds,
                            acc_t* dr, int64_t E, int64_t O, int64_t I) {
  const int64_t threads = at::get_num_threads();
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(O, O * I * E >= 4 * kElementGrain ? 2 * threads : 1));
  const int64_t rows_per_block = (O + blocks - 1) / blocks;
  std::vector<acc_t> dr_partial(static_cast<size_t>(blocks * E * I), acc_t(0));
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      acc_t* drp = dr_partial.data() + blk * E * I;
      const int64_t o_end = std::min(O, (blk + 1) * rows_per_block);
      for (int64_t o = blk * rows_per_block; o < o_end; ++o) {
        const acc_t* w = W + o * I;
        acc_t* dw = dW + o * I;
        for (int64_t k = 0; k < E; ++k) {
          const acc_t* g = G + (k * O + o) * I;
          const acc_t* rk = r + k * I;
          acc_t* drk = drp + k * I;
          const acc_t sk = s[k * O + o];
          acc_t row_sum = 0;
          if (k == 0) {
#pragma omp simd reduction(+ : row_sum)
            for (int64_t j = 0; j < I; ++j) {
              const acc_t gw = g[j] * w[j];
              dw[j] = sk * rk[j] * g[j];
              row_sum += gw * rk[j];
              drk[j] += gw * sk;
            }
          } else {
#pragma omp simd reduction(+ : row_sum)
            for (int64_t j = 0; j < I; ++j) {
              const acc_t gw = g[j] * w[j];
              dw[j] += sk * rk[j] * g[j];
              row_sum += gw * rk[j];
              drk[j] += gw * sk;
            }
          }
          ds[k * O + o] = row_sum;
        }
      }
    }
  });
  for (int64_t k = 0; k < E; ++k) {
    acc_t* out = dr + k * I;
    for (int64_t j = 0; j < I; ++j) out[j] = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const acc_t* p = dr_partial.data() + (blk * E + k) * I;
      for (int64_t j = 0; j < I; ++j) out[j] += p[j];
    }
  }
}

// G_k = g_k^T x_k for every member, then the weight pass. Returns (dW, ds, dr) in the input dtype.
// Reduced-precision inputs are widened to float first so nothing is rounded before the sums end.
std::tuple<Tensor, Tensor, Tensor> rank1_weight_grads(const Tensor& g, const Tensor& x, const Tensor& weight,
                                                     const Tensor& r, const Tensor& s, const Dims& d) {
  const auto dtype = x.scalar_type();
  const auto acc_dtype = at::toOpMathType(dtype);
  auto widen = [&](const Tensor& t) { return t.scalar_type() == acc_dtype ? t : t.to(acc_dtype); };
  const Tensor g_acc = widen(g), x_acc = widen(x), w_acc = widen(weight), r_acc = widen(r), s_acc = widen(s);
  const auto acc_opts = x.options().dtype(acc_dtype);
  Tensor G = at::empty({d.E, d.out, d.in}, acc_opts);
  if (d.B > 0) {
    at::bmm_out(G, g_acc.view({d.E, d.B, d.out}).transpose(1, 2), x_acc.view({d.E, d.B, d.in}));
  } else {
    G.zero_();
  }
  Tensor dW = at::empty({d.out, d.in}, acc_opts);
  Tensor ds = at::empty({d.E, d.out}, acc_opts);
  Tensor dr = at::empty({d.E, d.in}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "rank1_weight_grad_pass", [&] {
    rank1_weight_grad_pass<scalar_t>(G.const_data_ptr<scalar_t>(), w_acc.const_data_ptr<scalar_t>(),
                                     r_acc.const_data_ptr<scalar_t>(), s_acc.const_data_ptr<scalar_t>(),
                                     dW.data_ptr<scalar_t>(), ds.data_ptr<scalar_t>(), dr.data_ptr<scalar_t>(), d.E,
                                     d.out, d.in);
  });
  if (acc_dtype != dtype) return {dW.to(dtype), ds.to(dtype), dr.to(dtype)};
  return {dW, ds, dr};
}

Tensor contiguous_or_empty(const std::optional<Tensor>& t) {
  return present(t) ? t->contiguous() : Tensor();
}

// ------------------------------------------------------------------------------------------------
// batch_ensemble_linear

// Weight-scaling forward, used when B is large against the weight: per member W_k = W * (s_k r_k^T)
// (weight-sized work) and y_k = b_k + x_k @ W_k^T, with no per-row prologue or epilogue at all.
bool prefer_scaled_weight(const Dims& d) {
  // Row-side work is N * (in + out) elements, weight-side work E * in * out; per-member GEMMs lose a
  // little against one GEMM over all rows, so the weight side must win clearly.
  return d.B * (d.in + d.out) >= 4 * d.in * d.out;
}

Tensor batch_ensemble_linear_cpu(const Tensor& x_in, const Tensor& weight_in, const Tensor& r_in, const Tensor& s_in,
                                 const std::optional<Tensor>& bias_in) {
  const Dims d = rank1_linear::check_linear(x_in, weight_in, r_in, s_in);
  rank1_linear::check_optional(bias_in, x_in, d.E, d.out, "bias");
  const Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), r = r_in.contiguous(), s = s_in.contiguous();
  const Tensor bias = contiguous_or_empty(bias_in);
  const bool has_bias = bias.defined();
  Tensor y = at::empty({d.N, d.out}, x.options());
  if (d.N == 0) return y;
  if (d.in == 0) {  // empty contraction: y = 0 * s + b
    if (has_bias) {
      y.view({d.E, d.B, d.out}).copy_(bias.unsqueeze(1));
    } else {
      y.zero_();
    }
    return y;
  }

  if (prefer_scaled_weight(d)) {
    Tensor w_k = at::empty_like(weight);
    for (int64_t k = 0; k < d.E; ++k) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_ensemble_linear_scale_weight",
                                      [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const scalar_t* w = weight.const_data_ptr<scalar_t>();
        const scalar_t* rk = r.const_data_ptr<scalar_t>() + k * d.in;
        const scalar_t* sk = s.const_data_ptr<scalar_t>() + k * d.out;
        scalar_t* wk = w_k.data_ptr<scalar_t>();
        at::parallel_for(0, d.out, row_grain(d.in), [&](int64_t o0, int64_t o1) {
          for (int64_t o = o0; o < o1; ++o) {
            const opmath_t so = opmath_t(sk[o]);
            HYPERKERN_SIMD
            for (int64_t j = 0; j < d.in; ++j)
              wk[o * d.in + j] = static_cast<scalar_t>(opmath_t(w[o * d.in + j]) * so * opmath_t(rk[j]));
          }
        });
      });
      Tensor y_k = y.narrow(0, k * d.B, d.B);
      const Tensor x_k = x.narrow(0, k * d.B, d.B);
      if (has_bias) {
        at::addmm_out(y_k, bias[k], x_k, w_k.t());
      } else {
        at::mm_out(y_k, x_k, w_k.t());
      }
    }
    return y;
  }

  // Activation-scaling forward: x * r_k (prologue), one GEMM over all E*B rows, * s_k + b_k in place.
  Tensor x_scaled = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_ensemble_linear_prologue", [&] {
    scale_rows_by_member<scalar_t>(x.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(),
                                   x_scaled.data_ptr<scalar_t>(), d.N, d.in, d.B);
  });
  at::mm_out(y, x_scaled, weight.t());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_ensemble_linear_epilogue", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* bp = has_bias ? bias.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, d.N, row_grain(d.out), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t k = i / d.B;
        scalar_t* row = yp + i * d.out;
        const scalar_t* sk = sp + k * d.out;
        if (bp != nullptr) {
          const scalar_t* bk = bp + k * d.out;
          HYPERKERN_SIMD
          for (int64_t j = 0; j < d.out; ++j)
            row[j] = static_cast<scalar_t>(opmath_t(row[j]) * opmath_t(sk[j]) + opmath_t(bk[j]));
        } else {
          HYPERKERN_SIMD
          for (int64_t j = 0; j < d.out; ++j) row[j] = static_cast<scalar_t>(opmath_t(row[j]) * opmath_t(sk[j]));
        }
      }
    });
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> batch_ensemble_linear_backward_cpu(
    const Tensor& grad_in, const Tensor& x_in, const Tensor& weight_in, const Tensor& r_in, const Tensor& s_in,
    bool has_bias, bool compute_grad_x) {
  const Dims d = rank1_linear::check_linear(x_in, weight_in, r_in, s_in);
  rank1_linear::check_shape(grad_in, d.N, d.out, "grad_out");
  rank1_linear::check_same_kind(x_in, grad_in, "grad_out");
  const Tensor g = grad_in.contiguous(), x = x_in.contiguous(), weight = weight_in.contiguous();
  const Tensor r = r_in.contiguous(), s = s_in.contiguous();
  const auto opts = x.options();

  Tensor grad_bias = has_bias ? at::empty({d.E, d.out}, opts) : at::empty({0}, opts);
  Tensor g_scaled = compute_grad_x ? at::empty({d.N, d.out}, opts) : Tensor();

  // One pass over g: g * s_k (the dx GEMM's prologue) and db_k = colsum(g_k).
  if (has_bias || compute_grad_x) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_ensemble_linear_grad_pass", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const MemberTiling tiling(d.E, d.B, d.out);
      std::vector<opmath_t> db_partial(has_bias ? tiling.partial_size() : 0, opmath_t(0));
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      const scalar_t* sp = s.const_data_ptr<scalar_t>();
      scalar_t* gsp = compute_grad_x ? g_scaled.data_ptr<scalar_t>() : nullptr;
      tiling.run([&](const MemberTiling::Task& t) {
        const int64_t width = t.col_end - t.col_begin;
        const scalar_t* sk = sp + t.k * d.out + t.col_begin;
        opmath_t* db = has_bias ? db_partial.data() + t.partial_offset + t.col_begin : nullptr;
        for (int64_t i = t.row_begin; i < t.row_end; ++i) {
          const scalar_t* grow = gp + i * d.out + t.col_begin;
          if (gsp != nullptr) {
            scalar_t* out = gsp + i * d.out + t.col_begin;
            HYPERKERN_SIMD
            for (int64_t j = 0; j < width; ++j) out[j] = static_cast<scalar_t>(opmath_t(grow[j]) * opmath_t(sk[j]));
          }
          if (db != nullptr) {
            HYPERKERN_SIMD
            for (int64_t j = 0; j < width; ++j) db[j] += opmath_t(grow[j]);
          }
        }
      });
      if (has_bias) tiling.reduce(db_partial, grad_bias.data_ptr<scalar_t>());
    });
  }

  Tensor grad_x = at::empty({0}, opts);
  if (compute_grad_x) {
    grad_x = at::empty({d.N, d.in}, opts);
    if (d.out == 0) {
      grad_x.zero_();
    } else if (d.N > 0) {
      at::mm_out(grad_x, g_scaled, weight);
      g_scaled.reset();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_ensemble_linear_dx", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        scalar_t* dx = grad_x.data_ptr<scalar_t>();
        const scalar_t* rp = r.const_data_ptr<scalar_t>();
        at::parallel_for(0, d.N, row_grain(d.in), [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            const scalar_t* rk = rp + (i / d.B) * d.in;
            scalar_t* row = dx + i * d.in;
            HYPERKERN_SIMD
            for (int64_t j = 0; j < d.in; ++j) row[j] = static_cast<scalar_t>(opmath_t(row[j]) * opmath_t(rk[j]));
          }
        });
      });
    }
  }

  auto [grad_weight, grad_s, grad_r] = rank1_weight_grads(g, x, weight, r, s, d);
  return {grad_x, grad_weight, grad_r, grad_s, grad_bias};
}

// ------------------------------------------------------------------------------------------------
// hyper_batch_ensemble_linear

std::tuple<Tensor, Tensor> hyper_batch_ensemble_linear_cpu(
    const Tensor& x_in, const Tensor& weight_in, const Tensor& delta_in, const Tensor& r_in, const Tensor& s_in,
    const Tensor& u_in, const Tensor& v_in, const Tensor& e1_in, const std::optional<Tensor>& bias_in,
    const std::optional<Tensor>& delta_bias_in, const std::optional<Tensor>& e2_in) {
  const Dims d = rank1_linear::check_linear(x_in, weight_in, r_in, s_in);
  rank1_linear::check_optional(bias_in, x_in, d.E, d.out, "bias");
  rank1_linear::check_hyper(d, x_in, delta_in, u_in, v_in, e1_in, delta_bias_in, e2_in);
  const Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), delta = delta_in.contiguous();
  const Tensor r = r_in.contiguous(), s = s_in.contiguous(), u = u_in.contiguous(), v = v_in.contiguous();
  const Tensor e1 = e1_in.contiguous();
  const Tensor bias = contiguous_or_empty(bias_in), delta_bias = contiguous_or_empty(delta_bias_in);
  const Tensor e2 = contiguous_or_empty(e2_in);

  Tensor y = at::empty({d.N, d.out}, x.options());
  Tensor delta_out = at::empty({d.N, d.out}, x.options());
  if (d.N == 0) return {y, delta_out};
  if (d.in == 0) {
    y.zero_();
    delta_out.zero_();
  } else {
    // One scratch buffer for both prologues: x * u_k feeds the Delta GEMM, then x * r_k the W GEMM.
    Tensor x_scaled = at::empty_like(x);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hyper_linear_prologue_u", [&] {
      scale_rows_by_member<scalar_t>(x.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(),
                                     x_scaled.data_ptr<scalar_t>(), d.N, d.in, d.B);
    });
    at::mm_out(delta_out, x_scaled, delta.t());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hyper_linear_prologue_r", [&] {
      scale_rows_by_member<scalar_t>(x.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(),
                                     x_scaled.data_ptr<scalar_t>(), d.N, d.in, d.B);
    });
    at::mm_out(y, x_scaled, weight.t());
  }
  // Epilogue: y = y * s_k + v_k * e1 * delta_out + b_k + delta_bias_k * e2.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hyper_linear_epilogue", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* hp = delta_out.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const scalar_t* e1p = e1.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* dbp = delta_bias.defined() ? delta_bias.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* e2p = e2.defined() ? e2.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, d.N, row_grain(d.out), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t k = i / d.B, row = i * d.out, mem = k * d.out;
        HYPERKERN_SIMD
        for (int64_t j = 0; j < d.out; ++j)
          yp[row + j] = static_cast<scalar_t>(opmath_t(yp[row + j]) * opmath_t(sp[mem + j]) +
                                              opmath_t(vp[mem + j]) * opmath_t(e1p[row + j]) * opmath_t(hp[row + j]));
        if (bp != nullptr) {
          HYPERKERN_SIMD
          for (int64_t j = 0; j < d.out; ++j)
            yp[row + j] = static_cast<scalar_t>(opmath_t(yp[row + j]) + opmath_t(bp[mem + j]));
        }
        if (dbp != nullptr) {
          HYPERKERN_SIMD
          for (int64_t j = 0; j < d.out; ++j)
            yp[row + j] =
                static_cast<scalar_t>(opmath_t(yp[row + j]) + opmath_t(dbp[mem + j]) * opmath_t(e2p[row + j]));
        }
      }
    });
  });
  return {y, delta_out};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
hyper_batch_ensemble_linear_backward_cpu(const Tensor& grad_in, const Tensor& x_in, const Tensor& weight_in,
                                         const Tensor& delta_in, const Tensor& r_in, const Tensor& s_in,
                                         const Tensor& u_in, const Tensor& v_in, const Tensor& e1_in,
                                         const std::optional<Tensor>& delta_bias_in,
                                         const std::optional<Tensor>& e2_in, const Tensor& delta_out_in,
                                         bool has_bias, bool compute_grad_x) {
  const Dims d = rank1_linear::check_linear(x_in, weight_in, r_in, s_in);
  rank1_linear::check_hyper(d, x_in, delta_in, u_in, v_in, e1_in, delta_bias_in, e2_in);
  rank1_linear::check_shape(grad_in, d.N, d.out, "grad_out");
  rank1_linear::check_same_kind(x_in, grad_in, "grad_out");
  rank1_linear::check_shape(delta_out_in, d.N, d.out, "delta_out");
  rank1_linear::check_same_kind(x_in, delta_out_in, "delta_out");
  const Tensor g = grad_in.contiguous(), x = x_in.contiguous(), weight = weight_in.contiguous();
  const Tensor delta = delta_in.contiguous(), r = r_in.contiguous(), s = s_in.contiguous();
  const Tensor u = u_in.contiguous(), v = v_in.contiguous(), e1 = e1_in.contiguous();
  const Tensor delta_bias = contiguous_or_empty(delta_bias_in), e2 = contiguous_or_empty(e2_in);
  const Tensor h = delta_out_in.contiguous();
  const bool has_delta_bias = delta_bias.defined();
  const auto opts = x.options();

  Tensor grad_bias = has_bias ? at::empty({d.E, d.out}, opts) : at::empty({0}, opts);
  Tensor grad_delta_bias = has_delta_bias ? at::empty({d.E, d.out}, opts) : at::empty({0}, opts);
  Tensor grad_e2 = has_delta_bias ? at::empty({d.N, d.out}, opts) : at::empty({0}, opts);
  Tensor grad_e1 = at::empty({d.N, d.out}, opts);
  Tensor grad_v = at::empty({d.E, d.out}, opts);
  Tensor g_s = compute_grad_x ? at::empty({d.N, d.out}, opts) : Tensor();  // g * s_k
  Tensor g_ve = at::empty({d.N, d.out}, opts);                               // g * v_k * e1

  // Pass over g: the GEMM prologues g * s_k and g * v_k * e1, the per-row gradients
  // de1 = g * v_k * delta_out and de2 = g * delta_bias_k, and the member column sums
  // db_k = colsum(g), dv_k = colsum(g * e1 * delta_out), d(delta_bias)_k = colsum(g * e2).
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hyper_linear_grad_pass", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const MemberTiling tiling(d.E, d.B, d.out);
    std::vector<opmath_t> db_partial(has_bias ? tiling.partial_size() : 0, opmath_t(0));
    std::vector<opmath_t> ddb_partial(has_delta_bias ? tiling.partial_size() : 0, opmath_t(0));
    std::vector<opmath_t> dv_partial(tiling.partial_size(), opmath_t(0));
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const scalar_t* e1p = e1.const_data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* dbp = has_delta_bias ? delta_bias.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* e2p = has_delta_bias ? e2.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gsp = compute_grad_x ? g_s.data_ptr<scalar_t>() : nullptr;
    scalar_t* gvep = g_ve.data_ptr<scalar_t>();
    scalar_t* de1p = grad_e1.data_ptr<scalar_t>();
    scalar_t* de2p = has_delta_bias ? grad_e2.data_ptr<scalar_t>() : nullptr;
    tiling.run([&](const MemberTiling::Task& t) {
      const int64_t c0 = t.col_begin, width = t.col_end - t.col_begin;
      const int64_t mem = t.k * d.out + c0;
      opmath_t* dv = dv_partial.data() + t.partial_offset + c0;
      opmath_t* db = has_bias ? db_partial.data() + t.partial_offset + c0 : nullptr;
      opmath_t* ddb = has_delta_bias ? ddb_partial.data() + t.partial_offset + c0 : nullptr;
      for (int64_t i = t.row_begin; i < t.row_end; ++i) {
        const int64_t row = i * d.out + c0;
        HYPERKERN_SIMD
        for (int64_t j = 0; j < width; ++j) {
          const opmath_t gv = opmath_t(gp[row + j]), e1v = opmath_t(e1p[row + j]), hv = opmath_t(hp[row + j]);
          const opmath_t vk = opmath_t(vp[mem + j]);
          gvep[row + j] = static_cast<scalar_t>(gv * vk * e1v);
          de1p[row + j] = static_cast<scalar_t>(gv * vk * hv);
          dv[j] += gv * e1v * hv;
        }
        if (gsp != nullptr) {
          HYPERKERN_SIMD
          for (int64_t j = 0; j < width; ++j)
            gsp[row + j] = static_cast<scalar_t>(opmath_t(gp[row + j]) * opmath_t(sp[mem + j]));
        }
        if (db != nullptr) {
          HYPERKERN_SIMD
          for (int64_t j = 0; j < width; ++j) db[j] += opmath_t(gp[row + j]);
        }
        if (ddb != nullptr) {
          HYPERKERN_SIMD
          for (int64_t j = 0; j < width; ++j) {
            const opmath_t gv = opmath_t(gp[row + j]);
            de2p[row + j] = static_cast<scalar_t>(gv * opmath_t(dbp[mem + j]));
            ddb[j] += gv * opmath_t(e2p[row + j]);
          }
        }
      }
    });
    tiling.reduce(dv_partial, grad_v.data_ptr<scalar_t>());
    if (has_bias) tiling.reduce(db_partial, grad_bias.data_ptr<scalar_t>());
    if (has_delta_bias) tiling.reduce(ddb_partial, grad_delta_bias.data_ptr<scalar_t>());
  });

  // Delta side: B_d = (g * v_k * e1) @ Delta; dx += u_k * B_d; du_k = colsum(x * B_d); then B_d's
  // buffer is overwritten with x * u_k for dDelta = (g * v_k * e1)^T (x * u_k).
  Tensor grad_x = compute_grad_x ? at::empty({d.N, d.in}, opts) : at::empty({0}, opts);
  Tensor grad_u = at::empty({d.E, d.in}, opts);
  Tensor grad_delta = at::empty({d.out, d.in}, opts);
  Tensor delta_side = at::empty({d.N, d.in}, opts);
  if (d.N == 0 || d.out == 0) {
    delta_side.zero_();
    if (compute_grad_x) grad_x.zero_();
  } else {
    at::mm_out(delta_side, g_ve, delta);
    if (compute_grad_x) at::mm_out(grad_x, g_s, weight);
  }
  g_s.reset();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hyper_linear_dx_pass", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const MemberTiling tiling(d.E, d.B, d.in);
    std::vector<opmath_t> du_partial(tiling.partial_size(), opmath_t(0));
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    scalar_t* bdp = delta_side.data_ptr<scalar_t>();
    scalar_t* dxp = compute_grad_x ? grad_x.data_ptr<scalar_t>() : nullptr;
    tiling.run([&](const MemberTiling::Task& t) {
      const int64_t c0 = t.col_begin, width = t.col_end - t.col_begin;
      const int64_t mem = t.k * d.in + c0;
      opmath_t* du = du_partial.data() + t.partial_offset + c0;
      for (int64_t i = t.row_begin; i < t.row_end; ++i) {
        const int64_t row = i * d.in + c0;
        if (dxp != nullptr) {
          HYPERKERN_SIMD
          for (int64_t j = 0; j < width; ++j)
            dxp[row + j] = static_cast<scalar_t>(opmath_t(rp[mem + j]) * opmath_t(dxp[row + j]) +
                                                 opmath_t(up[mem + j]) * opmath_t(bdp[row + j]));
        }
        HYPERKERN_SIMD
        for (int64_t j = 0; j < width; ++j) {
          const opmath_t xv = opmath_t(xp[row + j]);
          du[j] += xv * opmath_t(bdp[row + j]);
          bdp[row + j] = static_cast<scalar_t>(xv * opmath_t(up[mem + j]));
        }
      }
    });
    tiling.reduce(du_partial, grad_u.data_ptr<scalar_t>());
  });
  if (d.N == 0) {
    grad_delta.zero_();
  } else {
    at::mm_out(grad_delta, g_ve.t(), delta_side);
  }
  delta_side.reset();
  g_ve.reset();

  auto [grad_weight, grad_s, grad_r] = rank1_weight_grads(g, x, weight, r, s, d);
  return {grad_x, grad_weight, grad_delta, grad_r, grad_s, grad_u, grad_v, grad_e1, grad_bias, grad_delta_bias,
          grad_e2};
}

}  // namespace

TORCH_LIBRARY_IMPL(hyperkern, CPU, m) {
  m.impl("batch_ensemble_linear", &batch_ensemble_linear_cpu);
  m.impl("batch_ensemble_linear_backward", &batch_ensemble_linear_backward_cpu);
  m.impl("hyper_batch_ensemble_linear", &hyper_batch_ensemble_linear_cpu);
  m.impl("hyper_batch_ensemble_linear_backward", &hyper_batch_ensemble_linear_backward_cpu);
}

}  // namespace hyperkern
