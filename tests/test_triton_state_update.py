"""The Triton decode step's own behaviour: where ``backend="auto"`` picks it, what it refuses, its custom op.
Its results against the reference (every flag, mask, dtype and layout) are in test_state_update_kernels.py;
its compilation for a GPU in test_triton_gpu_compile.py.
"""

from __future__ import annotations

import pytest
import torch

from compressm_kernels import selective_state_update, selective_state_update_ref
from compressm_kernels.ops.selective_scan import triton as triton_backend
from scan_cases import assert_close, step_inputs, step_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(
    triton_backend.state_update_unavailable_reason({"state": torch.ones(1, 1, 1, device=DEVICE)}) is not None,
    reason="triton cannot run here (not importable, or no GPU and no interpreter)",
)


def test_auto_picks_triton_on_a_gpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    launch = triton_backend.state_update
    monkeypatch.setattr(triton_backend, "state_update", lambda *a: calls.append(1) or launch(*a))
    inputs = step_inputs(dstate=4, device=DEVICE)
    for mask in (None, step_mask("shared", 6, 4, DEVICE)):
        ref = selective_state_update_ref(**dict(inputs, state=inputs["state"].clone()), state_mask=mask)
        out = selective_state_update(**dict(inputs, state=inputs["state"].clone()), state_mask=mask)
        assert_close(out, ref, torch.float32, "out")
    # On a CPU auto runs the C++ kernel (or the reference), never Triton's interpreter.
    assert len(calls) == (2 if DEVICE == "cuda" else 0)


def test_float64_is_refused_with_the_reason() -> None:
    inputs = step_inputs(dstate=4, device=DEVICE)
    wide = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    before = wide["state"].clone()
    with pytest.raises(RuntimeError, match="backend='triton' cannot run these inputs: float64"):
        selective_state_update(**wide, backend="triton")
    assert torch.equal(wide["state"], before)


def test_decode_op_passes_opcheck() -> None:
    inputs = step_inputs(dstate=5, device=DEVICE)
    args = (*(inputs[k] for k in ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")),
            step_mask("per_channel", 6, 5, DEVICE), True)
    torch.library.opcheck(triton_backend.selective_state_update_triton, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_step_traces_under_torch_compile() -> None:
    # fullgraph: the dispatcher's checks trace, and the step is the custom op, whose schema declares the state
    # it writes (so the compiled graph keeps the in-place update).
    inputs = step_inputs(dstate=6, device=DEVICE)
    mask = step_mask("per_channel", 6, 6, DEVICE)

    def step(state, x):
        args = dict(inputs, state=state, x=x)
        return selective_state_update(**args, state_mask=mask, backend="triton") * 2

    from torch._dynamo.backends.common import aot_autograd

    ops = set()

    def record(gm, _):  # a mutating op is traced as auto_functionalized(op, ...)
        calls = [n for n in gm.graph.nodes if n.op == "call_function"]
        ops.update(str(n.args[0] if "auto_functionalized" in str(n.target) else n.target) for n in calls)
        return gm

    ref_state = inputs["state"].clone()
    ref = step(ref_state, inputs["x"])
    state = inputs["state"].clone()
    out = torch.compile(step, fullgraph=True, backend=aot_autograd(fw_compiler=record))(state, inputs["x"])
    assert_close(out, ref, torch.float32, "out")
    assert_close(state, ref_state, torch.float32, "state")
    assert "compressm.selective_state_update_triton.default" in ops, ops
