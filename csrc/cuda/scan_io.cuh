// Loads and stores of one lane's kItemsPerLane consecutive time steps, converting to/from fp32.
// Vector (16-byte) accesses when the row is aligned and the lane's steps are all in range; scalar
// accesses with zero fill past L otherwise (so padded steps are the scan's identity: delta = u = 0).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "scan_params.h"

namespace compressm {
namespace cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

constexpr int kVecBytes = 16;

// row points at time step 0; loads steps [t, t + kItemsPerLane) into out, 0 past seqlen.
template <typename T>
__device__ __forceinline__ void load_items(const T* row, int t, int seqlen, bool vec, float (&out)[kItemsPerLane]) {
  static_assert((kItemsPerLane * sizeof(T)) % kVecBytes == 0, "a lane's steps must be whole 16-byte vectors");
  if (vec && t + kItemsPerLane <= seqlen) {
    alignas(kVecBytes) T tmp[kItemsPerLane];
    constexpr int kVecs = kItemsPerLane * sizeof(T) / kVecBytes;
#pragma unroll
    for (int i = 0; i < kVecs; ++i) reinterpret_cast<uint4*>(tmp)[i] = reinterpret_cast<const uint4*>(row + t)[i];
#pragma unroll
    for (int j = 0; j < kItemsPerLane; ++j) out[j] = to_float(tmp[j]);
  } else {
#pragma unroll
    for (int j = 0; j < kItemsPerLane; ++j) out[j] = t + j < seqlen ? to_float(row[t + j]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store_items(T* row, int t, int seqlen, bool vec, const float (&in)[kItemsPerLane]) {
  if (vec && t + kItemsPerLane <= seqlen) {
    alignas(kVecBytes) T tmp[kItemsPerLane];
#pragma unroll
    for (int j = 0; j < kItemsPerLane; ++j) tmp[j] = from_float<T>(in[j]);
    constexpr int kVecs = kItemsPerLane * sizeof(T) / kVecBytes;
#pragma unroll
    for (int i = 0; i < kVecs; ++i) reinterpret_cast<uint4*>(row + t)[i] = reinterpret_cast<const uint4*>(tmp)[i];
  } else {
#pragma unroll
    for (int j = 0; j < kItemsPerLane; ++j)
      if (t + j < seqlen) row[t + j] = from_float<T>(in[j]);
  }
}

template <typename T>
__device__ __forceinline__ const T* activation_row(const ActivationRef& ref, int b, int d) {
  return static_cast<const T*>(ref.ptr) + b * ref.batch_stride + d * ref.dim_stride;
}

template <typename T>
__device__ __forceinline__ T* activation_row_mut(const ActivationRef& ref, int b, int d) {
  return static_cast<T*>(ref.ptr) + b * ref.batch_stride + d * ref.dim_stride;
}

// State n's value of B or C at a lane's steps: a row of the variable (Bt, G, N, L) tensor or the
// invariant (D, N) value broadcast over time.
template <typename T>
__device__ __forceinline__ void load_projection(const ProjectionRef& ref, int b, int d, int n, int dstate, int t,
                                                int seqlen, float (&out)[kItemsPerLane]) {
  if (ref.variable) {
    const int g = d / ref.channels_per_group;
    const T* row = static_cast<const T*>(ref.ptr) + b * ref.batch_stride + g * ref.group_stride + n * ref.state_stride;
    load_items<T>(row, t, seqlen, ref.vec, out);
  } else {
    const float v = static_cast<const float*>(ref.ptr)[d * dstate + n];
#pragma unroll
    for (int j = 0; j < kItemsPerLane; ++j) out[j] = v;
  }
}

// What one kept state contributes to a lane's steps: its index, A and B/C values. Loaded one state
// ahead of its use, so the (L2-latency) loads of state k+1 overlap the scan of state k.
struct StateOperands {
  int n;
  float A;
  float B[kItemsPerLane];
  float C[kItemsPerLane];
};

template <typename T>
__device__ __forceinline__ void load_state(const ScanFwdParams& p, int b, int d, const int32_t* kept, int k, int t,
                                           StateOperands& s) {
  s.n = kept ? kept[k] : k;
  s.A = p.A[static_cast<int64_t>(d) * p.dstate + s.n];
  load_projection<T>(p.B, b, d, s.n, p.dstate, t, p.seqlen, s.B);
  load_projection<T>(p.C, b, d, s.n, p.dstate, t, p.seqlen, s.C);
}

}  // namespace cuda
}  // namespace compressm
