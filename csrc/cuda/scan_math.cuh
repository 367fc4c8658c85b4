// Pointwise math of the selective scan shared by the CUDA forward and backward kernels.
#pragma once

#include <cuda_runtime.h>

namespace compressm {
namespace cuda {

// torch.nn.functional.softplus with its default threshold (linear above 20).
constexpr float kSoftplusThreshold = 20.f;

// delta + bias, through softplus if requested.
__device__ __forceinline__ float scan_delta(float raw, float bias, bool softplus) {
  const float x = raw + bias;
  return softplus && x <= kSoftplusThreshold ? log1pf(__expf(x)) : x;
}

// d scan_delta / d raw from dt = scan_delta(raw): softplus' = sigmoid(x) = 1 - exp(-softplus(x)), which
// needs no copy of raw (and is 1 to fp32 precision above the threshold, where dt = x > 20).
__device__ __forceinline__ float scan_delta_grad(float dt, bool softplus) { return softplus ? -expm1f(-dt) : 1.f; }

// exp(dt * A) via exp2 with A pre-scaled by log2(e).
__device__ __forceinline__ float step_decay(float dt, float A) { return exp2f(dt * (A * 1.4426950408889634f)); }

__device__ __forceinline__ float silu(float x) { return x / (1.f + __expf(-x)); }

__device__ __forceinline__ float silu_grad(float x) {
  const float sig = 1.f / (1.f + __expf(-x));
  return sig * (1.f + x * (1.f - sig));
}

}  // namespace cuda
}  // namespace compressm
