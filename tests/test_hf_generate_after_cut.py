"""transformers' MambaForCausalLM after a cut: cached generation, HF's per-layer caches, our kernels in HF's slots.

transformers >= 5 keeps Mamba's decode state in ``DynamicCache`` / ``StaticCache`` layers (``LinearAttentionLayer``)
that allocate each layer's SSM state from the first state that layer produces, so every layer keeps its own N and
``config.state_size`` is not read there. transformers 4.x built a ``MambaCache`` of ``config.state_size`` states for
every layer: there surgery refuses uneven per-layer sizes (tested here by planting such a class).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import re

import pytest
import torch

from compress_models import assert_same_tensors, tensors_of
from compressm_kernels import (
    CompreSSM,
    apply_plan,
    calibrate,
    plan_compression,
    resize_for_state_dict,
)
from compressm_kernels.calibration import find_mixers
from compressm_kernels.integrations import transformers as hf_bridge

transformers = pytest.importorskip("transformers")
modeling_mamba = pytest.importorskip("transformers.models.mamba.modeling_mamba")
if not hasattr(modeling_mamba, "mamba_selective_state_update"):
    pytest.skip(f"transformers {transformers.__version__}: these tests follow the 5.x Mamba modelling code",
                allow_module_level=True)

VOCAB, D_INNER, PROMPT, NEW = 64, 64, 5, 8
KEEP = (torch.tensor([0, 2, 4, 8, 11, 13]), torch.tensor([0, 3, 7, 9, 15]))  # N 16 -> 6 and 16 -> 5
_HF_KERNELS = ("mamba_selective_scan", "mamba_selective_state_update", "causal_conv1d_fn", "causal_conv1d_update")
_BASE: dict[str, object] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tensors here are tiny: a second intra-op thread only adds hand-offs (many times slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _full_model() -> torch.nn.Module:
    """Tiny MambaForCausalLM (N = 16) and a plan for it, built once; fresh copies per call."""
    if not _BASE:
        torch.manual_seed(0)
        # Untied head: with the tied one an untrained model just repeats its last token, which hides a bad state.
        config = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=16, num_hidden_layers=2,
                                          expand=2, conv_kernel=4, time_step_rank=2, tie_word_embeddings=False,
                                          bos_token_id=None, eos_token_id=None, pad_token_id=None)
        model = transformers.MambaForCausalLM(config).eval()
        g = torch.Generator().manual_seed(1)
        _BASE["model"] = model
        _BASE["plan"] = plan_compression(model, [torch.randint(0, VOCAB, (2, 16), generator=g)], rank=6)
    return copy.deepcopy(_BASE["model"])


def _plan(keeps, n_before=(16, 16)):
    """The base plan with chosen kept states (uneven sizes need a hand-made plan)."""
    plan = copy.deepcopy(_BASE["plan"])
    plan.layers = [dataclasses.replace(lp, n_before=n, keep=keep, reduce=keep.numel() < n)
                   for lp, keep, n in zip(plan.layers, keeps, n_before, strict=True)]
    return plan


def _cut_model(keeps=KEEP) -> torch.nn.Module:
    model = _full_model()
    apply_plan(model, _plan(keeps))
    assert [m.A_log.shape[1] for m in find_mixers(model).values()] == [k.numel() for k in keeps]
    return model


def _prompt() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(2))


def _kwargs_it_takes(fn):
    """Drop the keyword arguments ``fn`` does not declare, as HF's wrapper does for an outside implementation."""
    params = inspect.signature(fn).parameters

    def call(*args, **kwargs):
        return fn(*args, **{k: v for k, v in kwargs.items() if k in params})

    return call


def _kernels(path: str) -> dict:
    """Replacements for HF's scan and decode step: none (its torch code), ours, or mamba_ssm's on our bridge."""
    if path == "compressm":  # the functions integrations.transformers.install() routes CPU tensors to
        return {name: hf_bridge.OURS[name] for name in _HF_KERNELS}
    if path == "mamba_ssm":  # what HF itself picks when mamba_ssm imported first (install() makes it importable)
        from compressm_kernels.integrations import mamba_ssm as bridge

        bridge.install()
        scan = importlib.import_module("mamba_ssm.ops.selective_scan_interface").selective_scan_fn
        step = importlib.import_module("mamba_ssm.ops.triton.selective_state_update").selective_state_update
        return {"mamba_selective_scan": _kwargs_it_takes(scan), "mamba_selective_state_update": _kwargs_it_takes(step)}
    return {}


def _use_kernels(monkeypatch, path: str) -> dict[str, int]:
    """Point HF's mixer at its own torch functions (``hf_torch``) or at another path's; returns call counts.

    Which one HF picks by itself depends on whether ``mamba_ssm`` imported before it (our integration makes it
    importable), so every path is pinned here.
    """
    calls = dict.fromkeys(_HF_KERNELS, 0)
    ours = _kernels(path)
    for name in _HF_KERNELS:
        fn = ours.get(name) or inspect.unwrap(getattr(modeling_mamba, name))

        def counted(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(modeling_mamba, name, counted)
    return calls


@torch.no_grad()
def _no_cache_argmax(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    seq = prompt
    for _ in range(steps):
        seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


@torch.no_grad()
def _generate(model, prompt: torch.Tensor, **kwargs):
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False,
                          use_cache=True, output_logits=True, return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("path", ["hf_torch", "compressm", "mamba_ssm"])
def test_cached_generate_equals_no_cache_argmax_loop(monkeypatch, path) -> None:
    calls = _use_kernels(monkeypatch, path)
    model = _cut_model()
    prompt = _prompt()
    out = _generate(model, prompt)
    seq = _no_cache_argmax(model, prompt, NEW)
    assert torch.equal(out.sequences, seq), (out.sequences, seq)
    with torch.no_grad():
        full = model(seq, use_cache=False).logits[:, PROMPT - 1:-1]  # the logits that chose each new token
    torch.testing.assert_close(torch.stack(out.logits, 1), full, rtol=1e-5, atol=1e-5)
    # The check has teeth: varied tokens and no near-tie that rounding could flip.
    top2 = full.topk(2, -1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-3
    assert all(len(set(row.tolist())) >= 4 for row in seq[:, PROMPT:])
    # HF's cache holds each layer's own N.
    assert [layer.recurrent_states[0].shape for layer in out.cache.layers] == [(2, D_INNER, 6), (2, D_INNER, 5)]
    assert calls["mamba_selective_scan"] > 0 and calls["mamba_selective_state_update"] >= NEW - 1


@pytest.mark.parametrize("path", ["compressm", "mamba_ssm"])
def test_our_kernels_match_hf_torch_path(monkeypatch, path) -> None:
    model = _cut_model()
    prompt = _prompt()
    _use_kernels(monkeypatch, "hf_torch")
    ref = _generate(model, prompt)
    _use_kernels(monkeypatch, path)
    out = _generate(model, prompt)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(ref.logits, 1), rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(out.cache.layers, ref.cache.layers, strict=True):
        torch.testing.assert_close(ours.recurrent_states[0], theirs.recurrent_states[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.conv_states[0], theirs.conv_states[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_class", ["DynamicCache", "StaticCache"])
def test_token_by_token_decode_matches_full_forward(monkeypatch, cache_class) -> None:
    # StaticCache applies to Mamba in transformers 5: its linear-attention layers are the same lazily sized ones.
    _use_kernels(monkeypatch, "hf_torch")
    model = _cut_model()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    cls = getattr(transformers, cache_class)
    cache = cls(config=model.config) if cache_class == "DynamicCache" else cls(config=model.config, max_cache_len=9)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        steps = [model(ids[:, :3], cache=cache, use_cache=True).logits]
        steps += [model(ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(3, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert [layer.recurrent_states[0].shape for layer in cache.layers] == [(2, D_INNER, 6), (2, D_INNER, 5)]


@pytest.mark.parametrize("path", ["hf_torch", "compressm"])
def test_cache_from_before_the_cut_is_not_used_silently(monkeypatch, path) -> None:
    _use_kernels(monkeypatch, path)
    model = _full_model()
    prompt = _prompt()
    with torch.no_grad():
        cache = model(prompt, use_cache=True).cache  # 16 states per layer
    apply_plan(model, _plan(KEEP))
    with pytest.raises((RuntimeError, ValueError)), torch.no_grad():
        model(prompt[:, :1], cache=cache, use_cache=True)


def test_second_cut_keeps_config_exact_and_reloads_with_from_pretrained(tmp_path) -> None:
    # Cut 1 leaves N = (5, 6); cut 2 touches only layer 1 (6 -> 5). The config must describe every layer, not
    # only the ones the last cut changed, or from_pretrained builds the wrong sizes.
    model = _cut_model((KEEP[1], KEEP[0]))
    assert model.config.state_size == 6 and model.config.compressm_state_sizes == [5, 6]
    apply_plan(model, _plan((torch.arange(5), torch.tensor([0, 1, 2, 3, 5])), n_before=(5, 6)))
    assert [m.A_log.shape[1] for m in find_mixers(model).values()] == [5, 5]
    assert model.config.state_size == 5 and model.config.compressm_state_sizes == [5, 5]
    model.save_pretrained(tmp_path)
    loaded = transformers.MambaForCausalLM.from_pretrained(tmp_path).eval()
    prompt = _prompt()
    out, ref = _generate(loaded, prompt), _generate(model, prompt)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(ref.logits, 1), rtol=0, atol=0)


def test_uneven_checkpoint_loads_through_resize_for_state_dict(tmp_path) -> None:
    from safetensors.torch import load_file

    model = _cut_model()  # N = (6, 5): config.state_size = 6 cannot describe layer 1
    model.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # loud, not a silent re-initialisation
        transformers.MambaForCausalLM.from_pretrained(tmp_path)
    fresh = transformers.MambaForCausalLM(transformers.MambaConfig.from_pretrained(tmp_path)).eval()
    state_dict = load_file(tmp_path / "model.safetensors")
    assert resize_for_state_dict(fresh, state_dict) == {"backbone.layers.1.mixer": 5}
    fresh.load_state_dict(state_dict)
    assert fresh.config.compressm_state_sizes == [6, 5]
    prompt = _prompt()
    out, ref = _generate(fresh, prompt), _generate(model, prompt)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(ref.logits, 1), rtol=0, atol=0)


def _plant_config_sized_cache(monkeypatch) -> None:
    class MambaCache:  # what transformers 4.x has: every layer's SSM state gets config.state_size states
        pass

    monkeypatch.setattr(modeling_mamba, "MambaCache", MambaCache, raising=False)


def test_uneven_sizes_refused_where_the_cache_uses_config_state_size(monkeypatch) -> None:
    state_dict = _cut_model().state_dict()  # N = (6, 5)
    _plant_config_sized_cache(monkeypatch)
    model = _full_model()
    before, config = tensors_of(model), dict(vars(model.config))
    with pytest.raises(ValueError, match=r"per-layer state sizes \[6, 5\].*MambaCache.*same N"):
        apply_plan(model, _plan(KEEP))
    with pytest.raises(ValueError, match=r"per-layer state sizes \[6, 5\]"):
        resize_for_state_dict(model, state_dict)
    assert_same_tensors(before, tensors_of(model))
    assert dict(vars(model.config)) == config
    apply_plan(model, _plan((KEEP[0], KEEP[0])))  # one N for every layer is fine
    assert model.config.state_size == 6 and model.config.compressm_state_sizes == [6, 6]


def test_uneven_plan_refused_early_and_the_schedule_skips(monkeypatch) -> None:
    model = _full_model()
    with torch.no_grad():
        model.backbone.layers[1].mixer.A_log += 2.0  # faster decay: this layer's spectrum needs another rank
    calib = [torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))]
    accs = calibrate(model, calib)
    sizes = [lp.n_after for lp in plan_compression(model, accs, tau=0.1).layers]
    assert sizes[0] != sizes[1] and max(sizes) < 16, sizes
    _plant_config_sized_cache(monkeypatch)
    with pytest.raises(ValueError, match=re.escape(f"per-layer state sizes {sizes}")):
        plan_compression(model, accs, tau=0.1)
    assert [lp.n_after for lp in plan_compression(model, accs, rank=8).layers] == [8, 8]
    # In training the attempt is skipped with the reason, and training goes on.
    sched = CompreSSM(model, None, 10, tau=0.1, at=[0.1], calib=calib)
    assert sched.step() is None
    assert sched.log[-1]["action"] == "skip" and "per-layer state sizes" in sched.log[-1]["reason"]
    assert [m.A_log.shape[1] for m in find_mixers(model).values()] == [16, 16]
