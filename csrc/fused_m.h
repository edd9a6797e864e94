// The hp ops' fused kernels are compiled once per number of hyperparameters m = 1 .. kMaxFusedM (m a
// compile-time constant, so e1 / e2 of a column are summed in registers); other m take each backend's
// general path. Shared by the CPU kernels and the CUDA host code.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

namespace hyperkern {

constexpr int kMaxFusedM = 8;

// Calls f(std::integral_constant<int, M>()) with M = m when 1 <= m <= kMaxFusedM; false otherwise.
// Always inlined: on the CPU, f's body is then compiled into the calling function's ISA clone (f must
// be an always-inline lambda as well, HYPERKERN_INLINE_LAMBDA).
template <class F>
inline __attribute__((always_inline)) bool with_fused_m(int64_t m, const F& f) {
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

// The embedding weight (out or 2*out, m) transposed to (m, out or 2*out) in the compute type: what the
// fused kernels read (e1[i, j] = sum_p hparams[i, p] * embT[p, j]; e2 from column out + j).
inline at::Tensor transposed_embedding(const at::Tensor& embedding) {
  return embedding.to(at::toOpMathType(embedding.scalar_type())).t().contiguous();
}

}  // namespace hyperkern
