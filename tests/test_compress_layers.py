"""Surgery on compressm's Mamba (shared and per-channel) and on stock mamba_ssm's MambaLMHeadModel."""

from __future__ import annotations

import copy

import pytest
import torch

from compress_models import VOCAB, TinyLM, lm_loss, masked_copy, token_batches
from compressm_kernels.calibration import find_mixers, scan_inputs
from compressm_kernels.integrations import mamba_ssm as bridge
from compressm_kernels.surgery import apply_plan, compress_model, plan_compression, resize_for_state_dict

bridge.install()  # before mamba_ssm is imported: it fills in mamba_ssm's CUDA-only modules
from mamba_ssm.models.config_mamba import MambaConfig  # noqa: E402
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel  # noqa: E402


def _train(model, steps: int, lr: float = 3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for ids in token_batches(steps):
        loss = lm_loss(model, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def test_scan_inputs_match_the_layers_own_forward() -> None:
    # Recomputed (u, Δ, B, C) fed to the scan reproduce the mixer's output: the capture reads the right tensors.
    from compressm_kernels import selective_scan_ref

    model = TinyLM()
    mixer = model.layers[0]
    h = torch.randn(2, 9, 16)
    u, delta, B, C, _ = scan_inputs(mixer, h)
    z = mixer.in_proj(h).transpose(1, 2).chunk(2, dim=1)[1]
    y = selective_scan_ref(u, delta, -torch.exp(mixer.A_log.float()), B, C, mixer.D.float(), z=z)
    torch.testing.assert_close(mixer.out_proj(y.transpose(1, 2)), mixer(h), rtol=1e-5, atol=1e-6)


def test_ours_shared_cut_equals_state_mask() -> None:
    model = TinyLM()
    opt = _train(model, 3)
    plan = plan_compression(model, token_batches(2, seed=5), tau=0.1, gate=1.0)
    masked = copy.deepcopy(model)
    for lp, mixer in zip(plan.layers, find_mixers(masked).values(), strict=True):
        keep = torch.zeros(lp.n_before, dtype=torch.bool)
        keep[lp.keep] = True
        mixer.set_state_mask(keep)
    report = apply_plan(model, plan, opt)
    assert [m.d_state for m in find_mixers(model).values()] == [lp.n_after for lp in plan.layers]
    assert any(lp.n_after < lp.n_before for lp in plan.layers), report
    ids = token_batches(1, seed=8)[0]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), masked(ids), rtol=1e-5, atol=1e-6)
    lm_loss(model, ids).backward()
    opt.step()


def test_ours_per_channel_mode_equals_full_masked_model() -> None:
    model = TinyLM()
    opt = _train(model, 3)
    plan = plan_compression(model, token_batches(2, seed=5), tau=0.3, mode="channel")
    print(plan)
    reference = copy.deepcopy(model)
    for lp, mixer in zip(plan.layers, find_mixers(reference).values(), strict=True):
        if lp.mask is not None:  # the plan's mask lives on the kept states: scatter it back to full N
            full = torch.zeros(mixer.d_inner, lp.n_before, dtype=torch.bool)
            full[:, lp.keep] = lp.mask
            mixer.set_state_mask(full)
    apply_plan(model, plan, opt)
    changed = [m for m in find_mixers(model).values() if m.state_mask is not None]
    assert changed and all(m.state_mask.dim() == 2 for m in changed)
    ranks = torch.cat([m.state_mask.sum(1) for m in changed])
    assert ranks.min() >= 1 and ranks.float().std() > 0  # channels got different ranks
    ids = token_batches(1, seed=8)[0]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids), rtol=1e-5, atol=1e-6)
    lm_loss(model, ids).backward()
    opt.step()


def test_ours_checkpoint_round_trip() -> None:
    model = TinyLM()
    compress_model(model, token_batches(2, seed=5), rank=3)
    fresh = TinyLM(seed=4)
    state_dict = model.state_dict()
    resize_for_state_dict(fresh, state_dict)
    fresh.load_state_dict(state_dict)
    ids = token_batches(1, seed=8)[0]
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["shared", "channel"])
def test_failed_cut_and_undo_restore_the_live_decode_caches(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The layer resizes (shared) or masks (channel) the decode caches it handed out; a cut that fails midway, or
    # an undo, must give them back as they were, so that decoding goes on.
    import compressm_kernels.surgery as surgery

    model = TinyLM()
    gen = torch.Generator().manual_seed(3)
    caches = [layer.allocate_inference_cache(2, 8) for layer in model.layers]
    for _, ssm_state in caches:
        ssm_state.copy_(torch.randn(ssm_state.shape, generator=gen))
    before = [ssm_state.clone() for _, ssm_state in caches]
    calib = token_batches(2, seed=5)
    rule = dict(tau=0.3) if mode == "channel" else dict(rank=3)
    real, calls = surgery._apply_layer, []

    def flaky(mixer, lp):
        calls.append(lp.name)
        real(mixer, lp)
        if len(calls) == 2:
            raise RuntimeError("injected failure")

    monkeypatch.setattr(surgery, "_apply_layer", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        compress_model(model, calib, mode=mode, **rule)
    monkeypatch.undo()
    for (_, ssm_state), saved in zip(caches, before, strict=True):
        assert torch.equal(ssm_state, saved)
    report = compress_model(model, calib, mode=mode, **rule)
    assert report.changed and any(not torch.equal(s, b) for (_, s), b in zip(caches, before, strict=True))
    report.undo()
    for (_, ssm_state), saved in zip(caches, before, strict=True):
        assert torch.equal(ssm_state, saved)
    h = torch.randn(2, 1, 16)
    for layer, (conv_state, ssm_state) in zip(model.layers, caches, strict=True):
        layer.step(h, conv_state, ssm_state)  # decoding goes on with them


def test_channel_mode_checkpoint_round_trip() -> None:
    # A channel-mode cut lives in the layers' masks: the documented recipe must bring them back (it lost them
    # while the mask buffer was not saved), and loading a mask-free state dict clears a layer's mask.
    model = TinyLM()
    compress_model(model, token_batches(2, seed=5), tau=0.3, mode="channel")
    masks = {name: layer.state_mask for name, layer in model.named_modules() if getattr(layer, "state_mask", None)
             is not None}
    assert masks
    fresh = TinyLM(seed=4)
    state_dict = model.state_dict()
    resize_for_state_dict(fresh, state_dict)
    fresh.load_state_dict(state_dict)
    for name, mask in masks.items():
        assert torch.equal(fresh.get_submodule(name).state_mask, mask)
    ids = token_batches(1, seed=8)[0]
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)
    head = {k: v for k, v in TinyLM(seed=4).state_dict().items() if k.startswith("head.")}
    fresh.load_state_dict(head, strict=False)  # a partial state dict leaves the layers' masks alone
    for name, mask in masks.items():
        assert torch.equal(fresh.get_submodule(name).state_mask, mask)
    fresh.load_state_dict(TinyLM(seed=4).state_dict())  # a whole mask-free one clears them
    assert all(layer.state_mask is None for layer in fresh.layers)


def test_bare_mixer_checkpoint_round_trip() -> None:
    # The model is the mixer itself: its A_log key has no prefix.
    from mamba_ssm.modules.mamba_simple import Mamba as StockMamba

    torch.manual_seed(0)
    mixer = StockMamba(d_model=16, d_state=8)
    compress_model(mixer, [torch.randn(2, 12, 16)], rank=3)
    assert mixer.A_log.shape[1] == 3
    torch.manual_seed(1)
    fresh = StockMamba(d_model=16, d_state=8)
    assert resize_for_state_dict(fresh, mixer.state_dict()) == {"": 3}
    fresh.load_state_dict(mixer.state_dict())
    h = torch.randn(2, 12, 16)
    with torch.no_grad():
        torch.testing.assert_close(fresh(h), mixer(h), rtol=0, atol=0)


def test_mamba_ssm_lm_head_model_cut_generate() -> None:
    cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=VOCAB, ssm_cfg={"d_state": 8}, rms_norm=False,
                      fused_add_norm=False)
    torch.manual_seed(0)
    model = MambaLMHeadModel(cfg)
    opt = _train(model, 3)
    plan = plan_compression(model, token_batches(2, seed=5), rank=3)
    masked = masked_copy(model, {lp.name: lp.keep for lp in plan.layers})
    apply_plan(model, plan, opt)
    mixers = find_mixers(model)
    assert list(mixers) == ["backbone.layers.0.mixer", "backbone.layers.1.mixer"]
    assert [(m.d_state, tuple(m.A_log.shape), m.x_proj.out_features) for m in mixers.values()] == \
        [(3, (32, 3), 1 + 6)] * 2
    ids = token_batches(1, seed=8)[0]
    model.eval()
    masked.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, masked(ids).logits, rtol=1e-5, atol=1e-5)
    out = model.generate(ids[:2, :5], max_length=10, output_scores=True, return_dict_in_generate=True)
    ref = masked.generate(ids[:2, :5], max_length=10, output_scores=True, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 10)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), rtol=1e-5, atol=1e-5)
    model.train()
    lm_loss(model, ids).backward()
    opt.step()


def test_mamba_ssm_channel_mode_is_refused_without_change() -> None:
    cfg = MambaConfig(d_model=16, n_layer=1, vocab_size=VOCAB, ssm_cfg={"d_state": 4}, rms_norm=False,
                      fused_add_norm=False)
    model = MambaLMHeadModel(cfg)
    with pytest.raises(ValueError, match="mask-aware"):
        compress_model(model, token_batches(1), tau=0.1, mode="channel")
    assert find_mixers(model)["backbone.layers.0.mixer"].d_state == 4
