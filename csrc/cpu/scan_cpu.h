// Parameters of the C++ CPU kernels: raw pointers, strides in elements, dtype tags. No torch headers, so the
// kernel files compile in seconds; bindings.cpp fills these from tensors and checks them.
#pragma once

#include <cstdint>

namespace compressm::cpu {

enum class DType : int32_t { f32 = 0, f16 = 1, bf16 = 2 };

// One activation tensor: data, dtype and its strides (the L / state axis is unit-stride unless noted).
struct Operand {
  const void* data = nullptr;
  DType dtype = DType::f32;
  int64_t stride0 = 0, stride1 = 0, stride2 = 0;  // meaning given where used
};

// Selective scan forward/backward (MATH.md §1). Shapes: u, delta, z, dout (Bt, D, L) with strides
// (stride0 = batch, stride1 = channel); B/C variable (Bt, G, N, L) with strides (batch, group, state) or
// time-invariant (D, N) fp32 with strides (channel, state); A (D, N), D/delta_bias (D,) contiguous fp32.
struct ScanParams {
  int batch = 0, dim = 0, seqlen = 0, dstate = 0;
  int groups_b = 1, groups_c = 1;  // groups of variable B / C (1 for (Bt, N, L))
  bool b_variable = true, c_variable = true, delta_softplus = false;
  int chunk = 64;  // steps per chunk; carries are saved at chunk ends
  int num_threads = 1;

  Operand u, delta, z, B, C;
  const float* A = nullptr;
  const float* D = nullptr;           // optional
  const float* delta_bias = nullptr;  // optional
  const int32_t* ranks = nullptr;     // optional (D,): kept states per channel
  const int32_t* kept = nullptr;      // (D, N): kept state indices first (see masks.mask_to_ranks)

  // forward outputs
  void* out = nullptr;          // (Bt, D, L) contiguous, u's dtype
  float* carries = nullptr;     // (Bt, D, n_chunks, N) contiguous: h at the end of each chunk

  // backward inputs / outputs (contiguous; gradients in their input's dtype, dA/dD/ddelta_bias fp32)
  Operand dout;                  // (Bt, D, L)
  const float* dlast = nullptr;  // optional (Bt, D, N) contiguous: gradient of the last state
  void* du = nullptr;
  void* ddelta = nullptr;
  void* dz = nullptr;            // when z is given
  float* dA = nullptr;
  void* dB = nullptr;            // variable: (Bt, G, N, L) in B's dtype; invariant: (D, N) fp32
  void* dC = nullptr;
  float* dD = nullptr;           // when D is given
  float* ddelta_bias = nullptr;  // when delta_bias is given

  int n_chunks() const { return (seqlen + chunk - 1) / chunk; }
  // The longest chunk a call runs: its per-thread scratch rows are this long, not `chunk` (1024 at N <= 8).
  int chunk_steps() const { return chunk < seqlen ? chunk : seqlen; }
};

void scan_fwd(const ScanParams& p);
void scan_bwd(const ScanParams& p);

// One decode step, state updated in place. state (Bt, D, N) any strides (stride0/1/2), its own dtype;
// x, dt, z (Bt, D) strides (batch, channel); B, C (Bt, G, N) strides (batch, group, state).
struct StateUpdateParams {
  int batch = 0, dim = 0, dstate = 0, groups_b = 1, groups_c = 1;
  bool dt_softplus = false;
  int num_threads = 1;
  void* state = nullptr;
  DType state_dtype = DType::f32;
  int64_t state_stride0 = 0, state_stride1 = 0, state_stride2 = 1;
  Operand x, dt, z, B, C;
  const float* A = nullptr;   // (D, N) contiguous, or (D,) with shared_decay
  bool shared_decay = false;  // each channel's states share one A (Mamba-2's heads): ā computed once per channel
  const float* D = nullptr;
  const float* dt_bias = nullptr;
  // Mamba-2's heads of `headdim` channels: dt ((Bt, H) operand), D, dt_bias and, with shared_decay, A ((H,)) may
  // hold one value per head, which channel d reads at d / headdim (mamba_ssm passes them expanded per head).
  int headdim = 1;
  bool dt_per_head = false, D_per_head = false, dt_bias_per_head = false, A_per_head = false;
  const int32_t* ranks = nullptr;
  const int32_t* kept = nullptr;
  void* out = nullptr;  // (Bt, D) contiguous, x's dtype
};

void state_update(const StateUpdateParams& p);

// Mamba's short causal depthwise convolution, forward and backward (MATH.md §1's u = silu(conv(x))):
//   pre[b, d, t] = bias[d] + Σ_k weight[d, k] · x[b, d, t - (W - 1) + k]   (x = 0 before t = 0)
//   out = silu(pre) with `silu`, else pre.
// x, dout (Bt, D, L) strides (batch, channel), unit along L; weight (D, W) and bias (D,) contiguous fp32.
struct Conv1dParams {
  int batch = 0, dim = 0, seqlen = 0, width = 0;
  bool silu = false;
  int num_threads = 1;
  Operand x;
  const float* weight = nullptr;
  const float* bias = nullptr;  // optional
  void* out = nullptr;          // forward: (Bt, D, L) contiguous, x's dtype
  Operand dout;                 // backward
  void* dx = nullptr;           // (Bt, D, L) contiguous, x's dtype
  float* dweight = nullptr;     // (D, W)
  float* dbias = nullptr;       // (D,), when bias is given
};

void conv1d_fwd(const Conv1dParams& p);
void conv1d_bwd(const Conv1dParams& p);

// One decode step of that conv: out[b, d] = act(bias[d] + Σ_{k < W-1} weight[d, k] · state[b, d, S-W+1+k] +
// weight[d, W-1] · x[b, d]); then state[b, d, :] shifts left by one with x[b, d] appended (S ≥ W - 1 inputs kept).
// x (Bt, D) strides (batch, channel); state (Bt, D, S) strides state_stride0/1/2, its own dtype.
struct Conv1dUpdateParams {
  int batch = 0, dim = 0, width = 0, keep = 0;  // keep = S
  bool silu = false;
  Operand x;
  void* state = nullptr;
  DType state_dtype = DType::f32;
  int64_t state_stride0 = 0, state_stride1 = 0, state_stride2 = 1;
  const float* weight = nullptr;  // (D, W) contiguous fp32
  const float* bias = nullptr;    // optional (D,)
  void* out = nullptr;            // (Bt, D) contiguous, x's dtype
};

void conv1d_update(const Conv1dUpdateParams& p);

// The loops the kernels run: "avx2+fma" or "baseline" (x86-64 without them, or COMPRESSM_CPU_BASELINE=1).
const char* isa();

}  // namespace compressm::cpu
