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

namespace hyperkern {
namespace {

using at::Tensor;
using rank1_linear::Dims;
using rank1_linear::present;

using cpu::narrow_to;
using cpu::widen;

// Elements of work per parallel chunk below which a pass stays on one thread.
constexpr int64_t kElementGrain = 1 << 14;
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

// ------------------------------------------------------------------------------------------------
// Row kernels: each processes rows [i0, i1) of a member-major (E*B, D) array. The *_body templates
// hold the loops; HYPERKERN_ROW_KERNEL makes `name(args, i0, i1)` with float and double overloads
// compiled for AVX-512 / AVX2 / baseline (function multiversioning) and a template overload for
// float16 (computed in float, baseline ISA); bfloat16 also gets cloned overloads.
#define HYPERKERN_ROW_KERNEL(name, Args)                                                                  \
  HYPERKERN_CPU_CLONES void name(const Args<float>& a, int64_t i0, int64_t i1) { name##_body(a, i0, i1); } \
  HYPERKERN_CPU_CLONES void name(const Args<double>& a, int64_t i0, int64_t i1) { name##_body(a, i0, i1); } \
  HYPERKERN_CPU_CLONES void name(const Args<c10::BFloat16>& a, int64_t i0, int64_t i1) { name##_body(a, i0, i1); } \
  template <typename T>                                                                                  \
  void name(const Args<T>& a, int64_t i0, int64_t i1) {                                                  \
    name##_body(a, i0, i1);                                                                              \
  }

// out[i, :] = in[i, :] * scale[i / B, :]   (the prologues x * r_k, x * u_k; dx *= r_k in place)
template <typename scalar_t>
struct ScaleRowsArgs {
  const scalar_t* in;
  const scalar_t* scale;
  scalar_t* out;
  int64_t D, B;
};
template <typename scalar_t>
HYPERKERN_INLINE void scale_rows_body(const ScaleRowsArgs<scalar_t>& a, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    const scalar_t* sc = a.scale + (i / a.B) * a.D;
    const scalar_t* in = a.in + i * a.D;
    scalar_t* out = a.out + i * a.D;
#pragma omp simd
    for (int64_t j = 0; j < a.D; ++j) out[j] = narrow_to<scalar_t>(widen(in[j]) * widen(sc[j]));
  }
}
HYPERKERN_ROW_KERNEL(scale_rows, ScaleRowsArgs)

// y[i, :] = y[i, :] * s[k, :] + bias[k, :]   (bias may be null)
template <typename scalar_t>
struct BatchEnsembleEpilogueArgs {
  scalar_t* y;
  const scalar_t* s;
  const scalar_t* bias;
  int64_t D, B;
};
template <typename scalar_t>
HYPERKERN_INLINE void batch_ensemble_epilogue_body(const BatchEnsembleEpilogueArgs<scalar_t>& a, int64_t i0,
                                                   int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    scalar_t* y = a.y + i * a.D;
    const scalar_t* s = a.s + (i / a.B) * a.D;
    if (a.bias != nullptr) {
      const scalar_t* b = a.bias + (i / a.B) * a.D;
#pragma omp simd
      for (int64_t j = 0; j < a.D; ++j) y[j] = narrow_to<scalar_t>(widen(y[j]) * widen(s[j]) + widen(b[j]));
    } else {
#pragma omp simd
      for (int64_t j = 0; j < a.D; ++j) y[j] = narrow_to<scalar_t>(widen(y[j]) * widen(s[j]));
    }
  }
}
HYPERKERN_ROW_KERNEL(batch_ensemble_epilogue, BatchEnsembleEpilogueArgs)

// ------------------------------------------------------------------------------------------------
// Where the hyper op's row kernels read the per-row embeddings e1, e2 (out wide each) from: one
// template argument of the row kernels, so both hyper ops share their loops.
//   RowsE:     given (E*B, out) tensors (hyperkern::hyper_batch_ensemble_linear);
//   EmbeddedE: computed per row inside the kernel (hyperkern::hyper_batch_ensemble_linear_hp) from the
//              row's normalised hyperparameters hp (E*B, m) and the embedding weight, transposed to
//              embT (m, out or 2*out) in the compute type: e1[i, j] = sum_p hp[i, p] * embT[p, j],
//              e2[i, j] = sum_p hp[i, p] * embT[p, out + j]. m FMAs per element, into a stack buffer of
//              kEPiece columns: no (E*B, out) tensor of e1 / e2 (or of their gradients) ever exists.
// The kernels walk a row's columns in pieces (e_piece_width): RowsE in one piece, EmbeddedE in pieces
// of kEPiece; e_piece returns the piece's e1, e2 (e2 null without delta_bias).
template <typename scalar_t>
struct RowsE {
  const scalar_t *e1, *e2;  // (E*B, out); e2 null without delta_bias
  scalar_t *grad_e1, *grad_e2;  // the backward's de1, de2 (E*B, out); null in the forward
};
template <typename scalar_t>
struct EmbeddedE {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* hp;    // (E*B, m)
  const opmath_t* embT;  // (m, out) or (m, 2*out): the embedding weight transposed, in the compute type
  int64_t m;
  bool has_e2;
  // The backward's reductions (null in the forward): d(embedding) partials (E * row_chunks, m, out)
  // for the e1 and the e2 columns, one slice per task of a MemberTiling over out columns, and
  // d(hparams) partials (col_chunks, E*B, m), one slice per column chunk (null: not asked for).
  opmath_t *demb1_partial, *demb2_partial, *dhp_partial;
};
constexpr int64_t kEPiece = 128;

template <typename scalar_t>
HYPERKERN_INLINE int64_t e_piece_width(const RowsE<scalar_t>&, int64_t D) {
  return std::max<int64_t>(D, 1);
}
template <typename scalar_t>
HYPERKERN_INLINE int64_t e_piece_width(const EmbeddedE<scalar_t>&, int64_t) {
  return kEPiece;
}

template <typename scalar_t>
HYPERKERN_INLINE std::pair<const scalar_t*, const scalar_t*> e_piece(const RowsE<scalar_t>& e, int64_t i, int64_t D,
                                                                     int64_t j0, int64_t, at::opmath_type<scalar_t>*,
                                                                     at::opmath_type<scalar_t>*) {
  const int64_t row = i * D + j0;
  return {e.e1 + row, e.e2 != nullptr ? e.e2 + row : nullptr};
}

// out[j] = sum_p hp[p] * embT[p * ld + j] for j < w (w <= kEPiece)
template <typename scalar_t>
HYPERKERN_INLINE void embed_piece(const scalar_t* hp, const at::opmath_type<scalar_t>* embT, int64_t m, int64_t ld,
                                  int64_t w, at::opmath_type<scalar_t>* out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t h0 = m > 0 ? widen(hp[0]) : opmath_t(0);
#pragma omp simd
  for (int64_t j = 0; j < w; ++j) out[j] = m > 0 ? h0 * embT[j] : opmath_t(0);
  for (int64_t p = 1; p < m; ++p) {
    const opmath_t hpv = widen(hp[p]);
    const opmath_t* row = embT + p * ld;
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) out[j] += hpv * row[j];
  }
}

template <typename scalar_t>
HYPERKERN_INLINE std::pair<const at::opmath_type<scalar_t>*, const at::opmath_type<scalar_t>*> e_piece(
    const EmbeddedE<scalar_t>& e, int64_t i, int64_t D, int64_t j0, int64_t w, at::opmath_type<scalar_t>* e1_buffer,
    at::opmath_type<scalar_t>* e2_buffer) {
  const int64_t ld = e.has_e2 ? 2 * D : D;
  const scalar_t* hp = e.hp + i * e.m;
  embed_piece(hp, e.embT + j0, e.m, ld, w, e1_buffer);
  if (!e.has_e2) return {e1_buffer, nullptr};
  embed_piece(hp, e.embT + D + j0, e.m, ld, w, e2_buffer);
  return {e1_buffer, e2_buffer};
}

// Where the backward writes de1 (de2) of a piece: the gradient tensor's row (RowsE) or a stack buffer
// that embedding_grads then reduces (EmbeddedE).
template <typename scalar_t>
HYPERKERN_INLINE scalar_t* de_target(const RowsE<scalar_t>& e, bool second, int64_t row, at::opmath_type<scalar_t>*) {
  return (second ? e.grad_e2 : e.grad_e1) + row;
}
template <typename scalar_t>
HYPERKERN_INLINE at::opmath_type<scalar_t>* de_target(const EmbeddedE<scalar_t>&, bool, int64_t,
                                                     at::opmath_type<scalar_t>* buffer) {
  return buffer;
}
// Stores v at *p in p's type (the storage dtype, or the compute type of a stack buffer).
template <typename P, typename V>
HYPERKERN_INLINE void store(P* p, V v) {
  *p = narrow_to<P>(v);
}

// RowsE: de1 / de2 are already in their tensors. EmbeddedE: reduce the piece's de1 / de2 (row i,
// columns j0 .. j0+w-1, of a task with partial offset `slice` (its (k, row chunk) slice) and column
// chunk cc) into d(embedding)[j, p] += de[j] * hp[i, p] and d(hparams)[i, p] += sum_j de[j] * emb[j, p].
template <typename scalar_t>
HYPERKERN_INLINE void embedding_grads(const RowsE<scalar_t>&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                      int64_t, const at::opmath_type<scalar_t>*, const at::opmath_type<scalar_t>*) {}
// One p of embedding_grads, one loop over the piece: d(embedding) rows += hpv * de, and (DHP) the dot
// product of de with the embedding's column p, returned.
template <bool E2, bool DHP, typename opmath_t>
HYPERKERN_INLINE opmath_t embedding_grads_p(opmath_t hpv, const opmath_t* __restrict__ de1,
                                            const opmath_t* __restrict__ de2, opmath_t* __restrict__ demb1,
                                            opmath_t* __restrict__ demb2, const opmath_t* __restrict__ emb1,
                                            const opmath_t* __restrict__ emb2, int64_t w) {
  opmath_t dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < w; ++j) {
    const opmath_t a = de1[j];
    demb1[j] += hpv * a;
    if (DHP) dot += a * emb1[j];
    if (E2) {
      const opmath_t b = de2[j];
      demb2[j] += hpv * b;
      if (DHP) dot += b * emb2[j];
    }
  }
  return dot;
}

template <typename scalar_t>
HYPERKERN_INLINE void embedding_grads(const EmbeddedE<scalar_t>& e, int64_t i, int64_t N, int64_t D, int64_t slice,
                                      int64_t cc, int64_t j0, int64_t w, const at::opmath_type<scalar_t>* de1,
                                      const at::opmath_type<scalar_t>* de2) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t ld = e.has_e2 ? 2 * D : D;
  const scalar_t* hp = e.hp + i * e.m;
  opmath_t* dhp = e.dhp_partial != nullptr ? e.dhp_partial + (cc * N + i) * e.m : nullptr;
  for (int64_t p = 0; p < e.m; ++p) {
    const opmath_t hpv = widen(hp[p]);
    opmath_t* demb1 = e.demb1_partial + (slice * e.m + p) * D + j0;
    opmath_t* demb2 = de2 != nullptr ? e.demb2_partial + (slice * e.m + p) * D + j0 : nullptr;
    const opmath_t* emb1 = e.embT + p * ld + j0;
    const opmath_t* emb2 = e.has_e2 ? emb1 + D : nullptr;
    if (de2 != nullptr && dhp != nullptr) {
      dhp[p] += embedding_grads_p<true, true>(hpv, de1, de2, demb1, demb2, emb1, emb2, w);
    } else if (de2 != nullptr) {
      embedding_grads_p<true, false>(hpv, de1, de2, demb1, demb2, emb1, emb2, w);
    } else if (dhp != nullptr) {
      dhp[p] += embedding_grads_p<false, true>(hpv, de1, de2, demb1, demb2, emb1, emb2, w);
    } else {
      embedding_grads_p<false, false>(hpv, de1, de2, demb1, demb2, emb1, emb2, w);
    }
  }
}

// y = y * s_k + v_k * e1 * h + bias_k + delta_bias_k * e2   (bias, delta_bias / e2 may be null);
// e1, e2 from Src (RowsE or EmbeddedE).
template <typename scalar_t, typename Src>
struct HyperEpilogueArgs {
  scalar_t* y;
  const scalar_t *h, *s, *v, *bias, *delta_bias;
  Src e;
  int64_t D, B;
};
template <typename scalar_t>
using HyperEpilogueRowsArgs = HyperEpilogueArgs<scalar_t, RowsE<scalar_t>>;
template <typename scalar_t>
using HyperEpilogueEmbeddedArgs = HyperEpilogueArgs<scalar_t, EmbeddedE<scalar_t>>;
// The EmbeddedE kernels have a second form for the usual hyperparameter counts, m = 1 .. kMaxFusedM,
// with m a compile-time constant: e1, e2 of a column are summed in registers inside the one loop
// over the row (m FMAs each, no stack buffer written and read back per piece), and the backward
// takes d(embedding) a tile of rows at a time. Other m take the loops above (e_piece, embedding_grads).
constexpr int kMaxFusedM = 8;
// Calls f(std::integral_constant<int, M>()) with M = m when 1 <= m <= kMaxFusedM; false otherwise. f
// must be a HYPERKERN_INLINE_LAMBDA, so that its body is compiled into the caller's ISA clone.
template <class F>
HYPERKERN_INLINE bool with_fused_m(int64_t m, const F& f) {
  switch (m) {
    case 1: f(std::integral_constant<int, 1>()); return true;
    case 2: f(std::integral_constant<int, 2>()); return true;
    case 3: f(std::integral_constant<int, 3>()); return true;
    case 4: f(std::integral_constant<int, 4>()); return true;
    case 5: f(std::integral_constant<int, 5>()); return true;
    case 6: f(std::integral_constant<int, 6>()); return true;
    case 7: f(std::integral_constant<int, 7>()); return true;
    case 8: f(std::integral_constant<int, 8>()); return true;
    default: return false;
  }
}
// sum_p hv[p] * emb[p * ld + j]: one column of e1 (emb = embT) or e2 (emb = embT + out).
template <int M, typename opmath_t>
HYPERKERN_INLINE opmath_t embed_column(const opmath_t* hv, const opmath_t* emb, int64_t ld, int64_t j) {
  opmath_t out = hv[0] * emb[j];
  for (int p = 1; p < M; ++p) out += hv[p] * emb[p * ld + j];
  return out;
}
// Row i's hyperparameters hp[i, :] in the compute type.
template <int M, typename scalar_t>
HYPERKERN_INLINE void load_hparams(const EmbeddedE<scalar_t>& e, int64_t i, at::opmath_type<scalar_t>* hv) {
  for (int p = 0; p < M; ++p) hv[p] = widen(e.hp[i * M + p]);
}

template <int M, bool E2, bool BIAS, typename scalar_t>
HYPERKERN_INLINE void hyper_epilogue_fused(const HyperEpilogueEmbeddedArgs<scalar_t>& a, int64_t i0, int64_t i1) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t D = a.D, ld = E2 ? 2 * D : D;
  const opmath_t *emb1 = a.e.embT, *emb2 = a.e.embT + D;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t row = i * D, mem = (i / a.B) * D;
    opmath_t hv[M];
    load_hparams<M>(a.e, i, hv);
    scalar_t* y = a.y + row;
    const scalar_t *h = a.h + row, *s = a.s + mem, *v = a.v + mem;
    const scalar_t* b = BIAS ? a.bias + mem : nullptr;
    const scalar_t* db = E2 ? a.delta_bias + mem : nullptr;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) {
      opmath_t out = widen(y[j]) * widen(s[j]) + widen(v[j]) * embed_column<M>(hv, emb1, ld, j) * widen(h[j]);
      if constexpr (BIAS) out += widen(b[j]);
      if constexpr (E2) out += widen(db[j]) * embed_column<M>(hv, emb2, ld, j);
      y[j] = narrow_to<scalar_t>(out);
    }
  }
}

template <typename scalar_t, typename Src>
HYPERKERN_INLINE void hyper_epilogue_body(const HyperEpilogueArgs<scalar_t, Src>& a, int64_t i0, int64_t i1) {
  using opmath_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<Src, EmbeddedE<scalar_t>>) {
    const bool e2 = a.e.has_e2, bias = a.bias != nullptr;
    if (with_fused_m(a.e.m, [&](auto m) HYPERKERN_INLINE_LAMBDA {
          constexpr int M = decltype(m)::value;
          if (e2 && bias) hyper_epilogue_fused<M, true, true>(a, i0, i1);
          else if (e2) hyper_epilogue_fused<M, true, false>(a, i0, i1);
          else if (bias) hyper_epilogue_fused<M, false, true>(a, i0, i1);
          else hyper_epilogue_fused<M, false, false>(a, i0, i1);
        })) {
      return;
    }
  }
  const int64_t piece = e_piece_width(a.e, a.D);
  opmath_t e1_buffer[kEPiece], e2_buffer[kEPiece];
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t j0 = 0; j0 < a.D; j0 += piece) {
      const int64_t width = std::min(piece, a.D - j0);
      const int64_t row = i * a.D + j0, mem = (i / a.B) * a.D + j0;
      auto [e1, e2] = e_piece(a.e, i, a.D, j0, width, e1_buffer, e2_buffer);
      scalar_t* y = a.y + row;
      const scalar_t *h = a.h + row, *s = a.s + mem, *v = a.v + mem;
      const scalar_t* b = a.bias != nullptr ? a.bias + mem : nullptr;
      const scalar_t* db = a.delta_bias != nullptr ? a.delta_bias + mem : nullptr;
      if (b != nullptr && db != nullptr) {
#pragma omp simd
        for (int64_t j = 0; j < width; ++j)
          y[j] = narrow_to<scalar_t>(widen(y[j]) * widen(s[j]) + widen(v[j]) * widen(e1[j]) * widen(h[j]) +
                                       widen(b[j]) + widen(db[j]) * widen(e2[j]));
      } else if (b != nullptr) {
#pragma omp simd
        for (int64_t j = 0; j < width; ++j)
          y[j] = narrow_to<scalar_t>(widen(y[j]) * widen(s[j]) + widen(v[j]) * widen(e1[j]) * widen(h[j]) +
                                       widen(b[j]));
      } else if (db != nullptr) {
#pragma omp simd
        for (int64_t j = 0; j < width; ++j)
          y[j] = narrow_to<scalar_t>(widen(y[j]) * widen(s[j]) + widen(v[j]) * widen(e1[j]) * widen(h[j]) +
                                       widen(db[j]) * widen(e2[j]));
      } else {
#pragma omp simd
        for (int64_t j = 0; j < width; ++j)
          y[j] = narrow_to<scalar_t>(widen(y[j]) * widen(s[j]) + widen(v[j]) * widen(e1[j]) * widen(h[j]));
      }
    }
  }
}
HYPERKERN_ROW_KERNEL(hyper_epilogue, HyperEpilogueRowsArgs)
HYPERKERN_ROW_KERNEL(hyper_epilogue, HyperEpilogueEmbeddedArgs)

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
    int64_t k, row_begin, row_end, col_begin, col_end, partial_offset, col_chunk;
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
    out.col_chunk = cc;
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

#define HYPERKERN_TASK_KERNEL(name, Args)                                                                        \
  HYPERKERN_CPU_CLONES void name(const Args<float>& a, const MemberTiling::Task& t) { name##_body(a, t); }       \
  HYPERKERN_CPU_CLONES void name(const Args<double>& a, const MemberTiling::Task& t) { name##_body(a, t); }      \
  HYPERKERN_CPU_CLONES void name(const Args<c10::BFloat16>& a, const MemberTiling::Task& t) { name##_body(a, t); } \
  template <typename T>                                                                                         \
  void name(const Args<T>& a, const MemberTiling::Task& t) {                                                    \
    name##_body(a, t);                                                                                          \
  }

// The batch_ensemble_linear backward's pass over g: g_scaled = g * s_k (if g_scaled) and the member
// column sums of g into db_partial (if db_partial).
template <typename scalar_t>
struct BatchEnsembleGradArgs {
  const scalar_t* g;
  const scalar_t* s;
  scalar_t* g_scaled;
  at::opmath_type<scalar_t>* db_partial;
  int64_t D;
};
template <typename scalar_t>
HYPERKERN_INLINE void batch_ensemble_grad_body(const BatchEnsembleGradArgs<scalar_t>& a, const MemberTiling::Task& t) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t c0 = t.col_begin, width = t.col_end - t.col_begin;
  const scalar_t* sk = a.s + t.k * a.D + c0;
  opmath_t* db = a.db_partial != nullptr ? a.db_partial + t.partial_offset + c0 : nullptr;
  for (int64_t i = t.row_begin; i < t.row_end; ++i) {
    const scalar_t* g = a.g + i * a.D + c0;
    if (a.g_scaled != nullptr) {
      scalar_t* out = a.g_scaled + i * a.D + c0;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) out[j] = narrow_to<scalar_t>(widen(g[j]) * widen(sk[j]));
    }
    if (db != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) db[j] += widen(g[j]);
    }
  }
}
HYPERKERN_TASK_KERNEL(batch_ensemble_grad, BatchEnsembleGradArgs)

// The hyper backward's pass over g: g_s = g * s_k (if g_s), g_ve = g * v_k * e1, de1 = g * v_k * h,
// de2 = g * delta_bias_k (if delta_bias), and the member column sums dv += g * e1 * h, db += g
// (if db_partial), ddb += g * e2 (if delta_bias). e1, e2 come from Src; de1, de2 go where Src says
// (RowsE: the gradient tensors; EmbeddedE: reduced at once into d(embedding) and d(hparams)).
template <typename scalar_t, typename Src>
struct HyperGradArgs {
  const scalar_t *g, *s, *v, *h, *delta_bias;
  Src e;
  scalar_t *g_s, *g_ve;
  at::opmath_type<scalar_t> *dv_partial, *db_partial, *ddb_partial;
  int64_t D, N;
};
template <typename scalar_t>
using HyperGradRowsArgs = HyperGradArgs<scalar_t, RowsE<scalar_t>>;
template <typename scalar_t>
using HyperGradEmbeddedArgs = HyperGradArgs<scalar_t, EmbeddedE<scalar_t>>;
// The EmbeddedE pass over g with m = M known at compile time: one loop over a row's columns computes
// e1 in registers, g_ve, dv and the row's de1 into a tile of kGradTileRows rows; d(hparams) are dot
// products with M x kDotLanes independent accumulators, and d(embedding)'s partials take the whole
// tile in one read-modify-write per p (a rank-kGradTileRows update) instead of one per row and p.
// e2 is never formed: de2 = g * delta_bias_k, so with Ghp[p, j] = sum over the task's rows of
// hp[i, p] * g[i, j] (all rows of one member),
//   d(embedding_e2)[j, p] += delta_bias_k[j] * Ghp[p, j],  d(delta_bias)_k[j] += sum_p emb2[p, j] * Ghp[p, j]
// and d(hparams)[i, p] takes g[i, :] . (delta_bias_k * emb2[p, :]).
constexpr int64_t kGradTileRows = 4;
constexpr int64_t kGradTileCols = 512;  // >= MemberTiling's cols_per_chunk
constexpr int64_t kDotLanes = 8;
// dots[p] += sum over j < w of a[j] * b1[p * ld + j] (+ c[j] * b2[p * kGradTileCols + j] when TWO).
template <int M, bool TWO, typename opmath_t, typename C>
HYPERKERN_INLINE void dot_rows(const opmath_t* a, const opmath_t* b1, int64_t ld, const C* c, const opmath_t* b2,
                               int64_t w, opmath_t* dots) {
  // M x kDotLanes independent accumulators: one chain per p would wait on its FMA latency.
  opmath_t acc[M][kDotLanes] = {};
  int64_t j0 = 0;
  for (; j0 + kDotLanes <= w; j0 += kDotLanes) {
    for (int p = 0; p < M; ++p) {
      const opmath_t *b1p = b1 + p * ld + j0, *b2p = TWO ? b2 + p * kGradTileCols + j0 : nullptr;
#pragma omp simd
      for (int64_t l = 0; l < kDotLanes; ++l) {
        acc[p][l] += a[j0 + l] * b1p[l];
        if constexpr (TWO) acc[p][l] += widen(c[j0 + l]) * b2p[l];
      }
    }
  }
  for (int p = 0; p < M; ++p) {
    opmath_t dot = 0;
    for (int64_t l = 0; l < kDotLanes; ++l) dot += acc[p][l];
    for (int64_t j = j0; j < w; ++j) {
      dot += a[j] * b1[p * ld + j];
      if constexpr (TWO) dot += widen(c[j]) * b2[p * kGradTileCols + j];
    }
    dots[p] += dot;
  }
}
template <int M, bool E2, typename scalar_t>
HYPERKERN_INLINE void hyper_grad_fused(const HyperGradEmbeddedArgs<scalar_t>& a, const MemberTiling::Task& t) {
  using opmath_t = at::opmath_type<scalar_t>;
  const EmbeddedE<scalar_t>& e = a.e;
  const int64_t D = a.D, c0 = t.col_begin, w = t.col_end - t.col_begin, ld = E2 ? 2 * D : D;
  const int64_t slice = t.partial_offset / std::max<int64_t>(D, 1), mem = t.k * D + c0;
  const scalar_t *vk = a.v + mem, *sk = a.s + mem, *dbk = E2 ? a.delta_bias + mem : nullptr;
  opmath_t* dv = a.dv_partial + t.partial_offset + c0;
  opmath_t* db = a.db_partial != nullptr ? a.db_partial + t.partial_offset + c0 : nullptr;
  const opmath_t *emb1 = e.embT + c0, *emb2 = e.embT + D + c0;
  constexpr int64_t kE2Rows = E2 ? M : 1, kE2Cols = E2 ? kGradTileCols : 1;
  alignas(64) opmath_t de1_tile[kGradTileRows][kGradTileCols];
  alignas(64) opmath_t ghp[kE2Rows][kE2Cols];   // Ghp (E2)
  alignas(64) opmath_t db_emb2[kE2Rows][kE2Cols];  // delta_bias_k * emb2[p, :] (E2 with d(hparams))
  if constexpr (E2) {
    for (int p = 0; p < M; ++p) {
      std::fill_n(ghp[p], w, opmath_t(0));
      if (e.dhp_partial != nullptr) {
        for (int64_t j = 0; j < w; ++j) db_emb2[p][j] = widen(dbk[j]) * emb2[p * ld + j];
      }
    }
  }
  for (int64_t i0 = t.row_begin; i0 < t.row_end; i0 += kGradTileRows) {
    const int64_t rows = std::min(kGradTileRows, t.row_end - i0);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r, row = i * D + c0;
      opmath_t hv[M];
      load_hparams<M>(e, i, hv);
      const scalar_t *g = a.g + row, *h = a.h + row;
      scalar_t* g_ve = a.g_ve + row;
      opmath_t* de1 = de1_tile[r];
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) {
        const opmath_t gv = widen(g[j]), vv = widen(vk[j]), hv_j = widen(h[j]);
        const opmath_t e1v = embed_column<M>(hv, emb1, ld, j);
        g_ve[j] = narrow_to<scalar_t>(gv * vv * e1v);
        de1[j] = gv * vv * hv_j;
        dv[j] += gv * e1v * hv_j;
      }
      if (a.g_s != nullptr) {
        scalar_t* g_s = a.g_s + row;
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) g_s[j] = narrow_to<scalar_t>(widen(g[j]) * widen(sk[j]));
      }
      if (db != nullptr) {
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) db[j] += widen(g[j]);
      }
      if (e.dhp_partial != nullptr) {  // d(hparams)[i, p] = de1 . emb1[p] + g . (delta_bias_k * emb2[p])
        dot_rows<M, E2>(de1, emb1, ld, g, &db_emb2[0][0], w, e.dhp_partial + (t.col_chunk * a.N + i) * M);
      }
    }
    // d(embedding_e1)[j, p] += sum over the tile's rows of hp[i, p] * de1[i, j]; Ghp likewise with g
    const scalar_t* g0 = a.g + i0 * D + c0;
    for (int p = 0; p < M; ++p) {
      opmath_t hb[kGradTileRows];
      for (int64_t r = 0; r < kGradTileRows; ++r) hb[r] = r < rows ? widen(e.hp[(i0 + r) * M + p]) : opmath_t(0);
      opmath_t* d1 = e.demb1_partial + (slice * M + p) * D + c0;
      opmath_t* gp = ghp[E2 ? p : 0];
      if (rows == kGradTileRows) {
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) {
          opmath_t acc = d1[j];
          for (int64_t r = 0; r < kGradTileRows; ++r) acc += hb[r] * de1_tile[r][j];
          d1[j] = acc;
          if constexpr (E2) {
            opmath_t acc2 = gp[j];
            for (int64_t r = 0; r < kGradTileRows; ++r) acc2 += hb[r] * widen(g0[r * D + j]);
            gp[j] = acc2;
          }
        }
      } else {  // the task's last, partial tile: its rows only (the rest of the tile is stale)
        for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) {
            d1[j] += hb[r] * de1_tile[r][j];
            if constexpr (E2) gp[j] += hb[r] * widen(g0[r * D + j]);
          }
        }
      }
    }
  }
  if constexpr (E2) {  // the task's rows are all of one member: apply delta_bias_k and emb2 once
    opmath_t* ddb = a.ddb_partial + t.partial_offset + c0;
    for (int p = 0; p < M; ++p) {
      opmath_t* d2 = e.demb2_partial + (slice * M + p) * D + c0;
      const opmath_t *gp = ghp[p], *e2p = emb2 + p * ld;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) {
        d2[j] += widen(dbk[j]) * gp[j];
        ddb[j] += e2p[j] * gp[j];
      }
    }
  }
}

template <typename scalar_t, typename Src>
HYPERKERN_INLINE void hyper_grad_body(const HyperGradArgs<scalar_t, Src>& a, const MemberTiling::Task& t) {
  using opmath_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<Src, EmbeddedE<scalar_t>>) {
    if (t.col_end - t.col_begin <= kGradTileCols && with_fused_m(a.e.m, [&](auto m) HYPERKERN_INLINE_LAMBDA {
          constexpr int M = decltype(m)::value;
          if (a.e.has_e2) hyper_grad_fused<M, true>(a, t);
          else hyper_grad_fused<M, false>(a, t);
        })) {
      return;
    }
  }
  const int64_t piece = e_piece_width(a.e, a.D), slice = t.partial_offset / std::max<int64_t>(a.D, 1);
  opmath_t e1_buffer[kEPiece], e2_buffer[kEPiece], de1_buffer[kEPiece], de2_buffer[kEPiece];
  for (int64_t i = t.row_begin; i < t.row_end; ++i) {
    for (int64_t j0 = t.col_begin; j0 < t.col_end; j0 += piece) {
      const int64_t width = std::min(piece, t.col_end - j0);
      const int64_t row = i * a.D + j0, mem = t.k * a.D + j0;
      auto [e1, e2] = e_piece(a.e, i, a.D, j0, width, e1_buffer, e2_buffer);
      const scalar_t *g = a.g + row, *h = a.h + row, *vk = a.v + mem;
      scalar_t* g_ve = a.g_ve + row;
      auto* de1 = de_target(a.e, false, row, de1_buffer);
      opmath_t* dv = a.dv_partial + t.partial_offset + j0;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const opmath_t gv = widen(g[j]), e1v = widen(e1[j]), hv = widen(h[j]), vv = widen(vk[j]);
        g_ve[j] = narrow_to<scalar_t>(gv * vv * e1v);
        store(de1 + j, gv * vv * hv);
        dv[j] += gv * e1v * hv;
      }
      if (a.g_s != nullptr) {
        scalar_t* g_s = a.g_s + row;
        const scalar_t* sk = a.s + mem;
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) g_s[j] = narrow_to<scalar_t>(widen(g[j]) * widen(sk[j]));
      }
      if (a.db_partial != nullptr) {
        opmath_t* db = a.db_partial + t.partial_offset + j0;
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) db[j] += widen(g[j]);
      }
      opmath_t* de2_piece = nullptr;
      if (a.ddb_partial != nullptr) {
        opmath_t* ddb = a.ddb_partial + t.partial_offset + j0;
        const scalar_t* dbk = a.delta_bias + mem;
        auto* de2 = de_target(a.e, true, row, de2_buffer);
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) {
          const opmath_t gv = widen(g[j]);
          store(de2 + j, gv * widen(dbk[j]));
          ddb[j] += gv * widen(e2[j]);
        }
        de2_piece = de2_buffer;
      }
      embedding_grads(a.e, i, a.N, a.D, slice, t.col_chunk, j0, width, de1_buffer, de2_piece);
    }
  }
}
HYPERKERN_TASK_KERNEL(hyper_grad, HyperGradRowsArgs)
HYPERKERN_TASK_KERNEL(hyper_grad, HyperGradEmbeddedArgs)

// The hyper backward's pass over the Delta side: dx = r_k * dx + u_k * bd (if dx), du += x * bd,
// then bd <- x * u_k (the dDelta GEMM's input).
template <typename scalar_t>
struct HyperDxArgs {
  const scalar_t *x, *r, *u;
  scalar_t *dx, *bd;
  at::opmath_type<scalar_t>* du_partial;
  int64_t D;
};
template <typename scalar_t>
HYPERKERN_INLINE void hyper_dx_body(const HyperDxArgs<scalar_t>& a, const MemberTiling::Task& t) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t c0 = t.col_begin, width = t.col_end - t.col_begin, mem = t.k * a.D + c0;
  opmath_t* du = a.du_partial + t.partial_offset + c0;
  const scalar_t *rk = a.r + mem, *uk = a.u + mem;
  for (int64_t i = t.row_begin; i < t.row_end; ++i) {
    const int64_t row = i * a.D + c0;
    const scalar_t* x = a.x + row;
    scalar_t* bd = a.bd + row;
    if (a.dx != nullptr) {
      scalar_t* dx = a.dx + row;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j)
        dx[j] = narrow_to<scalar_t>(widen(rk[j]) * widen(dx[j]) + widen(uk[j]) * widen(bd[j]));
    }
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      const opmath_t xv = widen(x[j]);
      du[j] += xv * widen(bd[j]);
      bd[j] = narrow_to<scalar_t>(xv * widen(uk[j]));
    }
  }
}
HYPERKERN_TASK_KERNEL(hyper_dx, HyperDxArgs)

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
  const bool tied = u.data_ptr() == r.data_ptr() && u.sizes() == r.sizes() && u.strides() == r.strides();
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

// The embedding weight transposed, (m, out or 2*out), in the compute type: what EmbeddedE reads.
Tensor transposed_embedding(const Tensor& embedding) {
  return embedding.to(at::toOpMathType(embedding.scalar_type())).t().contiguous();
}

std::tuple<Tensor, Tensor> hyper_batch_ensemble_linear_hp_cpu(
    const Tensor& x_in, const Tensor& weight_in, const Tensor& delta_in, const Tensor& r_in, const Tensor& s_in,
    const Tensor& u_in, const Tensor& v_in, const Tensor& hparams_in, const Tensor& embedding_in,
    const std::optional<Tensor>& bias_in, const std::optional<Tensor>& delta_bias_in) {
  const Dims d = rank1_linear::check_linear(x_in, weight_in, r_in, s_in);
  rank1_linear::check_optional(bias_in, x_in, d.E, d.out, "bias");
  const int64_t m =
      rank1_linear::check_hyper_embedding(d, x_in, delta_in, u_in, v_in, hparams_in, embedding_in, delta_bias_in);
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
  out.x = compute_grad_x ? at::empty({d.N, d.in}, opts) : at::empty({0}, opts);
  out.u = at::empty({d.E, d.in}, opts);
  out.delta = at::empty({d.out, d.in}, opts);
  Tensor delta_side = scratch(kDeltaSide, {d.N, d.in}, opts);
  if (d.out == 0) {
    delta_side.zero_();
    if (compute_grad_x) out.x.zero_();
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
                                     d.in};
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
  const Dims d = rank1_linear::check_linear(x_in, weight_in, r_in, s_in);
  const int64_t m =
      rank1_linear::check_hyper_embedding(d, x_in, delta_in, u_in, v_in, hparams_in, embedding_in, delta_bias_in);
  rank1_linear::check_backward_rows(d, x_in, grad_in, &delta_out_in);
  const Tensor hparams = hparams_in.contiguous(), delta_bias = contiguous_or_empty(delta_bias_in);
  const bool has_e2 = delta_bias.defined();
  const Tensor embT = transposed_embedding(embedding_in);
  const MemberTiling tiling(d.E, d.B, d.out);
  const auto acc_opts = x_in.options().dtype(at::toOpMathType(x_in.scalar_type()));
  Tensor demb1_partial = at::zeros({tiling.E * tiling.row_chunks, m, d.out}, acc_opts);
  Tensor demb2_partial = has_e2 ? at::zeros({tiling.E * tiling.row_chunks, m, d.out}, acc_opts) : Tensor();
  Tensor dhp_partial = compute_grad_hparams ? at::zeros({tiling.col_chunks, d.N, m}, acc_opts) : Tensor();
  const HyperGrads gr = hyper_backward(
      grad_in.contiguous(), x_in.contiguous(), weight_in.contiguous(), delta_in.contiguous(), r_in.contiguous(),
      s_in.contiguous(), u_in.contiguous(), v_in.contiguous(), delta_out_in.contiguous(), delta_bias, has_bias,
      compute_grad_x, d, tiling, [&](auto tag) {
        using scalar_t = decltype(tag);
        using opmath_t = at::opmath_type<scalar_t>;
        return EmbeddedE<scalar_t>{hparams.const_data_ptr<scalar_t>(),
                                   embT.const_data_ptr<opmath_t>(),
                                   m,
                                   has_e2,
                                   demb1_partial.data_ptr<opmath_t>(),
                                   has_e2 ? demb2_partial.data_ptr<opmath_t>() : nullptr,
                                   compute_grad_hparams ? dhp_partial.data_ptr<opmath_t>() : nullptr};
      });
  // (slices, m, out) partials -> (out, m) rows of d(embedding); e2's rows follow e1's.
  Tensor grad_embedding = demb1_partial.sum(0).t();
  if (has_e2) grad_embedding = at::cat({grad_embedding, demb2_partial.sum(0).t()}, 0);
  grad_embedding = grad_embedding.to(x_in.scalar_type()).contiguous();
  Tensor grad_hparams =
      compute_grad_hparams ? dhp_partial.sum(0).to(x_in.scalar_type()) : at::empty({0}, x_in.options());
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
