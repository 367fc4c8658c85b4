"""The layout helpers of ``mamba_inner_fn``: out_proj applied to the scan's ``(Bt, D, L)`` output in place, and
xz split along its memory order. Each must equal the plain composition (``F.linear`` on the transposed output,
``xz.chunk``) in values and float64 gradients, and must not make the copies it exists to avoid."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from compressm_kernels.ops.mamba_inner import project_to_tokens, split_channels

F64 = torch.float64


class _CountCopies(TorchDispatchMode):
    """Counts the ops that copy a tensor's elements into a new layout, and the elements they and concatenations
    write."""

    def __init__(self) -> None:
        super().__init__()
        self.copies = 0
        self.written = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.copy_, torch.ops.aten.clone, torch.ops.aten._to_copy):
            self.copies += 1
            self.written += out.numel()
        elif func.overloadpacket == torch.ops.aten.cat:
            self.written += out.numel()
        return out


def _leaf(*shape: int, dtype: torch.dtype = F64, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).requires_grad_(True)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_out_proj_equals_linear_on_the_transposed_output(batch: int, bias: bool) -> None:
    y, weight = _leaf(batch, 6, 11), _leaf(5, 6, seed=1)
    b = _leaf(5, seed=2) if bias else None
    out = project_to_tokens(y, weight, b)
    torch.testing.assert_close(out, F.linear(y.transpose(1, 2), weight, b))
    inputs = (y, weight) + ((b,) if bias else ())
    assert torch.autograd.gradcheck(lambda *t: project_to_tokens(*t) if bias else project_to_tokens(*t, None), inputs)


def test_out_proj_gives_dy_in_the_scans_layout_without_copies() -> None:
    """dy comes back as contiguous ``(Bt, D, L)`` rows (what the scan's backward reads) and neither pass copies;
    F.linear on the transposed output copies in both (which shows the probe sees copies)."""
    y, weight, b = _leaf(2, 6, 11, dtype=torch.float32), _leaf(5, 6, dtype=torch.float32), _leaf(5, dtype=torch.float32)
    cotangent = torch.randn(2, 11, 5)
    for fn, expect_copies in ((project_to_tokens, False), (lambda y, w, b: F.linear(y.transpose(1, 2), w, b), True)):
        with _CountCopies() as probe:
            out = fn(y, weight, b)
            dy = torch.autograd.grad(out, (y, weight, b), cotangent)[0]
        assert (probe.copies > 0) == expect_copies
        if not expect_copies:
            assert dy.shape == y.shape and dy.is_contiguous()


def test_out_proj_under_autocast_is_linears() -> None:
    y, weight, b = _leaf(2, 6, 11, dtype=torch.float32), _leaf(5, 6, dtype=torch.float32), _leaf(5, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = project_to_tokens(y, weight, b)
        expected = F.linear(y.transpose(1, 2), weight, b)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)


def _channels_first_xz(batch: int, dim: int, seqlen: int) -> tuple[Tensor, Tensor]:
    """A leaf ``(2·dim, Bt·L)`` GEMM output and xz, its ``(Bt, 2·dim, L)`` view (as Mamba's in_proj makes it)."""
    flat = _leaf(2 * dim, batch * seqlen)
    return flat, flat.view(2 * dim, batch, seqlen).permute(1, 0, 2)


def _token_major_xz(batch: int, dim: int, seqlen: int) -> tuple[Tensor, Tensor]:
    """A leaf ``(Bt, L, 2·dim)`` linear output and xz, its ``(Bt, 2·dim, L)`` view (transformers' in_proj)."""
    tokens = _leaf(batch, seqlen, 2 * dim)
    return tokens, tokens.transpose(1, 2)


@pytest.mark.parametrize("layout", ["channels-first", "token-major", "token-major, odd", "contiguous"])
def test_split_equals_chunk(layout: str) -> None:
    if layout == "channels-first":
        leaf, xz = _channels_first_xz(3, 4, 7)
    elif layout == "token-major":
        leaf, xz = _token_major_xz(3, 4, 7)
    elif layout == "token-major, odd":  # 9 channels: chunk gives x five, z four
        leaf = _leaf(3, 7, 9)
        xz = leaf.transpose(1, 2)
    else:
        leaf = xz = _leaf(3, 8, 7)
    x, z = split_channels(xz)
    x_ref, z_ref = xz.chunk(2, dim=1)
    assert torch.equal(x, x_ref) and torch.equal(z, z_ref)
    wx, wz = torch.randn(x.shape, dtype=F64), torch.randn(z.shape, dtype=F64)
    grad = torch.autograd.grad((x * wx).sum() + (z * wz).sum(), leaf)[0]
    grad_ref = torch.autograd.grad((x_ref * wx).sum() + (z_ref * wz).sum(), leaf)[0]
    assert torch.equal(grad, grad_ref)


def test_split_hands_the_gemm_its_gradient_without_a_copy() -> None:
    """Through the split, dx and dz reach the ``(2·D, Bt·L)`` GEMM output as one block, written by their
    concatenation alone; through ``xz.chunk`` the concatenated gradient is copied once more into that layout."""
    for split, copies in ((split_channels, False), (lambda xz: xz.chunk(2, dim=1), True)):
        leaf, xz = _channels_first_xz(2, 4, 7)
        x, z = split(xz)
        with _CountCopies() as probe:
            (grad,) = torch.autograd.grad((x, z), leaf, (torch.ones_like(x), 2 * torch.ones_like(z)))
        assert (probe.copies > 0) == copies
        assert torch.equal(grad, torch.cat([torch.ones(4, 14, dtype=F64), 2 * torch.ones(4, 14, dtype=F64)]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_out_proj_in_half_precision_is_linears(dtype: torch.dtype) -> None:
    """In bf16/fp16 the weight gradient must be rounded once, as F.linear's single GEMM does, not once per batch
    row: those dtypes take F.linear itself (bit for bit)."""
    y, weight = _leaf(4, 6, 11, dtype=dtype), _leaf(5, 6, dtype=dtype, seed=1)
    cotangent = torch.randn(4, 11, 5, dtype=dtype)
    out = project_to_tokens(y, weight, None)
    expected = F.linear(y.transpose(1, 2), weight)
    assert torch.equal(out, expected)
    for got, want in zip(torch.autograd.grad(out, (y, weight), cotangent),
                         torch.autograd.grad(expected, (y, weight), cotangent), strict=True):
        assert torch.equal(got, want)


def test_split_of_token_major_xz_writes_its_gradient_once() -> None:
    """For transformers' layout (in_proj's ``(Bt, L, 2·D)`` output, transposed) the gradient reaches in_proj's
    GEMM as ``(Bt·L, 2·D)`` rows after one write of its elements (dx and dz transposed into place); through
    ``xz.chunk`` it is concatenated and then transposed again, twice the writes. Only dz given: the x half is 0."""
    batch, dim, seqlen = 2, 4, 7
    weight = _leaf(2 * dim, 5, seed=3)
    for split, passes in ((split_channels, 1), (lambda xz: xz.chunk(2, dim=1), 2)):
        h = _leaf(batch, seqlen, 5, seed=4)
        xz = F.linear(h, weight).transpose(1, 2)
        x, z = split(xz)
        with _CountCopies() as probe:
            grads = torch.autograd.grad((x, z), (h, weight), (torch.ones_like(x), 2 * torch.ones_like(z)))
        assert probe.written == passes * xz.numel()
        ones = torch.cat([torch.ones(batch, seqlen, dim, dtype=F64), 2 * torch.ones(batch, seqlen, dim, dtype=F64)], -1)
        expected = torch.autograd.grad(F.linear(h, weight), (h, weight), ones)
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want)
    leaf, xz = _token_major_xz(batch, dim, seqlen)
    _, z = split_channels(xz)
    (grad,) = torch.autograd.grad(z.sum(), leaf)
    assert torch.equal(grad, torch.cat([torch.zeros(batch, seqlen, dim, dtype=F64),
                                        torch.ones(batch, seqlen, dim, dtype=F64)], -1))
