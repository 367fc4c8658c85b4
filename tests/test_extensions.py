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


def _built(name: str):
    module, reason = _extensions.load_extension(name)
    if module is None:
        pytest.skip(reason)
    return module


@pytest.mark.parametrize("name", ["_C", "_C_cuda"])
def test_extensions_link_the_shared_libstdcxx(name: str) -> None:
    """The extensions use the libstdc++ torch uses, not a static copy of their own (setup.py names it even
    where the environment asks for -static-libstdc++): with a copy, integers streamed into error messages
    came out truncated here and segfaulted on the GPU machine."""
    import shutil
    import subprocess

    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils, which builds the extensions) is not installed")
    module = _built(name)
    dynamic = subprocess.run([readelf, "-d", module.__file__], capture_output=True, text=True, check=True).stdout
    assert "[libstdc++.so.6]" in dynamic, dynamic


def test_error_messages_keep_their_numbers() -> None:
    """The symptom of a private libstdc++ copy: the message stops at its first integer."""
    import torch

    cpu = _built("_C")
    u, A, B = torch.randn(1, 3, 4), -torch.rand(3, 300), torch.randn(1, 300, 4)
    with pytest.raises(ValueError, match=r"^A must have 1 <= N <= 256 states, got N=300$"):
        cpu.scan_fwd(u, u, A, B, B, None, None, None, None, None, True, 64)


@pytest.mark.parametrize(("extension", "message"), [
    ("_C_does_not_exist", r"compressm_kernels\._C_does_not_exist is not available.*bootstrap"),
    ("_C", r"_C has no CPU kernel for test_op_without_kernel: it was built from older sources.*bootstrap"),
], ids=["missing", "older"])
def test_ops_without_their_kernel_raise_the_fix(extension: str, message: str) -> None:
    """An op whose extension is missing, or was built from older sources without the op's kernel, says how to
    rebuild when called."""
    import torch

    if extension == "_C":
        _built("_C")
    lib = _extensions.define_ops(extension, "CPU", ["test_op_without_kernel(Tensor x) -> Tensor"])
    try:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.compressm.test_op_without_kernel(torch.ones(2))
    finally:
        lib._destroy()


@pytest.mark.parametrize("op", ["selective_scan_fwd_cpu", "selective_scan_bwd_cpu", "causal_conv1d_fwd_cpu",
                                "causal_conv1d_bwd_cpu"])
def test_cpu_kernels_are_registered_in_cpp(op: str) -> None:
    """The training ops' CPU kernels are the extension's C++ functions, so a call has no Python in between (as
    custom ops with Python kernels they cost ~30 µs more per call)."""
    import torch

    from compressm_kernels.ops import conv1d_cpu  # noqa: F401  (defines the conv ops)
    from compressm_kernels.ops.selective_scan import cpu  # noqa: F401  (defines the scan ops)

    _built("_C")
    cpu_line = [line for line in torch._C._dispatch_dump(f"compressm::{op}").splitlines() if line.startswith("CPU:")]
    assert len(cpu_line) == 1 and "csrc/cpu/bindings.cpp" in cpu_line[0], cpu_line


def test_backprop_through_a_raw_cpu_op_raises() -> None:
    """The ops' gradients come from the autograd.Functions around them: backprop through an op called directly
    raises rather than warn and leave the gradient missing."""
    import torch

    from compressm_kernels.ops import conv1d_cpu

    _built("_C")
    x = torch.randn(1, 4, 8, requires_grad=True)
    out = conv1d_cpu.causal_conv1d_fwd_cpu(x, torch.randn(4, 3), None, True)
    with pytest.raises(RuntimeError, match="derivative for compressm::causal_conv1d_fwd_cpu is not implemented"):
        out.sum().backward()
