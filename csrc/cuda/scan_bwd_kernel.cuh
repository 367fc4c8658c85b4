// Backward selective scan: one warp per (batch, channel), chunks in reverse. Within a chunk, for each
// kept state the warp recomputes h from the forward's saved carry (forward warp scan), then runs the
// reverse recurrence carry_t = a_t (C_t dy_t + carry_{t+1}) (reverse warp scan, started from the next
// chunk's carry or from d last_state); each lane's steps then go through reverse_chunk of
// compressm/scan_recurrence.h (the math shared with the CPU kernels), with dy_t = dout_t silu(z_t).
// y is recomputed on the way for dz_t = dout_t y_t silu'(z_t), so the forward saves no output.
// Variable dB/dC are summed over the channels of a group: when all channels keep the same states,
// the block's warps (channels of one group) add theirs in shared memory first and issue one atomic
// per element per block; with per-channel ranks each warp adds its own.
#pragma once

#include "compressm/cuda_warp_scan.cuh"
#include "scan_io.cuh"
#include "compressm/scan_recurrence.h"
#include "scan_params.h"

namespace compressm {
namespace cuda {

// Dynamic shared memory, sized for the block's channels and N (a small block then still fits many
// times on an SM): per warp 4 x N floats, by rank slot
//   [reverse carry entering the chunk | dA sum | invariant dB sum | invariant dC sum],
// then, with the block-level reduction, reduce[2 (parity)][2 (B, C)][channels_per_block][kChunk].
__host__ __device__ inline bool bwd_block_reduce(const ScanBwdParams& p) {
  return !p.per_channel_ranks && p.channels_per_block > 1 && (p.B.variable || p.C.variable);
}
inline size_t bwd_smem_bytes(const ScanBwdParams& p) {
  const size_t per_warp = 4 * static_cast<size_t>(p.dstate);
  const size_t reduce = bwd_block_reduce(p) ? 4 * static_cast<size_t>(kChunk) : 0;
  return sizeof(float) * p.channels_per_block * (per_warp + reduce);
}

// Adds this warp's dB or dC values of state n for its lane's steps to the fp32 (Bt, G, N, L) buffer.
__device__ __forceinline__ void add_to_projection_grad(float* grad_row, int t, int seqlen,
                                                       const float (&v)[kItemsPerLane]) {
#pragma unroll
  for (int j = 0; j < kItemsPerLane; ++j)
    if (t + j < seqlen) atomicAdd(grad_row + t + j, v[j]);
}

template <typename T>
__global__ void __launch_bounds__(kMaxChannelsPerBlock * kWarpSize)
    scan_bwd_kernel(const ScanBwdParams p) {
  extern __shared__ float bwd_smem[];
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int b = blockIdx.y;
  const int d = blockIdx.x * p.channels_per_block + warp;
  const int N = p.dstate;
  const int rank = channel_rank(p, d);
  const int32_t* kept = channel_kept(p, d);
  const float D_val = p.D ? p.D[d] : 0.f;
  const float bias = p.delta_bias ? p.delta_bias[d] : 0.f;
  const int64_t bd = static_cast<int64_t>(b) * p.dim + d;
  const float* carries = p.carries + bd * p.n_chunks * N;
  // Block-level reduction of variable dB/dC: every warp of the block runs the same state loop.
  const bool block_reduce = bwd_block_reduce(p);
  float* s_carry = bwd_smem + warp * 4 * N;
  float* dA_sum = s_carry + N;
  float* dB_sum = s_carry + 2 * N;
  float* dC_sum = s_carry + 3 * N;
  float* reduce = bwd_smem + p.channels_per_block * 4 * N;  // [parity][B or C][warp][kChunk]
  const int groups_B = p.dim / p.B.channels_per_group, groups_C = p.dim / p.C.channels_per_group;
  float* dB_rows = p.dB + (static_cast<int64_t>(b) * groups_B + d / p.B.channels_per_group) * N * p.seqlen;
  float* dC_rows = p.dC + (static_cast<int64_t>(b) * groups_C + d / p.C.channels_per_group) * N * p.seqlen;

  if (lane == 0) {
    for (int k = 0; k < rank; ++k) {
      s_carry[k] = p.dlast ? p.dlast[bd * N + (kept ? kept[k] : k)] : 0.f;
      dA_sum[k] = dB_sum[k] = dC_sum[k] = 0.f;
    }
  }
  float dD_sum = 0.f, dbias_sum = 0.f;
  int parity = 0;
  const T* u_row = activation_row<T>(p.u, b, d);
  const T* delta_row = activation_row<T>(p.delta, b, d);
  const T* dout_row = activation_row<T>(p.dout, b, d);
  for (int chunk = p.n_chunks - 1; chunk >= 0; --chunk) {
    const int t0 = chunk * kChunk;
    const int t = t0 + lane * kItemsPerLane;
    float u[kItemsPerLane], raw[kItemsPerLane], dt[kItemsPerLane], dy[kItemsPerLane], dout[kItemsPerLane];
    float gate[kItemsPerLane], y[kItemsPerLane], du[kItemsPerLane], ddt[kItemsPerLane];
    load_items<T>(u_row, t, p.seqlen, p.u.vec, u);
    load_items<T>(delta_row, t, p.seqlen, p.delta.vec, raw);
    load_items<T>(dout_row, t, p.seqlen, p.dout.vec, dout);  // 0 past L, so padded steps get dy = 0
    if (p.z.ptr) load_items<T>(activation_row<T>(p.z, b, d), t, p.seqlen, p.z.vec, gate);
#pragma unroll
    for (int j = 0; j < kItemsPerLane; ++j) {
      dt[j] = t + j < p.seqlen ? discretize(raw[j], bias, p.delta_softplus) : 0.f;
      dy[j] = p.z.ptr ? dout[j] * silu_f32(gate[j]) : dout[j];
      y[j] = D_val * u[j];
      du[j] = D_val * dy[j];
      ddt[j] = 0.f;
      dD_sum = fmaf(dy[j], u[j], dD_sum);
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
      float a[kItemsPerLane], h[kItemsPerLane];
      // Recompute h in the chunk from the forward's carry at the previous chunk's end.
      AffinePair fwd_map{1.f, 0.f};
#pragma unroll
      for (int j = 0; j < kItemsPerLane; ++j) {
        a[j] = decay(dt[j], A_n);
        fwd_map = compose(fwd_map, AffinePair{a[j], dt[j] * u[j] * B[j]});
      }
      const float h_in = chunk > 0 ? carries[static_cast<int64_t>(chunk - 1) * N + n] : 0.f;
      float unused;
      const float h_start = warp_exclusive_scan<false>(fwd_map, h_in, unused);
      float h_prev = h_start;
#pragma unroll
      for (int j = 0; j < kItemsPerLane; ++j) {
        h[j] = forward_step(h_prev, dt[j], A_n, dt[j] * u[j], B[j]);
        h_prev = h[j];
        y[j] = fmaf(C[j], h[j], y[j]);
      }
      // The reverse carry as affine maps, composed from the lane's last step down.
      AffinePair rev_map{1.f, 0.f};
#pragma unroll
      for (int j = kItemsPerLane - 1; j >= 0; --j) rev_map = compose(rev_map, AffinePair{a[j], a[j] * C[j] * dy[j]});
      const float carry_in = __shfl_sync(kFullMask, lane == 0 ? s_carry[k] : 0.f, 0);
      float carry_out;
      const float lane_carry = warp_exclusive_scan<true>(rev_map, carry_in, carry_out);
      float dA_part = 0.f, dB_val[kItemsPerLane], dC_val[kItemsPerLane];
      reverse_chunk(
          lane_carry, A_n, kItemsPerLane,
          [&](int j) { return ReverseInputs{dy[j], dt[j], u[j], B[j], C[j], j > 0 ? h[j - 1] : h_start, h[j]}; },
          [&](int j, const StepGrads& grads) {
            du[j] += grads.du;
            ddt[j] += grads.ddelta;
            dA_part += grads.dA;
            dB_val[j] = grads.dB;
            dC_val[j] = grads.dC;
          });
      dA_part = warp_sum(dA_part);
      if (!p.B.variable) {
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < kItemsPerLane; ++j) sum += dB_val[j];
        dB_val[0] = warp_sum(sum);
      }
      if (!p.C.variable) {
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < kItemsPerLane; ++j) sum += dC_val[j];
        dC_val[0] = warp_sum(sum);
      }
      if (lane == 0) {
        s_carry[k] = carry_out;
        dA_sum[k] += dA_part;
        if (!p.B.variable) dB_sum[k] += dB_val[0];
        if (!p.C.variable) dC_sum[k] += dC_val[0];
      }
      if (block_reduce) {
        // The warps hold the same state n of channels in one group: sum them, one atomic per element.
#pragma unroll
        for (int j = 0; j < kItemsPerLane; ++j) {
          reduce[((parity * 2 + 0) * p.channels_per_block + warp) * kChunk + lane * kItemsPerLane + j] = dB_val[j];
          reduce[((parity * 2 + 1) * p.channels_per_block + warp) * kChunk + lane * kItemsPerLane + j] = dC_val[j];
        }
        __syncthreads();
        for (int e = threadIdx.x; e < kChunk && t0 + e < p.seqlen; e += blockDim.x) {
          float sum_B = 0.f, sum_C = 0.f;
          for (int w = 0; w < p.channels_per_block; ++w) {
            sum_B += reduce[((parity * 2 + 0) * p.channels_per_block + w) * kChunk + e];
            sum_C += reduce[((parity * 2 + 1) * p.channels_per_block + w) * kChunk + e];
          }
          if (p.B.variable) atomicAdd(dB_rows + static_cast<int64_t>(n) * p.seqlen + t0 + e, sum_B);
          if (p.C.variable) atomicAdd(dC_rows + static_cast<int64_t>(n) * p.seqlen + t0 + e, sum_C);
        }
        parity ^= 1;  // the next state writes the other buffer, so no second barrier is needed
      } else {
        if (p.B.variable) add_to_projection_grad(dB_rows + static_cast<int64_t>(n) * p.seqlen, t, p.seqlen, dB_val);
        if (p.C.variable) add_to_projection_grad(dC_rows + static_cast<int64_t>(n) * p.seqlen, t, p.seqlen, dC_val);
      }
    }

    float dz[kItemsPerLane];
#pragma unroll
    for (int j = 0; j < kItemsPerLane; ++j) {
      if (p.z.ptr) dz[j] = dout[j] * y[j] * silu_grad_f32(gate[j]);
      ddt[j] *= discretize_grad(raw[j], bias, p.delta_softplus);
      if (t + j < p.seqlen) dbias_sum += ddt[j];
    }
    store_items<T>(activation_row_mut<T>(p.du, b, d), t, p.seqlen, p.du.vec, du);
    store_items<T>(activation_row_mut<T>(p.ddelta, b, d), t, p.seqlen, p.ddelta.vec, ddt);
    if (p.z.ptr) store_items<T>(activation_row_mut<T>(p.dz, b, d), t, p.seqlen, p.dz.vec, dz);
  }

  dD_sum = warp_sum(dD_sum);
  dbias_sum = warp_sum(dbias_sum);
  if (lane == 0) {
    if (p.dD) atomicAdd(p.dD + d, dD_sum);
    if (p.ddelta_bias) atomicAdd(p.ddelta_bias + d, dbias_sum);
    // Atomics across the batch; dropped states are never touched and stay zero.
    for (int k = 0; k < rank; ++k) {
      const int64_t dn = static_cast<int64_t>(d) * N + (kept ? kept[k] : k);
      atomicAdd(p.dA + dn, dA_sum[k]);
      if (!p.B.variable) atomicAdd(p.dB + dn, dB_sum[k]);
      if (!p.C.variable) atomicAdd(p.dC + dn, dC_sum[k]);
    }
  }
}

}  // namespace cuda
}  // namespace compressm
