// The CPU kernels of the rank-1 ensemble linear ops (rank1_linear.cpp says what they compute): the
// argument structs, the loop bodies (*_body, always inlined) and the declarations of the kernels
// compiled for several ISAs. Which file defines which kernel:
//   rank1_linear.cpp               scale_rows, batch_ensemble_epilogue, batch_ensemble_grad, hyper_dx,
//                                  hyper_epilogue and hyper_grad with e1 / e2 rows (RowsE)
//   rank1_linear_hp_<dtype>.cpp    hyper_epilogue and hyper_grad with e(lambda) computed per row
//                                  (EmbeddedE), one file per dtype (float16 with float)
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../fused_m.h"
#include "../rank1_linear.h"
#include "cpu_util.h"

namespace hyperkern {
namespace linear_cpu {

using rank1_linear::present;

using cpu::narrow_to;
using cpu::widen;

// Elements of work per parallel chunk below which a pass stays on one thread.
constexpr int64_t kElementGrain = 1 << 14;


// ------------------------------------------------------------------------------------------------
// Row kernels: each processes rows [i0, i1) of a member-major (E*B, D) array. The *_body templates
// hold the loops; the kernel `name(args, i0, i1)` has float, double and bfloat16 overloads compiled for
// AVX-512 / AVX2 / baseline (function multiversioning) and a float16 one (computed in float, baseline
// ISA).
// HYPERKERN_ROW_KERNEL declares them, one overload per dtype the ops dispatch to (float16 is not
// cloned); every translation unit that calls them sees the declarations, and exactly one defines each
// overload (HYPERKERN_DEFINE_ROW_KERNEL_FOR, or HYPERKERN_DEFINE_ROW_KERNEL for all four). The kernels
// are spread over several files (rank1_linear.cpp, rank1_linear_hp_<dtype>.cpp) so they compile in
// parallel: the hp op's per-m kernels, cloned three times per dtype, made one file of 144 s.
#define HYPERKERN_ROW_KERNEL(name, Args)                                   \
  void name(const Args<float>& a, int64_t i0, int64_t i1);                               \
  void name(const Args<double>& a, int64_t i0, int64_t i1);                              \
  void name(const Args<c10::BFloat16>& a, int64_t i0, int64_t i1);                       \
  void name(const Args<c10::Half>& a, int64_t i0, int64_t i1);
#define HYPERKERN_DEFINE_ROW_KERNEL_FOR(name, Args, T, ATTR) \
  ATTR void name(const Args<T>& a, int64_t i0, int64_t i1) { name##_body(a, i0, i1); }
#define HYPERKERN_DEFINE_ROW_KERNEL(name, Args)                                        \
  HYPERKERN_DEFINE_ROW_KERNEL_FOR(name, Args, float, HYPERKERN_CPU_CLONES)          \
  HYPERKERN_DEFINE_ROW_KERNEL_FOR(name, Args, double, HYPERKERN_CPU_CLONES)         \
  HYPERKERN_DEFINE_ROW_KERNEL_FOR(name, Args, c10::BFloat16, HYPERKERN_CPU_CLONES)  \
  HYPERKERN_DEFINE_ROW_KERNEL_FOR(name, Args, c10::Half, )

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
// (kMaxFusedM and with_fused_m: ../fused_m.h)
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

// Declared and defined like the row kernels (HYPERKERN_ROW_KERNEL).
#define HYPERKERN_TASK_KERNEL(name, Args)                                                   \
  void name(const Args<float>& a, const MemberTiling::Task& t);                               \
  void name(const Args<double>& a, const MemberTiling::Task& t);                              \
  void name(const Args<c10::BFloat16>& a, const MemberTiling::Task& t);                       \
  void name(const Args<c10::Half>& a, const MemberTiling::Task& t);
#define HYPERKERN_DEFINE_TASK_KERNEL_FOR(name, Args, T, ATTR) \
  ATTR void name(const Args<T>& a, const MemberTiling::Task& t) { name##_body(a, t); }
#define HYPERKERN_DEFINE_TASK_KERNEL(name, Args)                                       \
  HYPERKERN_DEFINE_TASK_KERNEL_FOR(name, Args, float, HYPERKERN_CPU_CLONES)         \
  HYPERKERN_DEFINE_TASK_KERNEL_FOR(name, Args, double, HYPERKERN_CPU_CLONES)        \
  HYPERKERN_DEFINE_TASK_KERNEL_FOR(name, Args, c10::BFloat16, HYPERKERN_CPU_CLONES) \
  HYPERKERN_DEFINE_TASK_KERNEL_FOR(name, Args, c10::Half, )

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
// tied (u is r, both GEMMs accumulated into dx: dx holds P = (g * s_k) @ W + (g * v_k * e1) @ Delta):
// du += x * P (the sum of dr and du, dr subtracted by the caller), dx = r_k * P, bd <- x * u_k (bd is
// only written).
template <typename scalar_t>
struct HyperDxArgs {
  const scalar_t *x, *r, *u;
  scalar_t *dx, *bd;
  at::opmath_type<scalar_t>* du_partial;
  int64_t D;
  bool tied;
};
template <typename scalar_t>
HYPERKERN_INLINE void hyper_dx_body(const HyperDxArgs<scalar_t>& a, const MemberTiling::Task& t) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t c0 = t.col_begin, width = t.col_end - t.col_begin, mem = t.k * a.D + c0;
  opmath_t* du = a.du_partial + t.partial_offset + c0;
  const scalar_t *rk = a.r + mem, *uk = a.u + mem;
  if (a.tied) {
    for (int64_t i = t.row_begin; i < t.row_end; ++i) {
      const int64_t row = i * a.D + c0;
      const scalar_t* x = a.x + row;
      scalar_t *bd = a.bd + row, *dx = a.dx + row;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const opmath_t xv = widen(x[j]), pv = widen(dx[j]);
        du[j] += xv * pv;
        dx[j] = narrow_to<scalar_t>(widen(rk[j]) * pv);
        bd[j] = narrow_to<scalar_t>(xv * widen(uk[j]));
      }
    }
    return;
  }
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

}  // namespace linear_cpu
}  // namespace hyperkern
