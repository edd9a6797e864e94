// CUDA kernels of the rank-1 ensemble conv2d ops (schemas in csrc/ops.cpp, autograd in csrc/autograd.cpp,
// fake kernels in hyperkern/ops/_cpp_conv.py).
//
// x is member-major: images k*B .. (k+1)*B-1 of the (E*B, C, H, W) input belong to member k; NCHW or
// channels-last (every activation-sized output follows x's memory format).
// - Batch op: one convolution of all E*B images between two scaling passes, xr = x * r_k, then
//   pre = conv(xr, W) (cuDNN through ATen), then y = pre * s_k + bias_k (in place, or into its own buffer
//   when the train op keeps pre for the backward). The backward's first pass over g writes gc = g * s_k
//   with the per-(image, channel) sums of g and g * pre (db, ds); one convolution backward of gc at xr
//   (recomputed, one pass) gives dxr and dW; a last pass turns dxr into dx = dxr * r_k in place while
//   summing dxr * x (dr). On an H200 this beat one cuDNN convolution per member with folded weights
//   W_k = W * s_k r_k^T (the CPU kernel's scheme; WRN-28-10 train step 50.2 -> 42.9 ms, plain 37.1):
//   cuDNN at B images per call is slower than at E*B images, and each member's weight is folded and
//   transposed (bench/RESULTS.md, GPU run 2). The price is memory: pre is one more activation per layer.
// - Hyper op: W_k and D_k = delta * v_k u_k^T are stacked per group into one weight of 2*O output
//   channels; each member's convolution writes [h | hd] into one (E*B, 2*O, Ho, Wo) buffer and a
//   vectorised epilogue kernel computes y = h + e1 * hd + bias + delta_bias * e2 (and keeps hd when
//   the backward needs it for de1). The backward's prep kernel builds [g | g * e1] and the per-image
//   sums of g and g * hd (segmented reductions) in one pass over g.
#include "../rank1_conv.h"

#include <ATen/Context.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <vector>

namespace hyperkern {
namespace rank1_conv {
namespace {

constexpr int kThreads = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int blocks_for(int64_t work, int threads = kThreads) {
  // grid-stride loops below cover any remainder; cap the grid at a few waves of the device.
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, threads), max_blocks)));
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// Elements per 16-byte vector for T, or 1 when `inner` (the run of elements sharing one channel in
// NCHW, or one group's channels in channels-last) is not a multiple of it or a pointer is misaligned.
template <typename T>
int vector_width(int64_t inner, std::initializer_list<const void*> ptrs) {
  const int vec = static_cast<int>(16 / sizeof(T));
  if (vec <= 1 || inner % vec != 0) return 1;
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  }
  return vec;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// ---- weight folding and the weight-gradient reductions (weight-sized, E * O * cg * kh * kw) ----

// Part `rows` of a member_weight_buffer: row (k, o) gets w[o, c, i] * so[k, o] * si[k, (o / Og) * cg + c].
template <typename T>
__global__ void fold_weight_kernel(const T* __restrict__ w, const T* __restrict__ so, const T* __restrict__ si,
                                   T* __restrict__ out, WeightRows rows, int64_t E, int64_t O, int64_t C, int64_t cg,
                                   int64_t Og, int64_t K) {
  using acc_t = at::opmath_type<T>;
  const int64_t row = cg * K, total = E * O * row;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ko = idx / row, ci = idx % row, k = ko / O, o = ko % O, c = ci / K, i = ci % K;
    const acc_t f = static_cast<acc_t>(so[ko]) * static_cast<acc_t>(si[k * C + (o / Og) * cg + c]);
    out[rows.offset + k * rows.member_stride + (o / Og) * rows.group_stride + (o % Og) * rows.row_stride +
        c * rows.c_stride + i * rows.i_stride] = static_cast<T>(static_cast<acc_t>(w[o * row + ci]) * f);
  }
}

void fold_weight_into(at::Tensor& buffer, const WeightRows& rows, const at::Tensor& weight, const at::Tensor& scale_out,
                      const at::Tensor& scale_in, const Dims& d) {
  const at::Tensor w = weight.contiguous(), so = scale_out.contiguous(), si = scale_in.contiguous();
  const int64_t total = d.E * d.O * d.cg * d.kh * d.kw;
  if (total == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "rank1_conv_fold_weight_cuda", [&] {
    fold_weight_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        w.const_data_ptr<scalar_t>(), so.const_data_ptr<scalar_t>(), si.const_data_ptr<scalar_t>(),
        buffer.mutable_data_ptr<scalar_t>(), rows, d.E, d.O, d.C, d.cg, d.Og, d.kh * d.kw);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The members' folded weights W_k = weight * scale_out_k scale_in_k^T, (E, O, cg, kh, kw), each member
// contiguous in x's memory format.
at::Tensor fold_weight(const at::Tensor& weight, const at::Tensor& scale_out, const at::Tensor& scale_in,
                       const Dims& d, bool channels_last) {
  at::Tensor out = member_weight_buffer(d, 1, channels_last, weight.options());
  fold_weight_into(out, member_weight_rows(d, 1, 0, channels_last), weight, scale_out, scale_in, d);
  return out;
}

// W_k and D_k stacked per group, (E, 2 * O, cg, kh, kw): one convolution computes both branches.
at::Tensor fold_stacked_weights(const at::Tensor& weight, const at::Tensor& s, const at::Tensor& r,
                                const at::Tensor& delta, const at::Tensor& v, const at::Tensor& u, const Dims& d,
                                bool channels_last) {
  at::Tensor out = member_weight_buffer(d, 2, channels_last, weight.options());
  fold_weight_into(out, member_weight_rows(d, 2, 0, channels_last), weight, s, r, d);
  fold_weight_into(out, member_weight_rows(d, 2, 1, channels_last), delta, v, u, d);
  return out;
}

struct ReduceDims {
  int64_t E, O, C, cg, Og, K;
};

// Offset of member k's gradient element (o, c, i) in part `rows` of a member_weight_buffer.
__device__ __forceinline__ int64_t grad_at(const WeightRows& g, const ReduceDims& d, int64_t k, int64_t o, int64_t c,
                                           int64_t i) {
  return g.offset + k * g.member_stride + (o / d.Og) * g.group_stride + (o % d.Og) * g.row_stride + c * g.c_stride +
         i * g.i_stride;
}

// dW[o, c, i] = sum_k G_k[o, c, i] * so[k, o] * si[k, (o / Og) * cg + c]
template <typename T>
__global__ void grad_weight_kernel(const T* __restrict__ G, WeightRows rows, ReduceDims d, const T* __restrict__ so,
                                   const T* __restrict__ si, T* __restrict__ dw) {
  using acc_t = at::opmath_type<T>;
  const int64_t row = d.cg * d.K, total = d.O * row;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = idx / row, ci = idx % row, c = ci / d.K, i = ci % d.K;
    const int64_t c_all = (o / d.Og) * d.cg + c;
    acc_t sum = 0;
    for (int64_t k = 0; k < d.E; ++k) {
      sum += static_cast<acc_t>(G[grad_at(rows, d, k, o, c, i)]) * static_cast<acc_t>(so[k * d.O + o]) *
             static_cast<acc_t>(si[k * d.C + c_all]);
    }
    dw[idx] = static_cast<T>(sum);
  }
}

// dso[k, o] = sum_{c, i} G_k[o, c, i] * w[o, c, i] * si[k, (o / Og) * cg + c]; one warp per (k, o).
template <typename T>
__global__ void grad_scale_out_kernel(const T* __restrict__ G, WeightRows rows, ReduceDims d, const T* __restrict__ w,
                                      const T* __restrict__ si, T* __restrict__ dso) {
  using acc_t = at::opmath_type<T>;
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  const int64_t row = d.cg * d.K;
  for (int64_t ko = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32; ko < d.E * d.O;
       ko += warps) {
    const int64_t k = ko / d.O, o = ko % d.O;
    const T* si_k = si + k * d.C + (o / d.Og) * d.cg;
    acc_t sum = 0;
    for (int64_t ci = lane; ci < row; ci += 32) {
      const int64_t c = ci / d.K, i = ci % d.K;
      sum += static_cast<acc_t>(G[grad_at(rows, d, k, o, c, i)]) * static_cast<acc_t>(w[o * row + ci]) *
             static_cast<acc_t>(si_k[c]);
    }
    sum = warp_sum(sum);
    if (lane == 0) dso[ko] = static_cast<T>(sum);
  }
}

// dsi[k, c_all] = sum_{o in c_all's group, i} G_k[o, c, i] * w[o, c, i] * so[k, o]; one warp per (k, c_all).
template <typename T>
__global__ void grad_scale_in_kernel(const T* __restrict__ G, WeightRows rows, ReduceDims d, const T* __restrict__ w,
                                     const T* __restrict__ so, T* __restrict__ dsi) {
  using acc_t = at::opmath_type<T>;
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  const int64_t row = d.cg * d.K, span = d.Og * d.K;
  for (int64_t kc = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32; kc < d.E * d.C;
       kc += warps) {
    const int64_t k = kc / d.C, c_all = kc % d.C, grp = c_all / d.cg, c = c_all % d.cg;
    acc_t sum = 0;
    for (int64_t t = lane; t < span; t += 32) {
      const int64_t o = grp * d.Og + t / d.K, i = t % d.K;
      sum += static_cast<acc_t>(G[grad_at(rows, d, k, o, c, i)]) *
             static_cast<acc_t>(w[o * row + c * d.K + i]) * static_cast<acc_t>(so[k * d.O + o]);
    }
    sum = warp_sum(sum);
    if (lane == 0) dsi[kc] = static_cast<T>(sum);
  }
}

void reduce_weight_grad(const at::Tensor& grads, const WeightRows& rows, const at::Tensor& weight,
                        const at::Tensor& scale_out, const at::Tensor& scale_in, const Dims& d, bool need_w,
                        bool need_so, bool need_si, at::Tensor& d_weight, at::Tensor& d_scale_out,
                        at::Tensor& d_scale_in) {
  if (!(need_w || need_so || need_si)) return;
  const at::Tensor w = weight.contiguous(), so = scale_out.contiguous(), si = scale_in.contiguous();
  const auto opts = w.options();
  if (need_w) d_weight = at::empty(w.sizes(), opts);
  if (need_so) d_scale_out = at::empty({d.E, d.O}, opts);
  if (need_si) d_scale_in = at::empty({d.E, d.C}, opts);
  const ReduceDims rd{d.E, d.O, d.C, d.cg, d.Og, d.kh * d.kw};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "rank1_conv_reduce_weight_grad_cuda",
                                  [&] {
    const scalar_t* gp = grads.const_data_ptr<scalar_t>();
    if (need_w && w.numel() > 0) {
      grad_weight_kernel<scalar_t><<<blocks_for(w.numel()), kThreads, 0, stream>>>(
          gp, rows, rd, so.const_data_ptr<scalar_t>(), si.const_data_ptr<scalar_t>(),
          d_weight.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need_so && d.E * d.O > 0) {
      grad_scale_out_kernel<scalar_t><<<blocks_for(d.E * d.O * 32), kThreads, 0, stream>>>(
          gp, rows, rd, w.const_data_ptr<scalar_t>(), si.const_data_ptr<scalar_t>(),
          d_scale_out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need_si && d.E * d.C > 0) {
      grad_scale_in_kernel<scalar_t><<<blocks_for(d.E * d.C * 32), kThreads, 0, stream>>>(
          gp, rows, rd, w.const_data_ptr<scalar_t>(), so.const_data_ptr<scalar_t>(),
          d_scale_in.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

// ---- activation-sized elementwise kernels (vectorised along the contiguous inner run) -----------------

// y = h + e1 * hd + bias + delta_bias * e2 and (when hd_out) hd_out = hd, reading h and hd from the
// stacked convolution output `both` (N, 2*O, Ho, Wo): channel o's h is (o / Og) * 2 * Og + o % Og and
// its hd Og channels later. NCHW vectors run along positions (P % VEC == 0), channels-last vectors
// along one group's channels (Og % VEC == 0).
template <typename T, int VEC>
__global__ void hyper_epilogue_kernel(const T* __restrict__ both, const T* __restrict__ e1, const T* __restrict__ bias,
                                      const T* __restrict__ delta_bias, const T* __restrict__ e2, T* __restrict__ y,
                                      T* __restrict__ hd_out, int64_t vectors, int64_t O, int64_t Og, int64_t P,
                                      int64_t B, bool channels_last) {
  using acc_t = at::opmath_type<T>;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < vectors;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = idx * VEC;
    int64_t n, o, src;
    if (channels_last) {
      const int64_t pos = e / O;  // n * P + p
      o = e % O;
      n = pos / P;
      src = pos * 2 * O + (o / Og) * 2 * Og + o % Og;
    } else {
      n = e / (O * P);
      o = (e / P) % O;
      const int64_t p = e % P;
      src = (n * 2 * O + (o / Og) * 2 * Og + o % Og) * P + p;
    }
    const int64_t hd_offset = channels_last ? Og : Og * P;
    const Vec<T, VEC> h = *reinterpret_cast<const Vec<T, VEC>*>(both + src);
    const Vec<T, VEC> hd = *reinterpret_cast<const Vec<T, VEC>*>(both + src + hd_offset);
    const int64_t k = n / B;
    Vec<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t oj = channels_last ? o + j : o;
      acc_t add = bias != nullptr ? static_cast<acc_t>(bias[k * O + oj]) : acc_t(0);
      if (delta_bias != nullptr) add += static_cast<acc_t>(delta_bias[k * O + oj]) * static_cast<acc_t>(e2[n * O + oj]);
      out.v[j] = static_cast<T>(static_cast<acc_t>(h.v[j]) + static_cast<acc_t>(e1[n * O + oj]) * static_cast<acc_t>(hd.v[j]) + add);
    }
    reinterpret_cast<Vec<T, VEC>*>(y)[idx] = out;
    if (hd_out != nullptr) reinterpret_cast<Vec<T, VEC>*>(hd_out)[idx] = hd;
  }
}

void hyper_epilogue(const at::Tensor& both, const at::Tensor& e1, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& delta_bias, const std::optional<at::Tensor>& e2, const Dims& d,
                    bool channels_last, at::Tensor& y, at::Tensor& hd) {
  if (y.numel() == 0) return;
  const int64_t P = d.Ho * d.Wo;
  const bool save_hd = hd.defined();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "rank1_conv_hyper_epilogue_cuda", [&] {
    const scalar_t* src = both.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    scalar_t* hp = save_hd ? hd.mutable_data_ptr<scalar_t>() : nullptr;
    const int vec = vector_width<scalar_t>(channels_last ? d.Og : P, {src, yp, hp});
    auto launch = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      const int64_t vectors = y.numel() / V;
      hyper_epilogue_kernel<scalar_t, V><<<blocks_for(vectors), kThreads, 0, stream>>>(
          src, e1.const_data_ptr<scalar_t>(), bias ? bias->const_data_ptr<scalar_t>() : nullptr,
          delta_bias ? delta_bias->const_data_ptr<scalar_t>() : nullptr, e2 ? e2->const_data_ptr<scalar_t>() : nullptr,
          yp, hp, vectors, d.O, d.Og, P, d.B, channels_last);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec == 8) launch(std::integral_constant<int, 8>{});
    else if (vec == 4) launch(std::integral_constant<int, 4>{});
    else if (vec == 2) launch(std::integral_constant<int, 2>{});
    else launch(std::integral_constant<int, 1>{});
  });
}

// NCHW backward prep: one block per image-channel row (n, o) of P positions. Writes the stacked
// gradient [g | g * e1[n, o]] and the row sums g_sum[n, o] = sum_p g, g_hd[n, o] = sum_p g * hd.
template <typename T, int VEC>
__global__ void hyper_grad_prep_nchw_kernel(const T* __restrict__ g, const T* __restrict__ e1, const T* __restrict__ hd,
                                            T* __restrict__ stacked, at::opmath_type<T>* __restrict__ g_sum,
                                            at::opmath_type<T>* __restrict__ g_hd, int64_t rows, int64_t O,
                                            int64_t Og, int64_t P) {
  using acc_t = at::opmath_type<T>;
  __shared__ acc_t shared_sum[kThreads / 32], shared_hd[kThreads / 32];
  for (int64_t no = blockIdx.x; no < rows; no += gridDim.x) {
    const int64_t n = no / O, o = no % O;
    const T* g_row = g + no * P;
    T* to_h = stacked + (n * 2 * O + (o / Og) * 2 * Og + o % Og) * P;
    T* to_d = to_h + Og * P;
    const acc_t scale = static_cast<acc_t>(e1[no]);
    acc_t sum = 0, sum_hd = 0;
    for (int64_t p = static_cast<int64_t>(threadIdx.x) * VEC; p < P; p += static_cast<int64_t>(blockDim.x) * VEC) {
      const Vec<T, VEC> gv = *reinterpret_cast<const Vec<T, VEC>*>(g_row + p);
      Vec<T, VEC> dv;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t x = static_cast<acc_t>(gv.v[j]);
        dv.v[j] = static_cast<T>(x * scale);
        sum += x;
      }
      *reinterpret_cast<Vec<T, VEC>*>(to_h + p) = gv;
      *reinterpret_cast<Vec<T, VEC>*>(to_d + p) = dv;
      if (hd != nullptr) {
        const Vec<T, VEC> hv = *reinterpret_cast<const Vec<T, VEC>*>(hd + no * P + p);
#pragma unroll
        for (int j = 0; j < VEC; ++j) sum_hd += static_cast<acc_t>(gv.v[j]) * static_cast<acc_t>(hv.v[j]);
      }
    }
    sum = warp_sum(sum);
    sum_hd = warp_sum(sum_hd);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
      shared_sum[warp] = sum;
      shared_hd[warp] = sum_hd;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      acc_t total = 0, total_hd = 0;
      for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) {
        total += shared_sum[w];
        total_hd += shared_hd[w];
      }
      g_sum[no] = total;
      if (hd != nullptr) g_hd[no] = total_hd;
    }
    __syncthreads();
  }
}

// Channels-last backward prep: block (32, 8) per (image n, 32 channels); threadIdx.x walks channels
// (coalesced), threadIdx.y strides over positions; the per-channel sums are reduced across y.
template <typename T>
__global__ void hyper_grad_prep_nhwc_kernel(const T* __restrict__ g, const T* __restrict__ e1, const T* __restrict__ hd,
                                            T* __restrict__ stacked, at::opmath_type<T>* __restrict__ g_sum,
                                            at::opmath_type<T>* __restrict__ g_hd, int64_t O, int64_t Og, int64_t P) {
  using acc_t = at::opmath_type<T>;
  __shared__ acc_t shared_sum[8][33], shared_hd[8][33];
  const int64_t n = blockIdx.x;
  const int64_t o = static_cast<int64_t>(blockIdx.y) * 32 + threadIdx.x;
  acc_t sum = 0, sum_hd = 0;
  if (o < O) {
    const acc_t scale = static_cast<acc_t>(e1[n * O + o]);
    const int64_t to_off = (o / Og) * 2 * Og + o % Og;
    for (int64_t p = threadIdx.y; p < P; p += blockDim.y) {
      const int64_t pos = n * P + p;
      const T gv = g[pos * O + o];
      const acc_t x = static_cast<acc_t>(gv);
      stacked[pos * 2 * O + to_off] = gv;
      stacked[pos * 2 * O + to_off + Og] = static_cast<T>(x * scale);
      sum += x;
      if (hd != nullptr) sum_hd += x * static_cast<acc_t>(hd[pos * O + o]);
    }
  }
  shared_sum[threadIdx.y][threadIdx.x] = sum;
  shared_hd[threadIdx.y][threadIdx.x] = sum_hd;
  __syncthreads();
  if (threadIdx.y == 0 && o < O) {
    acc_t total = 0, total_hd = 0;
    for (int y = 0; y < static_cast<int>(blockDim.y); ++y) {
      total += shared_sum[y][threadIdx.x];
      total_hd += shared_hd[y][threadIdx.x];
    }
    g_sum[n * O + o] = total;
    if (hd != nullptr) g_hd[n * O + o] = total_hd;
  }
}

void hyper_grad_prep(const at::Tensor& g, const at::Tensor& e1, const at::Tensor& hd, const Dims& d,
                     bool channels_last, at::Tensor& stacked, at::Tensor& g_sum, at::Tensor& g_hd) {
  if (d.N == 0 || d.O == 0) return;
  const int64_t P = d.Ho * d.Wo;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "rank1_conv_hyper_grad_prep_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* hp = hd.defined() ? hd.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* sp = stacked.mutable_data_ptr<scalar_t>();
    acc_t* sum_p = g_sum.mutable_data_ptr<acc_t>();
    acc_t* hd_p = hd.defined() ? g_hd.mutable_data_ptr<acc_t>() : nullptr;
    if (channels_last) {
      const dim3 block(32, 8);
      const dim3 grid(static_cast<unsigned>(d.N), static_cast<unsigned>(ceil_div(d.O, 32)));
      hyper_grad_prep_nhwc_kernel<scalar_t><<<grid, block, 0, stream>>>(gp, e1.const_data_ptr<scalar_t>(), hp, sp,
                                                                        sum_p, hd_p, d.O, d.Og, P);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const int vec = vector_width<scalar_t>(P, {gp, hp, sp});
    const int64_t rows = d.N * d.O;
    const int grid = static_cast<int>(std::min<int64_t>(rows, 65535 * 8));
    auto launch = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      hyper_grad_prep_nchw_kernel<scalar_t, V><<<grid, kThreads, 0, stream>>>(
          gp, e1.const_data_ptr<scalar_t>(), hp, sp, sum_p, hd_p, rows, d.O, d.Og, P);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec == 8) launch(std::integral_constant<int, 8>{});
    else if (vec == 4) launch(std::integral_constant<int, 4>{});
    else if (vec == 2) launch(std::integral_constant<int, 2>{});
    else launch(std::integral_constant<int, 1>{});
  });
}

// ---- the batch op's scaling passes around one convolution of all E*B images -----------------------

// out[n, c, p] = in[n, c, p] * f[n / B, c] + add[n / B, c] (f, add optional; out may alias in or be absent)
// and the per-(image, channel) sums over positions sum_in[n, c] = sum_p in, sum_aux[n, c] = sum_p in * aux
// (each optional). NCHW: `lanes` threads (a power of two <= 32, about P / VEC) per (n, c) row of P
// positions, 32 / lanes rows per warp; each lane loads kUnroll vectors before using them (memory-level
// parallelism: the loads cannot be reordered past the stores otherwise, as out may alias in).
constexpr int kUnroll = 4;

template <typename T, int VEC>
__global__ void scale_channels_nchw_kernel(const T* in, const T* __restrict__ f, const T* __restrict__ add,
                                           const T* aux, T* out, at::opmath_type<T>* __restrict__ sum_in,
                                           at::opmath_type<T>* __restrict__ sum_aux, int64_t rows, int64_t C,
                                           int64_t P, int64_t B, int lanes) {
  using acc_t = at::opmath_type<T>;
  const int lane = threadIdx.x % 32, sub = lane % lanes;
  const int64_t per_warp = 32 / lanes;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  const int64_t step = static_cast<int64_t>(lanes) * VEC;
  for (int64_t base = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32 * per_warp; base < rows;
       base += warps * per_warp) {
    const int64_t row = base + lane / lanes;
    acc_t total = 0, total_aux = 0;
    if (row < rows) {  // no early exit: every lane takes part in the shuffles below
      const int64_t kc = (row / C / B) * C + row % C;
      const acc_t scale = f != nullptr ? static_cast<acc_t>(f[kc]) : acc_t(1);
      const acc_t shift = add != nullptr ? static_cast<acc_t>(add[kc]) : acc_t(0);
      const T* in_row = in + row * P;
      for (int64_t p0 = static_cast<int64_t>(sub) * VEC; p0 < P; p0 += kUnroll * step) {
        Vec<T, VEC> v[kUnroll], a[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t p = p0 + u * step;
          if (p < P) {
            v[u] = *reinterpret_cast<const Vec<T, VEC>*>(in_row + p);
            if (sum_aux != nullptr) a[u] = *reinterpret_cast<const Vec<T, VEC>*>(aux + row * P + p);
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t p = p0 + u * step;
          if (p >= P) break;
          if (out != nullptr) {
            Vec<T, VEC> o;
#pragma unroll
            for (int j = 0; j < VEC; ++j) o.v[j] = static_cast<T>(static_cast<acc_t>(v[u].v[j]) * scale + shift);
            *reinterpret_cast<Vec<T, VEC>*>(out + row * P + p) = o;
          }
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            total += static_cast<acc_t>(v[u].v[j]);
            if (sum_aux != nullptr) total_aux += static_cast<acc_t>(v[u].v[j]) * static_cast<acc_t>(a[u].v[j]);
          }
        }
      }
    }
    if (sum_in != nullptr || sum_aux != nullptr) {
      for (int offset = lanes / 2; offset > 0; offset >>= 1) {  // within each group of `lanes` lanes
        total += __shfl_down_sync(0xffffffffu, total, offset);
        total_aux += __shfl_down_sync(0xffffffffu, total_aux, offset);
      }
      if (sub == 0 && row < rows) {
        if (sum_in != nullptr) sum_in[row] = total;
        if (sum_aux != nullptr) sum_aux[row] = total_aux;
      }
    }
  }
}

// Channels-last: block (32, 8) per (image n, 32 channels); threadIdx.x walks channels (coalesced),
// threadIdx.y strides over positions; the per-channel sums are reduced across y.
template <typename T>
__global__ void scale_channels_nhwc_kernel(const T* in, const T* __restrict__ f, const T* __restrict__ add,
                                           const T* aux, T* out, at::opmath_type<T>* __restrict__ sum_in,
                                           at::opmath_type<T>* __restrict__ sum_aux, int64_t C, int64_t P, int64_t B) {
  using acc_t = at::opmath_type<T>;
  __shared__ acc_t shared_in[8][33], shared_aux[8][33];
  const int64_t n = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * 32 + threadIdx.x;
  acc_t total = 0, total_aux = 0;
  if (c < C) {
    const int64_t kc = (n / B) * C + c;
    const acc_t scale = f != nullptr ? static_cast<acc_t>(f[kc]) : acc_t(1);
    const acc_t shift = add != nullptr ? static_cast<acc_t>(add[kc]) : acc_t(0);
    for (int64_t p = threadIdx.y; p < P; p += blockDim.y) {
      const int64_t at = (n * P + p) * C + c;
      const acc_t v = static_cast<acc_t>(in[at]);
      if (out != nullptr) out[at] = static_cast<T>(v * scale + shift);
      total += v;
      if (sum_aux != nullptr) total_aux += v * static_cast<acc_t>(aux[at]);
    }
  }
  if (sum_in == nullptr && sum_aux == nullptr) return;
  shared_in[threadIdx.y][threadIdx.x] = total;
  shared_aux[threadIdx.y][threadIdx.x] = total_aux;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    acc_t a = 0, b = 0;
    for (int y = 0; y < static_cast<int>(blockDim.y); ++y) {
      a += shared_in[y][threadIdx.x];
      b += shared_aux[y][threadIdx.x];
    }
    if (sum_in != nullptr) sum_in[n * C + c] = a;
    if (sum_aux != nullptr) sum_aux[n * C + c] = b;
  }
}

// One pass over the activation `in` (N, C, P positions) in its memory format: writes out (when defined;
// may be `in` itself) = in * f_k + add_k and the (N, C) opmath sums sum_in, sum_aux (when defined).
void scale_channels(const at::Tensor& in, const at::Tensor& f, const std::optional<at::Tensor>& add,
                    const at::Tensor& aux, const at::Tensor& out, const at::Tensor& sum_in, const at::Tensor& sum_aux,
                    int64_t B, bool channels_last) {
  const int64_t N = in.size(0), C = in.size(1), P = in.size(2) * in.size(3);
  if (N == 0 || C == 0) return;
  if (P == 0) {  // empty images: every sum is zero
    if (sum_in.defined()) sum_in.zero_();
    if (sum_aux.defined()) sum_aux.zero_();
    return;
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "rank1_conv_scale_channels_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ip = in.const_data_ptr<scalar_t>();
    const scalar_t* fp = f.defined() ? f.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* ap = defined(add) ? add->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* xp = aux.defined() ? aux.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.defined() ? out.data_ptr<scalar_t>() : nullptr;
    acc_t* s1 = sum_in.defined() ? sum_in.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* s2 = sum_aux.defined() ? sum_aux.mutable_data_ptr<acc_t>() : nullptr;
    if (channels_last) {
      const dim3 block(32, 8);
      const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(ceil_div(C, 32)));
      scale_channels_nhwc_kernel<scalar_t><<<grid, block, 0, stream>>>(ip, fp, ap, xp, op, s1, s2, C, P, B);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const int vec = vector_width<scalar_t>(P, {ip, xp, op});
    const int64_t rows = N * C;
    int lanes = 32;  // the largest power of two <= 32 that still gives each lane a vector of every row
    while (lanes > 1 && lanes * vec > P) lanes /= 2;
    auto launch = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      scale_channels_nchw_kernel<scalar_t, V><<<blocks_for(ceil_div(rows, 32 / lanes) * 32), kThreads, 0, stream>>>(
          ip, fp, ap, xp, op, s1, s2, rows, C, P, B, lanes);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec == 8) launch(std::integral_constant<int, 8>{});
    else if (vec == 4) launch(std::integral_constant<int, 4>{});
    else if (vec == 2) launch(std::integral_constant<int, 2>{});
    else launch(std::integral_constant<int, 1>{});
  });
}

// (N, C) opmath per-image sums -> (E, C) per-member sums in dtype.
at::Tensor member_sums(const at::Tensor& per_image, const Dims& d, at::ScalarType dtype) {
  return per_image.view({d.E, d.B, per_image.size(1)}).sum(1).to(dtype);
}

// ---- convolutions ----------------------------------------------------------------------------------

bool use_cudnn(const at::Tensor& x) {
  return at::globalContext().userEnabledCuDNN() && at::detail::getCUDAHooks().compiledWithCuDNN() &&
         (x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 ||
          x.scalar_type() == at::kDouble);
}

// out (contiguous in x's memory format) = conv(xk, wk), written in place by cuDNN when available.
void member_conv_into(at::Tensor out, const at::Tensor& xk, const at::Tensor& wk, const Geometry& geo, bool cudnn) {
  if (cudnn) {
    auto& ctx = at::globalContext();
    at::cudnn_convolution_out(out, xk, wk, geo.padding, geo.stride, geo.dilation, geo.groups, ctx.benchmarkCuDNN(),
                              ctx.deterministicCuDNN() || ctx.deterministicAlgorithms(), ctx.allowTF32CuDNN());
  } else {
    out.copy_(at::convolution(xk, wk, std::nullopt, geo.stride, geo.padding, geo.dilation, false, {0, 0},
                              geo.groups));
  }
}

at::Tensor empty_like_format(at::IntArrayRef sizes, const at::Tensor& x, at::MemoryFormat fmt) {
  return at::empty(sizes, x.options().memory_format(fmt));
}

std::optional<at::Tensor> contiguous_opt(const std::optional<at::Tensor>& t) {
  return defined(t) ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// ---- batch_ensemble_conv2d ---------------------------------------------------------------------------

// conv(xr, weight) over all images at once (cuDNN through ATen), in xr's memory format.
at::Tensor conv_all(const at::Tensor& xr, const at::Tensor& weight, const Geometry& geo, at::MemoryFormat fmt) {
  return at::convolution(xr, weight.contiguous(fmt), std::nullopt, geo.stride, geo.padding, geo.dilation, false,
                         {0, 0}, geo.groups)
      .contiguous(fmt);
}

// xr = x * r_k, one pass.
at::Tensor scale_input(const at::Tensor& xc, const at::Tensor& r, const Dims& d, at::MemoryFormat fmt) {
  at::Tensor xr = empty_like_format(xc.sizes(), xc, fmt);
  scale_channels(xc, r.contiguous(), std::nullopt, at::Tensor(), xr, at::Tensor(), at::Tensor(), d.B,
                 fmt == at::MemoryFormat::ChannelsLast);
  return xr;
}

// y = conv(x * r_k, W) * s_k + bias_k as one convolution of all E*B images between two scaling passes;
// keep_pre: also return pre = conv(x * r_k, W) (y gets its own buffer), else y overwrites it.
std::tuple<at::Tensor, at::Tensor> one_conv_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& r,
                                                    const at::Tensor& s, const std::optional<at::Tensor>& bias,
                                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                                    at::IntArrayRef dilation, int64_t groups, bool keep_pre) {
  const Geometry geo = make_geometry(stride, padding, dilation, groups);
  const Dims d = check_conv(x, weight, r, s, geo);
  check_optional(bias, x, {d.E, d.O}, "bias");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat fmt = activation_format(x);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  if (d.N == 0) {
    at::Tensor y = empty_like_format({d.N, d.O, d.Ho, d.Wo}, x, fmt);
    return {y, keep_pre ? empty_like_format({d.N, d.O, d.Ho, d.Wo}, x, fmt) : at::empty({0}, x.options())};
  }
  const at::Tensor pre = conv_all(scale_input(x.contiguous(fmt), r, d, fmt), weight, geo, fmt);
  at::Tensor y = keep_pre ? at::empty_like(pre) : pre;
  scale_channels(pre, s.contiguous(), contiguous_opt(bias), at::Tensor(), y, at::Tensor(), at::Tensor(), d.B,
                 channels_last);
  return {y, keep_pre ? pre : at::empty({0}, x.options())};
}

at::Tensor batch_ensemble_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& r,
                                      const at::Tensor& s, const std::optional<at::Tensor>& bias,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups) {
  return std::get<0>(one_conv_forward(x, weight, r, s, bias, stride, padding, dilation, groups, false));
}

std::tuple<at::Tensor, at::Tensor> batch_ensemble_conv2d_train_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                    const at::Tensor& r, const at::Tensor& s,
                                                                    const std::optional<at::Tensor>& bias,
                                                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                                                    at::IntArrayRef dilation, int64_t groups) {
  return one_conv_forward(x, weight, r, s, bias, stride, padding, dilation, groups, true);
}

// With gc = g * s_k: db_k = sum g, ds_k = sum g * pre, (dxr, dW) = conv backward of gc at input xr (one
// call over all images), dx = dxr * r_k, dr_k = sum dxr * x (sums over member k's images and positions).
// pre absent: recomputed (one more convolution) when ds is needed.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_ensemble_conv2d_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& r,
    const at::Tensor& s, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 5> output_mask, const std::optional<at::Tensor>& pre) {
  const Geometry geo = make_geometry(stride, padding, dilation, groups);
  const Dims d = check_conv(x, weight, r, s, geo);
  check_shape(grad_y, {d.N, d.O, d.Ho, d.Wo}, "grad_y");
  check_same_kind(x, grad_y, "grad_y");
  const bool have_pre = defined(pre) && pre->dim() == 4;  // the CPU train op returns an empty 1-D pre
  if (have_pre) {
    check_shape(*pre, {d.N, d.O, d.Ho, d.Wo}, "pre");
    check_same_kind(x, *pre, "pre");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const bool need_x = output_mask[0], need_w = output_mask[1], need_r = output_mask[2], need_s = output_mask[3],
             need_b = output_mask[4];
  const bool need_conv = need_x || need_w || need_r;
  const at::MemoryFormat fmt = activation_format(x);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const auto opts = x.options();
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  at::Tensor dx = at::empty({0}, opts), dw = at::empty({0}, opts), dr = at::empty({0}, opts),
             ds = at::empty({0}, opts), db = at::empty({0}, opts);
  if (d.N == 0) {  // no images: every gradient is zero
    if (need_x) dx = empty_like_format(x.sizes(), x, fmt);
    if (need_w) dw = at::zeros(weight.sizes(), opts);
    if (need_r) dr = at::zeros({d.E, d.C}, opts);
    if (need_s) ds = at::zeros({d.E, d.O}, opts);
    if (need_b) db = at::zeros({d.E, d.O}, opts);
    return {dx, dw, dr, ds, db};
  }
  const at::Tensor xc = x.contiguous(fmt), g = grad_y.contiguous(fmt);
  at::Tensor xr;
  if (need_w || (need_s && !have_pre)) xr = scale_input(xc, r, d, fmt);
  at::Tensor pre_used;
  if (need_s) pre_used = have_pre ? pre->contiguous(fmt) : conv_all(xr, weight, geo, fmt);
  at::Tensor g_sum = need_b ? at::empty({d.N, d.O}, opts.dtype(acc_type)) : at::Tensor();
  at::Tensor g_pre = need_s ? at::empty({d.N, d.O}, opts.dtype(acc_type)) : at::Tensor();
  at::Tensor gc = need_conv ? at::empty_like(g) : at::Tensor();
  if (need_conv || need_s || need_b) {
    scale_channels(g, s.contiguous(), std::nullopt, pre_used, gc, g_sum, g_pre, d.B, channels_last);
  }
  if (need_b) db = member_sums(g_sum, d, x.scalar_type());
  if (need_s) ds = member_sums(g_pre, d, x.scalar_type());
  if (need_conv) {
    auto [dxr, dw_all, unused] =
        at::convolution_backward(gc, need_w ? xr : xc, weight.contiguous(fmt), at::OptionalIntArrayRef(), geo.stride,
                                 geo.padding, geo.dilation, false, {0, 0}, geo.groups, {need_x || need_r, need_w, false});
    if (need_w) dw = dw_all.contiguous();
    if (need_x || need_r) {
      dxr = dxr.contiguous(fmt);
      at::Tensor dxr_x = need_r ? at::empty({d.N, d.C}, opts.dtype(acc_type)) : at::Tensor();
      // dx = dxr * r_k in place, with dr's sums read before each element is overwritten
      scale_channels(dxr, r.contiguous(), std::nullopt, need_r ? xc : at::Tensor(), need_x ? dxr : at::Tensor(),
                     at::Tensor(), dxr_x, d.B, channels_last);
      if (need_x) dx = dxr;
      if (need_r) dr = member_sums(dxr_x, d, x.scalar_type());
    }
  }
  return {dx, dw, dr, ds, db};
}

// ---- hyper_batch_ensemble_conv2d ---------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> hyper_batch_ensemble_conv2d_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& delta, const at::Tensor& r, const at::Tensor& s,
    const at::Tensor& u, const at::Tensor& v, const at::Tensor& e1, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& delta_bias, const std::optional<at::Tensor>& e2, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool save_hd) {
  const Geometry geo = make_geometry(stride, padding, dilation, groups);
  const Dims d = check_conv(x, weight, r, s, geo);
  check_optional(bias, x, {d.E, d.O}, "bias");
  check_hyper(d, x, weight, delta, u, v, e1, delta_bias, e2);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat fmt = activation_format(x);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor xc = x.contiguous(fmt), e1c = e1.contiguous();
  const auto bc = contiguous_opt(bias), dbc = contiguous_opt(delta_bias), e2c = contiguous_opt(e2);
  const at::Tensor both_w = fold_stacked_weights(weight, s, r, delta, v, u, d, channels_last);
  at::Tensor y = empty_like_format({d.N, d.O, d.Ho, d.Wo}, x, fmt);
  at::Tensor hd = save_hd ? empty_like_format({d.N, d.O, d.Ho, d.Wo}, x, fmt) : at::empty({0}, x.options());
  if (y.numel() == 0) return {y, hd};
  at::Tensor both = empty_like_format({d.N, 2 * d.O, d.Ho, d.Wo}, x, fmt);
  const bool cudnn = use_cudnn(x);
  for (int64_t k = 0; k < d.E; ++k) {
    member_conv_into(both.narrow(0, k * d.B, d.B), xc.narrow(0, k * d.B, d.B), both_w[k], geo, cudnn);
  }
  at::Tensor hd_out = save_hd ? hd : at::Tensor();
  hyper_epilogue(both, e1c, bc, dbc, e2c, d, channels_last, y, hd_out);
  return {y, hd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
hyper_batch_ensemble_conv2d_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                          const at::Tensor& delta, const at::Tensor& r, const at::Tensor& s,
                                          const at::Tensor& u, const at::Tensor& v, const at::Tensor& e1,
                                          const std::optional<at::Tensor>& delta_bias,
                                          const std::optional<at::Tensor>& e2, const at::Tensor& hd,
                                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                          int64_t groups, std::array<bool, 11> output_mask) {
  const Geometry geo = make_geometry(stride, padding, dilation, groups);
  const Dims d = check_conv(x, weight, r, s, geo);
  check_hyper(d, x, weight, delta, u, v, e1, delta_bias, e2);
  check_shape(grad_y, {d.N, d.O, d.Ho, d.Wo}, "grad_y");
  check_same_kind(x, grad_y, "grad_y");
  const bool have_hd = hd.dim() == 4;  // the forward returns a 1-D empty hd when it saved none
  if (have_hd) {
    check_shape(hd, {d.N, d.O, d.Ho, d.Wo}, "hd");
    check_same_kind(x, hd, "hd");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const bool need_x = output_mask[0], need_w = output_mask[1], need_delta = output_mask[2], need_r = output_mask[3],
             need_s = output_mask[4], need_u = output_mask[5], need_v = output_mask[6], need_e1 = output_mask[7],
             need_b = output_mask[8];
  const bool has_db = defined(delta_bias);
  const bool need_db = output_mask[9] && has_db, need_e2 = output_mask[10] && has_db;
  const bool need_g = need_w || need_r || need_s || need_delta || need_u || need_v;
  const at::MemoryFormat fmt = activation_format(x);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const auto opts = x.options();
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  const at::Tensor xc = x.contiguous(fmt), g = grad_y.contiguous(fmt), e1c = e1.contiguous();
  const at::Tensor both_w = fold_stacked_weights(weight, s, r, delta, v, u, d, channels_last);

  at::Tensor dx = need_x ? empty_like_format(x.sizes(), x, fmt) : at::empty({0}, opts);
  at::Tensor grads = need_g ? member_weight_buffer(d, 2, channels_last, opts) : at::Tensor();
  at::Tensor g_sum = at::zeros({d.N, d.O}, opts.dtype(acc_type));
  at::Tensor g_hd = need_e1 ? at::zeros({d.N, d.O}, opts.dtype(acc_type)) : at::Tensor();
  if (d.N == 0) {
    if (need_g) grads.zero_();
  } else {
    at::Tensor hd_used;
    if (need_e1) {
      if (have_hd) {
        hd_used = hd.contiguous(fmt);
      } else {  // not saved by the forward: recompute hd = conv(x, D_k) per member
        const at::Tensor folded_d = fold_weight(delta, v, u, d, channels_last);
        hd_used = empty_like_format({d.N, d.O, d.Ho, d.Wo}, x, fmt);
        const bool cudnn = use_cudnn(x);
        for (int64_t k = 0; k < d.E; ++k) {
          member_conv_into(hd_used.narrow(0, k * d.B, d.B), xc.narrow(0, k * d.B, d.B), folded_d[k], geo, cudnn);
        }
      }
    }
    at::Tensor stacked = empty_like_format({d.N, 2 * d.O, d.Ho, d.Wo}, x, fmt);
    hyper_grad_prep(g, e1c, hd_used, d, channels_last, stacked, g_sum, g_hd);
    if (need_x || need_g) {
      for (int64_t k = 0; k < d.E; ++k) {
        auto [dxk, gk, unused] = at::convolution_backward(
            stacked.narrow(0, k * d.B, d.B), xc.narrow(0, k * d.B, d.B), both_w[k], at::OptionalIntArrayRef(),
            geo.stride, geo.padding, geo.dilation, false, {0, 0}, geo.groups, {need_x, need_g, false});
        if (need_x) dx.narrow(0, k * d.B, d.B).copy_(dxk);
        if (need_g) grads[k].copy_(gk);
      }
    }
  }
  at::Tensor dw = at::empty({0}, opts), dr = at::empty({0}, opts), ds = at::empty({0}, opts);
  at::Tensor ddelta = at::empty({0}, opts), du = at::empty({0}, opts), dv = at::empty({0}, opts);
  reduce_weight_grad(grads, member_weight_rows(d, 2, 0, channels_last), weight, s, r, d, need_w, need_s, need_r, dw,
                     ds, dr);
  reduce_weight_grad(grads, member_weight_rows(d, 2, 1, channels_last), delta, v, u, d, need_delta, need_v, need_u,
                     ddelta, dv, du);
  at::Tensor de1 = need_e1 ? g_hd.to(x.scalar_type()) : at::empty({0}, opts);
  auto [db, ddb, de2] = hyper_bias_grads(g_sum, delta_bias, e2, d, need_b, need_db, need_e2, x.scalar_type());
  return {dx, dw, ddelta, dr, ds, du, dv, de1, db, ddb, de2};
}

}  // namespace

TORCH_LIBRARY_IMPL(hyperkern, CUDA, m) {
  m.impl("batch_ensemble_conv2d", &batch_ensemble_conv2d_cuda);
  m.impl("batch_ensemble_conv2d_train", &batch_ensemble_conv2d_train_cuda);
  m.impl("batch_ensemble_conv2d_backward", &batch_ensemble_conv2d_backward_cuda);
  m.impl("hyper_batch_ensemble_conv2d", &hyper_batch_ensemble_conv2d_cuda);
  m.impl("hyper_batch_ensemble_conv2d_backward", &hyper_batch_ensemble_conv2d_backward_cuda);
}

}  // namespace rank1_conv
}  // namespace hyperkern
