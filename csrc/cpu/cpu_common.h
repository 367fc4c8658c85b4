// Helpers shared by the CPU kernel files: dtype loads/stores (c10's header-only half types, cheap to
// compile), sums over states, the decode step's state update eight states at a time (advance_states), and the
// runtime choice between an AVX2+FMA build of a hot loop and the
// baseline x86-64 one, so a wheel built here runs on any x86-64 CPU and still uses 8-wide vectors where
// they exist.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
// The vector helpers here and exp_poly are always inlined, so GCC's note on the ABI of 32-byte vector returns is moot.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <compressm/scan_recurrence.h>

#include <cstdint>
#include <cstdlib>
#include <new>
#include <vector>

#include "scan_cpu.h"

namespace compressm::cpu {

// std::vector's allocator with cache-line (64-byte) alignment, for the kernels' working rows: with malloc's 16 bytes,
// every other 8-lane access of a row whose start is 16 bytes off a 32-byte boundary straddled two cache lines (a
// scan backward ran up to 1.4x slower at N = 16, 1.2x at N = 64, when the heap placed its rows so).
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, size_t) { ::operator delete(p, kAlign); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
template <typename T>
using Aligned = std::vector<T, CacheLineAllocator<T>>;
using Floats = Aligned<float>;

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

// The n values data[off + i·stride] as fp32: the tensor's own memory when it is fp32 with unit stride, else
// converted into buf. The kernels read their activation rows through it: copying fp32 rows cost 5-9 % of a scan
// at N = 8 and libc memcpy calls 6 % of a decode step there.
inline const float* row_as_f32(const void* data, DType t, int64_t off, int64_t stride, int n, float* buf) {
  if (stride == 1 && t == DType::f32) return static_cast<const float*>(data) + off;
  if (stride == 1) {
    load_row(data, off, t, n, buf);
  } else {
    for (int i = 0; i < n; ++i) buf[i] = load(data, off + i * stride, t);
  }
  return buf;
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

#define COMPRESSM_ALWAYS_INLINE __attribute__((always_inline)) inline

// ------------------------------------------------------------------- sums over states without a serial tail
// A loop over a channel's states reduced with `omp simd reduction` ends in a serial sum of the vector lanes,
// per step; at small N that tail costs as much as the states. Instead each step's products are summed into
// eight lanes (the scan's cores, advance_states) and eight steps (or channels) are summed together (sum_rows8).

// out[i] = softplus(x[i] + bias) for n values, and grad[i] = its derivative when grad is given. The exps go first,
// in a loop of their own: in one loop each vector's exp -> division -> series is a ~90-cycle dependency chain,
// more than the out-of-order window overlaps (softplus 35 % and softplus with its derivative 50 % slower, measured
// on 256-step rows). out must not alias x.
COMPRESSM_ALWAYS_INLINE void softplus_row(int n, const float* __restrict x, float bias, float* __restrict out,
                                          float* __restrict grad) {
  for (int i = 0; i < n; ++i) out[i] = exp_f32(-fabsf(x[i] + bias));
  if (grad) {
    for (int i = 0; i < n; ++i) grad[i] = softplus_grad_given_exp(x[i] + bias, out[i]);
  }
  for (int i = 0; i < n; ++i) out[i] = softplus_given_exp(x[i] + bias, out[i]);
}

// Eight float lanes as a compiler vector (SSE pairs on the baseline ISA, one register with AVX2).
typedef float v8f __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));
typedef unsigned v8u __attribute__((vector_size(32)));

}  // namespace compressm::cpu

template <>
struct compressm::UnsignedOf<compressm::cpu::v8f> {  // exp_f32 and exp_eighths on eight lanes
  using type = compressm::cpu::v8u;
};

template <>
struct compressm::Exp2EighthsBits<compressm::cpu::v8u> {  // exp_eighths' table: one permute
  __attribute__((always_inline)) static compressm::cpu::v8u at(compressm::cpu::v8u j) {
    const compressm::cpu::v8u table = {kExp2EighthsBits[0], kExp2EighthsBits[1], kExp2EighthsBits[2],
                                       kExp2EighthsBits[3], kExp2EighthsBits[4], kExp2EighthsBits[5],
                                       kExp2EighthsBits[6], kExp2EighthsBits[7]};
#if defined(__clang__)
    compressm::cpu::v8u out;
    for (int i = 0; i < 8; ++i) out[i] = table[j[i] & 7];
    return out;
#else
    return __builtin_shuffle(table, j);
#endif
  }
};

template <>
struct compressm::ClampBound<compressm::cpu::v8f> {
  __attribute__((always_inline)) static compressm::cpu::v8f of(float v) {
#if defined(__GNUC__) && !defined(__clang__) && defined(__SSE__)
    // GCC 12 compiles y < c ? c : y to vcmpps + vblendvps when c is a constant, to one vmaxps otherwise: the
    // empty asm makes v opaque (it stays loop-invariant, so the broadcast is hoisted). With the blends the decode
    // step was 4 % slower than before exp_eighths clamped y, with vmaxps/vminps 9 % faster. (The baseline loops
    // split every 8-lane select into scalars either way, and run exp_eighths about half as fast as before.)
    asm("" : "+x"(v));
#endif
    return compressm::cpu::v8f{} + v;
  }
};

namespace compressm::cpu {

#if defined(__clang__)
#define COMPRESSM_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define COMPRESSM_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, v8i{__VA_ARGS__})
#endif

COMPRESSM_ALWAYS_INLINE v8f load8(const float* p) {
  v8f v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

// y[i] = Σ_j rows[i][j] for eight rows (steps or channels) at once: three rounds of interleave-and-add, a
// transpose folded into the sums, a few vector ops per row instead of a serial horizontal sum each.
COMPRESSM_ALWAYS_INLINE void sum_rows8(const v8f* rows, float* y) {
  v8f a[4], b[2];
  for (int i = 0; i < 4; ++i) {  // a[i] lanes: even/odd = partial sums of rows 2i / 2i+1
    const v8f x = rows[2 * i], z = rows[2 * i + 1];
    a[i] = COMPRESSM_SHUFFLE(x, z, 0, 8, 1, 9, 4, 12, 5, 13) + COMPRESSM_SHUFFLE(x, z, 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 2; ++i) {  // b[i] lanes 0-3 and 4-7: partial sums of rows 4i .. 4i+3
    const v8f x = a[2 * i], z = a[2 * i + 1];
    b[i] = COMPRESSM_SHUFFLE(x, z, 0, 1, 8, 9, 4, 5, 12, 13) + COMPRESSM_SHUFFLE(x, z, 2, 3, 10, 11, 6, 7, 14, 15);
  }
  const v8f out = COMPRESSM_SHUFFLE(b[0], b[1], 0, 1, 2, 3, 8, 9, 10, 11) +
                  COMPRESSM_SHUFFLE(b[0], b[1], 4, 5, 6, 7, 12, 13, 14, 15);
  __builtin_memcpy(y, &out, sizeof(out));
}

// ------------------------------------------------------------------------ one step, eight states at a time

COMPRESSM_ALWAYS_INLINE void store8(float* p, v8f v) { __builtin_memcpy(p, &v, sizeof(v)); }

// A shuffle of lane 0, not v8f{} + v: adding +0.0 is not an identity for -0.0, so the compiler would keep the
// addition.
COMPRESSM_ALWAYS_INLINE v8f broadcast8(float v) {
  const v8f first = {v};
  return COMPRESSM_SHUFFLE(first, first, 0, 0, 0, 0, 0, 0, 0, 0);
}

// Lanes [8 - tail, 8) of a vector (tail in 1..8): the states a last vector at r - 8 adds to those before it.
COMPRESSM_ALWAYS_INLINE v8i tail_lanes(int tail) {
  const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
  return lane >= 8 - tail;
}

// States [0, 8) of rows h, A, B advanced by one step: decay exp(Δ·A) per state (dl = Δ·kEighthsPerNat), or the
// shared ā (kShared: dl = ā, A unread).
template <bool kShared>
COMPRESSM_ALWAYS_INLINE v8f step8(const float* h, v8f dl, const float* A, v8f dx, const float* B) {
  const v8f a = kShared ? dl : decay_scaled(dl, load8(A));
  return forward_step_decayed(load8(h), a, dx, load8(B));
}

// r states (f32 rows A, B, C, h) advanced by one step, h in place; returns C·h folded to eight lanes. Explicit
// 8-lane code, so the products go straight into the lane sums. The states are ceil(r / 8) vectors, the last one
// at r - 8: when r is not a multiple of 8 it overlaps the one before, so it is computed from the old h first and
// stored last, and only its new lanes are summed. kV > 0: that vector count known at compile time (unrolled),
// and kExact: r = 8·kV; kV = 0: any r. `delta` is Δ·kEighthsPerNat (decay_scaled), or with kShared (the states
// share one A, as Mamba-2's heads do) their decay ā = exp(Δ·A) itself, A unread. (The decode step reads the
// caller's rows in place, so it cannot pad them as the scan does.)
template <int kV, bool kExact = false, bool kShared = false>
COMPRESSM_ALWAYS_INLINE v8f advance_states(int r_runtime, float delta, float delta_x, const float* __restrict A,
                                           const float* __restrict B, const float* __restrict C,
                                           float* __restrict h) {
  static_assert(kV > 0 || !kExact);
  const int r = kExact ? 8 * kV : r_runtime;
  if (kV <= 1 && r < 8) {  // fewer states than lanes: a scalar loop (a vector would be all epilogue), sum in lane 0
    float sum = 0.0f;
    for (int k = 0; k < r; ++k) {
      const float hk = forward_step_decayed(h[k], kShared ? delta : decay_scaled(delta, A[k]), delta_x, B[k]);
      h[k] = hk;
      sum += C[k] * hk;
    }
    return v8f{sum};
  }
  const v8f dl = broadcast8(delta), dx = broadcast8(delta_x);
  if constexpr (kExact) {
    // Whole vectors: the states first, then C·h from the rows just written (in one loop, 8-9 % slower at N = 32
    // and no faster at 64). Not with an overlapping last vector: its store would stall the reload of the one before.
    for (int k = 0; k < r; k += 8) store8(h + k, step8<kShared>(h + k, dl, A + k, dx, B + k));
    v8f acc = {};
    for (int k = 0; k < r; k += 8) acc += load8(C + k) * load8(h + k);
    return acc;
  }
  const int nv = kV > 0 ? kV : (r + 7) / 8, last = r - 8;
  const v8f h_last = step8<kShared>(h + last, dl, A + last, dx, B + last);
  v8f acc = tail_lanes(r - 8 * (nv - 1)) ? load8(C + last) * h_last : v8f{};
  for (int k = 0; k < 8 * (nv - 1); k += 8) {
    const v8f hk = step8<kShared>(h + k, dl, A + k, dx, B + k);
    store8(h + k, hk);
    acc += load8(C + k) * hk;
  }
  store8(h + last, h_last);
  return acc;
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define COMPRESSM_TARGET_AVX2 __attribute__((target("avx2,fma")))
// COMPRESSM_CPU_BASELINE=1 forces the baseline loops, the path a wheel takes on CPUs without AVX2+FMA, so machines
// that have them can test it (any other value, "0" say, does not).
inline bool cpu_has_avx2_fma() {
  static const bool has = [] {
    const char* baseline = std::getenv("COMPRESSM_CPU_BASELINE");
    const bool forced = baseline != nullptr && baseline[0] == '1' && baseline[1] == '\0';
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && !forced;
  }();
  return has;
}
// Defines `static void name(const Args&)` that runs `name##_impl` (an always-inline template body)
// compiled for AVX2+FMA when the CPU has them, else for the baseline ISA. The body takes the arguments by value:
// through the caller's reference GCC reloads every pointer after each vector store (a store through memcpy may
// alias anything), while a copy whose address never escapes lives in registers (the scan's backward 7-11 % faster
// at N = 16-128).
#define COMPRESSM_DISPATCH(name, Args)                 \
  COMPRESSM_TARGET_AVX2 void name##_avx2(Args a) {     \
    name##_impl(a);                                    \
  }                                                    \
  void name##_base(Args a) { name##_impl(a); }         \
  void name(const Args& a) {                           \
    if (cpu_has_avx2_fma()) {                          \
      name##_avx2(a);                                  \
    } else {                                           \
      name##_base(a);                                  \
    }                                                  \
  }
#else
#define COMPRESSM_DISPATCH(name, Args) \
  void name(const Args& a) {           \
    Args local = a;                    \
    name##_impl(local);                \
  }
#endif

}  // namespace compressm::cpu
