"""Hankel energies: closed-form Gramians vs scipy, hand-computed systems, invariances, streaming, errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from compressm_kernels.hankel import (
    HankelAccumulator,
    hankel_from_arrays,
    hankel_from_moments,
    lti_gramians,
)


def _random_system(dim: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(dim, n, generator=g, dtype=torch.float64) * 1.8 - 0.9
    return a, torch.randn(dim, n, generator=g, dtype=torch.float64), torch.randn(dim, n, generator=g,
                                                                                 dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 3, 7, 12])
def test_gramians_and_hsv_match_scipy(n: int) -> None:
    a, b, c = _random_system(3, n, seed=n)
    res = hankel_from_arrays(a, b, c)
    bb = b.unsqueeze(-1) @ b.unsqueeze(-2)
    cc = c.unsqueeze(-1) @ c.unsqueeze(-2)
    P, Q = lti_gramians(a, bb, cc)
    for d in range(3):
        A = np.diag(a[d].numpy())
        P_ref = scipy.linalg.solve_discrete_lyapunov(A, np.outer(b[d], b[d]))
        Q_ref = scipy.linalg.solve_discrete_lyapunov(A.T, np.outer(c[d], c[d]))
        np.testing.assert_allclose(P[d].numpy(), P_ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(Q[d].numpy(), Q_ref, rtol=1e-9, atol=1e-12)
        hsv = np.sort(np.sqrt(np.abs(np.linalg.eigvals(P_ref @ Q_ref).real)))[::-1]
        # sqrt(eig(PQ)) (the reference) resolves σ only to ~sqrt(eps)·σ_max: eig(PQ) errs by eps·σ_max².
        np.testing.assert_allclose(res.sigma[d].numpy(), hsv, rtol=1e-7, atol=1e-7 * hsv[0])
        np.testing.assert_allclose(res.energy[d].numpy(), np.sqrt(np.diag(P_ref) * np.diag(Q_ref)), rtol=1e-9)
    assert (res.sigma[:, :-1] >= res.sigma[:, 1:]).all()


def test_mimo_and_shared_readout_match_scipy() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 5, generator=g, dtype=torch.float64) * 0.9
    B = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    C = torch.randn(5, generator=g, dtype=torch.float64)
    res = hankel_from_arrays(a, B, C)
    for d in range(2):
        A = np.diag(a[d].numpy())
        P = scipy.linalg.solve_discrete_lyapunov(A, B[d].numpy() @ B[d].numpy().T)
        Q = scipy.linalg.solve_discrete_lyapunov(A.T, np.outer(C, C))
        hsv = np.sort(np.sqrt(np.abs(np.linalg.eigvals(P @ Q).real)))[::-1]
        np.testing.assert_allclose(res.sigma[d].numpy(), hsv, rtol=1e-7, atol=1e-10)


def test_one_state_by_hand() -> None:
    # x' = a x + b u, y = c x: P = b²/(1-a²), Q = c²/(1-a²), σ = |b c| / (1 - a²).
    a, b, c = 0.5, 2.0, -3.0
    res = hankel_from_arrays(torch.tensor([[a]]), torch.tensor([[b]]), torch.tensor([[c]]))
    assert res.sigma.item() == pytest.approx(abs(b * c) / (1 - a * a), rel=1e-12)
    assert res.energy.item() == pytest.approx(abs(b * c) / (1 - a * a), rel=1e-12)


@pytest.mark.parametrize("scale", [3.0, 0.01, -2.5])
def test_balancing_invariance(scale: float) -> None:
    a, b, c = _random_system(4, 6, seed=1)
    ref = hankel_from_arrays(a, b, c)
    res = hankel_from_arrays(a, b * scale, c / scale)
    torch.testing.assert_close(res.sigma, ref.sigma, rtol=1e-9, atol=1e-12)
    # Per-state rescaling (a diagonal similarity transform) leaves σ unchanged too, and e as well.
    s = torch.linspace(0.2, 5.0, 6, dtype=torch.float64)
    res = hankel_from_arrays(a, b * s, c / s)
    torch.testing.assert_close(res.sigma, ref.sigma, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(res.energy, ref.energy, rtol=1e-9, atol=1e-12)


def test_hsv_of_singular_gramian() -> None:
    # An unreachable state makes P singular (no Cholesky factor exists); σ is the reachable part's plus a zero.
    a, b, c = _random_system(2, 5, seed=3)
    b[:, 2] = 0
    full = hankel_from_arrays(a, b, c)
    keep = [0, 1, 3, 4]
    part = hankel_from_arrays(a[:, keep], b[:, keep], c[:, keep])
    torch.testing.assert_close(full.sigma[:, :4], part.sigma, rtol=1e-9, atol=1e-12)
    assert (full.sigma[:, 4] < 1e-7 * full.sigma[:, 0]).all()
    assert (full.energy[:, 2] == 0).all()


def _scan_batch(seed: int, batch: int = 2, dim: int = 3, n: int = 4, seqlen: int = 9):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, dim, seqlen, generator=g)
    delta = torch.rand(batch, dim, seqlen, generator=g) * 0.5 + 0.05
    A = -torch.rand(dim, n, generator=g) - 0.1
    B = torch.randn(batch, n, seqlen, generator=g)
    C = torch.randn(batch, n, seqlen, generator=g)
    return u, delta, A, B, C


def _moments_direct(u, delta, A, B, C, scale):
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    a_bar = torch.exp(delta.unsqueeze(-1) * A[None, :, None, :]).mean(dim=(0, 2))
    drive = delta * u if scale == "input" else delta
    db = drive.unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)  # (Bt, D, L, N)
    M_B = torch.einsum("bdti,bdtj->dij", db, db) / (u.shape[0] * u.shape[2])
    Ct = C.transpose(1, 2)
    M_C = torch.einsum("bti,btj->ij", Ct, Ct) / (u.shape[0] * u.shape[2])
    return a_bar, M_B, M_C


@pytest.mark.parametrize("scale", ["input", "normalize"])
def test_streaming_equals_all_at_once(scale: str) -> None:
    batches = [_scan_batch(seed) for seed in range(3)]
    A = batches[0][2]
    acc = HankelAccumulator(scale)
    for u, delta, _, B, C in batches:
        acc.update(u, delta, A, B, C)
    cat = [torch.cat([b[i] for b in batches]) for i in (0, 1, 3, 4)]
    a_bar, M_B, M_C = _moments_direct(cat[0], cat[1], A, cat[2], cat[3], scale)
    direct = hankel_from_moments(a_bar, M_B, M_C, scale=scale)
    streamed = acc.energies()
    torch.testing.assert_close(streamed.a_bar, a_bar, rtol=1e-12, atol=0)
    torch.testing.assert_close(streamed.sigma, direct.sigma, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(streamed.energy, direct.energy, rtol=1e-10, atol=1e-14)


def test_weights_drop_padding_positions() -> None:
    u, delta, A, B, C = _scan_batch(5)
    weight = torch.ones(u.shape[0], u.shape[2])
    weight[:, -3:] = 0
    acc, ref = HankelAccumulator(), HankelAccumulator()
    acc.update(u, delta, A, B, C, weight)
    ref.update(u[..., :-3], delta[..., :-3], A, B[..., :-3], C[..., :-3])
    torch.testing.assert_close(acc.energies().sigma, ref.energies().sigma, rtol=1e-10, atol=1e-14)


def test_scale_conventions() -> None:
    u, delta, A, B, C = _scan_batch(7)
    u = u.double()
    u2 = u.clone()
    u2[:, 1] *= 10.0  # channel 1 gets ten times the input
    for scale in ("input", "normalize"):
        base, loud = HankelAccumulator(scale), HankelAccumulator(scale)
        base.update(u, delta, A, B, C)
        loud.update(u2, delta, A, B, C)
        e0, e1 = base.energies(), loud.energies()
        if scale == "input":  # the drive includes u: channel 1's σ and e scale by exactly 10
            torch.testing.assert_close(e1.sigma[1], 10 * e0.sigma[1], rtol=1e-10, atol=0)
            torch.testing.assert_close(e1.energy[0], e0.energy[0], rtol=1e-12, atol=0)
        else:  # u plays no part, and each channel's spectrum sums to one on the common scale
            torch.testing.assert_close(e1.sigma, e0.sigma, rtol=1e-12, atol=0)
            torch.testing.assert_close((e1.sigma * e1.channel_weights()).sum(1), torch.ones(3, dtype=torch.float64))


def test_non_finite_raises() -> None:
    u, delta, A, B, C = _scan_batch(2)
    u[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        HankelAccumulator().update(u, delta, A, B, C)
    with pytest.raises(ValueError, match="non-finite"):
        hankel_from_arrays(torch.tensor([[0.5]]), torch.tensor([[float("inf")]]), torch.tensor([[1.0]]))
    with pytest.raises(ValueError, match=r"\|ā\| >= 1"):
        hankel_from_arrays(torch.tensor([[1.0]]), torch.tensor([[1.0]]), torch.tensor([[1.0]]))


def test_empty_accumulator_and_bad_scale() -> None:
    with pytest.raises(ValueError, match="no calibration data"):
        HankelAccumulator().energies()
    with pytest.raises(ValueError, match="scale"):
        HankelAccumulator("bogus")  # type: ignore[arg-type]
