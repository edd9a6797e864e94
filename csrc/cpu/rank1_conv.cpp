// CPU kernels of the rank-1 ensemble conv2d ops (schemas in csrc/ops.cpp; fake kernels and autograd
// in hyperkern/ops/_cpp_conv.py).
//
// x is member-major: images k*B .. (k+1)*B-1 of the (E*B, C, H, W) input belong to member k. NCHW and
// channels-last inputs are both supported; every activation-sized output follows x's memory format.
//
// Design (numbers in docs/benchmark-history.md):
// - The fast weights are folded into the shared weight, W_k = W * s_k r_k^T per member (tiny: E times
//   the weight), so member k is ONE plain convolution of its own B images with W_k (and bias_k fused
//   into it): no activation-sized scaling pass before or after the convolution. The convolutions are
//   ATen's (oneDNN for float32 / bfloat16).
// - Members run in parallel, one member per thread (each convolution single-threaded inside the
//   parallel region, which ATen and oneDNN detect): E convolutions of B images with no thread
//   synchronisation inside them cost less than one multi-threaded convolution of E*B images at
//   these sizes. Leftover members (E not a multiple of the thread count) run afterwards with all
//   threads each.
// - Backward: per member, ATen's convolution backward with the folded weight gives dx_k directly and
//   the member's weight gradient G_k = dL/dW_k (together the same work as one conv backward of the
//   E*B images). Then dW = sum_k G_k * s_k r_k^T, ds_k[o] = sum(G_k * W * r_k)[o, ...] and
//   dr_k[c] = sum(G_k * W * s_k)[..., c, ...] are weight-sized reductions. Nothing activation-sized
//   is saved beyond x, exactly what conv2d keeps.
// - Hyper op: W_k and D_k = delta * v_k u_k^T are stacked into one weight with 2*O output channels
//   (per group: W_k's rows, then D_k's rows), so each member is one convolution producing h and hd;
//   a fused epilogue writes y = h + e1 * hd + bias + delta_bias * e2 (and hd itself when the
//   backward needs it for de1[n, o] = sum_p g * hd). The backward feeds [g | g * e1] through the
//   stacked weight's convolution backward: one pass gives dx and both weight gradients.
#include "../one_conv.h"
#include "../rank1_conv.h"
#include "cpu_util.h"

#include <ATen/EmptyTensor.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace hyperkern {
namespace rank1_conv {
namespace {

// ---- the one-convolution scheme's primitive on the CPU (csrc/one_conv.h: P::scale_channels) ----------

using cpu::narrow_to;
using cpu::widen;


// A coefficient of the pass (one_conv::Coef): c[n, ch] = member[(n / B) * member_stride + ch] *
// rows[n * rows_stride + ch], either factor optional; `none` when both are absent.
template <typename T>
struct CoefPtr {
  const T* member = nullptr;
  const T* rows = nullptr;
  int64_t member_stride = 0, rows_stride = 0;

  explicit CoefPtr(const one_conv::Coef& c) {
    if (c.member.defined()) member = c.member.const_data_ptr<T>(), member_stride = c.member.stride(0);
    if (c.rows.defined()) rows = c.rows.const_data_ptr<T>(), rows_stride = c.rows.stride(0);
  }

  HYPERKERN_INLINE at::opmath_type<T> at(int64_t n, int64_t c, int64_t B, at::opmath_type<T> none) const {
    if (member != nullptr && rows != nullptr) {
      return widen(member[(n / B) * member_stride + c]) * widen(rows[n * rows_stride + c]);
    }
    if (member != nullptr) return widen(member[(n / B) * member_stride + c]);
    if (rows != nullptr) return widen(rows[n * rows_stride + c]);
    return none;
  }
};

template <typename T>
struct ScaleArgs {
  const T* in;
  const T* aux;  // like in, or null (no sum_aux)
  T* out;        // like in (may be in itself), or null
  CoefPtr<T> scale, shift;
  at::opmath_type<T>* sum_in;   // (N, C) per-image sums, or null
  at::opmath_type<T>* sum_aux;  // (N, C) per-image sums of in * aux, or null
  int64_t C, P, B;
  bool channels_last;
};

// NCHW: rows [r0, r1) of (n, c), each P contiguous positions; kLanes independent partial sums per row
// so that the reduction vectorises. Every element is loaded before it is stored (out may be in).
template <typename T, bool kOut, bool kAcc, bool kAux>
HYPERKERN_INLINE void scale_rows_nchw(const ScaleArgs<T>& a, int64_t r0, int64_t r1) {
  using acc_t = at::opmath_type<T>;
  constexpr int kLanes = 16;
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t n = row / a.C, c = row % a.C;
    const acc_t scale = a.scale.at(n, c, a.B, acc_t(1));
    const acc_t shift = a.shift.at(n, c, a.B, acc_t(0));
    const T* in = a.in + row * a.P;
    const T* aux = kAux ? a.aux + row * a.P : nullptr;
    T* out = kOut ? a.out + row * a.P : nullptr;
    acc_t s[kLanes] = {}, sa[kLanes] = {};
    int64_t p = 0;
    for (; p + kLanes <= a.P; p += kLanes) {
      acc_t v[kLanes];
      for (int j = 0; j < kLanes; ++j) v[j] = widen(in[p + j]);
      for (int j = 0; j < kLanes; ++j) s[j] += v[j];
      if constexpr (kAux) {
        for (int j = 0; j < kLanes; ++j) sa[j] += v[j] * widen(aux[p + j]);
      }
      if constexpr (kOut) {
        for (int j = 0; j < kLanes; ++j) {
          const acc_t o = v[j] * scale + shift;
          out[p + j] = narrow_to<T>(kAcc ? o + widen(out[p + j]) : o);
        }
      }
    }
    for (int j = 0; p < a.P; ++p, ++j) {
      const acc_t v = widen(in[p]);
      s[j] += v;
      if constexpr (kAux) sa[j] += v * widen(aux[p]);
      if constexpr (kOut) {
        const acc_t o = v * scale + shift;
        out[p] = narrow_to<T>(kAcc ? o + widen(out[p]) : o);
      }
    }
    acc_t total = 0, total_aux = 0;
    for (int j = 0; j < kLanes; ++j) {
      total += s[j];
      total_aux += sa[j];
    }
    if (a.sum_in != nullptr) a.sum_in[row] = total;
    if (a.sum_aux != nullptr) a.sum_aux[row] = total_aux;
  }
}

// Channels-last: images [n0, n1), each P positions of C contiguous channels; the per-channel sums
// accumulate across positions (vectorised over channels).
template <typename T, bool kOut, bool kAcc, bool kAux>
HYPERKERN_INLINE void scale_images_nhwc(const ScaleArgs<T>& a, int64_t n0, int64_t n1) {
  using acc_t = at::opmath_type<T>;
  const int64_t C = a.C;
  std::vector<acc_t> buf(4 * C);
  acc_t* scale = buf.data();
  acc_t* shift = scale + C;
  acc_t* s = shift + C;
  acc_t* sa = s + C;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      scale[c] = a.scale.at(n, c, a.B, acc_t(1));
      shift[c] = a.shift.at(n, c, a.B, acc_t(0));
      s[c] = 0;
      sa[c] = 0;
    }
    for (int64_t p = 0; p < a.P; ++p) {
      const int64_t at = (n * a.P + p) * C;
      const T* in = a.in + at;
      const T* aux = kAux ? a.aux + at : nullptr;
      T* out = kOut ? a.out + at : nullptr;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t v = widen(in[c]);
        s[c] += v;
        if constexpr (kAux) sa[c] += v * widen(aux[c]);
        if constexpr (kOut) {
          const acc_t o = v * scale[c] + shift[c];
          out[c] = narrow_to<T>(kAcc ? o + widen(out[c]) : o);
        }
      }
    }
    if (a.sum_in != nullptr) std::copy(s, s + C, a.sum_in + n * C);
    if (a.sum_aux != nullptr) std::copy(sa, sa + C, a.sum_aux + n * C);
  }
}

// Units [i0, i1): (n, c) rows for NCHW, images for channels-last.
template <typename T, bool kOut, bool kAcc, bool kAux>
HYPERKERN_INLINE void scale_units(const ScaleArgs<T>& a, int64_t i0, int64_t i1) {
  if (a.channels_last) {
    scale_images_nhwc<T, kOut, kAcc, kAux>(a, i0, i1);
  } else {
    scale_rows_nchw<T, kOut, kAcc, kAux>(a, i0, i1);
  }
}

template <typename T>
HYPERKERN_INLINE void scale_channels_body(const ScaleArgs<T>& a, bool accumulate, int64_t i0, int64_t i1) {
  const bool out = a.out != nullptr, aux = a.aux != nullptr;
  if (out && accumulate) {
    if (aux) scale_units<T, true, true, true>(a, i0, i1);
    else scale_units<T, true, true, false>(a, i0, i1);
  } else if (out) {
    if (aux) scale_units<T, true, false, true>(a, i0, i1);
    else scale_units<T, true, false, false>(a, i0, i1);
  } else {
    if (aux) scale_units<T, false, false, true>(a, i0, i1);
    else scale_units<T, false, false, false>(a, i0, i1);
  }
}
HYPERKERN_CPU_CLONES void scale_channels_units(const ScaleArgs<float>& a, bool acc, int64_t i0, int64_t i1) {
  scale_channels_body(a, acc, i0, i1);
}
HYPERKERN_CPU_CLONES void scale_channels_units(const ScaleArgs<double>& a, bool acc, int64_t i0, int64_t i1) {
  scale_channels_body(a, acc, i0, i1);
}
HYPERKERN_CPU_CLONES void scale_channels_units(const ScaleArgs<c10::BFloat16>& a, bool acc, int64_t i0, int64_t i1) {
  scale_channels_body(a, acc, i0, i1);
}
template <typename T>  // float16: computed in float, baseline ISA
void scale_channels_units(const ScaleArgs<T>& a, bool acc, int64_t i0, int64_t i1) {
  scale_channels_body(a, acc, i0, i1);
}

// One Sum of the pass from the (N, C) per-image sums: out[j, c] = sum over group j's images of
// weight[n, c] * per_image[n, c], accumulated in opmath in image order, written once in out's dtype.
template <typename T>
void reduce_sum(const one_conv::Sum& sum, const at::opmath_type<T>* per_image, int64_t N, int64_t C, int64_t B) {
  using acc_t = at::opmath_type<T>;
  const CoefPtr<T> weight(sum.weight);
  const bool narrow = sum.out.scalar_type() != c10::CppTypeToScalarType<acc_t>::value;
  TORCH_CHECK(!narrow || sum.out.scalar_type() == c10::CppTypeToScalarType<T>::value,
              "hyperkern rank-1 conv2d: a sum's dtype must be the input's or its opmath type");
  acc_t* wide_out = narrow ? nullptr : sum.out.mutable_data_ptr<acc_t>();
  T* narrow_out = narrow ? sum.out.mutable_data_ptr<T>() : nullptr;
  for (int64_t j = 0; j < N / sum.group; ++j) {
    for (int64_t c = 0; c < C; ++c) {
      acc_t total = 0;
      for (int64_t n = j * sum.group; n < (j + 1) * sum.group; ++n) {
        total += weight.at(n, c, B, acc_t(1)) * per_image[n * C + c];
      }
      if (narrow) narrow_out[j * C + c] = narrow_to<T>(total);
      else wide_out[j * C + c] = total;
    }
  }
}

// Elements per parallel chunk below which the pass stays on one thread.
constexpr int64_t kElementGrain = 1 << 14;

// CpuPrims: the primitive set of csrc/one_conv.h (AtenPrims in tests/harness/one_conv_harness.cpp is its
// specification in ATen ops). scale_channels: one parallel pass over `in` (contiguous in its memory
// format) writing out and the (N, C) opmath per-image sums into a scratch buffer, then each Sum reduced
// from them on this thread (they are (E, C) or (N, C): small).
struct CpuPrims {
  static at::Tensor empty(at::IntArrayRef sizes, const at::Tensor& /*like*/, at::ScalarType dtype,
                          at::MemoryFormat fmt) {
    return at::Tensor(at::detail::empty_cpu(sizes, dtype, /*pin_memory=*/false, fmt));
  }

  static void scale_channels(const one_conv::Pass& pass) {
    const at::Tensor& in = pass.in;
    const int64_t N = in.size(0), C = in.size(1), P = in.size(2) * in.size(3);
    if (N == 0 || C == 0) return;
    bool need_in = false, need_aux = false;
    for (const one_conv::Sum& s : pass.sums) (s.of_aux ? need_aux : need_in) = true;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "rank1_conv_scale_channels_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const at::Tensor scratch =
          need_in || need_aux
              ? empty({(need_in ? 1 : 0) + (need_aux ? 1 : 0), N, C}, in, c10::CppTypeToScalarType<acc_t>::value,
                      at::MemoryFormat::Contiguous)
              : at::Tensor();
      acc_t* sum_in = need_in ? scratch.mutable_data_ptr<acc_t>() : nullptr;
      acc_t* sum_aux = need_aux ? scratch.mutable_data_ptr<acc_t>() + (need_in ? N * C : 0) : nullptr;
      if (P == 0) {  // empty images: every per-image sum is zero, nothing to write
        if (scratch.defined()) std::fill_n(scratch.mutable_data_ptr<acc_t>(), scratch.numel(), acc_t(0));
      } else {
        const ScaleArgs<scalar_t> a{in.const_data_ptr<scalar_t>(),
                                    need_aux ? pass.aux.const_data_ptr<scalar_t>() : nullptr,
                                    pass.out.defined() ? pass.out.data_ptr<scalar_t>() : nullptr,
                                    CoefPtr<scalar_t>(pass.scale),
                                    CoefPtr<scalar_t>(pass.shift),
                                    sum_in,
                                    sum_aux,
                                    C,
                                    P,
                                    pass.B,
                                    pass.channels_last};
        const int64_t units = pass.channels_last ? N : N * C, per_unit = pass.channels_last ? C * P : P;
        at::parallel_for(0, units, std::max<int64_t>(1, kElementGrain / per_unit),
                         [&](int64_t i0, int64_t i1) { scale_channels_units(a, pass.accumulate, i0, i1); });
      }
      for (const one_conv::Sum& s : pass.sums) reduce_sum<scalar_t>(s, s.of_aux ? sum_aux : sum_in, N, C, pass.B);
    });
  }

  // [e1 | e2] = hparams @ embedding^T: raw loops on this thread ((N, O) with m <= a few: tiny).
  static void embed(const at::Tensor& hparams, const at::Tensor& embedding, const at::Tensor& e1,
                    const at::Tensor& e2) {
    const int64_t N = hparams.size(0), m = hparams.size(1), O = e1.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hparams.scalar_type(), "rank1_conv_embed_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* hp = hparams.const_data_ptr<scalar_t>();
      const scalar_t* em = embedding.const_data_ptr<scalar_t>();
      const int64_t hs0 = hparams.stride(0), hs1 = hparams.stride(1), es0 = embedding.stride(0),
                    es1 = embedding.stride(1);
      for (int part = 0; part < 2; ++part) {
        const at::Tensor& e = part == 0 ? e1 : e2;
        if (!e.defined()) continue;
        scalar_t* out = e.mutable_data_ptr<scalar_t>();
        for (int64_t n = 0; n < N; ++n) {
          for (int64_t o = 0; o < O; ++o) {
            acc_t total = 0;
            for (int64_t j = 0; j < m; ++j) total += widen(hp[n * hs0 + j * hs1]) * widen(em[(part * O + o) * es0 + j * es1]);
            out[n * O + o] = narrow_to<scalar_t>(total);
          }
        }
      }
    });
  }

  // de = [de1 | de2]: dembedding = de^T hparams, dhparams = de @ embedding (each when defined).
  static void embed_backward(const at::Tensor& de1, const at::Tensor& de2, const at::Tensor& hparams,
                             const at::Tensor& embedding, const at::Tensor& dhparams, const at::Tensor& dembedding) {
    const int64_t N = hparams.size(0), m = hparams.size(1), O = de1.size(1), R = embedding.size(0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hparams.scalar_type(), "rank1_conv_embed_backward_cpu",
                                    [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* hp = hparams.const_data_ptr<scalar_t>();
      const scalar_t* em = embedding.const_data_ptr<scalar_t>();
      const scalar_t* d1 = de1.const_data_ptr<scalar_t>();
      const scalar_t* d2 = de2.defined() ? de2.const_data_ptr<scalar_t>() : nullptr;
      const int64_t hs0 = hparams.stride(0), hs1 = hparams.stride(1), es0 = embedding.stride(0),
                    es1 = embedding.stride(1), d1s0 = de1.stride(0), d1s1 = de1.stride(1),
                    d2s0 = d2 ? de2.stride(0) : 0, d2s1 = d2 ? de2.stride(1) : 0;
      const auto de = [&](int64_t n, int64_t o) -> acc_t {
        return o < O ? widen(d1[n * d1s0 + o * d1s1]) : widen(d2[n * d2s0 + (o - O) * d2s1]);
      };
      if (dembedding.defined()) {
        scalar_t* out = dembedding.mutable_data_ptr<scalar_t>();
        for (int64_t o = 0; o < R; ++o) {
          for (int64_t j = 0; j < m; ++j) {
            acc_t total = 0;
            for (int64_t n = 0; n < N; ++n) total += de(n, o) * widen(hp[n * hs0 + j * hs1]);
            out[o * m + j] = narrow_to<scalar_t>(total);
          }
        }
      }
      if (dhparams.defined()) {
        scalar_t* out = dhparams.mutable_data_ptr<scalar_t>();
        for (int64_t n = 0; n < N; ++n) {
          for (int64_t j = 0; j < m; ++j) {
            acc_t total = 0;
            for (int64_t o = 0; o < R; ++o) total += de(n, o) * widen(em[o * es0 + j * es1]);
            out[n * m + j] = narrow_to<scalar_t>(total);
          }
        }
      }
    });
  }
};

// ---- which scheme a CPU conv op runs ----------------------------------------------------------------

// HYPERKERN_CPU_CONV = member | one_conv forces a scheme (tests, benchmarks); unset or "auto": the rule
// of uses_one_conv. hyperkern/ops/_cpp_conv.py mirrors both (the train ops' fake kernels must know
// which activations the CPU kernel keeps).
enum class Scheme { kAuto, kMember, kOneConv };

Scheme forced_scheme() {
  const char* setting = std::getenv("HYPERKERN_CPU_CONV");
  if (setting == nullptr || std::strcmp(setting, "auto") == 0 || setting[0] == '\0') return Scheme::kAuto;
  if (std::strcmp(setting, "member") == 0) return Scheme::kMember;
  if (std::strcmp(setting, "one_conv") == 0) return Scheme::kOneConv;
  TORCH_CHECK(false, "HYPERKERN_CPU_CONV must be auto, member or one_conv, got '", setting, "'");
}

// Whether an op with these dimensions runs the one-convolution scheme (else one convolution per member
// with folded weights): when each member's output is small, B * O * Ho * Wo < 32768 elements. Measured
// (1 thread, process CPU time, forward+backward, ratio to the floor conv2d over the same E*B images,
// python bench/ops_conv.py --threads 1 --hyper --no-compile --clock cpu --batch B; E = 4, 3x3):
//                                       per-member            one-convolution
//   tiny 4->4 6x6, B=2 (288)            batch 3.4x, hyper 3.5x   batch 1.36x, hyper 2.5x (bench/conv_host.py)
//   16->16 32x32, B=2 (32768) NCHW      batch 1.42, hyper 1.39   batch 1.80, hyper 1.93
//   32->32 16x16, B=2 (16384) NCHW      batch 1.65, hyper 1.41   batch 1.26, hyper 1.39
//   64->64 8x8,   B=2 (8192)  NCHW      batch 1.81, hyper 1.92   batch 1.18, hyper 1.37
//   64->64 8x8,   B=4 (16384) NCHW      batch 1.46, hyper 1.38   batch 1.15, hyper 1.21
//   16->16 32x32, B=4 (65536) NCHW      batch 0.84, hyper 1.20   batch 1.45, hyper 1.71
//   16->16 32x32, B=16 NCHW / CL        batch 0.84 / 1.22, hyper 1.15 / 1.06   batch 1.93 / 1.40, hyper 1.65 / 1.66
//   32->32 16x16, B=16 NCHW / CL        batch 1.14 / 0.92, hyper 1.12 / 1.16   batch 1.16 / 1.23, hyper 1.24 / 1.19
//   64->64 8x8,   B=16 NCHW / CL        batch 1.16 / 1.18, hyper 1.10 / 1.10   batch 1.16 / 1.11, hyper 1.16 / 1.18
// Small members are bound by the per-call cost of E convolutions (and their copies), large ones by the
// one-convolution scheme's scaling passes over the activations (and oneDNN is faster on B images than on
// E*B at 32x32). Channels-last follows the same rule (16->16 32x32 B=2: one-convolution 1.35 vs 1.53,
// batch; the other cases as NCHW). With several threads the per-member scheme also runs members in
// parallel, which only favours it above the threshold.
constexpr int64_t kOneConvMaxMemberOutput = 32768;

bool uses_one_conv(const Dims& d) {
  switch (forced_scheme()) {
    case Scheme::kMember:
      return false;
    case Scheme::kOneConv:
      return true;
    case Scheme::kAuto:
      break;
  }
  return d.B * d.O * d.Ho * d.Wo < kOneConvMaxMemberOutput;
}

// Runs f(k) for every member k. With several threads, whole groups of `threads` members run in
// parallel, one member per thread (nested ATen / oneDNN work inside f runs single-threaded); the
// remaining E % threads members run one after another with all threads each.
template <class F>
void for_each_member(int64_t E, const F& f) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || E <= 1 || at::in_parallel_region()) {
    for (int64_t k = 0; k < E; ++k) f(k);
    return;
  }
  const int64_t paired = (E / threads) * threads;
  if (paired > 0) {
    const at::ThreadLocalState tls;  // grad mode, dispatch keys, ... of the calling thread
    at::parallel_for(0, paired, 1, [&](int64_t begin, int64_t end) {
      at::ThreadLocalStateGuard guard(tls);
#ifdef _OPENMP
      // oneDNN sizes its primitives (and their internal barriers) by omp_get_max_threads() when it
      // creates them; inside this region each member gets exactly one thread.
      omp_set_num_threads(1);
#endif
      for (int64_t k = begin; k < end; ++k) f(k);
    });
  }
  for (int64_t k = paired; k < E; ++k) f(k);
}

// Writes the members' folded weights w[o, c, i, j] * scale_out[k, o] * scale_in[k, (o / Og) * cg + c]
// into part `rows` of a member_weight_buffer (in w's dtype, the product in its op-math type).
void fold_weight_into(at::Tensor& buffer, const WeightRows& rows, const at::Tensor& weight, const at::Tensor& scale_out,
                      const at::Tensor& scale_in, const Dims& d) {
  const at::Tensor w = weight.contiguous(), so = scale_out.contiguous(), si = scale_in.contiguous();
  const int64_t K = d.kh * d.kw, row = d.cg * K;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "rank1_conv_fold_weight", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* sop = so.const_data_ptr<scalar_t>();
    const scalar_t* sip = si.const_data_ptr<scalar_t>();
    scalar_t* base = buffer.mutable_data_ptr<scalar_t>() + rows.offset;
    at::parallel_for(0, d.E * d.O, std::max<int64_t>(1, 4096 / std::max<int64_t>(row, 1)), [&](int64_t b, int64_t e) {
      for (int64_t ko = b; ko < e; ++ko) {
        const int64_t k = ko / d.O, o = ko % d.O;
        const acc_t sk = static_cast<acc_t>(sop[ko]);
        const scalar_t* r_in = sip + k * d.C + (o / d.Og) * d.cg;
        const scalar_t* w_row = wp + o * row;
        scalar_t* o_row = base + k * rows.member_stride + (o / d.Og) * rows.group_stride + (o % d.Og) * rows.row_stride;
        if (rows.c_stride == 1) {  // channels-last rows: input channels innermost, written in memory order
          for (int64_t i = 0; i < K; ++i) {
            for (int64_t c = 0; c < d.cg; ++c) {
              o_row[i * rows.i_stride + c] =
                  static_cast<scalar_t>(static_cast<acc_t>(w_row[c * K + i]) * sk * static_cast<acc_t>(r_in[c]));
            }
          }
        } else {
          for (int64_t c = 0; c < d.cg; ++c) {
            const acc_t f = sk * static_cast<acc_t>(r_in[c]);
            for (int64_t i = 0; i < K; ++i) {
              o_row[c * rows.c_stride + i] = static_cast<scalar_t>(static_cast<acc_t>(w_row[c * K + i]) * f);
            }
          }
        }
      }
    });
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

// From the members' weight gradients G_k = dL/dW_k of the folded weights W_k = W * so_k si_k^T (part
// `rows` of a member_weight_buffer):
//   dW = sum_k G_k * so_k si_k^T, dso[k, o] = sum_{c,i,j} G_k * W * si_k, dsi[k, c] = sum_{o,i,j} G_k * W * so_k
// (each only when requested; results in W's dtype, accumulated in its op-math type).
void reduce_weight_grad(const at::Tensor& grads, const WeightRows& rows, const at::Tensor& weight,
                        const at::Tensor& scale_out, const at::Tensor& scale_in, const Dims& d, bool need_w,
                        bool need_so, bool need_si, at::Tensor& d_weight, at::Tensor& d_scale_out,
                        at::Tensor& d_scale_in) {
  if (!(need_w || need_so || need_si)) return;
  const int64_t K = d.kh * d.kw, row = d.cg * K;
  // Rows are walked in the buffer's memory order: (c, i) for NCHW, (i, c) for channels-last buffers
  // (c_stride == 1), with the weight read in that same order.
  const bool channels_last = rows.c_stride == 1 && rows.i_stride == d.cg && d.cg > 1 && K > 1;
  const at::Tensor w_layout = weight.contiguous(channels_last ? at::MemoryFormat::ChannelsLast
                                                              : at::MemoryFormat::Contiguous);
  const at::Tensor so = scale_out.contiguous(), si = scale_in.contiguous();
  const auto opts = weight.options();
  if (need_w) d_weight = at::empty(weight.sizes(), opts);
  if (need_so) d_scale_out = at::empty({d.E, d.O}, opts);
  if (need_si) d_scale_in = at::empty({d.E, d.C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "rank1_conv_reduce_weight_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grads.const_data_ptr<scalar_t>() + rows.offset;
    const scalar_t* wp = w_layout.const_data_ptr<scalar_t>();
    const scalar_t* sop = so.const_data_ptr<scalar_t>();
    const scalar_t* sip = si.const_data_ptr<scalar_t>();
    scalar_t* dwp = need_w ? d_weight.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* dsop = need_so ? d_scale_out.mutable_data_ptr<scalar_t>() : nullptr;
    // dsi contributions per (k, o, c), summed over each group's output channels afterwards.
    std::vector<acc_t> si_part(need_si ? d.E * d.O * d.cg : 0);
    at::parallel_for(0, d.O, 1, [&](int64_t ob, int64_t oe) {
      std::vector<acc_t> dw_acc(need_w ? row : 0), scale(d.cg), gw(d.cg);
      for (int64_t o = ob; o < oe; ++o) {
        const int64_t grp = o / d.Og;
        const scalar_t* w_row = wp + o * row;
        std::fill(dw_acc.begin(), dw_acc.end(), acc_t(0));
        for (int64_t k = 0; k < d.E; ++k) {
          const scalar_t* g_row = gp + k * rows.member_stride + grp * rows.group_stride + (o % d.Og) * rows.row_stride;
          const acc_t sk = static_cast<acc_t>(sop[k * d.O + o]);
          const scalar_t* r_in = sip + k * d.C + grp * d.cg;
          for (int64_t c = 0; c < d.cg; ++c) {
            scale[c] = sk * static_cast<acc_t>(r_in[c]);
            gw[c] = 0;
          }
          if (channels_last) {
            for (int64_t i = 0; i < K; ++i) {
              const scalar_t* g_i = g_row + i * d.cg;
              const scalar_t* w_i = w_row + i * d.cg;
              acc_t* dw_i = need_w ? dw_acc.data() + i * d.cg : nullptr;
              for (int64_t c = 0; c < d.cg; ++c) {
                const acc_t g = static_cast<acc_t>(g_i[c]);
                gw[c] += g * static_cast<acc_t>(w_i[c]);
                if (need_w) dw_i[c] += g * scale[c];
              }
            }
          } else {
            for (int64_t c = 0; c < d.cg; ++c) {
              const scalar_t* g_c = g_row + c * K;
              const scalar_t* w_c = w_row + c * K;
              acc_t sum = 0;
              for (int64_t i = 0; i < K; ++i) {
                const acc_t g = static_cast<acc_t>(g_c[i]);
                sum += g * static_cast<acc_t>(w_c[i]);
                if (need_w) dw_acc[c * K + i] += g * scale[c];
              }
              gw[c] = sum;
            }
          }
          acc_t so_acc = 0;
          for (int64_t c = 0; c < d.cg; ++c) {
            so_acc += gw[c] * static_cast<acc_t>(r_in[c]);
            if (need_si) si_part[(k * d.O + o) * d.cg + c] = gw[c] * sk;
          }
          if (need_so) dsop[k * d.O + o] = static_cast<scalar_t>(so_acc);
        }
        if (need_w) {  // dW is (O, cg, kh, kw) contiguous like the weight
          for (int64_t c = 0; c < d.cg; ++c) {
            for (int64_t i = 0; i < K; ++i) {
              dwp[o * row + c * K + i] = static_cast<scalar_t>(dw_acc[channels_last ? i * d.cg + c : c * K + i]);
            }
          }
        }
      }
    });
    if (need_si) {
      scalar_t* dsip = d_scale_in.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, d.E * d.C, 256, [&](int64_t b, int64_t e) {
        for (int64_t kc = b; kc < e; ++kc) {
          const int64_t k = kc / d.C, c_all = kc % d.C, grp = c_all / d.cg, c = c_all % d.cg;
          acc_t sum = 0;
          for (int64_t o = grp * d.Og; o < (grp + 1) * d.Og; ++o) sum += si_part[(k * d.O + o) * d.cg + c];
          dsip[kc] = static_cast<scalar_t>(sum);
        }
      });
    }
  });
}

at::Tensor member_conv(const at::Tensor& xk, const at::Tensor& wk, const std::optional<at::Tensor>& bk,
                       const Geometry& geo) {
  return at::convolution(xk, wk, bk, geo.stride, geo.padding, geo.dilation, false, {0, 0}, geo.groups);
}

// ---------------------------------------------------------------------------------------------
// batch_ensemble_conv2d
// ---------------------------------------------------------------------------------------------

at::Tensor batch_ensemble_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& r,
                                     const at::Tensor& s, const std::optional<at::Tensor>& bias,
                                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                     int64_t groups) {
  const Geometry geo = make_geometry(stride, padding, dilation, groups);
  const Dims d = check_conv(x, weight, r, s, geo);
  check_optional(bias, x, {d.E, d.O}, "bias");
  if (uses_one_conv(d)) return std::get<0>(one_conv::batch_forward<CpuPrims>(x, weight, r, s, bias, geo, d, false));
  const at::MemoryFormat fmt = activation_format(x);
  const at::Tensor xc = x.contiguous(fmt);
  const at::Tensor folded = fold_weight(weight, s, r, d, fmt == at::MemoryFormat::ChannelsLast);
  const std::optional<at::Tensor> bc = defined(bias) ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  at::Tensor y = empty_like_format({d.N, d.O, d.Ho, d.Wo}, x, fmt);
  if (d.N == 0) return y;
  for_each_member(d.E, [&](int64_t k) {
    const std::optional<at::Tensor> bk = bc ? std::optional<at::Tensor>((*bc)[k]) : std::nullopt;
    y.narrow(0, k * d.B, d.B).copy_(member_conv(xc.narrow(0, k * d.B, d.B), folded[k], bk, geo));
  });
  return y;
}

// (y, pre): the one-convolution scheme keeps pre = conv(x * r_k, W) for its backward's ds (as on CUDA); the
// per-member backward reads the members' weight gradients instead: nothing more to save (an empty pre).
std::tuple<at::Tensor, at::Tensor> batch_ensemble_conv2d_train_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                  const at::Tensor& r, const at::Tensor& s,
                                                                  const std::optional<at::Tensor>& bias,
                                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                                  at::IntArrayRef dilation, int64_t groups) {
  const Geometry geo = make_geometry(stride, padding, dilation, groups);
  const Dims d = check_conv(x, weight, r, s, geo);
  check_optional(bias, x, {d.E, d.O}, "bias");
  if (uses_one_conv(d)) return one_conv::batch_forward<CpuPrims>(x, weight, r, s, bias, geo, d, true);
  return {batch_ensemble_conv2d_cpu(x, weight, r, s, bias, stride, padding, dilation, groups),
          at::empty({0}, x.options())};
}

// Gradients for (x, weight, r, s, bias) where output_mask says so; the others are empty tensors.
// A kept `pre` (the one-convolution train op's) selects the one-convolution backward; without one, the
// scheme rule decides (the one-convolution backward then recomputes pre when ds is needed).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_ensemble_conv2d_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& r,
    const at::Tensor& s, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 5> output_mask, const std::optional<at::Tensor>& pre) {
  const Geometry geo = make_geometry(stride, padding, dilation, groups);
  const Dims d = check_conv(x, weight, r, s, geo);
  check_shape(grad_y, {d.N, d.O, d.Ho, d.Wo}, "grad_y");
  check_same_kind(x, grad_y, "grad_y");
  if (check_kept(pre, x, d, "pre") || uses_one_conv(d)) {
    return one_conv::batch_backward<CpuPrims>(grad_y, x, weight, r, s, pre, geo, d, output_mask);
  }
  const bool need_x = output_mask[0], need_w = output_mask[1], need_r = output_mask[2], need_s = output_mask[3],
             need_b = output_mask[4];
  const bool need_g = need_w || need_r || need_s;
  const at::MemoryFormat fmt = activation_format(x);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor xc = x.contiguous(fmt), g = grad_y.contiguous(fmt);
  const at::Tensor folded = fold_weight(weight, s, r, d, channels_last);
  const auto opts = x.options();
  at::Tensor dx = need_x ? empty_like_format(x.sizes(), x, fmt) : at::Tensor();
  at::Tensor grads = need_g ? member_weight_buffer(d, 1, channels_last, opts) : at::Tensor();
  at::Tensor db = need_b ? at::empty({d.E, d.O}, opts) : at::Tensor();
  if (d.N == 0) {  // no images: every gradient is zero
    if (need_g) grads.zero_();
    if (need_b) db.zero_();
  } else if (need_x || need_g || need_b) {
    const std::vector<int64_t> bias_sizes{d.O};
    for_each_member(d.E, [&](int64_t k) {
      auto [dxk, gk, dbk] = at::convolution_backward(
          g.narrow(0, k * d.B, d.B), xc.narrow(0, k * d.B, d.B), folded[k],
          need_b ? at::OptionalIntArrayRef(bias_sizes) : at::OptionalIntArrayRef(), geo.stride, geo.padding,
          geo.dilation, false, {0, 0}, geo.groups, {need_x, need_g, need_b});
      if (need_x) dx.narrow(0, k * d.B, d.B).copy_(dxk);
      if (need_g) grads[k].copy_(gk);
      if (need_b) db[k].copy_(dbk);
    });
  }
  at::Tensor dw, dr, ds;
  reduce_weight_grad(grads, member_weight_rows(d, 1, 0, channels_last), weight, s, r, d, need_w, need_s, need_r, dw,
                     ds, dr);
  fill_unused(opts, dx, dw, dr, ds, db);
  return {dx, dw, dr, ds, db};
}

// ---------------------------------------------------------------------------------------------
// hyper_batch_ensemble_conv2d
// ---------------------------------------------------------------------------------------------

// y[n, o] = h[n, o] + e1[n, o] * hd[n, o] + bias[o] + delta_bias[o] * e2[n, o] for member k's images,
// where both h (channel (o / Og) * 2 * Og + o % Og) and hd (that + Og) come from the stacked
// convolution's output `both` (B, 2*O, Ho, Wo); also copies hd into hd_out when it is defined.
void hyper_epilogue(const at::Tensor& both, const at::Tensor& e1, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& delta_bias, const std::optional<at::Tensor>& e2, int64_t k,
                    const Dims& d, bool channels_last, at::Tensor& y_k, at::Tensor& hd_k) {
  const int64_t P = d.Ho * d.Wo, O = d.O, Og = d.Og;
  const bool save_hd = hd_k.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, both.scalar_type(), "rank1_conv_hyper_epilogue", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = both.const_data_ptr<scalar_t>();
    const scalar_t* e1p = e1.const_data_ptr<scalar_t>() + k * d.B * O;
    const scalar_t* bp = bias ? bias->const_data_ptr<scalar_t>() + k * O : nullptr;
    const scalar_t* dbp = delta_bias ? delta_bias->const_data_ptr<scalar_t>() + k * O : nullptr;
    const scalar_t* e2p = e2 ? e2->const_data_ptr<scalar_t>() + k * d.B * O : nullptr;
    scalar_t* yp = y_k.mutable_data_ptr<scalar_t>();
    scalar_t* hp = save_hd ? hd_k.mutable_data_ptr<scalar_t>() : nullptr;
    auto shift = [&](int64_t n, int64_t o) -> acc_t {
      acc_t a = bp ? static_cast<acc_t>(bp[o]) : acc_t(0);
      if (dbp) a += static_cast<acc_t>(dbp[o]) * static_cast<acc_t>(e2p[n * O + o]);
      return a;
    };
    if (!channels_last) {
      at::parallel_for(0, d.B * O, std::max<int64_t>(1, 8192 / std::max<int64_t>(P, 1)), [&](int64_t b, int64_t e) {
        for (int64_t no = b; no < e; ++no) {
          const int64_t n = no / O, o = no % O;
          const scalar_t* h = src + (n * 2 * O + (o / Og) * 2 * Og + o % Og) * P;
          const scalar_t* hd = h + Og * P;
          const acc_t scale = static_cast<acc_t>(e1p[no]), add = shift(n, o);
          scalar_t* out = yp + no * P;
          for (int64_t p = 0; p < P; ++p) {
            out[p] = static_cast<scalar_t>(static_cast<acc_t>(h[p]) + scale * static_cast<acc_t>(hd[p]) + add);
          }
          if (save_hd) std::copy(hd, hd + P, hp + no * P);
        }
      });
    } else {
      at::parallel_for(0, d.B, 1, [&](int64_t b, int64_t e) {
        std::vector<acc_t> scale(O), add(O);
        for (int64_t n = b; n < e; ++n) {
          for (int64_t o = 0; o < O; ++o) {
            scale[o] = static_cast<acc_t>(e1p[n * O + o]);
            add[o] = shift(n, o);
          }
          for (int64_t p = 0; p < P; ++p) {
            const scalar_t* in = src + (n * P + p) * 2 * O;
            scalar_t* out = yp + (n * P + p) * O;
            scalar_t* hdo = save_hd ? hp + (n * P + p) * O : nullptr;
            for (int64_t grp = 0; grp < d.G; ++grp) {
              const scalar_t* h = in + grp * 2 * Og;
              const scalar_t* hd = h + Og;
              const int64_t o0 = grp * Og;
              for (int64_t j = 0; j < Og; ++j) {
                out[o0 + j] = static_cast<scalar_t>(static_cast<acc_t>(h[j]) + scale[o0 + j] * static_cast<acc_t>(hd[j]) + add[o0 + j]);
              }
              if (save_hd) std::copy(hd, hd + Og, hdo + o0);
            }
          }
        }
      });
    }
  });
}

// Returns (y, hd): hd = conv(x * u_k, delta) * v_k (without e1), saved for the backward's de1 when
// save_hd, else an empty tensor.
std::tuple<at::Tensor, at::Tensor> hyper_batch_ensemble_conv2d_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& delta, const at::Tensor& r, const at::Tensor& s,
    const at::Tensor& u, const at::Tensor& v, const at::Tensor& e1, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& delta_bias, const std::optional<at::Tensor>& e2, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool save_hd) {
  const Geometry geo = make_geometry(stride, padding, dilation, groups);
  const Dims d = check_conv(x, weight, r, s, geo);
  check_optional(bias, x, {d.E, d.O}, "bias");
  check_hyper(d, x, weight, delta, u, v, e1, delta_bias, e2);
  if (uses_one_conv(d)) {
    auto [y, hd, h, hr] = one_conv::hyper_forward<CpuPrims>(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2,
                                                            geo, d, save_hd, false);
    return {y, hd};
  }
  const at::MemoryFormat fmt = activation_format(x);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor xc = x.contiguous(fmt), e1c = e1.contiguous();
  const auto bc = contiguous_opt(bias), dbc = contiguous_opt(delta_bias), e2c = contiguous_opt(e2);
  const at::Tensor both_w = fold_stacked_weights(weight, s, r, delta, v, u, d, channels_last);
  at::Tensor y = empty_like_format({d.N, d.O, d.Ho, d.Wo}, x, fmt);
  at::Tensor hd = save_hd ? empty_like_format({d.N, d.O, d.Ho, d.Wo}, x, fmt) : at::empty({0}, x.options());
  if (d.N == 0) return {y, hd};
  for_each_member(d.E, [&](int64_t k) {
    const at::Tensor both = member_conv(xc.narrow(0, k * d.B, d.B), both_w[k], std::nullopt, geo).contiguous(fmt);
    at::Tensor yk = y.narrow(0, k * d.B, d.B);
    at::Tensor hdk = save_hd ? hd.narrow(0, k * d.B, d.B) : at::Tensor();
    hyper_epilogue(both, e1c, bc, dbc, e2c, k, d, channels_last, yk, hdk);
  });
  return {y, hd};
}

// For member k's images: stacked[n] = [g | g * e1] per group (the gradient of the stacked
// convolution's output), g_sum[n, o] = sum_p g and, when hd is given, g_hd[n, o] = sum_p g * hd.
void hyper_grad_prep(const at::Tensor& g_k, const at::Tensor& e1, const at::Tensor& hd_k, int64_t k, const Dims& d,
                     bool channels_last, at::Tensor& stacked, at::Tensor& g_sum, at::Tensor& g_hd) {
  const int64_t P = d.Ho * d.Wo, O = d.O, Og = d.Og;
  const bool with_hd = hd_k.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g_k.scalar_type(), "rank1_conv_hyper_grad_prep", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g_k.const_data_ptr<scalar_t>();
    const scalar_t* e1p = e1.const_data_ptr<scalar_t>() + k * d.B * O;
    const scalar_t* hp = with_hd ? hd_k.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* sp = stacked.mutable_data_ptr<scalar_t>();
    acc_t* sum_p = g_sum.mutable_data_ptr<acc_t>() + k * d.B * O;
    acc_t* hd_p = with_hd ? g_hd.mutable_data_ptr<acc_t>() + k * d.B * O : nullptr;
    if (!channels_last) {
      at::parallel_for(0, d.B * O, std::max<int64_t>(1, 8192 / std::max<int64_t>(P, 1)), [&](int64_t b, int64_t e) {
        for (int64_t no = b; no < e; ++no) {
          const int64_t n = no / O, o = no % O;
          const scalar_t* g = gp + no * P;
          scalar_t* to_h = sp + (n * 2 * O + (o / Og) * 2 * Og + o % Og) * P;
          scalar_t* to_d = to_h + Og * P;
          const acc_t scale = static_cast<acc_t>(e1p[no]);
          acc_t sum = 0, sum_hd = 0;
          for (int64_t p = 0; p < P; ++p) {
            const acc_t gv = static_cast<acc_t>(g[p]);
            to_h[p] = g[p];
            to_d[p] = static_cast<scalar_t>(gv * scale);
            sum += gv;
          }
          if (with_hd) {
            const scalar_t* h = hp + no * P;
            for (int64_t p = 0; p < P; ++p) sum_hd += static_cast<acc_t>(g[p]) * static_cast<acc_t>(h[p]);
            hd_p[no] = sum_hd;
          }
          sum_p[no] = sum;
        }
      });
    } else {
      at::parallel_for(0, d.B, 1, [&](int64_t b, int64_t e) {
        std::vector<acc_t> scale(O), sum(O), sum_hd(with_hd ? O : 0);
        for (int64_t n = b; n < e; ++n) {
          for (int64_t o = 0; o < O; ++o) scale[o] = static_cast<acc_t>(e1p[n * O + o]);
          std::fill(sum.begin(), sum.end(), acc_t(0));
          std::fill(sum_hd.begin(), sum_hd.end(), acc_t(0));
          for (int64_t p = 0; p < P; ++p) {
            const scalar_t* g = gp + (n * P + p) * O;
            scalar_t* to = sp + (n * P + p) * 2 * O;
            for (int64_t grp = 0; grp < d.G; ++grp) {
              const int64_t o0 = grp * Og;
              scalar_t* to_h = to + grp * 2 * Og;
              scalar_t* to_d = to_h + Og;
              for (int64_t j = 0; j < Og; ++j) {
                const acc_t gv = static_cast<acc_t>(g[o0 + j]);
                to_h[j] = g[o0 + j];
                to_d[j] = static_cast<scalar_t>(gv * scale[o0 + j]);
                sum[o0 + j] += gv;
              }
            }
            if (with_hd) {
              const scalar_t* h = hp + (n * P + p) * O;
              for (int64_t o = 0; o < O; ++o) sum_hd[o] += static_cast<acc_t>(g[o]) * static_cast<acc_t>(h[o]);
            }
          }
          std::copy(sum.begin(), sum.end(), sum_p + n * O);
          if (with_hd) std::copy(sum_hd.begin(), sum_hd.end(), hd_p + n * O);
        }
      });
    }
  });
}

// Gradients for (x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2) where output_mask says so;
// the others (and the delta_bias / e2 ones when delta_bias is None) are empty tensors. hd is the
// forward's saved hd, or an empty tensor to recompute it (only needed for de1).
// (y, hd, h, hr): the one-convolution scheme keeps the branches h and hr (as on CUDA; no hd), the per-member
// backward reads hd (when e1 needs a gradient), not the branches: h and hr stay empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hyper_batch_ensemble_conv2d_train_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& delta, const at::Tensor& r, const at::Tensor& s,
    const at::Tensor& u, const at::Tensor& v, const at::Tensor& e1, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& delta_bias, const std::optional<at::Tensor>& e2, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool save_hd) {
  const Geometry geo = make_geometry(stride, padding, dilation, groups);
  const Dims d = check_conv(x, weight, r, s, geo);
  check_optional(bias, x, {d.E, d.O}, "bias");
  check_hyper(d, x, weight, delta, u, v, e1, delta_bias, e2);
  if (uses_one_conv(d)) {
    return one_conv::hyper_forward<CpuPrims>(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, geo, d, false,
                                             true);
  }
  auto [y, hd] = hyper_batch_ensemble_conv2d_cpu(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, stride,
                                                 padding, dilation, groups, save_hd);
  at::Tensor h, hr;
  fill_unused(x.options(), h, hr);
  return {y, hd, h, hr};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
hyper_batch_ensemble_conv2d_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                         const at::Tensor& delta, const at::Tensor& r, const at::Tensor& s,
                                         const at::Tensor& u, const at::Tensor& v, const at::Tensor& e1,
                                         const std::optional<at::Tensor>& delta_bias,
                                         const std::optional<at::Tensor>& e2, const at::Tensor& hd,
                                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                         int64_t groups, std::array<bool, 11> output_mask,
                                         const std::optional<at::Tensor>& h, const std::optional<at::Tensor>& hr) {
  const Geometry geo = make_geometry(stride, padding, dilation, groups);
  const Dims d = check_conv(x, weight, r, s, geo);
  check_hyper(d, x, weight, delta, u, v, e1, delta_bias, e2);
  check_shape(grad_y, {d.N, d.O, d.Ho, d.Wo}, "grad_y");
  check_same_kind(x, grad_y, "grad_y");
  const bool have_hd = check_kept(hd, x, d, "hd");  // the forward returns a 1-D empty hd when it saved none
  // Kept branches (the one-convolution train op's) select the one-convolution backward, a kept hd the
  // per-member one; with neither, the scheme rule decides (each backward recomputes what it reads).
  const bool have_branches = check_kept(h, x, d, "h") | check_kept(hr, x, d, "hr");
  if (have_branches || (!have_hd && uses_one_conv(d))) {
    return one_conv::hyper_backward<CpuPrims>(grad_y, x, weight, delta, r, s, u, v, e1, delta_bias, e2, h, hr, geo,
                                              d, output_mask);
  }
  const bool need_x = output_mask[0], need_w = output_mask[1], need_delta = output_mask[2], need_r = output_mask[3],
             need_s = output_mask[4], need_u = output_mask[5], need_v = output_mask[6], need_e1 = output_mask[7],
             need_b = output_mask[8];
  const bool has_db = defined(delta_bias);
  const bool need_db = output_mask[9] && has_db, need_e2 = output_mask[10] && has_db;
  const bool need_gw = need_w || need_r || need_s, need_gd = need_delta || need_u || need_v;
  const bool need_g = need_gw || need_gd;
  const at::MemoryFormat fmt = activation_format(x);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const auto opts = x.options();
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  const at::Tensor xc = x.contiguous(fmt), g = grad_y.contiguous(fmt), e1c = e1.contiguous();
  const at::Tensor hdc = have_hd ? hd.contiguous(fmt) : at::Tensor();
  const at::Tensor both_w = fold_stacked_weights(weight, s, r, delta, v, u, d, channels_last);
  // D_k alone, to recompute hd when the forward did not keep it
  const at::Tensor folded_d = need_e1 && !have_hd ? fold_weight(delta, v, u, d, channels_last) : at::Tensor();

  at::Tensor dx = need_x ? empty_like_format(x.sizes(), x, fmt) : at::Tensor();
  at::Tensor grads = need_g ? member_weight_buffer(d, 2, channels_last, opts) : at::Tensor();
  at::Tensor g_sum = at::empty({d.N, d.O}, opts.dtype(acc_type));
  at::Tensor g_hd = need_e1 ? at::empty({d.N, d.O}, opts.dtype(acc_type)) : at::Tensor();
  if (d.N == 0) {  // no images: every gradient is zero
    if (need_g) grads.zero_();
    g_sum.zero_();
    if (need_e1) g_hd.zero_();
  }
  if (d.N > 0) {
    for_each_member(d.E, [&](int64_t k) {
      const at::Tensor xk = xc.narrow(0, k * d.B, d.B);
      at::Tensor hdk;
      if (need_e1) {
        hdk = have_hd ? hdc.narrow(0, k * d.B, d.B) : member_conv(xk, folded_d[k], std::nullopt, geo).contiguous(fmt);
      }
      at::Tensor stacked = empty_like_format({d.B, 2 * d.O, d.Ho, d.Wo}, x, fmt);
      hyper_grad_prep(g.narrow(0, k * d.B, d.B), e1c, hdk, k, d, channels_last, stacked, g_sum, g_hd);
      if (need_x || need_g) {
        auto [dxk, gk, unused] =
            at::convolution_backward(stacked, xk, both_w[k], at::OptionalIntArrayRef(), geo.stride, geo.padding,
                                     geo.dilation, false, {0, 0}, geo.groups, {need_x, need_g, false});
        if (need_x) dx.narrow(0, k * d.B, d.B).copy_(dxk);
        if (need_g) grads[k].copy_(gk);
      }
    });
  }
  at::Tensor dw, dr, ds, ddelta, du, dv;
  reduce_weight_grad(grads, member_weight_rows(d, 2, 0, channels_last), weight, s, r, d, need_w, need_s, need_r, dw,
                     ds, dr);
  reduce_weight_grad(grads, member_weight_rows(d, 2, 1, channels_last), delta, v, u, d, need_delta, need_v, need_u,
                     ddelta, dv, du);
  at::Tensor de1 = need_e1 ? g_hd.to(x.scalar_type()) : at::Tensor();
  auto [db, ddb, de2] = hyper_bias_grads(g_sum, delta_bias, e2, d, need_b, need_db, need_e2, x.scalar_type());
  fill_unused(opts, dx, dw, ddelta, dr, ds, du, dv, de1, db, ddb, de2);
  return {dx, dw, ddelta, dr, ds, du, dv, de1, db, ddb, de2};
}

// ---- the hp ops: e = hparams @ embedding^T into transient buffers (CpuPrims::embed), then the hyper op's
// kernels above; their de1 / de2 reduced into dhparams, dembedding (CpuPrims::embed_backward).

std::tuple<at::Tensor, at::Tensor> hyper_batch_ensemble_conv2d_hp_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& delta, const at::Tensor& r, const at::Tensor& s,
    const at::Tensor& u, const at::Tensor& v, const at::Tensor& hparams, const at::Tensor& embedding,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& delta_bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool save_hd) {
  const Dims d = check_conv(x, weight, r, s, make_geometry(stride, padding, dilation, groups));
  check_hp(d, x, hparams, embedding, defined(delta_bias));
  const auto [e1, e2] = one_conv::embed<CpuPrims>(hparams, embedding, x, d, defined(delta_bias));
  return hyper_batch_ensemble_conv2d_cpu(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, stride, padding,
                                         dilation, groups, save_hd);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hyper_batch_ensemble_conv2d_hp_train_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& delta, const at::Tensor& r, const at::Tensor& s,
    const at::Tensor& u, const at::Tensor& v, const at::Tensor& hparams, const at::Tensor& embedding,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& delta_bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool save_hd) {
  const Dims d = check_conv(x, weight, r, s, make_geometry(stride, padding, dilation, groups));
  check_hp(d, x, hparams, embedding, defined(delta_bias));
  const auto [e1, e2] = one_conv::embed<CpuPrims>(hparams, embedding, x, d, defined(delta_bias));
  return hyper_batch_ensemble_conv2d_train_cpu(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, stride,
                                               padding, dilation, groups, save_hd);
}

one_conv::Grads11 hyper_batch_ensemble_conv2d_hp_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& delta,
    const at::Tensor& r, const at::Tensor& s, const at::Tensor& u, const at::Tensor& v, const at::Tensor& hparams,
    const at::Tensor& embedding, const std::optional<at::Tensor>& delta_bias, const at::Tensor& hd,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 11> output_mask, const std::optional<at::Tensor>& h, const std::optional<at::Tensor>& hr) {
  const Dims d = check_conv(x, weight, r, s, make_geometry(stride, padding, dilation, groups));
  const bool has_db = defined(delta_bias);
  check_hp(d, x, hparams, embedding, has_db);
  const auto [e1, e2] = one_conv::embed<CpuPrims>(hparams, embedding, x, d, has_db);
  const one_conv::Grads11 grads = hyper_batch_ensemble_conv2d_backward_cpu(
      grad_y, x, weight, delta, r, s, u, v, e1, delta_bias, e2, hd, stride, padding, dilation, groups,
      one_conv::hyper_mask_of_hp(output_mask, has_db), h, hr);
  return one_conv::hp_grads<CpuPrims>(grads, hparams, embedding, x, output_mask, has_db);
}

}  // namespace

TORCH_LIBRARY_IMPL(hyperkern, CPU, m) {
  m.impl("batch_ensemble_conv2d", &batch_ensemble_conv2d_cpu);
  m.impl("batch_ensemble_conv2d_train", &batch_ensemble_conv2d_train_cpu);
  m.impl("batch_ensemble_conv2d_backward", &batch_ensemble_conv2d_backward_cpu);
  m.impl("hyper_batch_ensemble_conv2d", &hyper_batch_ensemble_conv2d_cpu);
  m.impl("hyper_batch_ensemble_conv2d_train", &hyper_batch_ensemble_conv2d_train_cpu);
  m.impl("hyper_batch_ensemble_conv2d_backward", &hyper_batch_ensemble_conv2d_backward_cpu);
  m.impl("hyper_batch_ensemble_conv2d_hp", &hyper_batch_ensemble_conv2d_hp_cpu);
  m.impl("hyper_batch_ensemble_conv2d_hp_train", &hyper_batch_ensemble_conv2d_hp_train_cpu);
  m.impl("hyper_batch_ensemble_conv2d_hp_backward", &hyper_batch_ensemble_conv2d_hp_backward_cpu);
}

}  // namespace rank1_conv
}  // namespace hyperkern
