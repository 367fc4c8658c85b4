"""Triton kernels of the selective scan (MATH.md §1): one forward, one backward, and the decode step.

Decomposition (the one mamba's CUDA kernel uses, in tiles): a program owns one batch row and a tile of
``BLOCK_D`` channels, walks L in chunks of ``CHUNK`` steps and, inside a chunk, loops over its states
one at a time. Each state's recurrence over the chunk is one ``tl.associative_scan`` along time of the
pairs ``(exp(Δ·A), Δ·B·u)``, started from that state's carry; ``y`` accumulates ``C·h`` over states in
registers. So the work is proportional to the number of states actually visited (a runtime loop bound),
no per-timestep state ever reaches memory, and the only thing saved for backward is the carry at the
end of every chunk, ``(Bt, D, n_chunks, N)`` fp32. The backward recomputes each chunk's states from
those carries, runs the reverse scan of ``dh`` and reduces dB/dC over the channel tile in registers
before one ``atomic_add`` per chunk and state into fp32 buffers.

Loop slots and states. The state loop runs over *slots* ``j``; slot j of channel d is state
``kept[d, j]``. Without a mask (``MASK_MODE=0``) slot j is state j and the loop runs to N. With a
shared mask (1) the loop runs to its rank and slot j is ``kept[j]`` for every channel. With a
per-channel mask (2) the loop runs to the largest rank in the tile and channel d uses its own kept
states; its slots past ``rank[d]`` are dead (zero drive, zero output), so states masked for every
channel of the tile are never visited. Carries are stored in slot order.

N is a runtime value: the only compile-time size derived from it is ``BLOCK_N =
next_power_of_2(N)`` (the width of the register tiles holding the per-state carries), so a new N
recompiles only when it crosses a power of two; N, L and the sizes are excluded from Triton's
integer specialisation.

The decode step (``state_update_kernel``) is one token: a program owns one batch row and ``BLOCK_D``
channels, loads their whole ``(BLOCK_D, BLOCK_N)`` state tile, advances it, writes it back in place and
reduces ``C·h`` over states. It reads and writes every state once, so it is bound by the state's memory
traffic; a mask only zeroes the masked states (they must be written as 0 anyway).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ... import env

# Whether these kernels were built for Triton's interpreter (CPU tensors); fixed when triton is imported.
INTERPRETED = env.triton_interpret()

_LOG2E = tl.constexpr(1.4426950408889634)

_SIZES = ["N", "L", "dim", "group_size_b", "group_size_c", "n_chunks", "groups_b", "groups_c"]


def _flags(extra: dict) -> dict:
    """Compile-time switches derived from the arguments (one kernel, no copies)."""
    return {
        "HAS_D": lambda a: a["D_ptr"] is not None,
        "HAS_Z": lambda a: a["z_ptr"] is not None,
        "HAS_BIAS": lambda a: a["bias_ptr"] is not None,
        "BLOCK_N": lambda a: triton.next_power_of_2(a["N"]),
        **extra,
    }


@triton.jit
def _combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2. Also the reverse scan's combine (acc first).
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _column(tile, idx, pos):
    """``tile[:, pos]`` of a (BLOCK_D, K) tile as a (BLOCK_D,) vector (``idx`` is ``arange(K)``)."""
    return tl.sum(tl.where(idx[None, :] == pos, tile, 0.0), axis=1)


@triton.jit
def _slot_state(kept_ptr, rank_d, offs_d, d_ok, j, N, MASK_MODE: tl.constexpr):
    """State index of slot j (a scalar, or per channel for MASK_MODE 2) and whether it is live."""
    if MASK_MODE == 0:
        n = j
        live = d_ok
    elif MASK_MODE == 1:
        n = tl.load(kept_ptr + j)
        live = d_ok
    else:
        n = tl.load(kept_ptr + offs_d * N + j, mask=d_ok, other=0)
        live = d_ok & (j < rank_d)
    return n, live


@triton.jit
def _slot_states(kept_ptr, rank_d, offs_d, d_ok, slots, N, MASK_MODE: tl.constexpr):
    """(BLOCK_D, BLOCK_N) state index of every slot, and which entries are real (slot < N, d < dim)."""
    ok = d_ok[:, None] & (slots[None, :] < N)
    if MASK_MODE == 0:
        n = tl.zeros_like(offs_d)[:, None] + slots[None, :]
    elif MASK_MODE == 1:
        n = tl.zeros_like(offs_d)[:, None] + tl.load(kept_ptr + slots, mask=slots < N, other=0)[None, :]
    else:
        n = tl.load(kept_ptr + offs_d[:, None] * N + slots[None, :], mask=ok, other=0)
    live = ok
    if MASK_MODE != 0:
        live = ok & (slots[None, :] < rank_d[:, None])
    return n, ok, live


@triton.jit
def _loop_bound(rank_ptr, offs_d, d_ok, N, MASK_MODE: tl.constexpr):
    """Per-channel ranks (BLOCK_D,) and how many slots this program must visit."""
    if MASK_MODE == 0:
        rank_d = tl.zeros_like(offs_d) + N
        bound = N
    elif MASK_MODE == 1:
        bound = tl.load(rank_ptr)
        rank_d = tl.zeros_like(offs_d) + bound
    else:
        rank_d = tl.load(rank_ptr + offs_d, mask=d_ok, other=0)
        bound = tl.max(rank_d, axis=0)
    return rank_d, bound


@triton.jit
def _load_bc(ptr, s0, s1, s_n, b, g, offs_d, d_ok, n, t, t_ok, live, VAR: tl.constexpr, MASK_MODE: tl.constexpr):
    """B or C of one slot over a chunk, fp32, broadcastable to (BLOCK_D, CHUNK); zero where not live.

    Variable: ``ptr[b, g, n, t]`` with strides (s0, s1, s_n, 1). Time-invariant: ``ptr[d, n]`` with
    strides (s1, s_n).
    """
    if VAR:
        if MASK_MODE == 2:  # each channel reads its own state's row
            ok = live[:, None] & t_ok[None, :]
            v = tl.load(ptr + b * s0 + g * s1 + n[:, None] * s_n + t[None, :], mask=ok, other=0.0).to(tl.float32)
        else:  # one row shared by the tile
            v = tl.load(ptr + b * s0 + g * s1 + n * s_n + t, mask=t_ok, other=0.0).to(tl.float32)[None, :]
    else:
        v = tl.load(ptr + offs_d * s1 + n * s_n, mask=live, other=0.0).to(tl.float32)[:, None]
    return v


@triton.heuristics(_flags({}))
@triton.jit(do_not_specialize=_SIZES)
def scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, kept_ptr, rank_ptr,
    out_ptr, y_ptr, carry_ptr, last_ptr,
    N, L, dim, group_size_b, group_size_c, n_chunks,
    s_u_b, s_u_d, s_dt_b, s_dt_d, s_z_b, s_z_d, s_A_d, s_A_n,
    s_B_0, s_B_1, s_B_n, s_C_0, s_C_1, s_C_n,
    SOFTPLUS: tl.constexpr, MASK_MODE: tl.constexpr, B_VAR: tl.constexpr, C_VAR: tl.constexpr,
    STORE_Y: tl.constexpr, STORE_CARRIES: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < dim
    # A tile never straddles two groups of B or C (the launcher ensures it).
    g_b = (pid_d * BLOCK_D) // group_size_b
    g_c = (pid_d * BLOCK_D) // group_size_c
    offs_t = tl.arange(0, CHUNK)
    slots = tl.arange(0, BLOCK_N)
    row = b * dim + offs_d  # (BLOCK_D,) index of (b, d) in (Bt, D, ...) outputs

    if HAS_D:
        d_skip = tl.load(D_ptr + offs_d, mask=d_ok, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=d_ok, other=0.0)
    rank_d, bound = _loop_bound(rank_ptr, offs_d, d_ok, N, MASK_MODE)

    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # carries of all slots
    for c in range(n_chunks):
        t = c * CHUNK + offs_t
        t_ok = t < L
        ok2 = d_ok[:, None] & t_ok[None, :]
        u = tl.load(u_ptr + b * s_u_b + offs_d[:, None] * s_u_d + t[None, :], mask=ok2, other=0.0).to(tl.float32)
        dt = tl.load(delta_ptr + b * s_dt_b + offs_d[:, None] * s_dt_d + t[None, :], mask=ok2, other=0.0)
        dt = dt.to(tl.float32)
        if HAS_BIAS:
            dt += bias[:, None]
        if SOFTPLUS:
            dt = _softplus(dt)
        dt = tl.where(ok2, dt, 0.0)  # past L: decay 1, drive 0, so the last column holds h[L-1]
        dtu = dt * u
        y = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)
        for j in range(bound):
            n, live = _slot_state(kept_ptr, rank_d, offs_d, d_ok, j, N, MASK_MODE)
            a = tl.load(A_ptr + offs_d * s_A_d + n * s_A_n, mask=d_ok, other=0.0) * _LOG2E
            bv = _load_bc(B_ptr, s_B_0, s_B_1, s_B_n, b, g_b, offs_d, d_ok, n, t, t_ok, live, B_VAR, MASK_MODE)
            cv = _load_bc(C_ptr, s_C_0, s_C_1, s_C_n, b, g_c, offs_d, d_ok, n, t, t_ok, live, C_VAR, MASK_MODE)
            decay = tl.exp2(dt * a[:, None])
            drive = dtu * bv
            pa, pb = tl.associative_scan((decay, drive), axis=1, combine_fn=_combine)
            hs = pa * _column(h, slots, j)[:, None] + pb  # (BLOCK_D, CHUNK) states of slot j
            y += hs * cv
            h = tl.where(slots[None, :] == j, _column(hs, offs_t, CHUNK - 1)[:, None], h)
        if STORE_CARRIES:
            ptrs = carry_ptr + (row[:, None] * n_chunks + c) * N + slots[None, :]
            tl.store(ptrs, h, mask=d_ok[:, None] & (slots[None, :] < N))
        if HAS_D:
            y += d_skip[:, None] * u
        o_ptrs = row[:, None] * L + t[None, :]
        if HAS_Z:
            if STORE_Y:
                tl.store(y_ptr + o_ptrs, y.to(y_ptr.dtype.element_ty), mask=ok2)
            zv = tl.load(z_ptr + b * s_z_b + offs_d[:, None] * s_z_d + t[None, :], mask=ok2, other=0.0)
            zv = zv.to(tl.float32)
            y = y * zv * tl.sigmoid(zv)
        tl.store(out_ptr + o_ptrs, y.to(out_ptr.dtype.element_ty), mask=ok2)

    n_tile, ok, _ = _slot_states(kept_ptr, rank_d, offs_d, d_ok, slots, N, MASK_MODE)
    tl.store(last_ptr + row[:, None] * N + n_tile, h, mask=ok)


@triton.heuristics(_flags({"HAS_DLAST": lambda a: a["dlast_ptr"] is not None}))
@triton.jit(do_not_specialize=_SIZES)
def scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, kept_ptr, rank_ptr,
    dout_ptr, y_ptr, carry_ptr, dlast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
    N, L, dim, group_size_b, group_size_c, n_chunks, groups_b, groups_c,
    s_u_b, s_u_d, s_dt_b, s_dt_d, s_z_b, s_z_d, s_A_d, s_A_n,
    s_B_0, s_B_1, s_B_n, s_C_0, s_C_1, s_C_n,
    SOFTPLUS: tl.constexpr, MASK_MODE: tl.constexpr, B_VAR: tl.constexpr, C_VAR: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DLAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    """Gradients. Outputs: du/ddelta/dz ``(Bt, D, L)`` (contiguous, u's dtype); per-batch partials
    dA ``(Bt, D, N)``, time-invariant dB/dC ``(Bt, D, N)``, dD/dbias ``(Bt, D)`` (fp32, each entry
    written once); variable dB/dC ``(Bt, G, N, L)`` fp32, zeroed by the caller, accumulated atomically."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < dim
    g_b = (pid_d * BLOCK_D) // group_size_b
    g_c = (pid_d * BLOCK_D) // group_size_c
    offs_t = tl.arange(0, CHUNK)
    slots = tl.arange(0, BLOCK_N)
    row = b * dim + offs_d

    if HAS_D:
        d_skip = tl.load(D_ptr + offs_d, mask=d_ok, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=d_ok, other=0.0)
    rank_d, bound = _loop_bound(rank_ptr, offs_d, d_ok, N, MASK_MODE)
    n_tile, ok_tile, live_tile = _slot_states(kept_ptr, rank_d, offs_d, d_ok, slots, N, MASK_MODE)

    # dh: gradient reaching each slot's state from later steps (at the first step of the later chunk).
    if HAS_DLAST:
        dh = tl.load(dlast_ptr + row[:, None] * N + n_tile, mask=live_tile, other=0.0)
    else:
        dh = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dB_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # time-invariant B only
    dC_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # time-invariant C only
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)

    for cc in range(n_chunks):
        c = n_chunks - 1 - cc
        t = c * CHUNK + offs_t
        t_ok = t < L
        ok2 = d_ok[:, None] & t_ok[None, :]
        ok_next = d_ok[:, None] & (t[None, :] + 1 < L)
        u = tl.load(u_ptr + b * s_u_b + offs_d[:, None] * s_u_d + t[None, :], mask=ok2, other=0.0).to(tl.float32)
        dt_ptrs = delta_ptr + b * s_dt_b + offs_d[:, None] * s_dt_d + t[None, :]
        dt_raw = tl.load(dt_ptrs, mask=ok2, other=0.0).to(tl.float32)
        dt_next = tl.load(dt_ptrs + 1, mask=ok_next, other=0.0).to(tl.float32)  # Δ[t+1], for dh's decay
        if HAS_BIAS:
            dt_raw += bias[:, None]
            dt_next += bias[:, None]
        dt = dt_raw
        if SOFTPLUS:
            dt = _softplus(dt_raw)
            dt_next = _softplus(dt_next)
        dt = tl.where(ok2, dt, 0.0)
        dt_next = tl.where(ok_next, dt_next, 0.0)
        dtu = dt * u

        o_ptrs = row[:, None] * L + t[None, :]
        dy = tl.load(dout_ptr + o_ptrs, mask=ok2, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(z_ptr + b * s_z_b + offs_d[:, None] * s_z_d + t[None, :], mask=ok2, other=0.0)
            zv = zv.to(tl.float32)
            sig = tl.sigmoid(zv)
            yv = tl.load(y_ptr + o_ptrs, mask=ok2, other=0.0).to(tl.float32)
            dz = dy * yv * sig * (1.0 + zv * (1.0 - sig))
            tl.store(dz_ptr + o_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=ok2)
            dy = dy * zv * sig
        du = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)
        if HAS_D:
            dD_acc += tl.sum(dy * u, axis=1)
            du = dy * d_skip[:, None]
        ddt = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)

        for j in range(bound):
            n, live = _slot_state(kept_ptr, rank_d, offs_d, d_ok, j, N, MASK_MODE)
            a_nat = tl.load(A_ptr + offs_d * s_A_d + n * s_A_n, mask=d_ok, other=0.0)
            a = a_nat * _LOG2E
            bv = _load_bc(B_ptr, s_B_0, s_B_1, s_B_n, b, g_b, offs_d, d_ok, n, t, t_ok, live, B_VAR, MASK_MODE)
            cv = _load_bc(C_ptr, s_C_0, s_C_1, s_C_n, b, g_c, offs_d, d_ok, n, t, t_ok, live, C_VAR, MASK_MODE)
            # Recompute the chunk's states from the carry saved at the end of the previous chunk.
            h0 = tl.load(carry_ptr + (row * n_chunks + c - 1) * N + j, mask=d_ok & (c > 0), other=0.0)
            drive = dtu * bv
            pa, pb = tl.associative_scan((tl.exp2(dt * a[:, None]), drive), axis=1, combine_fn=_combine)
            hs = pa * h0[:, None] + pb
            # dh[t] = C[t] dy[t] + exp(Δ[t+1] A) dh[t+1]: a reverse scan, then the later chunks' part.
            ra, rb = tl.associative_scan((tl.exp2(dt_next * a[:, None]), dy * cv), axis=1, combine_fn=_combine,
                                         reverse=True)
            dhs = rb + ra * _column(dh, slots, j)[:, None]
            dh = tl.where(slots[None, :] == j, _column(dhs, offs_t, 0)[:, None], dh)

            # exp(Δ[t] A) h[t-1] without a division; at the chunk's first step straight from the carry, so that
            # h[-1] = 0 gives exactly 0 (a contracted hs - drive leaves the product's rounding error there).
            prev = tl.where(offs_t[None, :] == 0, pa * h0[:, None], hs - drive)
            dbu = dhs * dtu
            dcy = dy * hs
            du += dhs * dt * bv
            ddt += dhs * (u * bv + prev * a_nat[:, None])
            dA_acc = tl.where(slots[None, :] == j, dA_acc + tl.sum(dhs * prev * dt, axis=1)[:, None], dA_acc)
            row_b = (b * groups_b + g_b) * N
            row_c = (b * groups_c + g_c) * N
            live_t = live[:, None] & t_ok[None, :]
            if B_VAR:
                if MASK_MODE == 2:
                    tl.atomic_add(dB_ptr + (row_b + n[:, None]) * L + t[None, :], dbu, mask=live_t)
                else:
                    tl.atomic_add(dB_ptr + (row_b + n) * L + t, tl.sum(dbu, axis=0), mask=t_ok)
            else:
                dB_acc = tl.where(slots[None, :] == j, dB_acc + tl.sum(dbu, axis=1)[:, None], dB_acc)
            if C_VAR:
                if MASK_MODE == 2:
                    tl.atomic_add(dC_ptr + (row_c + n[:, None]) * L + t[None, :], dcy, mask=live_t)
                else:
                    tl.atomic_add(dC_ptr + (row_c + n) * L + t, tl.sum(dcy, axis=0), mask=t_ok)
            else:
                dC_acc = tl.where(slots[None, :] == j, dC_acc + tl.sum(dcy, axis=1)[:, None], dC_acc)

        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(dt_raw)
        ddt = tl.where(ok2, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(du_ptr + o_ptrs, du.to(du_ptr.dtype.element_ty), mask=ok2)
        tl.store(ddelta_ptr + o_ptrs, ddt.to(ddelta_ptr.dtype.element_ty), mask=ok2)

    # Dead slots hold zeros, and every state is some slot, so each entry is written exactly once.
    s_ptrs = row[:, None] * N + n_tile
    tl.store(dA_ptr + s_ptrs, dA_acc, mask=ok_tile)
    if not B_VAR:
        tl.store(dB_ptr + s_ptrs, dB_acc, mask=ok_tile)
    if not C_VAR:
        tl.store(dC_ptr + s_ptrs, dC_acc, mask=ok_tile)
    if HAS_D:
        tl.store(dD_ptr + row, dD_acc, mask=d_ok)
    if HAS_BIAS:
        tl.store(dbias_ptr + row, dbias_acc, mask=d_ok)


_STEP_SIZES = ["dim", "N", "group_size_b", "group_size_c"]


@triton.heuristics(_flags({"HAS_MASK": lambda a: a["mask_ptr"] is not None}))
@triton.jit(do_not_specialize=_STEP_SIZES)
def state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, mask_ptr, out_ptr,
    dim, N, group_size_b, group_size_c,
    s_h_b, s_h_d, s_h_n, s_x_b, s_x_d, s_dt_b, s_dt_d, s_z_b, s_z_d, s_A_d, s_A_n,
    s_B_b, s_B_g, s_B_n, s_C_b, s_C_g, s_C_n, s_m_d, s_m_n,
    SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < dim
    ok = d_ok[:, None] & (offs_n < N)[None, :]

    x = tl.load(x_ptr + b * s_x_b + offs_d * s_x_d, mask=d_ok, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * s_dt_b + offs_d * s_dt_d, mask=d_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    h_ptrs = state_ptr + b * s_h_b + offs_d[:, None] * s_h_d + offs_n[None, :] * s_h_n
    h = tl.load(h_ptrs, mask=ok, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + offs_d[:, None] * s_A_d + offs_n[None, :] * s_A_n, mask=ok, other=0.0)
    # Each channel reads its group's row of B and C (a (Bt, N) B is one group of all D channels).
    g_b = (offs_d // group_size_b)[:, None]
    g_c = (offs_d // group_size_c)[:, None]
    Bv = tl.load(B_ptr + b * s_B_b + g_b * s_B_g + offs_n[None, :] * s_B_n, mask=ok, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * s_C_b + g_c * s_C_g + offs_n[None, :] * s_C_n, mask=ok, other=0.0).to(tl.float32)

    h = tl.exp2(dt[:, None] * A * _LOG2E) * h + (dt * x)[:, None] * Bv
    if HAS_MASK:  # a masked state is 0: it neither carries nor contributes
        keep = tl.load(mask_ptr + offs_d[:, None] * s_m_d + offs_n[None, :] * s_m_n, mask=ok, other=0)
        h = tl.where(keep != 0, h, 0.0)
    tl.store(h_ptrs, h.to(state_ptr.dtype.element_ty), mask=ok)

    y = tl.sum(h * Cv, axis=1)
    if HAS_D:
        y += tl.load(D_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32) * x
    if HAS_Z:
        zv = tl.load(z_ptr + b * s_z_b + offs_d * s_z_d, mask=d_ok, other=0.0).to(tl.float32)
        y = y * zv * tl.sigmoid(zv)
    tl.store(out_ptr + b * dim + offs_d, y.to(out_ptr.dtype.element_ty), mask=d_ok)
