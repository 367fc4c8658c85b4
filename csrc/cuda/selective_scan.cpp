// Python binding of the CUDA selective scan (compressm_kernels._C_cuda): checks every tensor's dtype,
// device, shape and layout with a message naming it, allocates outputs, fills the params struct and
// launches. Nothing is converted implicitly: a wrong dtype or layout is an error, not a copy.
// ATen + torch's pybind casters instead of <torch/extension.h>: the same API this file uses, and ~30 %
// less compile time (measured 52 s vs 74 s on the 2-core build machine), which CI pays on every run.
#include <ATen/ATen.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "scan_params.h"

namespace compressm {
namespace cuda {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

std::string shape_str(const Tensor& t) { return c10::str(t.sizes()); }

// Devices are checked after dtypes and shapes (so those checks run, and are testable, without a GPU).
void check_devices(std::initializer_list<std::pair<const char*, const Tensor*>> tensors, const Tensor& u) {
  for (const auto& [name, t] : tensors) {
    if (t == nullptr) continue;
    TORCH_CHECK_VALUE(t->is_cuda(), name, " must be a CUDA tensor, got a tensor on ", t->device(),
                      " (the CUDA selective scan runs on CUDA tensors only)");
    TORCH_CHECK_VALUE(t->device() == u.device(), name, " is on ", t->device(), " but u is on ", u.device());
  }
}

const Tensor* ptr(const OptTensor& t) { return t.has_value() ? &*t : nullptr; }

void check_dtype(const char* name, const Tensor& t, at::ScalarType expected) {
  TORCH_CHECK_TYPE(t.scalar_type() == expected, name, " must have dtype ", expected, ", got ", t.scalar_type());
}

void check_shape(const char* name, const Tensor& t, at::IntArrayRef expected, const char* what) {
  TORCH_CHECK_VALUE(t.sizes() == expected, name, " must have shape ", what, " = ", expected, ", got ",
                    shape_str(t));
}

void check_contiguous(const char* name, const Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

void check_unit_stride(const char* name, const Tensor& t) {
  TORCH_CHECK_VALUE(t.size(-1) == 1 || t.stride(-1) == 1, name, " must be unit-stride along L (its last axis), got strides ",
                    t.strides());
}

bool aligned16(const Tensor& t, std::initializer_list<int64_t> strides) {
  const int64_t elems = 16 / t.element_size();
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t s : strides)
    if (s % elems != 0) return false;
  return true;
}

// A (Bt, D, L) activation in u's dtype.
ActivationRef activation(const char* name, const Tensor& t, const Tensor& u) {
  check_dtype(name, t, u.scalar_type());
  check_shape(name, t, u.sizes(), "(Bt, D, L) like u");
  check_unit_stride(name, t);
  ActivationRef ref;
  ref.ptr = t.data_ptr();
  ref.batch_stride = t.stride(0);
  ref.dim_stride = t.stride(1);
  ref.vec = aligned16(t, {t.stride(0), t.stride(1)});
  return ref;
}

ActivationRef activation(const char* name, const OptTensor& t, const Tensor& u) {
  return t.has_value() ? activation(name, *t, u) : ActivationRef{};
}

// B or C: (D, N) fp32 contiguous, (Bt, N, L) or (Bt, G, N, L) in u's dtype.
ProjectionRef projection(const char* name, const Tensor& t, const Tensor& u, int64_t dstate) {
  const int64_t batch = u.size(0), dim = u.size(1), seqlen = u.size(2);
  ProjectionRef ref;
  ref.ptr = t.data_ptr();
  if (t.dim() == 2) {
    check_dtype(name, t, at::kFloat);
    check_shape(name, t, {dim, dstate}, "(D, N) (time-invariant)");
    check_contiguous(name, t);
    return ref;
  }
  TORCH_CHECK_VALUE(t.dim() == 3 || t.dim() == 4, name, " must have 2 (D, N), 3 (Bt, N, L) or 4 (Bt, G, N, L) dims, got ",
                    shape_str(t));
  check_dtype(name, t, u.scalar_type());
  const Tensor t4 = t.dim() == 3 ? t.unsqueeze(1) : t;
  const int64_t groups = t4.size(1);
  TORCH_CHECK_VALUE(groups >= 1 && dim % groups == 0, name, " has G=", groups, " groups, which must divide D=", dim);
  TORCH_CHECK_VALUE(t4.sizes() == at::IntArrayRef({batch, groups, dstate, seqlen}), name,
                    " (variable) must have shape (Bt, N, L) = (", batch, ", ", dstate, ", ", seqlen,
                    ") or (Bt, G, N, L) = (", batch, ", G, ", dstate, ", ", seqlen, "), got ", shape_str(t));
  check_unit_stride(name, t);
  ref.variable = true;
  ref.channels_per_group = static_cast<int>(dim / groups);
  ref.batch_stride = t4.stride(0);
  ref.group_stride = t4.stride(1);
  ref.state_stride = t4.stride(2);
  ref.vec = aligned16(t, {ref.batch_stride, ref.group_stride, ref.state_stride});
  return ref;
}

const float* param_vector(const char* name, const OptTensor& t, const Tensor& u) {
  if (!t.has_value()) return nullptr;
  check_dtype(name, *t, at::kFloat);
  check_shape(name, *t, {u.size(1)}, "(D,)");
  check_contiguous(name, *t);
  return t->data_ptr<float>();
}

// Checks the shared forward/backward arguments (all but their devices) and fills the fields of the params they determine.
void fill_common(ScanFwdParams& p, const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                 const Tensor& C, const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias,
                 const OptTensor& ranks, const OptTensor& kept, bool delta_softplus) {
  TORCH_CHECK_TYPE(u.scalar_type() == at::kFloat || u.scalar_type() == at::kHalf || u.scalar_type() == at::kBFloat16,
                   "u must have dtype float32, float16 or bfloat16, got ", u.scalar_type());
  TORCH_CHECK_VALUE(u.dim() == 3 && u.numel() > 0, "u must have non-empty shape (Bt, D, L), got ", shape_str(u));
  check_unit_stride("u", u);
  check_dtype("A", A, at::kFloat);
  TORCH_CHECK_VALUE(A.dim() == 2 && A.size(0) == u.size(1) && A.size(1) >= 1 && A.size(1) <= kMaxDstate,
                    "A must have shape (D, N) with D=", u.size(1), " and 1 <= N <= ", kMaxDstate, ", got ", shape_str(A));
  check_contiguous("A", A);
  const int64_t dim = u.size(1), dstate = A.size(1);
  TORCH_CHECK_VALUE(u.size(0) <= 65535, "u has batch ", u.size(0), "; the CUDA scan supports at most 65535");

  p.batch = static_cast<int>(u.size(0));
  p.dim = static_cast<int>(dim);
  p.seqlen = static_cast<int>(u.size(2));
  p.dstate = static_cast<int>(dstate);
  p.n_chunks = static_cast<int>((u.size(2) + kChunk - 1) / kChunk);
  p.delta_softplus = delta_softplus;
  p.u = activation("u", u, u);
  p.delta = activation("delta", delta, u);
  p.z = activation("z", z, u);
  p.B = projection("B", B, u, dstate);
  p.C = projection("C", C, u, dstate);
  p.A = A.data_ptr<float>();
  p.D = param_vector("D", D, u);
  p.delta_bias = param_vector("delta_bias", delta_bias, u);

  TORCH_CHECK_VALUE(ranks.has_value() == kept.has_value(), "ranks and kept must be given together (or neither)");
  if (ranks.has_value()) {
    check_dtype("ranks", *ranks, at::kInt);
    check_dtype("kept", *kept, at::kInt);
    check_contiguous("ranks", *ranks);
    check_contiguous("kept", *kept);
    p.per_channel_ranks = kept->dim() == 2;
    if (p.per_channel_ranks) {
      check_shape("ranks", *ranks, {dim}, "(D,) (per-channel kept states)");
      check_shape("kept", *kept, {dim, dstate}, "(D, N)");
    } else {
      check_shape("ranks", *ranks, {1}, "(1,) (kept states shared by all channels)");
      check_shape("kept", *kept, {dstate}, "(N,)");
    }
    p.ranks = ranks->data_ptr<int32_t>();
    p.kept = kept->data_ptr<int32_t>();
  }
  p.channels_per_block = pick_channels_per_block(p);
}

void check_common_devices(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                          const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias, const OptTensor& ranks,
                          const OptTensor& kept) {
  check_devices({{"u", &u}, {"delta", &delta}, {"A", &A}, {"B", &B}, {"C", &C}, {"D", ptr(D)}, {"z", ptr(z)},
                 {"delta_bias", ptr(delta_bias)}, {"ranks", ptr(ranks)}, {"kept", ptr(kept)}},
                u);
}

template <typename Params>
void dispatch(at::ScalarType dtype, const Params& p, cudaStream_t stream,
              void (*f32)(const Params&, cudaStream_t), void (*f16)(const Params&, cudaStream_t),
              void (*bf16)(const Params&, cudaStream_t)) {
  switch (dtype) {
    case at::kFloat: f32(p, stream); break;
    case at::kHalf: f16(p, stream); break;
    default: bf16(p, stream); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Returns [out (Bt, D, L) in u's dtype, carries (Bt, D, n_chunks, N) fp32].
std::vector<Tensor> fwd(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                        const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias, const OptTensor& ranks,
                        const OptTensor& kept, bool delta_softplus) {
  ScanFwdParams p;
  fill_common(p, u, delta, A, B, C, D, z, delta_bias, ranks, kept, delta_softplus);
  check_common_devices(u, delta, A, B, C, D, z, delta_bias, ranks, kept);
  const c10::cuda::CUDAGuard guard(u.device());
  Tensor out = at::empty(u.sizes(), u.options());
  Tensor carries = at::empty({p.batch, p.dim, p.n_chunks, p.dstate}, u.options().dtype(at::kFloat));
  p.out = activation("out", out, u);
  p.carries = carries.data_ptr<float>();
  dispatch<ScanFwdParams>(u.scalar_type(), p, at::cuda::getCurrentCUDAStream(), launch_scan_fwd<float>,
                          launch_scan_fwd<__half>, launch_scan_fwd<__nv_bfloat16>);
  return {out, carries};
}

// Returns [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias]; dB/dC are fp32 with B/C's shapes; dD, dz,
// ddelta_bias are undefined (None) when D, z, delta_bias are absent.
std::vector<Tensor> bwd(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                        const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias, const OptTensor& ranks,
                        const OptTensor& kept, const Tensor& carries, const Tensor& dout, const OptTensor& dlast,
                        bool delta_softplus) {
  ScanBwdParams p;
  fill_common(p, u, delta, A, B, C, D, z, delta_bias, ranks, kept, delta_softplus);
  check_dtype("carries", carries, at::kFloat);
  check_shape("carries", carries, {p.batch, p.dim, p.n_chunks, p.dstate}, "(Bt, D, n_chunks, N)");
  check_contiguous("carries", carries);
  p.carries = const_cast<float*>(carries.data_ptr<float>());
  p.dout = activation("dout", dout, u);
  if (dlast.has_value()) {
    check_dtype("dlast", *dlast, at::kFloat);
    check_shape("dlast", *dlast, {p.batch, p.dim, p.dstate}, "(Bt, D, N)");
    check_contiguous("dlast", *dlast);
    p.dlast = dlast->data_ptr<float>();
  }
  check_common_devices(u, delta, A, B, C, D, z, delta_bias, ranks, kept);
  check_devices({{"carries", &carries}, {"dout", &dout}, {"dlast", ptr(dlast)}}, u);

  const c10::cuda::CUDAGuard guard(u.device());
  const auto f32 = u.options().dtype(at::kFloat);
  Tensor du = at::empty(u.sizes(), u.options());
  Tensor ddelta = at::empty(u.sizes(), u.options());
  Tensor dA = at::zeros(A.sizes(), f32);
  Tensor dB = at::zeros(B.sizes(), f32);
  Tensor dC = at::zeros(C.sizes(), f32);
  Tensor dD = D.has_value() ? at::zeros({p.dim}, f32) : Tensor();
  Tensor dz = z.has_value() ? at::empty(u.sizes(), u.options()) : Tensor();
  Tensor ddelta_bias = delta_bias.has_value() ? at::zeros({p.dim}, f32) : Tensor();
  p.du = activation("du", du, u);
  p.ddelta = activation("ddelta", ddelta, u);
  if (dz.defined()) p.dz = activation("dz", dz, u);
  p.dA = dA.data_ptr<float>();
  p.dB = dB.data_ptr<float>();
  p.dC = dC.data_ptr<float>();
  p.dD = dD.defined() ? dD.data_ptr<float>() : nullptr;
  p.ddelta_bias = ddelta_bias.defined() ? ddelta_bias.data_ptr<float>() : nullptr;
  dispatch<ScanBwdParams>(u.scalar_type(), p, at::cuda::getCurrentCUDAStream(), launch_scan_bwd<float>,
                          launch_scan_bwd<__half>, launch_scan_bwd<__nv_bfloat16>);
  return {du, ddelta, dA, dB, dC, dD, dz, ddelta_bias};
}

}  // namespace
}  // namespace cuda
}  // namespace compressm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA selective scan with per-channel state ranks (compressm_kernels)";
  m.attr("CHUNK_SIZE") = compressm::cuda::kChunk;
  m.attr("MAX_DSTATE") = compressm::cuda::kMaxDstate;
  m.def("fwd", &compressm::cuda::fwd, "Selective scan forward: [out, carries]", py::arg("u"), py::arg("delta"),
        py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"), py::arg("delta_bias"), py::arg("ranks"),
        py::arg("kept"), py::arg("delta_softplus"));
  m.def("bwd", &compressm::cuda::bwd,
        "Selective scan backward: [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias]", py::arg("u"), py::arg("delta"),
        py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"), py::arg("delta_bias"), py::arg("ranks"),
        py::arg("kept"), py::arg("carries"), py::arg("dout"), py::arg("dlast"), py::arg("delta_softplus"));
}
