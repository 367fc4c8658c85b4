"""The C++ CPU causal conv1d: outputs and every gradient against the float64 PyTorch reference, strided and
low-precision inputs, the dispatch in ``causal_conv1d``, bad inputs; its decode step against PyTorch's."""

from __future__ import annotations

import pytest
import torch

from compressm_kernels.ops import conv1d_cpu
from compressm_kernels.ops.conv1d import (
    causal_conv1d,
    causal_conv1d_torch,
    causal_conv1d_update,
    causal_conv1d_update_torch,
)
from compressm_kernels.ops.selective_scan import cpu
from scan_cases import assert_close

pytestmark = pytest.mark.skipif(cpu.load_extension("_C")[0] is None, reason="compressm_kernels._C is not built")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _inputs(batch, dim, seqlen, width, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xz = torch.randn(batch, 2 * dim, seqlen, generator=gen)  # x is its first half: strided along D
    weight = torch.randn(dim, width, generator=gen) / width
    bias = torch.randn(dim, generator=gen)
    dout = torch.randn(batch, dim, seqlen, generator=gen)
    return xz, weight, bias, dout


def _grads(fn, x, weight, bias, dout):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias) if t is not None]
    x_, w_ = leaves[0], leaves[1]
    b_ = leaves[2] if bias is not None else None
    out = fn(x_, w_, b_)
    return out, torch.autograd.grad(out, leaves, dout)


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize(("batch", "dim", "seqlen", "width"),
                         [(2, 5, 37, 4), (1, 3, 1, 4), (2, 4, 3, 4), (1, 6, 600, 3), (3, 2, 17, 2), (1, 4, 9, 6)],
                         ids=str)
def test_matches_float64_reference(batch, dim, seqlen, width, with_bias, silu) -> None:
    xz, weight, bias, dout = _inputs(batch, dim, seqlen, width)
    x = xz[:, :dim]  # a view: unit stride along L, channel stride 2·D·L... per batch
    bias = bias if with_bias else None
    act = "silu" if silu else None
    got, got_grads = _grads(lambda a, w, b: conv1d_cpu.causal_conv1d_cpu(a, w, b, silu), x, weight, bias, dout)
    want, want_grads = _grads(lambda a, w, b: causal_conv1d_torch(a, w, b, act), x.double(), weight.double(),
                              None if bias is None else bias.double(), dout.double())
    assert got.dtype == F32 and got.is_contiguous()
    assert_close(got, want, F32, "out")
    names = ("dx", "dweight", "dbias")[:len(want_grads)]
    for name, g, w in zip(names, got_grads, want_grads, strict=True):
        assert g.dtype == F32
        assert_close(g, w, F32, name)


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_low_precision_activations(dtype) -> None:
    """fp16/bf16 x: fp32 math inside, output and dx in x's dtype, weight/bias gradients fp32."""
    xz, weight, bias, dout = _inputs(2, 4, 41, 4, seed=1)
    x = xz[:, :4].to(dtype)
    got, (dx, dw, db) = _grads(lambda a, w, b: conv1d_cpu.causal_conv1d_cpu(a, w, b, True), x, weight, bias,
                               dout.to(dtype))
    want, want_grads = _grads(lambda a, w, b: causal_conv1d_torch(a, w, b, "silu"), x.double(), weight.double(),
                              bias.double(), dout.to(dtype).double())
    assert got.dtype == dtype and dx.dtype == dtype and dw.dtype == F32 and db.dtype == F32
    assert_close(got, want, dtype, "out")
    for name, g, w in zip(("dx", "dweight", "dbias"), (dx, dw, db), want_grads, strict=True):
        assert_close(g, w, dtype, name)


def test_dispatch_and_inputs_untouched() -> None:
    """``causal_conv1d`` takes the C++ kernel for CPU fp32 inputs (custom op in the graph), the reference for
    float64; neither writes its inputs; a non-unit-stride x (a transposed view) gives the same result."""
    xz, weight, bias, dout = _inputs(2, 5, 23, 4, seed=2)
    x = xz[:, :5]
    before = [t.clone() for t in (xz, weight, bias, dout)]
    out, grads = _grads(lambda a, w, b: causal_conv1d(a, w, b, activation="silu"), x, weight, bias, dout)
    want, want_grads = _grads(lambda a, w, b: causal_conv1d_torch(a, w, b, "silu"), x.double(), weight.double(),
                              bias.double(), dout.double())
    assert_close(out, want, F32, "dispatch")
    assert_close(grads[0], want_grads[0], F32, "dispatch dx")
    for t, b in zip((xz, weight, bias, dout), before, strict=True):
        assert torch.equal(t, b)
    graph = torch.fx.experimental.proxy_tensor.make_fx(
        lambda a, w, b: causal_conv1d(a, w, b, activation="silu"))(x, weight, bias)
    assert any("causal_conv1d_fwd_cpu" in str(n.target) for n in graph.graph.nodes)
    strided = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, L stride D
    assert strided.stride(-1) != 1
    assert torch.equal(causal_conv1d(strided, weight, bias, activation="silu"), out)
    assert causal_conv1d(x.double(), weight.double(), bias.double(), "silu").dtype == torch.float64


def test_custom_ops_pass_opcheck_and_compile_without_graph_breaks() -> None:
    xz, weight, bias, dout = _inputs(2, 3, 11, 4, seed=4)
    x = xz[:, :3]
    torch.library.opcheck(conv1d_cpu.causal_conv1d_fwd_cpu, (x, weight, bias, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(conv1d_cpu.causal_conv1d_bwd_cpu, (x, weight, None, dout, False),
                          test_utils=("test_schema", "test_faketensor"))

    def loss(a, w, b):
        return (causal_conv1d(a, w, b, activation="silu") * dout).sum()

    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*leaves), leaves)
    want = torch.autograd.grad(loss(*leaves), leaves)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_thread_count_does_not_change_results() -> None:
    xz, weight, bias, dout = _inputs(3, 64, 700, 4, seed=3)
    x = xz[:, :64]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(_grads(lambda a, w, b: conv1d_cpu.causal_conv1d_cpu(a, w, b, True), x, weight, bias, dout))
    finally:
        torch.set_num_threads(threads)
    (out1, g1), (out2, g2) = results
    assert torch.equal(out1, out2)
    for a, b in zip(g1, g2, strict=True):
        assert torch.equal(a, b)


def test_bad_inputs_name_the_argument() -> None:
    xz, weight, bias, _ = _inputs(2, 4, 8, 4)
    x = xz[:, :4]
    with pytest.raises(ValueError, match="weight must have shape"):
        causal_conv1d(x, weight[:3], bias)
    with pytest.raises(ValueError, match="bias must have shape"):
        causal_conv1d(x, weight, bias[:3])
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, weight, bias, activation="relu")
    ext = cpu.load_extension("_C")[0]
    with pytest.raises(ValueError, match="weight must have shape"):
        ext.conv1d_fwd(x, weight[:, None], bias, True)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        ext.conv1d_fwd(x.to(torch.int32), weight, bias, True)
    with pytest.raises(ValueError, match="dout must have shape"):
        ext.conv1d_bwd(x, weight, bias, torch.zeros(2, 4, 7), True)


@pytest.mark.parametrize(("width", "keep", "state_dtype", "silu", "with_bias"),
                         [(4, 4, F32, True, True), (4, 3, F32, False, True), (3, 5, F32, True, False),
                          (2, 1, BF16, True, True), (4, 4, BF16, False, False), (1, 2, F32, True, True)], ids=str)
def test_decode_step_matches_the_torch_step(width, keep, state_dtype, silu, with_bias) -> None:
    """Token by token: the C++ step's outputs and shifted conv_state == the PyTorch step's, and both == the
    full causal conv over the sequence."""
    gen = torch.Generator().manual_seed(5)
    xz = torch.randn(2, 10, 9, generator=gen)  # x = xz[:, :5, t]: a strided (Bt, D) token
    weight, bias = torch.randn(5, width, generator=gen), torch.randn(5, generator=gen) if with_bias else None
    act = "silu" if silu else None
    ours = torch.zeros(2, 5, keep, dtype=state_dtype)
    theirs = ours.clone()
    steps = []
    with torch.no_grad():
        for t in range(9):
            x = xz[:, :5, t]
            got = causal_conv1d_update(x, ours, weight, bias, act)
            want = causal_conv1d_update_torch(x, theirs, weight, bias, act)
            assert got.dtype == x.dtype and got.shape == x.shape
            assert_close(got, want, F32, f"out {t}")
            assert_close(ours, theirs, state_dtype, f"conv_state {t}")
            steps.append(got)
        full = causal_conv1d_torch(xz[:, :5].double(), weight.double(), None if bias is None else bias.double(), act)
    if state_dtype == F32:
        assert_close(torch.stack(steps, -1), full, F32, "steps == full conv")


def test_decode_step_takes_a_token_as_bt_d_1(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token given as (Bt, D, 1), as transformers' Mamba passes it, runs the C++ step too (it took the PyTorch
    step's F.conv1d before) and comes back in that shape."""
    gen = torch.Generator().manual_seed(7)
    x, weight = torch.randn(2, 3, 1, generator=gen), torch.randn(3, 4, generator=gen)
    bias, ours = torch.randn(3, generator=gen), torch.randn(2, 3, 4, generator=gen)
    theirs = ours.clone()
    steps = []
    real_step = conv1d_cpu.causal_conv1d_update_step
    monkeypatch.setattr(conv1d_cpu, "causal_conv1d_update_step", lambda *a: steps.append(1) or real_step(*a))
    with torch.no_grad():
        got = causal_conv1d_update(x, ours, weight, bias, "silu")
        want = causal_conv1d_update_torch(x, theirs, weight, bias, "silu")
    assert steps == [1] and got.shape == (2, 3, 1)
    assert_close(got, want, F32, "out")
    assert_close(ours, theirs, F32, "conv_state")


def test_decode_step_routes_and_bad_inputs() -> None:
    """The step takes the C++ kernel without autograd, the PyTorch step when a gradient is needed; bad shapes
    raise naming the argument and leave conv_state untouched."""
    gen = torch.Generator().manual_seed(6)
    x, weight, bias = torch.randn(2, 3, generator=gen), torch.randn(3, 4, generator=gen), torch.randn(3, generator=gen)
    state = torch.randn(2, 3, 4, generator=gen)
    assert conv1d_cpu.update_unavailable_reason(x, state, weight, bias) is None
    assert "backward" in conv1d_cpu.update_unavailable_reason(x, state, weight.requires_grad_(True), bias)
    weight = weight.detach()
    before = state.clone()
    with pytest.raises(ValueError, match="conv_state must have shape"):
        causal_conv1d_update(x, state[:, :, :2], weight, bias, "silu")
    with pytest.raises(ValueError, match="weight must have shape"):
        causal_conv1d_update(x, state, weight[:2], bias, "silu")
    ext = cpu.load_extension("_C")[0]
    with pytest.raises(ValueError, match="conv_state must have shape"):
        ext.conv1d_update(x, state[:1], weight, bias, True)
    with pytest.raises(TypeError, match="conv_state must be float32"):
        ext.conv1d_update(x, state.double(), weight, bias, True)
    assert torch.equal(state, before)


@pytest.mark.parametrize("needs_grad", [False, True], ids=["cpp_step", "torch_step"])
def test_decode_step_refuses_an_expanded_state(needs_grad: bool) -> None:
    # An expand()ed conv_state (the batch axis at stride 0) would have both batch rows written to the same memory.
    gen = torch.Generator().manual_seed(7)
    x, weight = torch.randn(2, 3, generator=gen), torch.randn(3, 4, generator=gen).requires_grad_(needs_grad)
    base = torch.randn(1, 3, 4, generator=gen)
    before = base.clone()
    message = r"conv_state is updated in place but has overlapping memory.*strides \[0, 4, 1\]; pass a clone\(\)"
    with pytest.raises(ValueError, match=message):
        causal_conv1d_update(x, base.expand(2, 3, 4), weight, None, "silu")
    assert torch.equal(base, before)
