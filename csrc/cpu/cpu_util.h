// Shared by the CPU kernels (rank1_linear.cpp, rank1_conv.cpp): forced inlining, function
// multiversioning and the widening / narrowing loads and stores of their elementwise loops.
#pragma once
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#define HYPERKERN_INLINE inline __attribute__((always_inline))
// The same for a lambda (after its parameter list): a lambda called inside a HYPERKERN_CPU_CLONES
// function is otherwise a separate function compiled for the baseline ISA.
#define HYPERKERN_INLINE_LAMBDA __attribute__((always_inline))
// Function multiversioning (GCC/Clang on x86-64 with ifunc): the hot loops get AVX-512 and AVX2
// code paths although the extension is compiled for baseline x86-64.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define HYPERKERN_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HYPERKERN_CPU_CLONES
#endif

namespace hyperkern {
namespace cpu {

// Loads widen to the compute type and stores narrow from it. bfloat16 converts with plain integer
// ops (round to nearest even, NaN kept quiet: the same result as c10::BFloat16(float)) so the
// loops vectorise; the other dtypes use their usual conversions.
template <typename T>
HYPERKERN_INLINE at::opmath_type<T> widen(T v) {
  return static_cast<at::opmath_type<T>>(v);
}
template <>
HYPERKERN_INLINE float widen<c10::BFloat16>(c10::BFloat16 v) {
  const uint32_t bits = uint32_t(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
template <typename T>
HYPERKERN_INLINE T narrow_to(at::opmath_type<T> v) {
  return static_cast<T>(v);
}
template <>
HYPERKERN_INLINE c10::BFloat16 narrow_to<c10::BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

}  // namespace cpu
}  // namespace hyperkern
