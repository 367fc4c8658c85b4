"""The drop-in Mamba layer: fused == unfused path, compacted == masked, decode == full forward, and bad
input that raises and changes nothing. (Comparisons with mamba_ssm itself: test_mamba_ssm_integration.py.)"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from compressm_kernels.modules import Mamba
from compressm_kernels.ops.conv1d import causal_conv1d_torch, causal_conv1d_update_torch
from compressm_kernels.ops.mamba_inner import mamba_inner_fn
from scan_cases import assert_close

F32 = torch.float32


def make_layer(d_state: int = 12, seed: int = 0, **kw) -> Mamba:
    torch.manual_seed(seed)
    layer = Mamba(16, d_state=d_state, layer_idx=0, **kw)
    with torch.no_grad():  # S4D-real A is identical across channels; make the states distinguishable
        layer.A_log.add_(0.3 * torch.randn(layer.A_log.shape))
    return layer


def inputs(batch: int = 2, seqlen: int = 13, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, seqlen, 16, generator=torch.Generator().manual_seed(seed))


def out_and_grads(layer: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    for p in layer.parameters():
        p.grad = None
    y = layer(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return {"out": y.detach(), **{n: p.grad.clone() for n, p in layer.named_parameters()}}


def decode(layer: Mamba, x: torch.Tensor, prompt: int) -> torch.Tensor:
    """Prompt through the cache-filling forward, then one token at a time (mamba_ssm's protocol)."""
    params = SimpleNamespace(seqlen_offset=0, key_value_memory_dict={})
    outs = [layer(x[:, :prompt], inference_params=params)]
    for t in range(prompt, x.shape[1]):
        params.seqlen_offset = t
        outs.append(layer(x[:, t:t + 1], inference_params=params))
    return torch.cat(outs, dim=1)


def test_fused_path_equals_unfused_path() -> None:
    layer, x = make_layer(), inputs()
    fused = out_and_grads(layer, x)
    layer.use_fast_path = False
    unfused = out_and_grads(layer, x)
    for k in fused:
        assert_close(fused[k], unfused[k], F32, k)


@pytest.mark.parametrize("d_state", [12, 2], ids=str)  # the C++ scan: one channel per vector; four to a vector
def test_layer_on_the_cpu_kernels_equals_the_reference(d_state: int, monkeypatch: pytest.MonkeyPatch) -> None:
    layer, x = make_layer(d_state=d_state), inputs(seqlen=70)
    got = out_and_grads(layer, x)
    monkeypatch.setenv("COMPRESSM_BACKEND", "reference")
    want = out_and_grads(layer, x)
    for k in want:
        assert_close(got[k], want[k], F32, k)


@pytest.mark.parametrize("bias", [False, True])
def test_in_proj_layout_is_the_linear_transposed(bias: bool) -> None:
    """The forward's in_proj output: the values (and gradients) of ``in_proj(x).transpose(1, 2)``, but unit-stride
    along L, so the conv and the scan read x and z in place."""
    layer, x = make_layer(bias=bias), inputs()
    got = layer._in_proj_channels_first(x)
    want = layer.in_proj(x).transpose(1, 2)
    assert got.stride(-1) == 1 and want.stride(-1) != 1
    assert_close(got, want, F32, "xz")
    weight = torch.linspace(-1, 1, got.numel()).view_as(got)
    params = list(layer.in_proj.parameters())
    for a, b, name in zip(torch.autograd.grad((got * weight).sum(), params),
                          torch.autograd.grad((want * weight).sum(), params), ("weight", "bias"), strict=False):
        assert_close(a, b, F32, f"d in_proj.{name}")


def test_checkpoint_levels_agree() -> None:
    layer, x = make_layer(), inputs()
    xz = layer.in_proj(x).transpose(1, 2).detach().requires_grad_(True)
    results = []
    for lvl in (0, 1):
        args = (xz, layer.conv1d.weight, layer.conv1d.bias, layer.x_proj.weight, layer.dt_proj.weight,
                layer.out_proj.weight, None, -torch.exp(layer.A_log), None, None, layer.D)
        y = mamba_inner_fn(*args, delta_bias=layer.dt_proj.bias, checkpoint_lvl=lvl)
        results.append(torch.autograd.grad(y.square().sum(), [xz, layer.x_proj.weight, layer.A_log]))
    for a, b, name in zip(*results, ("dxz", "dx_proj", "dA_log"), strict=True):
        assert_close(a, b, F32, name)


@pytest.mark.parametrize(("checkpoint_lvl", "expected"), [(None, 0), (0, 0), (1, 1)], ids=["auto", "0", "1"])
def test_layer_passes_its_checkpoint_level(checkpoint_lvl: int | None, expected: int,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # None means 1 on CUDA (as mamba_ssm) and 0 elsewhere: these CPU inputs get 0.
    import compressm_kernels.modules.mamba as layer_module

    seen = []

    def spy(*args, checkpoint_lvl: int, **kwargs):
        seen.append(checkpoint_lvl)
        return mamba_inner_fn(*args, checkpoint_lvl=checkpoint_lvl, **kwargs)

    monkeypatch.setattr(layer_module, "mamba_inner_fn", spy)
    layer, x = make_layer(checkpoint_lvl=checkpoint_lvl), inputs()
    layer(x).sum().backward()
    assert seen == [expected] and layer.A_log.grad is not None
    with pytest.raises(ValueError, match="checkpoint_lvl must be None, 0 or 1, got 2"):
        Mamba(16, checkpoint_lvl=2)


@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_compacted_layer_equals_masked_layer(order: str) -> None:
    keep = torch.tensor([0, 3, 4, 8, 11]) if order == "sorted" else torch.tensor([8, 0, 11, 4, 3])
    mask = torch.zeros(12, dtype=torch.bool)
    mask[keep] = True
    masked, x = make_layer(), inputs()
    compact = copy.deepcopy(masked)
    masked.set_state_mask(mask)
    a_log, x_proj = compact.A_log, compact.x_proj.weight
    compact.reduce_state(keep)
    assert compact.A_log is a_log and compact.x_proj.weight is x_proj  # same Parameter objects
    assert compact.d_state == 5 and tuple(compact.A_log.shape) == (32, 5)
    assert tuple(compact.x_proj.weight.shape) == (1 + 10, 32) and "d_state=5" in repr(compact)
    got, want = out_and_grads(compact, x), out_and_grads(masked, x)
    rows = torch.cat([torch.tensor([0]), 1 + keep, 13 + keep])
    want["A_log"] = want["A_log"][:, keep]
    want["x_proj.weight"] = want["x_proj.weight"][rows]
    for k in got:
        assert_close(got[k], want[k], F32, k)
    # The masked layer's dropped states get exactly zero gradient.
    grads = out_and_grads(masked, x)
    assert grads["A_log"][:, ~mask].abs().max() == 0
    dropped = torch.cat([1 + (~mask).nonzero().flatten(), 13 + (~mask).nonzero().flatten()])
    assert grads["x_proj.weight"][dropped].abs().max() == 0


def test_reduce_state_slices_grads_and_keeps_optimizer_references() -> None:
    layer, x = make_layer(), inputs()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).sum().backward()
    layer.reduce_state(torch.tensor([1, 2]))
    assert layer.A_log.grad.shape == layer.A_log.shape and layer.x_proj.weight.grad.shape == layer.x_proj.weight.shape
    assert any(p is layer.A_log for g in opt.param_groups for p in g["params"])
    opt.step()  # shapes of params and grads agree after the cut
    assert torch.isfinite(layer(x)).all()


@pytest.mark.parametrize("mask_kind", ["none", "shared", "per-channel"])
def test_decode_equals_full_forward(mask_kind: str) -> None:
    layer, x = make_layer(), inputs(seqlen=9)
    gen = torch.Generator().manual_seed(3)
    if mask_kind == "shared":
        layer.set_state_mask(torch.rand(12, generator=gen) > 0.5)
    elif mask_kind == "per-channel":
        layer.set_state_mask(torch.rand(32, 12, generator=gen) > 0.5)
    with torch.no_grad():
        full = layer(x)
        for prompt in (1, 5):  # prompt shorter and longer than d_conv
            assert_close(decode(layer, x, prompt), full, F32, f"decode after a {prompt}-token prompt")


def test_decode_after_compaction_and_cut_during_decoding() -> None:
    keep = torch.tensor([2, 5, 6, 9])
    mask = torch.zeros(12, dtype=torch.bool)
    mask[keep] = True
    masked, x = make_layer(), inputs(seqlen=10)
    masked.set_state_mask(mask)
    compact = copy.deepcopy(masked)
    compact.set_state_mask(None)
    compact.reduce_state(keep)
    with torch.no_grad():
        full = masked(x)
        assert_close(decode(compact, x, 3), full, F32, "decode of the compacted layer")
        # Cut while a cache is live: the layer resizes its own cache, decoding continues consistently.
        live = copy.deepcopy(masked)
        params = SimpleNamespace(seqlen_offset=0, key_value_memory_dict={})
        outs = [live(x[:, :4], inference_params=params)]
        live.reduce_state(keep)
        assert params.key_value_memory_dict[0][1].shape[-1] == 4 and live.state_mask is None
        for t in range(4, 10):
            params.seqlen_offset = t
            outs.append(live(x[:, t:t + 1], inference_params=params))
        assert_close(torch.cat(outs, 1), full, F32, "decode with a cut in the middle")
        # A fresh cache follows the current state size.
        conv_state, ssm_state = compact.allocate_inference_cache(2, 10)
        assert tuple(ssm_state.shape) == (2, 32, 4) and tuple(conv_state.shape) == (2, 32, 4)


def test_state_dict_of_compacted_layer_loads_into_a_fresh_layer() -> None:
    small = make_layer()
    small.reduce_state(torch.tensor([0, 7, 3]))
    fresh = make_layer(seed=5)
    fresh.load_state_dict(small.state_dict())
    assert fresh.d_state == 3 and fresh.x_proj.out_features == 7
    x = inputs()
    with torch.no_grad():
        assert_close(fresh(x), small(x), F32, "out")


def _snapshot(layer: Mamba) -> dict:
    return {"A_log": layer.A_log.detach().clone(), "x_proj": layer.x_proj.weight.detach().clone(),
            "mask": None if layer.state_mask is None else layer.state_mask.clone()}


def _unchanged(layer: Mamba, before: dict) -> bool:
    now = _snapshot(layer)
    same_mask = (now["mask"] is None) == (before["mask"] is None) and (
        now["mask"] is None or torch.equal(now["mask"], before["mask"]))
    return torch.equal(now["A_log"], before["A_log"]) and torch.equal(now["x_proj"], before["x_proj"]) and same_mask


@pytest.mark.parametrize(
    ("keep", "error", "match"),
    [
        (torch.tensor([0, 12]), ValueError, r"\[0, 12\)"),
        (torch.tensor([-1, 2]), ValueError, r"\[0, 12\)"),
        (torch.tensor([1, 1, 2]), ValueError, "unique"),
        (torch.tensor([], dtype=torch.long), ValueError, "non-empty"),
        (torch.tensor([[0, 1]]), ValueError, "1-D"),
        (torch.tensor([0.0, 1.0]), TypeError, "integer"),
        ([0, 1], TypeError, "integer tensor"),
        (torch.tensor([4, 5]), ValueError, "masked-out"),
    ],
    ids=["out-of-range", "negative", "duplicated", "empty", "2d", "float", "list", "only-masked"],
)
def test_bad_keep_raises_and_changes_nothing(keep, error, match) -> None:
    layer = make_layer()
    mask = torch.ones(12, dtype=torch.bool)
    mask[4:6] = False
    layer.set_state_mask(mask)
    before = _snapshot(layer)
    with pytest.raises(error, match=match):
        layer.reduce_state(keep)
    assert _unchanged(layer, before) and layer.d_state == 12


@pytest.mark.parametrize(
    ("mask", "error", "match"),
    [
        (torch.ones(11, dtype=torch.bool), ValueError, r"\(N,\) = \(12,\)"),
        (torch.ones(31, 12, dtype=torch.bool), ValueError, r"\(D, N\) = \(32, 12\)"),
        (torch.ones(12), TypeError, "bool"),
        (torch.zeros(12, dtype=torch.bool), ValueError, "keeps no state"),
    ],
    ids=["short", "wrong-channels", "float", "all-false"],
)
def test_bad_mask_raises_and_changes_nothing(mask, error, match) -> None:
    layer = make_layer()
    layer.set_state_mask(torch.arange(12) % 2 == 0)
    before = _snapshot(layer)
    with pytest.raises(error, match=match):
        layer.set_state_mask(mask)
    assert _unchanged(layer, before)


def test_bad_forward_and_stale_cache_raise() -> None:
    layer = make_layer()
    with pytest.raises(ValueError, match="hidden_states must have shape"):
        layer(torch.randn(2, 5, 15))
    conv_state, ssm_state = layer.allocate_inference_cache(2, 8)
    stale = ssm_state.clone()
    layer.reduce_state(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="ssm_state must have shape"):
        layer.step(torch.randn(2, 1, 16), conv_state, stale)


def test_mamba_inner_fn_rejects_uncompacted_x_proj() -> None:
    layer = make_layer()
    A = -torch.exp(layer.A_log[:, :4])  # A compacted, x_proj not: the mamba_ssm trap
    xz = torch.randn(2, 64, 7)
    with pytest.raises(ValueError, match=r"slice x_proj's rows"):
        mamba_inner_fn(xz, layer.conv1d.weight, layer.conv1d.bias, layer.x_proj.weight, layer.dt_proj.weight,
                       layer.out_proj.weight, None, A, D=layer.D, delta_bias=layer.dt_proj.bias)


def test_causal_conv_matches_conv1d_and_its_decode_steps() -> None:
    torch.manual_seed(0)
    conv = nn.Conv1d(6, 6, 4, groups=6, padding=3)
    x = torch.randn(2, 6, 9)
    want = conv(x)[..., :9]
    got = causal_conv1d_torch(x, conv.weight.squeeze(1), conv.bias)
    assert_close(got, want, F32, "conv")
    state = torch.zeros(2, 6, 4)
    steps = [causal_conv1d_update_torch(x[..., t], state, conv.weight.squeeze(1), conv.bias) for t in range(9)]
    assert_close(torch.stack(steps, -1), want, F32, "conv decode")


def test_reduce_state_alone_keeps_training_with_last_loss_alive() -> None:
    """A plain loop keeps last step's loss (and its graph) alive across reduce_state; the next backward
    must still work and the optimizer must keep stepping the same parameter objects."""
    torch.manual_seed(0)
    layer = Mamba(16, d_state=8, layer_idx=0)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-2)
    x = torch.randn(2, 12, 16)
    loss = layer(x).square().mean()
    loss.backward()
    opt.step()
    params_before = [id(p) for p in layer.parameters()]
    layer.reduce_state(torch.tensor([0, 3, 5]))
    opt.zero_grad()
    loss = layer(x).square().mean()
    loss.backward()
    opt.step()
    assert [id(p) for p in layer.parameters()] == params_before
    assert layer.A_log.grad.shape == (layer.A_log.shape[0], 3)


def test_layer_compiles_without_graph_breaks_on_cpu() -> None:
    """torch.compile(fullgraph=True) traces the CPU layer through our custom ops (conv and scan kernels, whose
    availability checks and backend choice must not reach importlib or logging) with eager's results."""
    from compressm_kernels.ops.selective_scan import cpu

    if cpu.load_extension("_C")[0] is None:
        pytest.skip("compressm_kernels._C is not built")
    layer, x = make_layer(), inputs()
    eager = out_and_grads(layer, x)
    compiled = torch.compile(layer.forward, fullgraph=True, backend="aot_eager")
    for p in layer.parameters():
        p.grad = None
    y = compiled(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    found = {"out": y.detach(), **{n: p.grad.clone() for n, p in layer.named_parameters()}}
    for k in eager:
        assert_close(found[k], eager[k], F32, k)
    from torch._dynamo.backends.common import aot_autograd

    ops = set()

    def record(gm, _):
        ops.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch.compile(layer.forward, fullgraph=True, backend=aot_autograd(fw_compiler=record))(x)
    assert {"compressm.causal_conv1d_fwd_cpu.default", "compressm.selective_scan_fwd_cpu.default"} <= ops, ops
