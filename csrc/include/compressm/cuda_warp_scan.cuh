// Warp-level scans and reductions for the CUDA selective scan (device code only).
//
// The scan pairs are the recurrence h <- a*h + b written as affine maps; composing "first, then second"
// gives (a1*a2, a2*b1 + b2) (MATH.md §1). A warp scans 32 lanes' pairs with shuffles; the reverse scan
// (backward pass) runs the same combine in descending lane order.
#pragma once

#include <cuda_runtime.h>

namespace compressm {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;

struct AffinePair {
  float a;
  float b;
};

// Apply `first`, then `second`.
__device__ __forceinline__ AffinePair compose(AffinePair first, AffinePair second) {
  return {first.a * second.a, fmaf(second.a, first.b, second.b)};
}

template <bool kReverse>
__device__ __forceinline__ float shfl_from_earlier(float v, int offset) {
  // "Earlier" in processing order: lower lanes forward, higher lanes in reverse.
  return kReverse ? __shfl_down_sync(kFullMask, v, offset) : __shfl_up_sync(kFullMask, v, offset);
}

// Exclusive scan of one affine pair per lane, started from the value `carry_in`.
// Processing order is lane 0..31 (forward) or lane 31..0 (kReverse). Returns the value entering this
// lane's segment; `carry_out` (the same in every lane) is the value leaving the whole warp.
template <bool kReverse>
__device__ __forceinline__ float warp_exclusive_scan(AffinePair v, float carry_in, float& carry_out) {
  const int lane = threadIdx.x % kWarpSize;
  const int pos = kReverse ? kWarpSize - 1 - lane : lane;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const AffinePair earlier{shfl_from_earlier<kReverse>(v.a, offset), shfl_from_earlier<kReverse>(v.b, offset)};
    if (pos >= offset) v = compose(earlier, v);
  }
  const int last = kReverse ? 0 : kWarpSize - 1;
  carry_out = fmaf(__shfl_sync(kFullMask, v.a, last), carry_in, __shfl_sync(kFullMask, v.b, last));
  const float prev_a = shfl_from_earlier<kReverse>(v.a, 1);
  const float prev_b = shfl_from_earlier<kReverse>(v.b, 1);
  return pos == 0 ? carry_in : fmaf(prev_a, carry_in, prev_b);
}

// Sum over the warp; every lane gets the result.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

}  // namespace cuda
}  // namespace compressm
