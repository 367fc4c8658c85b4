// Host stand-in for <cuda_runtime.h>, so tests can run csrc/cuda's kernels on a CPU: one std::thread per
// CUDA thread, warp shuffles and barriers as std::barrier rendezvous. Covers only what those kernels use;
// it checks the kernels' indexing, scans and reductions, not GPU timing or the GPU memory model.
#pragma once

#include <math.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
using cudaStream_t = void*;

namespace emu {

constexpr int kWarp = 32;

struct Warp {
  std::barrier<> barrier{kWarp};
  float slot[kWarp];
};

inline thread_local uint3 thread_idx, block_idx;
inline thread_local dim3 block_dim;
inline thread_local Warp* warp = nullptr;
inline thread_local std::barrier<>* block_barrier = nullptr;

// Every lane publishes v, then reads lane src's value (its own if src is out of range, as CUDA does).
inline float exchange(float v, int src) {
  const int lane = static_cast<int>(thread_idx.x) % kWarp;
  warp->slot[lane] = v;
  warp->barrier.arrive_and_wait();
  const float got = (src >= 0 && src < kWarp) ? warp->slot[src] : v;
  warp->barrier.arrive_and_wait();
  return got;
}

inline int lane_id() { return static_cast<int>(thread_idx.x) % kWarp; }

}  // namespace emu

#define threadIdx ::emu::thread_idx
#define blockIdx ::emu::block_idx
#define blockDim ::emu::block_dim

inline float __shfl_sync(unsigned, float v, int src) { return emu::exchange(v, src); }
inline float __shfl_up_sync(unsigned, float v, int d) { return emu::exchange(v, emu::lane_id() - d); }
inline float __shfl_down_sync(unsigned, float v, int d) { return emu::exchange(v, emu::lane_id() + d); }
inline float __shfl_xor_sync(unsigned, float v, int m) { return emu::exchange(v, emu::lane_id() ^ m); }
inline void __syncwarp() { emu::warp->barrier.arrive_and_wait(); }
inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline float __expf(float x) { return std::exp(x); }
inline float atomicAdd(float* address, float v) { return std::atomic_ref<float>(*address).fetch_add(v); }
