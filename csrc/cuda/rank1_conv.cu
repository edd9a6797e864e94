// CUDA kernels of the rank-1 ensemble conv2d ops (schemas in csrc/ops.cpp, autograd in csrc/autograd.cpp,
// fake kernels in hyperkern/ops/_cpp_conv.py).
//
// Both ops run the one-convolution scheme of csrc/one_conv.h: every convolution covers all E*B images
// with the shared weight (cuDNN through ATen), and the fast weights and per-row hyperparameter factors
// are scaling passes around it, done by this file's fused kernels (scale_channels: one pass that scales,
// shifts and sums per (image, channel), then a small deterministic reduction per requested sum, which
// hands the host each gradient in its final shape and dtype; buffers from at::detail::empty_cuda, no
// dispatcher call). Batch op: x*r_k -> conv -> *s_k + bias_k; its backward reads the
// unscaled output kept by the train op. Hyper op: two convolutions (W on x*r_k, delta on x*u_k) combined
// with s_k and the per-image v_k*e1 rows; its backward reads both branches kept by its train op.
// On an H200 the batch op's scheme beat one cuDNN convolution per member with folded weights
// W_k = W * s_k r_k^T (the CPU kernel's scheme; WRN-28-10 train step 50.2 -> 42.9 ms, plain 37.1): cuDNN
// at B images per call is slower than at E*B images, and each member's weight was folded and transposed
// (docs/benchmark-history.md, GPU run 2). The price is memory: the kept convolution outputs.
#include "../one_conv.h"
#include "../rank1_conv.h"

#include <ATen/Context.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/EmptyTensor.h>
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

// ---- the scaling kernels of the one-convolution scheme (csrc/one_conv.h: P::scale_channels) ------

// A coefficient of the pass (one_conv::Coef): c[n, ch] = member[(n / B) * member_stride + ch] *
// rows[n * rows_stride + ch], either factor optional; `none` when both are absent.
template <typename T>
struct CoefPtr {
  const T* member;
  const T* rows;
  int64_t member_stride, rows_stride;

  __device__ __forceinline__ at::opmath_type<T> at(int64_t n, int64_t c, int64_t B,
                                                   at::opmath_type<T> none) const {
    using acc_t = at::opmath_type<T>;
    if (member != nullptr && rows != nullptr) {
      return static_cast<acc_t>(member[(n / B) * member_stride + c]) * static_cast<acc_t>(rows[n * rows_stride + c]);
    }
    if (member != nullptr) return static_cast<acc_t>(member[(n / B) * member_stride + c]);
    if (rows != nullptr) return static_cast<acc_t>(rows[n * rows_stride + c]);
    return none;
  }
};

template <typename T>
CoefPtr<T> coef_ptr(const one_conv::Coef& c) {
  return {c.member.defined() ? c.member.const_data_ptr<T>() : nullptr,
          c.rows.defined() ? c.rows.const_data_ptr<T>() : nullptr, c.member.defined() ? c.member.stride(0) : 0,
          c.rows.defined() ? c.rows.stride(0) : 0};
}

// out[n, c, p] = in[n, c, p] * scale[n, c] + shift[n, c] (+ out[n, c, p] when accumulate; out optional, may
// alias in when not accumulating) and the per-(image, channel) sums over positions sum_in[n, c] = sum_p in,
// sum_aux[n, c] = sum_p in * aux (each optional; opmath). NCHW: `lanes` threads (a power of two <= 32, about
// P / VEC) per (n, c) row of P positions, 32 / lanes rows per warp; each lane loads kUnroll vectors before
// using them (memory-level parallelism: the loads cannot be reordered past the stores otherwise, as out may
// alias in).
constexpr int kUnroll = 4;

template <typename T, int VEC>
__global__ void scale_channels_nchw_kernel(const T* in, CoefPtr<T> scale_c, CoefPtr<T> shift_c, const T* aux, T* out,
                                           bool accumulate, at::opmath_type<T>* __restrict__ sum_in,
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
      const int64_t n = row / C, c = row % C;
      const acc_t scale = scale_c.at(n, c, B, acc_t(1));
      const acc_t shift = shift_c.at(n, c, B, acc_t(0));
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
            Vec<T, VEC>* dst = reinterpret_cast<Vec<T, VEC>*>(out + row * P + p);
            Vec<T, VEC> o;
            if (accumulate) o = *dst;  // out does not alias in here
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
              const acc_t value = static_cast<acc_t>(v[u].v[j]) * scale + shift;
              o.v[j] = static_cast<T>(accumulate ? value + static_cast<acc_t>(o.v[j]) : value);
            }
            *dst = o;
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
__global__ void scale_channels_nhwc_kernel(const T* in, CoefPtr<T> scale_c, CoefPtr<T> shift_c, const T* aux, T* out,
                                           bool accumulate, at::opmath_type<T>* __restrict__ sum_in,
                                           at::opmath_type<T>* __restrict__ sum_aux, int64_t C, int64_t P,
                                           int64_t B) {
  using acc_t = at::opmath_type<T>;
  __shared__ acc_t shared_in[8][33], shared_aux[8][33];
  const int64_t n = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * 32 + threadIdx.x;
  acc_t total = 0, total_aux = 0;
  if (c < C) {
    const acc_t scale = scale_c.at(n, c, B, acc_t(1));
    const acc_t shift = shift_c.at(n, c, B, acc_t(0));
    for (int64_t p = threadIdx.y; p < P; p += blockDim.y) {
      const int64_t at = (n * P + p) * C + c;
      const acc_t v = static_cast<acc_t>(in[at]);
      if (out != nullptr) {
        const acc_t value = v * scale + shift;
        out[at] = static_cast<T>(accumulate ? value + static_cast<acc_t>(out[at]) : value);
      }
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

// One Sum of a pass from its (N, C) opmath per-image sums: out[j, c] = sum over the images n of group j
// (j * group .. (j + 1) * group - 1, in order) of weight[n, c] * per_image[n, c], accumulated in opmath and
// written in Out (the input's dtype or its opmath type). One thread per output element: deterministic.
template <typename T, typename Out>
__global__ void reduce_sum_kernel(const at::opmath_type<T>* __restrict__ per_image, CoefPtr<T> weight,
                                  Out* __restrict__ out, int64_t outputs, int64_t C, int64_t group, int64_t B) {
  using acc_t = at::opmath_type<T>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < outputs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = i / C, c = i % C;
    acc_t total = 0;
    for (int64_t n = j * group; n < (j + 1) * group; ++n) total += weight.at(n, c, B, acc_t(1)) * per_image[n * C + c];
    out[i] = static_cast<Out>(total);
  }
}

// The hp ops' embedding, one thread per output: e[n, o'] = sum_j hparams[n, j] * embedding[o', j] for the
// R = O or 2*O rows of embedding (o' < O into e1, else into e2), accumulated in opmath.
template <typename T>
__global__ void embed_kernel(const T* __restrict__ hp, int64_t hs0, int64_t hs1, const T* __restrict__ em,
                             int64_t es0, int64_t es1, T* __restrict__ e1, T* __restrict__ e2, int64_t N, int64_t O,
                             int64_t R, int64_t m) {
  using acc_t = at::opmath_type<T>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < N * R;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / R, o = i % R;
    acc_t total = 0;
    for (int64_t j = 0; j < m; ++j) total += static_cast<acc_t>(hp[n * hs0 + j * hs1]) * static_cast<acc_t>(em[o * es0 + j * es1]);
    if (o < O) e1[n * O + o] = static_cast<T>(total);
    else e2[n * O + o - O] = static_cast<T>(total);
  }
}

// Its backward, one thread per output: dembedding[o', j] = sum_n de[n, o'] * hparams[n, j] (the first R * m
// threads) and dhparams[n, j] = sum_o' de[n, o'] * embedding[o', j] (the next N * m), de = [de1 | de2];
// either output may be null.
template <typename T>
struct DePtr {
  const T* d1;
  const T* d2;
  int64_t s10, s11, s20, s21, O;
  __device__ __forceinline__ at::opmath_type<T> at(int64_t n, int64_t o) const {
    return o < O ? static_cast<at::opmath_type<T>>(d1[n * s10 + o * s11])
                 : static_cast<at::opmath_type<T>>(d2[n * s20 + (o - O) * s21]);
  }
};

template <typename T>
__global__ void embed_backward_kernel(DePtr<T> de, const T* __restrict__ hp, int64_t hs0, int64_t hs1,
                                      const T* __restrict__ em, int64_t es0, int64_t es1, T* __restrict__ dhp,
                                      T* __restrict__ dem, int64_t N, int64_t R, int64_t m) {
  using acc_t = at::opmath_type<T>;
  const int64_t n_emb = dem != nullptr ? R * m : 0, total_outputs = n_emb + (dhp != nullptr ? N * m : 0);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total_outputs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t total = 0;
    if (i < n_emb) {
      const int64_t o = i / m, j = i % m;
      for (int64_t n = 0; n < N; ++n) total += de.at(n, o) * static_cast<acc_t>(hp[n * hs0 + j * hs1]);
      dem[i] = static_cast<T>(total);
    } else {
      const int64_t k = i - n_emb, n = k / m, j = k % m;
      for (int64_t o = 0; o < R; ++o) total += de.at(n, o) * static_cast<acc_t>(em[o * es0 + j * es1]);
      dhp[k] = static_cast<T>(total);
    }
  }
}

// The primitive set of csrc/one_conv.h on CUDA (AtenPrims in tests/harness/one_conv_harness.cpp is its
// specification in ATen ops). scale_channels: one pass over the activation `in` (N, C, P positions) in its
// memory format writing out and the (N, C) opmath per-image sums into a scratch buffer, then one small
// reduction kernel per Sum.
struct CudaPrims {
  static at::Tensor empty(at::IntArrayRef sizes, const at::Tensor& like, at::ScalarType dtype, at::MemoryFormat fmt) {
    return at::Tensor(at::detail::empty_cuda(sizes, dtype, like.device(), fmt));
  }

  static void scale_channels(const one_conv::Pass& pass) {
    const at::Tensor& in = pass.in;
    const int64_t N = in.size(0), C = in.size(1), P = in.size(2) * in.size(3);
    if (N == 0 || C == 0) return;
    bool need_in = false, need_aux = false;
    for (const one_conv::Sum& s : pass.sums) (s.of_aux ? need_aux : need_in) = true;
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "rank1_conv_scale_channels_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const at::Tensor scratch =
          need_in || need_aux
              ? empty({(need_in ? 1 : 0) + (need_aux ? 1 : 0), N, C}, in, c10::CppTypeToScalarType<acc_t>::value,
                      at::MemoryFormat::Contiguous)
              : at::Tensor();
      acc_t* s1 = need_in ? scratch.mutable_data_ptr<acc_t>() : nullptr;
      acc_t* s2 = need_aux ? scratch.mutable_data_ptr<acc_t>() + (need_in ? N * C : 0) : nullptr;
      if (P == 0) {  // empty images: every per-image sum is zero, nothing to write
        if (scratch.defined()) {
          C10_CUDA_CHECK(cudaMemsetAsync(scratch.mutable_data_ptr<acc_t>(), 0, scratch.numel() * sizeof(acc_t),
                                         stream));
        }
      } else {
        const scalar_t* ip = in.const_data_ptr<scalar_t>();
        const CoefPtr<scalar_t> scale = coef_ptr<scalar_t>(pass.scale), shift = coef_ptr<scalar_t>(pass.shift);
        const scalar_t* xp = need_aux ? pass.aux.const_data_ptr<scalar_t>() : nullptr;
        scalar_t* op = pass.out.defined() ? pass.out.data_ptr<scalar_t>() : nullptr;
        const bool acc = pass.accumulate;
        if (pass.channels_last) {
          const dim3 block(32, 8);
          const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(ceil_div(C, 32)));
          scale_channels_nhwc_kernel<scalar_t><<<grid, block, 0, stream>>>(ip, scale, shift, xp, op, acc, s1, s2, C, P,
                                                                          pass.B);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          const int vec = vector_width<scalar_t>(P, {ip, xp, op});
          const int64_t rows = N * C;
          int lanes = 32;  // the largest power of two <= 32 that still gives each lane a vector of every row
          while (lanes > 1 && lanes * vec > P) lanes /= 2;
          auto launch = [&](auto vec_tag) {
            constexpr int V = decltype(vec_tag)::value;
            scale_channels_nchw_kernel<scalar_t, V><<<blocks_for(ceil_div(rows, 32 / lanes) * 32), kThreads, 0,
                                                      stream>>>(ip, scale, shift, xp, op, acc, s1, s2, rows, C, P,
                                                                pass.B, lanes);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          };
          if (vec == 8) launch(std::integral_constant<int, 8>{});
          else if (vec == 4) launch(std::integral_constant<int, 4>{});
          else if (vec == 2) launch(std::integral_constant<int, 2>{});
          else launch(std::integral_constant<int, 1>{});
        }
      }
      for (const one_conv::Sum& s : pass.sums) {
        const int64_t outputs = (N / s.group) * C;
        const acc_t* src = s.of_aux ? s2 : s1;
        const CoefPtr<scalar_t> weight = coef_ptr<scalar_t>(s.weight);
        if (s.out.scalar_type() == c10::CppTypeToScalarType<acc_t>::value) {
          reduce_sum_kernel<scalar_t, acc_t><<<blocks_for(outputs), kThreads, 0, stream>>>(
              src, weight, s.out.mutable_data_ptr<acc_t>(), outputs, C, s.group, pass.B);
        } else {
          TORCH_CHECK(s.out.scalar_type() == in.scalar_type(),
                      "hyperkern rank-1 conv2d: a sum's dtype must be the input's or its opmath type");
          reduce_sum_kernel<scalar_t, scalar_t><<<blocks_for(outputs), kThreads, 0, stream>>>(
              src, weight, s.out.mutable_data_ptr<scalar_t>(), outputs, C, s.group, pass.B);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }

  static void embed(const at::Tensor& hparams, const at::Tensor& embedding, const at::Tensor& e1,
                    const at::Tensor& e2) {
    const int64_t N = hparams.size(0), m = hparams.size(1), O = e1.size(1), R = e2.defined() ? 2 * O : O;
    if (N * R == 0) return;
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hparams.scalar_type(), "rank1_conv_embed_cuda", [&] {
      embed_kernel<scalar_t><<<blocks_for(N * R), kThreads, 0, stream>>>(
          hparams.const_data_ptr<scalar_t>(), hparams.stride(0), hparams.stride(1),
          embedding.const_data_ptr<scalar_t>(), embedding.stride(0), embedding.stride(1),
          e1.mutable_data_ptr<scalar_t>(), e2.defined() ? e2.mutable_data_ptr<scalar_t>() : nullptr, N, O, R, m);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void embed_backward(const at::Tensor& de1, const at::Tensor& de2, const at::Tensor& hparams,
                             const at::Tensor& embedding, const at::Tensor& dhparams, const at::Tensor& dembedding) {
    const int64_t N = hparams.size(0), m = hparams.size(1), R = embedding.size(0);
    const int64_t outputs = (dembedding.defined() ? R * m : 0) + (dhparams.defined() ? N * m : 0);
    if (outputs == 0) return;
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hparams.scalar_type(), "rank1_conv_embed_backward_cuda",
                                    [&] {
      const DePtr<scalar_t> de{de1.const_data_ptr<scalar_t>(),
                               de2.defined() ? de2.const_data_ptr<scalar_t>() : nullptr,
                               de1.stride(0),
                               de1.stride(1),
                               de2.defined() ? de2.stride(0) : 0,
                               de2.defined() ? de2.stride(1) : 0,
                               de1.size(1)};
      embed_backward_kernel<scalar_t><<<blocks_for(outputs), kThreads, 0, stream>>>(
          de, hparams.const_data_ptr<scalar_t>(), hparams.stride(0), hparams.stride(1),
          embedding.const_data_ptr<scalar_t>(), embedding.stride(0), embedding.stride(1),
          dhparams.defined() ? dhparams.mutable_data_ptr<scalar_t>() : nullptr,
          dembedding.defined() ? dembedding.mutable_data_ptr<scalar_t>() : nullptr, N, R, m);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

// ---- batch_ensemble_conv2d ---------------------------------------------------------------------------

at::Tensor batch_ensemble_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& r,
                                      const at::Tensor& s, const std::optional<at::Tensor>& bias,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups) {
  const Geometry geo = make_geometry(stride, padding, dilation, groups);
  const Dims d = check_conv(x, weight, r, s, geo);
  check_optional(bias, x, {d.E, d.O}, "bias");
  const c10::cuda::CUDAGuard guard(x.device());
  return std::get<0>(one_conv::batch_forward<CudaPrims>(x, weight, r, s, bias, geo, d, false));
}

std::tuple<at::Tensor, at::Tensor> batch_ensemble_conv2d_train_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                    const at::Tensor& r, const at::Tensor& s,
                                                                    const std::optional<at::Tensor>& bias,
                                                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                                                    at::IntArrayRef dilation, int64_t groups) {
  const Geometry geo = make_geometry(stride, padding, dilation, groups);
  const Dims d = check_conv(x, weight, r, s, geo);
  check_optional(bias, x, {d.E, d.O}, "bias");
  const c10::cuda::CUDAGuard guard(x.device());
  return one_conv::batch_forward<CudaPrims>(x, weight, r, s, bias, geo, d, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_ensemble_conv2d_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& r,
    const at::Tensor& s, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 5> output_mask, const std::optional<at::Tensor>& pre) {
  const Geometry geo = make_geometry(stride, padding, dilation, groups);
  const Dims d = check_conv(x, weight, r, s, geo);
  check_shape(grad_y, {d.N, d.O, d.Ho, d.Wo}, "grad_y");
  check_same_kind(x, grad_y, "grad_y");
  check_kept(pre, x, d, "pre");
  const c10::cuda::CUDAGuard guard(x.device());
  return one_conv::batch_backward<CudaPrims>(grad_y, x, weight, r, s, pre, geo, d, output_mask);
}

// ---- hyper_batch_ensemble_conv2d ---------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hyper_forward_checked(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& delta, const at::Tensor& r, const at::Tensor& s,
    const at::Tensor& u, const at::Tensor& v, const at::Tensor& e1, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& delta_bias, const std::optional<at::Tensor>& e2, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool save_hd, bool keep_branches) {
  const Geometry geo = make_geometry(stride, padding, dilation, groups);
  const Dims d = check_conv(x, weight, r, s, geo);
  check_optional(bias, x, {d.E, d.O}, "bias");
  check_hyper(d, x, weight, delta, u, v, e1, delta_bias, e2);
  const c10::cuda::CUDAGuard guard(x.device());
  return one_conv::hyper_forward<CudaPrims>(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, geo, d, save_hd,
                                            keep_branches);
}

std::tuple<at::Tensor, at::Tensor> hyper_batch_ensemble_conv2d_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& delta, const at::Tensor& r, const at::Tensor& s,
    const at::Tensor& u, const at::Tensor& v, const at::Tensor& e1, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& delta_bias, const std::optional<at::Tensor>& e2, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool save_hd) {
  auto [y, hd, h, hr] = hyper_forward_checked(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, stride, padding,
                                              dilation, groups, save_hd, false);
  return {y, hd};
}

// The train op on CUDA keeps the two branches' convolutions (h, hr), which its backward reads; no hd.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hyper_batch_ensemble_conv2d_train_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& delta, const at::Tensor& r, const at::Tensor& s,
    const at::Tensor& u, const at::Tensor& v, const at::Tensor& e1, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& delta_bias, const std::optional<at::Tensor>& e2, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool /*save_hd*/) {
  return hyper_forward_checked(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, stride, padding, dilation,
                               groups, false, true);
}

// hd (the op's documented v_k * conv(x * u_k, delta)) is not read: the backward uses the train op's h and
// hr, or recomputes them.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
hyper_batch_ensemble_conv2d_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                          const at::Tensor& delta, const at::Tensor& r, const at::Tensor& s,
                                          const at::Tensor& u, const at::Tensor& v, const at::Tensor& e1,
                                          const std::optional<at::Tensor>& delta_bias,
                                          const std::optional<at::Tensor>& e2, const at::Tensor& /*hd*/,
                                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                          int64_t groups, std::array<bool, 11> output_mask,
                                          const std::optional<at::Tensor>& h, const std::optional<at::Tensor>& hr) {
  const Geometry geo = make_geometry(stride, padding, dilation, groups);
  const Dims d = check_conv(x, weight, r, s, geo);
  check_hyper(d, x, weight, delta, u, v, e1, delta_bias, e2);
  check_shape(grad_y, {d.N, d.O, d.Ho, d.Wo}, "grad_y");
  check_same_kind(x, grad_y, "grad_y");
  check_kept(h, x, d, "h");
  check_kept(hr, x, d, "hr");
  const c10::cuda::CUDAGuard guard(x.device());
  return one_conv::hyper_backward<CudaPrims>(grad_y, x, weight, delta, r, s, u, v, e1, delta_bias, e2, h, hr, geo, d,
                                             output_mask);
}

// ---- the hp ops: e = hparams @ embedding^T into transient buffers (CudaPrims::embed, one small kernel),
// then the hyper op's host code; its de1 / de2 reduced into dhparams, dembedding (one more small kernel).

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hp_forward_checked(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& delta, const at::Tensor& r, const at::Tensor& s,
    const at::Tensor& u, const at::Tensor& v, const at::Tensor& hparams, const at::Tensor& embedding,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& delta_bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool save_hd, bool keep_branches) {
  const Dims d = check_conv(x, weight, r, s, make_geometry(stride, padding, dilation, groups));
  check_hp(d, x, hparams, embedding, defined(delta_bias));
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [e1, e2] = one_conv::embed<CudaPrims>(hparams, embedding, x, d, defined(delta_bias));
  return hyper_forward_checked(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, stride, padding, dilation,
                               groups, save_hd, keep_branches);
}

std::tuple<at::Tensor, at::Tensor> hyper_batch_ensemble_conv2d_hp_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& delta, const at::Tensor& r, const at::Tensor& s,
    const at::Tensor& u, const at::Tensor& v, const at::Tensor& hparams, const at::Tensor& embedding,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& delta_bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool save_hd) {
  auto [y, hd, h, hr] = hp_forward_checked(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias, stride,
                                           padding, dilation, groups, save_hd, false);
  return {y, hd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hyper_batch_ensemble_conv2d_hp_train_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& delta, const at::Tensor& r, const at::Tensor& s,
    const at::Tensor& u, const at::Tensor& v, const at::Tensor& hparams, const at::Tensor& embedding,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& delta_bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool /*save_hd*/) {
  return hp_forward_checked(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias, stride, padding,
                            dilation, groups, false, true);
}

one_conv::Grads11 hyper_batch_ensemble_conv2d_hp_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& delta,
    const at::Tensor& r, const at::Tensor& s, const at::Tensor& u, const at::Tensor& v, const at::Tensor& hparams,
    const at::Tensor& embedding, const std::optional<at::Tensor>& delta_bias, const at::Tensor& hd,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 11> output_mask, const std::optional<at::Tensor>& h, const std::optional<at::Tensor>& hr) {
  const Dims d = check_conv(x, weight, r, s, make_geometry(stride, padding, dilation, groups));
  const bool has_db = defined(delta_bias);
  check_hp(d, x, hparams, embedding, has_db);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [e1, e2] = one_conv::embed<CudaPrims>(hparams, embedding, x, d, has_db);
  const one_conv::Grads11 grads = hyper_batch_ensemble_conv2d_backward_cuda(
      grad_y, x, weight, delta, r, s, u, v, e1, delta_bias, e2, hd, stride, padding, dilation, groups,
      one_conv::hyper_mask_of_hp(output_mask, has_db), h, hr);
  return one_conv::hp_grads<CudaPrims>(grads, hparams, embedding, x, output_mask, has_db);
}

}  // namespace

TORCH_LIBRARY_IMPL(hyperkern, CUDA, m) {
  m.impl("batch_ensemble_conv2d", &batch_ensemble_conv2d_cuda);
  m.impl("batch_ensemble_conv2d_train", &batch_ensemble_conv2d_train_cuda);
  m.impl("batch_ensemble_conv2d_backward", &batch_ensemble_conv2d_backward_cuda);
  m.impl("hyper_batch_ensemble_conv2d", &hyper_batch_ensemble_conv2d_cuda);
  m.impl("hyper_batch_ensemble_conv2d_train", &hyper_batch_ensemble_conv2d_train_cuda);
  m.impl("hyper_batch_ensemble_conv2d_backward", &hyper_batch_ensemble_conv2d_backward_cuda);
  m.impl("hyper_batch_ensemble_conv2d_hp", &hyper_batch_ensemble_conv2d_hp_cuda);
  m.impl("hyper_batch_ensemble_conv2d_hp_train", &hyper_batch_ensemble_conv2d_hp_train_cuda);
  m.impl("hyper_batch_ensemble_conv2d_hp_backward", &hyper_batch_ensemble_conv2d_hp_backward_cuda);
}

}  // namespace rank1_conv
}  // namespace hyperkern
