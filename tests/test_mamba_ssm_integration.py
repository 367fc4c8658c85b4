"""Stock mamba_ssm on our kernels (install()), and our Mamba layer against mamba_ssm's."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from compressm_kernels import selective_scan_ref
from compressm_kernels.integrations import mamba_ssm as bridge
from compressm_kernels.modules import Mamba
from scan_cases import assert_close

pytestmark = pytest.mark.oracle
F32 = torch.float32
DONE = bridge.install()  # before mamba_ssm is imported: it fills in mamba_ssm's CUDA-only modules

from mamba_ssm.models.config_mamba import MambaConfig  # noqa: E402
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel  # noqa: E402
from mamba_ssm.modules.mamba_simple import Mamba as MambaSSM  # noqa: E402
from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as mamba_scan  # noqa: E402
from mamba_ssm.ops.selective_scan_interface import selective_scan_ref as mamba_scan_ref  # noqa: E402
from mamba_ssm.ops.triton.layer_norm import layer_norm_fn, layer_norm_ref, rms_norm_ref  # noqa: E402


def test_install_is_idempotent_and_registers_our_module() -> None:
    assert bridge.install() == DONE
    import selective_scan_cuda

    assert selective_scan_cuda.fwd is bridge.fwd and DONE["selective_scan_cuda"].startswith("compressm")


def scan_inputs(seqlen: int, dstate: int, has_z: bool, has_d: bool, seed: int = 0, dim: int = 3):
    gen = torch.Generator().manual_seed(seed)
    t = {
        "u": torch.randn(2, dim, seqlen, generator=gen),
        "delta": 0.5 * torch.randn(2, dim, seqlen, generator=gen) - 2.0,
        "A": -torch.exp(0.5 * torch.randn(dim, dstate, generator=gen)),
        "B": torch.randn(2, dstate, seqlen, generator=gen),
        "C": torch.randn(2, dstate, seqlen, generator=gen),
        "D": torch.randn(dim, generator=gen) if has_d else None,
        "z": torch.randn(2, dim, seqlen, generator=gen) if has_z else None,
        "delta_bias": 0.3 * torch.randn(dim, generator=gen),
    }
    return {k: (v.requires_grad_(True) if v is not None else None) for k, v in t.items()}


# mamba_ssm keeps one carry per 2048 steps; the tests shrink the chunk to 16 so that several chunks
# (and a short last one) cost a few hundred steps, and check the real size on one tiny input.
@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(bridge, "CHUNK", 16)


@pytest.mark.parametrize(("seqlen", "has_z", "has_d"), [(37, True, True), (37, False, False), (16, True, False)],
                         ids=["L37-zD", "L37-plain", "L16-z"])
def test_selective_scan_cuda_matches_mamba_reference(seqlen: int, has_z: bool, has_d: bool, small_chunks) -> None:
    """mamba_ssm's selective_scan_fn (through our fwd/bwd) == mamba_ssm's pure-PyTorch reference."""
    t = scan_inputs(seqlen, 5, has_z, has_d)
    gen = torch.Generator().manual_seed(9)
    dout = torch.randn(2, 3, seqlen, generator=gen)
    results = []
    for fn in (mamba_scan, mamba_scan_ref):
        out, last = fn(**t, delta_softplus=True, return_last_state=True)
        leaves = [v for v in t.values() if v is not None]
        results.append((out, last, *torch.autograd.grad(out, leaves, dout)))
    names = ["out", "last_state"] + ["d" + k for k, v in t.items() if v is not None]
    for got, want, name in zip(*results, names, strict=True):
        assert_close(got, want, F32, name)


def test_real_chunk_size() -> None:
    assert bridge.CHUNK == 2048
    u = torch.randn(1, 1, 2049)
    out, x = bridge.fwd(u, u, -torch.ones(1, 1), torch.ones(1, 1, 1, 2049), torch.ones(1, 1, 1, 2049), None, None,
                        None, True)
    assert tuple(x.shape) == (1, 1, 2, 2) and tuple(out.shape) == (1, 1, 2049)


def test_fwd_chunk_carries_and_bwd_contract(small_chunks) -> None:
    t = {k: (v.detach() if v is not None else None) for k, v in scan_inputs(37, 4, True, True).items()}
    B4, C4 = t["B"][:, None], t["C"][:, None]  # mamba_ssm hands the kernel (Bt, G, N, L)
    out, x, out_z = bridge.fwd(t["u"], t["delta"], t["A"], B4, C4, t["D"], t["z"], t["delta_bias"], True)
    assert x.dtype == torch.float32 and tuple(x.shape) == (2, 3, 3, 8)
    dt = F.softplus(t["delta"] + t["delta_bias"][:, None])
    for c, end in enumerate((16, 32, 37)):
        prefix = {k: (v[..., :end] if k in ("u", "delta", "B", "C") else v) for k, v in t.items() if k != "z"}
        _, h = selective_scan_ref(**prefix, delta_softplus=True, return_last_state=True)
        assert_close(x[:, :, c, 1::2], h, F32, f"state at the end of chunk {c}")
        assert_close(x[:, :, c, 0::2], torch.exp(dt[..., :end].sum(-1, keepdim=True) * t["A"]), F32, f"decay {c}")
    ref = selective_scan_ref(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], None, t["delta_bias"], True)
    assert_close(out, ref, F32, "out (ungated)")
    assert_close(out_z, ref * F.silu(t["z"]), F32, "out_z")
    # bwd: dz is written into the buffer passed in; recompute_out_z appends out_z; dD is None without D.
    dz = torch.full_like(t["z"], float("nan"))
    res = bridge.bwd(t["u"], t["delta"], t["A"], B4, C4, t["D"], t["z"], t["delta_bias"], torch.ones_like(out), x,
                     out, dz, True, True)
    assert len(res) == 9 and res[7] is dz and torch.isfinite(dz).all()
    assert_close(res[8], out_z, F32, "recomputed out_z")
    assert res[3].shape == B4.shape and res[2].dtype == torch.float32
    res = bridge.bwd(t["u"], t["delta"], t["A"], B4, C4, None, None, None, torch.ones_like(out), x, None, None,
                     True, False)
    assert len(res) == 7 and res[5] is None and res[6] is None


@pytest.mark.parametrize("initial_states", [False, True], ids=["C++ conv", "torch conv with initial states"])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_route_matches_its_reference(activation: str | None, initial_states: bool) -> None:
    """causal_conv1d_fn through our causal_conv1d_cuda (the C++ conv, or PyTorch with initial states) ==
    causal_conv1d's own PyTorch reference, output and every gradient."""
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_fn, causal_conv1d_ref

    gen = torch.Generator().manual_seed(7)
    xz = torch.randn(2, 10, 19, generator=gen)
    leaves = {"x": xz[:, :5].detach().requires_grad_(True),  # strided along D, as mamba_ssm's x
              "weight": torch.randn(5, 4, generator=gen).requires_grad_(True),
              "bias": torch.randn(5, generator=gen).requires_grad_(True)}
    if initial_states:
        leaves["initial_states"] = torch.randn(2, 3, 5, generator=gen).transpose(1, 2).requires_grad_(True)
    dout = torch.randn(2, 5, 19, generator=gen)
    results = []
    for fn in (causal_conv1d_fn, causal_conv1d_ref):
        out = fn(**leaves, activation=activation)
        results.append((out, *torch.autograd.grad(out, list(leaves.values()), dout)))
    for name, got, want in zip(["out", *leaves], *results, strict=True):
        assert_close(got, want, F32, name)


def test_layer_norm_route_matches_mamba_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    x, res = torch.randn(3, 5, 8, generator=gen), torch.randn(3, 5, 8, generator=gen)
    w, b = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    for rms, ref in ((True, rms_norm_ref), (False, layer_norm_ref)):
        y, r = layer_norm_fn(x, w, None if rms else b, residual=res, prenorm=True, residual_in_fp32=True, eps=1e-5,
                             is_rms_norm=rms)
        y_ref, r_ref = ref(x, w, None if rms else b, residual=res, prenorm=True, eps=1e-5, upcast=True)
        assert_close(y, y_ref, F32, "y")
        assert_close(r, r_ref, F32, "residual")
        assert r.dtype == torch.float32


def pair(d_state: int = 8, seed: int = 0) -> tuple[MambaSSM, Mamba]:
    torch.manual_seed(seed)
    theirs = MambaSSM(16, d_state=d_state, layer_idx=0)
    torch.manual_seed(seed)
    ours = Mamba(16, d_state=d_state, layer_idx=0)
    return theirs, ours


def test_same_seed_same_weights_and_state_dicts_load_both_ways() -> None:
    theirs, ours = pair()
    assert list(theirs.state_dict()) == list(ours.state_dict())
    for (k, a), b in zip(theirs.state_dict().items(), ours.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    other_theirs, other_ours = pair(seed=1)
    other_ours.load_state_dict(theirs.state_dict())  # mamba_ssm -> ours
    other_theirs.load_state_dict(other_ours.state_dict())  # ours -> mamba_ssm
    for a, b in zip(theirs.state_dict().values(), other_theirs.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def grads(layer, x):
    y = layer(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    found = {"out": y.detach(), **{n: p.grad.clone() for n, p in layer.named_parameters()}}
    layer.zero_grad(set_to_none=True)
    return found


@pytest.mark.parametrize("fast", [False, True], ids=["slow-path", "fused-path"])
def test_layer_forward_backward_equals_mamba_ssm(fast: bool) -> None:
    theirs, ours = pair()
    theirs.use_fast_path = ours.use_fast_path = fast
    x = torch.randn(2, 11, 16, generator=torch.Generator().manual_seed(4))
    got, want = grads(ours, x), grads(theirs, x)
    for k in want:
        assert_close(got[k], want[k], F32, k)


def test_conversions_and_decode_against_mamba_ssm_step() -> None:
    theirs, _ = pair()
    ours = Mamba.from_mamba_ssm(theirs)
    assert ours.A_log.data_ptr() != theirs.A_log.data_ptr() and ours.d_state == 8
    ours.reduce_state(torch.tensor([6, 1, 2]))
    back = ours.to_mamba_ssm()
    assert isinstance(back, MambaSSM) and back.d_state == 3 and back.x_proj.weight.shape[0] == 1 + 6
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = back(x)
        assert_close(ours(x), want, F32, "converted layer")
        states = [back.allocate_inference_cache(2, 6), ours.allocate_inference_cache(2, 6)]
        for t in range(6):
            step_theirs = back.step(x[:, t:t + 1], *states[0])[0]
            step_ours = ours.step(x[:, t:t + 1], *states[1])[0]
            assert_close(step_theirs, want[:, t:t + 1], F32, f"mamba_ssm step {t}")
            assert_close(step_ours, want[:, t:t + 1], F32, f"our step {t}")
    ours.set_state_mask(torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="state mask"):
        ours.to_mamba_ssm()


@pytest.mark.parametrize("norms", ["fused-rms", "plain-layernorm"])
def test_stock_lm_forward_backward_generate(norms: str) -> None:
    fused = norms == "fused-rms"
    cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=40, ssm_cfg={"d_state": 6}, rms_norm=fused,
                      fused_add_norm=fused, residual_in_fp32=fused)
    torch.manual_seed(0)
    stock = MambaLMHeadModel(cfg)
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    logits = stock(ids).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    theirs = {n: p.grad.clone() for n, p in stock.named_parameters()}
    assert all(torch.isfinite(g).all() for g in theirs.values())
    # Same model with our layers as mixers: identical logits and gradients.
    for block in stock.backbone.layers:
        block.mixer = Mamba.from_mamba_ssm(block.mixer)
    stock.zero_grad()
    logits_ours = stock(ids).logits
    F.cross_entropy(logits_ours[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert_close(logits_ours, logits, F32, "logits")
    for n, p in stock.named_parameters():
        assert_close(p.grad, theirs[n], F32, n)
    # generate(): each step's scores == the full forward's logits on the generated sequence (decode == full).
    for block in stock.backbone.layers:
        block.mixer = block.mixer.to_mamba_ssm()
    out = stock.generate(ids, max_length=11, output_scores=True, return_dict_in_generate=True)
    assert tuple(out.sequences.shape) == (2, 11)
    with torch.no_grad():
        full = stock(out.sequences.clone()).logits
    assert_close(torch.stack(out.scores, 1), full[:, 6:10], F32, "generate scores")


def test_unsupported_paths_raise_with_reason() -> None:
    with pytest.raises(NotImplementedError, match="complex A"):
        bridge.fwd(torch.randn(1, 2, 3), torch.randn(1, 2, 3), torch.randn(2, 2, dtype=torch.complex64),
                   torch.randn(1, 1, 2, 3), torch.randn(1, 1, 2, 3), None, None, None, False)
    state = torch.zeros(1, 2, 3, 4, 5)  # neither (Bt, D, N) nor Mamba-2's (Bt, H, P, N)
    ssu = sys.modules["mamba_ssm.ops.triton.selective_state_update"].selective_state_update
    with pytest.raises(NotImplementedError, match=r"\(Bt, D, N\) or \(Bt, H, P, N\)"):
        ssu(state, torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(2, 3, 4), torch.zeros(1, 1, 4),
            torch.zeros(1, 1, 4))
