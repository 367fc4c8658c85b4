// Helpers shared by the CPU kernel files: dtype loads/stores (c10's header-only half types, cheap to
// compile) and the runtime choice between an AVX2+FMA build of a hot loop and the baseline x86-64 one,
// so a wheel built here runs on any x86-64 CPU and still uses 8-wide vectors where they exist.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "scan_cpu.h"

namespace compressm::cpu {

inline float load(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::f16: return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    case DType::bf16: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

inline void store(void* p, int64_t i, DType t, float v) {
  switch (t) {
    case DType::f16: static_cast<c10::Half*>(p)[i] = c10::Half(v); break;
    case DType::bf16: static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

// n elements from data + off (unit stride) to fp32 dst; the dtype switch is outside the loops so they vectorise.
inline void load_row(const void* data, int64_t off, DType t, int n, float* dst) {
  switch (t) {
    case DType::f16: {
      const c10::Half* src = static_cast<const c10::Half*>(data) + off;
      for (int i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
      break;
    }
    case DType::bf16: {
      const c10::BFloat16* src = static_cast<const c10::BFloat16*>(data) + off;
      for (int i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
      break;
    }
    default: {
      const float* src = static_cast<const float*>(data) + off;
      for (int i = 0; i < n; ++i) dst[i] = src[i];
    }
  }
}

// n fp32 values to data + off (unit stride) in dtype t.
inline void store_row(void* data, int64_t off, DType t, int n, const float* src) {
  switch (t) {
    case DType::f16: {
      c10::Half* dst = static_cast<c10::Half*>(data) + off;
      for (int i = 0; i < n; ++i) dst[i] = c10::Half(src[i]);
      break;
    }
    case DType::bf16: {
      c10::BFloat16* dst = static_cast<c10::BFloat16*>(data) + off;
      for (int i = 0; i < n; ++i) dst[i] = c10::BFloat16(src[i]);
      break;
    }
    default: {
      float* dst = static_cast<float*>(data) + off;
      for (int i = 0; i < n; ++i) dst[i] = src[i];
    }
  }
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define COMPRESSM_TARGET_AVX2 __attribute__((target("avx2,fma")))
inline bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
// Defines `static void name(const Args&)` that runs `name##_impl` (an always-inline template body)
// compiled for AVX2+FMA when the CPU has them, else for the baseline ISA.
#define COMPRESSM_DISPATCH(name, Args)                                      \
  COMPRESSM_TARGET_AVX2 void name##_avx2(const Args& a) { name##_impl(a); } \
  void name##_base(const Args& a) { name##_impl(a); }                       \
  void name(const Args& a) {                                                \
    if (cpu_has_avx2_fma()) {                                               \
      name##_avx2(a);                                                       \
    } else {                                                                \
      name##_base(a);                                                       \
    }                                                                       \
  }
#else
#define COMPRESSM_DISPATCH(name, Args) \
  void name(const Args& a) { name##_impl(a); }
#endif

#define COMPRESSM_ALWAYS_INLINE __attribute__((always_inline)) inline

}  // namespace compressm::cpu
