// The selective-scan recurrence (MATH.md §1), written once for host (C++/OpenMP) and device (CUDA) code.
//
// Per batch b, channel d, state n, step t (fp32 throughout):
//   Δ_t  = softplus(δ_t + bias)   (or δ_t + bias without softplus)      discretize()
//   ā_t  = exp(Δ_t · A)                                                 decay()
//   h_t  = ā_t · h_{t-1} + Δ_t · B_t · u_t,      h_{-1} = carry in      forward_step()
//   y_t += C_t · h_t                              (summed over states by the caller)
//
// Backward, for one state, with dy_t = ∂loss/∂y_t (before the D skip and the z gate) and
// g_t = ∂loss/∂h_t, run from the last step to the first (reverse_step()):
//   g_t   = dy_t · C_t + ā_{t+1} · g_{t+1}       (the ā_{t+1} g_{t+1} term is the "carry" between steps;
//                                                 at t = L-1 it is ∂loss/∂last_state, else 0)
//   dC_t  += dy_t · h_t
//   dB_t  += g_t · Δ_t · u_t
//   dΔ_t  += g_t · (A · ā_t · h_{t-1} + B_t · u_t)
//   du_t  += g_t · Δ_t · B_t
//   dA    += g_t · Δ_t · ā_t · h_{t-1}
// and dδ_t = dΔ_t · discretize_grad(δ_t, bias).
//
// Only plain float math and no std:: facilities, so a CPU loop over a channel's kept states (which the
// compiler vectorises across states) and a CUDA thread holding one state call the same functions. The
// per-state step functions (decay, forward_step, reverse_step) are templates on the value type F: float,
// or on the host a GCC vector of floats, so the CPU kernels' explicit 8-lane loops use them too.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define COMPRESSM_HOST_DEVICE __host__ __device__ __forceinline__
#else
// Always inlined on the host: the CPU kernels call these from AVX2-compiled functions, and an out-of-line
// copy (baseline ISA) would take 8-lane vector arguments under a different calling convention.
#define COMPRESSM_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace compressm {

// ---------------------------------------------------------------------------------------------- scalars

// exp(x) in fp32 on the host, for F = float or a GCC vector of floats (I: the unsigned type of that shape),
// so the loops the compiler vectorises (F = float) and the CPU decode step's explicit 8-lane loop share one
// implementation. Cody-Waite range reduction x = k·ln2 + r, |r| <= ln2/2, and a degree-7 Taylor polynomial
// (truncation < 0.1 ulp); branch-free float/int arithmetic (GCC needs -fno-trapping-math to turn the
// selects into vector blends). Only the float instance is ever compiled by nvcc's host pass.
template <typename F, typename I>
__attribute__((always_inline)) inline F exp_poly(F x) {
  const F lo = F{} - 87.33f, hi = F{} + 88.0f;  // exp(lo) ~ FLT_MIN; 2^k stays finite up to hi
  // Clamp written as max(lo, x) then min(hi, ·) with x second, so each is one maxps/minps and NaN stays NaN.
  const F above_lo = lo > x ? lo : x;
  const F xc = hi < above_lo ? hi : above_lo;
  // Round x/ln2 to nearest: adding 1.5·2^23 pushes the fraction out of the mantissa, leaving k in the low
  // mantissa bits of `shifted` (so k's integer is a bit difference, no float-to-int conversion).
  const F shifter = F{} + 12582912.0f;
  const F shifted = xc * 1.44269504088896341f + shifter;
  const F k = shifted - shifter;
  const F r = (xc - k * 0.693359375f) + k * 2.12194440e-4f;  // ln2 = 0.693359375 - 2.12194440e-4
  F p = F{} + 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  I shifted_bits, shifter_bits;
  __builtin_memcpy(&shifted_bits, &shifted, sizeof(shifted_bits));
  __builtin_memcpy(&shifter_bits, &shifter, sizeof(shifter_bits));
  // 2^k = (k + 127) << 23 with k = shifted_bits - shifter_bits, as one shift and one subtraction of a
  // constant (unsigned, so the shifts wrap); k in [-126, 128).
  const I bits = (shifted_bits << 23) - ((shifter_bits - 127) << 23);
  F scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  const F e = p * scale;
  return x < lo ? F{} : e;  // underflow to 0 like expf (ā h would otherwise keep a ~1e-38 residue)
}

// The unsigned integer type with F's shape, for exp_poly's bit arithmetic; the CPU code adds its vectors.
template <typename F>
struct UnsignedOf {
  using type = uint32_t;
};

// exp(x) in fp32: the hardware instruction on the device, exp_poly on the host.
template <typename F>
COMPRESSM_HOST_DEVICE F exp_f32(F x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return exp_poly<F, typename UnsignedOf<F>::type>(x);
#endif
}

// log(x) for finite x > 0. On the host, branch-free like exp_f32: x = m·2^e with m in [√½, √2),
// log m = 2·atanh(s) = 2(s + s³/3 + ... + s⁹/9), s = (m-1)/(m+1), |s| <= 0.172 (truncation < 1e-9).
COMPRESSM_HOST_DEVICE float log_f32(float x) {
#if defined(__CUDA_ARCH__)
  return __logf(x);
#else
  int32_t bits;
  __builtin_memcpy(&bits, &x, sizeof(bits));
  const int32_t mbits = (bits & 0x007fffff) | 0x3f800000;  // mantissa as a float in [1, 2)
  float m;
  __builtin_memcpy(&m, &mbits, sizeof(m));
  const bool high = m > 1.41421356f;
  m = high ? 0.5f * m : m;
  const float e = static_cast<float>(((bits >> 23) & 0xff) - 127 + (high ? 1 : 0));
  const float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
  float p = 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p + e * 0.693147180559945f;
#endif
}

// log(1 + y) for y > -1, accurate for small y: log(u)·y/(u-1) with u = fl(1 + y) cancels u's rounding.
COMPRESSM_HOST_DEVICE float log1p_f32(float y) {
#if defined(__CUDA_ARCH__)
  return log1pf(y);
#else
  const float u = 1.0f + y;
  return u == 1.0f ? y : log_f32(u) * (y / (u - 1.0f));
#endif
}

// On the device these keep libm's expf/log1pf; on the host they use the vectorisable versions above, so
// loops over steps (softplus of Δ, the silu gate) vectorise too.
COMPRESSM_HOST_DEVICE float sigmoid_f32(float x) {
#if defined(__CUDA_ARCH__)
  return 1.0f / (1.0f + expf(-x));
#else
  return 1.0f / (1.0f + exp_f32(-x));
#endif
}

// softplus(x) = log(1 + e^x), with torch's threshold: x for x > 20.
COMPRESSM_HOST_DEVICE float softplus_f32(float x) {
#if defined(__CUDA_ARCH__)
  return x > 20.0f ? x : log1pf(expf(x));
#else
  return x > 20.0f ? x : log1p_f32(exp_f32(x));
#endif
}

// d softplus / dx = sigmoid(x) (exactly 1 above the threshold, as torch's backward).
COMPRESSM_HOST_DEVICE float softplus_grad_f32(float x) { return x > 20.0f ? 1.0f : sigmoid_f32(x); }

COMPRESSM_HOST_DEVICE float silu_f32(float x) { return x * sigmoid_f32(x); }

// d silu / dx = s · (1 + x · (1 - s)), s = sigmoid(x).
COMPRESSM_HOST_DEVICE float silu_grad_f32(float x) {
  const float s = sigmoid_f32(x);
  return s * (1.0f + x * (1.0f - s));
}

// ------------------------------------------------------------------------------------- discretisation

// Δ = softplus(δ + bias) or δ + bias.
COMPRESSM_HOST_DEVICE float discretize(float delta_raw, float bias, bool softplus) {
  const float v = delta_raw + bias;
  return softplus ? softplus_f32(v) : v;
}

// dΔ/dδ (= dΔ/dbias).
COMPRESSM_HOST_DEVICE float discretize_grad(float delta_raw, float bias, bool softplus) {
  return softplus ? softplus_grad_f32(delta_raw + bias) : 1.0f;
}

// ā = exp(Δ · A).
template <typename F>
COMPRESSM_HOST_DEVICE F decay(F delta, F A) {
  return exp_f32(delta * A);
}

// --------------------------------------------------------------------------------- one state, one step

// h_t = ā_t · h_{t-1} + Δ_t · u_t · B_t (delta_u = Δ_t · u_t, shared by all states of the channel).
template <typename F>
COMPRESSM_HOST_DEVICE F forward_step(F h_prev, F delta, F A, F delta_u, F B) {
  return decay(delta, A) * h_prev + delta_u * B;
}

// Gradient contributions of one state (or one vector of states) at one step (see the header comment).
template <typename F>
struct StepGradsOf {
  F dB, dC, ddelta, du, dA;
  F carry;  // ā_t · g_t, the carry into step t-1
};
using StepGrads = StepGradsOf<float>;

// carry = ā_{t+1} g_{t+1} (or ∂loss/∂h_{L-1} at the last step); h_prev = h_{t-1}; h = h_t.
template <typename F>
COMPRESSM_HOST_DEVICE StepGradsOf<F> reverse_step(F carry, F dy, F delta, F A, F u, F B, F C, F h_prev, F h) {
  const F a = decay(delta, A);
  const F g = dy * C + carry;
  const F g_delta = g * delta;
  StepGradsOf<F> out;
  out.dC = dy * h;
  out.dB = g_delta * u;
  out.ddelta = g * (A * a * h_prev + B * u);
  out.du = g_delta * B;
  out.dA = g_delta * a * h_prev;
  out.carry = a * g;
  return out;
}

// ------------------------------------------------------------------------------- one state, one chunk

// Inputs of one step for one state.
struct StepInputs {
  float delta;    // Δ_t (discretized)
  float delta_u;  // Δ_t · u_t
  float B, C;
};

// Runs one state over T steps from carry h; at(t) -> StepInputs, emit(t, C_t·h_t) receives each
// step's contribution to y_t. Returns h_{T-1}, the carry into the next chunk.
template <typename At, typename Emit>
COMPRESSM_HOST_DEVICE float forward_chunk(float h, float A, int T, At at, Emit emit) {
  for (int t = 0; t < T; ++t) {
    const StepInputs s = at(t);
    h = forward_step(h, s.delta, A, s.delta_u, s.B);
    emit(t, s.C * h);
  }
  return h;
}

// Inputs of one reverse step for one state.
struct ReverseInputs {
  float dy;      // ∂loss/∂y_t (before the D skip and the z gate)
  float delta;   // Δ_t
  float u, B, C;
  float h_prev;  // h_{t-1} (the chunk's carry in at t = 0)
  float h;       // h_t
};

// Runs the reverse recurrence of one state over a chunk of T steps, t = T-1 .. 0: carry is ā_T g_T
// from the next chunk (or ∂loss/∂last_state); at(t) -> ReverseInputs; emit(t, StepGrads) receives
// each step's gradients (the caller accumulates dA and reduces dΔ/du over states). Returns the carry
// into the previous chunk.
template <typename At, typename Emit>
COMPRESSM_HOST_DEVICE float reverse_chunk(float carry, float A, int T, At at, Emit emit) {
  for (int t = T - 1; t >= 0; --t) {
    const ReverseInputs s = at(t);
    const StepGrads g = reverse_step(carry, s.dy, s.delta, A, s.u, s.B, s.C, s.h_prev, s.h);
    emit(t, g);
    carry = g.carry;
  }
  return carry;
}

}  // namespace compressm
