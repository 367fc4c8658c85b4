// Forward selective scan: one warp per (batch, channel); a channel's steps are processed in chunks
// of kChunk = 32 lanes x kItemsPerLane. For each kept state the warp scans the chunk (each lane its
// steps serially, then a warp scan across lanes, started from the state's carry), accumulating y in
// registers. Only the carries at chunk ends are written (for last_state and the backward pass);
// no per-step hidden state touches memory. Channel d's state loop runs its rank r_d, not N.
// The per-step math is compressm/scan_recurrence.h, shared with the CPU kernels.
#pragma once

#include "compressm/cuda_warp_scan.cuh"
#include "scan_io.cuh"
#include "compressm/scan_recurrence.h"
#include "scan_params.h"

namespace compressm {
namespace cuda {

template <typename T>
__global__ void __launch_bounds__(kMaxChannelsPerBlock * kWarpSize)
    scan_fwd_kernel(const ScanFwdParams p) {
  extern __shared__ float fwd_smem[];  // (channels_per_block, N): h at the last chunk's end, by rank slot
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int b = blockIdx.y;
  const int d = blockIdx.x * p.channels_per_block + warp;
  const int N = p.dstate;
  const int rank = channel_rank(p, d);
  const int32_t* kept = channel_kept(p, d);
  const float D_val = p.D ? p.D[d] : 0.f;
  const float bias = p.delta_bias ? p.delta_bias[d] : 0.f;
  float* carries = p.carries + (static_cast<int64_t>(b) * p.dim + d) * p.n_chunks * N;
  float* carry = fwd_smem + warp * N;

  const T* u_row = activation_row<T>(p.u, b, d);
  const T* delta_row = activation_row<T>(p.delta, b, d);
  for (int chunk = 0; chunk < p.n_chunks; ++chunk) {
    const int t = chunk * kChunk + lane * kItemsPerLane;
    float u[kItemsPerLane], dt[kItemsPerLane], y[kItemsPerLane];
    load_items<T>(u_row, t, p.seqlen, p.u.vec, u);
    load_items<T>(delta_row, t, p.seqlen, p.delta.vec, dt);
#pragma unroll
    for (int j = 0; j < kItemsPerLane; ++j) {
      // Steps past L become the identity (dt = 0: decay 1, input 0).
      dt[j] = t + j < p.seqlen ? discretize(dt[j], bias, p.delta_softplus) : 0.f;
      y[j] = 0.f;
    }
    StateOperands next;
    if (rank > 0) load_state<T>(p, b, d, kept, 0, t, next);
    for (int k = 0; k < rank; ++k) {
      const StateOperands cur = next;
      if (k + 1 < rank) load_state<T>(p, b, d, kept, k + 1, t, next);
      const int n = cur.n;
      const float A_n = cur.A;
      const float(&B)[kItemsPerLane] = cur.B;
      const float(&C)[kItemsPerLane] = cur.C;
      // Each lane's steps as one affine map, scanned across the warp from the state's carry.
      AffinePair lane_map{1.f, 0.f};
#pragma unroll
      for (int j = 0; j < kItemsPerLane; ++j)
        lane_map = compose(lane_map, AffinePair{decay(dt[j], A_n), dt[j] * u[j] * B[j]});
      // Only lane 0 touches the carry slot, so no lane can read it after lane 0 rewrote it.
      const float carry_in = __shfl_sync(kFullMask, lane == 0 && chunk > 0 ? carry[k] : 0.f, 0);
      float chunk_end;
      const float h_start = warp_exclusive_scan<false>(lane_map, carry_in, chunk_end);
      forward_chunk(
          h_start, A_n, kItemsPerLane,
          [&](int j) { return StepInputs{dt[j], dt[j] * u[j], B[j], C[j]}; },
          [&](int j, float c_h) { y[j] += c_h; });
      if (lane == 0) {
        carry[k] = chunk_end;
        carries[static_cast<int64_t>(chunk) * N + n] = chunk_end;
      }
    }
    // Dropped states hold zero (they never reach y, last_state or the carries the backward reads).
    for (int k = rank + lane; k < N; k += kWarpSize) carries[static_cast<int64_t>(chunk) * N + kept[k]] = 0.f;

    float gate[kItemsPerLane];
    if (p.z.ptr) load_items<T>(activation_row<T>(p.z, b, d), t, p.seqlen, p.z.vec, gate);
#pragma unroll
    for (int j = 0; j < kItemsPerLane; ++j) {
      y[j] = fmaf(D_val, u[j], y[j]);
      if (p.z.ptr) y[j] *= silu_f32(gate[j]);
    }
    store_items<T>(activation_row_mut<T>(p.out, b, d), t, p.seqlen, p.out.vec, y);
  }
}

// Shared memory of a forward block: (channels_per_block, N) carries.
inline size_t fwd_smem_bytes(const ScanFwdParams& p) { return sizeof(float) * p.channels_per_block * p.dstate; }

}  // namespace cuda
}  // namespace compressm
