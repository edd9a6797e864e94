// CUDA kernels of the rank-1 ensemble linear ops (BatchEnsemble and hyper-batch ensemble).
//
// Rows are member-major: x is (E*B, in) and rows k*B .. (k+1)*B-1 belong to member k.
// Same algorithm as csrc/cpu/rank1_linear.cpp (read its header for the formulas): cuBLAS (at::mm /
// at::bmm) for every GEMM, and these kernels around them:
//   scale_rows_kernel            x * r_k, x * u_k: the GEMM prologue, vectorised (16-byte accesses)
//   batch_ensemble_epilogue      y * s_k + b_k in place on the GEMM output, vectorised
//   hyper_epilogue               y * s_k + v_k * e1 * delta_out + b_k + delta_bias_k * e2
//   hyper_*_embedded             the same epilogue and pass over g for the hp op, e1 / e2 computed per
//                                element from hparams and the embedding (m = 1..8), which also
//                                reduce d(embedding) and d(hparams)
//   *_grad_pass / hyper_dx_pass  backward elementwise passes fused with the member-segmented
//                                column sums (db_k, dv_k, d(delta_bias)_k, du_k)
//   rank1_weight_grad_kernel     dW = sum_k (s_k r_k^T) * G_k, ds_k, dr_k from G_k = g_k^T x_k
// Column sums are written as per-block partials and summed by sum_partials_kernel: no atomics, so
// results are deterministic run to run. Reductions accumulate in float (double for double).
// Every kernel runs on the current stream of x's device.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "../fused_m.h"
#include "../rank1_linear.h"

namespace hyperkern {
namespace {

using at::Tensor;
using rank1_linear::Dims;
using rank1_linear::present;

constexpr int kThreads = 256;
constexpr int kTileCols = 32;  // columns per block in the segmented passes (one warp wide)
constexpr int kTileRows = 8;   // warps per block in the segmented passes
constexpr int kWeightRowsPerThread = 4;
constexpr int kWeightTileRows = kTileRows * kWeightRowsPerThread;  // 32 output rows per weight-pass block

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

int64_t grid_for(int64_t work) {
  return std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t(sm_count()) * 16));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// Elements per 16-byte pack when every pointer and the row width allow it, else 1.
template <typename scalar_t>
int pack_width(int64_t D, std::initializer_list<const void*> ptrs) {
  constexpr int vec = 16 / sizeof(scalar_t);
  if (D % vec != 0) return 1;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return 1;
  return vec;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// ---------------------------------------------------------------------------------------------
// Row-wise elementwise kernels (prologue / epilogues). Flat grid-stride loops over packs of VEC.

// out[i, :] = in[i, :] * scale[i / B, :]
template <typename scalar_t, int VEC>
__global__ void scale_rows_kernel(const scalar_t* __restrict__ in, const scalar_t* __restrict__ scale,
                                  scalar_t* __restrict__ out, int64_t N, int64_t D, int64_t B) {
  using opmath_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t Dp = D / VEC, total = N * Dp;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx / Dp, jp = idx - i * Dp;
    const P a = reinterpret_cast<const P*>(in)[idx];
    const P sc = reinterpret_cast<const P*>(scale)[(i / B) * Dp + jp];
    P o;
#pragma unroll
    for (int t = 0; t < VEC; ++t) o.v[t] = static_cast<scalar_t>(opmath_t(a.v[t]) * opmath_t(sc.v[t]));
    reinterpret_cast<P*>(out)[idx] = o;
  }
}

template <typename scalar_t>
void scale_rows(const Tensor& in, const Tensor& scale, Tensor& out, int64_t B) {
  const int64_t N = in.size(0), D = in.size(1);
  if (N * D == 0) return;
  const scalar_t* a = in.const_data_ptr<scalar_t>();
  const scalar_t* sc = scale.const_data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  auto stream = at::cuda::getCurrentCUDAStream();
  const int vec = pack_width<scalar_t>(D, {a, sc, o});
  if (vec == 16 / int(sizeof(scalar_t))) {
    constexpr int V = 16 / sizeof(scalar_t);
    scale_rows_kernel<scalar_t, V><<<grid_for(N * D / V), kThreads, 0, stream>>>(a, sc, o, N, D, B);
  } else {
    scale_rows_kernel<scalar_t, 1><<<grid_for(N * D), kThreads, 0, stream>>>(a, sc, o, N, D, B);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// y[i, :] = y[i, :] * s[k, :] + bias[k, :]   (bias may be null)
template <typename scalar_t, int VEC>
__global__ void batch_ensemble_epilogue_kernel(scalar_t* __restrict__ y, const scalar_t* __restrict__ s,
                                               const scalar_t* __restrict__ bias, int64_t N, int64_t D, int64_t B) {
  using opmath_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t Dp = D / VEC, total = N * Dp;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx / Dp, member = (i / B) * Dp + (idx - i * Dp);
    P yv = reinterpret_cast<const P*>(y)[idx];
    const P sv = reinterpret_cast<const P*>(s)[member];
    if (bias != nullptr) {
      const P bv = reinterpret_cast<const P*>(bias)[member];
#pragma unroll
      for (int t = 0; t < VEC; ++t)
        yv.v[t] = static_cast<scalar_t>(opmath_t(yv.v[t]) * opmath_t(sv.v[t]) + opmath_t(bv.v[t]));
    } else {
#pragma unroll
      for (int t = 0; t < VEC; ++t) yv.v[t] = static_cast<scalar_t>(opmath_t(yv.v[t]) * opmath_t(sv.v[t]));
    }
    reinterpret_cast<P*>(y)[idx] = yv;
  }
}

// y = y * s_k + v_k * e1 * h + bias_k + delta_bias_k * e2   (bias, delta_bias/e2 may be null)
template <typename scalar_t, int VEC>
__global__ void hyper_epilogue_kernel(scalar_t* __restrict__ y, const scalar_t* __restrict__ h,
                                      const scalar_t* __restrict__ s, const scalar_t* __restrict__ v,
                                      const scalar_t* __restrict__ e1, const scalar_t* __restrict__ bias,
                                      const scalar_t* __restrict__ delta_bias, const scalar_t* __restrict__ e2,
                                      int64_t N, int64_t D, int64_t B) {
  using opmath_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t Dp = D / VEC, total = N * Dp;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx / Dp, member = (i / B) * Dp + (idx - i * Dp);
    P yv = reinterpret_cast<const P*>(y)[idx];
    const P hv = reinterpret_cast<const P*>(h)[idx];
    const P e1v = reinterpret_cast<const P*>(e1)[idx];
    const P sv = reinterpret_cast<const P*>(s)[member];
    const P vv = reinterpret_cast<const P*>(v)[member];
    opmath_t acc[VEC];
#pragma unroll
    for (int t = 0; t < VEC; ++t)
      acc[t] = opmath_t(yv.v[t]) * opmath_t(sv.v[t]) + opmath_t(vv.v[t]) * opmath_t(e1v.v[t]) * opmath_t(hv.v[t]);
    if (bias != nullptr) {
      const P bv = reinterpret_cast<const P*>(bias)[member];
#pragma unroll
      for (int t = 0; t < VEC; ++t) acc[t] += opmath_t(bv.v[t]);
    }
    if (delta_bias != nullptr) {
      const P dbv = reinterpret_cast<const P*>(delta_bias)[member];
      const P e2v = reinterpret_cast<const P*>(e2)[idx];
#pragma unroll
      for (int t = 0; t < VEC; ++t) acc[t] += opmath_t(dbv.v[t]) * opmath_t(e2v.v[t]);
    }
#pragma unroll
    for (int t = 0; t < VEC; ++t) yv.v[t] = static_cast<scalar_t>(acc[t]);
    reinterpret_cast<P*>(y)[idx] = yv;
  }
}

// ---------------------------------------------------------------------------------------------
// Member-segmented passes: block (32, 8) covers 32 columns of one member's row range; lanes walk
// columns (coalesced), warps walk rows. grid = (ceil(D / 32), E * splits); each block writes its
// column sums to partial[(k * splits + split) * D + j], summed afterwards by sum_partials_kernel.

struct Segments {
  int64_t splits, rows_per_split, col_tiles;
};

Segments member_segments(int64_t E, int64_t B, int64_t D) {
  Segments sg;
  sg.col_tiles = std::max<int64_t>(1, ceil_div(D, kTileCols));
  const int64_t target_blocks = int64_t(sm_count()) * 4;
  int64_t splits = ceil_div(target_blocks, E * sg.col_tiles);
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, B / 32));
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, 65535 / E));
  sg.splits = std::max<int64_t>(1, splits);
  sg.rows_per_split = std::max<int64_t>(1, ceil_div(B, sg.splits));
  return sg;
}

struct SegmentCoords {
  int64_t j, k, split, row_begin, row_end;
};

__device__ __forceinline__ SegmentCoords segment_coords(int64_t B, int64_t splits, int64_t rows_per_split) {
  SegmentCoords c;
  c.j = int64_t(blockIdx.x) * kTileCols + threadIdx.x;
  c.k = blockIdx.y / splits;
  c.split = blockIdx.y - c.k * splits;
  const int64_t begin = c.split * rows_per_split, end = begin + rows_per_split;
  c.row_begin = c.k * B + (begin < B ? begin : B);
  c.row_end = c.k * B + (end < B ? end : B);
  return c;
}

// Sums the 8 warps' values of each column; thread row 0 stores the block's partial.
template <typename acc_t>
__device__ __forceinline__ void store_column_partial(acc_t value, acc_t (*shared)[kTileCols], acc_t* partial,
                                                     const SegmentCoords& c, int64_t splits, int64_t D) {
  shared[threadIdx.y][threadIdx.x] = value;
  __syncthreads();
  if (threadIdx.y == 0 && c.j < D) {
    acc_t total = 0;
#pragma unroll
    for (int w = 0; w < kTileRows; ++w) total += shared[w][threadIdx.x];
    partial[(c.k * splits + c.split) * D + c.j] = total;
  }
  __syncthreads();
}

// out[k, j] = sum_split partial[(k * splits + split) * D + j]
template <typename scalar_t, typename acc_t>
__global__ void sum_partials_kernel(const acc_t* __restrict__ partial, scalar_t* __restrict__ out, int64_t E,
                                    int64_t splits, int64_t D) {
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < E * D;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = idx / D, j = idx - k * D;
    acc_t total = 0;
    for (int64_t sp = 0; sp < splits; ++sp) total += partial[(k * splits + sp) * D + j];
    out[idx] = static_cast<scalar_t>(total);
  }
}

template <typename scalar_t, typename acc_t>
void sum_partials(const Tensor& partial, Tensor& out, int64_t E, int64_t splits, int64_t D) {
  if (E * D == 0) return;
  sum_partials_kernel<scalar_t, acc_t><<<grid_for(E * D), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      partial.const_data_ptr<acc_t>(), out.data_ptr<scalar_t>(), E, splits, D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// g_scaled = g * s_k (if g_scaled), db partial = column sums of g (if db_partial).
template <typename scalar_t>
__global__ void batch_ensemble_grad_pass_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ s,
                                                scalar_t* __restrict__ g_scaled,
                                                at::opmath_type<scalar_t>* __restrict__ db_partial, int64_t B,
                                                int64_t D, int64_t splits, int64_t rows_per_split) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t shared[kTileRows][kTileCols];
  const SegmentCoords c = segment_coords(B, splits, rows_per_split);
  opmath_t db = 0;
  if (c.j < D) {
    const opmath_t sk = opmath_t(s[c.k * D + c.j]);
    for (int64_t i = c.row_begin + threadIdx.y; i < c.row_end; i += kTileRows) {
      const opmath_t gv = opmath_t(g[i * D + c.j]);
      if (g_scaled != nullptr) g_scaled[i * D + c.j] = static_cast<scalar_t>(gv * sk);
      db += gv;
    }
  }
  if (db_partial != nullptr) store_column_partial(db, shared, db_partial, c, splits, D);
}

// The hyper op's pass over g (see the CPU file): g * s_k, g * v_k * e1, de1 = g * v_k * h,
// de2 = g * delta_bias_k, and the column sums of g, g * e1 * h, g * e2.
template <typename scalar_t>
__global__ void hyper_grad_pass_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ s,
                                       const scalar_t* __restrict__ v, const scalar_t* __restrict__ e1,
                                       const scalar_t* __restrict__ h, const scalar_t* __restrict__ delta_bias,
                                       const scalar_t* __restrict__ e2, scalar_t* __restrict__ g_s,
                                       scalar_t* __restrict__ g_ve, scalar_t* __restrict__ grad_e1,
                                       scalar_t* __restrict__ grad_e2, at::opmath_type<scalar_t>* __restrict__ dv_partial,
                                       at::opmath_type<scalar_t>* __restrict__ db_partial,
                                       at::opmath_type<scalar_t>* __restrict__ ddb_partial, int64_t B, int64_t D,
                                       int64_t splits, int64_t rows_per_split) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t shared[kTileRows][kTileCols];
  const SegmentCoords c = segment_coords(B, splits, rows_per_split);
  opmath_t dv = 0, db = 0, ddb = 0;
  if (c.j < D) {
    const int64_t m = c.k * D + c.j;
    const opmath_t sk = opmath_t(s[m]), vk = opmath_t(v[m]);
    const opmath_t dbk = delta_bias != nullptr ? opmath_t(delta_bias[m]) : opmath_t(0);
    for (int64_t i = c.row_begin + threadIdx.y; i < c.row_end; i += kTileRows) {
      const int64_t off = i * D + c.j;
      const opmath_t gv = opmath_t(g[off]), e1v = opmath_t(e1[off]), hv = opmath_t(h[off]);
      if (g_s != nullptr) g_s[off] = static_cast<scalar_t>(gv * sk);
      g_ve[off] = static_cast<scalar_t>(gv * vk * e1v);
      grad_e1[off] = static_cast<scalar_t>(gv * vk * hv);
      dv += gv * e1v * hv;
      db += gv;
      if (delta_bias != nullptr) {
        grad_e2[off] = static_cast<scalar_t>(gv * dbk);
        ddb += gv * opmath_t(e2[off]);
      }
    }
  }
  store_column_partial(dv, shared, dv_partial, c, splits, D);
  if (db_partial != nullptr) store_column_partial(db, shared, db_partial, c, splits, D);
  if (ddb_partial != nullptr) store_column_partial(ddb, shared, ddb_partial, c, splits, D);
}

// ---------------------------------------------------------------------------------------------
// hyper_batch_ensemble_linear_hp, m = 1..kMaxFusedM hyperparameters: e1 / e2 computed per element
// from the row's hparams (M values, the same address for every lane: one broadcast load) and embT,
// the embedding transposed to (M, out or 2*out) in the compute type (column j of e1 is embT[:, j],
// of e2 embT[:, out + j]). No (E*B, out) tensor of e1 / e2 or their gradients is made.
template <int M, typename opmath_t, typename scalar_t>
__device__ __forceinline__ void load_row(const scalar_t* __restrict__ hparams, int64_t i, opmath_t (&hv)[M]) {
#pragma unroll
  for (int p = 0; p < M; ++p) hv[p] = opmath_t(hparams[i * M + p]);
}

template <int M, typename opmath_t>
__device__ __forceinline__ opmath_t embed(const opmath_t (&hv)[M], const opmath_t* __restrict__ embT, int64_t ld,
                                          int64_t j) {
  opmath_t e = 0;
#pragma unroll
  for (int p = 0; p < M; ++p) e += hv[p] * embT[p * ld + j];
  return e;
}

// The hyper epilogue with e1 / e2 from hparams @ embedding^T (one element per thread).
template <typename scalar_t, int M>
__global__ void hyper_epilogue_embedded_kernel(scalar_t* __restrict__ y, const scalar_t* __restrict__ h,
                                               const scalar_t* __restrict__ s, const scalar_t* __restrict__ v,
                                               const scalar_t* __restrict__ hparams,
                                               const at::opmath_type<scalar_t>* __restrict__ embT,
                                               const scalar_t* __restrict__ bias,
                                               const scalar_t* __restrict__ delta_bias, int64_t N, int64_t D,
                                               int64_t B) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t ld = delta_bias != nullptr ? 2 * D : D;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < N * D;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx / D, j = idx - i * D, member = (i / B) * D + j;
    opmath_t hv[M];
    load_row<M>(hparams, i, hv);
    opmath_t acc = opmath_t(y[idx]) * opmath_t(s[member]) +
                   opmath_t(v[member]) * embed<M>(hv, embT, ld, j) * opmath_t(h[idx]);
    if (bias != nullptr) acc += opmath_t(bias[member]);
    if (delta_bias != nullptr) acc += opmath_t(delta_bias[member]) * embed<M>(hv, embT, ld, D + j);
    y[idx] = static_cast<scalar_t>(acc);
  }
}

// The hyper pass over g with e1 / e2 recomputed per row: g * s_k, g * v_k * e1, the column sums of g,
// g * e1 * h, g * e2 (as hyper_grad_pass_kernel), and, from de1 = g * v_k * h and de2 = g * delta_bias_k
// without storing them, the d(embedding) partials demb[p] = column sums of de1 * hparams[:, p] (and de2,
// the second half) laid out (M, E * splits, D) each, and d(hparams) partials: lane 0 of each warp writes
// dhp_partial[(blockIdx.x * N + i) * M + p] = sum over the block's 32 columns of
// de1 * embT[p, j] + de2 * embT[p, out + j] (summed over column tiles afterwards; null: not asked for).
// Every lane runs the row loop (the warp sums need all 32); lanes past D contribute zeros.
template <typename scalar_t, int M>
__global__ void hyper_grad_pass_embedded_kernel(
    const scalar_t* __restrict__ g, const scalar_t* __restrict__ s, const scalar_t* __restrict__ v,
    const scalar_t* __restrict__ h, const scalar_t* __restrict__ delta_bias, const scalar_t* __restrict__ hparams,
    const at::opmath_type<scalar_t>* __restrict__ embT, scalar_t* __restrict__ g_s, scalar_t* __restrict__ g_ve,
    at::opmath_type<scalar_t>* __restrict__ dv_partial, at::opmath_type<scalar_t>* __restrict__ db_partial,
    at::opmath_type<scalar_t>* __restrict__ ddb_partial, at::opmath_type<scalar_t>* __restrict__ demb1_partial,
    at::opmath_type<scalar_t>* __restrict__ demb2_partial, at::opmath_type<scalar_t>* __restrict__ dhp_partial,
    int64_t N, int64_t E, int64_t B, int64_t D, int64_t splits, int64_t rows_per_split) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t shared[kTileRows][kTileCols];
  const SegmentCoords c = segment_coords(B, splits, rows_per_split);
  const bool has_db = delta_bias != nullptr, in_range = c.j < D;
  const int64_t ld = has_db ? 2 * D : D;
  opmath_t emb1[M], emb2[M], demb1[M], demb2[M];
#pragma unroll
  for (int p = 0; p < M; ++p) {
    emb1[p] = in_range ? embT[p * ld + c.j] : opmath_t(0);
    emb2[p] = in_range && has_db ? embT[p * ld + D + c.j] : opmath_t(0);
    demb1[p] = demb2[p] = 0;
  }
  const int64_t m = c.k * D + c.j;
  const opmath_t sk = in_range ? opmath_t(s[m]) : opmath_t(0), vk = in_range ? opmath_t(v[m]) : opmath_t(0);
  const opmath_t dbk = in_range && has_db ? opmath_t(delta_bias[m]) : opmath_t(0);
  opmath_t dv = 0, db = 0, ddb = 0;
  for (int64_t i = c.row_begin + threadIdx.y; i < c.row_end; i += kTileRows) {
    opmath_t hv[M];
    load_row<M>(hparams, i, hv);
    opmath_t e1 = 0, e2 = 0;
#pragma unroll
    for (int p = 0; p < M; ++p) {
      e1 += hv[p] * emb1[p];
      e2 += hv[p] * emb2[p];
    }
    const int64_t off = i * D + c.j;
    const opmath_t gv = in_range ? opmath_t(g[off]) : opmath_t(0), hd = in_range ? opmath_t(h[off]) : opmath_t(0);
    if (in_range) {
      if (g_s != nullptr) g_s[off] = static_cast<scalar_t>(gv * sk);
      g_ve[off] = static_cast<scalar_t>(gv * vk * e1);
    }
    const opmath_t de1 = gv * vk * hd, de2 = gv * dbk;
    dv += gv * e1 * hd;
    db += gv;
    ddb += gv * e2;
#pragma unroll
    for (int p = 0; p < M; ++p) {
      demb1[p] += de1 * hv[p];
      demb2[p] += de2 * hv[p];
      if (dhp_partial != nullptr) {
        const opmath_t row = warp_sum(de1 * emb1[p] + de2 * emb2[p]);
        if (threadIdx.x == 0) dhp_partial[(int64_t(blockIdx.x) * N + i) * M + p] = row;
      }
    }
  }
  store_column_partial(dv, shared, dv_partial, c, splits, D);
  if (db_partial != nullptr) store_column_partial(db, shared, db_partial, c, splits, D);
  if (ddb_partial != nullptr) store_column_partial(ddb, shared, ddb_partial, c, splits, D);
  const int64_t plane = E * splits * D;
#pragma unroll
  for (int p = 0; p < M; ++p) {
    store_column_partial(demb1[p], shared, demb1_partial + p * plane, c, splits, D);
    if (has_db) store_column_partial(demb2[p], shared, demb2_partial + p * plane, c, splits, D);
  }
}

// dx = r_k * dx + u_k * bd (if dx), du partial = column sums of x * bd, then bd <- x * u_k.
template <typename scalar_t>
__global__ void hyper_dx_pass_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ r,
                                     const scalar_t* __restrict__ u, scalar_t* __restrict__ dx,
                                     scalar_t* __restrict__ bd, at::opmath_type<scalar_t>* __restrict__ du_partial,
                                     int64_t B, int64_t D, int64_t splits, int64_t rows_per_split) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t shared[kTileRows][kTileCols];
  const SegmentCoords c = segment_coords(B, splits, rows_per_split);
  opmath_t du = 0;
  if (c.j < D) {
    const int64_t m = c.k * D + c.j;
    const opmath_t rk = opmath_t(r[m]), uk = opmath_t(u[m]);
    for (int64_t i = c.row_begin + threadIdx.y; i < c.row_end; i += kTileRows) {
      const int64_t off = i * D + c.j;
      const opmath_t xv = opmath_t(x[off]), bv = opmath_t(bd[off]);
      if (dx != nullptr) dx[off] = static_cast<scalar_t>(rk * opmath_t(dx[off]) + uk * bv);
      du += xv * bv;
      bd[off] = static_cast<scalar_t>(xv * uk);
    }
  }
  store_column_partial(du, shared, du_partial, c, splits, D);
}

// dx[i, :] *= r[i / B, :]
template <typename scalar_t, int VEC>
__global__ void scale_rows_inplace_kernel(scalar_t* __restrict__ y, const scalar_t* __restrict__ scale, int64_t N,
                                          int64_t D, int64_t B) {
  using opmath_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t Dp = D / VEC, total = N * Dp;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx / Dp;
    P yv = reinterpret_cast<const P*>(y)[idx];
    const P sv = reinterpret_cast<const P*>(scale)[(i / B) * Dp + (idx - i * Dp)];
#pragma unroll
    for (int t = 0; t < VEC; ++t) yv.v[t] = static_cast<scalar_t>(opmath_t(yv.v[t]) * opmath_t(sv.v[t]));
    reinterpret_cast<P*>(y)[idx] = yv;
  }
}

// ---------------------------------------------------------------------------------------------
// Weight-sized pass. Block (32, 8) owns a tile of 32 columns x 32 output rows (4 rows per thread)
// and members k0 .. k0+kn-1 of G (kn, O, I):
//   dW[o, j] (+)= sum_k s_k[o] r_k[j] G_k[o, j]            kept in registers across members
//   ds partial[k, column tile, o] = sum_{j in tile} W G_k r_k    warp shuffle over the 32 lanes
//   dr partial[k, row tile, j]    = sum_{o in tile} W G_k s_k    shared memory over the 8 warps
template <typename scalar_t, typename acc_t>
__global__ void rank1_weight_grad_kernel(const acc_t* __restrict__ G, const scalar_t* __restrict__ W,
                                         const scalar_t* __restrict__ r, const scalar_t* __restrict__ s,
                                         acc_t* __restrict__ dW, acc_t* __restrict__ ds_partial,
                                         acc_t* __restrict__ dr_partial, int64_t O, int64_t I, int64_t k0,
                                         int64_t kn, bool accumulate) {
  __shared__ acc_t shared[kTileRows][kTileCols];
  const int64_t col_tiles = gridDim.x, row_tiles = gridDim.y;
  const int64_t j = int64_t(blockIdx.x) * kTileCols + threadIdx.x;
  const bool j_in = j < I;
  int64_t o[kWeightRowsPerThread];
  acc_t w[kWeightRowsPerThread], dw[kWeightRowsPerThread];
#pragma unroll
  for (int t = 0; t < kWeightRowsPerThread; ++t) {
    o[t] = int64_t(blockIdx.y) * kWeightTileRows + threadIdx.y + t * kTileRows;
    const bool in = j_in && o[t] < O;
    w[t] = in ? acc_t(W[o[t] * I + j]) : acc_t(0);
    dw[t] = (in && accumulate) ? dW[o[t] * I + j] : acc_t(0);
  }
  for (int64_t kk = 0; kk < kn; ++kk) {
    const int64_t k = k0 + kk;
    const acc_t rk = j_in ? acc_t(r[k * I + j]) : acc_t(0);
    acc_t dr = 0;
#pragma unroll
    for (int t = 0; t < kWeightRowsPerThread; ++t) {
      const bool row_in = o[t] < O;
      const acc_t sk = row_in ? acc_t(s[k * O + o[t]]) : acc_t(0);
      const acc_t gv = (row_in && j_in) ? G[(kk * O + o[t]) * I + j] : acc_t(0);
      dw[t] += sk * rk * gv;
      const acc_t wg = w[t] * gv;
      const acc_t row_part = warp_sum(wg * rk);
      if (threadIdx.x == 0 && row_in) ds_partial[(k * col_tiles + blockIdx.x) * O + o[t]] = row_part;
      dr += wg * sk;
    }
    shared[threadIdx.y][threadIdx.x] = dr;
    __syncthreads();
    if (threadIdx.y == 0 && j_in) {
      acc_t total = 0;
#pragma unroll
      for (int wi = 0; wi < kTileRows; ++wi) total += shared[wi][threadIdx.x];
      dr_partial[(k * row_tiles + blockIdx.y) * I + j] = total;
    }
    __syncthreads();
  }
#pragma unroll
  for (int t = 0; t < kWeightRowsPerThread; ++t)
    if (j_in && o[t] < O) dW[o[t] * I + j] = dw[t];
}

// G_k = g_k^T x_k per member (cuBLAS, accumulated and stored in float for half types), then the
// weight pass. Members go in groups so the G buffer stays under ~128 MiB of float.
std::tuple<Tensor, Tensor, Tensor> rank1_weight_grads(const Tensor& g, const Tensor& x, const Tensor& weight,
                                                     const Tensor& r, const Tensor& s, const Dims& d) {
  const auto dtype = x.scalar_type();
  const auto acc_dtype = at::toOpMathType(dtype);
  const auto acc_opts = x.options().dtype(acc_dtype);
  const int64_t O = d.out, I = d.in;
  Tensor dW = at::empty({O, I}, acc_opts);
  Tensor ds = at::empty({d.E, O}, x.options());
  Tensor dr = at::empty({d.E, I}, x.options());
  if (O == 0 || I == 0) {
    dW.zero_();
    ds.zero_();
    dr.zero_();
    return {dW.to(dtype), ds, dr};
  }
  const int64_t col_tiles = ceil_div(I, kTileCols), row_tiles = ceil_div(O, kWeightTileRows);
  TORCH_CHECK(row_tiles <= 65535, "hyperkern rank-1 linear (CUDA): out_features = ", O, " is too large");
  Tensor ds_partial = at::empty({d.E, col_tiles, O}, acc_opts);
  Tensor dr_partial = at::empty({d.E, row_tiles, I}, acc_opts);
  const int64_t group = std::max<int64_t>(1, std::min<int64_t>(d.E, (int64_t(1) << 25) / (O * I)));
  const Tensor g3 = g.view({d.E, d.B, O}), x3 = x.view({d.E, d.B, I});
  auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t k0 = 0; k0 < d.E; k0 += group) {
    const int64_t kn = std::min(group, d.E - k0);
    const Tensor gk = g3.narrow(0, k0, kn).transpose(1, 2), xk = x3.narrow(0, k0, kn);
    Tensor G;
    if (d.B == 0) {
      G = at::zeros({kn, O, I}, acc_opts);
    } else if (acc_dtype != dtype) {
      G = at::bmm(gk, xk, acc_dtype);  // half / bfloat16 inputs, float accumulation and output
    } else {
      G = at::bmm(gk, xk);
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "rank1_weight_grad_kernel", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      rank1_weight_grad_kernel<scalar_t, acc_t><<<dim3(col_tiles, row_tiles), dim3(kTileCols, kTileRows), 0, stream>>>(
          G.const_data_ptr<acc_t>(), weight.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(),
          s.const_data_ptr<scalar_t>(), dW.data_ptr<acc_t>(), ds_partial.data_ptr<acc_t>(),
          dr_partial.data_ptr<acc_t>(), O, I, k0, kn, k0 > 0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "rank1_weight_grad_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    sum_partials<scalar_t, acc_t>(ds_partial, ds, d.E, col_tiles, O);
    sum_partials<scalar_t, acc_t>(dr_partial, dr, d.E, row_tiles, I);
  });
  return {acc_dtype != dtype ? dW.to(dtype) : dW, ds, dr};
}

Tensor contiguous_or_empty(const std::optional<Tensor>& t) { return present(t) ? t->contiguous() : Tensor(); }

// ---------------------------------------------------------------------------------------------
// batch_ensemble_linear

Tensor batch_ensemble_linear_cuda(const Tensor& x_in, const Tensor& weight_in, const Tensor& r_in, const Tensor& s_in,
                                  const std::optional<Tensor>& bias_in) {
  const Dims d = rank1_linear::check_linear(x_in, weight_in, r_in, s_in);
  rank1_linear::check_optional(bias_in, x_in, d.E, d.out, "bias");
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), r = r_in.contiguous(), s = s_in.contiguous();
  const Tensor bias = contiguous_or_empty(bias_in);
  Tensor y = at::empty({d.N, d.out}, x.options());
  if (d.N == 0 || d.out == 0) return y;
  if (d.in == 0) {
    y.zero_();
  } else {
    Tensor x_scaled = at::empty_like(x);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_ensemble_linear_prologue",
                                    [&] { scale_rows<scalar_t>(x, r, x_scaled, d.B); });
    at::mm_out(y, x_scaled, weight.t());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_ensemble_linear_epilogue", [&] {
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    auto stream = at::cuda::getCurrentCUDAStream();
    if (pack_width<scalar_t>(d.out, {yp, sp, bp}) > 1) {
      constexpr int V = 16 / sizeof(scalar_t);
      batch_ensemble_epilogue_kernel<scalar_t, V>
          <<<grid_for(d.N * d.out / V), kThreads, 0, stream>>>(yp, sp, bp, d.N, d.out, d.B);
    } else {
      batch_ensemble_epilogue_kernel<scalar_t, 1>
          <<<grid_for(d.N * d.out), kThreads, 0, stream>>>(yp, sp, bp, d.N, d.out, d.B);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> batch_ensemble_linear_backward_cuda(
    const Tensor& grad_in, const Tensor& x_in, const Tensor& weight_in, const Tensor& r_in, const Tensor& s_in,
    bool has_bias, bool compute_grad_x) {
  const Dims d = rank1_linear::check_linear(x_in, weight_in, r_in, s_in);
  rank1_linear::check_backward_rows(d, x_in, grad_in);
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const Tensor g = grad_in.contiguous(), x = x_in.contiguous(), weight = weight_in.contiguous();
  const Tensor r = r_in.contiguous(), s = s_in.contiguous();
  const auto opts = x.options();
  const auto acc_opts = opts.dtype(at::toOpMathType(x.scalar_type()));
  auto stream = at::cuda::getCurrentCUDAStream();

  Tensor grad_bias = has_bias ? at::empty({d.E, d.out}, opts) : at::empty({0}, opts);
  Tensor g_scaled = compute_grad_x ? at::empty({d.N, d.out}, opts) : Tensor();
  if (has_bias && d.N * d.out == 0) grad_bias.zero_();
  if ((has_bias || compute_grad_x) && d.N * d.out > 0) {
    const Segments sg = member_segments(d.E, d.B, d.out);
    Tensor db_partial = has_bias ? at::empty({d.E, sg.splits, d.out}, acc_opts) : Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_ensemble_grad_pass", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      batch_ensemble_grad_pass_kernel<scalar_t>
          <<<dim3(sg.col_tiles, d.E * sg.splits), dim3(kTileCols, kTileRows), 0, stream>>>(
              g.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
              compute_grad_x ? g_scaled.data_ptr<scalar_t>() : nullptr,
              has_bias ? db_partial.data_ptr<acc_t>() : nullptr, d.B, d.out, sg.splits, sg.rows_per_split);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (has_bias) sum_partials<scalar_t, acc_t>(db_partial, grad_bias, d.E, sg.splits, d.out);
    });
  }

  Tensor grad_x = at::empty({0}, opts);
  if (compute_grad_x) {
    grad_x = at::empty({d.N, d.in}, opts);
    if (d.out == 0) {
      grad_x.zero_();
    } else if (d.N * d.in > 0) {
      at::mm_out(grad_x, g_scaled, weight);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_ensemble_dx", [&] {
        scalar_t* dx = grad_x.data_ptr<scalar_t>();
        const scalar_t* rp = r.const_data_ptr<scalar_t>();
        if (pack_width<scalar_t>(d.in, {dx, rp}) > 1) {
          constexpr int V = 16 / sizeof(scalar_t);
          scale_rows_inplace_kernel<scalar_t, V><<<grid_for(d.N * d.in / V), kThreads, 0, stream>>>(dx, rp, d.N, d.in,
                                                                                                  d.B);
        } else {
          scale_rows_inplace_kernel<scalar_t, 1><<<grid_for(d.N * d.in), kThreads, 0, stream>>>(dx, rp, d.N, d.in,
                                                                                              d.B);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  }
  g_scaled.reset();
  auto [grad_weight, grad_s, grad_r] = rank1_weight_grads(g, x, weight, r, s, d);
  return {grad_x, grad_weight, grad_r, grad_s, grad_bias};
}

// ---------------------------------------------------------------------------------------------
// hyper_batch_ensemble_linear

// The hyper forward's GEMMs on contiguous inputs: delta_out = (x * u_k) @ Delta^T, y = (x * r_k) @ W^T.
void hyper_forward_gemms(const Tensor& x, const Tensor& weight, const Tensor& delta, const Tensor& r, const Tensor& u,
                         const Dims& d, Tensor& y, Tensor& delta_out) {
  if (d.in == 0) {
    y.zero_();
    delta_out.zero_();
    return;
  }
  Tensor x_scaled = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hyper_linear_prologue_u",
                                  [&] { scale_rows<scalar_t>(x, u, x_scaled, d.B); });
  at::mm_out(delta_out, x_scaled, delta.t());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hyper_linear_prologue_r",
                                  [&] { scale_rows<scalar_t>(x, r, x_scaled, d.B); });
  at::mm_out(y, x_scaled, weight.t());
}

std::tuple<Tensor, Tensor> hyper_batch_ensemble_linear_cuda(
    const Tensor& x_in, const Tensor& weight_in, const Tensor& delta_in, const Tensor& r_in, const Tensor& s_in,
    const Tensor& u_in, const Tensor& v_in, const Tensor& e1_in, const std::optional<Tensor>& bias_in,
    const std::optional<Tensor>& delta_bias_in, const std::optional<Tensor>& e2_in) {
  const Dims d = rank1_linear::check_linear(x_in, weight_in, r_in, s_in);
  rank1_linear::check_optional(bias_in, x_in, d.E, d.out, "bias");
  rank1_linear::check_hyper(d, x_in, delta_in, u_in, v_in, e1_in, delta_bias_in, e2_in);
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), delta = delta_in.contiguous();
  const Tensor r = r_in.contiguous(), s = s_in.contiguous(), u = u_in.contiguous(), v = v_in.contiguous();
  const Tensor e1 = e1_in.contiguous();
  const Tensor bias = contiguous_or_empty(bias_in), delta_bias = contiguous_or_empty(delta_bias_in);
  const Tensor e2 = contiguous_or_empty(e2_in);
  Tensor y = at::empty({d.N, d.out}, x.options());
  Tensor delta_out = at::empty({d.N, d.out}, x.options());
  if (d.N == 0 || d.out == 0) return {y, delta_out};
  hyper_forward_gemms(x, weight, delta, r, u, d, y, delta_out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hyper_linear_epilogue", [&] {
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* hp = delta_out.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const scalar_t* e1p = e1.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* dbp = delta_bias.defined() ? delta_bias.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* e2p = e2.defined() ? e2.const_data_ptr<scalar_t>() : nullptr;
    auto stream = at::cuda::getCurrentCUDAStream();
    if (pack_width<scalar_t>(d.out, {yp, hp, sp, vp, e1p, bp, dbp, e2p}) > 1) {
      constexpr int V = 16 / sizeof(scalar_t);
      hyper_epilogue_kernel<scalar_t, V><<<grid_for(d.N * d.out / V), kThreads, 0, stream>>>(
          yp, hp, sp, vp, e1p, bp, dbp, e2p, d.N, d.out, d.B);
    } else {
      hyper_epilogue_kernel<scalar_t, 1><<<grid_for(d.N * d.out), kThreads, 0, stream>>>(
          yp, hp, sp, vp, e1p, bp, dbp, e2p, d.N, d.out, d.B);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, delta_out};
}

// What both hyper passes over g produce besides their own outputs: the bias, delta_bias and v gradients
// (zeros when there are no rows or columns) and the next GEMMs' operands g_s = g * s_k (when dx is
// wanted) and g_ve = g * v_k * e1.
struct HyperPassOutputs {
  Tensor bias, delta_bias, v, g_s, g_ve;
};

HyperPassOutputs hyper_pass_outputs(const Dims& d, const at::TensorOptions& opts, bool has_bias, bool has_delta_bias,
                                    bool compute_grad_x) {
  HyperPassOutputs o;
  o.bias = has_bias ? at::empty({d.E, d.out}, opts) : at::empty({0}, opts);
  o.delta_bias = has_delta_bias ? at::empty({d.E, d.out}, opts) : at::empty({0}, opts);
  o.v = at::empty({d.E, d.out}, opts);
  o.g_s = compute_grad_x ? at::empty({d.N, d.out}, opts) : Tensor();
  o.g_ve = at::empty({d.N, d.out}, opts);
  if (d.N * d.out == 0) {
    o.v.zero_();
    if (has_bias) o.bias.zero_();
    if (has_delta_bias) o.delta_bias.zero_();
  }
  return o;
}

// What both hyper backwards return besides the pass over g's sums: dx, dW, dDelta, dr, ds, du.
struct HyperRestGrads {
  Tensor x, weight, delta, r, s, u;
};

// The hyper backward after its pass over g, from g_s = g * s_k (when compute_grad_x) and g_ve = g * v_k * e1
// (both released here): B_d = g_ve @ Delta, dx = r_k * (g_s @ W) + u_k * B_d, du_k = colsum(x * B_d),
// dDelta = g_ve^T (x * u_k), and the weight side (dW, ds, dr) from G_k = g_k^T x_k.
HyperRestGrads hyper_backward_rest(const Tensor& g, const Tensor& x, const Tensor& weight, const Tensor& delta,
                                   const Tensor& r, const Tensor& s, const Tensor& u, const Dims& d, Tensor& g_s,
                                   Tensor& g_ve, bool compute_grad_x) {
  const auto opts = x.options();
  const auto acc_opts = opts.dtype(at::toOpMathType(x.scalar_type()));
  auto stream = at::cuda::getCurrentCUDAStream();
  Tensor grad_x = compute_grad_x ? at::empty({d.N, d.in}, opts) : at::empty({0}, opts);
  Tensor grad_u = at::empty({d.E, d.in}, opts);
  Tensor grad_delta = at::empty({d.out, d.in}, opts);
  Tensor delta_side = at::empty({d.N, d.in}, opts);
  if (d.out == 0) {
    delta_side.zero_();
    if (compute_grad_x) grad_x.zero_();
  } else if (d.N * d.in > 0) {
    at::mm_out(delta_side, g_ve, delta);
    if (compute_grad_x) at::mm_out(grad_x, g_s, weight);
  }
  g_s.reset();
  if (d.N * d.in == 0) {
    grad_u.zero_();
  } else {
    const Segments sg = member_segments(d.E, d.B, d.in);
    Tensor du_partial = at::empty({d.E, sg.splits, d.in}, acc_opts);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hyper_dx_pass", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      hyper_dx_pass_kernel<scalar_t><<<dim3(sg.col_tiles, d.E * sg.splits), dim3(kTileCols, kTileRows), 0, stream>>>(
          x.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(),
          compute_grad_x ? grad_x.data_ptr<scalar_t>() : nullptr, delta_side.data_ptr<scalar_t>(),
          du_partial.data_ptr<acc_t>(), d.B, d.in, sg.splits, sg.rows_per_split);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sum_partials<scalar_t, acc_t>(du_partial, grad_u, d.E, sg.splits, d.in);
    });
  }
  if (d.N == 0) {
    grad_delta.zero_();
  } else if (grad_delta.numel() > 0) {
    at::mm_out(grad_delta, g_ve.t(), delta_side);  // dDelta = (g * v_k * e1)^T (x * u_k)
  }
  delta_side.reset();
  g_ve.reset();

  auto [grad_weight, grad_s, grad_r] = rank1_weight_grads(g, x, weight, r, s, d);
  return {grad_x, grad_weight, grad_delta, grad_r, grad_s, grad_u};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
hyper_batch_ensemble_linear_backward_cuda(const Tensor& grad_in, const Tensor& x_in, const Tensor& weight_in,
                                          const Tensor& delta_in, const Tensor& r_in, const Tensor& s_in,
                                          const Tensor& u_in, const Tensor& v_in, const Tensor& e1_in,
                                          const std::optional<Tensor>& delta_bias_in,
                                          const std::optional<Tensor>& e2_in, const Tensor& delta_out_in,
                                          bool has_bias, bool compute_grad_x) {
  const Dims d = rank1_linear::check_linear(x_in, weight_in, r_in, s_in);
  rank1_linear::check_hyper(d, x_in, delta_in, u_in, v_in, e1_in, delta_bias_in, e2_in);
  rank1_linear::check_backward_rows(d, x_in, grad_in, &delta_out_in);
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const Tensor g = grad_in.contiguous(), x = x_in.contiguous(), weight = weight_in.contiguous();
  const Tensor delta = delta_in.contiguous(), r = r_in.contiguous(), s = s_in.contiguous();
  const Tensor u = u_in.contiguous(), v = v_in.contiguous(), e1 = e1_in.contiguous();
  const Tensor delta_bias = contiguous_or_empty(delta_bias_in), e2 = contiguous_or_empty(e2_in);
  const Tensor h = delta_out_in.contiguous();
  const bool has_delta_bias = delta_bias.defined();
  const auto opts = x.options();
  const auto acc_opts = opts.dtype(at::toOpMathType(x.scalar_type()));
  auto stream = at::cuda::getCurrentCUDAStream();

  HyperPassOutputs pass = hyper_pass_outputs(d, opts, has_bias, has_delta_bias, compute_grad_x);
  Tensor &grad_bias = pass.bias, &grad_delta_bias = pass.delta_bias, &grad_v = pass.v;
  Tensor &g_s = pass.g_s, &g_ve = pass.g_ve;
  Tensor grad_e2 = has_delta_bias ? at::empty({d.N, d.out}, opts) : at::empty({0}, opts);
  Tensor grad_e1 = at::empty({d.N, d.out}, opts);
  if (d.N * d.out > 0) {
    const Segments sg = member_segments(d.E, d.B, d.out);
    Tensor dv_partial = at::empty({d.E, sg.splits, d.out}, acc_opts);
    Tensor db_partial = has_bias ? at::empty({d.E, sg.splits, d.out}, acc_opts) : Tensor();
    Tensor ddb_partial = has_delta_bias ? at::empty({d.E, sg.splits, d.out}, acc_opts) : Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hyper_grad_pass", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      hyper_grad_pass_kernel<scalar_t><<<dim3(sg.col_tiles, d.E * sg.splits), dim3(kTileCols, kTileRows), 0, stream>>>(
          g.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
          e1.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
          has_delta_bias ? delta_bias.const_data_ptr<scalar_t>() : nullptr,
          has_delta_bias ? e2.const_data_ptr<scalar_t>() : nullptr, compute_grad_x ? g_s.data_ptr<scalar_t>() : nullptr,
          g_ve.data_ptr<scalar_t>(), grad_e1.data_ptr<scalar_t>(),
          has_delta_bias ? grad_e2.data_ptr<scalar_t>() : nullptr, dv_partial.data_ptr<acc_t>(),
          has_bias ? db_partial.data_ptr<acc_t>() : nullptr, has_delta_bias ? ddb_partial.data_ptr<acc_t>() : nullptr,
          d.B, d.out, sg.splits, sg.rows_per_split);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sum_partials<scalar_t, acc_t>(dv_partial, grad_v, d.E, sg.splits, d.out);
      if (has_bias) sum_partials<scalar_t, acc_t>(db_partial, grad_bias, d.E, sg.splits, d.out);
      if (has_delta_bias) sum_partials<scalar_t, acc_t>(ddb_partial, grad_delta_bias, d.E, sg.splits, d.out);
    });
  }

  HyperRestGrads rest = hyper_backward_rest(g, x, weight, delta, r, s, u, d, g_s, g_ve, compute_grad_x);
  return {rest.x, rest.weight, rest.delta, rest.r, rest.s, rest.u, grad_v, grad_e1, grad_bias, grad_delta_bias,
          grad_e2};
}

// ---------------------------------------------------------------------------------------------
// hyper_batch_ensemble_linear_hp: e(lambda) = hparams @ embedding^T inside the kernels for m = 1..8
// hyperparameters (hyper_epilogue_embedded_kernel, hyper_grad_pass_embedded_kernel: no (E*B, out)
// tensor of e1, e2 or their gradients). With any other m (more than kMaxFusedM, or none), e1 / e2
// are computed TRANSIENTLY: [e1 | e2] = hparams @ embedding^T into temporaries (cuBLAS; freed when the call
// returns, never saved), the e1 / e2 op's kernels, and d(embedding) = [de1 | de2]^T hparams,
// d(hparams) = [de1 | de2] @ embedding. Autograd (csrc/autograd.cpp) saves what the CPU saves: x, the
// parameters, hparams, embedding, delta_out.

// e1 = hparams @ embedding[0:out]^T and, with delta_bias, e2 = hparams @ embedding[out:2*out]^T.
std::pair<Tensor, std::optional<Tensor>> embed_rows(const Tensor& hparams, const Tensor& embedding, int64_t out,
                                                    bool has_delta_bias) {
  Tensor e1 = at::mm(hparams, embedding.narrow(0, 0, out).t());
  if (!has_delta_bias) return {e1, std::nullopt};
  return {e1, at::mm(hparams, embedding.narrow(0, out, out).t())};
}

std::tuple<Tensor, Tensor> hyper_batch_ensemble_linear_hp_cuda(
    const Tensor& x_in, const Tensor& weight_in, const Tensor& delta_in, const Tensor& r_in, const Tensor& s_in,
    const Tensor& u_in, const Tensor& v_in, const Tensor& hparams_in, const Tensor& embedding_in,
    const std::optional<Tensor>& bias_in, const std::optional<Tensor>& delta_bias_in) {
  const rank1_linear::HpDims d = rank1_linear::check_hp(x_in, weight_in, delta_in, r_in, s_in, u_in, v_in, hparams_in,
                                                        embedding_in, bias_in, delta_bias_in);
  const int64_t m = d.m;
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  if (m < 1 || m > kMaxFusedM) {
    auto [e1, e2] = embed_rows(hparams_in, embedding_in, d.out, present(delta_bias_in));
    return hyper_batch_ensemble_linear_cuda(x_in, weight_in, delta_in, r_in, s_in, u_in, v_in, e1, bias_in,
                                            delta_bias_in, e2);
  }
  const Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), delta = delta_in.contiguous();
  const Tensor r = r_in.contiguous(), s = s_in.contiguous(), u = u_in.contiguous(), v = v_in.contiguous();
  const Tensor hparams = hparams_in.contiguous();
  const Tensor bias = contiguous_or_empty(bias_in), delta_bias = contiguous_or_empty(delta_bias_in);
  Tensor y = at::empty({d.N, d.out}, x.options());
  Tensor delta_out = at::empty({d.N, d.out}, x.options());
  if (d.N == 0 || d.out == 0) return {y, delta_out};
  hyper_forward_gemms(x, weight, delta, r, u, d, y, delta_out);
  const Tensor embT = transposed_embedding(embedding_in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hyper_linear_hp_epilogue", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    with_fused_m(m, [&](auto mc) {
      constexpr int M = decltype(mc)::value;
      hyper_epilogue_embedded_kernel<scalar_t, M><<<grid_for(d.N * d.out), kThreads, 0,
                                                    at::cuda::getCurrentCUDAStream()>>>(
          y.data_ptr<scalar_t>(), delta_out.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
          v.const_data_ptr<scalar_t>(), hparams.const_data_ptr<scalar_t>(), embT.const_data_ptr<opmath_t>(),
          bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
          delta_bias.defined() ? delta_bias.const_data_ptr<scalar_t>() : nullptr, d.N, d.out, d.B);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {y, delta_out};
}

// The transient backward (m outside 1..kMaxFusedM): e1 / e2 recomputed into temporaries, the e1 / e2
// op's backward, then the embedding's and the hyperparameters' gradients from [de1 | de2].
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
hyper_hp_backward_transient(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& delta,
                            const Tensor& r, const Tensor& s, const Tensor& u, const Tensor& v, const Tensor& hparams,
                            const Tensor& embedding, const std::optional<Tensor>& delta_bias, const Tensor& delta_out,
                            bool has_bias, bool compute_grad_x, bool compute_grad_hparams, const Dims& d) {
  const bool has_delta_bias = present(delta_bias);
  auto [e1, e2] = embed_rows(hparams, embedding, d.out, has_delta_bias);
  auto [gx, gw, gd, gr, gs, gu, gv, ge1, gb, gdb, ge2] = hyper_batch_ensemble_linear_backward_cuda(
      grad, x, weight, delta, r, s, u, v, e1, delta_bias, e2, delta_out, has_bias, compute_grad_x);
  const Tensor de = has_delta_bias ? at::cat({ge1, ge2}, 1) : ge1;  // (E*B, out or 2*out)
  Tensor grad_embedding = at::mm(de.t(), hparams);
  Tensor grad_hparams = compute_grad_hparams ? at::mm(de, embedding) : at::empty({0}, x.options());
  return {gx, gw, gd, gr, gs, gu, gv, grad_hparams, grad_embedding, gb, gdb};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
hyper_batch_ensemble_linear_hp_backward_cuda(const Tensor& grad_in, const Tensor& x_in, const Tensor& weight_in,
                                             const Tensor& delta_in, const Tensor& r_in, const Tensor& s_in,
                                             const Tensor& u_in, const Tensor& v_in, const Tensor& hparams_in,
                                             const Tensor& embedding_in, const std::optional<Tensor>& delta_bias_in,
                                             const Tensor& delta_out_in, bool has_bias, bool compute_grad_x,
                                             bool compute_grad_hparams) {
  const rank1_linear::HpDims d = rank1_linear::check_hp(x_in, weight_in, delta_in, r_in, s_in, u_in, v_in, hparams_in,
                                                        embedding_in, std::nullopt, delta_bias_in, &grad_in,
                                                        &delta_out_in);
  const int64_t m = d.m;
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  if (m < 1 || m > kMaxFusedM) {
    return hyper_hp_backward_transient(grad_in, x_in, weight_in, delta_in, r_in, s_in, u_in, v_in, hparams_in,
                                       embedding_in, delta_bias_in, delta_out_in, has_bias, compute_grad_x,
                                       compute_grad_hparams, d);
  }
  const Tensor g = grad_in.contiguous(), x = x_in.contiguous(), weight = weight_in.contiguous();
  const Tensor delta = delta_in.contiguous(), r = r_in.contiguous(), s = s_in.contiguous();
  const Tensor u = u_in.contiguous(), v = v_in.contiguous(), hparams = hparams_in.contiguous();
  const Tensor delta_bias = contiguous_or_empty(delta_bias_in), h = delta_out_in.contiguous();
  const bool has_delta_bias = delta_bias.defined();
  const auto opts = x.options();
  const auto acc_opts = opts.dtype(at::toOpMathType(x.scalar_type()));

  HyperPassOutputs pass = hyper_pass_outputs(d, opts, has_bias, has_delta_bias, compute_grad_x);
  Tensor &grad_bias = pass.bias, &grad_delta_bias = pass.delta_bias, &grad_v = pass.v;
  Tensor &g_s = pass.g_s, &g_ve = pass.g_ve;
  Tensor grad_embedding, grad_hparams;
  if (d.N * d.out == 0) {
    grad_embedding = at::zeros(embedding_in.sizes(), opts);
    grad_hparams = compute_grad_hparams ? at::zeros({d.N, m}, opts) : at::empty({0}, opts);
  } else {
    const Segments sg = member_segments(d.E, d.B, d.out);
    const int64_t halves = has_delta_bias ? 2 : 1;
    Tensor dv_partial = at::empty({d.E, sg.splits, d.out}, acc_opts);
    Tensor db_partial = has_bias ? at::empty({d.E, sg.splits, d.out}, acc_opts) : Tensor();
    Tensor ddb_partial = has_delta_bias ? at::empty({d.E, sg.splits, d.out}, acc_opts) : Tensor();
    // d(embedding) partials: [half][p][member, split][column]; d(hparams) partials: [column tile][row][p]
    Tensor demb_partial = at::empty({halves, m, d.E * sg.splits, d.out}, acc_opts);
    Tensor dhp_partial = compute_grad_hparams ? at::empty({sg.col_tiles, d.N, m}, acc_opts) : Tensor();
    Tensor demb = at::empty({halves, m, d.out}, opts);  // [half][p][column]
    const Tensor embT = transposed_embedding(embedding_in);
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hyper_hp_grad_pass", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      acc_t* demb_p = demb_partial.data_ptr<acc_t>();
      with_fused_m(m, [&](auto mc) {
        constexpr int M = decltype(mc)::value;
        hyper_grad_pass_embedded_kernel<scalar_t, M>
            <<<dim3(sg.col_tiles, d.E * sg.splits), dim3(kTileCols, kTileRows), 0, stream>>>(
                g.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                h.const_data_ptr<scalar_t>(), has_delta_bias ? delta_bias.const_data_ptr<scalar_t>() : nullptr,
                hparams.const_data_ptr<scalar_t>(), embT.const_data_ptr<acc_t>(),
                compute_grad_x ? g_s.data_ptr<scalar_t>() : nullptr, g_ve.data_ptr<scalar_t>(),
                dv_partial.data_ptr<acc_t>(), has_bias ? db_partial.data_ptr<acc_t>() : nullptr,
                has_delta_bias ? ddb_partial.data_ptr<acc_t>() : nullptr, demb_p,
                has_delta_bias ? demb_p + m * d.E * sg.splits * d.out : nullptr,
                compute_grad_hparams ? dhp_partial.data_ptr<acc_t>() : nullptr, d.N, d.E, d.B, d.out, sg.splits,
                sg.rows_per_split);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      sum_partials<scalar_t, acc_t>(dv_partial, grad_v, d.E, sg.splits, d.out);
      if (has_bias) sum_partials<scalar_t, acc_t>(db_partial, grad_bias, d.E, sg.splits, d.out);
      if (has_delta_bias) sum_partials<scalar_t, acc_t>(ddb_partial, grad_delta_bias, d.E, sg.splits, d.out);
      // (halves * m) rows of (E * splits) partials each: demb[half, p, j]
      sum_partials<scalar_t, acc_t>(demb_partial, demb, halves * m, d.E * sg.splits, d.out);
    });
    // [half][p][j] -> embedding rows half * out + j, column p
    grad_embedding = demb.permute({0, 2, 1}).reshape({halves * d.out, m});
    grad_hparams = compute_grad_hparams ? dhp_partial.sum(0).to(x.scalar_type()) : at::empty({0}, opts);
  }
  HyperRestGrads rest = hyper_backward_rest(g, x, weight, delta, r, s, u, d, g_s, g_ve, compute_grad_x);
  return {rest.x, rest.weight, rest.delta, rest.r, rest.s, rest.u, grad_v, grad_hparams, grad_embedding, grad_bias,
          grad_delta_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(hyperkern, CUDA, m) {
  m.impl("batch_ensemble_linear", &batch_ensemble_linear_cuda);
  m.impl("batch_ensemble_linear_backward", &batch_ensemble_linear_backward_cuda);
  m.impl("hyper_batch_ensemble_linear", &hyper_batch_ensemble_linear_cuda);
  m.impl("hyper_batch_ensemble_linear_backward", &hyper_batch_ensemble_linear_backward_cuda);
  m.impl("hyper_batch_ensemble_linear_hp", &hyper_batch_ensemble_linear_hp_cuda);
  m.impl("hyper_batch_ensemble_linear_hp_backward", &hyper_batch_ensemble_linear_hp_backward_cuda);
}

}  // namespace hyperkern
