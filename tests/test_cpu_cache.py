"""The CPU kernels' output cache: freed outputs' blocks are reused (at their size, or by an output of up to half
less) within the limit, and a reused block holds only the new call's results."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from compressm_kernels import cpu_cache_info, empty_cpu_cache, selective_scan_fn, selective_scan_ref
from compressm_kernels._extensions import load_extension
from compressm_kernels.ops.conv1d_cpu import causal_conv1d_fwd_cpu
from scan_cases import assert_close

pytestmark = pytest.mark.skipif(load_extension("_C")[0] is None, reason="compressm_kernels._C is not built")

# (1, 64, 1024) fp32 is 256 KB: cached (outputs of 128 KB and more are)
BIG = (1, 64, 1024)


def conv(x: torch.Tensor) -> torch.Tensor:
    return causal_conv1d_fwd_cpu(x, torch.ones(x.shape[1], 4), None, True)


def test_a_freed_output_block_is_reused_at_its_size() -> None:
    empty_cpu_cache()  # (an idle block of up to twice the size left by another test would serve as well)
    out = conv(torch.randn(BIG))
    ptr = out.data_ptr()
    del out
    before = cpu_cache_info()
    assert before["idle_bytes"] == 256 << 10
    again = conv(torch.randn(BIG))
    after = cpu_cache_info()
    assert again.data_ptr() == ptr
    assert after["hits"] == before["hits"] + 1 and after["idle_bytes"] == 0
    assert after["live_bytes"] >= 256 << 10


def test_a_smaller_output_reuses_a_larger_idle_block() -> None:
    """Shapes that change from step to step (another L each batch) reuse earlier blocks up to twice their size
    instead of leaving them idle; a block more than twice the size is left for outputs of its own size."""
    empty_cpu_cache()
    del_me = conv(torch.randn(1, 64, 2048))  # 512 KB
    ptr = del_me.data_ptr()
    del del_me
    reused = conv(torch.randn(1, 64, 1536))  # 384 KB: fits the 512 KB block
    assert reused.data_ptr() == ptr and cpu_cache_info()["idle_blocks"] == 0
    del reused  # the block goes back as 512 KB
    assert cpu_cache_info()["idle_bytes"] == 512 << 10
    hits = cpu_cache_info()["hits"]
    small = conv(torch.randn(1, 64, 768))  # 192 KB: less than half of it
    assert small.data_ptr() != ptr and cpu_cache_info()["hits"] == hits
    assert cpu_cache_info()["idle_bytes"] == 512 << 10


def test_small_outputs_bypass_the_cache() -> None:
    before = cpu_cache_info()
    conv(torch.randn(1, 4, 64))
    after = cpu_cache_info()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])


def test_a_reused_block_holds_the_new_results() -> None:
    """Every element of a reused output is written: a block first filled by another call (and then NaN) leaves no
    trace in the scan's outputs or gradients."""
    g = torch.Generator().manual_seed(0)
    shape = (1, 64, 1100)
    def inputs():
        u, delta = torch.randn(shape, generator=g), torch.randn(shape, generator=g).mul(0.5)
        A = -torch.rand(64, 12, generator=g).add(0.5)
        B, C = torch.randn(1, 12, shape[-1], generator=g), torch.randn(1, 12, shape[-1], generator=g)
        z = torch.randn(shape, generator=g)
        return [t.requires_grad_() for t in (u, delta, A, B, C, z)]

    poison = inputs()
    out = selective_scan_fn(*poison[:5], None, poison[5], delta_softplus=True, backend="cpu")
    grads = torch.autograd.grad(out, poison, torch.randn_like(out))
    for t in (out, *grads):
        t.detach().fill_(float("nan"))
    del out, grads, t
    hits = cpu_cache_info()["hits"]

    x = inputs()
    dout = torch.randn(shape, generator=g)
    out = selective_scan_fn(*x[:5], None, x[5], delta_softplus=True, backend="cpu")
    grads = torch.autograd.grad(out, x, dout)
    assert cpu_cache_info()["hits"] >= hits + 4  # out, du, ddelta and dz in the poisoned blocks
    ref = selective_scan_ref(*x[:5], None, x[5], delta_softplus=True)
    ref_grads = torch.autograd.grad(ref, x, dout)
    assert_close(out, ref, torch.float32, "out")
    for name, got, want in zip(("du", "ddelta", "dA", "dB", "dC", "dz"), grads, ref_grads, strict=True):
        assert_close(got, want, torch.float32, name)


def test_empty_frees_idle_blocks_and_outputs_stay_valid() -> None:
    kept = conv(torch.ones(BIG))
    del_me = conv(torch.randn(BIG))
    del del_me
    assert cpu_cache_info()["idle_blocks"] >= 1
    empty_cpu_cache()
    info = cpu_cache_info()
    assert info["idle_bytes"] == 0 and info["idle_blocks"] == 0
    torch.testing.assert_close(kept, conv(torch.ones(BIG)))
    kept.resize_(2, 64, 1024).fill_(1.0)  # an output's storage grows like any tensor's
    del kept
    assert cpu_cache_info()["idle_blocks"] >= 1


def test_the_profiler_sees_cached_outputs() -> None:
    x, w = torch.randn(BIG), torch.ones(BIG[1], 4)
    empty_cpu_cache()  # a fresh block of the output's size (an idle larger one could serve it)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = causal_conv1d_fwd_cpu(x, w, None, True)
    (event,) = [e for e in prof.key_averages() if e.key == "compressm::causal_conv1d_fwd_cpu"]
    assert event.self_cpu_memory_usage == out.numel() * 4


def test_threads_allocating_and_freeing_at_once() -> None:
    errors = []
    x = torch.randn(BIG)
    want = conv(x)

    def work() -> None:
        try:
            for _ in range(50):
                torch.testing.assert_close(conv(x), want)
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    info = cpu_cache_info()
    assert 0 < info["idle_bytes"] <= info["limit_bytes"]


FORK_CODE = """
import os, threading, torch
from compressm_kernels.ops.conv1d_cpu import causal_conv1d_fwd_cpu as f
w, x = torch.ones(64, 4), torch.randn(1, 64, 1024)
stop = False
def churn():
    while not stop:
        f(x, w, None, True)
t = threading.Thread(target=churn)
t.start()
for _ in range(20):
    pid = os.fork()
    if pid == 0:  # the child allocates and frees through the cache (a lock left held would hang it here)
        f(x, w, None, True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0, status
stop = True
t.join()
print("ok")
"""


def test_fork_while_another_thread_allocates() -> None:
    """The cache's fork handlers take its lock around fork() and release it on both sides: the children allocate
    through it and the parent carries on (a side left locked hangs, and the run times out)."""
    result = _run(FORK_CODE, "")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


OOM_CODE = """
import resource, torch
from compressm_kernels import cpu_cache_info
from compressm_kernels.ops.conv1d_cpu import causal_conv1d_fwd_cpu as f
w = torch.ones(64, 4)
x = torch.randn(1, 64, 1 << 18)  # 64 MB
outs = [f(x, w, None, True) for _ in range(3)]
del outs  # 192 MB idle
wider = torch.randn(1, 64, 300_000)  # a 73 MB output, a size the cache does not hold
vm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (40 << 20), resource.RLIM_INFINITY))  # 40 MB of room
idle = cpu_cache_info()["idle_bytes"]
out = f(wider, w, None, True)
print(idle >> 20, cpu_cache_info()["idle_bytes"], bool(torch.isfinite(out).all()))
"""


def test_out_of_memory_frees_idle_blocks_and_retries() -> None:
    result = _run(OOM_CODE, "")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["192", "0", "True"]


def _run(code: str, mb: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COMPRESSM_CPU_CACHE_MB": mb}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


LIMIT_CODE = """
import torch
from compressm_kernels import cpu_cache_info
from compressm_kernels.ops.conv1d_cpu import causal_conv1d_fwd_cpu as f
w = torch.ones(64, 4)
sizes = [2048, 1024, 1024, 3072]  # 512, 256, 256 and 768 KB outputs
outs = [f(torch.randn(1, 64, L), w, None, True) for L in sizes]
while outs:
    del outs[0]  # freed in that order
info = cpu_cache_info()
kept, hits = [], []
for L in sizes:
    before = cpu_cache_info()["hits"]
    kept.append(f(torch.randn(1, 64, L), w, None, True))
    hits.append(cpu_cache_info()["hits"] > before)
print(info["limit_bytes"], info["idle_bytes"], info["idle_blocks"], *hits)
"""


@pytest.mark.parametrize("mb, idle, hits", [
    # 1 MB: the 768 KB block evicts the longest idle ones (the 512 KB, then the first 256 KB) until it fits; then the
    # 512 KB output takes the 768 KB block (within twice its size) and the first 256 KB one the other
    ("1", [(256 + 768) << 10, 2], [True, True, False, False]),
    ("0", [0, 0], [False, False, False, False]),  # off
    ("", [(512 + 256 + 256 + 768) << 10, 4], [True, True, True, True]),  # the default, 512 MB
])
def test_the_limit_bounds_idle_memory(mb: str, idle: list[int], hits: list[bool]) -> None:
    result = _run(LIMIT_CODE, mb)
    assert result.returncode == 0, result.stderr[-2000:]
    limit, idle_bytes, idle_blocks, *got = result.stdout.split()
    assert int(limit) == (int(mb) if mb else 512) << 20
    assert [int(idle_bytes), int(idle_blocks)] == idle
    assert got == [str(h) for h in hits]


def test_a_bad_limit_names_the_variable() -> None:
    result = _run(LIMIT_CODE, "lots")
    assert result.returncode != 0 and "COMPRESSM_CPU_CACHE_MB must be a whole number of MB" in result.stderr


def test_an_extension_built_before_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import ModuleType

    from compressm_kernels.ops import cpu_cache

    old = ModuleType("compressm_kernels._C")
    monkeypatch.setattr(cpu_cache, "require_extension", lambda name: old)
    monkeypatch.setattr(cpu_cache, "load_extension", lambda name: (old, None))
    with pytest.raises(RuntimeError, match="built from older sources without the output cache; rebuild"):
        cpu_cache.cpu_cache_info()
    cpu_cache.empty_cpu_cache()  # nothing cached: nothing to do
