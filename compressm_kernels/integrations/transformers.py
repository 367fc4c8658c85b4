"""Run transformers' Mamba models (``MambaForCausalLM``, ``FalconMambaForCausalLM``, ``Mamba2ForCausalLM``) on our
CPU kernels.

transformers 5.x computes a Mamba mixer through five functions of its modelling module: ``mamba_inner_fn``
(the fused training path), ``causal_conv1d_fn``, ``causal_conv1d_update``, ``mamba_selective_scan`` and
``mamba_selective_state_update``. Without mamba_ssm and causal-conv1d's CUDA builds they are PyTorch: the scan
is a Python loop over tokens and the fused path is off. Call :func:`install` once::

    from compressm_kernels.integrations.transformers import install
    install()
    model = transformers.MambaForCausalLM.from_pretrained(...)   # trains and generates on our kernels

``install`` replaces those five functions in ``transformers.models.mamba.modeling_mamba`` and
``transformers.models.falcon_mamba.modeling_falcon_mamba`` with routers: CPU tensors run the functions below (our
C++ scan, decode step and causal conv, and the fused training path); any other device keeps what transformers
chose (mamba_ssm's kernels, the kernels hub or its PyTorch code: our CUDA and Triton kernels have not run on a GPU
yet). Compacted models (any N, a different N per layer) run as they are. The results are those of transformers'
own code on this machine, only faster (see :func:`mamba_inner_fn` for Falcon-Mamba). :func:`uninstall` puts
transformers' functions back. ``Mamba2ForCausalLM`` is routed the same way: its fused training path, scan and
decode step (``mamba2_split_conv1d_scan_combined``, ``mamba2_chunk_scan``, ``mamba2_selective_state_update``) and
its causal conv run on :mod:`.mamba_ssm_ssd` and our conv. Other architectures are not affected. Where mamba_ssm
was importable when transformers imported its modelling code (after
:func:`compressm_kernels.integrations.mamba_ssm.install`, say), transformers picked mamba_ssm's functions, which
cannot run Falcon-Mamba's fused path on a CPU; the routers take CPU tensors before them.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import importlib.util
import inspect
from collections.abc import Callable

from torch import Tensor

from ..ops.conv1d import causal_conv1d
from ..ops.conv1d import causal_conv1d_update as _conv_update
from ..ops.mamba_inner import mamba_inner_fn as _inner
from ..ops.selective_scan import selective_scan_fn
from ..ops.state_update import selective_state_update
from . import mamba_ssm_ssd as ssd

_MARK = "__compressm_kernels_original__"  # on a router: the function it replaced
# Whether the batch the current mixer forward started on has padding (see apply_mask_to_padding_states).
_PADDED = contextvars.ContextVar("compressm_kernels_padded", default=False)


def mamba_inner_fn(xz: Tensor, conv1d_weight: Tensor, conv1d_bias: Tensor | None, x_proj_weight: Tensor,
                   delta_proj_weight: Tensor, out_proj_weight: Tensor, out_proj_bias: Tensor | None, A: Tensor,
                   B: Tensor | None = None, C: Tensor | None = None, D: Tensor | None = None,
                   delta_bias: Tensor | None = None, delta_softplus: bool = True, b_rms_weight: Tensor | None = None,
                   c_rms_weight: Tensor | None = None, dt_rms_weight: Tensor | None = None,
                   b_c_dt_rms_eps: float = 1e-6, **_) -> Tensor | None:
    """transformers' fused-path signature on :func:`compressm_kernels.mamba_inner_fn`, or ``None`` (transformers'
    signal to take its unfused path) when B/C/Δ RMSNorm weights are given. Falcon-Mamba passes them, and there
    the fused kernel (mamba_ssm's, and ours, which follows it) normalizes Δ over D after ``dt_proj`` while
    transformers' own code normalizes the time step before it: the router keeps the math transformers computes
    on this machine, so Falcon-Mamba trains through the unfused path, on our conv and scan. So does a batch with
    padding: transformers' unfused code zeroes the padded positions again after the conv, which the fused path
    (given no attention mask) cannot.

    Recomputing the conv and Δ in the backward (mamba_ssm's ``checkpoint_lvl=1``) costs a CPU more time than
    the memory it saves, so CPU tensors keep them, as our ``Mamba`` layer does."""
    if b_rms_weight is not None or c_rms_weight is not None or dt_rms_weight is not None or _PADDED.get():
        return None
    return _inner(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias,
                  A, B, C, D, delta_bias, delta_softplus=delta_softplus,
                  checkpoint_lvl=0 if xz.device.type == "cpu" else 1)


def causal_conv1d_fn(hidden_states: Tensor, weight: Tensor, bias: Tensor | None = None,
                     activation: str | None = None, **_) -> Tensor:
    """transformers' conv signature (``weight`` ``(D, W)``) on :func:`compressm_kernels.ops.conv1d.causal_conv1d`."""
    return causal_conv1d(hidden_states, weight, bias, activation)


def causal_conv1d_update(hidden_states: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None,
                         activation: str | None = None) -> Tensor:
    """transformers' conv decode step: ``hidden_states`` ``(Bt, D, T)``, ``conv_state`` ``(Bt, D, W)`` shifted in
    place."""
    return _conv_update(hidden_states, conv_state, weight, bias, activation)


def mamba_selective_scan(hidden_states: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                         z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                         return_last_state: bool = False, **_) -> Tensor | tuple[Tensor, Tensor]:
    """transformers' scan signature on :func:`compressm_kernels.selective_scan_fn` (its ``use_mambapy`` /
    ``use_associative_scan`` choose among its PyTorch scans: nothing here)."""
    return selective_scan_fn(hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def mamba_selective_state_update(state: Tensor, hidden_states: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                                 D: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = False,
                                 z: Tensor | None = None, **_) -> Tensor:
    """transformers' decode-step signature (``dt_bias`` before ``z``) on
    :func:`compressm_kernels.selective_state_update`."""
    return selective_state_update(state, hidden_states, dt, A, B, C, D, z, dt_bias, dt_softplus)


def mamba2_split_conv1d_scan_combined(zxbcdt: Tensor, conv1d_weight: Tensor, conv1d_bias: Tensor | None,
                                      dt_bias: Tensor, A: Tensor, D: Tensor, chunk_size: int,
                                      initial_states: Tensor | None = None,
                                      dt_limit: tuple[float, float] = (0.0, float("inf")),
                                      return_final_states: bool = False, activation: str = "silu",
                                      rmsnorm_weight: Tensor | None = None, rmsnorm_eps: float = 1e-6,
                                      outproj_weight: Tensor | None = None, outproj_bias: Tensor | None = None,
                                      headdim: int | None = None, ngroups: int = 1, norm_before_gate: bool = True,
                                      **_) -> Tensor | tuple[Tensor, Tensor] | None:
    """transformers' fused Mamba-2 training path on :mod:`.mamba_ssm_ssd` (our conv and scan), or ``None``
    (transformers' unfused path) for a batch with padding, as :func:`mamba_inner_fn`."""
    if _PADDED.get():
        return None
    return ssd.split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                          initial_states, None, dt_limit, return_final_states, activation,
                                          rmsnorm_weight, rmsnorm_eps, outproj_weight, outproj_bias, headdim, ngroups,
                                          norm_before_gate)


def mamba2_chunk_scan(hidden_states: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                      D: Tensor | None = None, dt_bias: Tensor | None = None, initial_states: Tensor | None = None,
                      dt_softplus: bool = False, dt_limit: tuple[float, float] = (0.0, float("inf")),
                      return_final_states: bool = False, z: Tensor | None = None,
                      **_) -> Tensor | tuple[Tensor, Tensor]:
    """transformers' Mamba-2 scan on :func:`.mamba_ssm_ssd.ssd_scan` (``chunk_size`` unused)."""
    return ssd.ssd_scan(hidden_states, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, return_final_states,
                        initial_states)


def mamba2_selective_state_update(state: Tensor, hidden_states: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                                  D: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = False,
                                  z: Tensor | None = None, **_) -> Tensor:
    """transformers' Mamba-2 decode step (``dt_bias`` before ``z``) on
    :func:`.mamba_ssm_ssd.multi_head_state_update`."""
    return ssd.multi_head_state_update(state, hidden_states, dt, A, B, C, D, z, dt_bias, dt_softplus)


_MASK = "apply_mask_to_padding_states"  # wrapped to note padding, not replaced
MAMBA = ("mamba_inner_fn", "causal_conv1d_fn", "causal_conv1d_update", "mamba_selective_scan",
         "mamba_selective_state_update")
MAMBA2 = ("mamba2_split_conv1d_scan_combined", "causal_conv1d_fn", "causal_conv1d_update", "mamba2_chunk_scan",
          "mamba2_selective_state_update")
MODULES = {"transformers.models.mamba.modeling_mamba": MAMBA,
           "transformers.models.falcon_mamba.modeling_falcon_mamba": MAMBA,
           "transformers.models.mamba2.modeling_mamba2": MAMBA2}
OURS: dict[str, Callable] = {f.__name__: f for f in (
    mamba_inner_fn, causal_conv1d_fn, causal_conv1d_update, mamba_selective_scan, mamba_selective_state_update,
    mamba2_split_conv1d_scan_combined, mamba2_chunk_scan, mamba2_selective_state_update)}


def _padding_recorder(original: Callable) -> Callable:
    """transformers' ``apply_mask_to_padding_states``, noting whether a CPU batch has padding: a mixer forward
    calls it first, before the fused path that :func:`mamba_inner_fn` then declines for such a batch."""

    @functools.wraps(original)
    def apply_mask_to_padding_states(hidden_states: Tensor, attention_mask: Tensor | None, *args, **kwargs):
        _PADDED.set(attention_mask is not None and hidden_states.device.type == "cpu" and
                    not bool(attention_mask.all()))
        return original(hidden_states, attention_mask, *args, **kwargs)

    setattr(apply_mask_to_padding_states, _MARK, original)
    return apply_mask_to_padding_states


def _router(ours: Callable, original: Callable) -> Callable:
    """``ours`` for CPU tensors (judged by the first argument, given by position or by name), ``original`` for any
    other device."""
    first_name = next(iter(inspect.signature(ours).parameters))

    @functools.wraps(ours)
    def route(*args, **kwargs):
        first = args[0] if args else kwargs[first_name]
        return (ours if first.device.type == "cpu" else original)(*args, **kwargs)

    setattr(route, _MARK, original)
    return route


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None  # None: a transformers without this model
    except ImportError:  # no transformers at all
        return False


def _modules() -> list:
    """The modelling modules of MODULES this transformers has, imported."""
    return [importlib.import_module(name) for name in MODULES if _importable(name)]


def install() -> dict[str, str]:
    """Route transformers' Mamba functions to our kernels for CPU tensors (idempotent).

    Returns:
        ``{"<module>.<function>": what now runs it}`` for every function replaced or already routed.
    Raises:
        ImportError: transformers is not installed, or its Mamba modelling code lacks these functions
            (transformers < 5).
    """
    modules = _modules()
    if not modules:
        raise ImportError("compressm_kernels.integrations.transformers needs transformers with its Mamba models "
                          "(pip install 'transformers>=5')")
    for module in modules:  # every module checked before any is changed
        missing = [name for name in (*MODULES[module.__name__], _MASK) if not callable(getattr(module, name, None))]
        if missing:
            raise ImportError(f"{module.__name__} has no {', '.join(missing)}: this integration follows transformers "
                              f">= 5's Mamba code (installed: {importlib.import_module('transformers').__version__})")
    done = {}
    for module in modules:
        for name in MODULES[module.__name__]:
            current = getattr(module, name)
            if not hasattr(current, _MARK):
                setattr(module, name, _router(OURS[name], current))
            done[f"{module.__name__}.{name}"] = f"compressm_kernels on CPU tensors, transformers' {name} elsewhere"
        if not hasattr(getattr(module, _MASK), _MARK):
            setattr(module, _MASK, _padding_recorder(getattr(module, _MASK)))
    return done


def uninstall() -> None:
    """Put back the functions :func:`install` replaced (a no-op where nothing is routed)."""
    for module in _modules():
        for name in (*MODULES[module.__name__], _MASK):
            current = getattr(module, name, None)
            if hasattr(current, _MARK):
                setattr(module, name, getattr(current, _MARK))
