// CPU kernels of the rank-1 ensemble linear ops (BatchEnsemble and hyper-batch ensemble).
//
// Rows are member-major: x is (E*B, in) and rows k*B .. (k+1)*B-1 belong to member k.
//
//   batch_ensemble_linear:        y = ((x * r_k) @ W^T) * s_k + b_k
//   hyper_batch_ensemble_linear:  y = s_k * ((x * r_k) @ W^T) + (v_k * e1) * ((x * u_k) @ D^T)
//                                     + b_k + delta_bias_k * e2
//   hyper_batch_ensemble_linear_hp:   the same, with [e1 | e2] = hparams @ embedding^T computed per row
//                                     inside the epilogue and inside the backward's pass over g, which
//                                     also reduces d(embedding) and d(hparams) (EmbeddedE below): no
//                                     (E*B, out) tensor of e1, e2 or their gradients is ever made
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
// bfloat16 / float16: every elementwise pass and reduction computes in float; GEMM inputs are
// rounded to the storage dtype and MKL/oneDNN accumulate them in float (G_k of a bfloat16 backward
// is a bfloat16 GEMM result; float16 G_k are computed in float, CPU float16 GEMMs being slow).
// float64 stays float64 throughout.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../rank1_linear.h"
#include "cpu_util.h"
#include "rank1_linear_kernels.h"

namespace hyperkern {
namespace linear_cpu {
// The kernels this file defines (rank1_linear_kernels.h declares them all).
HYPERKERN_DEFINE_ROW_KERNEL(scale_rows, ScaleRowsArgs)
HYPERKERN_DEFINE_ROW_KERNEL(batch_ensemble_epilogue, BatchEnsembleEpilogueArgs)
HYPERKERN_DEFINE_ROW_KERNEL(hyper_epilogue, HyperEpilogueRowsArgs)
HYPERKERN_DEFINE_TASK_KERNEL(batch_ensemble_grad, BatchEnsembleGradArgs)
HYPERKERN_DEFINE_TASK_KERNEL(hyper_grad, HyperGradRowsArgs)
HYPERKERN_DEFINE_TASK_KERNEL(hyper_dx, HyperDxArgs)
}  // namespace linear_cpu

namespace {

using at::Tensor;
using rank1_linear::Dims;
using namespace linear_cpu;

// Size of the backward's G_k buffer (member groups are chosen to fit it, at least one member).
constexpr int64_t kWeightGradBufferBytes = int64_t(4) << 20;

// Scratch buffers that never leave an op call (the scaled GEMM operands, the G_k buffer) come from a
// per-thread workspace, one buffer per slot, kept between calls: a fresh allocation of that size is
// new memory every call (glibc hands it back to the kernel on free), and first-touching its pages costs
// 5-6 % of a forward+backward at E=4, B=256, in=out=512 (docs/benchmark-history.md). A slot keeps at most
// kWorkspaceSlotBytes; larger scratch is allocated per call. Slots in use at the same time differ.
// HYPERKERN_CPU_WORKSPACE=0 turns the cache off (every scratch buffer allocated per call).
enum WorkspaceSlot : int { kScaledInput = 0, kScaledGrad = 1, kScaledGradHyper = 2, kDeltaSide = 3, kGBuffer = 4,
                           kScaledWeight = 5, kWorkspaceSlots = 6 };
constexpr int64_t kWorkspaceSlotBytes = int64_t(32) << 20;

Tensor scratch(WorkspaceSlot slot, at::IntArrayRef sizes, const at::TensorOptions& opts) {
  const int64_t numel = c10::multiply_integers(sizes);
  const int64_t item = static_cast<int64_t>(opts.dtype().itemsize());
  const int64_t bytes = numel * item;
  const char* setting = std::getenv("HYPERKERN_CPU_WORKSPACE");
  TORCH_CHECK(setting == nullptr || std::strcmp(setting, "0") == 0 || std::strcmp(setting, "1") == 0,
              "HYPERKERN_CPU_WORKSPACE must be 0 (off) or 1 (on, the default), got '", setting, "'");
  const bool enabled = setting == nullptr || std::strcmp(setting, "1") == 0;
  if (!enabled || bytes == 0 || bytes > kWorkspaceSlotBytes || opts.device().type() != at::kCPU) {
    return at::empty(sizes, opts);
  }
  thread_local std::array<Tensor, kWorkspaceSlots> slots;
  Tensor& buffer = slots[slot];
  if (!buffer.defined() || buffer.numel() < bytes) buffer = at::empty({bytes}, opts.dtype(at::kByte));
  // A view, so it keeps the storage alive even if a later call grows the slot.
  return buffer.narrow(0, 0, bytes).view(opts.dtype().toScalarType()).view(sizes);
}

int64_t row_grain(int64_t width) { return std::max<int64_t>(1, kElementGrain / std::max<int64_t>(width, 1)); }

// C = A @ B and C = bmm(A, B) into a contiguous C. MKL (and OpenBLAS) run beta = 0 as a scaling pass
// over C before the kernels accumulate into it; at one thread on AMD EPYC, perf put MKL's
// sgemm_mscale at 0.16 ms for a 2 MiB C and 0.49 ms for the 4 MiB G_k of the backward's bmm, where a
// memset of the same buffer took 0.05 and 0.15 ms. So a float / double C of at least kZeroFillElems
// is memset here and the GEMM accumulates into it (beta = 1): the same products in the same order.
constexpr int64_t kZeroFillElems = int64_t(1) << 16;
bool zero_filled_gemm(const Tensor& C) {
  const auto type = C.scalar_type();
  return (type == at::kFloat || type == at::kDouble) && C.is_contiguous() && C.numel() >= kZeroFillElems;
}
void zero_fill(Tensor& C) {
  char* base = static_cast<char*>(C.data_ptr());
  const int64_t bytes = C.numel() * static_cast<int64_t>(C.element_size());
  at::parallel_for(0, bytes, int64_t(1) << 20, [&](int64_t b0, int64_t b1) { std::memset(base + b0, 0, b1 - b0); });
}
void mm_into(Tensor& C, const Tensor& A, const Tensor& B) {
  if (!zero_filled_gemm(C)) {
    at::mm_out(C, A, B);
    return;
  }
  zero_fill(C);
  C.addmm_(A, B);
}
void bmm_into(Tensor& C, const Tensor& A, const Tensor& B) {
  if (!zero_filled_gemm(C)) {
    at::bmm_out(C, A, B);
    return;
  }
  zero_fill(C);
  C.baddbmm_(A, B);
}


// The weight-sized pass of the backward, all members at once (acc_t is float or double):
//   dW = sum_k (s_k r_k^T) * G_k,  ds_k[o] = sum_j W[o,j] G_k[o,j] r_k[j],  dr_k[j] = sum_o W[o,j] G_k[o,j] s_k[o]
// with G (E, out, in). Rows go in groups of four so the dr_k accumulator is loaded and stored once
// per four rows; a thread's rows o0 .. o1-1 add into its own dr partial drp (E, in).
// FIRST (the first member written into dW) stores dW instead of adding to it: a compile-time
// branch, so the loop has no data-dependent select and vectorises.
template <typename acc_t, typename g_t, int R, bool FIRST>
HYPERKERN_INLINE void weight_pass_row_loop(const g_t* __restrict__ g0, const g_t* __restrict__ g1,
                                           const g_t* __restrict__ g2, const g_t* __restrict__ g3,
                                           const acc_t* __restrict__ w0, const acc_t* __restrict__ w1,
                                           const acc_t* __restrict__ w2, const acc_t* __restrict__ w3,
                                           acc_t* __restrict__ dw0, acc_t* __restrict__ dw1, acc_t* __restrict__ dw2,
                                           acc_t* __restrict__ dw3, const acc_t* __restrict__ rk,
                                           acc_t* __restrict__ drk, const acc_t* sk, acc_t* rs, int64_t I) {
  const acc_t s0 = sk[0], s1 = R == 4 ? sk[1] : 0, s2 = R == 4 ? sk[2] : 0, s3 = R == 4 ? sk[3] : 0;
  acc_t rs0 = 0, rs1 = 0, rs2 = 0, rs3 = 0;
#pragma omp simd reduction(+ : rs0, rs1, rs2, rs3)
  for (int64_t j = 0; j < I; ++j) {
    const acc_t rj = rk[j];
    const acc_t G0 = widen(g0[j]);
    const acc_t gw0 = G0 * w0[j];
    if (FIRST) {
      dw0[j] = (s0 * rj) * G0;
    } else {
      dw0[j] += (s0 * rj) * G0;
    }
    rs0 += gw0 * rj;
    acc_t dr = drk[j] + gw0 * s0;
    if (R == 4) {
      const acc_t G1 = widen(g1[j]), G2 = widen(g2[j]), G3 = widen(g3[j]);
      const acc_t gw1 = G1 * w1[j], gw2 = G2 * w2[j], gw3 = G3 * w3[j];
      if (FIRST) {
        dw1[j] = (s1 * rj) * G1;
        dw2[j] = (s2 * rj) * G2;
        dw3[j] = (s3 * rj) * G3;
      } else {
        dw1[j] += (s1 * rj) * G1;
        dw2[j] += (s2 * rj) * G2;
        dw3[j] += (s3 * rj) * G3;
      }
      rs1 += gw1 * rj;
      rs2 += gw2 * rj;
      rs3 += gw3 * rj;
      dr += gw1 * s1 + gw2 * s2 + gw3 * s3;
    }
    drk[j] = dr;
  }
  rs[0] = rs0;
  if (R == 4) {
    rs[1] = rs1;
    rs[2] = rs2;
    rs[3] = rs3;
  }
}

template <typename acc_t, typename g_t, int R>
HYPERKERN_INLINE void weight_pass_row_group(const g_t* G, const acc_t* W, const acc_t* r, const acc_t* s, acc_t* dW,
                                            acc_t* ds, acc_t* drp, int64_t E, int64_t O, int64_t I, int64_t o,
                                            bool accumulate) {
  static_assert(R == 1 || R == 4, "row groups are 1 or 4 rows");
  // Row q of the group; R == 1 leaves rows 1..3 null (never read).
  auto row = [&](auto* base, int q) { return R == 4 || q == 0 ? base + q * I : nullptr; };
  const acc_t* w0 = W + o * I;
  acc_t* dw0 = dW + o * I;
  for (int64_t k = 0; k < E; ++k) {
    const g_t* g0 = G + (k * O + o) * I;
    acc_t row_sums[4];
    if (k == 0 && !accumulate) {
      weight_pass_row_loop<acc_t, g_t, R, true>(row(g0, 0), row(g0, 1), row(g0, 2), row(g0, 3), row(w0, 0), row(w0, 1),
                                           row(w0, 2), row(w0, 3), row(dw0, 0), row(dw0, 1), row(dw0, 2), row(dw0, 3),
                                           r + k * I, drp + k * I, s + k * O + o, row_sums, I);
    } else {
      weight_pass_row_loop<acc_t, g_t, R, false>(row(g0, 0), row(g0, 1), row(g0, 2), row(g0, 3), row(w0, 0), row(w0, 1),
                                            row(w0, 2), row(w0, 3), row(dw0, 0), row(dw0, 1), row(dw0, 2), row(dw0, 3),
                                            r + k * I, drp + k * I, s + k * O + o, row_sums, I);
    }
    for (int q = 0; q < R; ++q) ds[k * O + o + q] = row_sums[q];
  }
}

template <typename acc_t, typename g_t>
HYPERKERN_INLINE void weight_pass_rows_body(const g_t* G, const acc_t* W, const acc_t* r, const acc_t* s, acc_t* dW,
                                            acc_t* ds, acc_t* drp, int64_t E, int64_t O, int64_t I, int64_t o0,
                                            int64_t o1, bool accumulate) {
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) weight_pass_row_group<acc_t, g_t, 4>(G, W, r, s, dW, ds, drp, E, O, I, o, accumulate);
  for (; o < o1; ++o) weight_pass_row_group<acc_t, g_t, 1>(G, W, r, s, dW, ds, drp, E, O, I, o, accumulate);
}

// One function per dtype, compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at load
// time (the extension is built without -march flags so it runs on any x86-64).
HYPERKERN_CPU_CLONES void weight_pass_rows(const float* G, const float* W, const float* r, const float* s, float* dW,
                                           float* ds, float* drp, int64_t E, int64_t O, int64_t I, int64_t o0,
                                           int64_t o1, bool accumulate) {
  weight_pass_rows_body<float, float>(G, W, r, s, dW, ds, drp, E, O, I, o0, o1, accumulate);
}
HYPERKERN_CPU_CLONES void weight_pass_rows(const double* G, const double* W, const double* r, const double* s,
                                           double* dW, double* ds, double* drp, int64_t E, int64_t O, int64_t I,
                                           int64_t o0, int64_t o1, bool accumulate) {
  weight_pass_rows_body<double, double>(G, W, r, s, dW, ds, drp, E, O, I, o0, o1, accumulate);
}
// bfloat16 training: G_k comes from a bfloat16 GEMM (float accumulation, bfloat16 result), the
// rest of the pass runs in float.
HYPERKERN_CPU_CLONES void weight_pass_rows(const c10::BFloat16* G, const float* W, const float* r, const float* s,
                                           float* dW, float* ds, float* drp, int64_t E, int64_t O, int64_t I,
                                           int64_t o0, int64_t o1, bool accumulate) {
  weight_pass_rows_body<float, c10::BFloat16>(G, W, r, s, dW, ds, drp, E, O, I, o0, o1, accumulate);
}

// Runs the pass for members k0 .. k0+kn-1 whose G_k are in G (kn, O, I); dW is overwritten when
// k0 == 0 and accumulated into otherwise; dr_partial (blocks, E, I) collects the per-block dr sums.
template <typename acc_t, typename g_t>
void rank1_weight_grad_pass(const g_t* G, const acc_t* W, const acc_t* r, const acc_t* s, acc_t* dW, acc_t* ds,
                            std::vector<acc_t>& dr_partial, int64_t blocks, int64_t E, int64_t k0, int64_t kn,
                            int64_t O, int64_t I) {
  const int64_t rows_per_block = blocks == 1 ? O : ((O + blocks - 1) / blocks + 3) / 4 * 4;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t o0 = std::min(O, blk * rows_per_block);
      const int64_t o1 = blk + 1 == blocks ? O : std::min(O, (blk + 1) * rows_per_block);
      weight_pass_rows(G, W, r + k0 * I, s + k0 * O, dW, ds + k0 * O, dr_partial.data() + (blk * E + k0) * I, kn, O,
                       I, o0, o1, k0 > 0);
    }
  });
}

template <typename acc_t>
void sum_dr_partials(const std::vector<acc_t>& dr_partial, acc_t* dr, int64_t blocks, int64_t E, int64_t I) {
  for (int64_t k = 0; k < E; ++k) {
    acc_t* out = dr + k * I;
    for (int64_t j = 0; j < I; ++j) out[j] = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const acc_t* p = dr_partial.data() + (blk * E + k) * I;
      for (int64_t j = 0; j < I; ++j) out[j] += p[j];
    }
  }
}

// Below this much G_k work (E * B * out * in multiply-adds) the weight gradients come from one loop
// instead of the G_k GEMMs: at a tiny layer (E=4, B=2, 16 -> 16) the batched GEMM's call, its views and
// the group bookkeeping cost more host time than the 2048 multiply-adds themselves.
constexpr int64_t kTinyWeightGradWork = int64_t(1) << 14;

// The tiny-layer weight gradients (float / double): for every member k and output o, the row
// G_k[o, :] = sum_b g[kB+b, o] x[kB+b, :] is built in a buffer and applied at once:
// dW[o, :] += s_k[o] r_k * G_k[o, :], ds_k[o] = sum_j W[o, j] G_k[o, j] r_k[j], dr_k += s_k[o] W[o, :] * G_k[o, :].
template <typename T>
void tiny_weight_grads(const T* g, const T* x, const T* W, const T* r, const T* s, T* dW, T* ds, T* dr,
                       const Dims& d) {
  const int64_t O = d.out, I = d.in;
  std::vector<T> G(static_cast<size_t>(I));
  std::fill(dW, dW + O * I, T(0));
  std::fill(dr, dr + d.E * I, T(0));
  for (int64_t k = 0; k < d.E; ++k) {
    const T *rk = r + k * I, *sk = s + k * O;
    T* drk = dr + k * I;
    for (int64_t o = 0; o < O; ++o) {
      std::fill(G.begin(), G.end(), T(0));
      for (int64_t b = k * d.B; b < (k + 1) * d.B; ++b) {
        const T gv = g[b * O + o];
        const T* xb = x + b * I;
        for (int64_t j = 0; j < I; ++j) G[j] += gv * xb[j];
      }
      const T so = sk[o];
      const T* Wo = W + o * I;
      T* dWo = dW + o * I;
      T ds_o = 0;
      for (int64_t j = 0; j < I; ++j) {
        const T wg = Wo[j] * G[j];
        dWo[j] += so * rk[j] * G[j];
        ds_o += wg * rk[j];
        drk[j] += so * wg;
      }
      ds[k * O + o] = ds_o;
    }
  }
}

// G_k = g_k^T x_k for every member, then the weight pass. Returns (dW, ds, dr) in the input dtype.
// Reduced-precision inputs are widened to float first so nothing is rounded before the sums end.
std::tuple<Tensor, Tensor, Tensor> rank1_weight_grads(const Tensor& g, const Tensor& x, const Tensor& weight,
                                                     const Tensor& r, const Tensor& s, const Dims& d) {
  const auto dtype = x.scalar_type();
  const auto acc_dtype = at::toOpMathType(dtype);
  if (dtype == acc_dtype && d.E * d.B * d.out * d.in <= kTinyWeightGradWork) {  // float / double, tiny
    Tensor dW = at::empty({d.out, d.in}, x.options()), ds = at::empty({d.E, d.out}, x.options()),
           dr = at::empty({d.E, d.in}, x.options());
    AT_DISPATCH_FLOATING_TYPES(dtype, "rank1_tiny_weight_grads", [&] {
      tiny_weight_grads<scalar_t>(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                  weight.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(),
                                  s.const_data_ptr<scalar_t>(), dW.data_ptr<scalar_t>(), ds.data_ptr<scalar_t>(),
                                  dr.data_ptr<scalar_t>(), d);
    });
    return {dW, ds, dr};
  }
  // The G_k GEMMs: float / double natively; bfloat16 natively too (MKL/oneDNN accumulate in float,
  // G_k is rounded once to bfloat16, like any bfloat16 at::mm); float16 on float copies (CPU float16
  // GEMMs are slow and round the same way).
  const auto gemm_dtype = dtype == at::kBFloat16 ? dtype : acc_dtype;
  auto as = [](const Tensor& t, at::ScalarType type) { return t.scalar_type() == type ? t : t.to(type); };
  const Tensor g_gemm = as(g, gemm_dtype), x_gemm = as(x, gemm_dtype);
  const Tensor w_acc = as(weight, acc_dtype), r_acc = as(r, acc_dtype), s_acc = as(s, acc_dtype);
  const auto acc_opts = x.options().dtype(acc_dtype);
  Tensor dW = at::empty({d.out, d.in}, acc_opts);
  Tensor ds = at::empty({d.E, d.out}, acc_opts);
  Tensor dr = at::empty({d.E, d.in}, acc_opts);
  // Members go in groups whose G_k fit a cache-sized buffer, so the weight pass reads G_k from
  // cache soon after the GEMM wrote it (and the buffer is up to E times smaller than all G_k).
  const int64_t weight_elems = std::max<int64_t>(1, d.out * d.in);
  const int64_t group = std::max<int64_t>(
      1, std::min<int64_t>(d.E, kWeightGradBufferBytes / (weight_elems * int64_t(c10::elementSize(gemm_dtype)))));
  Tensor G = scratch(kGBuffer, {group, d.out, d.in}, x.options().dtype(gemm_dtype));
  const Tensor g3 = g_gemm.view({d.E, d.B, d.out}), x3 = x_gemm.view({d.E, d.B, d.in});
  const int64_t threads = at::get_num_threads();
  const int64_t blocks =
      std::max<int64_t>(1, std::min<int64_t>(d.out / 4, d.out * d.in * group >= 4 * kElementGrain ? threads : 1));
  // G_k GEMMs for member groups, each followed by the weight pass over its G_k.
  auto run = [&](auto acc_tag, auto g_tag) {
    using acc_t = decltype(acc_tag);
    using g_t = decltype(g_tag);
    std::vector<acc_t> dr_partial(static_cast<size_t>(blocks * d.E * d.in), acc_t(0));
    for (int64_t k0 = 0; k0 < d.E; k0 += group) {
      const int64_t kn = std::min(group, d.E - k0);
      Tensor Gk = G.narrow(0, 0, kn);
      if (d.B > 0) {
        bmm_into(Gk, g3.narrow(0, k0, kn).transpose(1, 2), x3.narrow(0, k0, kn));
      } else {
        Gk.zero_();
      }
      rank1_weight_grad_pass<acc_t>(Gk.const_data_ptr<g_t>(), w_acc.const_data_ptr<acc_t>(),
                                    r_acc.const_data_ptr<acc_t>(), s_acc.const_data_ptr<acc_t>(), dW.data_ptr<acc_t>(),
                                    ds.data_ptr<acc_t>(), dr_partial, blocks, d.E, k0, kn, d.out, d.in);
    }
    sum_dr_partials<acc_t>(dr_partial, dr.data_ptr<acc_t>(), blocks, d.E, d.in);
  };
  if (gemm_dtype == at::kBFloat16) {
    run(float(), c10::BFloat16());
  } else if (acc_dtype == at::kDouble) {
    run(double(), double());
  } else {
    run(float(), float());
  }
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
  // little against one GEMM over all rows, so the weight side must win clearly. Measured (1 thread,
  // fp32): E=4, B=2048, in=out=64: weight 0.74 ms vs rows 2.59 ms (floor 0.70); E=4, B=256,
  // in=out=512: rows 5.64 ms vs weight 6.03 ms (floor 5.49).
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
  if (d.N == 0 || d.out == 0) return y;

  if (d.in > 0 && prefer_scaled_weight(d)) {
    // Weight scaling: W_k = W * (s_k r_k^T), y_k = b_k + x_k @ W_k^T per member.
    Tensor w_k = scratch(kScaledWeight, weight.sizes(), weight.options());
    for (int64_t k = 0; k < d.E; ++k) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_ensemble_linear_scale_weight",
                                      [&] {
        // Row o of W_k is W[o, :] * r_k * s_k[o]: scale by r_k (a row kernel with B = out, so every
        // row uses member 0 of the (1, in) scale r_k), then multiply row o by s_k[o] in place.
        scale_rows(ScaleRowsArgs<scalar_t>{weight.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>() + k * d.in,
                                           w_k.data_ptr<scalar_t>(), d.in, d.out},
                   0, d.out);
        using opmath_t = at::opmath_type<scalar_t>;
        scalar_t* wk = w_k.data_ptr<scalar_t>();
        const scalar_t* sk = s.const_data_ptr<scalar_t>() + k * d.out;
        at::parallel_for(0, d.out, row_grain(d.in), [&](int64_t o0, int64_t o1) {
          for (int64_t o = o0; o < o1; ++o) {
            const opmath_t so = opmath_t(sk[o]);
            scalar_t* row = wk + o * d.in;
            for (int64_t j = 0; j < d.in; ++j) row[j] = static_cast<scalar_t>(opmath_t(row[j]) * so);
          }
        });
      });
      Tensor y_k = y.narrow(0, k * d.B, d.B);
      const Tensor x_k = x.narrow(0, k * d.B, d.B);
      if (has_bias) {
        at::addmm_out(y_k, bias[k], x_k, w_k.t());
      } else {
        mm_into(y_k, x_k, w_k.t());
      }
    }
    return y;
  }

  // Activation scaling: x * r_k (prologue), one GEMM over all E*B rows, * s_k + b_k in place.
  if (d.in == 0) {
    y.zero_();
  } else {
    Tensor x_scaled = scratch(kScaledInput, x.sizes(), x.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_ensemble_linear_prologue", [&] {
      const ScaleRowsArgs<scalar_t> args{x.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(),
                                         x_scaled.data_ptr<scalar_t>(), d.in, d.B};
      at::parallel_for(0, d.N, row_grain(d.in), [&](int64_t i0, int64_t i1) { scale_rows(args, i0, i1); });
    });
    mm_into(y, x_scaled, weight.t());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_ensemble_linear_epilogue", [&] {
    const BatchEnsembleEpilogueArgs<scalar_t> args{y.data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
                                                   has_bias ? bias.const_data_ptr<scalar_t>() : nullptr, d.out, d.B};
    at::parallel_for(0, d.N, row_grain(d.out), [&](int64_t i0, int64_t i1) { batch_ensemble_epilogue(args, i0, i1); });
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> batch_ensemble_linear_backward_cpu(
    const Tensor& grad_in, const Tensor& x_in, const Tensor& weight_in, const Tensor& r_in, const Tensor& s_in,
    bool has_bias, bool compute_grad_x) {
  const Dims d = rank1_linear::check_linear(x_in, weight_in, r_in, s_in);
  rank1_linear::check_backward_rows(d, x_in, grad_in);
  const Tensor g = grad_in.contiguous(), x = x_in.contiguous(), weight = weight_in.contiguous();
  const Tensor r = r_in.contiguous(), s = s_in.contiguous();
  const auto opts = x.options();

  Tensor grad_bias = has_bias ? at::empty({d.E, d.out}, opts) : at::empty({0}, opts);
  Tensor g_scaled = compute_grad_x ? scratch(kScaledGrad, {d.N, d.out}, opts) : Tensor();

  // One pass over g: g * s_k (the dx GEMM's prologue) and db_k = colsum(g_k).
  if (has_bias || compute_grad_x) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_ensemble_linear_grad_pass", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const MemberTiling tiling(d.E, d.B, d.out);
      std::vector<opmath_t> db_partial(has_bias ? tiling.partial_size() : 0, opmath_t(0));
      const BatchEnsembleGradArgs<scalar_t> args{g.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
                                                 compute_grad_x ? g_scaled.data_ptr<scalar_t>() : nullptr,
                                                 has_bias ? db_partial.data() : nullptr, d.out};
      tiling.run([&](const MemberTiling::Task& t) { batch_ensemble_grad(args, t); });
      if (has_bias) tiling.reduce(db_partial, grad_bias.data_ptr<scalar_t>());
    });
  }

  Tensor grad_x = at::empty({0}, opts);
  if (compute_grad_x) {
    grad_x = at::empty({d.N, d.in}, opts);
    if (d.out == 0) {
      grad_x.zero_();
    } else if (d.N * d.in > 0) {
      mm_into(grad_x, g_scaled, weight);  // (g * s_k) @ W, then * r_k in place
      g_scaled.reset();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_ensemble_linear_dx", [&] {
        const ScaleRowsArgs<scalar_t> args{grad_x.data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(),
                                           grad_x.data_ptr<scalar_t>(), d.in, d.B};
        at::parallel_for(0, d.N, row_grain(d.in), [&](int64_t i0, int64_t i1) { scale_rows(args, i0, i1); });
      });
    }
  }

  auto [grad_weight, grad_s, grad_r] = rank1_weight_grads(g, x, weight, r, s, d);
  return {grad_x, grad_weight, grad_r, grad_s, grad_bias};
}

// ------------------------------------------------------------------------------------------------
// hyper_batch_ensemble_linear and hyper_batch_ensemble_linear_hp
//
// Both ops run the same GEMMs and row kernels; they differ in where e1, e2 come from (RowsE: given
// tensors; EmbeddedE: recomputed per row from hparams and the embedding inside the epilogue and the
// backward's pass over g) and in what the backward returns for them (de1, de2 vs d(hparams),
// d(embedding), reduced inside that pass).

// u is r (the hyper layers' default fast weights, the reference's fast_weights_eq_contraint).
bool same_tensor(const Tensor& a, const Tensor& b) {
  return a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() && a.strides() == b.strides();
}

// The forward's GEMMs: delta_out = (x * u_k) @ Delta^T and y = (x * r_k) @ W^T (the epilogue follows).
void hyper_forward_gemms(const Tensor& x, const Tensor& weight, const Tensor& delta, const Tensor& r, const Tensor& u,
                         const Dims& d, Tensor& y, Tensor& delta_out) {
  if (d.in == 0) {
    y.zero_();
    delta_out.zero_();
    return;
  }
  // One scratch buffer for both prologues: x * u_k feeds the Delta GEMM, then x * r_k the W GEMM. With
  // tied fast weights (u is r: the hyper layers' default, the reference's fast_weights_eq_contraint)
  // the first prologue serves both GEMMs.
  const bool tied = same_tensor(u, r);
  Tensor x_scaled = scratch(kScaledInput, x.sizes(), x.options());
  auto prologue = [&](const Tensor& scale) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hyper_linear_prologue", [&] {
      const ScaleRowsArgs<scalar_t> args{x.const_data_ptr<scalar_t>(), scale.const_data_ptr<scalar_t>(),
                                         x_scaled.data_ptr<scalar_t>(), d.in, d.B};
      at::parallel_for(0, d.N, row_grain(d.in), [&](int64_t i0, int64_t i1) { scale_rows(args, i0, i1); });
    });
  };
  prologue(u);
  mm_into(delta_out, x_scaled, delta.t());
  if (!tied) prologue(r);
  mm_into(y, x_scaled, weight.t());
}

// y = y * s_k + v_k * e1 * delta_out + bias_k + delta_bias_k * e2, in place, e1 / e2 from make_e(scalar_t()).
template <class MakeE>
void hyper_forward_epilogue(Tensor& y, const Tensor& delta_out, const Tensor& s, const Tensor& v, const Tensor& bias,
                            const Tensor& delta_bias, const Dims& d, const MakeE& make_e) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "hyper_linear_epilogue", [&] {
    using Src = decltype(make_e(scalar_t()));
    const HyperEpilogueArgs<scalar_t, Src> args{y.data_ptr<scalar_t>(),
                                                delta_out.const_data_ptr<scalar_t>(),
                                                s.const_data_ptr<scalar_t>(),
                                                v.const_data_ptr<scalar_t>(),
                                                bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                                                delta_bias.defined() ? delta_bias.const_data_ptr<scalar_t>() : nullptr,
                                                make_e(scalar_t()),
                                                d.out,
                                                d.B};
    at::parallel_for(0, d.N, row_grain(d.out), [&](int64_t i0, int64_t i1) { hyper_epilogue(args, i0, i1); });
  });
}

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
  if (d.N == 0 || d.out == 0) return {y, delta_out};
  hyper_forward_gemms(x, weight, delta, r, u, d, y, delta_out);
  hyper_forward_epilogue(y, delta_out, s, v, bias, delta_bias, d, [&](auto tag) {
    using scalar_t = decltype(tag);
    return RowsE<scalar_t>{e1.const_data_ptr<scalar_t>(), e2.defined() ? e2.const_data_ptr<scalar_t>() : nullptr,
                           nullptr, nullptr};
  });
  return {y, delta_out};
}

std::tuple<Tensor, Tensor> hyper_batch_ensemble_linear_hp_cpu(
    const Tensor& x_in, const Tensor& weight_in, const Tensor& delta_in, const Tensor& r_in, const Tensor& s_in,
    const Tensor& u_in, const Tensor& v_in, const Tensor& hparams_in, const Tensor& embedding_in,
    const std::optional<Tensor>& bias_in, const std::optional<Tensor>& delta_bias_in) {
  const rank1_linear::HpDims d = rank1_linear::check_hp(x_in, weight_in, delta_in, r_in, s_in, u_in, v_in, hparams_in,
                                                        embedding_in, bias_in, delta_bias_in);
  const int64_t m = d.m;
  const Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), delta = delta_in.contiguous();
  const Tensor r = r_in.contiguous(), s = s_in.contiguous(), u = u_in.contiguous(), v = v_in.contiguous();
  const Tensor hparams = hparams_in.contiguous();
  const Tensor bias = contiguous_or_empty(bias_in), delta_bias = contiguous_or_empty(delta_bias_in);

  Tensor y = at::empty({d.N, d.out}, x.options());
  Tensor delta_out = at::empty({d.N, d.out}, x.options());
  if (d.N == 0 || d.out == 0) return {y, delta_out};
  hyper_forward_gemms(x, weight, delta, r, u, d, y, delta_out);
  const Tensor embT = transposed_embedding(embedding_in);
  const bool has_e2 = delta_bias.defined();
  hyper_forward_epilogue(y, delta_out, s, v, bias, delta_bias, d, [&](auto tag) {
    using scalar_t = decltype(tag);
    using opmath_t = at::opmath_type<scalar_t>;
    return EmbeddedE<scalar_t>{hparams.const_data_ptr<scalar_t>(), embT.const_data_ptr<opmath_t>(), m, has_e2,
                               nullptr, nullptr, nullptr};
  });
  return {y, delta_out};
}

// What both hyper backwards return besides the embeddings' gradients.
struct HyperGrads {
  Tensor x, weight, delta, r, s, u, v, bias, delta_bias;
};

// The hyper backward; make_e(scalar_t()) gives the pass over g its e source (with the de1 / de2
// tensors, or the d(embedding) / d(hparams) partials to reduce into), over `tiling` (E, B, out).
template <class MakeE>
HyperGrads hyper_backward(const Tensor& g, const Tensor& x, const Tensor& weight, const Tensor& delta, const Tensor& r,
                          const Tensor& s, const Tensor& u, const Tensor& v, const Tensor& h, const Tensor& delta_bias,
                          bool has_bias, bool compute_grad_x, const Dims& d, const MemberTiling& tiling,
                          const MakeE& make_e) {
  const bool has_delta_bias = delta_bias.defined();
  const auto opts = x.options();
  HyperGrads out;
  out.bias = has_bias ? at::empty({d.E, d.out}, opts) : at::empty({0}, opts);
  out.delta_bias = has_delta_bias ? at::empty({d.E, d.out}, opts) : at::empty({0}, opts);
  out.v = at::empty({d.E, d.out}, opts);
  Tensor g_s = compute_grad_x ? scratch(kScaledGrad, {d.N, d.out}, opts) : Tensor();  // g * s_k
  Tensor g_ve = scratch(kScaledGradHyper, {d.N, d.out}, opts);              // g * v_k * e1

  // Pass over g: the GEMM prologues g * s_k and g * v_k * e1, the per-row gradients
  // de1 = g * v_k * delta_out and de2 = g * delta_bias_k (or their reductions), and the member column
  // sums db_k = colsum(g), dv_k = colsum(g * e1 * delta_out), d(delta_bias)_k = colsum(g * e2).
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hyper_linear_grad_pass", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using Src = decltype(make_e(scalar_t()));
    std::vector<opmath_t> db_partial(has_bias ? tiling.partial_size() : 0, opmath_t(0));
    std::vector<opmath_t> ddb_partial(has_delta_bias ? tiling.partial_size() : 0, opmath_t(0));
    std::vector<opmath_t> dv_partial(tiling.partial_size(), opmath_t(0));
    const HyperGradArgs<scalar_t, Src> args{g.const_data_ptr<scalar_t>(),
                                            s.const_data_ptr<scalar_t>(),
                                            v.const_data_ptr<scalar_t>(),
                                            h.const_data_ptr<scalar_t>(),
                                            has_delta_bias ? delta_bias.const_data_ptr<scalar_t>() : nullptr,
                                            make_e(scalar_t()),
                                            compute_grad_x ? g_s.data_ptr<scalar_t>() : nullptr,
                                            g_ve.data_ptr<scalar_t>(),
                                            dv_partial.data(),
                                            has_bias ? db_partial.data() : nullptr,
                                            has_delta_bias ? ddb_partial.data() : nullptr,
                                            d.out,
                                            d.N};
    tiling.run([&](const MemberTiling::Task& t) { hyper_grad(args, t); });
    tiling.reduce(dv_partial, out.v.data_ptr<scalar_t>());
    if (has_bias) tiling.reduce(db_partial, out.bias.data_ptr<scalar_t>());
    if (has_delta_bias) tiling.reduce(ddb_partial, out.delta_bias.data_ptr<scalar_t>());
  });

  // Delta side: B_d = (g * v_k * e1) @ Delta; dx += u_k * B_d; du_k = colsum(x * B_d); then B_d's
  // buffer is overwritten with x * u_k for dDelta = (g * v_k * e1)^T (x * u_k).
  // Tied (u is r; float / double): both GEMMs accumulate into one P = (g * s_k) @ W + B_d, dx = r_k * P,
  // and colsum(x * P) = dr_k + du_k, from which dr_k (the weight pass's) is subtracted at the end: one
  // (E*B, in) buffer less to zero, write and read back.
  out.x = compute_grad_x ? at::empty({d.N, d.in}, opts) : at::empty({0}, opts);
  out.u = at::empty({d.E, d.in}, opts);
  out.delta = at::empty({d.out, d.in}, opts);
  const bool tied = compute_grad_x && d.out > 0 && d.N * d.in > 0 && same_tensor(u, r) &&
                    (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble);
  Tensor delta_side = scratch(kDeltaSide, {d.N, d.in}, opts);
  if (d.out == 0) {
    delta_side.zero_();
    if (compute_grad_x) out.x.zero_();
  } else if (tied) {
    mm_into(out.x, g_s, weight);
    out.x.addmm_(g_ve, delta);
  } else if (d.N * d.in > 0) {
    mm_into(delta_side, g_ve, delta);
    if (compute_grad_x) mm_into(out.x, g_s, weight);
  }
  g_s.reset();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hyper_linear_dx_pass", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const MemberTiling dx_tiling(d.E, d.B, d.in);
    std::vector<opmath_t> du_partial(dx_tiling.partial_size(), opmath_t(0));
    const HyperDxArgs<scalar_t> args{x.const_data_ptr<scalar_t>(),
                                     r.const_data_ptr<scalar_t>(),
                                     u.const_data_ptr<scalar_t>(),
                                     compute_grad_x ? out.x.data_ptr<scalar_t>() : nullptr,
                                     delta_side.data_ptr<scalar_t>(),
                                     du_partial.data(),
                                     d.in,
                                     tied};
    dx_tiling.run([&](const MemberTiling::Task& t) { hyper_dx(args, t); });
    dx_tiling.reduce(du_partial, out.u.data_ptr<scalar_t>());
  });
  if (d.N == 0) {
    out.delta.zero_();
  } else {
    mm_into(out.delta, g_ve.t(), delta_side);
  }
  delta_side.reset();
  g_ve.reset();

  std::tie(out.weight, out.s, out.r) = rank1_weight_grads(g, x, weight, r, s, d);
  if (tied) out.u.sub_(out.r);
  return out;
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
  rank1_linear::check_backward_rows(d, x_in, grad_in, &delta_out_in);
  const Tensor e1 = e1_in.contiguous(), e2 = contiguous_or_empty(e2_in);
  const Tensor delta_bias = contiguous_or_empty(delta_bias_in);
  const bool has_delta_bias = delta_bias.defined();
  const auto opts = x_in.options();
  Tensor grad_e1 = at::empty({d.N, d.out}, opts);
  Tensor grad_e2 = has_delta_bias ? at::empty({d.N, d.out}, opts) : at::empty({0}, opts);
  const MemberTiling tiling(d.E, d.B, d.out);
  const HyperGrads gr = hyper_backward(
      grad_in.contiguous(), x_in.contiguous(), weight_in.contiguous(), delta_in.contiguous(), r_in.contiguous(),
      s_in.contiguous(), u_in.contiguous(), v_in.contiguous(), delta_out_in.contiguous(), delta_bias, has_bias,
      compute_grad_x, d, tiling, [&](auto tag) {
        using scalar_t = decltype(tag);
        return RowsE<scalar_t>{e1.const_data_ptr<scalar_t>(),
                               has_delta_bias ? e2.const_data_ptr<scalar_t>() : nullptr, grad_e1.data_ptr<scalar_t>(),
                               has_delta_bias ? grad_e2.data_ptr<scalar_t>() : nullptr};
      });
  return {gr.x, gr.weight, gr.delta, gr.r, gr.s, gr.u, gr.v, grad_e1, gr.bias, gr.delta_bias, grad_e2};
}

// Gradients for (x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias). e1, e2 are
// recomputed per row in the pass over g, and d(embedding) = [de1 | de2]^T hparams and
// d(hparams) = de1 @ emb1 + de2 @ emb2 reduced there (per-task partials, summed here): no
// (E*B, out) tensor of e or de is made.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
hyper_batch_ensemble_linear_hp_backward_cpu(const Tensor& grad_in, const Tensor& x_in, const Tensor& weight_in,
                                            const Tensor& delta_in, const Tensor& r_in, const Tensor& s_in,
                                            const Tensor& u_in, const Tensor& v_in, const Tensor& hparams_in,
                                            const Tensor& embedding_in, const std::optional<Tensor>& delta_bias_in,
                                            const Tensor& delta_out_in, bool has_bias, bool compute_grad_x,
                                            bool compute_grad_hparams) {
  const rank1_linear::HpDims d = rank1_linear::check_hp(x_in, weight_in, delta_in, r_in, s_in, u_in, v_in, hparams_in,
                                                        embedding_in, std::nullopt, delta_bias_in, &grad_in,
                                                        &delta_out_in);
  const int64_t m = d.m;
  const Tensor hparams = hparams_in.contiguous(), delta_bias = contiguous_or_empty(delta_bias_in);
  const bool has_e2 = delta_bias.defined();
  const Tensor embT = transposed_embedding(embedding_in);
  const MemberTiling tiling(d.E, d.B, d.out);
  // One zeroed buffer of the compute type for every partial sum: [d(emb1) | d(emb2) | d(hparams)], the
  // d(embedding) slices (E * row_chunks, m, out) each and the d(hparams) slices (col_chunks, E*B, m).
  const int64_t slices = tiling.E * tiling.row_chunks, emb_part = slices * m * d.out;
  const int64_t hp_part = compute_grad_hparams ? tiling.col_chunks * d.N * m : 0;
  const Tensor partials = at::zeros({emb_part * (has_e2 ? 2 : 1) + hp_part},
                                    x_in.options().dtype(at::toOpMathType(x_in.scalar_type())));
  const HyperGrads gr = hyper_backward(
      grad_in.contiguous(), x_in.contiguous(), weight_in.contiguous(), delta_in.contiguous(), r_in.contiguous(),
      s_in.contiguous(), u_in.contiguous(), v_in.contiguous(), delta_out_in.contiguous(), delta_bias, has_bias,
      compute_grad_x, d, tiling, [&](auto tag) {
        using scalar_t = decltype(tag);
        using opmath_t = at::opmath_type<scalar_t>;
        opmath_t* base = partials.data_ptr<opmath_t>();
        return EmbeddedE<scalar_t>{hparams.const_data_ptr<scalar_t>(),
                                   embT.const_data_ptr<opmath_t>(),
                                   m,
                                   has_e2,
                                   base,
                                   has_e2 ? base + emb_part : nullptr,
                                   compute_grad_hparams ? base + emb_part * (has_e2 ? 2 : 1) : nullptr};
      });
  // Sum the slices straight into the outputs: d(embedding) rows [0, out) from the e1 partials, rows
  // [out, 2*out) from the e2 ones (row o, column p = sum over slices of partial[slice, p, o]), and
  // d(hparams) over the column chunks.
  Tensor grad_embedding = at::empty({(has_e2 ? 2 : 1) * d.out, m}, x_in.options());
  Tensor grad_hparams = compute_grad_hparams ? at::empty({d.N, m}, x_in.options()) : at::empty({0}, x_in.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_in.scalar_type(), "hyper_linear_hp_partials", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t* base = partials.const_data_ptr<opmath_t>();
    scalar_t* gemb = grad_embedding.data_ptr<scalar_t>();
    const int64_t plane = m * d.out;
    const int64_t grain = std::max<int64_t>(1, kElementGrain / std::max<int64_t>(1, slices * m));
    at::parallel_for(0, (has_e2 ? 2 : 1) * d.out, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        const bool e2_row = row >= d.out;
        const opmath_t* part = base + (e2_row ? emb_part : 0);
        const int64_t o = e2_row ? row - d.out : row;
        for (int64_t p = 0; p < m; ++p) {
          opmath_t acc = 0;
          for (int64_t sl = 0; sl < slices; ++sl) acc += part[sl * plane + p * d.out + o];
          gemb[row * m + p] = static_cast<scalar_t>(acc);
        }
      }
    });
    if (compute_grad_hparams) {
      const opmath_t* dhp = base + emb_part * (has_e2 ? 2 : 1);
      scalar_t* ghp = grad_hparams.data_ptr<scalar_t>();
      const int64_t n = d.N * m;
      at::parallel_for(0, n, kElementGrain, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          opmath_t acc = 0;
          for (int64_t c = 0; c < tiling.col_chunks; ++c) acc += dhp[c * n + i];
          ghp[i] = static_cast<scalar_t>(acc);
        }
      });
    }
  });
  return {gr.x, gr.weight, gr.delta, gr.r, gr.s, gr.u, gr.v, grad_hparams, grad_embedding, gr.bias, gr.delta_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(hyperkern, CPU, m) {
  m.impl("batch_ensemble_linear", &batch_ensemble_linear_cpu);
  m.impl("batch_ensemble_linear_backward", &batch_ensemble_linear_backward_cpu);
  m.impl("hyper_batch_ensemble_linear", &hyper_batch_ensemble_linear_cpu);
  m.impl("hyper_batch_ensemble_linear_backward", &hyper_batch_ensemble_linear_backward_cpu);
  m.impl("hyper_batch_ensemble_linear_hp", &hyper_batch_ensemble_linear_hp_cpu);
  m.impl("hyper_batch_ensemble_linear_hp_backward", &hyper_batch_ensemble_linear_hp_backward_cpu);
}

}  // namespace hyperkern
