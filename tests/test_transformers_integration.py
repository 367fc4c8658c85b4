"""transformers' Mamba models on our kernels (``integrations.transformers.install()``): the loss, every gradient
(the fused training path), the logits and cached greedy generation equal transformers' own PyTorch code; the
kernels are ours on CPU tensors and transformers' elsewhere; ``uninstall()`` puts transformers' functions back."""

from __future__ import annotations

import inspect

import pytest
import torch

from compressm_kernels import compress_model
from compressm_kernels.integrations import transformers as bridge
from scan_cases import assert_close

transformers = pytest.importorskip("transformers")
modeling_mamba = pytest.importorskip("transformers.models.mamba.modeling_mamba")
modeling_falcon_mamba = pytest.importorskip("transformers.models.falcon_mamba.modeling_falcon_mamba")
modeling_mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
if not hasattr(modeling_mamba, "mamba_selective_state_update"):
    pytest.skip(f"transformers {transformers.__version__}: the integration follows the 5.x Mamba modelling code",
                allow_module_level=True)

F32 = torch.float32
VOCAB = 64


@pytest.fixture(autouse=True)
def transformers_own_functions(monkeypatch: pytest.MonkeyPatch):
    """Every test starts on transformers' own PyTorch functions. Which implementation transformers picks by
    itself depends on whether mamba_ssm was importable when its modelling module was imported (our mamba_ssm
    integration makes it importable), so the PyTorch ones are pinned."""
    bridge.uninstall()
    for module in (modeling_mamba, modeling_falcon_mamba, modeling_mamba2):
        for name in bridge.MODULES[module.__name__]:
            monkeypatch.setattr(module, name, inspect.unwrap(getattr(module, name)))
    yield
    bridge.uninstall()


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = dict(vocab_size=VOCAB, hidden_size=32, state_size=16, num_hidden_layers=2, expand=2, conv_kernel=4,
              time_step_rank=2, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if family == "falcon_mamba":  # RMSNorm on B, C and Δ inside the fused path
        return transformers.FalconMambaForCausalLM(transformers.FalconMambaConfig(**kw))
    if family == "mamba2":  # 8 heads of 8 channels, 2 groups of B/C, N = 13; chunks of 16 (L = 37 spans three)
        kw.update(state_size=13, num_heads=8, head_dim=8, n_groups=2, chunk_size=16)
        del kw["time_step_rank"]
        return transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**kw))
    if family == "mamba_biases":  # projections with biases, a conv without
        kw.update(use_bias=True, use_conv_bias=False)
    return transformers.MambaForCausalLM(transformers.MambaConfig(**kw))


def _ids(batch: int = 2, seqlen: int = 37) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seqlen), generator=torch.Generator().manual_seed(1))


def _everything(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Training loss and gradients (train mode: the fused path), logits without a cache, and a cached greedy
    generation with its scores (prefill scan, then conv and state decode steps)."""
    ids = _ids()
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    out = {"loss": loss.detach(), **{n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}
    model.eval()
    with torch.no_grad():
        out["logits"] = model(ids, use_cache=False).logits
        gen = model.generate(ids[:, :5], max_new_tokens=8, min_new_tokens=8, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    out["generated"] = gen.sequences
    out["scores"] = torch.stack(gen.scores)
    return out


def _count_our_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls = dict.fromkeys(bridge.OURS, 0)
    for name, fn in list(bridge.OURS.items()):
        def counted(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setitem(bridge.OURS, name, counted)
    return calls


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    assert torch.equal(got.pop("generated"), want.pop("generated"))
    for name in want:
        assert_close(got[name], want[name], F32, name)


@pytest.mark.parametrize("family", ["mamba", "mamba_biases", "falcon_mamba", "mamba2"])
def test_install_matches_transformers_own_path(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(family)
    want = _everything(model)
    calls = _count_our_calls(monkeypatch)
    done = bridge.install()
    assert f"{modeling_mamba.__name__}.mamba_selective_scan" in done
    assert f"{modeling_mamba2.__name__}.mamba2_chunk_scan" in done
    got = _everything(model)
    names = bridge.MAMBA2 if family == "mamba2" else bridge.MAMBA
    assert all(calls[name] for name in names), calls  # every one of the five ran on our kernels
    _assert_same(got, want)


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_padded_training_batch_matches_transformers_own_path(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # transformers' unfused code zeroes padded positions again after the conv; the fused path, given no attention
    # mask, cannot. A padded training batch therefore takes the unfused path (on our conv and scan), and an
    # unpadded one the fused path. A conv bias as a trained model has makes the difference show.
    model = _model(family)
    fused, scan = (("mamba2_split_conv1d_scan_combined", "mamba2_chunk_scan") if family == "mamba2" else
                   ("mamba_inner_fn", "mamba_selective_scan"))
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.conv1d.bias.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(2))
    model.train()
    ids = _ids(batch=3, seqlen=12)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, :1] = 0

    def loss_and_grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        logits = out.logits.detach().masked_fill(mask[..., None] == 0, 0.0)
        return {"loss": out.loss.detach(), "logits": logits,
                **{n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}

    want = loss_and_grads()
    calls = _count_our_calls(monkeypatch)
    bridge.install()
    got = loss_and_grads()
    assert calls[fused] == 2 and calls[scan] == 2  # declined, then the unfused path
    for name in want:
        assert_close(got[name], want[name], F32, name)
    model(_ids(batch=3, seqlen=12), attention_mask=torch.ones_like(ids))  # no padding: the fused path
    assert calls[fused] == 4 and calls[scan] == 2


def test_compacted_model_on_our_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    # A cut to 3 states per layer: the C++ scan packs two channels to a vector there.
    model = _model("mamba")
    compress_model(model, [_ids(seqlen=16)], rank=3)
    assert {m.A_log.shape[1] for m in model.modules() if hasattr(m, "A_log")} == {3}
    want = _everything(model)
    calls = _count_our_calls(monkeypatch)
    bridge.install()
    got = _everything(model)
    assert calls["mamba_inner_fn"] and calls["mamba_selective_scan"] and calls["mamba_selective_state_update"]
    _assert_same(got, want)


def test_other_devices_keep_transformers_functions() -> None:
    # A meta tensor stands in for a GPU: transformers' own scan runs on it (ours would reject it).
    bridge.install()
    u, A, B = (torch.empty(shape, device="meta") for shape in ((1, 4, 3), (4, 2), (1, 2, 3)))
    out = modeling_mamba.mamba_selective_scan(u, u, A, B, B)
    assert out.device.type == "meta" and tuple(out.shape) == (1, 4, 3)


def test_install_is_idempotent_and_uninstall_restores() -> None:
    before = {name: getattr(modeling_mamba, name) for name in bridge.MAMBA}
    bridge.install()
    routed = {name: getattr(modeling_mamba, name) for name in bridge.MAMBA}
    assert all(routed[name] is not before[name] for name in before)
    bridge.install()
    assert all(getattr(modeling_mamba, name) is routed[name] for name in routed)
    bridge.uninstall()
    assert all(getattr(modeling_mamba, name) is before[name] for name in before)


def test_install_refuses_old_modelling_code_and_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # The second module lacks a function (as transformers < 5 would): the first must not be left half routed.
    before = {name: getattr(modeling_mamba, name) for name in bridge.MAMBA}
    monkeypatch.delattr(modeling_falcon_mamba, "mamba_selective_state_update")
    with pytest.raises(ImportError, match="has no mamba_selective_state_update"):
        bridge.install()
    assert all(getattr(modeling_mamba, name) is before[name] for name in before)


def test_compression_refuses_transformers_mamba2_mixers_by_name() -> None:
    from compressm_kernels import plan_compression

    model = _model("mamba2")
    with pytest.raises(ValueError, match=r"Mamba-2 mixers \(backbone\.layers\.0\.mixer, backbone\.layers\.1\.mixer\)"):
        plan_compression(model, [_ids(1, 8)], tau=0.1)
