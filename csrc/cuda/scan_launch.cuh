// Kernel launchers, included only by the generated instantiation files (kept apart from the kernels so
// host-only code, e.g. tests/cuda_emulation, can include the kernels without CUDA's launch syntax).
#pragma once

#include "scan_bwd_kernel.cuh"
#include "scan_fwd_kernel.cuh"

namespace compressm {
namespace cuda {

template <typename T>
void launch_scan_fwd(const ScanFwdParams& params, cudaStream_t stream) {
  scan_fwd_kernel<T><<<scan_grid(params), scan_block(params), fwd_smem_bytes(params), stream>>>(params);
}

template <typename T>
void launch_scan_bwd(const ScanBwdParams& params, cudaStream_t stream) {
  scan_bwd_kernel<T><<<scan_grid(params), scan_block(params), bwd_smem_bytes(params), stream>>>(params);
}

}  // namespace cuda
}  // namespace compressm
