// One decode step of the selective scan on the CPU, state updated in place. Channels are processed in blocks:
// the per-channel scalars (Δ = softplus(dt + bias), Δ·x, the D skip, the silu gate, and ā = exp(Δ·A) when a
// channel's states share one A, as Mamba-2's do) are computed for the whole block in loops vectorised across
// channels; then each channel's kept states are advanced eight at a time
// (advance_states), reading f32 rows in place when the layout allows (with fewer than eight states, the
// block's states as one flat array; with a per-channel mask, the kept states gathered by index), and C·h is
// summed eight channels at a time (sum_rows8). OpenMP over blocks when the step is big enough.
#include <algorithm>

#include "cpu_common.h"  // includes compressm/scan_recurrence.h after its diagnostic pragma
#include "scan_cpu.h"

namespace compressm::cpu {
namespace {

constexpr int kMaxState = 256;  // the package's MAX_DSTATE; bindings.cpp checks it
constexpr int kBlock = 128;     // channels per block: the block's scalars stay in L1 (64: 1-5 % slower)

// The block's n values of a (Bt, D) token operand as fp32 (in place when they are fp32 rows).
COMPRESSM_ALWAYS_INLINE const float* token_row(const Operand& op, int b, int d0, int n, float* buf) {
  return row_as_f32(op.data, op.dtype, b * op.stride0 + d0 * op.stride1, op.stride1, n, buf);
}

// Channels [d0, d0 + n) of heads of headdim channels: buf[i] = per_head[head of d0 + i - head of d0], one fill per
// head (a loop counting heads per channel cost a quarter of a step at N = 64).
COMPRESSM_ALWAYS_INLINE void repeat_per_head(const float* per_head, int headdim, int d0, int n, float* buf) {
  for (int i = 0, head = 0, run = headdim - d0 % headdim; i < n; i += run, ++head, run = headdim) {
    std::fill_n(buf + i, std::min(run, n - i), per_head[head]);
  }
}

// The block's n values of a per-channel vector v from d0: v + d0, or, when v holds one value per head, those
// values repeated into buf.
COMPRESSM_ALWAYS_INLINE const float* channel_values(const float* v, bool per_head, int headdim, int d0, int n,
                                                    float* buf) {
  if (!per_head) return v + d0;
  repeat_per_head(v + d0 / headdim, headdim, d0, n, buf);
  return buf;
}

// As token_row for a (Bt, H) operand holding one value per head.
COMPRESSM_ALWAYS_INLINE const float* head_token_row(const Operand& op, int b, int headdim, int d0, int n,
                                                    float* buf) {
  const int first = d0 / headdim, count = (d0 + n - 1) / headdim - first + 1;
  alignas(64) float heads[kBlock];
  repeat_per_head(row_as_f32(op.data, op.dtype, b * op.stride0 + first * op.stride1, op.stride1, count, heads),
                  headdim, d0, n, buf);
  return buf;
}

struct BlockArgs {
  const StateUpdateParams* p;
  int b, d0, n;  // batch, first channel, channels in the block
};

// The f32 B or C row of channel d for channels visited in order from d0: the group's row, moved on where
// the next group starts (no division per channel).
class GroupRow {
 public:
  GroupRow(const Operand& op, int groups, int dim, int b, int d0)
      : per_group_(dim / groups), next_((d0 / per_group_ + 1) * per_group_), stride_(op.stride1),
        row_(static_cast<const float*>(op.data) + b * op.stride0 + (d0 / per_group_) * op.stride1) {}
  COMPRESSM_ALWAYS_INLINE const float* at(int d) {
    if (d == next_) row_ += stride_, next_ += per_group_;
    return row_;
  }

 private:
  int per_group_, next_;
  int64_t stride_;
  const float* row_;
};

// The common case: f32 state, B and C with unit stride along N, no per-channel mask. Each channel reads
// its rows in place; lanes[i] = channel d0 + i's C·h folded to eight lanes. kV, kExact, kShared: as
// advance_states; step[i] is channel d0 + i's Δ·kEighthsPerNat, or its ā with kShared (A then one value per
// channel, unread).
// The channels go in runs that share their B and C rows (the whole block with one group), so the loop over
// a run does no per-channel bookkeeping beyond two pointer increments (with Δ·x taken from the block's
// array: 6-15 % faster than finding each channel's group rows and offsets).
template <int kV, bool kExact, bool kShared>
COMPRESSM_ALWAYS_INLINE void channels_in_place(const BlockArgs& a, const float* step, const float* delta_x,
                                               v8f* lanes) {
  const StateUpdateParams& p = *a.p;
  const int N = p.dstate, b = a.b, d0 = a.d0;
  const int per_b = p.dim / p.groups_b, per_c = p.dim / p.groups_c;
  const int A_row = kShared ? 1 : N;
  const float* A = p.A + static_cast<int64_t>(d0) * A_row;
  float* h = static_cast<float*>(p.state) + b * p.state_stride0 + d0 * p.state_stride1;
  const int64_t h_step = p.state_stride1;  // a local: the vector stores could alias p as far as GCC knows
  for (int i = 0; i < a.n;) {
    const int d = d0 + i, g_b = d / per_b, g_c = d / per_c;
    const int end = std::min(a.n, std::min((g_b + 1) * per_b, (g_c + 1) * per_c) - d0);
    const float* B = static_cast<const float*>(p.B.data) + b * p.B.stride0 + g_b * p.B.stride1;
    const float* C = static_cast<const float*>(p.C.data) + b * p.C.stride0 + g_c * p.C.stride1;
    for (; i < end; ++i, A += A_row, h += h_step) {
      lanes[i] = advance_states<kV, kExact, kShared>(N, step[i], delta_x[i], A, B, C, h);
    }
  }
}

// channels_in_place for N in (8·(kV - 1), 8·kV], unrolled, without the tail when N = 8·kV.
template <int kV, bool kShared>
COMPRESSM_ALWAYS_INLINE void channels_in_place_sized(const BlockArgs& a, const float* step, const float* delta_x,
                                                     v8f* lanes) {
  if (a.p->dstate == 8 * kV) {
    channels_in_place<kV, true, kShared>(a, step, delta_x, lanes);
  } else {
    channels_in_place<kV, false, kShared>(a, step, delta_x, lanes);
  }
}

// The common layout with fewer than eight states and contiguous rows: a channel's row would fill part of a
// vector, so the block's n·N states are advanced as one flat array, eight at a time whatever channel each
// belongs to, after laying out the per-state inputs the same way (Δ·kEighthsPerNat, or ā with kShared, and Δ·x
// by channel, B and C by state). Writes y[0, n).
template <bool kShared>
COMPRESSM_ALWAYS_INLINE void channels_flat(const BlockArgs& a, const float* step, const float* delta_x, float* y) {
  const StateUpdateParams& p = *a.p;
  const int N = p.dstate, b = a.b, d0 = a.d0, total = a.n * N;
  GroupRow B_rows(p.B, p.groups_b, p.dim, b, d0), C_rows(p.C, p.groups_c, p.dim, b, d0);
  alignas(32) float dl[kBlock * 8], dx[kBlock * 8], B[kBlock * 8], C[kBlock * 8], prod[kBlock * 8];
  // One loop over (channel, state) pairs with its own counters: GCC would turn a loop over a row into a
  // memcpy call per channel, which costs more than the row.
  const float* B_row = B_rows.at(d0);
  const float* C_row = C_rows.at(d0);
  for (int e = 0, i = 0, k = 0; e < total; ++e) {
    dl[e] = step[i], dx[e] = delta_x[i], B[e] = B_row[k], C[e] = C_row[k];
    if (++k == N && ++i < a.n) k = 0, B_row = B_rows.at(d0 + i), C_row = C_rows.at(d0 + i);
  }
  float* h = static_cast<float*>(p.state) + b * p.state_stride0 + static_cast<int64_t>(d0) * N;
  const float* A = p.A + static_cast<int64_t>(d0) * (kShared ? 1 : N);  // unread with kShared
  int e = 0;
  for (; e + 8 <= total; e += 8) {
    const v8f a_e = kShared ? load8(dl + e) : decay_scaled(load8(dl + e), load8(A + e));
    const v8f hk = forward_step_decayed(load8(h + e), a_e, load8(dx + e), load8(B + e));
    store8(h + e, hk);
    store8(prod + e, load8(C + e) * hk);
  }
  for (; e < total; ++e) {  // the last total % 8 states
    h[e] = forward_step_decayed(h[e], kShared ? dl[e] : decay_scaled(dl[e], A[e]), dx[e], B[e]);
    prod[e] = C[e] * h[e];
  }
  for (int i = 0; i < a.n; ++i) {
    float sum = 0.0f;
    for (int k = 0; k < N; ++k) sum += prod[i * N + k];
    y[i] = sum;
  }
}

// A per-channel mask on the common layout: each channel's kept states gathered by index to f32 buffers,
// advanced, then its row rewritten: zeros, then the kept states (so masked states are 0 afterwards).
template <bool kShared>
COMPRESSM_ALWAYS_INLINE void channels_kept(const BlockArgs& a, const float* step, const float* delta_x,
                                           v8f* lanes) {
  const StateUpdateParams& p = *a.p;
  const int N = p.dstate, b = a.b, d0 = a.d0;
  GroupRow B(p.B, p.groups_b, p.dim, b, d0), C(p.C, p.groups_c, p.dim, b, d0);
  float* h0 = static_cast<float*>(p.state) + b * p.state_stride0;
  alignas(64) float A_buf[kMaxState], B_buf[kMaxState], C_buf[kMaxState], h_buf[kMaxState];
  for (int i = 0; i < a.n; ++i) {
    const int d = d0 + i, r = p.ranks[d];
    const int32_t* kept = p.kept + static_cast<int64_t>(d) * N;
    const float *A = p.A + static_cast<int64_t>(d) * (kShared ? 1 : N), *B_row = B.at(d), *C_row = C.at(d);
    float* h = h0 + d * p.state_stride1;
    for (int k = 0; k < r; ++k) {
      const int n = kept[k];
      if (!kShared) A_buf[k] = A[n];
      B_buf[k] = B_row[n], C_buf[k] = C_row[n], h_buf[k] = h[n];
    }
    lanes[i] = advance_states<0, false, kShared>(r, step[i], delta_x[i], A_buf, B_buf, C_buf, h_buf);
    std::fill_n(h, N, 0.0f);
    for (int k = 0; k < r; ++k) h[kept[k]] = h_buf[k];
  }
}

// Any other layout: each channel's kept states gathered to f32 buffers in kept order, advanced, scattered
// back (masked states set to 0).
template <bool kShared>
COMPRESSM_ALWAYS_INLINE void channels_gathered(const BlockArgs& a, const float* step, const float* delta_x,
                                               v8f* lanes) {
  const StateUpdateParams& p = *a.p;
  const int N = p.dstate, b = a.b, d0 = a.d0;
  alignas(64) float A_buf[kMaxState], B_buf[kMaxState], C_buf[kMaxState], h_buf[kMaxState];
  for (int i = 0; i < a.n; ++i) {
    const int d = d0 + i;
    const int r = p.ranks ? p.ranks[d] : N;
    const int32_t* kept = p.kept ? p.kept + static_cast<int64_t>(d) * N : nullptr;
    const int64_t off_b = b * p.B.stride0 + (d / (p.dim / p.groups_b)) * p.B.stride1;
    const int64_t off_c = b * p.C.stride0 + (d / (p.dim / p.groups_c)) * p.C.stride1;
    const int64_t off_h = b * p.state_stride0 + d * p.state_stride1;
    const float* A = p.A + static_cast<int64_t>(d) * (kShared ? 1 : N);
    for (int k = 0; k < r; ++k) {
      const int n = kept ? kept[k] : k;
      if (!kShared) A_buf[k] = A[n];
      B_buf[k] = load(p.B.data, off_b + n * p.B.stride2, p.B.dtype);
      C_buf[k] = load(p.C.data, off_c + n * p.C.stride2, p.C.dtype);
      h_buf[k] = load(p.state, off_h + n * p.state_stride2, p.state_dtype);
    }
    lanes[i] = advance_states<0, false, kShared>(r, step[i], delta_x[i], A_buf, B_buf, C_buf, h_buf);
    for (int k = 0; k < N; ++k) {
      const int n = kept ? kept[k] : k;
      store(p.state, off_h + n * p.state_stride2, p.state_dtype, k < r ? h_buf[k] : 0.0f);
    }
  }
}

template <bool kShared>
COMPRESSM_ALWAYS_INLINE void block_step_shared_or_not(const BlockArgs& a) {
  const StateUpdateParams& p = *a.p;
  const int b = a.b, d0 = a.d0, n = a.n;
  alignas(64) float x_buf[kBlock], dt_buf[kBlock], softplus_buf[kBlock], delta_x[kBlock], gate[kBlock], y_buf[kBlock];
  alignas(64) float decay[kBlock], bias_buf[kBlock], A_buf[kBlock], D_buf[kBlock], delta_scaled[kBlock];
  v8f lanes[kBlock];  // per channel, C·h folded to eight lanes

  // Per-channel scalars, vectorised across the block's channels.
  const float* x = token_row(p.x, b, d0, n, x_buf);
  const float* dt = p.dt_per_head ? head_token_row(p.dt, b, p.headdim, d0, n, dt_buf)
                                  : token_row(p.dt, b, d0, n, dt_buf);
  if (p.z.data) {
    const float* z = token_row(p.z, b, d0, n, gate);
    for (int i = 0; i < n; ++i) gate[i] = silu_f32(z[i]);
  }
  if (p.dt_bias) {
    const float* bias = channel_values(p.dt_bias, p.dt_bias_per_head, p.headdim, d0, n, bias_buf);
    for (int i = 0; i < n; ++i) dt_buf[i] = dt[i] + bias[i];
    dt = dt_buf;
  }
  const float* delta = dt;  // Δ = softplus(dt + bias) or dt + bias
  if (p.dt_softplus) {
    softplus_row(n, dt, 0.0f, softplus_buf, nullptr);
    delta = softplus_buf;
  }
  for (int i = 0; i < n; ++i) delta_x[i] = delta[i] * x[i];
  if (kShared) {  // one ā per channel, vectorised across the block's channels
    const float* A = channel_values(p.A, p.A_per_head, p.headdim, d0, n, A_buf);
    for (int i = 0; i < n; ++i) decay[i] = exp_f32(delta[i] * A[i]);
  } else {  // 8/ln2 folded into Δ once per channel, for the states' decay_scaled
    for (int i = 0; i < n; ++i) delta_scaled[i] = delta[i] * kEighthsPerNat;
  }
  const float* step = kShared ? decay : delta_scaled;  // what advance_states takes

  // The state loops, then Σ over states, into the output row itself when it is fp32.
  const int64_t out_off = static_cast<int64_t>(b) * p.dim + d0;
  float* y = p.x.dtype == DType::f32 ? static_cast<float*>(p.out) + out_off : y_buf;
  const bool f32_rows = p.state_dtype == DType::f32 && p.state_stride2 == 1 && p.B.dtype == DType::f32 &&
                        p.B.stride2 == 1 && p.C.dtype == DType::f32 && p.C.stride2 == 1;
  const bool in_place = f32_rows && !p.kept;
  if (in_place && p.dstate < 8 && p.state_stride1 == p.dstate) {
    channels_flat<kShared>(a, step, delta_x, y);
  } else {
    if (in_place) {
      switch ((p.dstate + 7) / 8) {  // what a cut leaves (up to 32 states) and 64 get unrolled loops
        case 1: channels_in_place_sized<1, kShared>(a, step, delta_x, lanes); break;
        case 2: channels_in_place_sized<2, kShared>(a, step, delta_x, lanes); break;
        case 3: channels_in_place_sized<3, kShared>(a, step, delta_x, lanes); break;
        case 4: channels_in_place_sized<4, kShared>(a, step, delta_x, lanes); break;
        case 8: channels_in_place_sized<8, kShared>(a, step, delta_x, lanes); break;
        default: channels_in_place<0, false, kShared>(a, step, delta_x, lanes);
      }
    } else if (f32_rows) {  // with a per-channel mask
      channels_kept<kShared>(a, step, delta_x, lanes);
    } else {
      channels_gathered<kShared>(a, step, delta_x, lanes);
    }
    int i = 0;
    for (; i + 8 <= n; i += 8) sum_rows8(lanes + i, y + i);
    if (i < n) {  // the last n % 8 channels: y may be the output row, so no write past n
      alignas(32) float sums[8];
      for (int k = n; k % 8 != 0; ++k) lanes[k] = v8f{};
      sum_rows8(lanes + i, sums);
      std::copy_n(sums, n - i, y + i);
    }
  }

  // The D skip and the gate, vectorised across channels.
  if (p.D) {
    const float* D = channel_values(p.D, p.D_per_head, p.headdim, d0, n, D_buf);
    for (int i = 0; i < n; ++i) y[i] += D[i] * x[i];
  }
  if (p.z.data) {
    for (int i = 0; i < n; ++i) y[i] *= gate[i];
  }
  if (y == y_buf) store_row(p.out, out_off, p.x.dtype, n, y);
}

COMPRESSM_ALWAYS_INLINE void block_step_impl(const BlockArgs& a) {
  if (a.p->shared_decay) {
    block_step_shared_or_not<true>(a);
  } else {
    block_step_shared_or_not<false>(a);
  }
}
COMPRESSM_DISPATCH(block_step, BlockArgs)

}  // namespace

void state_update(const StateUpdateParams& p) {
  const int blocks = (p.dim + kBlock - 1) / kBlock;
  const int64_t tasks = static_cast<int64_t>(p.batch) * blocks;
  // A fork/join of warm OpenMP threads costs about a microsecond (measured: two threads already gain at 1k
  // states, 2 µs of work); threads from 4k state updates, where one thread needs several microseconds.
  const int threads = static_cast<int64_t>(p.batch) * p.dim * p.dstate >= 4096 ? p.num_threads : 1;
  auto run = [&](int64_t task) {
    const int b = static_cast<int>(task / blocks), d0 = static_cast<int>(task % blocks) * kBlock;
    block_step({&p, b, d0, std::min(kBlock, p.dim - d0)});
  };
  if (threads == 1) {  // no OpenMP region: even a one-thread team costs libgomp a futex call per step
    for (int64_t task = 0; task < tasks; ++task) run(task);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t task = 0; task < tasks; ++task) run(task);
}

}  // namespace compressm::cpu
