// One decode step of the selective scan on the CPU, state updated in place. Channels are processed in blocks:
// the per-channel scalars (Δ = softplus(dt + bias), Δ·x, the D skip, the silu gate) are computed for the whole
// block in loops vectorised across channels, then each channel's kept states are advanced in a loop vectorised
// across states (the same forward_step as the scan), and C·h is summed eight channels at a time (sum_rows8).
// OpenMP over blocks only when the step is big enough.
#include <algorithm>

#include <compressm/scan_recurrence.h>

#include "cpu_common.h"
#include "scan_cpu.h"

namespace compressm::cpu {
namespace {

constexpr int kMaxState = 256;  // the package's MAX_DSTATE; bindings.cpp checks it
constexpr int kBlock = 64;      // channels per block: the block's scalars stay in registers / L1

// n values data[off + i·stride] (i < n) as fp32; the dtype switch sits outside the loops so they vectorise.
COMPRESSM_ALWAYS_INLINE void load_strided(const void* data, int64_t off, int64_t stride, DType t, int n, float* dst) {
  if (stride == 1) {
    load_row(data, off, t, n, dst);
    return;
  }
  for (int i = 0; i < n; ++i) dst[i] = load(data, off + i * stride, t);
}

// One channel's kept states advanced by one step (h in place); prod[k] = C_k · h_k.
struct StepArgs {
  int r;
  float delta, delta_x;
  const float* A;
  const float* B;
  const float* C;
  float* h;
  float* prod;
};

template <int kR>  // > 0: the state count known at compile time
COMPRESSM_ALWAYS_INLINE void advance(const StepArgs& a) {
  const int r = kR > 0 ? kR : a.r;
  const float* __restrict A = a.A;
  const float* __restrict B = a.B;
  const float* __restrict C = a.C;
  float* __restrict h = a.h;
  float* __restrict prod = a.prod;
#pragma omp simd
  for (int k = 0; k < r; ++k) {
    const float hk = forward_step(h[k], a.delta, A[k], a.delta_x, B[k]);
    h[k] = hk;
    prod[k] = C[k] * hk;
  }
}

struct BlockArgs {
  const StateUpdateParams* p;
  int b, d0, n;  // batch, first channel, channels in the block
};

COMPRESSM_ALWAYS_INLINE void block_step_impl(const BlockArgs& a) {
  const StateUpdateParams& p = *a.p;
  const int N = p.dstate, b = a.b, d0 = a.d0, n = a.n;
  alignas(64) float x[kBlock], delta[kBlock], gate[kBlock], y[kBlock];
  v8f lanes[kBlock];  // per channel, C·h folded to eight lanes
  alignas(64) float A_buf[kMaxState], B_buf[kMaxState], C_buf[kMaxState], h_buf[kMaxState], prod[kMaxState + 8];

  // Per-channel scalars, vectorised across the block's channels.
  load_strided(p.x.data, b * p.x.stride0 + d0 * p.x.stride1, p.x.stride1, p.x.dtype, n, x);
  load_strided(p.dt.data, b * p.dt.stride0 + d0 * p.dt.stride1, p.dt.stride1, p.dt.dtype, n, delta);
  if (p.z.data) {
    load_strided(p.z.data, b * p.z.stride0 + d0 * p.z.stride1, p.z.stride1, p.z.dtype, n, gate);
    for (int i = 0; i < n; ++i) gate[i] = silu_f32(gate[i]);
  }
  if (p.dt_bias) {
    for (int i = 0; i < n; ++i) delta[i] += p.dt_bias[d0 + i];
  }
  if (p.dt_softplus) {
    for (int i = 0; i < n; ++i) delta[i] = softplus_f32(delta[i]);
  }

  // The state loop of each channel, vectorised across its kept states.
  const bool f32_b = p.B.dtype == DType::f32 && p.B.stride2 == 1;
  const bool f32_c = p.C.dtype == DType::f32 && p.C.stride2 == 1;
  const bool f32_h = p.state_dtype == DType::f32 && p.state_stride2 == 1;
  int group_b = -1, group_c = -1;  // the group whose B/C row the buffers hold
  for (int i = 0; i < n; ++i) {
    const int d = d0 + i;
    const int r = p.ranks ? p.ranks[d] : N;
    const int32_t* kept = p.kept ? p.kept + static_cast<int64_t>(d) * N : nullptr;
    const int gb = p.groups_b == 1 ? 0 : d / (p.dim / p.groups_b);
    const int gc = p.groups_c == 1 ? 0 : d / (p.dim / p.groups_c);
    const int64_t off_b = b * p.B.stride0 + gb * p.B.stride1, off_c = b * p.C.stride0 + gc * p.C.stride1;
    const int64_t off_h = b * p.state_stride0 + d * p.state_stride1;
    const float* A = p.A + static_cast<int64_t>(d) * N;
    const float* B = static_cast<const float*>(p.B.data) + off_b;
    const float* C = static_cast<const float*>(p.C.data) + off_c;
    float* h = static_cast<float*>(p.state) + off_h;
    if (kept) {  // kept states first: gather everything to kept order
      for (int k = 0; k < r; ++k) {
        A_buf[k] = A[kept[k]];
        B_buf[k] = load(p.B.data, off_b + kept[k] * p.B.stride2, p.B.dtype);
        C_buf[k] = load(p.C.data, off_c + kept[k] * p.C.stride2, p.C.dtype);
        h_buf[k] = load(p.state, off_h + kept[k] * p.state_stride2, p.state_dtype);
      }
      A = A_buf, B = B_buf, C = C_buf, h = h_buf;
    } else {
      if (!f32_b && gb != group_b) load_strided(p.B.data, off_b, p.B.stride2, p.B.dtype, N, B_buf), group_b = gb;
      if (!f32_c && gc != group_c) load_strided(p.C.data, off_c, p.C.stride2, p.C.dtype, N, C_buf), group_c = gc;
      if (!f32_b) B = B_buf;
      if (!f32_c) C = C_buf;
      if (!f32_h) load_strided(p.state, off_h, p.state_stride2, p.state_dtype, N, h_buf), h = h_buf;
    }
    const StepArgs step{r, delta[i], delta[i] * x[i], A, B, C, h, prod};
    switch (r) {  // the usual compacted sizes get unrolled loops
      case 8: advance<8>(step); break;
      case 16: advance<16>(step); break;
      default: advance<0>(step);
    }
    lanes[i] = fold8(prod, r);
    if (kept) {
      for (int k = 0; k < r; ++k) store(p.state, off_h + kept[k] * p.state_stride2, p.state_dtype, h_buf[k]);
      for (int k = r; k < N; ++k) store(p.state, off_h + kept[k] * p.state_stride2, p.state_dtype, 0.0f);  // masked
    } else if (!f32_h) {
      for (int k = 0; k < N; ++k) store(p.state, off_h + k * p.state_stride2, p.state_dtype, h_buf[k]);
    }
  }

  // Σ over states, then the D skip and the gate, vectorised across channels.
  for (int i = n; i % 8 != 0; ++i) lanes[i] = v8f{};
  for (int i = 0; i < n; i += 8) sum_rows8(lanes + i, y + i);
  if (p.D) {
    for (int i = 0; i < n; ++i) y[i] += p.D[d0 + i] * x[i];
  }
  if (p.z.data) {
    for (int i = 0; i < n; ++i) y[i] *= gate[i];
  }
  store_row(p.out, static_cast<int64_t>(b) * p.dim + d0, p.x.dtype, n, y);
}
COMPRESSM_DISPATCH(block_step, BlockArgs)

}  // namespace

void state_update(const StateUpdateParams& p) {
  const int blocks = (p.dim + kBlock - 1) / kBlock;
  const int64_t tasks = static_cast<int64_t>(p.batch) * blocks;
  // A fork/join costs a few microseconds (far more when the cores are shared): threads only beyond ~64k
  // state updates, where one thread needs tens of microseconds.
  const int threads = static_cast<int64_t>(p.batch) * p.dim * p.dstate >= 65536 ? p.num_threads : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t task = 0; task < tasks; ++task) {
    const int b = static_cast<int>(task / blocks), d0 = static_cast<int>(task % blocks) * kBlock;
    block_step({&p, b, d0, std::min(kBlock, p.dim - d0)});
  }
}

}  // namespace compressm::cpu
