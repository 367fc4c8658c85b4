// compressm_kernels._C: the tensor side of the CPU kernels (checks, allocation, params). With output_cache.cpp,
// the only file that includes torch's headers; the kernels take raw pointers (scan_cpu.h).
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>

#include "output_cache.h"
#include "scan_cpu.h"

namespace {

// Each OpenMP region can wait a scheduler timeslice for its threads on a busy machine: a scan with less
// than this many state-steps per thread (~100 µs of work) runs faster on one thread.
constexpr int64_t kMinStepsPerThread = int64_t{1} << 17;

int scan_threads(int64_t state_steps) {
  const int64_t useful = state_steps / kMinStepsPerThread;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(useful, at::get_num_threads())));
}

using compressm::cpu::DType;
using compressm::cpu::Operand;
using Tensor = at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr int64_t kMaxState = 256;
constexpr int64_t kMaxChunk = 1024;  // selective_scan_cpu.cpp's

std::string shape_of(const Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + ")";
}

DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    default: TORCH_CHECK_TYPE(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return DType::f32;
}

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

// A tensor the kernel updates in place: an expand()ed one (stride 0 along an axis longer than 1) would have several
// channels, and threads, writing the same memory.
void check_writable(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
                    " is updated in place but has overlapping memory (an expand()ed tensor?), strides ", t.strides(),
                    "; pass a clone()");
}

// A float32 parameter of the given shape, made contiguous.
Tensor param(const Tensor& t, const char* name, at::IntArrayRef shape) {
  check_cpu(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", shape_of(t));
  return t.contiguous();
}

const float* opt_param(const OptTensor& t, const char* name, at::IntArrayRef shape, OptTensor& keep) {
  if (!t.has_value()) return nullptr;
  keep = param(*t, name, shape);
  return keep->data_ptr<float>();
}

// (Bt, D, L) activation with a unit-stride L axis.
Operand activation(const Tensor& t, const char* name, int64_t batch, int64_t dim, int64_t seqlen) {
  check_cpu(t, name);
  TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == batch && t.size(1) == dim && t.size(2) == seqlen, name,
              " must have shape (Bt, D, L) = (", batch, ", ", dim, ", ", seqlen, "), got ", shape_of(t));
  TORCH_CHECK_VALUE(seqlen == 1 || t.stride(2) == 1, name, " must be unit-stride along L, got strides ", t.strides());
  return {t.data_ptr(), dtype_of(t, name), t.stride(0), t.stride(1), 0};
}

// B or C: variable (Bt, N, L) / grouped (Bt, G, N, L) (activation dtype, unit-stride L) or time-invariant
// (D, N) float32. Returns the operand (strides batch, group, state / channel, state) and the group count.
std::pair<Operand, int> bc_operand(const Tensor& t, const char* name, int64_t batch, int64_t dim, int64_t seqlen,
                                   int64_t dstate) {
  check_cpu(t, name);
  if (t.dim() == 2) {
    TORCH_CHECK_VALUE(t.size(0) == dim && t.size(1) == dstate, name, " (time-invariant) must have shape (D, N) = (",
                      dim, ", ", dstate, "), got ", shape_of(t));
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " (time-invariant) must be float32, got ", t.scalar_type());
    return {{t.data_ptr(), DType::f32, t.stride(0), t.stride(1), 0}, 1};
  }
  const bool grouped = t.dim() == 4;
  const int64_t groups = grouped ? t.size(1) : 1;
  TORCH_CHECK_VALUE((t.dim() == 3 || grouped) && t.size(0) == batch && groups >= 1 && dim % groups == 0 &&
                  t.size(-2) == dstate && t.size(-1) == seqlen,
              name, " must have shape (D, N), (Bt, N, L) or (Bt, G, N, L) with Bt=", batch, ", N=", dstate, ", L=",
              seqlen, " and G dividing D=", dim, ", got ", shape_of(t));
  TORCH_CHECK_VALUE(seqlen == 1 || t.stride(-1) == 1, name, " must be unit-stride along L, got strides ", t.strides());
  return {{t.data_ptr(), dtype_of(t, name), t.stride(0), grouped ? t.stride(1) : 0, t.stride(-2)},
          static_cast<int>(groups)};
}

// Everything forward and backward share: shapes, parameters, B/C, z, mask ranks.
struct ScanSetup {
  compressm::cpu::ScanParams p;
  Tensor A, D, delta_bias, ranks, kept;  // contiguous copies the params point into
};

ScanSetup setup_scan(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                     const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias, const OptTensor& ranks,
                     const OptTensor& kept, bool delta_softplus, int64_t chunk) {
  ScanSetup s;
  auto& p = s.p;
  check_cpu(u, "u");
  TORCH_CHECK_VALUE(u.dim() == 3, "u must have shape (Bt, D, L), got ", shape_of(u));
  TORCH_CHECK_VALUE(A.dim() == 2, "A must have shape (D, N), got ", shape_of(A));
  const int64_t batch = u.size(0), dim = u.size(1), seqlen = u.size(2), dstate = A.size(1);
  TORCH_CHECK_VALUE(batch >= 1 && dim >= 1 && seqlen >= 1, "u must be non-empty, got ", shape_of(u));
  TORCH_CHECK_VALUE(dstate >= 1 && dstate <= kMaxState, "A must have 1 <= N <= ", kMaxState, " states, got N=", dstate);
  // The kernels keep a chunk's per-step sums on the stack: at most kMaxChunk (= chunk_size's largest) steps.
  TORCH_CHECK_VALUE(chunk >= 1 && chunk <= kMaxChunk, "chunk must lie in [1, ", kMaxChunk, "], got ", chunk);
  p.batch = batch, p.dim = dim, p.seqlen = seqlen, p.dstate = dstate;
  p.chunk = static_cast<int>(chunk);
  p.delta_softplus = delta_softplus;
  p.num_threads = scan_threads(batch * dim * seqlen * dstate);
  p.u = activation(u, "u", batch, dim, seqlen);
  p.delta = activation(delta, "delta", batch, dim, seqlen);
  s.A = param(A, "A", {dim, dstate});
  p.A = s.A.data_ptr<float>();
  std::tie(p.B, p.groups_b) = bc_operand(B, "B", batch, dim, seqlen, dstate);
  std::tie(p.C, p.groups_c) = bc_operand(C, "C", batch, dim, seqlen, dstate);
  p.b_variable = B.dim() != 2;
  p.c_variable = C.dim() != 2;
  OptTensor keep;
  p.D = opt_param(D, "D", {dim}, keep);
  if (keep) s.D = *keep;
  keep.reset();
  p.delta_bias = opt_param(delta_bias, "delta_bias", {dim}, keep);
  if (keep) s.delta_bias = *keep;
  if (z.has_value()) p.z = activation(*z, "z", batch, dim, seqlen);
  TORCH_CHECK_VALUE(ranks.has_value() == kept.has_value(), "ranks and kept must be given together");
  if (ranks.has_value()) {
    check_cpu(*ranks, "ranks");
    check_cpu(*kept, "kept");
    TORCH_CHECK_TYPE(ranks->scalar_type() == at::kInt && kept->scalar_type() == at::kInt,
                     "ranks and kept must be int32");
    TORCH_CHECK_VALUE(ranks->sizes() == at::IntArrayRef({dim}) && kept->sizes() == at::IntArrayRef({dim, dstate}),
                "ranks must have shape (D,) and kept (D, N) = (", dim, ", ", dstate, "), got ", shape_of(*ranks),
                " and ", shape_of(*kept));
    s.ranks = ranks->contiguous();
    s.kept = kept->contiguous();
    const auto lo = s.ranks.min().item<int32_t>(), hi = s.ranks.max().item<int32_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi <= dstate, "ranks must lie in [0, N=", dstate, "], got [", lo, ", ", hi, "]");
    const auto kmin = s.kept.min().item<int32_t>(), kmax = s.kept.max().item<int32_t>();
    TORCH_CHECK_VALUE(kmin >= 0 && kmax < dstate, "kept must hold state indices in [0, N=", dstate, ")");
    p.ranks = s.ranks.data_ptr<int32_t>();
    p.kept = s.kept.data_ptr<int32_t>();
  }
  return s;
}

std::tuple<Tensor, Tensor> scan_fwd(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                                    const Tensor& C, const OptTensor& D, const OptTensor& z,
                                    const OptTensor& delta_bias, const OptTensor& ranks, const OptTensor& kept,
                                    bool delta_softplus, int64_t chunk) {
  ScanSetup s = setup_scan(u, delta, A, B, C, D, z, delta_bias, ranks, kept, delta_softplus, chunk);
  auto& p = s.p;
  Tensor out = compressm::cpu::empty_output(u.sizes(), u.options());
  Tensor carries =
      compressm::cpu::empty_output({p.batch, p.dim, p.n_chunks(), p.dstate}, u.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.carries = carries.data_ptr<float>();
  compressm::cpu::scan_fwd(p);
  return {out, carries};
}

// Returns du, ddelta, dA, dB, dC, dD, dz, ddelta_bias; absent inputs get empty (0-element) gradients.
std::vector<Tensor> scan_bwd(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                             const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias,
                             const OptTensor& ranks, const OptTensor& kept, bool delta_softplus, int64_t chunk,
                             const Tensor& carries, const Tensor& dout, const OptTensor& dlast) {
  ScanSetup s = setup_scan(u, delta, A, B, C, D, z, delta_bias, ranks, kept, delta_softplus, chunk);
  auto& p = s.p;
  const int64_t batch = p.batch, dim = p.dim, dstate = p.dstate;
  Tensor carries_c = param(carries, "carries", {batch, dim, p.n_chunks(), dstate});
  p.carries = carries_c.data_ptr<float>();
  p.dout = activation(dout, "dout", batch, dim, p.seqlen);
  Tensor dlast_c;
  if (dlast.has_value()) {
    dlast_c = param(*dlast, "dlast", {batch, dim, dstate});
    p.dlast = dlast_c.data_ptr<float>();
  }
  const auto f32 = u.options().dtype(at::kFloat);
  auto grad_of = [&](const Tensor& t) { return compressm::cpu::empty_output(t.sizes(), t.options()); };
  Tensor du = grad_of(u);
  Tensor ddelta = grad_of(delta);
  Tensor dA = at::empty({dim, dstate}, f32);
  Tensor dB = p.b_variable ? grad_of(B) : at::empty({dim, dstate}, f32);
  Tensor dC = p.c_variable ? grad_of(C) : at::empty({dim, dstate}, f32);
  Tensor dD = at::empty({D.has_value() ? dim : 0}, f32);
  Tensor dz = z.has_value() ? grad_of(*z) : at::empty({0}, u.options());
  Tensor ddelta_bias = at::empty({delta_bias.has_value() ? dim : 0}, f32);
  p.du = du.data_ptr();
  p.ddelta = ddelta.data_ptr();
  p.dA = dA.data_ptr<float>();
  p.dB = dB.data_ptr();
  p.dC = dC.data_ptr();
  p.dD = D.has_value() ? dD.data_ptr<float>() : nullptr;
  p.dz = z.has_value() ? dz.data_ptr() : nullptr;
  p.ddelta_bias = delta_bias.has_value() ? ddelta_bias.data_ptr<float>() : nullptr;
  compressm::cpu::scan_bwd(p);
  return {du, ddelta, dA, dB, dC, dD, dz, ddelta_bias};
}

// (Bt, D) decode input.
Operand token(const Tensor& t, const char* name, int64_t batch, int64_t dim) {
  check_cpu(t, name);
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == batch && t.size(1) == dim, name, " must have shape (Bt, D) = (", batch,
              ", ", dim, "), got ", shape_of(t));
  return {t.data_ptr(), dtype_of(t, name), t.stride(0), t.stride(1), 0};
}

// The decode step. With headdim > 1 (state_update_heads), dt may be (Bt, H), D and dt_bias (H,) and A (H,): one
// value per head of headdim channels, read by the kernel per head instead of copied out per channel.
Tensor state_update_in_heads(const Tensor& state, const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& B,
                             const Tensor& C, const OptTensor& D, const OptTensor& z, const OptTensor& dt_bias,
                             const OptTensor& ranks, const OptTensor& kept, bool dt_softplus, int64_t headdim) {
  check_cpu(state, "state");
  TORCH_CHECK_VALUE(state.dim() == 3, "state must have shape (Bt, D, N), got ", shape_of(state));
  const int64_t batch = state.size(0), dim = state.size(1), dstate = state.size(2);
  TORCH_CHECK_VALUE(dstate >= 1 && dstate <= kMaxState, "state must have 1 <= N <= ", kMaxState, ", got N=", dstate);
  check_writable(state, "state");
  compressm::cpu::StateUpdateParams p;
  p.batch = batch, p.dim = dim, p.dstate = dstate;
  p.dt_softplus = dt_softplus;
  p.num_threads = at::get_num_threads();
  p.state = state.data_ptr();
  p.state_dtype = dtype_of(state, "state");
  p.state_stride0 = state.stride(0), p.state_stride1 = state.stride(1), p.state_stride2 = state.stride(2);
  const int64_t heads = dim / headdim;
  p.headdim = static_cast<int>(headdim);
  p.x = token(x, "x", batch, dim);
  p.dt_per_head = headdim > 1 && dt.dim() == 2 && dt.size(1) == heads;
  p.dt = token(dt, "dt", batch, p.dt_per_head ? heads : dim);
  if (z.has_value()) p.z = token(*z, "z", batch, dim);
  for (auto [t, name, op, groups] : {std::tuple{&B, "B", &p.B, &p.groups_b}, std::tuple{&C, "C", &p.C, &p.groups_c}}) {
    check_cpu(*t, name);
    const bool grouped = t->dim() == 3;
    const int64_t g = grouped ? t->size(1) : 1;
    const bool ok = (t->dim() == 2 || grouped) && t->size(0) == batch && g >= 1 && dim % g == 0;
    TORCH_CHECK_VALUE(ok && t->size(-1) == dstate, name, " must have shape (Bt, N) or (Bt, G, N) with Bt=", batch,
                      ", N=", dstate, " and G dividing D=", dim, ", got ", shape_of(*t));
    *op = {t->data_ptr(), dtype_of(*t, name), t->stride(0), grouped ? t->stride(1) : 0, t->stride(-1)};
    *groups = static_cast<int>(g);
  }
  // An A expanded along N (Mamba-2's heads pass A so) has one value per channel: the kernel takes that value
  // and computes each channel's decay once instead of once per state.
  p.A_per_head = headdim > 1 && A.dim() == 1;
  p.shared_decay = p.A_per_head || (A.dim() == 2 && A.size(0) == dim && A.size(1) == dstate && dstate > 1 &&
                                    A.stride(1) == 0);
  Tensor A_c = p.A_per_head     ? param(A, "A", {heads})
               : p.shared_decay ? param(A.select(1, 0), "A", {dim})
                                : param(A, "A", {dim, dstate});
  p.A = A_c.data_ptr<float>();
  // As mamba_ssm's step, D and dt_bias may come in a half-precision model's dtype: read as fp32 (exact).
  auto upcast_half = [](const OptTensor& t) -> OptTensor {
    const bool half = t.has_value() && (t->scalar_type() == at::kHalf || t->scalar_type() == at::kBFloat16);
    return half ? OptTensor(t->to(at::kFloat)) : t;
  };
  auto per_head = [&](const OptTensor& t) {
    return headdim > 1 && t.has_value() && t->dim() == 1 && t->size(0) == heads;
  };
  p.D_per_head = per_head(D), p.dt_bias_per_head = per_head(dt_bias);
  OptTensor D_c, bias_c;
  p.D = opt_param(upcast_half(D), "D", {p.D_per_head ? heads : dim}, D_c);
  p.dt_bias = opt_param(upcast_half(dt_bias), "dt_bias", {p.dt_bias_per_head ? heads : dim}, bias_c);
  Tensor ranks_c, kept_c;
  TORCH_CHECK_VALUE(ranks.has_value() == kept.has_value(), "ranks and kept must be given together");
  if (ranks.has_value()) {
    TORCH_CHECK_TYPE(ranks->scalar_type() == at::kInt && kept->scalar_type() == at::kInt,
                     "ranks and kept must be int32");
    TORCH_CHECK_VALUE(ranks->sizes() == at::IntArrayRef({dim}) && kept->sizes() == at::IntArrayRef({dim, dstate}),
                "ranks must have shape (D,) and kept (D, N) = (", dim, ", ", dstate, ")");
    ranks_c = ranks->contiguous();
    kept_c = kept->contiguous();
    p.ranks = ranks_c.data_ptr<int32_t>();
    p.kept = kept_c.data_ptr<int32_t>();
  }
  Tensor out = at::empty({batch, dim}, x.options().memory_format(at::MemoryFormat::Contiguous));
  p.out = out.data_ptr();
  compressm::cpu::state_update(p);
  return out;
}

Tensor state_update(const Tensor& state, const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& B,
                    const Tensor& C, const OptTensor& D, const OptTensor& z, const OptTensor& dt_bias,
                    const OptTensor& ranks, const OptTensor& kept, bool dt_softplus) {
  return state_update_in_heads(state, x, dt, A, B, C, D, z, dt_bias, ranks, kept, dt_softplus, 1);
}

// Mamba-2's multi-head step: state (Bt, H, P, N), x/dt/z (Bt, H, P), A (H, P, N), D/dt_bias (H, P), B/C (Bt, G, N)
// with G dividing H. The heads' channels are flattened into the (Bt, H·P, N) step here rather than in Python, where
// the six reshapes cost more than the step. dt, D, dt_bias and A come expanded per head (stride 0 along P, and N):
// they go to the kernel as one value per head, not copied out per channel (copying them was half of a step at
// N = 64). The state must flatten to a view, as it is updated in place.
Tensor state_update_heads(const Tensor& state, const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& B,
                          const Tensor& C, const OptTensor& D, const OptTensor& z, const OptTensor& dt_bias,
                          bool dt_softplus) {
  check_cpu(state, "state");
  TORCH_CHECK_VALUE(state.dim() == 4, "state must have shape (Bt, H, P, N), got ", shape_of(state));
  const int64_t batch = state.size(0), heads = state.size(1), headdim = state.size(2), dstate = state.size(3);
  const int64_t dim = heads * headdim;
  TORCH_CHECK_VALUE(heads == 1 || headdim == 1 || state.stride(1) == headdim * state.stride(2),
                    "state's heads and head channels must flatten to one axis in place, got strides ", state.strides());
  auto check_shape = [](const Tensor& t, const char* name, at::IntArrayRef shape) {
    check_cpu(t, name);
    TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", shape_of(t));
  };
  // Expanded along the head's channels (stride 0 there): passed on as one value per head, a view.
  const auto per_head = [&](const Tensor& t, int64_t axis) { return headdim > 1 && t.stride(axis) == 0; };
  auto per_token = [&](const Tensor& t, const char* name, bool heads_ok = false) {
    check_shape(t, name, {batch, heads, headdim});
    return heads_ok && per_head(t, 2) ? t.select(2, 0) : t.reshape({batch, dim});
  };
  auto per_channel = [&](const OptTensor& t, const char* name) -> OptTensor {
    if (!t.has_value()) return t;
    check_shape(*t, name, {heads, headdim});
    return per_head(*t, 1) ? t->select(1, 0) : t->reshape({dim});
  };
  for (auto [t, name] : {std::pair{&B, "B"}, std::pair{&C, "C"}}) {
    TORCH_CHECK_VALUE(t->dim() == 3 && t->size(1) >= 1 && heads % t->size(1) == 0 && t->sizes() == B.sizes(), name,
                      " must have shape (Bt, G, N) with G dividing H=", heads, " (B and C alike), got ",
                      shape_of(*t));
  }
  check_shape(A, "A", {heads, headdim, dstate});
  // An A expanded along N stays so (the kernel takes one decay per channel), as one value per head when it is
  // expanded along the head's channels too.
  const bool shared = dstate == 1 || A.stride(2) == 0;
  const Tensor A_flat = shared && per_head(A, 1) ? A.select(2, 0).select(1, 0)
                        : shared && dstate > 1   ? A.select(2, 0).reshape({dim, 1}).expand({dim, dstate})
                                                 : A.reshape({dim, dstate});
  const OptTensor z_flat = z.has_value() ? OptTensor(per_token(*z, "z")) : OptTensor();
  Tensor out = state_update_in_heads(state.view({batch, dim, dstate}), per_token(x, "x"),
                                     per_token(dt, "dt", true), A_flat, B, C, per_channel(D, "D"), z_flat,
                                     per_channel(dt_bias, "dt_bias"), {}, {}, dt_softplus, headdim);
  return out.view({batch, heads, headdim});
}

// Everything the conv's forward and backward share: shapes, x, the weight and bias.
struct Conv1dSetup {
  compressm::cpu::Conv1dParams p;
  Tensor weight, bias;  // contiguous copies the params point into
};

Conv1dSetup setup_conv1d(const Tensor& x, const Tensor& weight, const OptTensor& bias, bool silu) {
  Conv1dSetup s;
  auto& p = s.p;
  check_cpu(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 3 && x.numel() > 0, "x must be a non-empty (Bt, D, L) tensor, got ", shape_of(x));
  const int64_t batch = x.size(0), dim = x.size(1), seqlen = x.size(2);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == dim && weight.size(1) >= 1,
                    "weight must have shape (D, W) with D=", dim, ", got ", shape_of(weight));
  p.batch = batch, p.dim = dim, p.seqlen = seqlen, p.width = weight.size(1);
  p.silu = silu;
  p.num_threads = scan_threads(batch * dim * seqlen * p.width);
  p.x = activation(x, "x", batch, dim, seqlen);
  s.weight = param(weight, "weight", {dim, p.width});
  p.weight = s.weight.data_ptr<float>();
  OptTensor keep;
  p.bias = opt_param(bias, "bias", {dim}, keep);
  if (keep) s.bias = *keep;
  return s;
}

Tensor conv1d_fwd(const Tensor& x, const Tensor& weight, const OptTensor& bias, bool silu) {
  Conv1dSetup s = setup_conv1d(x, weight, bias, silu);
  Tensor out = compressm::cpu::empty_output(x.sizes(), x.options());
  s.p.out = out.data_ptr();
  compressm::cpu::conv1d_fwd(s.p);
  return out;
}

// Returns dx, dweight, dbias (0-element without a bias).
std::vector<Tensor> conv1d_bwd(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& dout,
                               bool silu) {
  Conv1dSetup s = setup_conv1d(x, weight, bias, silu);
  auto& p = s.p;
  p.dout = activation(dout, "dout", p.batch, p.dim, p.seqlen);
  Tensor dx = compressm::cpu::empty_output(x.sizes(), x.options());
  Tensor dweight = at::empty({p.dim, p.width}, x.options().dtype(at::kFloat));
  Tensor dbias = at::empty({bias.has_value() ? p.dim : 0}, x.options().dtype(at::kFloat));
  p.dx = dx.data_ptr();
  p.dweight = dweight.data_ptr<float>();
  p.dbias = bias.has_value() ? dbias.data_ptr<float>() : nullptr;
  compressm::cpu::conv1d_bwd(p);
  return {dx, dweight, dbias};
}

// One decode step of the conv: conv_state (Bt, D, S) updated in place; returns (Bt, D) in x's dtype.
Tensor conv1d_update(const Tensor& x, const Tensor& conv_state, const Tensor& weight, const OptTensor& bias, bool silu) {
  check_cpu(x, "x");
  check_cpu(conv_state, "conv_state");
  TORCH_CHECK_VALUE(x.dim() == 2, "x must have shape (Bt, D), got ", shape_of(x));
  const int64_t batch = x.size(0), dim = x.size(1);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == dim && weight.size(1) >= 1,
                    "weight must have shape (D, W) with D=", dim, ", got ", shape_of(weight));
  const int64_t width = weight.size(1);
  TORCH_CHECK_VALUE(conv_state.dim() == 3 && conv_state.size(0) == batch && conv_state.size(1) == dim &&
                        conv_state.size(2) >= width - 1,
                    "conv_state must have shape (Bt, D, S >= W - 1) = (", batch, ", ", dim, ", >= ", width - 1,
                    "), got ", shape_of(conv_state));
  check_writable(conv_state, "conv_state");
  compressm::cpu::Conv1dUpdateParams p;
  p.batch = batch, p.dim = dim, p.width = width, p.keep = conv_state.size(2);
  p.silu = silu;
  p.x = token(x, "x", batch, dim);
  p.state = conv_state.data_ptr();
  p.state_dtype = dtype_of(conv_state, "conv_state");
  p.state_stride0 = conv_state.stride(0), p.state_stride1 = conv_state.stride(1), p.state_stride2 = conv_state.stride(2);
  Tensor weight_c = param(weight, "weight", {dim, width});
  p.weight = weight_c.data_ptr<float>();
  OptTensor bias_c;
  p.bias = opt_param(bias, "bias", {dim}, bias_c);
  Tensor out = at::empty({batch, dim}, x.options().memory_format(at::MemoryFormat::Contiguous));
  p.out = out.data_ptr();
  compressm::cpu::conv1d_update(p);
  return out;
}

}  // namespace

// The CPU kernels of the ops that compressm_kernels defines in Python (their schemas and fake implementations:
// ops/selective_scan/cpu.py, ops/conv1d_cpu.py), so that the dispatcher calls them with no Python in between: as
// torch.library.custom_op's Python kernels each call cost ~30 µs more (a small scan's forward+backward 282 -> 220
// µs). Registering a kernel before its schema is defined is allowed; the dispatcher checks that the two match.
TORCH_LIBRARY_IMPL(compressm, CPU, m) {
  m.impl("selective_scan_fwd_cpu", &scan_fwd);
  m.impl("selective_scan_bwd_cpu", &scan_bwd);
  m.impl("causal_conv1d_fwd_cpu", &conv1d_fwd);
  m.impl("causal_conv1d_bwd_cpu", &conv1d_bwd);
}

// Their autograd is the Python autograd.Functions around them; backprop through an op called directly raises
// ("derivative ... is not implemented") instead of torch's default warning and silently missing gradients.
TORCH_LIBRARY_IMPL(compressm, Autograd, m) {
  for (const char* op : {"selective_scan_fwd_cpu", "selective_scan_bwd_cpu", "causal_conv1d_fwd_cpu",
                         "causal_conv1d_bwd_cpu"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "compressm_kernels C++ CPU kernels (selective scan forward/backward, decode step)";
  m.def("scan_fwd", &scan_fwd, "selective scan forward -> (out, carries)", py::arg("u"), py::arg("delta"),
        py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"), py::arg("delta_bias"), py::arg("ranks"),
        py::arg("kept"), py::arg("delta_softplus"), py::arg("chunk"));
  m.def("scan_bwd", &scan_bwd, "selective scan backward -> du, ddelta, dA, dB, dC, dD, dz, ddelta_bias",
        py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"),
        py::arg("delta_bias"), py::arg("ranks"), py::arg("kept"), py::arg("delta_softplus"), py::arg("chunk"),
        py::arg("carries"), py::arg("dout"), py::arg("dlast"));
  m.def("conv1d_fwd", &conv1d_fwd, "causal depthwise conv1d (+ SiLU) forward -> out", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("silu"));
  m.def("conv1d_bwd", &conv1d_bwd, "causal depthwise conv1d (+ SiLU) backward -> dx, dweight, dbias", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("dout"), py::arg("silu"));
  m.def("conv1d_update", &conv1d_update, "one decode step of the conv, conv_state shifted in place -> out",
        py::arg("x"), py::arg("conv_state"), py::arg("weight"), py::arg("bias"), py::arg("silu"));
  m.def("cpu_isa", &compressm::cpu::isa, "the loops the CPU kernels run: avx2+fma or baseline");
  m.def(
      "output_cache_info",
      [] {
        const auto i = compressm::cpu::output_cache_info();
        return py::dict(py::arg("live_bytes") = i.live_bytes, py::arg("idle_bytes") = i.idle_bytes,
                        py::arg("idle_blocks") = i.idle_blocks, py::arg("limit_bytes") = i.limit_bytes,
                        py::arg("hits") = i.hits, py::arg("misses") = i.misses);
      },
      "the CPU kernels' output cache: bytes in tensors, idle bytes and blocks, its limit, hits and misses so far");
  m.def("empty_output_cache", &compressm::cpu::empty_output_cache, "free the output cache's idle blocks");
  m.def("state_update", &state_update, "one decode step, state updated in place -> out", py::arg("state"),
        py::arg("x"), py::arg("dt"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"),
        py::arg("dt_bias"), py::arg("ranks"), py::arg("kept"), py::arg("dt_softplus"));
  m.def("state_update_heads", &state_update_heads, "Mamba-2's multi-head decode step, state updated in place -> out",
        py::arg("state"), py::arg("x"), py::arg("dt"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"),
        py::arg("z"), py::arg("dt_bias"), py::arg("dt_softplus"));
}
