// Parameters of the CUDA selective-scan kernels: raw pointers and element strides, no torch types,
// so the .cu files compile without torch's headers (minutes per file under nvcc otherwise).
//
// Layouts (L is unit-stride everywhere):
//   u, delta, z, out, dout, du, ddelta, dz  (Bt, D, L)          strides batch/dim
//   B, C variable (Bt, G, N, L)  (G = 1 for (Bt, N, L))        strides batch/group/state
//   B, C invariant, A, dA (D, N) contiguous fp32;  D, delta_bias (D,) fp32
//   ranks/kept int32 from masks.mask_to_ranks: (1,)/(N,) for a shared mask or (D,)/(D, N) per channel;
//     both null = every state kept. kept rows list the kept states first.
//   carries (Bt, D, n_chunks, N) fp32 contiguous: h at the end of every chunk of kChunk steps
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace compressm {
namespace cuda {

constexpr int kItemsPerLane = 8;                   // consecutive time steps one lane scans serially
constexpr int kChunk = 32 * kItemsPerLane;         // time steps one warp (one channel) scans at once
constexpr int kMaxDstate = 256;
constexpr int kMaxChannelsPerBlock = 4;            // one warp per channel

enum class ScalarType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A (Bt, D, L) activation (or its gradient); `vec` = row starts are 16-byte aligned.
struct ActivationRef {
  void* ptr = nullptr;
  int64_t batch_stride = 0;
  int64_t dim_stride = 0;
  bool vec = false;
};

// B or C: variable (Bt, G, N, L) in the activation dtype, or invariant (D, N) fp32.
struct ProjectionRef {
  const void* ptr = nullptr;
  bool variable = false;
  int channels_per_group = 1;  // D / G
  int64_t batch_stride = 0;
  int64_t group_stride = 0;
  int64_t state_stride = 0;
  bool vec = false;
};

struct ScanFwdParams {
  int batch = 0, dim = 0, seqlen = 0, dstate = 0, n_chunks = 0;
  int channels_per_block = 1;  // divides D and D / G of variable B/C
  bool delta_softplus = false;

  ActivationRef u, delta, z, out;  // z.ptr null = no gate
  ProjectionRef B, C;
  const float* A = nullptr;
  const float* D = nullptr;           // may be null
  const float* delta_bias = nullptr;  // may be null
  const int32_t* ranks = nullptr;     // may be null (with kept)
  const int32_t* kept = nullptr;
  bool per_channel_ranks = false;     // ranks (D,) / kept (D, N); else one shared row
  float* carries = nullptr;
};

struct ScanBwdParams : ScanFwdParams {
  ActivationRef dout, du, ddelta, dz;  // dz.ptr null iff z.ptr null
  const float* dlast = nullptr;        // (Bt, D, N) gradient of the last state, may be null
  float* dA = nullptr;                 // (D, N), zero-initialised (accumulated with atomics)
  float* dB = nullptr;                 // fp32, B's shape, zero-initialised
  float* dC = nullptr;
  float* dD = nullptr;                 // (D,) or null
  float* ddelta_bias = nullptr;        // (D,) or null
};

// Channel d's kept-state count (clamped to [0, N], so a bad rank cannot index out of bounds) and list.
__host__ __device__ inline int channel_rank(const ScanFwdParams& p, int d) {
  if (!p.ranks) return p.dstate;
  const int r = p.ranks[p.per_channel_ranks ? d : 0];
  return r < 0 ? 0 : (r > p.dstate ? p.dstate : r);
}
__host__ __device__ inline const int32_t* channel_kept(const ScanFwdParams& p, int d) {
  return p.kept ? p.kept + (p.per_channel_ranks ? static_cast<int64_t>(d) * p.dstate : 0) : nullptr;
}

// Launch geometry: one warp per channel, channels_per_block channels per block, batch on grid.y.
inline dim3 scan_grid(const ScanFwdParams& p) { return dim3(p.dim / p.channels_per_block, p.batch); }
inline dim3 scan_block(const ScanFwdParams& p) { return dim3(p.channels_per_block * 32); }

// With shared kept states, up to kMaxChannelsPerBlock channels (all in one group of B and of C, so the
// block can sum their dB/dC); with per-channel ranks one channel per block, so a channel with a small
// rank never waits for a longer one in its block. Call after B, C and per_channel_ranks are set.
inline int pick_channels_per_block(const ScanFwdParams& p) {
  if (p.per_channel_ranks) return 1;
  const int group_B = p.B.variable ? p.B.channels_per_group : p.dim;
  const int group_C = p.C.variable ? p.C.channels_per_group : p.dim;
  for (int cpb = kMaxChannelsPerBlock; cpb > 1; cpb /= 2)
    if (group_B % cpb == 0 && group_C % cpb == 0) return cpb;
  return 1;
}

template <typename T>
void launch_scan_fwd(const ScanFwdParams& params, cudaStream_t stream);
template <typename T>
void launch_scan_bwd(const ScanBwdParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace compressm
