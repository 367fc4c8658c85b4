"""Smoke tests of ``python -m bench`` and experiments/scifar.py at their smallest sizes (they time nothing).

They keep the harness, the CLI, the JSON rows, the plots and the experiment script from rotting; the
numbers themselves come from real runs (bench/README.md).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from bench.__main__ import main as bench_main
from bench.harness import Bench, heap_policy, machine_header
from compressm_kernels.ops.selective_scan import cpu as cpu_backend

ROOT = Path(__file__).resolve().parents[1]
HAS_CPU_KERNELS = cpu_backend.load_extension("_C")[1] is None
TINY = ["--warmup", "0", "--repeats", "2", "--threads", "1"]  # one thread: no OpenMP waits on a busy CI box
SUITES = {
    "scan": ["--backends", "reference,cpu", "--dstates", "4,2", "--batch", "1", "--dim", "4", "--seqlen", "8",
             "--rank", "2"],
    "decode": ["--dstates", "4,2", "--dim", "8", "--batch", "1", "--steps", "2"],
    "block": ["--d-model", "8", "--batch", "1", "--seqlen", "8", "--dstate", "8", "--cuts", "4"],
    "conv": ["--dims", "8", "--batch", "1", "--seqlen", "8", "--width", "3"],
    "hankel": ["--dims", "4", "--dstates", "4", "--batch", "1", "--seqlen", "8", "--scipy-max-dim", "4"],
    "hf": ["--d-model", "8", "--layers", "1", "--dstate", "2", "--batch", "1", "--seqlen", "8", "--new", "2"],
    "ssd": ["--batch", "1", "--seqlen", "64", "--heads", "2", "--headdim", "4", "--dstates", "8,4"],
}


# Second configurations of a suite: its options, and the name its results go under.
VARIANTS = {
    "hf-mamba2": ([*SUITES["hf"], "--family", "mamba2"], "hf"),
    "decode-mamba2": ([*SUITES["decode"], "--headdim", "4"], "decode_mamba2"),
}


@pytest.mark.parametrize("suite", [*SUITES, *VARIANTS])
def test_suite_writes_rows_and_plot(suite: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    options, results = VARIANTS.get(suite, (SUITES.get(suite), suite))
    suite = suite.split("-")[0]
    if suite == "hf":
        pytest.importorskip("transformers")
    bench_main([suite, "--quick", *TINY, *options, "--json-dir", str(tmp_path), "--plots-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "torch " in out and "median ms" in out  # header with versions, then the table
    report = json.loads((tmp_path / f"{results}_cpu.json").read_text())
    rows = report["rows"]
    assert rows and all(r["q20_ms"] <= r["median_ms"] <= r["q80_ms"] for r in rows)
    if sys.platform != "win32":  # CPU rows count the page faults of each timed call
        assert all(isinstance(r["faults"], (int, float)) and r["faults"] >= 0 for r in rows)
        assert " faults " in out
    baselines = [r for r in rows if r["ratio"] == pytest.approx(1.0)]
    assert baselines, "every suite measures its baseline in the same run"
    assert (tmp_path / f"{results}_cpu.png").stat().st_size > 0
    names = " ".join(r["name"] for r in rows)
    if suite == "scan":
        assert "reference fwd N=4" in names and "bwd N=2" in names
        if HAS_CPU_KERNELS:
            assert "cpu masked 2/4" in names and "cpu compacted N=2" in names and "cpu per-channel ranks" in names
    if suite == "block":
        assert {r["extra"]["variant"] for r in rows} == {"full", "compacted", "masked"}
    if suite == "decode":
        assert all(r["extra"]["tok/s"] > 0 for r in rows)
        assert ("Mamba-2 heads of 4" in out) == (results == "decode_mamba2")
    if suite == "conv":
        assert {r["extra"]["op"] for r in rows} == {"fwd", "fwd+bwd", "decode step"}
    if suite == "ssd":
        assert {(r["extra"]["impl"], r["extra"]["op"]) for r in rows} == {
            (impl, op) for impl in ("minimal", "ours") for op in ("fwd", "fwd+bwd")}
    if suite == "hf":
        assert {r["extra"]["op"] for r in rows} == {"train step", "forward", "generate"}
        assert {r["extra"]["path"] for r in rows} == {"transformers", "compressm"}


@pytest.mark.parametrize("suite", [*SUITES, "all"])
def test_suite_help_prints(suite: str, capsys: pytest.CaptureFixture[str]) -> None:
    # argparse formats help strings with %: a suite's docstring with a literal % would make --help crash.
    with pytest.raises(SystemExit) as info:
        bench_main([suite, "--help"])
    assert info.value.code == 0
    assert "usage: python -m bench" in capsys.readouterr().out


def test_ratios_are_to_the_group_baseline() -> None:
    bench = Bench("t", repeats=2, warmup=0)
    fast = bench.time("fast", lambda: None, group="g")
    base = bench.time("base", lambda: sum(range(20000)), group="g", baseline=True)
    other = bench.time("other group", lambda: None, group="h")
    assert base.ratio == 1.0 and fast.ratio == pytest.approx(base.median_ms / fast.median_ms) and fast.ratio > 1
    assert other.ratio is None
    assert "fast" in bench.table() and "1.00x" in bench.table()


def test_compare_times_a_group_round_robin() -> None:
    # Warm-ups one callable at a time, then rounds of one call each, every round starting one later, so a slow
    # spell of the machine is shared by all rows of the group.
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    bench = Bench("t", repeats=3, warmup=1)
    rows = bench.compare("g", fns, baseline="b", extras={"a": {"N": 4}})
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [r.name for r in bench.rows] == ["a", "b", "c"] and rows["b"].ratio == 1.0
    assert rows["a"].extra == {"N": 4} and rows["c"].extra == {}
    assert rows["a"].ratio == pytest.approx(rows["b"].median_ms / rows["a"].median_ms)
    with pytest.raises(ValueError, match="baseline 'z' is not one of the rows"):
        bench.compare("h", fns, baseline="z")


def test_cpu_header_names_the_heap_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    # Freed tensors come back as fresh pages (thousands of faults a call) or not, by glibc's settings: a CPU
    # report says which, from the environment the run was started with.
    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    assert heap_policy() == "heap: the C library's defaults"
    monkeypatch.setenv("LD_PRELOAD", "libjemalloc.so.2")
    assert heap_policy() == "heap: LD_PRELOAD=libjemalloc.so.2"
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "2000000000")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "2000000000")
    assert heap_policy() == ("heap: MALLOC_TRIM_THRESHOLD_=2000000000, MALLOC_MMAP_THRESHOLD_=2000000000, "
                             "LD_PRELOAD=libjemalloc.so.2")
    assert machine_header("cpu").splitlines()[-1].endswith("CPU; " + heap_policy())


def test_unknown_backend_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="unknown backend 'nope'"):
        bench_main(["scan", "--backends", "nope", "--json-dir", "", "--plots-dir", ""])


def _scifar():
    spec = importlib.util.spec_from_file_location("scifar", ROOT / "experiments" / "scifar.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scifar_runs_two_steps_on_fake_data(tmp_path: Path) -> None:
    out = tmp_path / "scifar.json"
    results = _scifar().main(["--fake-data", "--steps", "2", "--batch", "2", "--d-model", "8", "--layers", "2",
                              "--n-state", "16", "--device", "cpu", "--out", str(out), "--log-every", "1"])
    assert [r["run"] for r in results] == ["full", "compressm", "small"]
    full, cut, small = results
    assert full["n_final"] == [16, 16]
    assert all(n <= 16 for n in cut["n_final"]) and small["n_start"] == small["n_final"] == cut["n_final"]
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in results)
    assert json.loads(out.read_text())["results"][1]["n_final"] == cut["n_final"]


def test_scifar_names_the_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    scifar = _scifar()
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(SystemExit, match="pip install torchvision"):
        scifar.main(["--steps", "1", "--out", ""])
