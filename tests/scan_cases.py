"""Shared test helpers: random scan inputs, per-dtype tolerances, gradient collection, oracles."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# (rtol, atol as a fraction of the expected tensor's largest magnitude). fp32/fp64 are tight; fp16/bf16
# allow the rounding of a few low-precision roundings of inputs/outputs.
TOLERANCES = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (1e-4, 2e-5),
    torch.float16: (3e-3, 2e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, name: str) -> None:
    """Elementwise ``|a - e| <= atol·max|e| + rtol·|e|``, with the worst element printed on failure."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    rtol, atol = TOLERANCES[dtype]
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), f"{name}: non-finite values in result"
    scale = max(e.abs().max().item(), 1e-6)
    err = (a - e).abs()
    excess = err - (atol * scale + rtol * e.abs())
    worst = int(excess.flatten().argmax())
    if excess.flatten()[worst] > 0:
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
        raise AssertionError(
            f"{name} ({dtype}): worst element {idx}: got {a[idx].item():.6g}, expected {e[idx].item():.6g} "
            f"(|err| {err[idx].item():.3g}, max |expected| {scale:.3g}, rtol {rtol}, atol {atol}·max)"
        )


@dataclass
class Case:
    batch: int = 2
    dim: int = 4
    seqlen: int = 16
    dstate: int = 4
    groups: int = 1
    b_form: str = "variable"  # "variable" | "grouped" | "invariant"
    c_form: str = "variable"
    has_D: bool = True
    has_z: bool = True
    has_delta_bias: bool = True
    delta_softplus: bool = True
    return_last_state: bool = True
    dtype: torch.dtype = torch.float32

    def __str__(self) -> str:
        flags = "".join(f for f, on in (("D", self.has_D), ("z", self.has_z), ("b", self.has_delta_bias),
                                        ("s", self.delta_softplus), ("l", self.return_last_state)) if on)
        dt = str(self.dtype).replace("torch.", "")
        return (f"Bt{self.batch}-D{self.dim}-L{self.seqlen}-N{self.dstate}-G{self.groups}-"
                f"{self.b_form[0]}{self.c_form[0]}-{flags or 'none'}-{dt}")


def _bc(case: Case, form: str, gen: torch.Generator, device) -> Tensor:
    b, d, length, n = case.batch, case.dim, case.seqlen, case.dstate
    if form == "invariant":
        return torch.randn(d, n, generator=gen).to(device)
    if form == "grouped":
        return torch.randn(b, case.groups, n, length, generator=gen).to(device, case.dtype)
    return torch.randn(b, n, length, generator=gen).to(device, case.dtype)


def make_inputs(case: Case, seed: int = 0, device="cpu") -> dict[str, Tensor | bool | None]:
    """Random scan inputs (A negative, delta around softplus' useful range), leaves requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    b, d, length, n = case.batch, case.dim, case.seqlen, case.dstate
    act = {"device": device, "dtype": case.dtype}
    param_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
    inputs = {
        "u": torch.randn(b, d, length, generator=gen).to(**act),
        "delta": (0.5 * torch.randn(b, d, length, generator=gen) - 1.0).to(**act),
        "A": (-torch.exp(0.5 * torch.randn(d, n, generator=gen))).to(device, param_dtype),
        "B": _bc(case, case.b_form, gen, device),
        "C": _bc(case, case.c_form, gen, device),
        "D": torch.randn(d, generator=gen).to(device, param_dtype) if case.has_D else None,
        "z": torch.randn(b, d, length, generator=gen).to(**act) if case.has_z else None,
        "delta_bias": (0.3 * torch.randn(d, generator=gen)).to(device, param_dtype) if case.has_delta_bias else None,
    }
    if not case.delta_softplus:  # keep delta positive without softplus
        inputs["delta"] = torch.rand(b, d, length, generator=gen).to(**act) * 0.5 + 0.05
        if inputs["delta_bias"] is not None:
            inputs["delta_bias"] = inputs["delta_bias"].abs() * 0.1
    for name in ("B", "C"):
        if inputs[name].dim() == 2:
            inputs[name] = inputs[name].to(param_dtype if case.dtype == torch.float64 else torch.float32)
    for t in inputs.values():
        if t is not None:
            t.requires_grad_(True)
    inputs["delta_softplus"] = case.delta_softplus
    inputs["return_last_state"] = case.return_last_state
    return inputs


TENSOR_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def step_inputs(batch=2, dim=6, dstate=13, groups=0, dtype=torch.float32, seed=0, flags=True,
                device="cpu") -> dict[str, Tensor | bool | None]:
    """One decode step's ``selective_state_update`` arguments: fp32 state and A, the rest in ``dtype``; B/C
    ``(Bt, N)`` or with ``groups`` ``(Bt, G, N)``; ``flags``: D, z, dt_bias and softplus."""
    gen = torch.Generator().manual_seed(seed)
    bc_shape = (batch, groups, dstate) if groups else (batch, dstate)
    inputs = {
        "state": torch.randn(batch, dim, dstate, generator=gen),
        "x": torch.randn(batch, dim, generator=gen).to(dtype),
        "dt": (0.5 * torch.randn(batch, dim, generator=gen) - 1).to(dtype),
        "A": -torch.exp(0.5 * torch.randn(dim, dstate, generator=gen)),
        "B": torch.randn(bc_shape, generator=gen).to(dtype),
        "C": torch.randn(bc_shape, generator=gen).to(dtype),
        "D": torch.randn(dim, generator=gen) if flags else None,
        "z": torch.randn(batch, dim, generator=gen).to(dtype) if flags else None,
        "dt_bias": 0.3 * torch.randn(dim, generator=gen) if flags else None,
    }
    return {k: (v.to(device) if v is not None else None) for k, v in inputs.items()} | {"dt_softplus": flags}


def step_mask(kind: str, dim: int, dstate: int, device="cpu") -> Tensor | None:
    """A decode step's state mask: ``"none"``, ``"shared"`` ``(N,)`` or ``"per_channel"`` ``(D, N)``, state 0 kept."""
    if kind == "none":
        return None
    mask = torch.rand((dim, dstate) if kind == "per_channel" else (dstate,),
                      generator=torch.Generator().manual_seed(1)) > 0.5
    mask[..., 0] = True
    return mask.to(device)


def run_with_grads(fn, inputs: dict, seed: int = 1, cotangents: tuple[Tensor, ...] | None = None,
                   **kwargs) -> dict[str, Tensor]:
    """Call ``fn(**inputs, **kwargs)`` and backprop ``cotangents`` (random ones from ``seed`` if not
    given); return the outputs and every input's gradient."""
    leaves = {k: v for k, v in inputs.items() if k in TENSOR_ARGS and v is not None}
    for t in leaves.values():
        t.grad = None
    result = fn(**inputs, **kwargs)
    outs = result if isinstance(result, tuple) else (result,)
    if cotangents is None:
        gen = torch.Generator().manual_seed(seed)
        cotangents = tuple(torch.randn(o.shape, generator=gen).to(o.device) for o in outs)
    loss = sum((o.float() * g).sum() for o, g in zip(outs, cotangents, strict=True))
    loss.backward()
    found = {"out": outs[0].detach()}
    if len(outs) > 1:
        found["last_state"] = outs[1].detach()
    for k, t in leaves.items():
        found["d" + k] = t.grad.detach().clone()
        t.grad = None
    return found


def mamba_selective_scan_ref():
    """mamba_ssm's ``selective_scan_ref``, the oracle. ``import mamba_ssm`` needs a ``selective_scan_cuda``
    module; ``install()`` provides one backed by our kernels where no real one exists (the oracle itself is
    mamba_ssm's pure-PyTorch reference and never calls into it)."""
    from compressm_kernels.integrations.mamba_ssm import install

    install()
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    return selective_scan_ref
