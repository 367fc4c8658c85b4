"""The dispatcher: explicit backends raise with the reason, auto falls back, the return contract."""

from __future__ import annotations

import logging

import pytest
import torch

import compressm_kernels
from compressm_kernels import backend_status, selective_scan_fn, selective_scan_ref
from scan_cases import Case, make_inputs


def _inputs(**kw) -> dict:
    inputs = make_inputs(Case(batch=1, dim=4, seqlen=10, dstate=4, **kw))
    return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def test_returns_like_mamba_ssm() -> None:
    inputs = _inputs()
    out = selective_scan_fn(**{**inputs, "return_last_state": False})
    assert isinstance(out, torch.Tensor) and out.shape == (1, 4, 10)
    out, last = selective_scan_fn(**inputs)
    assert last.shape == (1, 4, 4) and last.dtype == torch.float32


def test_auto_matches_reference_on_cpu() -> None:
    inputs = _inputs()
    found = selective_scan_fn(**inputs)
    expected = selective_scan_ref(**inputs)
    torch.testing.assert_close(found[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(found[1], expected[1], rtol=1e-5, atol=1e-5)


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        selective_scan_fn(**_inputs(), backend="tpu")


def test_explicit_gpu_backend_on_cpu_tensors_raises_with_reason() -> None:
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run these inputs: .+"):
        selective_scan_fn(**_inputs(), backend="cuda")


def test_env_switch_chooses_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPRESSM_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        selective_scan_fn(**_inputs())
    monkeypatch.setenv("COMPRESSM_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="COMPRESSM_BACKEND"):
        selective_scan_fn(**_inputs())


def test_auto_logs_its_choice_once(caplog: pytest.LogCaptureFixture) -> None:
    from compressm_kernels.ops.selective_scan import interface

    interface._logged_choices.clear()
    with caplog.at_level(logging.INFO, logger="compressm_kernels"):
        selective_scan_fn(**_inputs())
        selective_scan_fn(**_inputs())
    assert len([r for r in caplog.records if "selective_scan on cpu uses" in r.message]) == 1


def test_backend_status_lists_every_backend() -> None:
    status = backend_status("cpu")
    assert set(status) == set(compressm_kernels.BACKENDS)
    assert status["reference"] is None
    assert status["cuda"], "the CUDA backend cannot run CPU tensors and must say why"


def test_float64_runs_on_reference() -> None:
    inputs = _inputs(dtype=torch.float64)
    out, last = selective_scan_fn(**inputs, backend="reference")
    assert out.dtype == torch.float64 and last.dtype == torch.float64
