// 8-float vectors for the CPU kernels (relevance.cpp, varlen_attention.cpp).
//
// The extension is compiled without -march flags, yet the softmax passes need a vectorised exp (a
// scalar expf per logit costs as much as the products) and the dots want FMA. The hot code is
// therefore written with GCC vector extensions (8 floats: one AVX2 register, two SSE registers on
// the baseline) and instantiated twice, for AVX2 + FMA (a function marked BUS_TARGET_AVX2) and for
// the x86-64 baseline, picked once from the CPU's feature bits by has_avx2_fma().
// (target_clones("arch=haswell") would test the CPU *model* and fall back to the baseline on AMD.)
// Every helper here is always inlined, so it takes the instruction set of the function it is
// inlined into. fp16/bf16 are widened and narrowed with integer arithmetic, so neither variant
// needs F16C.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <limits>

// The helpers are always inlined, so their by-value vector arguments never cross a real call
// boundary; the ABI note GCC prints for them does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BUS_X86_DISPATCH 1
#define BUS_TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif
#define BUS_INLINE inline __attribute__((always_inline))

namespace bus_kernels {
namespace vec8 {

constexpr int64_t kLanes = 8;
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(32)));
typedef uint16_t vh __attribute__((vector_size(16)));

// A lane-0 broadcast (one vbroadcastss). `vf{} + x` keeps a scalar add (+0.f is no identity for
// -0.f); an eight-element initialiser and the two-operand shuffle both come out as insert chains.
#if defined(__clang__)
BUS_INLINE vf splat(float x) { return __builtin_shufflevector(vf{x}, vf{x}, 0, 0, 0, 0, 0, 0, 0, 0); }
BUS_INLINE vu splat_u(uint32_t x) { return __builtin_shufflevector(vu{x}, vu{x}, 0, 0, 0, 0, 0, 0, 0, 0); }
#else
BUS_INLINE vf splat(float x) { return __builtin_shuffle(vf{x}, vi{}); }
BUS_INLINE vu splat_u(uint32_t x) { return __builtin_shuffle(vu{x}, vi{}); }
#endif

// Unaligned loads and stores from plain float arrays.
BUS_INLINE vf loadu(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

BUS_INLINE void storeu(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

BUS_INLINE vf vmax(vf a, vf b) { return a > b ? a : b; }

BUS_INLINE float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

BUS_INLINE float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// exp with Cephes' expf polynomial (about 1 ulp) on [-87.33654, 88.37626]. Outside it:
//   x < -87.33654 (below ln FLT_MIN), -inf included -> exactly 0: the softmax tail the fp32
//     reference also rounds away, and exp(-inf) = 0 for the -inf-masked logits of varlen_attention
//     (a clamp alone would turn -inf into 1e-38 and give a fully masked row a uniform softmax);
//   x > 88.72283 (above ln FLT_MAX), +inf included -> +inf; x in (88.37626, 88.72283] saturates
//     at exp(88.37626) ~ 2.4e38 (the clamp keeps 2^n representable; callers subtract a row max
//     or a log-sum-exp first and never feed x > 0 by more than rounding);
//   NaN -> NaN.
BUS_INLINE vf vexp(vf x) {
  const vi under = x < -87.33654f;
  const vi over = x > 88.72283f;
  x = x < -87.33654f ? splat(-87.33654f) : x;
  x = x > 88.37626f ? splat(88.37626f) : x;  // keeps n <= 127
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (|n| <= 128), r = x - n ln 2 in two steps.
  vf n = x * 1.44269504088896341f + 12582912.f;
  n = n - 12582912.f;
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf y = p * (vf)e;
  y = under ? splat(0.f) : y;
  return over ? splat(std::numeric_limits<float>::infinity()) : y;
}

BUS_INLINE float exp1(float x) { return vexp(splat(x))[0]; }

// fp32 <-> storage dtype, 8 at a time. The integer formulas are c10's (fp16_ieee_to_fp32_value,
// fp16_ieee_from_fp32_value, round_to_nearest_even), so results equal torch's conversions bit for bit.
template <typename T>
BUS_INLINE vf load8(const T* p);

template <>
BUS_INLINE vf load8<float>(const float* p) {
  return loadu(p);
}

template <>
BUS_INLINE vf load8<c10::BFloat16>(const c10::BFloat16* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
}

template <>
BUS_INLINE vf load8<c10::Half>(const c10::Half* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  const vu w = __builtin_convertvector(h, vu) << 16;
  const vu sign = w & 0x80000000u;
  const vu two_w = w + w;
  const vf normalized = (vf)((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const vf denormalized = (vf)((two_w >> 17) | (126u << 23)) - 0.5f;
  const vu nonsign = two_w < (1u << 27) ? (vu)denormalized : (vu)normalized;
  return (vf)(sign | nonsign);
}

// fp32 -> the 16-bit patterns of bf16 / fp16.
BUS_INLINE vh narrow8_bf16(vf v) {
  const vu u = (vu)v;
  vu r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  r = v != v ? splat_u(0x7FC0u) : r;
  return __builtin_convertvector(r, vh);
}

BUS_INLINE vh narrow8_half(vf f) {
  const vu w = (vu)f;
  const vu shl1_w = w + w;
  const vu sign = w & 0x80000000u;
  const vf absf = (vf)(w & 0x7FFFFFFFu);
  vf base = (absf * 0x1.0p+112f) * 0x1.0p-110f;
  vu bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? splat_u(0x71000000u) : bias;
  base = (vf)((bias >> 1) + 0x07800000u) + base;
  const vu bits = (vu)base;
  const vu nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const vu r = (sign >> 16) | (shl1_w > 0xFF000000u ? splat_u(0x7E00u) : nonsign);
  return __builtin_convertvector(r, vh);
}

template <typename T>
BUS_INLINE void store8(T* p, vf v);

template <>
BUS_INLINE void store8<float>(float* p, vf v) {
  storeu(p, v);
}

template <>
BUS_INLINE void store8<c10::BFloat16>(c10::BFloat16* p, vf v) {
  const vh h = narrow8_bf16(v);
  std::memcpy(p, &h, sizeof h);
}

template <>
BUS_INLINE void store8<c10::Half>(c10::Half* p, vf v) {
  const vh h = narrow8_half(v);
  std::memcpy(p, &h, sizeof h);
}

#ifdef BUS_X86_DISPATCH
// Whether this CPU runs the BUS_TARGET_AVX2 variants (checked once).
inline bool has_avx2_fma() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
}
#endif

}  // namespace vec8
}  // namespace bus_kernels
