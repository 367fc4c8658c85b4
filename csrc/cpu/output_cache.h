// Memory for the CPU kernels' large outputs, from a cache of the blocks freed by earlier outputs.
//
// Why: a training loop frees a step's activations and gradients, and glibc then hands the top of its heap back
// to the OS (its trim threshold follows its mmap threshold, a few MB), so the next step's outputs fault in fresh
// zeroed pages. On a 2-CPU VM a fault cost ~1.7 µs per 4 KB page: a third of a Bt 2, D 1024, L 512, N = 8 backward
// (9.1 against 6.1 ms with MALLOC_TRIM_THRESHOLD_ raised). Blocks of this cache are reused instead (at their
// size, or by an output of up to half less), as a GPU caching allocator does, and the cache holds at most a
// bounded amount of idle memory (COMPRESSM_CPU_CACHE_MB).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace compressm::cpu {

// at::empty with the cache's memory (contiguous; small tensors come from torch's own allocator).
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

struct OutputCacheInfo {
  int64_t live_bytes;  // in tensors now
  int64_t idle_bytes, idle_blocks;  // cached for reuse
  int64_t limit_bytes, hits, misses;
};
OutputCacheInfo output_cache_info();

// Frees every idle block (torch.cuda.empty_cache's counterpart); blocks in use return to the cache when freed.
void empty_output_cache();

}  // namespace compressm::cpu
