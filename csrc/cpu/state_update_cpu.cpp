// One decode step of the selective scan on the CPU, state updated in place: OpenMP over batch × channel,
// the loop over a channel's kept states vectorised (the same forward_step as the scan).
#include <algorithm>

#include <compressm/scan_recurrence.h>

#include "cpu_common.h"
#include "scan_cpu.h"

namespace compressm::cpu {
namespace {

constexpr int kMaxState = 256;  // the package's MAX_DSTATE; bindings.cpp checks it

struct StepArgs {
  int r;
  float delta, delta_u;
  const float* A;
  const float* B;
  const float* C;
  float* h;
  float* y;
};

COMPRESSM_ALWAYS_INLINE void step_core_impl(const StepArgs& a) {
  const float* __restrict A = a.A;
  const float* __restrict B = a.B;
  const float* __restrict C = a.C;
  float* __restrict h = a.h;
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int k = 0; k < a.r; ++k) {
    const float hk = forward_step(h[k], a.delta, A[k], a.delta_u, B[k]);
    h[k] = hk;
    acc += C[k] * hk;
  }
  *a.y = acc;
}
COMPRESSM_DISPATCH(step_core, StepArgs)

// dst[k] = data[off + state_k · stride] in fp32, state_k = kept[k] (or k), k < r.
void gather(const void* data, int64_t off, int64_t stride, DType t, const int32_t* kept, int r, float* dst) {
  for (int k = 0; k < r; ++k) dst[k] = load(data, off + (kept ? kept[k] : k) * stride, t);
}

// Operands already fp32, unit-stride and unmasked are used in place; others are gathered into `buf`.
template <typename T>
T* in_place_or(T* data, DType t, int64_t stride, const int32_t* kept, float* buf) {
  return t == DType::f32 && stride == 1 && kept == nullptr ? data : buf;
}

void channel_step(const StateUpdateParams& p, int b, int d) {
  const int N = p.dstate;
  const int r = p.ranks ? p.ranks[d] : N;
  const int32_t* kept = p.kept ? p.kept + static_cast<int64_t>(d) * N : nullptr;
  alignas(64) float A_buf[kMaxState], B_buf[kMaxState], C_buf[kMaxState], h_buf[kMaxState];
  const int64_t off_b = b * p.B.stride0 + (d / (p.dim / p.groups_b)) * p.B.stride1;
  const int64_t off_c = b * p.C.stride0 + (d / (p.dim / p.groups_c)) * p.C.stride1;
  const int64_t off_h = b * p.state_stride0 + d * p.state_stride1;
  const float* A = p.A + static_cast<int64_t>(d) * N;
  if (kept) {
    for (int k = 0; k < r; ++k) A_buf[k] = A[kept[k]];
    A = A_buf;
  }
  const float* B = in_place_or(static_cast<const float*>(p.B.data) + off_b, p.B.dtype, p.B.stride2, kept, B_buf);
  if (B == B_buf) gather(p.B.data, off_b, p.B.stride2, p.B.dtype, kept, r, B_buf);
  const float* C = in_place_or(static_cast<const float*>(p.C.data) + off_c, p.C.dtype, p.C.stride2, kept, C_buf);
  if (C == C_buf) gather(p.C.data, off_c, p.C.stride2, p.C.dtype, kept, r, C_buf);
  float* h = in_place_or(static_cast<float*>(p.state) + off_h, p.state_dtype, p.state_stride2, kept, h_buf);
  if (h == h_buf) gather(p.state, off_h, p.state_stride2, p.state_dtype, kept, r, h_buf);

  const float bias = p.dt_bias ? p.dt_bias[d] : 0.0f;
  const float x = load(p.x.data, b * p.x.stride0 + d * p.x.stride1, p.x.dtype);
  const float delta = discretize(load(p.dt.data, b * p.dt.stride0 + d * p.dt.stride1, p.dt.dtype), bias, p.dt_softplus);
  float y;
  step_core({r, delta, delta * x, A, B, C, h, &y});
  if (h == h_buf) {
    for (int k = 0; k < r; ++k) store(p.state, off_h + (kept ? kept[k] : k) * p.state_stride2, p.state_dtype, h[k]);
  }
  for (int k = r; k < N; ++k) store(p.state, off_h + kept[k] * p.state_stride2, p.state_dtype, 0.0f);  // masked: 0
  if (p.D) y += p.D[d] * x;
  if (p.z.data) y *= silu_f32(load(p.z.data, b * p.z.stride0 + d * p.z.stride1, p.z.dtype));
  store(p.out, static_cast<int64_t>(b) * p.dim + d, p.x.dtype, y);
}

}  // namespace

void state_update(const StateUpdateParams& p) {
  const int64_t pairs = static_cast<int64_t>(p.batch) * p.dim;
  // Threads only pay off beyond a few thousand state updates (a fork/join costs a few microseconds).
  const int threads = pairs * p.dstate >= 8192 ? p.num_threads : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t bd = 0; bd < pairs; ++bd) channel_step(p, static_cast<int>(bd / p.dim), static_cast<int>(bd % p.dim));
}

}  // namespace compressm::cpu
