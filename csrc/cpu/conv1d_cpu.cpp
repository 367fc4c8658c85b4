// Mamba's causal depthwise conv1d on the CPU (scan_cpu.h), fused with its SiLU. One (batch, channel) row at a
// time: the W taps are W passes over the row, each vectorised across steps (a window of W ≤ 4 taps per step is
// too short to vectorise across), in fp32 whatever x's dtype. The backward recomputes the pre-activation rather
// than keeping it, and runs channel-major (each thread owns whole channels, batches inside) so the weight and
// bias gradients need no reduction between threads and come out the same for any thread count.
#include <algorithm>
#include <vector>

#include "cpu_common.h"  // includes compressm/scan_recurrence.h after its diagnostic pragma

namespace compressm::cpu {
namespace {

// pre[t] = bias + Σ_k w[k] · x[t - (W - 1) + k], the taps before t = 0 being zeros.
struct TapsArgs {
  int L, W;
  const float* x;
  const float* w;
  float bias;
  float* pre;
};

COMPRESSM_ALWAYS_INLINE void taps_impl(const TapsArgs& a) {
  const float* __restrict x = a.x;
  float* __restrict pre = a.pre;
  const int L = a.L, W = a.W;
  for (int t = 0; t < L; ++t) pre[t] = a.bias;
  for (int k = 0; k < W; ++k) {
    const int lag = W - 1 - k, t0 = std::min(lag, L);  // pre[t] reads x[t - lag]
    const float wk = a.w[k];
    for (int t = t0; t < L; ++t) pre[t] += wk * x[t - lag];
  }
}
COMPRESSM_DISPATCH(taps, TapsArgs)

// out[t] = silu(pre[t]) in place.
struct SiluArgs {
  int L;
  float* v;
};

COMPRESSM_ALWAYS_INLINE void silu_row_impl(const SiluArgs& a) {
  float* __restrict v = a.v;
  for (int t = 0; t < a.L; ++t) v[t] = silu_f32(v[t]);
}
COMPRESSM_DISPATCH(silu_row, SiluArgs)

// The backward of one row, given dpre (dout through the SiLU): dx[j] = Σ_k w[k] · dpre[j + W - 1 - k] (steps past
// the end are zeros); dw[k] += Σ_t dpre[t] · x[t - (W - 1) + k]; *dbias += Σ_t dpre[t].
struct TapsGradArgs {
  int L, W;
  const float* x;
  const float* w;
  const float* dpre;
  float* dx;
  float* dw;
  float* dbias;
};

COMPRESSM_ALWAYS_INLINE void taps_grad_impl(const TapsGradArgs& a) {
  const float* __restrict x = a.x;
  const float* __restrict dpre = a.dpre;
  float* __restrict dx = a.dx;
  const int L = a.L, W = a.W;
  for (int j = 0; j < L; ++j) dx[j] = 0.0f;
  for (int k = 0; k < W; ++k) {
    const int lag = W - 1 - k, t0 = std::min(lag, L);
    const float wk = a.w[k];
    float dw = 0.0f;
#pragma omp simd reduction(+ : dw)
    for (int t = t0; t < L; ++t) {
      dx[t - lag] += wk * dpre[t];
      dw += dpre[t] * x[t - lag];
    }
    a.dw[k] += dw;
  }
  float db = 0.0f;
#pragma omp simd reduction(+ : db)
  for (int t = 0; t < L; ++t) db += dpre[t];
  *a.dbias += db;
}
COMPRESSM_DISPATCH(taps_grad, TapsGradArgs)

// dpre[t] = dout[t] · silu'(pre[t]), in place over pre.
struct SiluGradArgs {
  int L;
  const float* dout;
  float* pre;
};

COMPRESSM_ALWAYS_INLINE void silu_grad_row_impl(const SiluGradArgs& a) {
  const float* __restrict dout = a.dout;
  float* __restrict v = a.pre;
  for (int t = 0; t < a.L; ++t) v[t] = dout[t] * silu_grad_f32(v[t]);
}
COMPRESSM_DISPATCH(silu_grad_row, SiluGradArgs)

int64_t row_offset(const Operand& op, int b, int d) { return b * op.stride0 + d * op.stride1; }

}  // namespace

void conv1d_fwd(const Conv1dParams& p) {
  const int L = p.seqlen, W = p.width;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.dim;
  const bool f32_out = p.x.dtype == DType::f32;
#pragma omp parallel num_threads(p.num_threads)
  {
    Floats x_buf(L), pre_buf(f32_out ? 0 : L);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const int b = static_cast<int>(row / p.dim), d = static_cast<int>(row % p.dim);
      const float* x = row_as_f32(p.x.data, p.x.dtype, row_offset(p.x, b, d), 1, L, x_buf.data());
      float* pre = f32_out ? static_cast<float*>(p.out) + row * L : pre_buf.data();  // the output row itself
      taps({L, W, x, p.weight + static_cast<int64_t>(d) * W, p.bias ? p.bias[d] : 0.0f, pre});
      if (p.silu) silu_row({L, pre});
      if (!f32_out) store_row(p.out, row * L, p.x.dtype, L, pre);
    }
  }
}

void conv1d_bwd(const Conv1dParams& p) {
  const int L = p.seqlen, W = p.width;
  const bool f32_dx = p.x.dtype == DType::f32;
  std::fill_n(p.dweight, static_cast<int64_t>(p.dim) * W, 0.0f);
  if (p.dbias) std::fill_n(p.dbias, p.dim, 0.0f);
#pragma omp parallel num_threads(p.num_threads)
  {
    Floats x_buf(L), dout_buf(L), pre(L), dx_buf(f32_dx ? 0 : L);
    float unused_dbias = 0.0f;
#pragma omp for schedule(static)
    for (int d = 0; d < p.dim; ++d) {
      const float* w = p.weight + static_cast<int64_t>(d) * W;
      for (int b = 0; b < p.batch; ++b) {
        const int64_t row = static_cast<int64_t>(b) * p.dim + d;
        const float* x = row_as_f32(p.x.data, p.x.dtype, row_offset(p.x, b, d), 1, L, x_buf.data());
        const float* dout = row_as_f32(p.dout.data, p.dout.dtype, row_offset(p.dout, b, d), 1, L, dout_buf.data());
        const float* dpre = dout;
        if (p.silu) {
          taps({L, W, x, w, p.bias ? p.bias[d] : 0.0f, pre.data()});
          silu_grad_row({L, dout, pre.data()});
          dpre = pre.data();
        }
        float* dx = f32_dx ? static_cast<float*>(p.dx) + row * L : dx_buf.data();
        taps_grad({L, W, x, w, dpre, dx, p.dweight + static_cast<int64_t>(d) * W,
                   p.dbias ? p.dbias + d : &unused_dbias});
        if (!f32_dx) store_row(p.dx, row * L, p.x.dtype, L, dx);
      }
    }
  }
}

void conv1d_update(const Conv1dUpdateParams& p) {
  // A few thousand channels of W taps each, a few microseconds: no OpenMP fork. Per batch row: the taps and the
  // shift channel by channel (in place through fp32 pointers in the common layout), then the SiLU over the row
  // in a loop vectorised across channels.
  const int W = p.width, S = p.keep, D = p.dim;
  const bool f32_rows = p.state_dtype == DType::f32 && p.state_stride2 == 1;
  Floats x_buf(D), acc(D);
  for (int b = 0; b < p.batch; ++b) {
    const float* x = row_as_f32(p.x.data, p.x.dtype, b * p.x.stride0, p.x.stride1, D, x_buf.data());
    for (int d = 0; d < D; ++d) {
      const int64_t row = b * p.state_stride0 + d * p.state_stride1;
      const float* w = p.weight + static_cast<int64_t>(d) * W;
      float sum = (p.bias ? p.bias[d] : 0.0f) + w[W - 1] * x[d];
      if (f32_rows) {
        float* st = static_cast<float*>(p.state) + row;
        for (int k = 0; k < W - 1; ++k) sum += w[k] * st[S - W + 1 + k];
        for (int j = 0; j + 1 < S; ++j) st[j] = st[j + 1];
        if (S > 0) st[S - 1] = x[d];
      } else {
        auto at = [&](int j) { return row + j * p.state_stride2; };
        for (int k = 0; k < W - 1; ++k) sum += w[k] * load(p.state, at(S - W + 1 + k), p.state_dtype);
        for (int j = 0; j + 1 < S; ++j) store(p.state, at(j), p.state_dtype, load(p.state, at(j + 1), p.state_dtype));
        if (S > 0) store(p.state, at(S - 1), p.state_dtype, x[d]);
      }
      acc[d] = sum;
    }
    if (p.silu) silu_row({D, acc.data()});
    store_row(p.out, static_cast<int64_t>(b) * D, p.x.dtype, D, acc.data());
  }
}

}  // namespace compressm::cpu
