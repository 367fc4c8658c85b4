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
// per-state forward step functions (decay, forward_step) are templates on the value type F: float, or on the
// host a GCC vector of floats, so the CPU kernels' explicit 8-lane loops use them too.
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

// The shifter of the exps below: adding 1.5·2^23 pushes a float's fraction out of the mantissa.
constexpr float kShifter = 12582912.0f;
constexpr uint32_t kShifterBits = 0x4B400000u;

// n = round(x·scale) capped at `cap`, returned as a float; `bits` receives the bits of kShifter + n, whose low
// mantissa bits hold n (so n's integer is a bit difference, no float-to-int conversion). The cap is one integer
// min on the bits (NaN and +inf have larger bit patterns too). exp_poly's; exp_eighths rounds with float clamps.
template <typename F, typename I>
__attribute__((always_inline)) inline F round_capped(F x, float scale, uint32_t cap, I& bits) {
  const F shifter = F{} + kShifter;
  const F rounded = x * scale + shifter;
  I rounded_bits;
  __builtin_memcpy(&rounded_bits, &rounded, sizeof(rounded_bits));
  const I top = I{} + (kShifterBits + cap);
  bits = rounded_bits < top ? rounded_bits : top;
  F shifted;
  __builtin_memcpy(&shifted, &bits, sizeof(shifted));
  return shifted - shifter;
}

// exp(x) in fp32 on the host, for F = float or a GCC vector of floats (I: the unsigned type of that shape),
// in the loops the compiler vectorises (softplus, silu; the decay has exp_eighths below). Cody-Waite range
// reduction x = k·ln2 + r, |r| <= ln2/2, and a degree-6 polynomial fitted for least maximum relative error on
// that interval (2e-9; the result is within 1.05 ulp up to x = 88.37, against 0.93 for the degree-7 Taylor
// polynomial it replaced at 12-19 % more time per scan; within 1e-5 up to the overflow to inf at 88.72).
// Branch-free float/int arithmetic (GCC needs -fno-trapping-math to turn the selects into vector blends).
// Only the float instance is ever compiled by nvcc's host pass.
template <typename F, typename I>
__attribute__((always_inline)) inline F exp_poly(F x) {
  const F lo = F{} - 87.33f;  // exp(lo) ~ FLT_MIN
  // k = round(x/ln2) <= 127, so 2^k stays finite and p·2^k overflows to inf exactly where exp does; r keeps x
  // unclamped (r = +inf for x = +inf).
  I shifted_bits;
  const F k = round_capped(x, 1.44269504088896341f, 127, shifted_bits);
  const F r = (x - k * 0.693359375f) + k * 2.12194440e-4f;  // ln2 = 0.693359375 - 2.12194440e-4
  F p = F{} + 1.384365372e-3f;
  p = p * r + 8.374155499e-3f;
  p = p * r + 4.166800156e-2f;
  p = p * r + 1.666643173e-1f;
  p = p * r + 4.999999404e-1f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // 2^k = (k + 127) << 23 with k = shifted_bits - kShifterBits, as one shift and one subtraction of a
  // constant (unsigned, so the shifts wrap); k in [-126, 127] for x >= lo.
  const I bits = (shifted_bits << 23) - ((kShifterBits - 127) << 23);
  F scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  const F e = p * scale;
  // Below lo k, r and p are garbage (NaN for x = -inf): replaced by 0, underflow like expf (ā h would
  // otherwise keep a ~1e-38 residue). NaN x: r and e are NaN.
  return x < lo ? F{} : e;
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

// On the device these keep libm's expf/log1pf; on the host they are built on exp_f32 and plain arithmetic,
// so loops over steps (softplus of Δ, the silu gate) vectorise too.
COMPRESSM_HOST_DEVICE float sigmoid_f32(float x) {
#if defined(__CUDA_ARCH__)
  return 1.0f / (1.0f + expf(-x));
#else
  return 1.0f / (1.0f + exp_f32(-x));
#endif
}

// softplus(x) = log(1 + e^x), with torch's threshold: x for x > 20. On the host as max(x, 0) + log1p(t),
// t = e^-|x| in (0, 1]: log1p(t) = 2·atanh(s), s = t / (2 + t) in [0, 1/3], by atanh's odd series to s^15
// (truncation < 2e-9): one exp and one division, within about 3 ulp.
#if !defined(__CUDA_ARCH__)
// softplus(x) on the host given t = e^-|x| (below).
__attribute__((always_inline)) inline float softplus_given_exp(float x, float t) {
  const float s = t / (2.0f + t), s2 = s * s;
  float p = 1.0f / 15.0f;
  p = p * s2 + 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  const float v = (x > 0.0f ? x : 0.0f) + 2.0f * s * p;
  return x > 20.0f ? x : v;
}
#endif

COMPRESSM_HOST_DEVICE float softplus_f32(float x) {
#if defined(__CUDA_ARCH__)
  return x > 20.0f ? x : log1pf(expf(x));
#else
  return softplus_given_exp(x, exp_f32(-fabsf(x)));
#endif
}

// d softplus / dx = sigmoid(x) (exactly 1 above the threshold, as torch's backward).
COMPRESSM_HOST_DEVICE float softplus_grad_f32(float x) { return x > 20.0f ? 1.0f : sigmoid_f32(x); }

#if !defined(__CUDA_ARCH__)
// d softplus / dx on the host given t = e^-|x| (as softplus_given_exp takes it): sigmoid(x) is 1 / (1 + t) for
// x >= 0 and t / (1 + t) below; exactly 1 above the threshold, as torch's backward.
__attribute__((always_inline)) inline float softplus_grad_given_exp(float x, float t) {
  const float inv = 1.0f / (1.0f + t);
  return x > 20.0f ? 1.0f : (x >= 0.0f ? inv : t * inv);
}
#endif

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

// exp_eighths' table: the bits of 2^(j/8) rounded to fp32, less j << 20, for j = 0..7. Adding n << 20 for
// n = 8k + j then puts k in the exponent field and cancels the j, with no mask between (see exp_eighths).
constexpr uint32_t kExp2EighthsBits[8] = {0x3f800000u, 0x3f7b95c2u, 0x3f7837f0u, 0x3f75fed7u,
                                          0x3f7504f3u, 0x3f75672au, 0x3f7744fdu, 0x3f7ac0c7u};

// kExp2EighthsBits[j & 7] for I = uint32_t; the CPU code adds eight lanes (one register permute).
template <typename I>
struct Exp2EighthsBits {
  static I at(I j) { return kExp2EighthsBits[j & 7]; }
};

// v in every lane of F, for exp_eighths' clamps. The CPU code's vectors hide v from GCC, which would turn a
// select against a constant vector into a compare and a blend instead of one min or max.
template <typename F>
struct ClampBound {
  static F of(float v) { return F{} + v; }
};

// 8/ln2: the CPU kernels fold it into Δ or A once (per token or per call), so the decay's exp takes its
// argument in eighths of ln2 (exp_eighths) and needs no range-reduction multiply. mamba_ssm's CUDA kernel
// folds log2(e) into A the same way for exp2f.
constexpr float kEighthsPerNat = 11.5415601730f;

// exp(y·ln2/8) in fp32 on the host: the decay ā = exp(Δ·A) with y = Δ·A·8/ln2, the scans' and the decode step's
// hottest function (F, I: as exp_poly). y = n + r with n = 8k + j and |r| <= 1/2 (r = y - n is exact), so
// ā = 2^k · 2^(j/8) · (1 + s): 2^(j/8) from a table with k added to its exponent field, s = r·q with
// q = c1 + r·(c2 + c3·r) (a cubic fitted for least maximum relative error, in units of ln2/8: 3e-8), and
// T + (T·r)·q rounded once.
// Within 1.14 ulp of exp(y·ln2/8) up to y = 1023 with FMA, 1.35 without. Against the exact exp(Δ·A), folding
// adds the roundings of 8/ln2 and of the folded operand to that of the product (each |Δ·A|·2^-24 relative at
// most): 2.3 ulp at most for |Δ·A| <= 1 (1.5 for exp of the fp32 Δ·A reduced by Cody-Waite), 16 against 9 for
// |Δ·A| <= 10, where ā < 5e-5 (measured on 4·10^6 random Δ, A). In exchange three of the ~11 FMA-pipe operations
// per 8 states go: a decode step 6-22 %, a scan forward 7-18 % faster. Not for loops the compiler vectorises (the
// table would become a gather): those use exp_poly.
// Both ends are clamps of y (float max and min), not exp_poly's integer min and select of 0: on Zen 3 those
// compete with the FMAs, which this loop already keeps busy, while max and min run beside them (one thread: a
// decode step 8-13 %, a scan forward 7-10 %, its backward 2-4 % faster).
template <typename F, typename I>
__attribute__((always_inline)) inline F exp_eighths(F y) {
  // y is raised to -1016 = 8·(-127), which n = -1016 takes from y < -1015.5 (x < -87.99) on: there T's bits are
  // 0, so ā = +0 exactly, where expf's is a subnormal of at most 2^-127·2^(1/16). Up to n = -1009 (k = -127) T is
  // the subnormal (2^(j/8) - 1)·2^-126 instead of 2^(j/8)·2^-127, off by at most as much; from n = -1008 on ā is
  // a normal float. NaN y stays NaN: the comparison is false.
  const F floor = ClampBound<F>::of(-1016.0f);
  const F y_floored = y < floor ? floor : y;
  // n = min(round(y), 1023) (k <= 127), so 2^k · T stays finite and T·(1 + s) overflows to inf where exp does:
  // r keeps y uncapped. n_bits, the bits of the shifter plus n, hold n in their low bits (the shifter's are 0).
  const F shifter = F{} + kShifter, capped = ClampBound<F>::of(kShifter + 1023.0f);
  const F shifted = y_floored + shifter;
  const F rounded = shifted < capped ? shifted : capped;
  I n_bits;
  __builtin_memcpy(&n_bits, &rounded, sizeof(n_bits));
  const F r = y_floored - (rounded - shifter);
  const F q = (r * 1.0840770119e-4f + 3.7540232297e-3f) * r + 8.6643397808e-2f;
  // T = 2^(j/8) · 2^k: n_bits << 20 is n << 20 (the shifter's bits shift out), (k << 23) + (j << 20), and the
  // table entry is the bits of 2^(j/8) less j << 20, so their sum has k added to T's exponent field (in [0, 254]).
  const I t_bits = Exp2EighthsBits<I>::at(n_bits) + (n_bits << 20);
  F t;
  __builtin_memcpy(&t, &t_bits, sizeof(t));
  return (t * r) * q + t;
}

// ā = exp(Δ · A) on the host, from Δ and A of which one carries kEighthsPerNat (the CPU kernels).
template <typename F>
__attribute__((always_inline)) inline F decay_scaled(F delta, F A) {
  return exp_eighths<F, typename UnsignedOf<F>::type>(delta * A);
}

// ā = exp(Δ · A) from plain Δ and A: the hardware exp on the device, exp_poly on the host (the CUDA kernels'
// code as g++ compiles it for their CPU emulation test).
template <typename F>
COMPRESSM_HOST_DEVICE F decay(F delta, F A) {
  return exp_f32(delta * A);
}

// --------------------------------------------------------------------------------- one state, one step

// h_t = ā_t · h_{t-1} + Δ_t · u_t · B_t (delta_u = Δ_t · u_t, shared by all states of the channel), with ā_t
// given: a channel whose states share one A (Mamba-2's heads) computes it once per step.
template <typename F>
COMPRESSM_HOST_DEVICE F forward_step_decayed(F h_prev, F a, F delta_u, F B) {
  return a * h_prev + delta_u * B;
}

template <typename F>
COMPRESSM_HOST_DEVICE F forward_step(F h_prev, F delta, F A, F delta_u, F B) {
  return forward_step_decayed(h_prev, decay(delta, A), delta_u, B);
}

// Gradient contributions of one state at one step (see the header comment). (The CPU kernels' reverse pass
// factors dΔ_t and du_t out of the state loop instead: selective_scan_cpu.cpp's ReverseArgs.)
struct StepGrads {
  float dB, dC, ddelta, du, dA;
  float carry;  // ā_t · g_t, the carry into step t-1
};

// carry = ā_{t+1} g_{t+1} (or ∂loss/∂h_{L-1} at the last step); h_prev = h_{t-1}; h = h_t.
COMPRESSM_HOST_DEVICE StepGrads reverse_step(float carry, float dy, float delta, float A, float u, float B, float C,
                                             float h_prev, float h) {
  const float a = decay(delta, A);
  const float g = dy * C + carry;
  const float g_delta = g * delta;
  StepGrads out;
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
