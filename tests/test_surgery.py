"""Surgery on transformers' MambaForCausalLM: plan, cut == masked, generate, optimizer, atomicity, checkpoints."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import compressm_kernels.surgery as surgery
from compress_models import (
    assert_same_tensors,
    hf_mamba,
    lm_loss,
    masked_copy,
    tensors_of,
    token_batches,
)
from compressm_kernels.calibration import find_mixers
from compressm_kernels.plan import rank_from_tau
from compressm_kernels.surgery import apply_plan, compress_model, plan_compression, resize_for_state_dict

pytest.importorskip("transformers")


_CACHE: dict[int, tuple] = {}


def _trained(steps: int = 3):
    """A tiny HF model and its AdamW after ``steps`` steps: trained once per module, fresh copies per test."""
    if steps not in _CACHE:
        model = hf_mamba()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for ids in token_batches(steps):
            loss = lm_loss(model, ids)
            opt.zero_grad()
            loss.backward()
            opt.step()
        _CACHE[steps] = (model, opt)
    model, opt = _CACHE[steps]
    copy_ = copy.deepcopy(model)
    opt_copy = torch.optim.AdamW(copy_.parameters(), lr=3e-3)
    opt_copy.load_state_dict(opt.state_dict())
    for p, q in zip(model.parameters(), copy_.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    return copy_, opt_copy


def test_rank_from_tau() -> None:
    sigma = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert rank_from_tau(sigma, 0.3).tolist() == [2, 1]  # 7 >= 0.7·10
    assert rank_from_tau(sigma, 0.31).tolist() == [2, 1]
    assert rank_from_tau(sigma, 0.29).tolist() == [3, 1]
    assert rank_from_tau(sigma, 0.99).tolist() == [1, 1]


def test_plan_changes_nothing_and_prints() -> None:
    model, opt = _trained()
    before = tensors_of(model, opt)
    plan = plan_compression(model, token_batches(2, seed=5), tau=0.2)
    assert_same_tensors(before, tensors_of(model, opt))
    text = str(plan)
    assert "backbone.layers.0.mixer" in text and "N 8 ->" in text
    for lp in plan.layers:
        assert lp.n_before == 8 and 1 <= lp.n_after <= 8
        assert 0 < lp.energy_kept <= 1 and 0 < lp.hsv_kept <= 1
        assert lp.keep.tolist() == sorted(lp.keep.tolist())


def test_cut_equals_masked_full_model_and_generates() -> None:
    model, opt = _trained()
    calib = token_batches(2, seed=5)
    plan = plan_compression(model, calib, rank=3)
    # Different N per layer: layer 1 keeps two other states.
    plan.layers[1] = dataclasses.replace(plan.layers[1], keep=torch.tensor([1, 6]))
    masked = masked_copy(model, {lp.name: lp.keep for lp in plan.layers})
    report = apply_plan(model, plan, opt)
    print(report)
    mixers = find_mixers(model)
    assert [m.A_log.shape for m in mixers.values()] == [(32, 3), (32, 2)]
    assert [m.x_proj.weight.shape[0] for m in mixers.values()] == [2 + 6, 2 + 4]
    assert [m.ssm_state_size for m in mixers.values()] == [3, 2]
    assert model.config.compressm_state_sizes == [3, 2]
    print(model)
    ids = token_batches(1, seed=9)[0]
    model.eval()
    masked.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, masked(ids).logits, rtol=1e-5, atol=1e-5)
        # Generation (cached decode with per-layer state sizes) equals the masked model's.
        out = model.generate(ids[:2, :5], max_new_tokens=6, do_sample=False)
        ref = masked.generate(ids[:2, :5], max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 11)
    assert torch.equal(out, ref)


def test_optimizer_state_is_sliced_and_step_kept() -> None:
    model, opt = _trained()
    mixer = find_mixers(model)["backbone.layers.0.mixer"]
    old = {k: v.clone() for k, v in opt.state[mixer.A_log].items()}
    old_x = {k: v.clone() for k, v in opt.state[mixer.x_proj.weight].items()}
    untouched = model.backbone.layers[0].mixer.out_proj.weight
    untouched_state = opt.state[untouched]
    report = compress_model(model, token_batches(2, seed=5), rank=3, optimizer=opt)
    keep = report.plan.layers[0].keep
    state = opt.state[mixer.A_log]
    assert state["step"] == old["step"]
    for key in ("exp_avg", "exp_avg_sq"):
        assert state[key].shape == mixer.A_log.shape == (32, 3)
        torch.testing.assert_close(state[key], old[key][:, keep], rtol=0, atol=0)
        rows = surgery.x_proj_rows(2, 8, keep)
        torch.testing.assert_close(opt.state[mixer.x_proj.weight][key], old_x[key][rows], rtol=0, atol=0)
    assert opt.state[untouched] is untouched_state
    assert mixer.A_log.grad.shape == mixer.A_log.shape


def test_training_continues_with_last_loss_alive() -> None:
    # The previous step's graph is alive during the next forward (a plain loop keeps `loss`): surgery must
    # not leave autograd with the old shapes.
    model, opt = _trained()
    ids = token_batches(1, seed=3)[0]
    loss = lm_loss(model, ids)
    opt.zero_grad()
    loss.backward()
    opt.step()
    compress_model(model, token_batches(2, seed=5), rank=2, optimizer=opt)
    loss = lm_loss(model, ids)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_failure_mid_surgery_leaves_everything_as_it_was(monkeypatch) -> None:
    model, opt = _trained()
    before = tensors_of(model, opt)
    attrs = [(m.ssm_state_size, m.x_proj.out_features) for m in find_mixers(model).values()]
    config = dict(vars(model.config))
    calls = []
    real = surgery._apply_layer

    def flaky(mixer, lp):
        calls.append(lp.name)
        real(mixer, lp)
        if len(calls) == 2:  # the second layer is already sliced when this fires
            raise RuntimeError("injected failure")

    monkeypatch.setattr(surgery, "_apply_layer", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        compress_model(model, token_batches(2, seed=5), rank=3, optimizer=opt)
    assert len(calls) == 2
    assert_same_tensors(before, tensors_of(model, opt))
    assert attrs == [(m.ssm_state_size, m.x_proj.out_features) for m in find_mixers(model).values()]
    assert dict(vars(model.config)) == config
    monkeypatch.undo()
    loss = lm_loss(model, token_batches(1)[0])  # and it still trains
    loss.backward()
    opt.step()


def test_undo_restores_exactly() -> None:
    model, opt = _trained()
    before = tensors_of(model, opt)
    report = compress_model(model, token_batches(2, seed=5), rank=2, optimizer=opt)
    assert report.changed
    report.undo()
    assert_same_tensors(before, tensors_of(model, opt))
    loss = lm_loss(model, token_batches(1)[0])
    loss.backward()
    opt.step()


def test_checkpoint_with_per_layer_sizes_round_trips(tmp_path) -> None:
    model, _ = _trained()
    plan = plan_compression(model, token_batches(2, seed=5), rank=4)
    plan.layers[0] = dataclasses.replace(plan.layers[0], keep=torch.tensor([0, 2, 5]))
    apply_plan(model, plan)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    fresh = hf_mamba(seed=7)  # full size, its own config
    state_dict = torch.load(tmp_path / "ckpt.pt")
    assert resize_for_state_dict(fresh, state_dict) == {"backbone.layers.0.mixer": 3, "backbone.layers.1.mixer": 4}
    fresh.load_state_dict(state_dict)
    ids = token_batches(1, seed=2)[0]
    model.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tau=0.0), "tau"), (dict(tau=1.0), "tau"), (dict(tau=-0.1), "tau"), (dict(tau=1.5), "tau"),
        (dict(rank=0), "rank"), (dict(rank=9), "exceeds"), (dict(rank=True), "rank"), (dict(rank=2.5), "rank"),
        (dict(fraction=0.0), "fraction"), (dict(tau=0.1, rank=2), "exactly one"), (dict(), "exactly one"),
        (dict(tau=0.1, mode="diagonal"), "mode"), (dict(tau=0.1, mode="channel"), "mask-aware"),
        (dict(tau=0.1, min_rank=0), "min_rank"), (dict(tau=0.1, gate=1.5), "gate"),
    ],
)
def test_bad_arguments_change_nothing(kwargs, match) -> None:
    model, opt = _trained(1)
    before = tensors_of(model, opt)
    with pytest.raises(ValueError, match=match):
        compress_model(model, token_batches(1), optimizer=opt, **kwargs)
    assert_same_tensors(before, tensors_of(model, opt))


@pytest.mark.parametrize(("keep", "error", "match"), [
    (torch.tensor([0, 0, 1]), ValueError, "keep indices must be unique"),
    (torch.tensor([], dtype=torch.long), ValueError, "non-empty 1-D"),
    (torch.tensor([0, 8]), ValueError, r"keep indices must lie in \[0, 8\)"),
    (torch.tensor([0.0, 1.0]), TypeError, "integer tensor"),
], ids=["repeated", "empty", "out_of_range", "float"])
def test_bad_keep_in_a_plan_changes_nothing(keep, error, match) -> None:
    # transformers' mixers are sliced by indexing, which would repeat a state or leave none: checked up front.
    model, opt = _trained(1)
    plan = plan_compression(model, token_batches(1), rank=3)
    bad = dataclasses.replace(plan, layers=[dataclasses.replace(plan.layers[0], keep=keep), *plan.layers[1:]])
    before = tensors_of(model, opt)
    with pytest.raises(error, match=f"backbone.layers.0.mixer: .*{match}"):
        apply_plan(model, bad, opt)
    assert_same_tensors(before, tensors_of(model, opt))


def test_planning_leaves_every_module_in_its_mode() -> None:
    # Calibration runs the model in eval mode; each module must come back in its own mode (model.train(flag)
    # would set them all alike and wake a block the user froze in eval mode).
    model, _ = _trained(1)
    model.train()
    model.backbone.layers[0].eval()
    modes = {name: module.training for name, module in model.named_modules()}
    plan_compression(model, token_batches(1), tau=0.2)
    assert {name: module.training for name, module in model.named_modules()} == modes


def test_only_real_wrappers_are_unwrapped() -> None:
    # DataParallel and torch.compile wrap a model; an ordinary submodule called "module" does not.
    model = hf_mamba()
    model.module = torch.nn.Linear(2, 2)
    names = ["backbone.layers.0.mixer", "backbone.layers.1.mixer"]
    assert list(find_mixers(model)) == names
    assert list(find_mixers(torch.nn.DataParallel(model))) == names
    assert list(find_mixers(torch.compile(model))) == names


def test_falcon_mamba_is_refused_with_the_reason() -> None:
    # Falcon-Mamba RMS-normalizes B and C over the state axis: a cut would change the kept states.
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    torch.manual_seed(0)
    model = FalconMambaForCausalLM(FalconMambaConfig(vocab_size=24, hidden_size=16, state_size=8,
                                                     num_hidden_layers=2, expand=2, conv_kernel=4, time_step_rank=2))
    before = tensors_of(model, None)
    with pytest.raises(ValueError, match=r"backbone\.layers\.0\.mixer is a Falcon-Mamba mixer: it RMS-normalizes B"):
        compress_model(model, token_batches(1), tau=0.2)
    assert_same_tensors(before, tensors_of(model, None))


def test_empty_calibration_and_no_mixers() -> None:
    model, opt = _trained(1)
    with pytest.raises(ValueError, match="non-empty"):
        compress_model(model, [], tau=0.1, optimizer=opt)
    with pytest.raises(ValueError, match="no Mamba-1 mixer") as info:
        compress_model(torch.nn.Linear(3, 3), [torch.zeros(1, 3)], tau=0.1)
    assert "Mamba-2" not in str(info.value)  # only when the model has such mixers
