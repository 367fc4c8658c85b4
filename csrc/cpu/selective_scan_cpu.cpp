// Selective scan forward and backward on the CPU (MATH.md §1): OpenMP over batch × channel, the state
// loop innermost and vectorised across a channel's kept states, fp32 accumulation.
//
// Layout: variable B/C are first transposed once to fp32 (Bt, G, L, NP), NP = N rounded up to a multiple of 8
// (see round8), so that each step's states are
// contiguous (and shared by every channel of the group). A channel runs its steps chunk by chunk; the
// forward saves the state at each chunk end ("carries", (Bt, D, n_chunks, N)), the backward recomputes
// a chunk's states from the previous carry, then runs the reverse recurrence over it.
#if defined(_OPENMP)
#include <omp.h>
#endif

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "cpu_common.h"  // includes compressm/scan_recurrence.h after its diagnostic pragma
#include "scan_cpu.h"

namespace compressm::cpu {
namespace {

// ------------------------------------------------------------------------------------ vectorised cores

// A channel's r states are laid out padded to rp = round8(r) (a whole number of 8-lane vectors): A, h, the
// carry, dA, and every row of B/C/hist/dB/dC have rp entries, the padding lanes 0. A padding lane has
// A = h = B = C = 0, so it stays 0 through every step and adds nothing, forward or backward; no vector ever
// straddles the end of the states, and a step's store is exactly the next step's load.
COMPRESSM_ALWAYS_INLINE constexpr int round8(int n) { return (n + 7) & ~7; }

// T steps of r states (padded to rp). Row t of B/C is at B + t·ldb (ldb = rp, or 0: time-invariant); h (rp,) is
// updated in place; y[t] = Σ_k C_t[k] h_t[k]; hist (T, rp), when given, receives every h_t, and hist_decay (T, rp)
// every ā_t (the states' own A: the backward's reverse pass reads them instead of taking each exp again). With
// hist, y may be nullptr: the backward's recomputation needs Σ C h only for the z gate's gradient.
struct ForwardArgs {
  int r, T;
  const float* A;  // (rp,) A·kEighthsPerNat, for decay_scaled
  float* h;
  const float* delta;    // (T,) Δ_t
  const float* delta_u;  // (T,) Δ_t u_t
  const float* B;
  int64_t ldb;
  const float* C;
  int64_t ldc;
  float* y;
  float* hist;
  const float* decay;  // (T,) ā_t when the channel's states share one A (see Channel::shared_A), else nullptr
  float* hist_decay;
};

constexpr int kMaxState = 256;  // the package's MAX_DSTATE; bindings.cpp checks it
constexpr int kMaxChunk = 1024;  // steps per chunk at most (cpu.py's chunk_size); bindings.cpp checks it

// y[0 .. T) = Σ_j lanes[t][j]; lanes is zero-padded to a multiple of 8 steps first.
COMPRESSM_ALWAYS_INLINE void sum_steps(v8f* lanes, int T, float* y) {
  alignas(32) float tmp[8];
  for (int t = T; t % 8 != 0; ++t) lanes[t] = v8f{};
  for (int t0 = 0; t0 < T; t0 += 8) {
    if (t0 + 8 <= T) {
      sum_rows8(lanes + t0, y + t0);
    } else {
      sum_rows8(lanes + t0, tmp);
      for (int t = t0; t < T; ++t) y[t] = tmp[t - t0];
    }
  }
}

// States [k0, k0 + 8·kV) of rp over steps [t0, t1), the state and A in registers (through memory, each step's
// update would wait for the previous step's store to be forwarded, the critical path at small N); lanes[t] += the
// block's C_t·h_t folded to eight lanes (!kY: no lanes, C unread). kShared: ā_t from a.decay, one per step,
// instead of an exp per state. kWhole: the block is all the channel's states (k0 = 0, rp = 8·kV) and writes
// lanes[t] instead of adding to it. kRows: B and C are rows rp apart, as hist is (ldb = ldc = rp: variable B and C).
// A whole block's rows are then a constant apart, which frees the registers the strides took: GCC ran short and
// reloaded pointers from the stack every step (forward 1-5 % and backward 2-7 % faster at N = 8-64).
template <bool kHist, int kV, bool kShared, bool kWhole, bool kY, bool kRows>
COMPRESSM_ALWAYS_INLINE void forward_block(const ForwardArgs& a, int k0, int rp, int t0, int t1, v8f* lanes) {
  const int64_t ld = kWhole && kRows ? 8 * kV : rp, ldb = kRows ? ld : a.ldb, ldc = kRows ? ld : a.ldc;
  v8f h[kV], A[kV];
  for (int j = 0; j < kV; ++j) h[j] = load8(a.h + k0 + 8 * j), A[j] = load8(a.A + k0 + 8 * j);
  for (int t = t0; t < t1; ++t) {
    const v8f delta = broadcast8(a.delta[t]), delta_u = broadcast8(a.delta_u[t]);
    const int64_t row = t * ld + k0;
    const float* B = a.B + t * ldb + k0;
    const float* C = a.C + t * ldc + k0;
    v8f acc = kWhole || !kY ? v8f{} : lanes[t];
    for (int j = 0; j < kV; ++j) {
      const v8f a_t = kShared ? broadcast8(a.decay[t]) : decay_scaled(delta, A[j]);
      h[j] = forward_step_decayed(h[j], a_t, delta_u, load8(B + 8 * j));
      if constexpr (kHist) {
        store8(a.hist + row + 8 * j, h[j]);
        if (!kShared) store8(a.hist_decay + row + 8 * j, a_t);
      }
      if constexpr (kY) acc += load8(C + 8 * j) * h[j];
    }
    if constexpr (kY) lanes[t] = acc;
  }
  for (int j = 0; j < kV; ++j) store8(a.h + k0 + 8 * j, h[j]);
}

// forward_block for states [k0, k1), at most 8 vectors.
template <bool kHist, bool kShared, bool kWhole, bool kY, bool kRows>
COMPRESSM_ALWAYS_INLINE void forward_block_sized(const ForwardArgs& a, int k0, int k1, int rp, int t0, int t1,
                                                 v8f* lanes) {
  switch ((k1 - k0) / 8) {
    case 1: forward_block<kHist, 1, kShared, kWhole, kY, kRows>(a, k0, rp, t0, t1, lanes); break;
    case 2: forward_block<kHist, 2, kShared, kWhole, kY, kRows>(a, k0, rp, t0, t1, lanes); break;
    case 3: forward_block<kHist, 3, kShared, kWhole, kY, kRows>(a, k0, rp, t0, t1, lanes); break;
    case 4: forward_block<kHist, 4, kShared, kWhole, kY, kRows>(a, k0, rp, t0, t1, lanes); break;
    case 5: forward_block<kHist, 5, kShared, kWhole, kY, kRows>(a, k0, rp, t0, t1, lanes); break;
    case 6: forward_block<kHist, 6, kShared, kWhole, kY, kRows>(a, k0, rp, t0, t1, lanes); break;
    case 7: forward_block<kHist, 7, kShared, kWhole, kY, kRows>(a, k0, rp, t0, t1, lanes); break;
    default: forward_block<kHist, 8, kShared, kWhole, kY, kRows>(a, k0, rp, t0, t1, lanes);
  }
}

// Steps per pass of the register blocks: their B/C rows (2 · 64 · N floats) stay in L2 for the next block (whole
// 256-step chunks made N = 192-256 13-20 % slower than one pass with the states through memory).
constexpr int kBlockSteps = 64;

// More than 64 states, each with its own exp: all of them each step, through memory (blocks of 64 in registers
// ran 2-4 % slower at N = 128, 11-15 % at 192-256: per step, the exps of every state are independent work).
template <bool kHist, bool kY>
COMPRESSM_ALWAYS_INLINE void forward_through_memory(const ForwardArgs& a, int rp, v8f* lanes) {
  for (int t = 0; t < a.T; ++t) {
    const v8f delta = broadcast8(a.delta[t]), delta_u = broadcast8(a.delta_u[t]);
    const float* B = a.B + t * a.ldb;
    const float* C = a.C + t * a.ldc;
    v8f acc{};
    for (int k = 0; k < rp; k += 8) {
      const v8f a_t = decay_scaled(delta, load8(a.A + k));
      const v8f hk = forward_step_decayed(load8(a.h + k), a_t, delta_u, load8(B + k));
      store8(a.h + k, hk);
      if constexpr (kHist) {
        store8(a.hist + static_cast<int64_t>(t) * rp + k, hk);
        store8(a.hist_decay + static_cast<int64_t>(t) * rp + k, a_t);
      }
      if constexpr (kY) acc += load8(C + k) * hk;
    }
    if constexpr (kY) lanes[t] = acc;
  }
}

// The states in register blocks of up to 8 vectors (64 states), one after another over each kBlockSteps steps
// (with a shared A, N = 128 runs 1.3x faster than with its states through memory); more than 64 states with their
// own A through memory.
template <bool kHist, bool kShared, bool kY, bool kRows>
COMPRESSM_ALWAYS_INLINE void forward_core(const ForwardArgs& a) {
  v8f lanes[kMaxChunk + 8];  // per step, C_t·h_t folded to eight lanes
  const int rp = round8(a.r);
  if (rp == 0) {  // a channel whose mask keeps no state
    std::fill_n(lanes, a.T, v8f{});
  } else if (!kShared && rp > 64) {
    forward_through_memory<kHist, kY>(a, rp, lanes);
  } else if (rp <= 64) {
    for (int t0 = 0; t0 < a.T; t0 += kBlockSteps) {
      forward_block_sized<kHist, kShared, true, kY, kRows>(a, 0, rp, rp, t0, std::min(a.T, t0 + kBlockSteps), lanes);
    }
  } else {
    if constexpr (kY) std::fill_n(lanes, a.T, v8f{});
    for (int t0 = 0; t0 < a.T; t0 += kBlockSteps) {
      const int t1 = std::min(a.T, t0 + kBlockSteps);
      for (int k0 = 0; k0 < rp; k0 += 64) {
        forward_block_sized<kHist, kShared, false, kY, kRows>(a, k0, std::min(rp, k0 + 64), rp, t0, t1, lanes);
      }
    }
  }
  if constexpr (kY) sum_steps(lanes, a.T, a.y);
}
template <bool kHist, bool kRows>
COMPRESSM_ALWAYS_INLINE void forward_core_variant(const ForwardArgs& a) {
  if (!kHist || a.y) {
    a.decay ? forward_core<kHist, true, true, kRows>(a) : forward_core<kHist, false, true, kRows>(a);
  } else {
    a.decay ? forward_core<kHist, true, false, kRows>(a) : forward_core<kHist, false, false, kRows>(a);
  }
}
// Separate functions for B/C as rows and with either time-invariant, so that neither's loops share the other's
// register allocation (in one function, the rows' loops lost what their constant strides won).
COMPRESSM_ALWAYS_INLINE void forward_rows_impl(const ForwardArgs& a) { forward_core_variant<false, true>(a); }
COMPRESSM_ALWAYS_INLINE void forward_rows_hist_impl(const ForwardArgs& a) { forward_core_variant<true, true>(a); }
COMPRESSM_ALWAYS_INLINE void forward_strided_impl(const ForwardArgs& a) { forward_core_variant<false, false>(a); }
COMPRESSM_ALWAYS_INLINE void forward_strided_hist_impl(const ForwardArgs& a) { forward_core_variant<true, false>(a); }
COMPRESSM_DISPATCH(forward_rows, ForwardArgs)
COMPRESSM_DISPATCH(forward_rows_hist, ForwardArgs)
COMPRESSM_DISPATCH(forward_strided, ForwardArgs)
COMPRESSM_DISPATCH(forward_strided_hist, ForwardArgs)

// forward_core on a channel's rows (ChannelRows), recording hist and hist_decay when kHist.
template <bool kHist>
void forward_pass(const ForwardArgs& a) {
  const bool rows = a.ldb == round8(a.r) && a.ldc == round8(a.r);
  if constexpr (kHist) {
    rows ? forward_rows_hist(a) : forward_strided_hist(a);
  } else {
    rows ? forward_rows(a) : forward_strided(a);
  }
}

// The reverse recurrence over T steps of r states (padded to rp; t = T-1 .. 0). carry (rp,) is ā_{t+1} g_{t+1}
// on entry (from the next chunk) and on exit; dB/dC rows (ld rp, or 0: accumulate over t) and dA (rp,) are
// accumulated. With g_t = ∂loss/∂h_t and w_t = ā_t g_t h_{t-1} per state, the per-state terms of dΔ_t and du_t
// (scan_recurrence.h's backward) sum to dΔ_t = Σ A w + u_t Σ g B and du_t = Δ_t Σ g B: ddelta (T,) receives
// Σ A w (with a shared A: Σ g h_{t-1}, times A ā_t later) and du (T,) Σ g B, and finish_steps completes them.
// Per state that leaves 8 vector operations a step, where reverse_step's per-state dΔ and du take 12 (backward
// 5 % faster at N = 64, 8 % at N = 3, the same at N = 8).
struct ReverseArgs {
  int r, T;
  const float* A;
  float* carry;
  const float* delta;
  const float* delta_u;  // (T,) Δ_t u_t
  const float* dy;
  const float* B;
  int64_t ldb;
  const float* C;
  int64_t ldc;
  const float* h_in;  // (rp,) h before the chunk
  const float* hist;  // (T, rp) h_t
  const float* hist_decay;  // (T, rp) ā_t of each state (ForwardArgs::hist_decay), or nullptr with decay
  float* dB;
  int64_t lddb;
  float* dC;
  int64_t lddc;
  float* dA;
  float* ddelta;
  float* du;
  const float* decay;  // as ForwardArgs::decay
};

// As forward_block, in reverse: states [k0, k0 + 8·kV) of rp over steps [t0, t1) from the last, their carry, A
// and dA in registers; gradients added to dB/dC rows, dΔ_t and du_t folded into (kWhole: written to) the step's
// lanes. kRows: B, C, dB and dC are all rows rp apart (see forward_block).
template <int kV, bool kShared, bool kWhole, bool kRows>
COMPRESSM_ALWAYS_INLINE void reverse_block(const ReverseArgs& a, int k0, int rp, int t0, int t1, v8f* lanes_ddelta,
                                           v8f* lanes_du) {
  // With one or two vectors, h_{t-1} (loaded for this step) stays in registers as the next step's h_t: the pass is
  // bound by its loads there (N = 8 3 %, N = 16 1.5 % faster); with more, h_t would spill (N = 64 2-8 % slower).
  constexpr bool kKeepH = kV <= 2;
  const int64_t ld = kWhole && kRows ? 8 * kV : rp, ldb = kRows ? ld : a.ldb, ldc = kRows ? ld : a.ldc,
                lddb = kRows ? ld : a.lddb, lddc = kRows ? ld : a.lddc;
  v8f carry[kV], A[kV], dA[kV], h_t[kV];
  for (int j = 0; j < kV; ++j) {
    carry[j] = load8(a.carry + k0 + 8 * j), A[j] = load8(a.A + k0 + 8 * j), dA[j] = load8(a.dA + k0 + 8 * j);
    if (kKeepH) h_t[j] = load8(a.hist + (t1 - 1) * ld + k0 + 8 * j);
  }
  // Step t, h_{t-1} at hp: the loop's rows of hist, then the chunk's h_in at t = 0 (a select in the loop cost a
  // stack load and a cmov every step).
  auto step = [&](int t, const float* hp) __attribute__((always_inline)) {
    const v8f dy = broadcast8(a.dy[t]), d = broadcast8(a.delta[t]), du_t = broadcast8(a.delta_u[t]);
    const int64_t row = t * ld + k0;
    const float* ht = a.hist + row;
    const float* B = a.B + t * ldb + k0;
    const float* C = a.C + t * ldc + k0;
    float* dB = a.dB + t * lddb + k0;
    float* dC = a.dC + t * lddc + k0;
    v8f ddelta = kWhole ? v8f{} : lanes_ddelta[t], du = kWhole ? v8f{} : lanes_du[t];
    if constexpr (kShared) {  // one ā_t for every state: Σ A w = A ā_t Σ g h_{t-1}
      const v8f a_t = broadcast8(a.decay[t]), da_t = broadcast8(a.delta[t] * a.decay[t]);
#pragma GCC unroll 8
      for (int j = 0; j < kV; ++j) {
        const int k = 8 * j;
        const v8f g = dy * load8(C + k) + carry[j], h_prev = load8(hp + k);
        const v8f gh = g * h_prev;
        store8(dB + k, load8(dB + k) + g * du_t);
        store8(dC + k, load8(dC + k) + dy * (kKeepH ? h_t[j] : load8(ht + k)));
        if (kKeepH) h_t[j] = h_prev;
        dA[j] += da_t * gh;
        carry[j] = a_t * g;
        ddelta += gh;                // Σ g h_{t-1}
        du += g * load8(B + k);      // Σ g B_t
      }
    } else {
#pragma GCC unroll 8
      for (int j = 0; j < kV; ++j) {
        const int k = 8 * j;
        const v8f a_t = load8(a.hist_decay + row + k);
        const v8f g = dy * load8(C + k) + carry[j];
        carry[j] = a_t * g;
        const v8f h_prev = load8(hp + k);
        const v8f w = carry[j] * h_prev;  // ā g h_{t-1}
        store8(dB + k, load8(dB + k) + g * du_t);
        store8(dC + k, load8(dC + k) + dy * (kKeepH ? h_t[j] : load8(ht + k)));
        if (kKeepH) h_t[j] = h_prev;
        dA[j] += d * w;
        ddelta += A[j] * w;          // Σ A w
        du += g * load8(B + k);      // Σ g B
      }
    }
    lanes_ddelta[t] = ddelta;
    lanes_du[t] = du;
  };
  for (int t = t1 - 1; t >= std::max(t0, 1); --t) step(t, a.hist + (t - 1) * ld + k0);
  if (t0 == 0) step(0, a.h_in + k0);
  for (int j = 0; j < kV; ++j) store8(a.carry + k0 + 8 * j, carry[j]), store8(a.dA + k0 + 8 * j, dA[j]);
}

// reverse_block for states [k0, k1), at most 8 vectors.
template <bool kShared, bool kWhole, bool kRows>
COMPRESSM_ALWAYS_INLINE void reverse_block_sized(const ReverseArgs& a, int k0, int k1, int rp, int t0, int t1,
                                                 v8f* lanes_ddelta, v8f* lanes_du) {
  switch ((k1 - k0) / 8) {
    case 1: reverse_block<1, kShared, kWhole, kRows>(a, k0, rp, t0, t1, lanes_ddelta, lanes_du); break;
    case 2: reverse_block<2, kShared, kWhole, kRows>(a, k0, rp, t0, t1, lanes_ddelta, lanes_du); break;
    case 3: reverse_block<3, kShared, kWhole, kRows>(a, k0, rp, t0, t1, lanes_ddelta, lanes_du); break;
    case 4: reverse_block<4, kShared, kWhole, kRows>(a, k0, rp, t0, t1, lanes_ddelta, lanes_du); break;
    case 5: reverse_block<5, kShared, kWhole, kRows>(a, k0, rp, t0, t1, lanes_ddelta, lanes_du); break;
    case 6: reverse_block<6, kShared, kWhole, kRows>(a, k0, rp, t0, t1, lanes_ddelta, lanes_du); break;
    case 7: reverse_block<7, kShared, kWhole, kRows>(a, k0, rp, t0, t1, lanes_ddelta, lanes_du); break;
    default: reverse_block<8, kShared, kWhole, kRows>(a, k0, rp, t0, t1, lanes_ddelta, lanes_du);
  }
}

// The reverse recurrence in forward_core's register blocks, kBlockSteps steps at a time from the last.
template <bool kShared, bool kRows>
COMPRESSM_ALWAYS_INLINE void reverse_core(const ReverseArgs& a) {
  v8f lanes_ddelta[kMaxChunk + 8], lanes_du[kMaxChunk + 8];  // per step, folded to eight lanes
  const int rp = round8(a.r);
  if (rp == 0 || rp > 64) {  // no state kept (the lanes stay 0), or blocks that add to the lanes
    std::fill_n(lanes_ddelta, a.T, v8f{});
    std::fill_n(lanes_du, a.T, v8f{});
  }
  for (int t1 = rp > 0 ? a.T : 0; t1 > 0; t1 -= kBlockSteps) {
    const int t0 = std::max(0, t1 - kBlockSteps);
    if (rp <= 64) {
      reverse_block_sized<kShared, true, kRows>(a, 0, rp, rp, t0, t1, lanes_ddelta, lanes_du);
    } else {
      for (int k0 = 0; k0 < rp; k0 += 64) {
        reverse_block_sized<kShared, false, kRows>(a, k0, std::min(rp, k0 + 64), rp, t0, t1, lanes_ddelta, lanes_du);
      }
    }
  }
  sum_steps(lanes_ddelta, a.T, a.ddelta);
  sum_steps(lanes_du, a.T, a.du);
}

// As forward_rows and forward_strided.
COMPRESSM_ALWAYS_INLINE void reverse_rows_impl(const ReverseArgs& a) {
  a.decay ? reverse_core<true, true>(a) : reverse_core<false, true>(a);
}
COMPRESSM_ALWAYS_INLINE void reverse_strided_impl(const ReverseArgs& a) {
  a.decay ? reverse_core<true, false>(a) : reverse_core<false, false>(a);
}
COMPRESSM_DISPATCH(reverse_rows, ReverseArgs)
COMPRESSM_DISPATCH(reverse_strided, ReverseArgs)

void reverse_pass(const ReverseArgs& a) {
  const int rp = round8(a.r);
  const bool rows = a.ldb == rp && a.ldc == rp && a.lddb == rp && a.lddc == rp;
  rows ? reverse_rows(a) : reverse_strided(a);
}

// Per-step math of one channel over T steps (vectorised across steps): delta receives Δ from the raw δ, grad
// (nullptr in the forward, which has no use for it) dΔ/dδ, delta_u Δ·u, and decay (when given) ā = exp(Δ·A) for
// a channel whose states share A.
struct DiscretizeArgs {
  int T;
  float bias;
  bool softplus;
  const float* raw;
  float* delta;
  float* grad;
  float* delta_u;
  const float* u;
  float A = 0.0f;
  float* decay = nullptr;
};

COMPRESSM_ALWAYS_INLINE void discretize_steps_impl(const DiscretizeArgs& a) {
  const float* __restrict raw = a.raw;
  float* __restrict delta = a.delta;
  float* __restrict grad = a.grad;
  float* __restrict delta_u = a.delta_u;
  const float* __restrict u = a.u;
  if (a.softplus) {
    softplus_row(a.T, raw, a.bias, delta, grad);
  } else {
    for (int t = 0; t < a.T; ++t) delta[t] = raw[t] + a.bias;
    if (grad) std::fill_n(grad, a.T, 1.0f);
  }
  for (int t = 0; t < a.T; ++t) delta_u[t] = delta[t] * u[t];
  if (a.decay) {
    float* __restrict decay = a.decay;
    for (int t = 0; t < a.T; ++t) decay[t] = exp_f32(delta[t] * a.A);
  }
}
COMPRESSM_DISPATCH(discretize_steps, DiscretizeArgs)

// The D skip and the z gate. Forward (dout == nullptr): y <- (y + D·u)·silu(z). Backward: y is Σ C h,
// dy = dout·silu(z) (the gradient reaching Σ C h; without a gate dy is dout and not written),
// dz = dout·(y + D·u)·silu'(z), *dD += Σ dy·u.
struct GateArgs {
  int T;
  float D;
  const float* u;
  const float* z;  // nullptr: no gate
  float* y;
  const float* dout;
  float* dy;
  float* dz;
  float* dD;
};

COMPRESSM_ALWAYS_INLINE void gate_steps_impl(const GateArgs& a) {
  const float* __restrict u = a.u;
  const float* __restrict z = a.z;
  float* __restrict y = a.y;
  const float* __restrict dout = a.dout;
  float* __restrict dz = a.dz;
  if (dout == nullptr) {
    for (int t = 0; t < a.T; ++t) y[t] += a.D * u[t];
    if (z) {
      for (int t = 0; t < a.T; ++t) y[t] *= silu_f32(z[t]);
    }
    return;
  }
  const float D = a.D;  // a local, or GCC versions the loop for the stores aliasing a.D (and then gives up)
  float dD = 0.0f;
  if (z) {
    float* __restrict dy = a.dy;
#pragma omp simd reduction(+ : dD)
    for (int t = 0; t < a.T; ++t) {  // silu and its derivative from one sigmoid (silu_f32, silu_grad_f32)
      const float sig = sigmoid_f32(z[t]);
      dz[t] = dout[t] * (y[t] + D * u[t]) * (sig * (1.0f + z[t] * (1.0f - sig)));
      dy[t] = dout[t] * (z[t] * sig);
      dD += dy[t] * u[t];
    }
  } else {
#pragma omp simd reduction(+ : dD)
    for (int t = 0; t < a.T; ++t) dD += dout[t] * u[t];
  }
  *a.dD += dD;
}
COMPRESSM_DISPATCH(gate_steps, GateArgs)

// The backward's last per-step math, from the reverse pass's sums over states (ReverseArgs): dΔ = Σ A w + u Σ g B
// (with a shared A: A ā Σ g h_{t-1} + u Σ g B), then dδ = dΔ · dΔ/dδ (also summed into *ddelta_bias), and
// du = Δ Σ g B + dy·D, the D skip's share. A loop of its own, vectorised across steps.
struct FinishArgs {
  int T;
  float D;
  const float* delta;
  const float* u;
  const float* decay;  // (T,) ā_t with a shared A (ForwardArgs::decay), else nullptr
  float A;             // that shared A
  const float* delta_grad;
  const float* dy;
  float* ddelta;  // in: Σ A w (Σ g h_{t-1}); out: dδ
  float* du;      // in: Σ g B; out: du
  float* ddelta_bias;
};

template <bool kShared>
COMPRESSM_ALWAYS_INLINE void finish_steps_loop(const FinishArgs& a) {
  const float* __restrict delta = a.delta;
  const float* __restrict u = a.u;
  const float* __restrict decay = a.decay;
  const float* __restrict delta_grad = a.delta_grad;
  const float* __restrict dy = a.dy;
  float* __restrict ddelta = a.ddelta;
  float* __restrict du = a.du;
  const float A = a.A, D = a.D;
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int t = 0; t < a.T; ++t) {
    const float g_B = du[t], A_w = kShared ? A * decay[t] * ddelta[t] : ddelta[t];
    ddelta[t] = (A_w + u[t] * g_B) * delta_grad[t];
    sum += ddelta[t];
    du[t] = delta[t] * g_B + dy[t] * D;
  }
  *a.ddelta_bias += sum;
}
COMPRESSM_ALWAYS_INLINE void finish_steps_impl(const FinishArgs& a) {
  a.decay ? finish_steps_loop<true>(a) : finish_steps_loop<false>(a);
}
COMPRESSM_DISPATCH(finish_steps, FinishArgs)

// ------------------------------------------------------------------------------------------ B and C

// With a per-channel mask, a channel gathers its kept states into rp = round8(r) lanes when that saves vectors
// (rp < NP); otherwise it runs all NP lanes of the shared rows with its dropped states masked in place: their B (and
// in the backward C) lanes read as 0, so their h stay 0 and they get no gradient, for a masked copy of its rows
// instead of gathers and scatters (ranks in [N/2, N]: forward 1.10-1.25x, backward 1.15-1.29x at N = 8-64).
bool gathers(const ScanParams& p, int d) {
  return p.kept != nullptr && round8(p.ranks ? p.ranks[d] : p.dstate) < round8(p.dstate);
}

// Variable B or C as fp32, in one or both of two layouts. Step-major (Bt, G, L, NP), NP = round8(N): row (b, g, t)
// holds the N states of step t contiguously, then zeros; the cores read it in place. State-major (Bt, G, N, L),
// for the channels that gather their kept states, whose steps are then contiguous (a chunk's gather reads r short
// rows instead of every state of T rows).
struct Rows {
  Floats steps, states;  // empty when no channel reads that layout
  int groups = 1;
  int width = 8;  // step-major: lanes per channel; below NP, channels are packed (the states tiled NP / width times)

  // Row t0 of (b, group of channel d): step-major, or state 0's step t0 when `state_major`.
  const float* at(const ScanParams& p, int b, int d, int t0, bool state_major) const {
    const int64_t bg = static_cast<int64_t>(b) * groups + d / (p.dim / groups);
    return state_major ? states.data() + bg * p.dstate * p.seqlen + t0
                       : steps.data() + (bg * p.seqlen + t0) * round8(p.dstate);
  }
};

// Which layouts the channels read (without a per-channel mask: step-major only).
struct Layouts {
  bool steps = false, states = false;
};
Layouts layouts(const ScanParams& p) {
  Layouts l;
  for (int d = 0; d < p.dim && !(l.steps && l.states); ++d) (gathers(p, d) ? l.states : l.steps) = true;
  return l;
}

// width: NP, or the states of a packed channel (pack_width).
Rows variable_rows(const Operand& x, bool variable, int groups, int width, const ScanParams& p, Layouts layouts) {
  constexpr int kBlock = 64;  // steps per task: a (64, N) tile stays in cache while it is transposed
  Rows rows;
  if (!variable) return rows;
  const int N = p.dstate, L = p.seqlen, np = round8(N);
  rows.groups = groups;
  rows.width = width;
  if (layouts.states) {
    rows.states.resize(static_cast<size_t>(p.batch) * groups * N * L);
    const int64_t tasks = static_cast<int64_t>(p.batch) * groups * N;
#pragma omp parallel for num_threads(p.num_threads) schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t bg = task / N, n = task % N, b = bg / groups, g = bg % groups;
      load_row(x.data, b * x.stride0 + g * x.stride1 + n * x.stride2, x.dtype, L, rows.states.data() + task * L);
    }
  }
  if (!layouts.steps) return rows;
  rows.steps.resize(static_cast<size_t>(p.batch) * groups * L * np);  // zero-filled: the padding
  const int blocks = (L + kBlock - 1) / kBlock;
  const int64_t tasks = static_cast<int64_t>(p.batch) * groups * blocks;
#pragma omp parallel for num_threads(p.num_threads) schedule(static)
  for (int64_t task = 0; task < tasks; ++task) {
    const int blk = static_cast<int>(task % blocks);
    const int64_t bg = task / blocks;
    const int64_t b = bg / groups, g = bg % groups;
    const int t0 = blk * kBlock, t1 = std::min(L, t0 + kBlock);
    float* dst = rows.steps.data() + (bg * L) * np;
    const int64_t src = b * x.stride0 + g * x.stride1;
    for (int n = 0; n < N; ++n) {
      const int64_t row = src + n * x.stride2;
      for (int t = t0; t < t1; ++t) {
        const float v = load(x.data, row + t, x.dtype);
        for (int lane = n; lane < np; lane += width) dst[static_cast<int64_t>(t) * np + lane] = v;
      }
    }
  }
  return rows;
}

// Per-thread working memory, sized once per thread. The (chunk, NP) rows are 64 KB each at N = 64, zeroed at
// every call: only what the pass uses is allocated (the gathers only with a per-channel mask).
struct Scratch {
  Floats A, A_scaled, h, h_in, carry, dA, B_inv, C_inv, dB_inv, dC_inv;  // (NP,)
  Floats delta, delta_grad, delta_u, decay, y, dy, ddelta, du, dz;  // (chunk,)
  Floats raw, u, z, dout;  // (chunk,) an activation row converted to fp32 when it is not fp32
  Floats hist, hist_decay, B_gather, C_gather, dB_gather, dC_gather;  // (chunk, NP)
  Aligned<uint32_t> keep;  // (NP,) a channel masked in place: all ones for its kept states, else 0

  Scratch(int N, int chunk, bool backward, bool gather)
      : A(round8(N)), A_scaled(round8(N)), h(round8(N)), h_in(round8(N)), carry(round8(N)), dA(round8(N)),
        B_inv(round8(N)), C_inv(round8(N)), dB_inv(round8(N)), dC_inv(round8(N)), delta(chunk), delta_grad(chunk),
        delta_u(chunk), decay(chunk), y(chunk), dy(chunk), ddelta(chunk), du(chunk), dz(chunk), raw(chunk), u(chunk),
        z(chunk), dout(chunk) {
    const size_t rows = static_cast<size_t>(chunk) * round8(N);
    if (backward) hist.resize(rows), hist_decay.resize(rows);
    if (gather) B_gather.resize(rows), C_gather.resize(rows), keep.resize(round8(N));
    if (gather && backward) dB_gather.resize(rows), dC_gather.resize(rows);
  }
};

// Eight vectors transposed in place: v[j][i] <- v[i][j] (three rounds of interleaves).
COMPRESSM_ALWAYS_INLINE void transpose8(v8f* v) {
  v8f t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = COMPRESSM_SHUFFLE(v[i], v[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = COMPRESSM_SHUFFLE(v[i], v[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {
    for (int h = 0; h < 2; ++h) {
      u[i + 2 * h] = COMPRESSM_SHUFFLE(t[i + h], t[i + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 2 * h + 1] = COMPRESSM_SHUFFLE(t[i + h], t[i + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = COMPRESSM_SHUFFLE(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    v[i + 4] = COMPRESSM_SHUFFLE(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// A channel's kept states and T steps of state-major rows (state n's steps at rows + n·L) as step rows padded
// to rp = round8(r): columns[t·rp + k] = rows[kept[k]·L + t], zeros for k in [r, rp). Gathered 8 states by
// 8 steps at a time through an in-register transpose.
struct GatherArgs {
  const float* rows;
  int64_t L;
  int T, r;
  const int32_t* kept;
  float* columns;
};

COMPRESSM_ALWAYS_INLINE void gather_columns_impl(const GatherArgs& a) {
  const int rp = round8(a.r), T8 = a.T & ~7;
  for (int k0 = 0; k0 < rp; k0 += 8) {
    const float* src[8];
    for (int i = 0; i < 8; ++i) src[i] = k0 + i < a.r ? a.rows + a.kept[k0 + i] * a.L : nullptr;
    for (int t = 0; t < T8; t += 8) {
      v8f v[8];
      for (int i = 0; i < 8; ++i) v[i] = src[i] ? load8(src[i] + t) : v8f{};
      transpose8(v);
      for (int j = 0; j < 8; ++j) store8(a.columns + (t + j) * rp + k0, v[j]);
    }
    for (int t = T8; t < a.T; ++t) {
      for (int i = 0; i < 8; ++i) a.columns[t * rp + k0 + i] = src[i] ? src[i][t] : 0.0f;
    }
  }
}
COMPRESSM_DISPATCH(gather_columns, GatherArgs)

// The inverse of gather_columns, for gradients: rows[kept[k]·L + t] += columns[t·rp + k] for k < r, and the
// columns zeroed as they are read, ready for the next chunk's sums (a separate fill cost ~4 % of a per-channel-rank
// fwd+bwd).
struct ScatterArgs {
  float* columns;
  int64_t L;
  int T, r;
  const int32_t* kept;
  float* rows;
};

COMPRESSM_ALWAYS_INLINE void scatter_add_columns_impl(const ScatterArgs& a) {
  const int rp = round8(a.r), T8 = a.T & ~7;
  for (int k0 = 0; k0 < rp; k0 += 8) {
    float* dst[8];
    for (int i = 0; i < 8; ++i) dst[i] = k0 + i < a.r ? a.rows + a.kept[k0 + i] * a.L : nullptr;
    for (int t = 0; t < T8; t += 8) {
      v8f v[8];
      for (int j = 0; j < 8; ++j) {
        float* column = a.columns + (t + j) * rp + k0;
        v[j] = load8(column);
        store8(column, v8f{});
      }
      transpose8(v);
      for (int i = 0; i < 8; ++i) {
        if (dst[i]) store8(dst[i] + t, load8(dst[i] + t) + v[i]);
      }
    }
    for (int t = T8; t < a.T; ++t) {
      for (int i = 0; i < 8; ++i) {
        if (dst[i]) dst[i][t] += a.columns[t * rp + k0 + i];
        a.columns[t * rp + k0 + i] = 0.0f;
      }
    }
  }
}
COMPRESSM_DISPATCH(scatter_add_columns, ScatterArgs)

// T step rows of np lanes with a channel's dropped states zeroed: out[t·np + k] = rows[t·np + k] & keep[k].
struct MaskArgs {
  const float* rows;
  int T, np;
  const uint32_t* keep;
  float* out;
};

COMPRESSM_ALWAYS_INLINE void mask_rows_impl(const MaskArgs& a) {
  for (int t = 0; t < a.T; ++t) {
    for (int k = 0; k < a.np; k += 8) {
      v8u v, keep;
      __builtin_memcpy(&v, a.rows + t * a.np + k, sizeof(v));
      __builtin_memcpy(&keep, a.keep + k, sizeof(keep));
      v &= keep;
      __builtin_memcpy(a.out + t * a.np + k, &v, sizeof(v));
    }
  }
}
COMPRESSM_DISPATCH(mask_rows, MaskArgs)

// Where a channel's B and C rows for steps [t0, t0 + T) live: row t of B at B + t·ldb, entry k = its k-th kept
// state (likewise C). Variable: the step-major rows themselves (ld = NP); with kept states to gather, gathered
// from the state-major rows into the scratch (ld = rp); with states masked in place (keep), the step-major rows
// masked into the scratch (ld = NP), C only for the backward (!forward: the forward's dropped states are 0
// whatever C is; the backward's are 0 with B masked, and get no gradient with C masked). Time-invariant: the
// channel's vector (ld = 0).
struct ChannelRows {
  const float* B;
  int64_t ldb;
  const float* C;
  int64_t ldc;
};

ChannelRows channel_rows(const Rows& B, const Rows& C, const ScanParams& p, int b, int d, int t0, int r,
                         const int32_t* kept, const uint32_t* keep, int T, bool forward, Scratch& s) {
  const int np = round8(p.dstate);
  ChannelRows out{s.B_inv.data(), 0, s.C_inv.data(), 0};
  auto rows_of = [&](const Rows& rows, float* scratch, bool masked, const float*& at, int64_t& ld) {
    if (kept != nullptr) {
      gather_columns({rows.at(p, b, d, t0, true), p.seqlen, T, r, kept, scratch});
      at = scratch, ld = round8(r);
    } else if (keep != nullptr && masked) {
      mask_rows({rows.at(p, b, d, t0, false), T, np, keep, scratch});
      at = scratch, ld = np;
    } else {
      at = rows.at(p, b, d, t0, false), ld = np;
    }
  };
  if (p.b_variable) rows_of(B, s.B_gather.data(), true, out.B, out.ldb);
  if (p.c_variable) rows_of(C, s.C_gather.data(), !forward, out.C, out.ldc);
  return out;
}

// --------------------------------------------------------------------------------------- per channel

// What one (batch, channel) pair reads: its rank, kept states, and parameters gathered to kept order.
struct Channel {
  int b, d, r;
  const int32_t* kept;  // nullptr: all N states in order
  const uint32_t* keep = nullptr;  // states masked in place (see gathers): Scratch::keep; nullptr: none dropped
  int64_t act;          // offset of (b, d, 0) in u / delta / z / dout
  int64_t dense;        // offset of (b, d, 0) in the contiguous (Bt, D, L) outputs
  float D, bias;
  // Every kept state has the same A (Mamba-2's heads: one A per head, as a (D, N) A with equal rows): the
  // decay is then one exp per step (ForwardArgs::decay), not one per state.
  bool shared_A = false;

  Channel() = default;
  Channel(const ScanParams& p, int b_, int d_, Scratch& s) : b(b_), d(d_) {
    const int N = p.dstate, rank = p.ranks ? p.ranks[d] : N;
    const int32_t* kept_states = p.kept ? p.kept + static_cast<int64_t>(d) * N : nullptr;
    kept = gathers(p, d) ? kept_states : nullptr;
    r = kept ? rank : N;
    if (kept_states && !kept && rank < N) {  // masked in place
      std::fill(s.keep.begin(), s.keep.end(), 0u);
      for (int k = 0; k < rank; ++k) s.keep[kept_states[k]] = ~0u;
      keep = s.keep.data();
    }
    act = b * p.u.stride0 + d * p.u.stride1;
    dense = (static_cast<int64_t>(b) * p.dim + d) * p.seqlen;
    D = p.D ? p.D[d] : 0.0f;
    bias = p.delta_bias ? p.delta_bias[d] : 0.0f;
    for (int k = 0; k < r; ++k) {
      const int n = state(k);
      s.A[k] = p.A[static_cast<int64_t>(d) * N + n];
      if (!p.b_variable) s.B_inv[k] = static_cast<const float*>(p.B.data)[d * p.B.stride0 + n * p.B.stride1];
      if (!p.c_variable) s.C_inv[k] = static_cast<const float*>(p.C.data)[d * p.C.stride0 + n * p.C.stride1];
    }
    for (int k = r; k < round8(r); ++k) s.A[k] = s.B_inv[k] = s.C_inv[k] = 0.0f;
    for (int k = 0; keep && k < r; ++k) {  // time-invariant B/C masked in place as the rows are
      if (!keep[k]) s.B_inv[k] = s.C_inv[k] = 0.0f;
    }
    // The forward's A, 8/ln2 folded in once per call (decay_scaled); the backward's gradients take A itself.
    for (int k = 0; k < round8(r); ++k) s.A_scaled[k] = s.A[k] * kEighthsPerNat;
    shared_A = r > 1 && std::all_of(s.A.begin() + 1, s.A.begin() + r, [&](float A) { return A == s.A[0]; });
  }
  int state(int k) const { return kept ? kept[k] : k; }
  bool dropped(int k) const { return keep && !keep[k]; }
};

// Asks the cache for T elements of a row from element offset `off` (for writing when kWrite).
template <bool kWrite>
void prefetch_row(const void* data, int64_t off, DType t, int T) {
  const int64_t size = t == DType::f32 ? 4 : 2;
  const char* row = static_cast<const char*>(data) + off * size;
  for (int64_t i = 0; i < T * size; i += 64) __builtin_prefetch(row + i, kWrite ? 1 : 0);
}

// T steps of an activation row (unit stride along L) from element `off` as fp32 (in place when fp32).
const float* steps_in(const Operand& op, int64_t off, int T, Floats& buf) {
  return row_as_f32(op.data, op.dtype, off, 1, T, buf.data());
}

// Where T steps of a dense (Bt, D, L) output from element `off` are computed: in place when it is fp32, else
// in `buf`, which steps_out_done then converts.
float* steps_out(void* data, DType t, int64_t off, Floats& buf) {
  return t == DType::f32 ? static_cast<float*>(data) + off : buf.data();
}
void steps_out_done(void* data, DType t, int64_t off, int T, const float* steps) {
  if (t != DType::f32) store_row(data, off, t, T, steps);
}

// Δ_t and Δ_t u_t (and dΔ/dδ) for steps [t0, t0 + T) of a channel; returns its u_t as fp32.
const float* load_steps(const ScanParams& p, const Channel& ch, int t0, int T, bool grad, Scratch& s) {
  const float* raw = steps_in(p.delta, ch.b * p.delta.stride0 + ch.d * p.delta.stride1 + t0, T, s.raw);
  const float* u = steps_in(p.u, ch.act + t0, T, s.u);
  float* delta_grad = grad ? s.delta_grad.data() : nullptr;
  discretize_steps({T, ch.bias, p.delta_softplus, raw, s.delta.data(), delta_grad, s.delta_u.data(), u, s.A[0],
                    ch.shared_A ? s.decay.data() : nullptr});
  return u;
}

// The z gate and D skip over T steps from t0 of a channel's output y (from Σ C h), written out in place or
// converted from the scratch row.
void gate_forward(const ScanParams& p, const Channel& ch, int t0, int T, const float* u, float* y, Scratch& s) {
  const float* z = p.z.data ? steps_in(p.z, ch.b * p.z.stride0 + ch.d * p.z.stride1 + t0, T, s.z) : nullptr;
  gate_steps({T, ch.D, u, z, y, nullptr, nullptr, nullptr, nullptr});
  steps_out_done(p.out, p.u.dtype, ch.dense + t0, T, y);
}

// Back through the z gate and D skip: writes dz, adds to *dD, and returns dy, the gradient of Σ_n C h (y: Σ C h
// recomputed, read only with a gate).
const float* gate_backward(const ScanParams& p, const Channel& ch, int t0, int T, const float* u, float* y,
                           Scratch& s, float* dD) {
  const float* dout = steps_in(p.dout, ch.b * p.dout.stride0 + ch.d * p.dout.stride1 + t0, T, s.dout);
  const float* z = p.z.data ? steps_in(p.z, ch.b * p.z.stride0 + ch.d * p.z.stride1 + t0, T, s.z) : nullptr;
  float* dz = z ? steps_out(p.dz, p.z.dtype, ch.dense + t0, s.dz) : nullptr;
  gate_steps({T, ch.D, u, z, y, dout, s.dy.data(), dz, dD});
  if (z) steps_out_done(p.dz, p.z.dtype, ch.dense + t0, T, dz);
  return z ? s.dy.data() : dout;
}

void channel_forward(const ScanParams& p, const Rows& B, const Rows& C, int b, int d, Scratch& s) {
  const Channel ch(p, b, d, s);
  const int N = p.dstate, n_chunks = p.n_chunks();
  std::fill_n(s.h.begin(), round8(ch.r), 0.0f);
  for (int c = 0; c < n_chunks; ++c) {
    const int t0 = c * p.chunk, T = std::min(p.chunk, p.seqlen - t0);
    const float* u = load_steps(p, ch, t0, T, false, s);
    const ChannelRows rows = channel_rows(B, C, p, b, d, t0, ch.r, ch.kept, ch.keep, T, true, s);
    float* y = steps_out(p.out, p.u.dtype, ch.dense + t0, s.y);
    forward_pass<false>({ch.r, T, s.A_scaled.data(), s.h.data(), s.delta.data(), s.delta_u.data(), rows.B, rows.ldb,
                         rows.C, rows.ldc, y, nullptr, ch.shared_A ? s.decay.data() : nullptr});

    float* carry = p.carries + ((static_cast<int64_t>(b) * p.dim + d) * n_chunks + c) * N;
    if (ch.kept) std::fill_n(carry, N, 0.0f);  // masked states stay exactly 0
    for (int k = 0; k < ch.r; ++k) carry[ch.state(k)] = s.h[k];
    gate_forward(p, ch, t0, T, u, y, s);
  }
}

// A thread's partial dB (or dC) rows of one batch, in the layouts of B's (C's) rows: step-major (G, L, NP) for the
// channels that read the step-major rows, state-major (G, N, L) for those that gather their kept states (each
// nullptr when no channel writes it). The channels of a group add into the same rows.
struct Partial {
  float* steps = nullptr;
  float* states = nullptr;
};

// Backward of one (batch, channel): dB/dC of variable B/C go to this thread's partial rows for batch b, in the
// layout of the rows the channel reads (Partial); everything per channel (dA, dD,
// ddelta_bias, invariant dB/dC) is added to the outputs directly (the caller runs batches one after another,
// so no two threads share a channel).
void channel_backward(const ScanParams& p, const Rows& B, const Rows& C, int b, int d, Scratch& s, Partial dB_part,
                      Partial dC_part) {
  const Channel ch(p, b, d, s);
  const int N = p.dstate, np = round8(N), r = ch.r, rp = round8(r), n_chunks = p.n_chunks();
  const int64_t bd = static_cast<int64_t>(b) * p.dim + d;
  std::fill_n(s.carry.begin(), rp, 0.0f);
  for (int k = 0; k < r; ++k) s.carry[k] = p.dlast && !ch.dropped(k) ? p.dlast[bd * N + ch.state(k)] : 0.0f;
  std::fill_n(s.dA.begin(), rp, 0.0f);
  std::fill_n(s.dB_inv.begin(), rp, 0.0f);
  std::fill_n(s.dC_inv.begin(), rp, 0.0f);
  std::fill_n(s.h_in.begin(), rp, 0.0f);
  const int64_t off_z = p.z.data ? b * p.z.stride0 + d * p.z.stride1 : 0;
  const int64_t off_dout = b * p.dout.stride0 + d * p.dout.stride1;
  float dD = 0.0f, ddelta_bias = 0.0f;

  for (int c = n_chunks - 1; c >= 0; --c) {
    const int t0 = c * p.chunk, T = std::min(p.chunk, p.seqlen - t0);
    // Prefetch the chunk before this one: the hardware prefetchers follow this backward walk poorly (5-11 % of a
    // backward; they do follow the forward's walk, where prefetching cost 2-3 %).
    if (c > 0) {
      const int t_prev = t0 - p.chunk;
      prefetch_row<false>(p.u.data, ch.act + t_prev, p.u.dtype, p.chunk);
      prefetch_row<false>(p.delta.data, ch.b * p.delta.stride0 + ch.d * p.delta.stride1 + t_prev, p.delta.dtype,
                          p.chunk);
      prefetch_row<false>(p.dout.data, off_dout + t_prev, p.dout.dtype, p.chunk);
      if (p.z.data) prefetch_row<false>(p.z.data, off_z + t_prev, p.z.dtype, p.chunk);
      prefetch_row<true>(p.du, ch.dense + t_prev, p.u.dtype, p.chunk);
      prefetch_row<true>(p.ddelta, ch.dense + t_prev, p.delta.dtype, p.chunk);
      if (p.z.data) prefetch_row<true>(p.dz, ch.dense + t_prev, p.z.dtype, p.chunk);
    }
    const float* u = load_steps(p, ch, t0, T, true, s);
    const ChannelRows rows = channel_rows(B, C, p, b, d, t0, r, ch.kept, ch.keep, T, false, s);

    // Recompute the chunk's states from the carry saved by the forward.
    const float* saved = p.carries + (bd * n_chunks + c - 1) * N;
    for (int k = 0; k < r; ++k) s.h_in[k] = c > 0 ? saved[ch.state(k)] : 0.0f;
    std::copy_n(s.h_in.begin(), rp, s.h.begin());
    // Σ C h (y) only for the z gate's gradient.
    forward_pass<true>({r, T, s.A_scaled.data(), s.h.data(), s.delta.data(), s.delta_u.data(), rows.B, rows.ldb, rows.C,
                        rows.ldc, p.z.data ? s.y.data() : nullptr, s.hist.data(),
                        ch.shared_A ? s.decay.data() : nullptr, s.hist_decay.data()});

    const float* dy = gate_backward(p, ch, t0, T, u, s.y.data(), s, &dD);

    // This channel's group rows of the thread's partial dB/dC, from step t0.
    auto part_rows = [&](const Partial& part, const Rows& rows) -> float* {
      const int64_t g = d / (p.dim / rows.groups);
      if (ch.kept) return part.states ? part.states + g * N * p.seqlen + t0 : nullptr;
      return part.steps ? part.steps + (g * p.seqlen + t0) * np : nullptr;
    };
    float* dB_rows = part_rows(dB_part, B);
    float* dC_rows = part_rows(dC_part, C);
    float *dBp = s.dB_inv.data(), *dCp = s.dC_inv.data();
    int64_t lddb = 0, lddc = 0;
    if (p.b_variable) {
      dBp = ch.kept ? s.dB_gather.data() : dB_rows;
      lddb = ch.kept ? rp : np;
    }
    if (p.c_variable) {
      dCp = ch.kept ? s.dC_gather.data() : dC_rows;
      lddc = ch.kept ? rp : np;
    }
    float* ddelta = steps_out(p.ddelta, p.delta.dtype, ch.dense + t0, s.ddelta);
    float* du = steps_out(p.du, p.u.dtype, ch.dense + t0, s.du);
    reverse_pass({r, T, s.A.data(), s.carry.data(), s.delta.data(), s.delta_u.data(), dy, rows.B, rows.ldb, rows.C,
                  rows.ldc, s.h_in.data(), s.hist.data(), s.hist_decay.data(), dBp, lddb, dCp, lddc, s.dA.data(),
                  ddelta, du, ch.shared_A ? s.decay.data() : nullptr});
    if (ch.kept) {  // add the kept states' columns back at their state indices
      if (p.b_variable) scatter_add_columns({s.dB_gather.data(), p.seqlen, T, r, ch.kept, dB_rows});
      if (p.c_variable) scatter_add_columns({s.dC_gather.data(), p.seqlen, T, r, ch.kept, dC_rows});
    }

    finish_steps({T, ch.D, s.delta.data(), u, ch.shared_A ? s.decay.data() : nullptr, s.A[0], s.delta_grad.data(), dy,
                  ddelta, du, &ddelta_bias});
    steps_out_done(p.ddelta, p.delta.dtype, ch.dense + t0, T, ddelta);
    steps_out_done(p.du, p.u.dtype, ch.dense + t0, T, du);
  }

  for (int k = 0; k < r; ++k) {
    const int64_t dn = static_cast<int64_t>(d) * N + ch.state(k);
    p.dA[dn] += s.dA[k];
    if (!p.b_variable) static_cast<float*>(p.dB)[dn] += s.dB_inv[k];
    if (!p.c_variable) static_cast<float*>(p.dC)[dn] += s.dC_inv[k];
  }
  if (p.dD) p.dD[d] += dD;
  if (p.ddelta_bias) p.ddelta_bias[d] += ddelta_bias;
}

// ------------------------------------------------------------------------------------ packed channels
// A channel of N <= 4 states would fill only N lanes of its vector (the steps' work, not the states', sets the
// cost: N = 1 ran as slowly as N = 8). Instead G = 8 / w consecutive channels of one batch share each vector,
// w = N rounded up to a power of two: lane j holds channel j / w's state j % w. B and C rows hold a step's
// states tiled G times (Rows::width), so the channels still read them in place; the per-step scalars (Δ, Δ·u,
// u, dy) become (T, 8) lane rows, packed from the channels' step rows (pack_steps). Each channel's sums over its
// states (y, dΔ, du) are folded out of the lanes afterwards (fold_lanes), and its per-state results (h, dA) read
// from them.

// The pack's channels' rows of T steps as a (T, 8) array whose lane i at step t is channel i / w's value:
// out[8·t + i] = rows[i / w][t], eight steps at a time (building each step's vector from the rows with
// broadcasts and blends in the core instead: forward 10 % slower at w = 4).
struct PackStepsArgs {
  const float* const* rows;  // (G,)
  int T, w;
  float* out;
};

// Steps t .. t + 7: eight channels' rows through a transpose; two or four channels' by interleaving their
// 8-step vectors, then broadcasting within 128-bit halves (2 loads and 10 shuffles for w = 4, 4 and 16 for w = 2,
// against the transpose's 8 and 24).
template <int kW>
COMPRESSM_ALWAYS_INLINE void pack8(const float* const* rows, int t, float* out) {
  if constexpr (kW == 1) {
    v8f v[8];
    for (int i = 0; i < 8; ++i) v[i] = load8(rows[i] + t);
    transpose8(v);
    for (int j = 0; j < 8; ++j) store8(out + 8 * j, v[j]);
  } else if constexpr (kW == 2) {
    const v8f a = load8(rows[0] + t), b = load8(rows[1] + t), c = load8(rows[2] + t), d = load8(rows[3] + t);
    const v8f ac[2] = {COMPRESSM_SHUFFLE(a, c, 0, 1, 2, 3, 8, 9, 10, 11),    // a0-3 | c0-3
                       COMPRESSM_SHUFFLE(a, c, 4, 5, 6, 7, 12, 13, 14, 15)};  // a4-7 | c4-7
    const v8f bd[2] = {COMPRESSM_SHUFFLE(b, d, 0, 1, 2, 3, 8, 9, 10, 11),
                       COMPRESSM_SHUFFLE(b, d, 4, 5, 6, 7, 12, 13, 14, 15)};
    for (int h = 0; h < 2; ++h) {  // steps 4h .. 4h + 3
      const v8f lo = COMPRESSM_SHUFFLE(ac[h], bd[h], 0, 8, 1, 9, 4, 12, 5, 13);   // a b a b | c d c d: steps 0-1
      const v8f hi = COMPRESSM_SHUFFLE(ac[h], bd[h], 2, 10, 3, 11, 6, 14, 7, 15);  // steps 2-3
      float* o = out + 32 * h;
      store8(o, COMPRESSM_SHUFFLE(lo, lo, 0, 0, 1, 1, 4, 4, 5, 5));
      store8(o + 8, COMPRESSM_SHUFFLE(lo, lo, 2, 2, 3, 3, 6, 6, 7, 7));
      store8(o + 16, COMPRESSM_SHUFFLE(hi, hi, 0, 0, 1, 1, 4, 4, 5, 5));
      store8(o + 24, COMPRESSM_SHUFFLE(hi, hi, 2, 2, 3, 3, 6, 6, 7, 7));
    }
  } else {
    const v8f a = load8(rows[0] + t), b = load8(rows[1] + t);
    const v8f halves[2] = {COMPRESSM_SHUFFLE(a, b, 0, 1, 2, 3, 8, 9, 10, 11),    // a0-3 | b0-3
                           COMPRESSM_SHUFFLE(a, b, 4, 5, 6, 7, 12, 13, 14, 15)};  // a4-7 | b4-7
    for (int h = 0; h < 2; ++h) {
      const v8f x = halves[h];
      store8(out + 32 * h, COMPRESSM_SHUFFLE(x, x, 0, 0, 0, 0, 4, 4, 4, 4));
      store8(out + 32 * h + 8, COMPRESSM_SHUFFLE(x, x, 1, 1, 1, 1, 5, 5, 5, 5));
      store8(out + 32 * h + 16, COMPRESSM_SHUFFLE(x, x, 2, 2, 2, 2, 6, 6, 6, 6));
      store8(out + 32 * h + 24, COMPRESSM_SHUFFLE(x, x, 3, 3, 3, 3, 7, 7, 7, 7));
    }
  }
}

template <int kW>
COMPRESSM_ALWAYS_INLINE void pack_steps_w(const PackStepsArgs& a) {
  const int T8 = a.T & ~7;
  for (int t = 0; t < T8; t += 8) pack8<kW>(a.rows, t, a.out + 8 * t);
  for (int t = T8; t < a.T; ++t) {
    for (int i = 0; i < 8; ++i) a.out[8 * t + i] = a.rows[i / kW][t];
  }
}
COMPRESSM_ALWAYS_INLINE void pack_steps_impl(const PackStepsArgs& a) {
  switch (a.w) {
    case 1: pack_steps_w<1>(a); break;
    case 2: pack_steps_w<2>(a); break;
    default: pack_steps_w<4>(a);
  }
}
COMPRESSM_DISPATCH(pack_steps, PackStepsArgs)

// Eight steps of lanes summed per channel: out[c][j] = Σ_{k < w} v[j][c·w + k] for the 8 / w channels. One
// transpose for w = 1; for w = 2 and 4 the sums are folded into the interleaves (sum_rows8's scheme, stopped
// where a channel's lanes are summed): 20 vector operations instead of a transpose's 24 and the sums after it.
template <int kW>
COMPRESSM_ALWAYS_INLINE void fold8(v8f* v, v8f* out) {
  if constexpr (kW == 1) {
    transpose8(v);
    for (int c = 0; c < 8; ++c) out[c] = v[c];
  } else if constexpr (kW == 2) {
    v8f a[4], p[2], q[2];
    for (int i = 0; i < 4; ++i) {  // a[i] = [c0 c1 (step 2i), c0 c1 (2i+1), c2 c3 (2i), c2 c3 (2i+1)]
      const v8f x = v[2 * i], z = v[2 * i + 1];
      a[i] = COMPRESSM_SHUFFLE(x, z, 0, 2, 8, 10, 4, 6, 12, 14) + COMPRESSM_SHUFFLE(x, z, 1, 3, 9, 11, 5, 7, 13, 15);
    }
    for (int j = 0; j < 2; ++j) {  // p[j] = [c0, c2] and q[j] = [c1, c3] over steps 4j .. 4j+3
      p[j] = COMPRESSM_SHUFFLE(a[2 * j], a[2 * j + 1], 0, 2, 8, 10, 4, 6, 12, 14);
      q[j] = COMPRESSM_SHUFFLE(a[2 * j], a[2 * j + 1], 1, 3, 9, 11, 5, 7, 13, 15);
    }
    out[0] = COMPRESSM_SHUFFLE(p[0], p[1], 0, 1, 2, 3, 8, 9, 10, 11);
    out[1] = COMPRESSM_SHUFFLE(q[0], q[1], 0, 1, 2, 3, 8, 9, 10, 11);
    out[2] = COMPRESSM_SHUFFLE(p[0], p[1], 4, 5, 6, 7, 12, 13, 14, 15);
    out[3] = COMPRESSM_SHUFFLE(q[0], q[1], 4, 5, 6, 7, 12, 13, 14, 15);
  } else {
    v8f a[4], b[2];
    for (int i = 0; i < 4; ++i) {  // as sum_rows8
      const v8f x = v[2 * i], z = v[2 * i + 1];
      a[i] = COMPRESSM_SHUFFLE(x, z, 0, 8, 1, 9, 4, 12, 5, 13) + COMPRESSM_SHUFFLE(x, z, 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 2; ++i) {  // b[i] = [c0, c1] over steps 4i .. 4i+3
      const v8f x = a[2 * i], z = a[2 * i + 1];
      b[i] = COMPRESSM_SHUFFLE(x, z, 0, 1, 8, 9, 4, 5, 12, 13) + COMPRESSM_SHUFFLE(x, z, 2, 3, 10, 11, 6, 7, 14, 15);
    }
    out[0] = COMPRESSM_SHUFFLE(b[0], b[1], 0, 1, 2, 3, 8, 9, 10, 11);
    out[1] = COMPRESSM_SHUFFLE(b[0], b[1], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// T steps of lanes summed per channel into rows[c][t] (the G = 8 / w channels); lanes is zero-padded to a multiple
// of 8 steps first.
struct FoldLanesArgs {
  v8f* lanes;  // (T + 8,)
  int T, w;
  float* const* rows;  // (G,) rows of T steps
};

template <int kW>
COMPRESSM_ALWAYS_INLINE void fold_lanes_w(const FoldLanesArgs& a) {
  for (int t = a.T; t % 8 != 0; ++t) a.lanes[t] = v8f{};
  for (int t0 = 0; t0 < a.T; t0 += 8) {
    v8f sums[8 / kW];
    fold8<kW>(a.lanes + t0, sums);
    for (int c = 0; c < 8 / kW; ++c) {
      if (t0 + 8 <= a.T) {
        store8(a.rows[c] + t0, sums[c]);
      } else {
        for (int t = t0; t < a.T; ++t) a.rows[c][t] = sums[c][t - t0];
      }
    }
  }
}
COMPRESSM_ALWAYS_INLINE void fold_lanes_impl(const FoldLanesArgs& a) {
  switch (a.w) {
    case 1: fold_lanes_w<1>(a); break;
    case 2: fold_lanes_w<2>(a); break;
    default: fold_lanes_w<4>(a);
  }
}
COMPRESSM_DISPATCH(fold_lanes, FoldLanesArgs)

// forward_core over a pack: T steps of one vector. lanes[t] receives C_t·h_t per lane; hist and hist_decay (T, 8),
// when given, every h_t and ā_t.
struct PackedForwardArgs {
  int T;
  const float* A;  // (8,) lanes, A·kEighthsPerNat
  float* h;        // (8,) lanes, updated
  const float* delta;    // (T, 8) lane rows (pack_steps)
  const float* delta_u;
  const float* B;  // row t at B + t·ldb: (8,) lanes (ldb = 0: the pack's time-invariant lanes)
  int64_t ldb;
  const float* C;
  int64_t ldc;
  v8f* lanes;
  float* hist;
  float* hist_decay;
};

template <bool kHist>
COMPRESSM_ALWAYS_INLINE void packed_forward(const PackedForwardArgs& a) {
  const v8f A = load8(a.A);
  v8f h = load8(a.h);
  for (int t = 0; t < a.T; ++t) {
    const v8f a_t = decay_scaled(load8(a.delta + 8 * t), A);
    h = forward_step_decayed(h, a_t, load8(a.delta_u + 8 * t), load8(a.B + t * a.ldb));
    if constexpr (kHist) store8(a.hist + 8 * t, h), store8(a.hist_decay + 8 * t, a_t);
    a.lanes[t] = load8(a.C + t * a.ldc) * h;
  }
  store8(a.h, h);
}
COMPRESSM_ALWAYS_INLINE void packed_forward_core_impl(const PackedForwardArgs& a) { packed_forward<false>(a); }
COMPRESSM_ALWAYS_INLINE void packed_forward_core_hist_impl(const PackedForwardArgs& a) { packed_forward<true>(a); }
COMPRESSM_DISPATCH(packed_forward_core, PackedForwardArgs)
COMPRESSM_DISPATCH(packed_forward_core_hist, PackedForwardArgs)

// reverse_core over a pack (t = T-1 .. 0): carry and dA (8,) lanes updated, dB/dC rows (ld 0: accumulate over
// t) accumulated, lanes_ddelta / lanes_du [t] receive each lane's A·w and g·B (ReverseArgs' sums, per state).
struct PackedReverseArgs {
  int T;
  const float* A;
  float* carry;
  float* dA;
  const float* delta;  // (T, 8) lane rows
  const float* delta_u;
  const float* dy;
  const float* B;
  int64_t ldb;
  const float* C;
  int64_t ldc;
  const float* h_in;  // (8,) h before the chunk
  const float* hist;        // (T, 8) h_t
  const float* hist_decay;  // (T, 8) ā_t
  float* dB;
  int64_t lddb;
  float* dC;
  int64_t lddc;
  v8f* lanes_ddelta;
  v8f* lanes_du;
};

COMPRESSM_ALWAYS_INLINE void packed_reverse_core_impl(const PackedReverseArgs& a) {
  const v8f A = load8(a.A);
  v8f carry = load8(a.carry), dA = load8(a.dA);
  for (int t = a.T - 1; t >= 0; --t) {
    const float* hp = t > 0 ? a.hist + 8 * (t - 1) : a.h_in;
    const v8f dy = load8(a.dy + 8 * t);
    const v8f g = dy * load8(a.C + t * a.ldc) + carry;
    carry = load8(a.hist_decay + 8 * t) * g;
    const v8f w = carry * load8(hp);
    float* dBt = a.dB + t * a.lddb;
    float* dCt = a.dC + t * a.lddc;
    store8(dBt, load8(dBt) + g * load8(a.delta_u + 8 * t));
    store8(dCt, load8(dCt) + dy * load8(a.hist + 8 * t));
    dA += load8(a.delta + 8 * t) * w;
    a.lanes_ddelta[t] = A * w;
    a.lanes_du[t] = g * load8(a.B + t * a.ldb);
  }
  store8(a.carry, carry);
  store8(a.dA, dA);
}
COMPRESSM_DISPATCH(packed_reverse_core, PackedReverseArgs)

// States per channel in a packed vector (1, 2 or 4), or 0 where channels are not packed: with more than four
// states, a per-channel mask (channels would differ in rank), or B/C groups a pack could straddle.
int pack_width(const ScanParams& p) {
  if (p.kept != nullptr || p.dstate > 4) return 0;
  const int w = p.dstate == 1 ? 1 : p.dstate == 2 ? 2 : 4, G = 8 / w;
  const auto straddles = [&](bool variable, int groups) {
    return variable && groups > 1 && (p.dim / groups) % G != 0;
  };
  return straddles(p.b_variable, p.groups_b) || straddles(p.c_variable, p.groups_c) ? 0 : w;
}

// Per-thread memory of the packed path: each channel's Scratch (its step rows), and the pack's lane rows and
// states over a chunk.
struct PackScratch {
  std::vector<Scratch> channels;  // (G,)
  Floats delta, delta_u, dy, hist, hist_decay;  // (chunk, 8)
  Floats zeros, discard;  // (chunk,): rows of the channels past D

  PackScratch(int N, int chunk, int w, bool backward)
      : channels(8 / w, Scratch(N, chunk, backward, false)), delta(8 * chunk), delta_u(8 * chunk), dy(8 * chunk),
        hist(8 * chunk), hist_decay(8 * chunk), zeros(chunk), discard(chunk) {}
};

// The G channels of one batch from d0 (n of them within D): their Channels, and their parameters as lanes.
struct Pack {
  int w, G, n;
  Channel ch[8];
  alignas(32) float A[8] = {}, A_scaled[8] = {}, B_inv[8] = {}, C_inv[8] = {};

  Pack(const ScanParams& p, int b, int d0, int w_, PackScratch& ps) : w(w_), G(8 / w_), n(std::min(G, p.dim - d0)) {
    for (int c = 0; c < n; ++c) {
      Scratch& s = ps.channels[c];
      ch[c] = Channel(p, b, d0 + c, s);
      for (int k = 0; k < p.dstate; ++k) {
        A[c * w + k] = s.A[k], A_scaled[c * w + k] = s.A_scaled[k];
        B_inv[c * w + k] = s.B_inv[k], C_inv[c * w + k] = s.C_inv[k];
      }
    }
  }
};

// Δ and Δ·u (and dΔ/dδ) of the pack's channels for steps [t0, t0 + T) as lane rows; u_rows receives each
// channel's u.
void pack_load_steps(const ScanParams& p, const Pack& pk, int t0, int T, bool grad, PackScratch& ps,
                     const float** u_rows) {
  const float *delta[8], *delta_u[8];
  for (int c = 0; c < pk.G; ++c) {
    if (c < pk.n) {
      Scratch& s = ps.channels[c];
      u_rows[c] = load_steps(p, pk.ch[c], t0, T, grad, s);
      delta[c] = s.delta.data(), delta_u[c] = s.delta_u.data();
    } else {
      u_rows[c] = delta[c] = delta_u[c] = ps.zeros.data();
    }
  }
  pack_steps({delta, T, pk.w, ps.delta.data()});
  pack_steps({delta_u, T, pk.w, ps.delta_u.data()});
}

// Row t0 of the pack's variable B (or C) rows, ld NP; or its time-invariant lanes, ld 0.
ChannelRows pack_rows(const Rows& B, const Rows& C, const ScanParams& p, const Pack& pk, int b, int d0, int t0) {
  return {p.b_variable ? B.at(p, b, d0, t0, false) : pk.B_inv, p.b_variable ? 8 : 0,
          p.c_variable ? C.at(p, b, d0, t0, false) : pk.C_inv, p.c_variable ? 8 : 0};
}

void pack_forward(const ScanParams& p, const Rows& B, const Rows& C, int b, int d0, int w, PackScratch& ps) {
  const Pack pk(p, b, d0, w, ps);
  const int N = p.dstate, n_chunks = p.n_chunks();
  alignas(32) float h[8] = {};
  v8f lanes[kMaxChunk + 8];
  for (int c = 0; c < n_chunks; ++c) {
    const int t0 = c * p.chunk, T = std::min(p.chunk, p.seqlen - t0);
    const float* u[8];
    pack_load_steps(p, pk, t0, T, false, ps, u);
    const ChannelRows rows = pack_rows(B, C, p, pk, b, d0, t0);
    packed_forward_core({T, pk.A_scaled, h, ps.delta.data(), ps.delta_u.data(), rows.B, rows.ldb, rows.C, rows.ldc,
                         lanes, nullptr});
    float* y[8];
    for (int i = 0; i < pk.G; ++i) {
      y[i] = i < pk.n ? steps_out(p.out, p.u.dtype, pk.ch[i].dense + t0, ps.channels[i].y) : ps.discard.data();
    }
    fold_lanes({lanes, T, w, y});

    for (int i = 0; i < pk.n; ++i) {
      const Channel& ch = pk.ch[i];
      float* carry = p.carries + ((static_cast<int64_t>(b) * p.dim + ch.d) * n_chunks + c) * N;
      std::copy_n(h + i * w, N, carry);
      gate_forward(p, ch, t0, T, u[i], y[i], ps.channels[i]);
    }
  }
}

// channel_backward for a pack: dB/dC of variable B/C go to the thread's partial rows (packed lanes).
void pack_backward(const ScanParams& p, const Rows& B, const Rows& C, int b, int d0, int w, PackScratch& ps,
                   Partial dB_part, Partial dC_part) {
  const Pack pk(p, b, d0, w, ps);
  const int N = p.dstate, n_chunks = p.n_chunks();
  alignas(32) float carry[8] = {}, dA[8] = {}, dB_inv[8] = {}, dC_inv[8] = {}, h_in[8], h[8];
  float dD[8] = {}, ddelta_bias[8] = {};
  v8f lanes[kMaxChunk + 8], lanes_du[kMaxChunk + 8];
  for (int i = 0; i < pk.n; ++i) {
    const int64_t bd = static_cast<int64_t>(b) * p.dim + pk.ch[i].d;
    for (int k = 0; k < N; ++k) carry[i * w + k] = p.dlast ? p.dlast[bd * N + k] : 0.0f;
  }
  for (int c = n_chunks - 1; c >= 0; --c) {
    const int t0 = c * p.chunk, T = std::min(p.chunk, p.seqlen - t0);
    const float* u[8];
    pack_load_steps(p, pk, t0, T, true, ps, u);
    const ChannelRows rows = pack_rows(B, C, p, pk, b, d0, t0);

    // Recompute the chunk's states from the carries saved by the forward.
    std::fill_n(h_in, 8, 0.0f);
    for (int i = 0; c > 0 && i < pk.n; ++i) {
      const float* saved = p.carries + ((static_cast<int64_t>(b) * p.dim + pk.ch[i].d) * n_chunks + c - 1) * N;
      std::copy_n(saved, N, h_in + i * w);
    }
    std::copy_n(h_in, 8, h);
    packed_forward_core_hist({T, pk.A_scaled, h, ps.delta.data(), ps.delta_u.data(), rows.B, rows.ldb, rows.C, rows.ldc,
                              lanes, ps.hist.data(), ps.hist_decay.data()});
    float* y[8];
    for (int i = 0; i < pk.G; ++i) y[i] = i < pk.n ? ps.channels[i].y.data() : ps.discard.data();
    fold_lanes({lanes, T, w, y});

    const float* dy[8];
    for (int i = 0; i < pk.G; ++i) {
      dy[i] = i < pk.n ? gate_backward(p, pk.ch[i], t0, T, u[i], y[i], ps.channels[i], &dD[i]) : ps.zeros.data();
    }

    // The pack's group rows of the thread's partial dB/dC from step t0, or its invariant lanes.
    auto part_rows = [&](const Partial& part, const Rows& rows) {
      return part.steps + (static_cast<int64_t>(d0 / (p.dim / rows.groups)) * p.seqlen + t0) * 8;
    };
    float* dBp = p.b_variable ? part_rows(dB_part, B) : dB_inv;
    float* dCp = p.c_variable ? part_rows(dC_part, C) : dC_inv;
    pack_steps({dy, T, w, ps.dy.data()});
    packed_reverse_core({T, pk.A, carry, dA, ps.delta.data(), ps.delta_u.data(), ps.dy.data(), rows.B, rows.ldb,
                         rows.C, rows.ldc, h_in, ps.hist.data(), ps.hist_decay.data(), dBp, p.b_variable ? 8 : 0, dCp,
                         p.c_variable ? 8 : 0, lanes, lanes_du});
    float *ddelta[8], *du[8];
    for (int i = 0; i < pk.G; ++i) {
      ddelta[i] = i < pk.n ? steps_out(p.ddelta, p.delta.dtype, pk.ch[i].dense + t0, ps.channels[i].ddelta)
                           : ps.discard.data();
      du[i] = i < pk.n ? steps_out(p.du, p.u.dtype, pk.ch[i].dense + t0, ps.channels[i].du) : ps.discard.data();
    }
    fold_lanes({lanes, T, w, ddelta});
    fold_lanes({lanes_du, T, w, du});
    for (int i = 0; i < pk.n; ++i) {
      const Channel& ch = pk.ch[i];
      const Scratch& s = ps.channels[i];
      finish_steps({T, ch.D, s.delta.data(), u[i], nullptr, 0.0f, s.delta_grad.data(), dy[i], ddelta[i], du[i],
                    &ddelta_bias[i]});
      steps_out_done(p.ddelta, p.delta.dtype, ch.dense + t0, T, ddelta[i]);
      steps_out_done(p.du, p.u.dtype, ch.dense + t0, T, du[i]);
    }
  }

  for (int i = 0; i < pk.n; ++i) {
    const int d = pk.ch[i].d;
    for (int k = 0; k < N; ++k) {
      const int64_t dn = static_cast<int64_t>(d) * N + k;
      p.dA[dn] += dA[i * w + k];
      if (!p.b_variable) static_cast<float*>(p.dB)[dn] += dB_inv[i * w + k];
      if (!p.c_variable) static_cast<float*>(p.dC)[dn] += dC_inv[i * w + k];
    }
    if (p.dD) p.dD[d] += dD[i];
    if (p.ddelta_bias) p.ddelta_bias[d] += ddelta_bias[i];
  }
}

// Every thread's partial rows of one operand (Partial): steps_size and states_size floats per thread.
struct Partials {
  int64_t steps_size = 0, states_size = 0;
  Floats steps, states;

  Partials(const Rows& rows, bool variable, Layouts layouts, const ScanParams& p) {
    if (!variable) return;
    const int64_t per_step = static_cast<int64_t>(rows.groups) * p.seqlen;
    steps_size = layouts.steps ? per_step * round8(p.dstate) : 0;
    states_size = layouts.states ? per_step * p.dstate : 0;
    steps.resize(steps_size * p.num_threads);
    states.resize(states_size * p.num_threads);
  }
  Partial of(int th) {
    return {steps_size ? steps.data() + th * steps_size : nullptr,
            states_size ? states.data() + th * states_size : nullptr};
  }
  void zero(int th) {
    std::fill_n(steps.begin() + th * steps_size, steps_size, 0.0f);
    std::fill_n(states.begin() + th * states_size, states_size, 0.0f);
  }
};

// dB[b] (G, N, L) = Σ over threads of their partial rows, in the output's dtype.
void reduce_partials(const Partials& parts, int threads, const Rows& rows, int N, int L, void* out, DType dtype, int b,
                     Floats& tile) {
  const int groups = rows.groups, np = round8(N);
  const int64_t dst0 = static_cast<int64_t>(b) * groups * N * L;
  if (parts.states_size) {  // sum state rows, and the step-major partials' column of that state (no packing here)
#pragma omp for schedule(static)
    for (int64_t row = 0; row < static_cast<int64_t>(groups) * N; ++row) {
      std::fill_n(tile.begin(), L, 0.0f);
      for (int th = 0; th < threads; ++th) {
        const float* src = parts.states.data() + th * parts.states_size + row * L;
        for (int t = 0; t < L; ++t) tile[t] += src[t];
      }
      const int64_t g = row / N, n = row % N;
      for (int th = 0; th < threads && parts.steps_size; ++th) {
        const float* src = parts.steps.data() + th * parts.steps_size + g * L * np + n;
        for (int t = 0; t < L; ++t) tile[t] += src[static_cast<int64_t>(t) * np];
      }
      store_row(out, dst0 + row * L, dtype, L, tile.data());
    }
    return;
  }
  constexpr int kBlock = 32;
  const int blocks = (L + kBlock - 1) / kBlock;
#pragma omp for schedule(static)
  for (int64_t task = 0; task < static_cast<int64_t>(groups) * blocks; ++task) {
    const int g = static_cast<int>(task / blocks), t0 = static_cast<int>(task % blocks) * kBlock;
    const int T = std::min(kBlock, L - t0);
    const int64_t off = (static_cast<int64_t>(g) * L + t0) * np;
    std::fill_n(tile.begin(), static_cast<size_t>(T) * np, 0.0f);
    for (int th = 0; th < threads; ++th) {
      const float* src = parts.steps.data() + th * parts.steps_size + off;
      for (int i = 0; i < T * np; ++i) tile[i] += src[i];
    }
    const int64_t dst = dst0 + static_cast<int64_t>(g) * N * L + t0;
    for (int n = 0; n < N; ++n) {
      for (int t = 0; t < T; ++t) {
        float sum = tile[t * np + n];  // packed rows: the channels' lanes of state n summed
        for (int lane = n + rows.width; lane < np; lane += rows.width) sum += tile[t * np + lane];
        store(out, dst + static_cast<int64_t>(n) * L + t, dtype, sum);
      }
    }
  }
}

}  // namespace

void scan_fwd(const ScanParams& p) {
  const int w = pack_width(p), width = w ? w : round8(p.dstate);  // a channel's lanes in the B/C rows
  const Layouts l = layouts(p);
  const Rows B = variable_rows(p.B, p.b_variable, p.groups_b, width, p, l);
  const Rows C = variable_rows(p.C, p.c_variable, p.groups_c, width, p, l);
  // Tasks: (batch, channel) pairs, or (batch, pack of 8 / w channels) with packing.
  const int per_task = w ? 8 / w : 1, tasks_per_batch = (p.dim + per_task - 1) / per_task;
  const int64_t tasks = static_cast<int64_t>(p.batch) * tasks_per_batch;
#pragma omp parallel num_threads(p.num_threads)
  {
    if (w) {
      PackScratch ps(p.dstate, p.chunk_steps(), w, false);
#pragma omp for schedule(static)
      for (int64_t task = 0; task < tasks; ++task) {
        const int b = static_cast<int>(task / tasks_per_batch);
        pack_forward(p, B, C, b, static_cast<int>(task % tasks_per_batch) * per_task, w, ps);
      }
    } else {
      Scratch s(p.dstate, p.chunk_steps(), false, p.kept != nullptr);
#pragma omp for schedule(static)
      for (int64_t bd = 0; bd < tasks; ++bd) {
        channel_forward(p, B, C, static_cast<int>(bd / p.dim), static_cast<int>(bd % p.dim), s);
      }
    }
  }
}

void scan_bwd(const ScanParams& p) {
  const int N = p.dstate, L = p.seqlen, w = pack_width(p), width = w ? w : round8(N);
  const Layouts l = layouts(p);
  const Rows B = variable_rows(p.B, p.b_variable, p.groups_b, width, p, l);
  const Rows C = variable_rows(p.C, p.c_variable, p.groups_c, width, p, l);
  std::fill_n(p.dA, static_cast<int64_t>(p.dim) * N, 0.0f);
  if (!p.b_variable) std::fill_n(static_cast<float*>(p.dB), static_cast<int64_t>(p.dim) * N, 0.0f);
  if (!p.c_variable) std::fill_n(static_cast<float*>(p.dC), static_cast<int64_t>(p.dim) * N, 0.0f);
  if (p.dD) std::fill_n(p.dD, p.dim, 0.0f);
  if (p.ddelta_bias) std::fill_n(p.ddelta_bias, p.dim, 0.0f);

  Partials parts_b(B, p.b_variable, l, p), parts_c(C, p.c_variable, l, p);
#pragma omp parallel num_threads(p.num_threads)
  {
    std::optional<Scratch> s;  // one of the two
    std::optional<PackScratch> ps;
    if (w) {
      ps.emplace(N, p.chunk_steps(), w, true);
    } else {
      s.emplace(N, p.chunk_steps(), true, p.kept != nullptr);
    }
    const int per_task = w ? 8 / w : 1, tasks = (p.dim + per_task - 1) / per_task;
    Floats tile(std::max(static_cast<size_t>(32) * round8(N), static_cast<size_t>(L)));
#if defined(_OPENMP)
    const int th = omp_get_thread_num(), threads = omp_get_num_threads();
#else  // built without OpenMP (setup.py): one thread, the pragmas ignored
    const int th = 0, threads = 1;
#endif
    const int run = w ? std::max(1, (tasks + threads - 1) / threads) : 16;
    const Partial my_b = parts_b.of(th), my_c = parts_c.of(th);
    for (int b = 0; b < p.batch; ++b) {
      parts_b.zero(th);
      parts_c.zero(th);
      // A fixed assignment keeps the sums (and results) reproducible. Channels go in runs of 16 dealt round-robin:
      // dealing balances per-channel ranks, and a run's rows of dA, dD and ddelta_bias fill whole cache lines, so
      // two threads never write one (dealt one channel at a time, they did: the backward 4-5 % slower at N = 8 and
      // 16). Packs (no ranks) go in one block per thread: runs of 16 packs left a D = 128, N = 1 batch row (16
      // packs) to one thread, and runs of 16 channels were 2-4 % slower than blocks at N = 2.
#pragma omp for schedule(static, run)
      for (int task = 0; task < tasks; ++task) {
        if (w) {
          pack_backward(p, B, C, b, task * per_task, w, *ps, my_b, my_c);
        } else {
          channel_backward(p, B, C, b, task, *s, my_b, my_c);
        }
      }
      if (p.b_variable) reduce_partials(parts_b, threads, B, N, L, p.dB, p.B.dtype, b, tile);
      if (p.c_variable) reduce_partials(parts_c, threads, C, N, L, p.dC, p.C.dtype, b, tile);
    }
  }
}

const char* isa() {
#if defined(COMPRESSM_TARGET_AVX2)
  return cpu_has_avx2_fma() ? "avx2+fma" : "baseline";
#else
  return "baseline";
#endif
}

}  // namespace compressm::cpu
