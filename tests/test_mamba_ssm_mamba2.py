"""Stock mamba_ssm Mamba-2 on CPU through our scan (install()), against float64 oracles built from
mamba_ssm's own pure-PyTorch pieces (ssd_minimal_discrete, rms_norm_ref, selective_state_update_ref)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from compressm_kernels.integrations import mamba_ssm as bridge
from compressm_kernels.integrations import mamba_ssm_ssd as ssd
from scan_cases import assert_close

pytestmark = pytest.mark.oracle
F32, F64 = torch.float32, torch.float64
bridge.install()  # before mamba_ssm is imported

from mamba_ssm.models.config_mamba import MambaConfig  # noqa: E402
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel  # noqa: E402
from mamba_ssm.modules.mamba2 import Mamba2  # noqa: E402
from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete  # noqa: E402
from mamba_ssm.ops.triton import ssd_combined  # noqa: E402
from mamba_ssm.ops.triton.layernorm_gated import layernorm_fn, rms_norm_ref, rmsnorm_fn  # noqa: E402
from mamba_ssm.ops.triton.selective_state_update import selective_state_update as mamba_step  # noqa: E402
from mamba_ssm.ops.triton.selective_state_update import selective_state_update_ref as mamba_step_ref  # noqa: E402


def oracle_scan(x, dt, A, B, C, D, z, dt_bias, dt_limit, initial_states=None):
    """Float64 Mamba-2 scan from mamba_ssm's minimal SSD (one chunk of the whole sequence)."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    heads, groups = x.shape[2], B.shape[2]
    delta = F.softplus(dt + dt_bias.double()).clamp(*dt_limit)
    per_head = heads // groups
    y, final = ssd_minimal_discrete(x * delta[..., None], A * delta, B.repeat_interleave(per_head, 2),
                                    C.repeat_interleave(per_head, 2), block_len=x.shape[1],
                                    initial_states=None if initial_states is None else initial_states.double()[:, None])
    if D is not None:
        y = y + (D.double()[:, None] if D.dim() == 1 else D.double()) * x
    if z is not None:
        y = y * F.silu(z.double())
    return y, final


def scan_inputs(batch=2, seqlen=37, heads=4, headdim=3, groups=2, dstate=13, seed=0, d_per_channel=False,
                gate=True):
    gen = torch.Generator().manual_seed(seed)
    t = {
        "x": torch.randn(batch, seqlen, heads, headdim, generator=gen),
        "dt": 0.5 * torch.randn(batch, seqlen, heads, generator=gen) - 1.5,
        "A": -torch.exp(0.5 * torch.randn(heads, generator=gen)),
        "B": torch.randn(batch, seqlen, groups, dstate, generator=gen),
        "C": torch.randn(batch, seqlen, groups, dstate, generator=gen),
        "D": torch.randn(heads, headdim, generator=gen) if d_per_channel else torch.randn(heads, generator=gen),
        "z": torch.randn(batch, seqlen, heads, headdim, generator=gen) if gate else None,
        "dt_bias": 0.3 * torch.randn(heads, generator=gen),
    }
    return {k: (v.requires_grad_(True) if v is not None else None) for k, v in t.items()}


@pytest.mark.parametrize(("d_per_channel", "gate", "dt_limit", "initial"),
                         [(False, True, (0.0, math.inf), False), (True, False, (0.0, math.inf), False),
                          (False, False, (0.1, 0.3), False), (False, True, (0.0, math.inf), True),
                          (True, False, (0.1, 0.3), True)],
                         ids=["D-per-head-gated", "D-per-channel", "dt-limit", "initial-states-gated",
                              "initial-states-dt-limit"])
def test_chunk_scan_combined_route_matches_minimal_ssd(d_per_channel: bool, gate: bool, dt_limit,
                                                       initial: bool) -> None:
    """mamba_ssm's mamba_chunk_scan_combined on CPU (our route): output, final state and every gradient ==
    the float64 minimal SSD, with N = 13, L = 37, 2 groups over 4 heads, from a zero or a given state."""
    t = scan_inputs(d_per_channel=d_per_channel, gate=gate)
    if initial:
        t["initial_states"] = torch.randn(2, 4, 3, 13, generator=torch.Generator().manual_seed(8)).requires_grad_(True)
    leaves = {k: v for k, v in t.items() if v is not None}
    gen = torch.Generator().manual_seed(5)
    dy = torch.randn(t["x"].shape, generator=gen)
    dfinal = torch.randn(2, 4, 3, 13, generator=gen)
    y, final = ssd_combined.mamba_chunk_scan_combined(
        t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size=16, D=t["D"], z=t["z"], dt_bias=t["dt_bias"],
        initial_states=t.get("initial_states"), dt_softplus=True, dt_limit=dt_limit, return_final_states=True)
    ours = [y, final, *torch.autograd.grad((y * dy).sum() + (final * dfinal).sum(), list(leaves.values()))]
    leaves64 = {k: v.detach().double().requires_grad_(True) for k, v in leaves.items()}
    y64, final64 = oracle_scan(leaves64["x"], leaves64["dt"], leaves64["A"], leaves64["B"], leaves64["C"],
                               leaves64["D"], leaves64.get("z"), leaves64["dt_bias"], dt_limit,
                               leaves64.get("initial_states"))
    loss = (y64 * dy.double()).sum() + (final64 * dfinal.double()).sum()
    want = [y64, final64, *torch.autograd.grad(loss, list(leaves64.values()))]
    for got, expected, name in zip(ours, want, ["y", "final_states", *("d" + k for k in leaves)], strict=True):
        assert got.dtype == F32, name
        assert_close(got, expected, F32, name)


def test_chunk_scan_combined_route_bf16_output_dtype() -> None:
    t = {k: (v.detach().bfloat16() if k in ("x", "B", "C", "z", "dt") else v.detach())
         for k, v in scan_inputs().items()}
    y = ssd_combined.mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 16, D=t["D"], z=t["z"],
                                               dt_bias=t["dt_bias"], dt_softplus=True)
    y64, _ = oracle_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], (0.0, math.inf))
    assert y.dtype == torch.bfloat16
    assert_close(y, y64, torch.bfloat16, "y")


@pytest.mark.parametrize("group_size", [None, 4])
@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_gated_norm_routes_match_mamba_reference(group_size: int | None, norm_before_gate: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    x, z = torch.randn(3, 5, 12, generator=gen), torch.randn(3, 5, 12, generator=gen)
    weight, bias = torch.randn(12, generator=gen), torch.randn(12, generator=gen)
    for gate in (z, None):
        got = rmsnorm_fn(x, weight, None, z=gate, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate)
        want = rms_norm_ref(x.double(), weight.double(), None, z=None if gate is None else gate.double(), eps=1e-5,
                            group_size=group_size, norm_before_gate=norm_before_gate)
        assert_close(got, want, F32, "rmsnorm")
    # LayerNorm: the same per group after subtracting the group's mean.
    got = layernorm_fn(x, weight, bias, z=z, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate)
    h = x.double() if norm_before_gate else x.double() * F.silu(z.double())
    size = group_size or 12
    want = F.layer_norm(h.unflatten(-1, (12 // size, size)), (size,), eps=1e-5).flatten(-2) * weight.double() + bias
    if norm_before_gate:
        want = want * F.silu(z.double())
    assert_close(got, want, F32, "layernorm")


def oracle_mamba2(layer: Mamba2, u: torch.Tensor) -> torch.Tensor:
    """A float64 Mamba-2 layer from its parameters: in_proj, split, causal conv + silu, the minimal SSD,
    gated RMSNorm per group (mamba_ssm's rms_norm_ref), the MLP half, out_proj."""
    p = {k: v.double() for k, v in layer.named_parameters()}
    zxbcdt = F.linear(u.double(), p["in_proj.weight"])
    dim, ngroups, dstate, nheads = layer.d_ssm, layer.ngroups, layer.d_state, layer.nheads
    d_mlp = (zxbcdt.shape[-1] - 2 * dim - 2 * ngroups * dstate - nheads) // 2
    z0, x0, z, xBC, dt = torch.split(zxbcdt, [d_mlp, d_mlp, dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    seqlen = u.shape[1]
    xBC = F.silu(F.conv1d(xBC.transpose(1, 2), p["conv1d.weight"], p["conv1d.bias"], padding=layer.d_conv - 1,
                          groups=xBC.shape[-1])[..., :seqlen]).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    heads = (u.shape[0], seqlen, nheads, layer.headdim)
    groups = (u.shape[0], seqlen, ngroups, dstate)
    y, _ = oracle_scan(x.reshape(heads), dt, -torch.exp(p["A_log"]), B.reshape(groups), C.reshape(groups),
                       p["D"].reshape(nheads, -1) if layer.D_has_hdim else p["D"],
                       None if layer.rmsnorm else z.reshape(heads), p["dt_bias"], layer.dt_limit)
    y = y.reshape(*u.shape[:2], dim)
    if layer.rmsnorm:
        y = rms_norm_ref(y, p["norm.weight"], None, z=z, eps=layer.norm.eps, group_size=dim // ngroups,
                         norm_before_gate=layer.norm_before_gate)
    if d_mlp > 0:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return F.linear(y, p["out_proj.weight"])


VARIANTS = {
    "all-ssm": {},
    "with-mlp": {"d_ssm": 48},
    "no-norm-D-per-channel-dt-limit": {"rmsnorm": False, "D_has_hdim": True, "dt_limit": (0.05, 0.4)},
}


@pytest.mark.parametrize("mem_eff", [True, False], ids=["fused-path", "unfused-path"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_stock_mamba2_layer_forward_backward_equals_oracle(mem_eff: bool, variant: str) -> None:
    torch.manual_seed(0)
    layer = Mamba2(d_model=32, d_state=13, d_conv=4, expand=2, headdim=8, ngroups=2, chunk_size=16,
                   use_mem_eff_path=mem_eff, norm_before_gate=False, **VARIANTS[variant])
    u = torch.randn(2, 37, 32, requires_grad=True)
    dy = torch.randn(2, 37, 32)
    y = layer(u)
    names = [n for n, _ in layer.named_parameters()]
    grads = torch.autograd.grad(y, [u, *layer.parameters()], dy)
    u64 = u.detach().double().requires_grad_(True)
    y64 = oracle_mamba2(layer, u64)  # float64 copies of the parameters, differentiable back to them
    want = torch.autograd.grad(y64, [u64, *layer.parameters()], dy.double())
    assert_close(y, y64, F32, "y")
    for got, expected, name in zip(grads, want, ["u", *names], strict=True):
        assert_close(got, expected, F32, "d" + name)


@pytest.mark.parametrize("expanded_A", [True, False], ids=["A_expanded", "A_materialised"])
def test_multi_head_state_update_matches_mamba_reference(expanded_A: bool) -> None:
    """mamba_ssm's selective_state_update with (Bt, H, P, N) states and grouped B/C on CPU (our route) ==
    its pure-PyTorch reference; a non-contiguous state is updated in place too, and state_batch_indices
    picks rows. A comes expanded from one value per head, as Mamba2.step passes it (the kernel's one decay
    per channel), or as a full tensor."""
    gen = torch.Generator().manual_seed(2)
    batch, heads, headdim, groups, dstate = 3, 4, 3, 2, 13
    state = torch.randn(batch, heads, headdim, dstate, generator=gen)
    x, z = torch.randn(batch, heads, headdim, generator=gen), torch.randn(batch, heads, headdim, generator=gen)
    dt = torch.randn(batch, heads, 1, generator=gen).expand(batch, heads, headdim)
    A = (-torch.rand(heads, 1, 1, generator=gen) - 0.5).expand(heads, headdim, dstate)
    A = A if expanded_A else A.contiguous()
    B, C = torch.randn(batch, groups, dstate, generator=gen), torch.randn(batch, groups, dstate, generator=gen)
    D, dt_bias = torch.randn(heads, headdim, generator=gen), torch.randn(heads, headdim, generator=gen)
    want_state = state.double().clone()
    want = mamba_step_ref(want_state, x.double(), dt.double(), A.double(), B.double(), C.double(), D.double(),
                          z.double(), dt_bias.double(), dt_softplus=True)
    mine = state.clone()
    assert_close(mamba_step(mine, x, dt, A, B, C, D, z, dt_bias, True), want, F32, "y")
    assert_close(mine, want_state, F32, "state")
    strided = state.transpose(1, 2).contiguous().transpose(1, 2)  # same values, not contiguous
    assert not strided.is_contiguous()
    assert_close(mamba_step(strided, x, dt, A, B, C, D, z, dt_bias, True), want, F32, "y (strided state)")
    assert_close(strided, want_state, F32, "strided state")
    rows = torch.tensor([2, 0])
    picked = state.clone()
    y = mamba_step(picked, x[rows], dt[rows], A, B[rows], C[rows], D, z[rows], dt_bias, True,
                   state_batch_indices=rows)
    assert_close(y, want[rows], F32, "y (state_batch_indices)")
    assert_close(picked[rows], want_state[rows], F32, "picked rows")
    assert torch.equal(picked[1], state[1])


@pytest.mark.parametrize("per_head", ["all", "dt", "D", "dt_bias", "A", "none"])
@pytest.mark.parametrize("dt_dtype", [F32, torch.bfloat16])
def test_multi_head_step_reads_per_head_values_in_place(per_head: str, dt_dtype: torch.dtype) -> None:
    """dt, D, dt_bias and A expanded per head, as Mamba2.step passes them, reach the C++ step as one value per head
    (none copied out per channel). Heads of 48 channels straddle the kernel's 128-channel blocks (the second block
    starts a third into a head); dt is a strided slice (head stride 2), in fp32 or bf16. Each expanded tensor alone
    or all of them, against mamba_ssm's reference in float64."""
    gen = torch.Generator().manual_seed(5)
    batch, heads, headdim, groups, dstate = 2, 7, 48, 1, 16

    def head_values(*lead: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return torch.randn(*lead, generator=gen) * scale + shift

    def maybe_expand(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        expanded = t.expand(shape)
        return expanded if per_head in ("all", name) else expanded.contiguous()

    state = torch.randn(batch, heads, headdim, dstate, generator=gen)
    x = torch.randn(batch, heads, headdim, generator=gen)
    dt_heads = head_values(batch, heads, 2)[..., :1].to(dt_dtype)  # (Bt, H, 1), stride 2 along H
    dt = maybe_expand("dt", dt_heads, (batch, heads, headdim))
    A = maybe_expand("A", -head_values(heads, 1, 1, scale=0.2, shift=1.0).abs(), (heads, headdim, dstate))
    D = maybe_expand("D", head_values(heads, 1), (heads, headdim))
    dt_bias = maybe_expand("dt_bias", head_values(heads, 1, scale=0.5), (heads, headdim))
    B, C = torch.randn(batch, groups, dstate, generator=gen), torch.randn(batch, groups, dstate, generator=gen)
    want_state = state.double().clone()
    want = mamba_step_ref(want_state, x.double(), dt.double(), A.double(), B.double(), C.double(), D.double(),
                          None, dt_bias.double(), dt_softplus=True)
    mine = state.clone()
    # A bf16 dt converts to fp32 exactly, so fp32's tolerance holds either way.
    assert_close(mamba_step(mine, x, dt, A, B, C, D, None, dt_bias, True).double(), want, F32, "y")
    assert_close(mine.double(), want_state, F32, "state")


def test_stock_mamba2_lm_forward_backward_generate() -> None:
    """A stock MambaLMHeadModel with Mamba-2 layers trains and generates on CPU; each generated step's scores
    == the full forward's logits on the generated sequence (the decode path == the scan path)."""
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=40, rms_norm=True, fused_add_norm=True,
                      ssm_cfg={"layer": "Mamba2", "d_state": 13, "headdim": 8, "ngroups": 2, "chunk_size": 16})
    model = MambaLMHeadModel(cfg)
    ids = torch.randint(0, 40, (2, 7))
    loss = F.cross_entropy(model(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    out = model.generate(ids, max_length=12, output_scores=True, return_dict_in_generate=True)
    assert tuple(out.sequences.shape) == (2, 12)
    with torch.no_grad():
        full = model(out.sequences.clone()).logits
    assert_close(torch.stack(out.scores, 1), full[:, 6:11], F32, "generate scores")


def test_compression_refuses_mamba2_mixers_by_name() -> None:
    """plan_compression, compress_model and CompreSSM on a Mamba-2 model say which mixers they found and why they
    cannot cut them (instead of 'no mixer', or a CompreSSM whose every attempt is logged as skipped); nothing
    changes."""
    from compressm_kernels import CompreSSM, compress_model, plan_compression

    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=40,
                      ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 8, "chunk_size": 16})
    model = MambaLMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = [torch.randint(0, 40, (1, 8))]
    found = r"Mamba-2 mixers \(backbone\.layers\.0\.mixer, backbone\.layers\.1\.mixer\), which compression"
    for call in (lambda: plan_compression(model, calib, tau=0.1), lambda: compress_model(model, calib, rank=4),
                 lambda: CompreSSM(model, opt, total_steps=10)):
        with pytest.raises(ValueError, match=found):
            call()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unsupported_mamba2_arguments_raise_with_reason() -> None:
    t = {k: (v.detach() if v is not None else None) for k, v in scan_inputs().items()}
    args = (t["x"], t["dt"], t["A"], t["B"], t["C"], 16)
    with pytest.raises(ValueError, match="initial_states must have shape"):
        ssd_combined.mamba_chunk_scan_combined(*args, initial_states=torch.zeros(2, 4, 13, 3))
    with pytest.raises(ValueError, match=r"seq_idx must be an integer tensor of shape \(Bt, L\) = \(2, 37\)"):
        ssd_combined.mamba_chunk_scan_combined(*args, seq_idx=torch.zeros(2, 36, dtype=torch.int32))
    with pytest.raises(ValueError, match="return_varlen_states needs cu_seqlens"):
        ssd_combined.mamba_chunk_scan_combined(*args, return_varlen_states=True)
    one_row = (t["x"][:1], t["dt"][:1], t["A"], t["B"][:1], t["C"][:1], 16)
    labels = torch.tensor([[0] * 20 + [1] * 17], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cu_seqlens must be the offsets .* lengths \[20, 17\]"):
        ssd_combined.mamba_chunk_scan_combined(*one_row, seq_idx=labels, cu_seqlens=torch.tensor([0, 19, 37]),
                                               return_varlen_states=True)
    with pytest.raises(ValueError, match="cu_seqlens needs seq_idx"):
        ssd_combined.mamba_chunk_scan_combined(*one_row, cu_seqlens=torch.tensor([0, 20, 37]),
                                               return_varlen_states=True)
    with pytest.raises(ValueError, match="A must have shape"):
        ssd.ssd_scan(t["x"], t["dt"], torch.zeros(3), t["B"], t["C"])
    with pytest.raises(ValueError, match="B must have shape"):
        ssd.ssd_scan(t["x"], t["dt"], t["A"], t["B"][:, :, :1].expand(2, 37, 3, 13), t["C"])
    with pytest.raises(ValueError, match="dt must have shape"):
        ssd.ssd_scan(t["x"], t["dt"][:, :5], t["A"], t["B"], t["C"])
    state = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match="A must have shape"):
        mamba_step(state, torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(2, 4), torch.zeros(1, 1, 4),
                   torch.zeros(1, 1, 4))


def test_stock_mamba2_lm_in_bfloat16_matches_float32() -> None:
    """A bf16 Mamba-2 model (the scan upcasts Δ and runs fp32 inside) gives the fp32 model's logits to bf16
    precision, and generates."""
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=40, rms_norm=True, fused_add_norm=True,
                      ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 8, "chunk_size": 16})
    model = MambaLMHeadModel(cfg)
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        want = model(ids).logits
        model = model.to(torch.bfloat16)
        got = model(ids).logits
    assert got.dtype == torch.bfloat16
    assert_close(got, want, torch.bfloat16, "bf16 logits")
    assert model.generate(ids, max_length=12).shape == (2, 12)


def test_routes_take_their_first_argument_by_name() -> None:
    t = {k: (v.detach() if v is not None else None) for k, v in scan_inputs().items()}
    by_position = ssd_combined.mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 16)
    by_name = ssd_combined.mamba_chunk_scan_combined(x=t["x"], dt=t["dt"], A=t["A"], B=t["B"], C=t["C"], chunk_size=16)
    assert torch.equal(by_position, by_name)
    state = torch.zeros(2, 4, 3, 13)
    y = mamba_step(state=state, x=t["x"][:, 0], dt=t["x"][:, 0], A=-torch.ones(4, 3, 13), B=t["B"][:, 0],
                   C=t["C"][:, 0])
    assert y.shape == (2, 4, 3) and state.abs().sum() > 0


@pytest.mark.parametrize("heads", [True, False], ids=["(Bt, H, P, N)", "(Bt, D, N)"])
def test_negative_state_batch_index_is_a_padding_row(heads: bool) -> None:
    """As mamba_ssm's kernel: row b advances state[indices[b]]; a negative index outputs 0 and touches no state."""
    gen = torch.Generator().manual_seed(6)
    slots, shape = 4, (4, 3) if heads else (12,)
    state = torch.randn(slots, *shape, 5, generator=gen)
    x, dt = torch.randn(3, *shape, generator=gen), torch.randn(3, *shape, generator=gen)
    A = -torch.rand(*shape, 5, generator=gen) - 0.5
    B, C = (torch.randn(3, *((2,) if heads else ()), 5, generator=gen) for _ in range(2))
    indices = torch.tensor([2, -1, 0])
    mine = state.clone()
    y = mamba_step(mine, x, dt, A, B, C, dt_softplus=True, state_batch_indices=indices)
    assert torch.all(y[1] == 0)
    assert torch.equal(mine[1], state[1]) and torch.equal(mine[3], state[3])  # untouched slots
    for row, slot in ((0, 2), (2, 0)):
        want_state = state[slot:slot + 1].double().clone()
        want = mamba_step_ref(want_state, x[row:row + 1].double(), dt[row:row + 1].double(), A.double(),
                              B[row:row + 1].double(), C[row:row + 1].double(), dt_softplus=True)
        assert_close(y[row:row + 1], want, F32, f"y[{row}]")
        assert_close(mine[slot:slot + 1], want_state, F32, f"state[{slot}]")


def test_bad_mamba2_shapes_raise_naming_the_argument() -> None:
    t = {k: (v.detach() if v is not None else None) for k, v in scan_inputs().items()}
    x, dt, A, B, C = t["x"], t["dt"], t["A"], t["B"], t["C"]
    with pytest.raises(ValueError, match="C must have shape"):
        ssd.ssd_scan(x, dt, A, B, C[:, :, :1])
    with pytest.raises(ValueError, match="z must have shape"):
        ssd.ssd_scan(x, dt, A, B, C, z=torch.zeros(2, 37, 3, 4))  # (Bt, L, P, H) for x's (Bt, L, H, P)
    with pytest.raises(ValueError, match="D must have shape"):
        ssd.ssd_scan(x, dt, A, B, C, D=torch.ones(3, 4))
    with pytest.raises(ValueError, match="dt_bias must have shape"):
        ssd.ssd_scan(x, dt, A, B, C, dt_bias=torch.ones(1))
    with pytest.raises(ValueError, match="z must have shape"):
        rmsnorm_fn(torch.randn(2, 3, 16), torch.ones(16), None, z=torch.randn(4, 2, 3, 16))
    with pytest.raises(ValueError, match="weight must have shape"):
        rmsnorm_fn(torch.randn(2, 3, 16), torch.ones(1), None)
    with pytest.raises(ValueError, match="outproj_bias needs outproj_weight"):
        ssd.split_conv1d_scan_combined(torch.randn(1, 8, 2 * 8 + 2 * 4 + 2), torch.randn(8 + 2 * 4, 4), None,
                                       torch.zeros(2), -torch.ones(2), torch.ones(2), 16, headdim=4,
                                       outproj_bias=torch.zeros(8))
    state = torch.zeros(1, 3, 2, 4)  # 3 heads cannot share 2 groups
    with pytest.raises(ValueError, match="B must have shape"):
        mamba_step(state, torch.zeros(1, 3, 2), torch.zeros(1, 3, 2), torch.zeros(3, 2, 4), torch.zeros(1, 2, 4),
                   torch.zeros(1, 2, 4))


# ---- packed variable-length batches (seq_idx, cu_seqlens) -------------------------------------------------------
def packed_runs(labels: torch.Tensor) -> list[list[tuple[int, int, int]]]:
    """Each row's runs of equal labels as (start, end, label)."""
    rows = []
    for row in labels.tolist():
        starts = [0, *(t for t in range(1, len(row)) if row[t] != row[t - 1])]
        rows.append([(a, b, row[a]) for a, b in itertools.pairwise([*starts, len(row)])])
    return rows


def oracle_packed_scan(leaves: dict, labels: torch.Tensor, dt_limit) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The float64 oracle run on each packed sequence alone: outputs back in place, and each sequence's final
    state (the row's initial state goes to its first sequence if that one is labelled 0, as in mamba_ssm)."""
    rows, finals = [], []
    for b, runs in enumerate(packed_runs(labels)):
        pieces = []
        for start, end, label in runs:
            cut = {k: (v[b:b + 1, start:end] if k in ("x", "dt", "B", "C", "z") else v) for k, v in leaves.items()}
            initial = leaves["initial_states"][b:b + 1] if "initial_states" in leaves and start == 0 and label == 0 \
                else None
            y, final = oracle_scan(cut["x"], cut["dt"], cut["A"], cut["B"], cut["C"], cut["D"], cut.get("z"),
                                   cut["dt_bias"], dt_limit, initial)
            pieces.append(y)
            finals.append(final)
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows), finals


# Row 0 packs three sequences (lengths 5, 11, 21; labels from 0), row 1 two labelled 3 and 4, so its initial state
# reaches none of them; 5 and 1 are shorter than the conv's window.
PACKED_LABELS = torch.tensor([[0] * 5 + [1] * 11 + [2] * 21, [3] * 36 + [4]], dtype=torch.int32)


@pytest.mark.parametrize(("gate", "dt_limit"), [(True, (0.0, math.inf)), (False, (0.1, 0.3))],
                         ids=["gated", "dt-limit"])
def test_packed_sequences_scan_each_from_zero(gate: bool, dt_limit) -> None:
    """mamba_chunk_scan_combined with seq_idx on CPU: outputs, final states and every gradient == the float64
    minimal SSD run on each packed sequence alone."""
    t = scan_inputs(gate=gate, d_per_channel=True)
    t["initial_states"] = torch.randn(2, 4, 3, 13, generator=torch.Generator().manual_seed(8)).requires_grad_(True)
    leaves = {k: v for k, v in t.items() if v is not None}
    gen = torch.Generator().manual_seed(5)
    dy, dfinal = torch.randn(t["x"].shape, generator=gen), torch.randn(2, 4, 3, 13, generator=gen)
    y, final = ssd_combined.mamba_chunk_scan_combined(
        t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size=16, D=t["D"], z=t["z"], dt_bias=t["dt_bias"],
        initial_states=t["initial_states"], seq_idx=PACKED_LABELS, dt_softplus=True, dt_limit=dt_limit,
        return_final_states=True)
    ours = [y, final, *torch.autograd.grad((y * dy).sum() + (final * dfinal).sum(), list(leaves.values()))]
    leaves64 = {k: v.detach().double().requires_grad_(True) for k, v in leaves.items()}
    y64, finals64 = oracle_packed_scan(leaves64, PACKED_LABELS, dt_limit)
    final64 = torch.cat([finals64[2], finals64[4]])  # each row's last sequence
    loss = (y64 * dy.double()).sum() + (final64 * dfinal.double()).sum()
    want = [y64, final64, *torch.autograd.grad(loss, list(leaves64.values()))]
    for got, expected, name in zip(ours, want, ["y", "final_states", *("d" + k for k in leaves)], strict=True):
        assert_close(got, expected, F32, name)


@pytest.mark.parametrize("with_final", [True, False])
def test_varlen_states_are_each_sequences_final_state(with_final: bool) -> None:
    """cu_seqlens with return_varlen_states: each sequence's final state (and gradients through them, which
    mamba_ssm's kernels do not give), returned after the row's final state as mamba_ssm orders them."""
    t = {k: (v[:1] if k in ("x", "dt", "B", "C", "z") else v) for k, v in scan_inputs(gate=False).items()
         if v is not None}
    labels = torch.tensor([[7] * 9 + [8] + [9] * 27], dtype=torch.int32)
    cu_seqlens = torch.tensor([0, 9, 10, 37], dtype=torch.int32)
    out = ssd_combined.mamba_chunk_scan_combined(
        t["x"], t["dt"], t["A"], t["B"], t["C"], 16, D=t["D"], dt_bias=t["dt_bias"], seq_idx=labels,
        cu_seqlens=cu_seqlens, dt_softplus=True, return_final_states=with_final, return_varlen_states=True)
    assert len(out) == (3 if with_final else 2)
    y, varlen = out[0], out[-1]
    dvarlen = torch.randn(3, 4, 3, 13, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((varlen * dvarlen).sum() + y.sum(), list(t.values()))
    leaves64 = {k: v.detach().double().requires_grad_(True) for k, v in t.items()}
    y64, finals64 = oracle_packed_scan(leaves64, labels, (0.0, math.inf))
    want = torch.autograd.grad((torch.cat(finals64) * dvarlen.double()).sum() + y64.sum(), list(leaves64.values()))
    assert_close(y, y64, F32, "y")
    assert_close(varlen, torch.cat(finals64), F32, "varlen_states")
    if with_final:
        assert_close(out[1], finals64[-1], F32, "final_states")
    for got, expected, name in zip(grads, want, t, strict=True):
        assert_close(got, expected, F32, "d" + name)


@pytest.mark.parametrize("initial", [False, True], ids=["no-initial-states", "initial-states"])
def test_packed_causal_conv_matches_causal_conv1d_reference(initial: bool) -> None:
    """causal-conv1d's causal_conv1d_fn with seq_idx on CPU (our causal_conv1d_cuda stand-in) == its own
    PyTorch reference: the window restarts at each sequence, positions labelled < 0 output 0; gradients too."""
    from causal_conv1d import causal_conv1d_fn
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref

    gen = torch.Generator().manual_seed(4)
    labels = torch.tensor([[-1] * 2 + [0] * 3 + [1] * 10 + [2] * 4, [5] * 1 + [6] * 18], dtype=torch.int32)
    x = torch.randn(2, 6, 19, generator=gen).requires_grad_(True)
    weight = torch.randn(6, 4, generator=gen).requires_grad_(True)
    bias = torch.randn(6, generator=gen).requires_grad_(True)
    leaves = [x, weight, bias]
    init = None
    if initial:
        init = torch.randn(2, 6, 3, generator=gen).requires_grad_(True)
        leaves.append(init)
    dy = torch.randn(2, 6, 19, generator=gen)
    y = causal_conv1d_fn(x, weight, bias, seq_idx=labels, initial_states=init, activation="silu")
    ours = [y, *torch.autograd.grad(y, leaves, dy)]
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    y64 = causal_conv1d_ref(*leaves64[:3], initial_states=leaves64[3] if initial else None, activation="silu",
                            seq_idx=labels)
    want = [y64, *torch.autograd.grad(y64, leaves64, dy.double())]
    for got, expected, name in zip(ours, want, ["y", "dx", "dweight", "dbias", "dinitial_states"], strict=False):
        assert_close(got, expected, F32, name)
    assert torch.all(y[0, :, :2] == 0)


@pytest.mark.parametrize("mem_eff", [True, False], ids=["fused-path", "unfused-path"])
def test_stock_mamba2_layer_on_packed_sequences_equals_each_alone(mem_eff: bool) -> None:
    """A stock Mamba2 layer given sequences packed into one row (seq_idx, cu_seqlens): outputs and every
    gradient == the layer run on each sequence alone (lengths 7, 1 and 20: shorter than the conv's window too)."""
    torch.manual_seed(0)
    layer = Mamba2(d_model=32, d_state=13, d_conv=4, expand=2, headdim=8, ngroups=2, chunk_size=16,
                   use_mem_eff_path=mem_eff)
    lengths = [7, 1, 20]
    seqs = [torch.randn(1, n, 32) for n in lengths]
    dys = [torch.randn(1, n, 32) for n in lengths]
    u = torch.cat(seqs, dim=1).requires_grad_(True)
    labels = torch.repeat_interleave(torch.arange(3, dtype=torch.int32), torch.tensor(lengths))[None]
    cu_seqlens = torch.tensor([0, 7, 8, 28], dtype=torch.int32)
    y = layer(u, seq_idx=labels, cu_seqlens=cu_seqlens)
    params = list(layer.parameters())
    got = torch.autograd.grad(y, [u, *params], torch.cat(dys, dim=1))
    alone = [s.clone().requires_grad_(True) for s in seqs]
    ys = [layer(s) for s in alone]
    want = torch.autograd.grad(ys, [*alone, *params], dys)
    assert_close(y, torch.cat(ys, dim=1), F32, "y")
    assert_close(got[0], torch.cat(want[:3], dim=1), F32, "du")
    for g, w, (name, _) in zip(got[1:], want[3:], layer.named_parameters(), strict=True):
        assert_close(g, w, F32, "d" + name)


def test_stock_mamba2_prefills_packed_sequences_into_their_caches() -> None:
    """Mamba2's varlen prefill (seq_idx, cu_seqlens, an inference cache with a row per sequence) on CPU:
    causal-conv1d's causal_conv1d_varlen_states and the scan's varlen states fill each sequence's conv and
    SSM state as prefilling it alone does, and the next decode step of all three agrees with each alone."""
    from mamba_ssm.utils.generation import InferenceParams

    torch.manual_seed(0)
    layer = Mamba2(d_model=32, d_state=13, d_conv=4, expand=2, headdim=8, ngroups=2, chunk_size=16, layer_idx=0)
    lengths = [7, 1, 20]
    seqs = [torch.randn(1, n, 32) for n in lengths]
    labels = torch.repeat_interleave(torch.arange(3, dtype=torch.int32), torch.tensor(lengths))[None]
    packed = InferenceParams(max_seqlen=32, max_batch_size=3)
    with torch.no_grad():
        y = layer(torch.cat(seqs, dim=1), seq_idx=labels, cu_seqlens=torch.tensor([0, 7, 8, 28], dtype=torch.int32),
                  inference_params=packed)
        alone = [InferenceParams(max_seqlen=32, max_batch_size=1) for _ in seqs]
        ys = [layer(s, inference_params=p) for s, p in zip(seqs, alone, strict=True)]
        assert_close(y, torch.cat(ys, dim=1), F32, "prefill y")
        conv, ssm = packed.key_value_memory_dict[0]
        for i, p in enumerate(alone):
            assert_close(conv[i:i + 1], p.key_value_memory_dict[0][0], F32, f"conv state {i}")
            assert_close(ssm[i:i + 1], p.key_value_memory_dict[0][1], F32, f"ssm state {i}")
        token = torch.randn(3, 1, 32)
        packed.seqlen_offset = 1
        step = layer(token, inference_params=packed)
        for i, p in enumerate(alone):
            p.seqlen_offset = 1
            assert_close(step[i:i + 1], layer(token[i:i + 1], inference_params=p), F32, f"step {i}")


def test_packed_sequence_bad_inputs_raise_and_change_nothing() -> None:
    """Labels that come back after another label (which a run per sequence cannot express), impossible
    cu_seqlens, a wrongly shaped conv initial state, B and C of different groups: ValueError naming the argument,
    inputs untouched."""
    from causal_conv1d import causal_conv1d_fn
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref

    t = {k: v.detach()[:1] if k in ("x", "dt", "B", "C", "z") else v.detach()
         for k, v in scan_inputs(gate=False).items() if v is not None}
    args = (t["x"], t["dt"], t["A"], t["B"], t["C"], 16)
    back = torch.tensor([[0] * 10 + [1] * 10 + [0] * 17], dtype=torch.int32)
    with pytest.raises(ValueError, match="seq_idx: label 0 comes back at position 20 of row 0"):
        ssd_combined.mamba_chunk_scan_combined(*args, seq_idx=back)
    with pytest.raises(ValueError, match="seq_idx must be an integer tensor"):
        ssd_combined.mamba_chunk_scan_combined(*args, seq_idx=torch.zeros(1, 37, dtype=torch.bool))
    labels = torch.tensor([[0] * 20 + [1] * 17], dtype=torch.int32)
    for cu in (torch.tensor([0.0, 20.0, 37.0]), torch.tensor([[0, 20, 37]]), torch.tensor([], dtype=torch.int64)):
        with pytest.raises(ValueError, match="cu_seqlens must be a 1-D integer tensor"):
            ssd_combined.mamba_chunk_scan_combined(*args, seq_idx=labels, cu_seqlens=cu, return_varlen_states=True)
    tokens = torch.randn(10, 5)
    from causal_conv1d import causal_conv1d_varlen as varlen  # routed at its source too

    cu = torch.tensor([0, 2, 10], dtype=torch.int32)  # the first sequence shorter than the state
    assert torch.equal(varlen.causal_conv1d_varlen_states(tokens, cu, 3),
                       varlen.causal_conv1d_varlen_states_ref(tokens, cu, 3))
    for cu in ([0, 4, 12], [0, 6, 4], [1, 10]):
        with pytest.raises(ValueError, match=r"cu_seqlens must be .* offsets from 0 to 10, non-decreasing"):
            ssd.conv_varlen_states(tokens, torch.tensor(cu), 3)

    x, weight = torch.randn(1, 5, 10), torch.randn(5, 4)
    before = x.clone()
    with pytest.raises(ValueError, match="seq_idx: label 0 comes back"):
        causal_conv1d_fn(x, weight, seq_idx=torch.tensor([[0, 0, 1, 0, 2, 2, 2, 2, 2, 2]], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"initial_states must have shape \(Bt, D, W - 1\) = \(1, 5, 3\)"):
        causal_conv1d_fn(x, weight, seq_idx=torch.zeros(1, 10, dtype=torch.int32), initial_states=torch.zeros(2, 5, 3))
    assert torch.equal(x, before)
    padded = torch.tensor([[0, 0, -1, 1, 1, -1, -1, 2, 2, 2]], dtype=torch.int32)  # padding labels may repeat
    assert_close(causal_conv1d_fn(x, weight, seq_idx=padded), causal_conv1d_ref(x.double(), weight.double(),
                 seq_idx=padded), F32, "conv with repeated padding labels")

    state = torch.randn(2, 4, 3, 5)
    kept = state.clone()
    step_args = (torch.randn(2, 4, 3), torch.randn(2, 4, 3), -torch.rand(4, 3, 5), torch.randn(2, 2, 5),
                 torch.randn(2, 1, 5))
    with pytest.raises(ValueError, match=r"C must have shape \(Bt, G, N\) with G dividing H=4 \(B and C alike\)"):
        mamba_step(state, *step_args)
    assert torch.equal(state, kept)
