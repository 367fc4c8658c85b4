"""Find Mamba-1 mixers in any model and recompute their scan inputs from captured hidden states.

Three mixer kinds share the parameter names ``in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj``
(compressm_kernels' ``Mamba``, mamba_ssm's ``Mamba`` and transformers' ``MambaMixer``), so one forward
pre-hook captures a mixer's input hidden states and one function rebuilds (u, Δ, B, C) from them — the
same computation each mixer's forward does before its scan. The moments stream into a
:class:`~compressm_kernels.hankel.HankelAccumulator`; no activation is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hankel import HankelAccumulator, Scale

_PARTS = ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj")


def mixer_kind(module: nn.Module) -> str | None:
    """``"compressm"``, ``"mamba_ssm"``, ``"transformers"`` or ``"mamba"`` for a Mamba-1 mixer, else ``None``."""
    A_log = getattr(module, "A_log", None)
    if not (isinstance(A_log, torch.Tensor) and A_log.dim() == 2 and all(hasattr(module, p) for p in _PARTS)):
        return None  # Mamba-2 mixers have a 1-D A_log and no x_proj
    root = type(module).__module__.split(".")[0]
    return {"compressm_kernels": "compressm", "mamba_ssm": "mamba_ssm", "transformers": "transformers"}.get(
        root, "mamba")


def _is_mamba2_mixer(module: nn.Module) -> bool:
    """mamba_ssm's ``Mamba2`` and transformers' ``Mamba2Mixer``: one A per head (a 1-D A_log), no x_proj."""
    A_log = getattr(module, "A_log", None)
    return (isinstance(A_log, torch.Tensor) and A_log.dim() == 1 and hasattr(module, "in_proj")
            and hasattr(module, "conv1d") and not hasattr(module, "x_proj"))


def no_mixer_error(model: nn.Module) -> ValueError:
    """The error for a model without a Mamba-1 mixer, naming its Mamba-2 mixers if it has any."""
    message = "model contains no Mamba-1 mixer (modules with in_proj, conv1d, x_proj, dt_proj, A_log)"
    mamba2 = [name or "the model" for name, module in unwrap(model).named_modules() if _is_mamba2_mixer(module)]
    if mamba2:
        shown = ", ".join(mamba2[:3]) + (f" and {len(mamba2) - 3} more" if len(mamba2) > 3 else "")
        message += (f"; it has Mamba-2 mixers ({shown}), which compression does not support: their heads share "
                    "one A and every head of a group reads the same B and C states, so the Hankel ranking and the "
                    "surgery here (per-channel A, x_proj rows) do not apply")
    return ValueError(message)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers (only those: any model
    may have a submodule called ``module``)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def find_mixers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Mamba-1 mixer in ``model`` by qualified name (wrappers unwrapped), outermost first.

    Raises ``ValueError`` for a Falcon-Mamba mixer, whose states cannot be cut one by one (below).
    """
    found: dict[str, nn.Module] = {}
    for name, module in unwrap(model).named_modules():
        if mixer_kind(module) is not None and not any(name.startswith(f"{p}.") for p in found):
            if hasattr(module, "b_layernorm") or hasattr(module, "c_layernorm"):
                raise ValueError(f"{name or 'the model'} is a Falcon-Mamba mixer: it RMS-normalizes B and C over the "
                                 "state axis, so cutting states would change the ones kept and its Hankel energies "
                                 "are not those of its states; compression does not support it (our kernels do, "
                                 "through compressm_kernels.integrations.transformers)")
            found[name] = module
    return found


def state_mask_of(mixer: nn.Module) -> Tensor | None:
    """The mixer's per-channel state mask if it has one (compressm's layer), else ``None``."""
    mask = getattr(mixer, "state_mask", None)
    return mask if isinstance(mask, torch.Tensor) else None


@torch.no_grad()
def scan_inputs(mixer: nn.Module, hidden_states: Tensor, attention_mask: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Recompute what ``mixer`` feeds its scan, in float32.

    Args:
        mixer: a Mamba-1 mixer (see :func:`mixer_kind`).
        hidden_states: ``(Bt, L, d_model)`` the mixer's input.
        attention_mask: optional ``(Bt, L)`` (transformers' padding mask).
    Returns:
        ``u (Bt, D, L)``, ``delta (Bt, D, L)`` after bias and softplus, ``B (Bt, N, L)``, ``C (Bt, N, L)``,
        and the ``(Bt, L)`` position weights (``None`` without a mask).
    """
    h = hidden_states.float()
    weight = None if attention_mask is None else attention_mask.float()
    if weight is not None:
        h = h * weight[..., None]
    lin = mixer.in_proj
    xz = F.linear(h, lin.weight.float(), None if lin.bias is None else lin.bias.float()).transpose(1, 2)
    x, _ = xz.chunk(2, dim=1)
    conv = mixer.conv1d
    seqlen = x.shape[-1]
    x = F.conv1d(x, conv.weight.float(), None if conv.bias is None else conv.bias.float(),
                 padding=conv.weight.shape[-1] - 1, groups=conv.weight.shape[0])[..., :seqlen]
    act = getattr(mixer, "act", None)
    x = act(x) if callable(act) else F.silu(x)
    if weight is not None:
        x = x * weight[:, None, :]
    dstate = mixer.A_log.shape[1]
    x_dbl = F.linear(x.transpose(1, 2), mixer.x_proj.weight.float())  # (Bt, L, R + 2N)
    rank = x_dbl.shape[-1] - 2 * dstate
    dt, B, C = torch.split(x_dbl, [rank, dstate, dstate], dim=-1)
    dt = F.linear(dt, mixer.dt_proj.weight.float(), mixer.dt_proj.bias.float())
    delta = F.softplus(dt).transpose(1, 2)
    return x, delta, B.transpose(1, 2), C.transpose(1, 2), weight


def _is_decode_call(args: tuple, kwargs: dict[str, Any]) -> bool:
    """Cached single-token steps are not calibration data (and their hidden states are one token long)."""
    params = kwargs.get("inference_params", args[1] if len(args) > 1 else None)
    if params is not None and getattr(params, "seqlen_offset", 0) > 0:
        return True
    cache = kwargs.get("cache", kwargs.get("cache_params"))
    hidden = args[0] if args else kwargs.get("hidden_states")
    return cache is not None and hidden is not None and hidden.shape[1] == 1


@contextmanager
def capture(mixers: dict[str, nn.Module], accumulators: dict[str, HankelAccumulator]):
    """Within the block, every forward of a mixer adds its batch to ``accumulators[name]``."""
    handles = []

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if _is_decode_call(args, kwargs):
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            u, delta, B, C, weight = scan_inputs(module, hidden.detach(), kwargs.get("attention_mask"))
            A = -torch.exp(module.A_log.detach().float())
            accumulators[name].update(u, delta, A, B, C, weight)
        return hook

    try:
        for name, mixer in mixers.items():
            handles.append(mixer.register_forward_pre_hook(hook_for(name), with_kwargs=True))
        yield accumulators
    finally:
        for h in handles:
            h.remove()


def _eager() -> AbstractContextManager:
    """A block in which torch.compile'd code runs eagerly (torch >= 2.6; before that, a no-op)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else nullcontext()


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on one calibration batch: a tensor, a dict of kwargs or a tuple of args."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, list | tuple):
        return model(*batch)
    return model(batch)


@torch.no_grad()
def calibrate(model: nn.Module, calib: Iterable[Any], *, scale: Scale = "input",
              forward: Callable[[nn.Module, Any], Any] | None = None,
              mixers: dict[str, nn.Module] | None = None) -> dict[str, HankelAccumulator]:
    """Run ``model`` over ``calib`` (no grad, eval mode) and return each mixer's moment accumulator.

    Raises ``ValueError`` when the model has no Mamba mixer or ``calib`` yields nothing.
    """
    mixers = find_mixers(model) if mixers is None else mixers
    if not mixers:
        raise no_mixer_error(model)
    forward = forward or default_forward
    accumulators = {name: HankelAccumulator(scale) for name in mixers}
    modes = {module: module.training for module in model.modules()}  # model.train() would set them all alike
    model.eval()
    seen = 0
    try:
        # Eagerly: a torch.compile'd graph does not call hooks added after it was compiled.
        with capture(mixers, accumulators), _eager():
            for batch in calib:
                forward(model, batch)
                seen += 1
    finally:
        for module, training in modes.items():
            module.training = training
    if seen == 0:
        raise ValueError("calib yielded no batch: calibration data must be a non-empty iterable of model inputs")
    return accumulators
