// Runs csrc/cuda's forward and backward kernels on the CPU through the stand-in CUDA headers in this
// folder (a thread per CUDA thread, a block at a time), behind a C API for ctypes. Tensors are
// contiguous; the params are filled as the binding fills them. Built and driven by
// tests/test_cuda_kernels_emulated.py.
#include <cmath>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "scan_bwd_kernel.cuh"
#include "scan_fwd_kernel.cuh"

namespace compressm {
namespace cuda {
// The kernels' `extern __shared__` arrays: one block runs at a time, so one buffer each.
constexpr size_t kMaxSmemFloats = 48 * 1024 / sizeof(float);
float fwd_smem[kMaxSmemFloats];
float bwd_smem[kMaxSmemFloats];
}  // namespace cuda
}  // namespace compressm

namespace {

using namespace compressm::cuda;

// Runs kernel() as every thread of every block; shared memory starts as NaN so a read before a write shows.
template <typename Kernel>
int run_grid(Kernel kernel, dim3 grid, dim3 block, size_t smem_bytes, float* smem) {
  if (smem_bytes > sizeof(float) * kMaxSmemFloats || block.x % emu::kWarp != 0) return 1;
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      for (size_t i = 0; i < smem_bytes / sizeof(float); ++i) smem[i] = std::numeric_limits<float>::quiet_NaN();
      std::barrier<> block_barrier(block.x);
      std::unique_ptr<emu::Warp[]> warps(new emu::Warp[block.x / emu::kWarp]);
      std::vector<std::thread> threads;
      for (unsigned t = 0; t < block.x; ++t) {
        threads.emplace_back([&, t] {
          emu::thread_idx = {t, 0, 0};
          emu::block_idx = {bx, by, 0};
          emu::block_dim = block;
          emu::warp = &warps[t / emu::kWarp];
          emu::block_barrier = &block_barrier;
          kernel();
        });
      }
      for (auto& th : threads) th.join();
    }
  }
  return 0;
}

ActivationRef activation(const void* ptr, int dim, int seqlen, size_t elem) {
  ActivationRef ref;
  ref.ptr = const_cast<void*>(ptr);
  ref.batch_stride = static_cast<int64_t>(dim) * seqlen;
  ref.dim_stride = seqlen;
  ref.vec = ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && seqlen % (16 / elem) == 0;
  return ref;
}

// groups == 0: time-invariant (D, N) fp32; else variable (Bt, groups, N, L).
ProjectionRef projection(const void* ptr, int groups, int dim, int dstate, int seqlen, size_t elem) {
  ProjectionRef ref;
  ref.ptr = ptr;
  if (groups == 0) return ref;
  ref.variable = true;
  ref.channels_per_group = dim / groups;
  ref.state_stride = seqlen;
  ref.group_stride = static_cast<int64_t>(dstate) * seqlen;
  ref.batch_stride = groups * ref.group_stride;
  ref.vec = reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && seqlen % (16 / elem) == 0;
  return ref;
}

template <typename T>
int scan(const int* sizes, const void* const* ins, void* const* outs, int B_groups, int C_groups, int per_channel,
         int softplus) {
  const int batch = sizes[0], dim = sizes[1], seqlen = sizes[2], dstate = sizes[3];
  ScanBwdParams p;
  p.batch = batch;
  p.dim = dim;
  p.seqlen = seqlen;
  p.dstate = dstate;
  p.n_chunks = (seqlen + kChunk - 1) / kChunk;
  p.delta_softplus = softplus != 0;
  p.u = activation(ins[0], dim, seqlen, sizeof(T));
  p.delta = activation(ins[1], dim, seqlen, sizeof(T));
  p.z = ins[2] ? activation(ins[2], dim, seqlen, sizeof(T)) : ActivationRef{};
  p.A = static_cast<const float*>(ins[3]);
  p.B = projection(ins[4], B_groups, dim, dstate, seqlen, sizeof(T));
  p.C = projection(ins[5], C_groups, dim, dstate, seqlen, sizeof(T));
  p.D = static_cast<const float*>(ins[6]);
  p.delta_bias = static_cast<const float*>(ins[7]);
  p.ranks = static_cast<const int32_t*>(ins[8]);
  p.kept = static_cast<const int32_t*>(ins[9]);
  p.per_channel_ranks = per_channel != 0;
  p.channels_per_block = pick_channels_per_block(p);
  p.out = activation(outs[0], dim, seqlen, sizeof(T));
  p.carries = static_cast<float*>(outs[1]);
  const ScanFwdParams& fwd = p;
  if (int rc = run_grid([&] { scan_fwd_kernel<T>(fwd); }, scan_grid(p), scan_block(p), fwd_smem_bytes(p), fwd_smem)) {
    return rc;
  }
  if (ins[10] == nullptr) return 0;  // no dout: forward only
  p.dout = activation(ins[10], dim, seqlen, sizeof(T));
  p.dlast = static_cast<const float*>(ins[11]);
  p.du = activation(outs[2], dim, seqlen, sizeof(T));
  p.ddelta = activation(outs[3], dim, seqlen, sizeof(T));
  p.dz = outs[4] ? activation(outs[4], dim, seqlen, sizeof(T)) : ActivationRef{};
  p.dA = static_cast<float*>(outs[5]);
  p.dB = static_cast<float*>(outs[6]);
  p.dC = static_cast<float*>(outs[7]);
  p.dD = static_cast<float*>(outs[8]);
  p.ddelta_bias = static_cast<float*>(outs[9]);
  return run_grid([&] { scan_bwd_kernel<T>(p); }, scan_grid(p), scan_block(p), bwd_smem_bytes(p), bwd_smem);
}

}  // namespace

// sizes: (Bt, D, L, N). ins: u, delta, z, A, B, C, D, delta_bias, ranks, kept, dout, dlast (null = absent).
// outs: out, carries, du, ddelta, dz, dA, dB, dC, dD, ddelta_bias (gradients zero-initialised by the caller).
// dtype: 0 float32, 1 float16, 2 bfloat16. Returns 0 on success.
extern "C" int emulate_scan(int dtype, const int* sizes, const void* const* ins, void* const* outs, int B_groups,
                            int C_groups, int per_channel, int softplus) {
  switch (dtype) {
    case 0: return scan<float>(sizes, ins, outs, B_groups, C_groups, per_channel, softplus);
    case 1: return scan<__half>(sizes, ins, outs, B_groups, C_groups, per_channel, softplus);
    case 2: return scan<__nv_bfloat16>(sizes, ins, outs, B_groups, C_groups, per_channel, softplus);
    default: return 2;
  }
}
