"""Loading the compiled extensions: a mismatched torch gets a clear reason, never an undefined-symbol crash."""

from __future__ import annotations

import pytest

from compressm_kernels import _extensions


def test_extension_built_for_another_torch_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_extensions, "built_against", lambda: "1.0.0+other")
    _extensions.load_extension.cache_clear()
    try:
        module, reason = _extensions.load_extension("_C")
    finally:
        _extensions.load_extension.cache_clear()
    assert module is None
    assert "built against torch 1.0.0+other" in reason and "pip install --no-build-isolation -e ." in reason


def test_missing_extension_reports_how_to_build_it() -> None:
    module, reason = _extensions.load_extension("_C_does_not_exist")
    assert module is None and "is not available" in reason and "bootstrap.sh" in reason


def test_built_extensions_record_the_running_torch() -> None:
    import torch

    built = _extensions.built_against()
    if built is None:
        pytest.skip("no compiled extension in this tree (built with COMPRESSM_NO_EXTENSIONS=1)")
    assert built == torch.__version__


def test_import_stays_light() -> None:
    """``import compressm_kernels`` loads the extensions (a millisecond) but not torch._dynamo (seconds): the
    compile-friendly availability checks must not pull it in at import."""
    import subprocess
    import sys

    code = "import sys, torch; before = 'torch._dynamo' in sys.modules; import compressm_kernels; " \
           "print(before, 'torch._dynamo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    before, after = result.stdout.split()
    assert after == before == "False", result.stdout
