"""The ``compressm`` command line."""

from __future__ import annotations

import pytest

import compressm_kernels
from compressm_kernels.cli import main


def test_version_matches_package(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"compressm_kernels {compressm_kernels.__version__}"


def test_backends_lists_reference(capsys: pytest.CaptureFixture[str]) -> None:
    main(["backends"])
    out = capsys.readouterr().out
    assert "reference  available" in out and "cuda" in out


def test_backends_on_a_device_this_machine_lacks(capsys: pytest.CaptureFixture[str]) -> None:
    # No such GPU (none at all here, or not 99 of them): every backend listed as unavailable, no traceback.
    main(["backends", "--device", "cuda:99"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(compressm_kernels.BACKENDS)
    assert all("unavailable: this machine has no usable cuda:99 device" in line for line in lines)
    with pytest.raises(SystemExit, match="device must name a torch device such as 'cpu' or 'cuda', got 'bogus'"):
        main(["backends", "--device", "bogus"])


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["scan-demo", "--help"], ["backends", "--help"]],
                         ids=" ".join)
def test_help_prints(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # The demo's help says "10 %": argparse formats help strings with %, which once made --help crash.
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    assert "usage: compressm" in capsys.readouterr().out
