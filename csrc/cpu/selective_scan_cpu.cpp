// Selective scan forward and backward on the CPU (MATH.md §1): OpenMP over batch × channel, the state
// loop innermost and vectorised across a channel's kept states, fp32 accumulation.
//
// Layout: variable B/C are first transposed once to fp32 (Bt, G, L, N) so that each step's states are
// contiguous (and shared by every channel of the group). A channel runs its steps chunk by chunk; the
// forward saves the state at each chunk end ("carries", (Bt, D, n_chunks, N)), the backward recomputes
// a chunk's states from the previous carry, then runs the reverse recurrence over it.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_common.h"  // includes compressm/scan_recurrence.h after its diagnostic pragma
#include "scan_cpu.h"

namespace compressm::cpu {
namespace {

// ------------------------------------------------------------------------------------ vectorised cores

// T steps of r states. Row t of B/C is at B + t·ldb (ldb = 0: time-invariant); h (r,) is updated in place;
// y[t] = Σ_k C_t[k] h_t[k]; hist (T, r), when given, receives every h_t.
struct ForwardArgs {
  int r, T;
  const float* A;
  float* h;
  const float* delta;    // (T,) Δ_t
  const float* delta_u;  // (T,) Δ_t u_t
  const float* B;
  int64_t ldb;
  const float* C;
  int64_t ldc;
  float* y;
  float* hist;
};

constexpr int kMaxState = 256;  // the package's MAX_DSTATE; bindings.cpp checks it
constexpr int kMaxChunk = 256;  // steps per chunk: chunk_size(N) = max(64, N); bindings.cpp checks it

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

// The kR states at p as one 8-lane vector (per 8 of them): kR < 8 fills the first kR lanes and zeroes the rest,
// which carry A = h = B = C = 0 through every step and add nothing; otherwise kR is a multiple of 8.
template <int kR>
COMPRESSM_ALWAYS_INLINE v8f load_states(const float* p) {
  static_assert(kR < 8 || kR % 8 == 0);
  if constexpr (kR >= 8) {
    return load8(p);
  } else {  // lane by lane: a partial memcpy into a vector goes through the stack
    v8f v{};
    for (int k = 0; k < kR; ++k) v[k] = p[k];
    return v;
  }
}

template <int kR>
COMPRESSM_ALWAYS_INLINE void store_states(float* p, v8f v) {
  if constexpr (kR >= 8) {
    store8(p, v);
  } else {
    for (int k = 0; k < kR; ++k) p[k] = v[k];
  }
}

// kR > 0: a state count known at compile time: the chunk runs with the state in registers (through memory,
// each step's update would wait for the previous step's store to be forwarded, which at small N is the
// critical path), as 8-lane vectors (load_states). kR = 0: any r, one advance_states per step.
template <bool kHist, int kR>
COMPRESSM_ALWAYS_INLINE void forward_core(const ForwardArgs& a) {
  v8f lanes[kMaxChunk + 8];  // per step, C_t·h_t folded to eight lanes
  if constexpr (kR > 0) {
    constexpr int kV = (kR + 7) / 8;
    v8f h[kV], A[kV];
    for (int j = 0; j < kV; ++j) h[j] = load_states<kR>(a.h + 8 * j), A[j] = load_states<kR>(a.A + 8 * j);
    for (int t = 0; t < a.T; ++t) {
      const v8f delta = broadcast8(a.delta[t]), delta_u = broadcast8(a.delta_u[t]);
      const float* B = a.B + t * a.ldb;
      const float* C = a.C + t * a.ldc;
      v8f acc{};
      for (int j = 0; j < kV; ++j) {
        h[j] = forward_step(h[j], delta, A[j], delta_u, load_states<kR>(B + 8 * j));
        if (kHist) store_states<kR>(a.hist + static_cast<int64_t>(t) * kR + 8 * j, h[j]);
        acc += load_states<kR>(C + 8 * j) * h[j];
      }
      lanes[t] = acc;
    }
    for (int j = 0; j < kV; ++j) store_states<kR>(a.h + 8 * j, h[j]);
  } else {
    for (int t = 0; t < a.T; ++t) {
      float* hist = kHist ? a.hist + static_cast<int64_t>(t) * a.r : nullptr;
      lanes[t] = advance_states<0, kHist>(a.r, a.delta[t], a.delta_u[t], a.A, a.B + t * a.ldb, a.C + t * a.ldc,
                                          a.h, hist);
    }
  }
  sum_steps(lanes, a.T, a.y);
}

// Every rank below 8 (what a deep cut leaves), 8 and 16 get their own unrolled, register-resident loops;
// other ranks take the general loop.
template <bool kHist>
COMPRESSM_ALWAYS_INLINE void forward_core_sized(const ForwardArgs& a) {
  switch (a.r) {
    case 1: forward_core<kHist, 1>(a); break;
    case 2: forward_core<kHist, 2>(a); break;
    case 3: forward_core<kHist, 3>(a); break;
    case 4: forward_core<kHist, 4>(a); break;
    case 5: forward_core<kHist, 5>(a); break;
    case 6: forward_core<kHist, 6>(a); break;
    case 7: forward_core<kHist, 7>(a); break;
    case 8: forward_core<kHist, 8>(a); break;
    case 16: forward_core<kHist, 16>(a); break;
    default: forward_core<kHist, 0>(a);
  }
}
COMPRESSM_ALWAYS_INLINE void forward_core_impl(const ForwardArgs& a) { forward_core_sized<false>(a); }
COMPRESSM_ALWAYS_INLINE void forward_core_hist_impl(const ForwardArgs& a) { forward_core_sized<true>(a); }
COMPRESSM_DISPATCH(forward_core, ForwardArgs)
COMPRESSM_DISPATCH(forward_core_hist, ForwardArgs)

// The reverse recurrence over T steps of r states (t = T-1 .. 0). carry (r,) is ā_{t+1} g_{t+1} on
// entry (from the next chunk) and on exit; dB/dC rows (ld 0: accumulate over t) and dA (r,) are
// accumulated; ddelta/du (T,) receive Σ over states of dΔ_t and du_t.
struct ReverseArgs {
  int r, T;
  const float* A;
  float* carry;
  const float* delta;
  const float* u;
  const float* dy;
  const float* B;
  int64_t ldb;
  const float* C;
  int64_t ldc;
  const float* h_in;  // (r,) h before the chunk
  const float* hist;  // (T, r) h_t
  float* dB;
  int64_t lddb;
  float* dC;
  int64_t lddc;
  float* dA;
  float* ddelta;
  float* du;
};

// One reverse step of r states: dB/dC/dA rows accumulated, carry updated in place; returns dΔ_t and du_t
// folded to eight lanes. Explicit 8-lane code as advance_states, with its overlapping tail vector: computed
// from the old carry first, stored last, and only its new lanes added to the accumulators.
COMPRESSM_ALWAYS_INLINE void reverse_states(const ReverseArgs& a, int t, v8f& ddelta, v8f& du) {
  const int r = a.r;
  const float* __restrict A = a.A;
  float* __restrict carry = a.carry;
  float* __restrict dA = a.dA;
  const float* __restrict hp = t > 0 ? a.hist + static_cast<int64_t>(t - 1) * r : a.h_in;
  const float* __restrict ht = a.hist + static_cast<int64_t>(t) * r;
  const float* __restrict Bt = a.B + t * a.ldb;
  const float* __restrict Ct = a.C + t * a.ldc;
  float* __restrict dBt = a.dB + t * a.lddb;
  float* __restrict dCt = a.dC + t * a.lddc;
  if (r < 8) {  // fewer states than lanes: a scalar loop (a vector loop would be all epilogue), sums in lane 0
    float sum_ddelta = 0.0f, sum_du = 0.0f;
    const float dy = a.dy[t], d = a.delta[t], u = a.u[t];
    for (int k = 0; k < r; ++k) {
      const StepGrads g = reverse_step(carry[k], dy, d, A[k], u, Bt[k], Ct[k], hp[k], ht[k]);
      dBt[k] += g.dB;
      dCt[k] += g.dC;
      dA[k] += g.dA;
      carry[k] = g.carry;
      sum_ddelta += g.ddelta;
      sum_du += g.du;
    }
    ddelta = v8f{sum_ddelta};
    du = v8f{sum_du};
    return;
  }
  const v8f dy = broadcast8(a.dy[t]), d = broadcast8(a.delta[t]), u = broadcast8(a.u[t]);
  const auto at = [&](int k) {
    return reverse_step(load8(carry + k), dy, d, load8(A + k), u, load8(Bt + k), load8(Ct + k), load8(hp + k),
                        load8(ht + k));
  };
  const int tail = r % 8, full = r - tail, k_tail = r - 8;
  ddelta = du = v8f{};
  StepGradsOf<v8f> g_tail{};
  const v8i new_lanes = tail_lanes(tail);
  if (tail) {
    g_tail = at(k_tail);
    ddelta = new_lanes ? g_tail.ddelta : v8f{};
    du = new_lanes ? g_tail.du : v8f{};
  }
  for (int k = 0; k < full; k += 8) {
    const StepGradsOf<v8f> g = at(k);
    store8(dBt + k, load8(dBt + k) + g.dB);
    store8(dCt + k, load8(dCt + k) + g.dC);
    store8(dA + k, load8(dA + k) + g.dA);
    store8(carry + k, g.carry);
    ddelta += g.ddelta;
    du += g.du;
  }
  if (tail) {
    store8(dBt + k_tail, load8(dBt + k_tail) + (new_lanes ? g_tail.dB : v8f{}));
    store8(dCt + k_tail, load8(dCt + k_tail) + (new_lanes ? g_tail.dC : v8f{}));
    store8(dA + k_tail, load8(dA + k_tail) + (new_lanes ? g_tail.dA : v8f{}));
    store8(carry + k_tail, g_tail.carry);  // its old lanes equal what the loop stored
  }
}

// As forward_core: kR > 0 keeps the carry and dA in registers across the chunk's steps.
template <int kR>
COMPRESSM_ALWAYS_INLINE void reverse_core(const ReverseArgs& a) {
  v8f lanes_ddelta[kMaxChunk + 8], lanes_du[kMaxChunk + 8];  // per step, folded to eight lanes
  if constexpr (kR > 0) {
    constexpr int kV = (kR + 7) / 8;
    v8f carry[kV], A[kV], dA[kV];
    for (int j = 0; j < kV; ++j) {
      const int k = 8 * j;
      carry[j] = load_states<kR>(a.carry + k), A[j] = load_states<kR>(a.A + k), dA[j] = load_states<kR>(a.dA + k);
    }
    for (int t = a.T - 1; t >= 0; --t) {
      const float* hp = t > 0 ? a.hist + static_cast<int64_t>(t - 1) * kR : a.h_in;
      const float* ht = a.hist + static_cast<int64_t>(t) * kR;
      const float* Bt = a.B + t * a.ldb;
      const float* Ct = a.C + t * a.ldc;
      float* dBt = a.dB + t * a.lddb;
      float* dCt = a.dC + t * a.lddc;
      const v8f dy = broadcast8(a.dy[t]), d = broadcast8(a.delta[t]), u = broadcast8(a.u[t]);
      v8f ddelta{}, du{};
      for (int j = 0; j < kV; ++j) {
        const int k = 8 * j;
        const StepGradsOf<v8f> g = reverse_step(carry[j], dy, d, A[j], u, load_states<kR>(Bt + k),
                                                load_states<kR>(Ct + k), load_states<kR>(hp + k),
                                                load_states<kR>(ht + k));
        store_states<kR>(dBt + k, load_states<kR>(dBt + k) + g.dB);
        store_states<kR>(dCt + k, load_states<kR>(dCt + k) + g.dC);
        dA[j] += g.dA;
        carry[j] = g.carry;
        ddelta += g.ddelta;
        du += g.du;
      }
      lanes_ddelta[t] = ddelta;
      lanes_du[t] = du;
    }
    for (int j = 0; j < kV; ++j) store_states<kR>(a.carry + 8 * j, carry[j]), store_states<kR>(a.dA + 8 * j, dA[j]);
  } else {
    for (int t = a.T - 1; t >= 0; --t) reverse_states(a, t, lanes_ddelta[t], lanes_du[t]);
  }
  sum_steps(lanes_ddelta, a.T, a.ddelta);
  sum_steps(lanes_du, a.T, a.du);
}

COMPRESSM_ALWAYS_INLINE void reverse_core_impl(const ReverseArgs& a) {
  switch (a.r) {
    case 1: reverse_core<1>(a); break;
    case 2: reverse_core<2>(a); break;
    case 3: reverse_core<3>(a); break;
    case 4: reverse_core<4>(a); break;
    case 5: reverse_core<5>(a); break;
    case 6: reverse_core<6>(a); break;
    case 7: reverse_core<7>(a); break;
    case 8: reverse_core<8>(a); break;
    case 16: reverse_core<16>(a); break;
    default: reverse_core<0>(a);
  }
}
COMPRESSM_DISPATCH(reverse_core, ReverseArgs)

// Per-step math of one channel over T steps (vectorised across steps): delta holds the raw δ on entry and
// Δ on exit; grad (nullptr in the forward, which has no use for it) receives dΔ/dδ and delta_u Δ·u.
struct DiscretizeArgs {
  int T;
  float bias;
  bool softplus;
  float* delta;
  float* grad;
  float* delta_u;
  const float* u;
};

COMPRESSM_ALWAYS_INLINE void discretize_steps_impl(const DiscretizeArgs& a) {
  float* __restrict delta = a.delta;
  float* __restrict grad = a.grad;
  float* __restrict delta_u = a.delta_u;
  const float* __restrict u = a.u;
  if (grad) {
    for (int t = 0; t < a.T; ++t) grad[t] = discretize_grad(delta[t], a.bias, a.softplus);
  }
  if (a.softplus) {
    for (int t = 0; t < a.T; ++t) delta[t] = discretize(delta[t], a.bias, true);
  } else {
    for (int t = 0; t < a.T; ++t) delta[t] = discretize(delta[t], a.bias, false);
  }
  for (int t = 0; t < a.T; ++t) delta_u[t] = delta[t] * u[t];
}
COMPRESSM_DISPATCH(discretize_steps, DiscretizeArgs)

// The D skip and the z gate. Forward (dout == nullptr): y <- (y + D·u)·silu(z). Backward: y is Σ C h,
// dout <- dy = dout·silu(z) (the gradient reaching Σ C h), dz = dout·(y + D·u)·silu'(z), *dD += Σ dy·u.
struct GateArgs {
  int T;
  float D;
  const float* u;
  const float* z;  // nullptr: no gate
  float* y;
  float* dout;
  float* dz;
  float* dD;
};

COMPRESSM_ALWAYS_INLINE void gate_steps_impl(const GateArgs& a) {
  const float* __restrict u = a.u;
  const float* __restrict z = a.z;
  float* __restrict y = a.y;
  float* __restrict dout = a.dout;
  float* __restrict dz = a.dz;
  if (dout == nullptr) {
    for (int t = 0; t < a.T; ++t) y[t] += a.D * u[t];
    if (z) {
      for (int t = 0; t < a.T; ++t) y[t] *= silu_f32(z[t]);
    }
    return;
  }
  if (z) {
    for (int t = 0; t < a.T; ++t) {
      dz[t] = dout[t] * (y[t] + a.D * u[t]) * silu_grad_f32(z[t]);
      dout[t] *= silu_f32(z[t]);
    }
  }
  float dD = 0.0f;
#pragma omp simd reduction(+ : dD)
  for (int t = 0; t < a.T; ++t) dD += dout[t] * u[t];
  *a.dD += dD;
}
COMPRESSM_DISPATCH(gate_steps, GateArgs)

// ------------------------------------------------------------------------------------------ B and C

// Variable B or C as fp32 (Bt, G, L, N): row (b, g, t) holds the N states of step t contiguously.
struct Rows {
  std::vector<float> data;
  int groups = 1;
};

Rows transpose_rows(const Operand& x, int batch, int groups, int dstate, int seqlen, int num_threads) {
  constexpr int kBlock = 64;  // steps per task: a (64, N) tile stays in cache while it is transposed
  Rows rows;
  rows.groups = groups;
  rows.data.resize(static_cast<size_t>(batch) * groups * seqlen * dstate);
  const int blocks = (seqlen + kBlock - 1) / kBlock;
  const int64_t tasks = static_cast<int64_t>(batch) * groups * blocks;
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t task = 0; task < tasks; ++task) {
    const int blk = static_cast<int>(task % blocks);
    const int64_t bg = task / blocks;
    const int64_t b = bg / groups, g = bg % groups;
    const int t0 = blk * kBlock, t1 = std::min(seqlen, t0 + kBlock);
    float* dst = rows.data.data() + (bg * seqlen) * dstate;
    const int64_t src = b * x.stride0 + g * x.stride1;
    for (int n = 0; n < dstate; ++n) {
      const int64_t row = src + n * x.stride2;
      for (int t = t0; t < t1; ++t) dst[static_cast<int64_t>(t) * dstate + n] = load(x.data, row + t, x.dtype);
    }
  }
  return rows;
}

// Where a channel's rows of B or C for steps [t0, t0 + T) live: row t at ptr + t·ld, entry k = its k-th
// kept state. Variable without per-channel mask: the transposed rows themselves (ld = N); with one:
// gathered into `gather` (ld = r); time-invariant: the channel's vector `invariant` (ld = 0).
const float* channel_rows(const Rows& rows, bool variable, const ScanParams& p, int b, int d, int t0, int T,
                          int r, const int32_t* kept, float* gather, const float* invariant, int64_t& ld) {
  if (!variable) {
    ld = 0;
    return invariant;
  }
  const int N = p.dstate;
  const int g = d / (p.dim / rows.groups);
  const float* base = rows.data.data() + ((static_cast<int64_t>(b) * rows.groups + g) * p.seqlen + t0) * N;
  if (kept == nullptr) {
    ld = N;
    return base;
  }
  for (int t = 0; t < T; ++t) {
    for (int k = 0; k < r; ++k) gather[t * r + k] = base[static_cast<int64_t>(t) * N + kept[k]];
  }
  ld = r;
  return gather;
}

// --------------------------------------------------------------------------------------- per channel

// Per-thread working memory, sized once per thread.
struct Scratch {
  std::vector<float> A, h, h_in, carry, dA, B_inv, C_inv, dB_inv, dC_inv;  // (N,)
  std::vector<float> delta, delta_grad, delta_u, u, y, dy, ddelta, du, z, dz;  // (chunk,)
  std::vector<float> hist, B_gather, C_gather, dB_gather, dC_gather;        // (chunk, N)

  Scratch(int N, int chunk, bool backward)
      : A(N), h(N), h_in(N), carry(N), dA(N), B_inv(N), C_inv(N), dB_inv(N), dC_inv(N), delta(chunk),
        delta_grad(chunk), delta_u(chunk), u(chunk), y(chunk), dy(chunk), ddelta(chunk), du(chunk), z(chunk), dz(chunk),
        B_gather(static_cast<size_t>(chunk) * N), C_gather(static_cast<size_t>(chunk) * N) {
    if (backward) {
      hist.resize(static_cast<size_t>(chunk) * N);
      dB_gather.resize(static_cast<size_t>(chunk) * N);
      dC_gather.resize(static_cast<size_t>(chunk) * N);
    }
  }
};

// What one (batch, channel) pair reads: its rank, kept states, and parameters gathered to kept order.
struct Channel {
  int b, d, r;
  const int32_t* kept;  // nullptr: all N states in order
  int64_t act;          // offset of (b, d, 0) in u / delta / z / dout
  int64_t dense;        // offset of (b, d, 0) in the contiguous (Bt, D, L) outputs
  float D, bias;

  Channel(const ScanParams& p, int b_, int d_, Scratch& s) : b(b_), d(d_) {
    const int N = p.dstate;
    r = p.ranks ? p.ranks[d] : N;
    kept = p.kept ? p.kept + static_cast<int64_t>(d) * N : nullptr;
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
  }
  int state(int k) const { return kept ? kept[k] : k; }
};

// Δ_t, Δ_t u_t, u_t (and dΔ/dδ) for steps [t0, t0 + T) of a channel.
void load_steps(const ScanParams& p, const Channel& ch, int t0, int T, bool grad, Scratch& s) {
  load_row(p.delta.data, ch.b * p.delta.stride0 + ch.d * p.delta.stride1 + t0, p.delta.dtype, T, s.delta.data());
  load_row(p.u.data, ch.act + t0, p.u.dtype, T, s.u.data());
  float* delta_grad = grad ? s.delta_grad.data() : nullptr;
  discretize_steps({T, ch.bias, p.delta_softplus, s.delta.data(), delta_grad, s.delta_u.data(), s.u.data()});
}

void channel_forward(const ScanParams& p, const Rows& B, const Rows& C, int b, int d, Scratch& s) {
  const Channel ch(p, b, d, s);
  const int N = p.dstate, n_chunks = p.n_chunks();
  std::fill_n(s.h.begin(), ch.r, 0.0f);
  const int64_t off_z = p.z.data ? b * p.z.stride0 + d * p.z.stride1 : 0;
  for (int c = 0; c < n_chunks; ++c) {
    const int t0 = c * p.chunk, T = std::min(p.chunk, p.seqlen - t0);
    load_steps(p, ch, t0, T, false, s);
    int64_t ldb, ldc;
    const float* Bp =
        channel_rows(B, p.b_variable, p, b, d, t0, T, ch.r, ch.kept, s.B_gather.data(), s.B_inv.data(), ldb);
    const float* Cp =
        channel_rows(C, p.c_variable, p, b, d, t0, T, ch.r, ch.kept, s.C_gather.data(), s.C_inv.data(), ldc);
    forward_core(
        {ch.r, T, s.A.data(), s.h.data(), s.delta.data(), s.delta_u.data(), Bp, ldb, Cp, ldc, s.y.data(), nullptr});

    float* carry = p.carries + ((static_cast<int64_t>(b) * p.dim + d) * n_chunks + c) * N;
    if (ch.kept) std::fill_n(carry, N, 0.0f);  // masked states stay exactly 0
    for (int k = 0; k < ch.r; ++k) carry[ch.state(k)] = s.h[k];

    if (p.z.data) load_row(p.z.data, off_z + t0, p.z.dtype, T, s.z.data());
    gate_steps({T, ch.D, s.u.data(), p.z.data ? s.z.data() : nullptr, s.y.data(), nullptr, nullptr, nullptr});
    store_row(p.out, ch.dense + t0, p.u.dtype, T, s.y.data());
  }
}

// Backward of one (batch, channel): dB/dC of variable B/C go to this thread's partial rows
// (G, L, N) for batch b; everything per channel (dA, dD, ddelta_bias, invariant dB/dC) is added to the
// outputs directly (the caller runs batches one after another, so no two threads share a channel).
void channel_backward(const ScanParams& p, const Rows& B, const Rows& C, int b, int d, Scratch& s, float* dB_part,
                      float* dC_part) {
  const Channel ch(p, b, d, s);
  const int N = p.dstate, r = ch.r, n_chunks = p.n_chunks();
  const int64_t bd = static_cast<int64_t>(b) * p.dim + d;
  for (int k = 0; k < r; ++k) s.carry[k] = p.dlast ? p.dlast[bd * N + ch.state(k)] : 0.0f;
  std::fill_n(s.dA.begin(), r, 0.0f);
  std::fill_n(s.dB_inv.begin(), r, 0.0f);
  std::fill_n(s.dC_inv.begin(), r, 0.0f);
  const int64_t off_z = p.z.data ? b * p.z.stride0 + d * p.z.stride1 : 0;
  const int64_t off_dout = b * p.dout.stride0 + d * p.dout.stride1;
  float dD = 0.0f, ddelta_bias = 0.0f;

  for (int c = n_chunks - 1; c >= 0; --c) {
    const int t0 = c * p.chunk, T = std::min(p.chunk, p.seqlen - t0);
    load_steps(p, ch, t0, T, true, s);
    int64_t ldb, ldc;
    const float* Bp = channel_rows(B, p.b_variable, p, b, d, t0, T, r, ch.kept, s.B_gather.data(), s.B_inv.data(), ldb);
    const float* Cp = channel_rows(C, p.c_variable, p, b, d, t0, T, r, ch.kept, s.C_gather.data(), s.C_inv.data(), ldc);

    // Recompute the chunk's states from the carry saved by the forward.
    const float* saved = p.carries + (bd * n_chunks + c - 1) * N;
    for (int k = 0; k < r; ++k) s.h_in[k] = c > 0 ? saved[ch.state(k)] : 0.0f;
    std::copy_n(s.h_in.begin(), r, s.h.begin());
    forward_core_hist({r, T, s.A.data(), s.h.data(), s.delta.data(), s.delta_u.data(), Bp, ldb, Cp, ldc, s.y.data(),
                       s.hist.data()});

    // Through the z gate and the D skip: dy is the gradient of Σ_n C h.
    load_row(p.dout.data, off_dout + t0, p.dout.dtype, T, s.dy.data());
    if (p.z.data) load_row(p.z.data, off_z + t0, p.z.dtype, T, s.z.data());
    gate_steps({T, ch.D, s.u.data(), p.z.data ? s.z.data() : nullptr, s.y.data(), s.dy.data(), s.dz.data(), &dD});
    if (p.z.data) store_row(p.dz, ch.dense + t0, p.z.dtype, T, s.dz.data());

    // This channel's group rows of the thread's partial dB/dC, from step t0.
    auto part_rows = [&](float* part, int groups) {
      return part ? part + (static_cast<int64_t>(d / (p.dim / groups)) * p.seqlen + t0) * N : nullptr;
    };
    float* dB_rows = part_rows(dB_part, B.groups);
    float* dC_rows = part_rows(dC_part, C.groups);
    float *dBp = s.dB_inv.data(), *dCp = s.dC_inv.data();
    int64_t lddb = 0, lddc = 0;
    if (p.b_variable) {
      dBp = ch.kept ? s.dB_gather.data() : dB_rows;
      lddb = ch.kept ? r : N;
      if (ch.kept) std::fill_n(dBp, static_cast<size_t>(T) * r, 0.0f);
    }
    if (p.c_variable) {
      dCp = ch.kept ? s.dC_gather.data() : dC_rows;
      lddc = ch.kept ? r : N;
      if (ch.kept) std::fill_n(dCp, static_cast<size_t>(T) * r, 0.0f);
    }
    reverse_core({r, T, s.A.data(), s.carry.data(), s.delta.data(), s.u.data(), s.dy.data(), Bp, ldb, Cp, ldc,
                  s.h_in.data(), s.hist.data(), dBp, lddb, dCp, lddc, s.dA.data(), s.ddelta.data(), s.du.data()});
    if (ch.kept) {  // scatter the kept states' rows back to state indices
      for (int t = 0; t < T; ++t) {
        for (int k = 0; k < r; ++k) {
          if (p.b_variable) dB_rows[static_cast<int64_t>(t) * N + ch.kept[k]] += s.dB_gather[t * r + k];
          if (p.c_variable) dC_rows[static_cast<int64_t>(t) * N + ch.kept[k]] += s.dC_gather[t * r + k];
        }
      }
    }

    for (int t = 0; t < T; ++t) {
      s.ddelta[t] *= s.delta_grad[t];
      ddelta_bias += s.ddelta[t];
      s.du[t] += s.dy[t] * ch.D;
    }
    store_row(p.ddelta, ch.dense + t0, p.delta.dtype, T, s.ddelta.data());
    store_row(p.du, ch.dense + t0, p.u.dtype, T, s.du.data());
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

// dB[b] (G, N, L) = Σ over threads of their partial rows (G, L, N), in the output's dtype.
void reduce_partials(const std::vector<float>& parts, int64_t part_size, int threads, int groups, int N, int L,
                     void* out, DType dtype, int b, std::vector<float>& tile) {
  constexpr int kBlock = 32;
  const int blocks = (L + kBlock - 1) / kBlock;
#pragma omp for schedule(static)
  for (int64_t task = 0; task < static_cast<int64_t>(groups) * blocks; ++task) {
    const int g = static_cast<int>(task / blocks), t0 = static_cast<int>(task % blocks) * kBlock;
    const int T = std::min(kBlock, L - t0);
    const int64_t off = (static_cast<int64_t>(g) * L + t0) * N;
    std::fill_n(tile.begin(), static_cast<size_t>(T) * N, 0.0f);
    for (int th = 0; th < threads; ++th) {
      const float* src = parts.data() + th * part_size + off;
      for (int i = 0; i < T * N; ++i) tile[i] += src[i];
    }
    const int64_t dst = ((static_cast<int64_t>(b) * groups + g) * N) * L + t0;
    for (int n = 0; n < N; ++n) {
      for (int t = 0; t < T; ++t) store(out, dst + static_cast<int64_t>(n) * L + t, dtype, tile[t * N + n]);
    }
  }
}

Rows variable_rows(const Operand& x, bool variable, int groups, const ScanParams& p) {
  return variable ? transpose_rows(x, p.batch, groups, p.dstate, p.seqlen, p.num_threads) : Rows{};
}

}  // namespace

void scan_fwd(const ScanParams& p) {
  const Rows B = variable_rows(p.B, p.b_variable, p.groups_b, p);
  const Rows C = variable_rows(p.C, p.c_variable, p.groups_c, p);
  const int64_t pairs = static_cast<int64_t>(p.batch) * p.dim;
#pragma omp parallel num_threads(p.num_threads)
  {
    Scratch s(p.dstate, p.chunk, false);
#pragma omp for schedule(static)
    for (int64_t bd = 0; bd < pairs; ++bd) {
      channel_forward(p, B, C, static_cast<int>(bd / p.dim), static_cast<int>(bd % p.dim), s);
    }
  }
}

void scan_bwd(const ScanParams& p) {
  const int N = p.dstate, L = p.seqlen;
  const Rows B = variable_rows(p.B, p.b_variable, p.groups_b, p);
  const Rows C = variable_rows(p.C, p.c_variable, p.groups_c, p);
  std::fill_n(p.dA, static_cast<int64_t>(p.dim) * N, 0.0f);
  if (!p.b_variable) std::fill_n(static_cast<float*>(p.dB), static_cast<int64_t>(p.dim) * N, 0.0f);
  if (!p.c_variable) std::fill_n(static_cast<float*>(p.dC), static_cast<int64_t>(p.dim) * N, 0.0f);
  if (p.dD) std::fill_n(p.dD, p.dim, 0.0f);
  if (p.ddelta_bias) std::fill_n(p.ddelta_bias, p.dim, 0.0f);

  // Per-thread partial dB/dC rows of one batch: channels of a group add into the same (L, N) rows.
  const int64_t part_b = p.b_variable ? static_cast<int64_t>(p.groups_b) * L * N : 0;
  const int64_t part_c = p.c_variable ? static_cast<int64_t>(p.groups_c) * L * N : 0;
  std::vector<float> parts_b(part_b * p.num_threads), parts_c(part_c * p.num_threads);
#pragma omp parallel num_threads(p.num_threads)
  {
    Scratch s(N, p.chunk, true);
    std::vector<float> tile(static_cast<size_t>(32) * N);
    const int th = omp_get_thread_num(), threads = omp_get_num_threads();
    float* my_b = p.b_variable ? parts_b.data() + th * part_b : nullptr;
    float* my_c = p.c_variable ? parts_c.data() + th * part_c : nullptr;
    for (int b = 0; b < p.batch; ++b) {
      if (my_b) std::fill_n(my_b, part_b, 0.0f);
      if (my_c) std::fill_n(my_c, part_c, 0.0f);
      // Round-robin channels: a fixed assignment keeps the sums (and results) reproducible.
#pragma omp for schedule(static, 1)
      for (int d = 0; d < p.dim; ++d) channel_backward(p, B, C, b, d, s, my_b, my_c);
      if (p.b_variable) reduce_partials(parts_b, part_b, threads, p.groups_b, N, L, p.dB, p.B.dtype, b, tile);
      if (p.c_variable) reduce_partials(parts_c, part_c, threads, p.groups_c, N, L, p.dC, p.C.dtype, b, tile);
    }
  }
}

}  // namespace compressm::cpu
