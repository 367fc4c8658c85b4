"""Model surgery: apply a :class:`~compressm_kernels.plan.CompressionPlan` to any model with Mamba-1 mixers.

One traversal finds the mixers (compressm's ``Mamba``, mamba_ssm's ``Mamba`` — e.g. inside
``MambaLMHeadModel`` —, transformers' ``MambaMixer``). A layer-shared cut slices, on the *same*
``nn.Parameter`` objects, ``A_log[:, keep]`` and the rows ``[dt] ∪ B[keep] ∪ C[keep]`` of
``x_proj.weight`` (MATH.md §3: slicing A alone would make mamba_ssm read the wrong C), and updates the
state size the layer reads (``d_state`` / ``ssm_state_size``), so the user's classes, state-dict keys,
optimizer references and generation caches (sized from that attribute; transformers 5 sizes each layer's
cache from the state it produces) keep working. mamba_ssm and transformers layers are sliced in place rather
than swapped for ours for exactly that reason; compressm's layer does its own slicing (``reduce_state``) and
takes per-channel masks (``set_state_mask``). A transformers config gets ``state_size`` = the largest layer's
N and ``compressm_state_sizes`` = every layer's.

Optimizer state is sliced the same way (every state tensor shaped like the parameter; ``step`` and
anything scalar kept). Surgery is atomic: everything it rebinds is snapshotted first (references, not
copies) and restored if any step fails, so model and optimizer are exactly as before.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .calibration import calibrate, find_mixers, mixer_kind, no_mixer_error, state_mask_of, unwrap
from .hankel import HankelAccumulator, Scale
from .modules.mamba import validated_keep
from .modules.parameters import reseat_parameter
from .plan import CompressionPlan, LayerPlan, Mode, check_selection, plan_layer

_SIZE_ATTRS = ("d_state", "ssm_state_size")  # mamba_ssm / compressm, transformers


def x_proj_rows(dt_rank: int, dstate: int, keep: Tensor) -> Tensor:
    """Rows of ``x_proj.weight`` ``(dt_rank + 2N, D)`` kept with states ``keep``: [dt | B[keep] | C[keep]]."""
    keep = keep.long()
    return torch.cat([torch.arange(dt_rank), dt_rank + keep, dt_rank + dstate + keep])


def plan_compression(model: nn.Module, calib: Iterable[Any] | Mapping[str, HankelAccumulator], *,
                     tau: float | None = None, rank: int | None = None, fraction: float | None = None,
                     mode: Mode = "shared", min_rank: int = 1, gate: float = 0.95, scale: Scale = "input",
                     forward: Callable[[nn.Module, Any], Any] | None = None) -> CompressionPlan:
    """Compute every mixer's Hankel energies and choose its kept states; the model is not changed.

    Args:
        model: any module containing Mamba-1 mixers (DDP / compile wrappers are looked through).
        calib: an iterable of model inputs (each passed to ``forward(model, batch)``; default: ``model(batch)``,
            ``model(**batch)`` for a dict, ``model(*batch)`` for a tuple), or ready accumulators by mixer name.
        tau / rank / fraction: exactly one selection rule (see :mod:`compressm_kernels.plan`).
        mode: ``"shared"`` (physically smaller N) or ``"channel"`` (per-channel masks; compressm's layer only).
        min_rank, gate: lower bound on r; reduce only if ``r < gate · N``.
        scale: how channels are made comparable (see :mod:`compressm_kernels.hankel`).
    Under ``torch.distributed`` the moments are all-reduced first, so every rank gets the same plan.
    ``ValueError`` for a plan that would leave transformers layers with different N where that transformers'
    ``MambaCache`` sizes every layer by ``config.state_size`` (4.x); transformers 5 caches each layer's own N.
    """
    check_selection(tau, rank, fraction, min_rank, gate)
    if mode not in ("shared", "channel"):
        raise ValueError(f"mode must be 'shared' or 'channel', got {mode!r}")
    mixers = find_mixers(model)
    if not mixers:
        raise no_mixer_error(model)
    for name, mixer in mixers.items():
        n = mixer.A_log.shape[1]
        if rank is not None and rank > n:
            raise ValueError(f"rank={rank} exceeds the current state size N={n} of {name}")
        if mode == "channel" and not hasattr(mixer, "set_state_mask"):
            raise ValueError(f"mode='channel' needs a mask-aware layer (compressm_kernels.Mamba); {name} is a "
                             f"{type(mixer).__module__}.{type(mixer).__name__}: convert it or use mode='shared'")
    if isinstance(calib, Mapping):
        accumulators = dict(calib)
        missing = set(mixers) - set(accumulators)
        if missing:
            raise ValueError(f"calibration accumulators missing for mixers {sorted(missing)}")
    else:
        accumulators = calibrate(model, calib, scale=scale, forward=forward, mixers=mixers)
    layers = []
    for name, mixer in mixers.items():
        acc = accumulators[name]
        acc.all_reduce()
        mask = state_mask_of(mixer)
        energies = acc.energies(state_mask=mask)
        layers.append(plan_layer(name, mixer_kind(mixer), energies, mode=mode, tau=tau, rank=rank,
                                 fraction=fraction, min_rank=min_rank, gate=gate, state_mask=mask))
    plan = CompressionPlan(layers, mode)
    _check_hf_caches(mixers, {lp.name: lp.n_after for lp in plan.changes}, [lp.name for lp in plan.changes])
    return plan


class _Snapshot:
    """References to everything surgery rebinds: restoring them puts model and optimizer back exactly."""

    def __init__(self, modules: Iterable[nn.Module], optimizer: torch.optim.Optimizer | None,
                 extra: Iterable[object] = ()) -> None:
        self.modules = []
        for root in modules:
            for m in root.modules():
                params = {n: (p, p.data, p.grad) for n, p in m._parameters.items() if p is not None}
                self.modules.append((m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), params))
        # compressm's layer resizes and masks its live decode caches in place: their contents, copied.
        self.caches = [(cache, cache.data.clone()) for m, *_ in self.modules if hasattr(m, "_live_caches")
                       for cache in m._live_caches()]
        self.extra = [(obj, dict(obj.__dict__)) for obj in extra]
        self.optimizer = optimizer
        self.opt_state = None if optimizer is None else {p: optimizer.state[p] for p in list(optimizer.state)}

    def restore(self) -> None:
        for m, attrs, params, buffers, tensors in self.modules:
            for p, data, grad in tensors.values():
                if p.shape != data.shape:  # re-seat on a fresh tensor (see _rebind); never swap the old one back,
                    reseat_parameter(p, data, grad)  # swap_tensors has poisoned its cached gradient accumulator
                else:
                    p.data = data
                    p.grad = grad
            m.__dict__.clear()
            m.__dict__.update(attrs)
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
        for cache, data in self.caches:
            with torch.inference_mode(cache.is_inference()):
                cache.data = data
        for obj, attrs in self.extra:
            obj.__dict__.clear()
            obj.__dict__.update(attrs)
        if self.optimizer is not None:
            self.optimizer.state.clear()
            self.optimizer.state.update(self.opt_state)


def _slice_param(p: nn.Parameter, dim: int, index: Tensor) -> None:
    index = index.to(p.device)
    grad = None if p.grad is None else p.grad.index_select(dim, index).contiguous()
    reseat_parameter(p, p.data.index_select(dim, index).contiguous(), grad)


def _slice_inplace(mixer: nn.Module, keep: Tensor) -> None:
    """Keep states ``keep`` of a mamba_ssm / transformers / look-alike mixer by slicing its own parameters."""
    n = mixer.A_log.shape[1]
    dt_rank = mixer.x_proj.weight.shape[0] - 2 * n
    rows = x_proj_rows(dt_rank, n, keep)
    _slice_param(mixer.A_log, 1, keep)
    _slice_param(mixer.x_proj.weight, 0, rows)
    if mixer.x_proj.bias is not None:
        _slice_param(mixer.x_proj.bias, 0, rows)
    mixer.x_proj.out_features = rows.numel()
    for attr in _SIZE_ATTRS:
        if hasattr(mixer, attr):
            setattr(mixer, attr, int(keep.numel()))


def _apply_layer(mixer: nn.Module, lp: LayerPlan) -> None:
    """Change one mixer as ``lp`` says."""
    shrink = lp.keep.numel() < lp.n_before
    if hasattr(mixer, "reduce_state"):  # compressm's layer slices itself (and its mask) consistently
        if lp.mask is not None:
            mixer.set_state_mask(None)
        if shrink:
            mixer.reduce_state(lp.keep)
        if lp.mask is not None:
            mixer.set_state_mask(lp.mask.to(mixer.A_log.device))
        return
    if lp.mask is not None:
        raise ValueError(f"{lp.name}: per-channel masks need compressm_kernels.Mamba")
    if shrink:
        _slice_inplace(mixer, lp.keep)


def _state_slices(mixer: nn.Module, lp: LayerPlan) -> list[tuple[nn.Parameter, int, Tensor, torch.Size]]:
    """(parameter, dim, kept indices, shape before) for every parameter a shared cut of ``lp`` slices."""
    n = lp.n_before
    dt_rank = mixer.x_proj.weight.shape[0] - 2 * n
    rows = x_proj_rows(dt_rank, n, lp.keep)
    out = [(mixer.A_log, 1, lp.keep, mixer.A_log.shape), (mixer.x_proj.weight, 0, rows, mixer.x_proj.weight.shape)]
    if mixer.x_proj.bias is not None:
        out.append((mixer.x_proj.bias, 0, rows, mixer.x_proj.bias.shape))
    return out


def _slice_optimizer_state(optimizer: torch.optim.Optimizer, slices) -> None:
    """Replace (never mutate) each sliced parameter's state dict: tensors shaped like it are sliced, the rest kept."""
    for p, dim, index, shape in slices:
        state = optimizer.state.get(p)
        if not state:
            continue
        new = {}
        for key, value in state.items():
            if isinstance(value, Tensor) and value.shape == shape:
                new[key] = value.index_select(dim, index.to(value.device)).contiguous()
            elif isinstance(value, Tensor) and value.dim() > 0:
                raise ValueError(f"optimizer state {key!r} has shape {tuple(value.shape)}, neither the parameter's "
                                 f"{tuple(shape)} nor a scalar: don't know how to slice it")
            else:
                new[key] = value
        optimizer.state[p] = new


def _hf_config(mixer: nn.Module) -> Any | None:
    """The shared transformers config a mixer reads its state size from, else ``None``."""
    config = getattr(mixer, "config", None)
    return config if hasattr(config, "state_size") and hasattr(mixer, "layer_idx") else None


def _hf_layer_sizes(mixers: Mapping[str, nn.Module], sizes: Mapping[str, int], changed: Iterable[str]
                    ) -> list[tuple[Any, list[int], nn.Module]]:
    """(config, N of every layer, one mixer) for each transformers config a ``changed`` mixer reads.

    Every mixer on the config counts, not only the changed ones (a second cut may touch one layer of an
    already uneven model); ``sizes`` overrides the current N of the mixers it names.
    """
    configs = {id(c): c for c in (_hf_config(mixers[n]) for n in changed) if c is not None}
    out = []
    for config in configs.values():
        on_config = {name: m for name, m in mixers.items() if _hf_config(m) is config}
        by_layer = {m.layer_idx: sizes.get(name, m.A_log.shape[1]) for name, m in on_config.items()}
        per_layer = [by_layer.get(i, config.state_size) for i in range(max(by_layer) + 1)]
        out.append((config, per_layer, next(iter(on_config.values()))))
    return out


def _check_hf_caches(mixers: Mapping[str, nn.Module], sizes: Mapping[str, int], changed: Iterable[str]) -> None:
    """Refuse uneven per-layer N where transformers' Mamba cache gives every layer ``config.state_size`` states.

    transformers 5 allocates each layer's SSM state lazily from the first state that layer produces, so layers
    may differ. Older versions (4.x) build a ``MambaCache`` of ``(Bt, D, config.state_size)`` for every layer:
    a layer with another N breaks cached generation with a bare shape error, so we refuse before cutting.
    """
    for _, per_layer, mixer in _hf_layer_sizes(mixers, sizes, changed):
        cache = getattr(sys.modules.get(type(mixer).__module__), "MambaCache", None)
        if cache is not None and len(set(per_layer)) > 1:
            import transformers

            raise ValueError(
                f"per-layer state sizes {per_layer} are not supported by transformers {transformers.__version__}: its "
                f"{cache.__name__} gives every layer config.state_size states, so cached generation would fail. "
                f"Upgrade to transformers>=5 (per-layer caches), or cut every layer to the same N (rank=...)")


def _fix_configs(mixers: Mapping[str, nn.Module], changed: Iterable[str]) -> None:
    """transformers keeps the state size in a shared config: ``state_size`` becomes the largest layer's N and
    ``compressm_state_sizes`` lists every layer's (equal N make the config exact for ``from_pretrained``)."""
    for config, per_layer, _ in _hf_layer_sizes(mixers, {}, changed):
        config.state_size = max(per_layer)
        config.compressm_state_sizes = per_layer


@dataclass
class CompressionReport:
    """What :func:`compress_model` did; ``undo()`` restores model and optimizer to just before it."""

    plan: CompressionPlan
    state_sizes: dict[str, tuple[int, int]]
    _snapshot: _Snapshot | None = field(default=None, repr=False)

    def __str__(self) -> str:
        lines = [str(self.plan)]
        if not self.plan.changes:
            lines.append("nothing changed")
        return "\n".join(lines)

    @property
    def changed(self) -> bool:
        return bool(self.plan.changes)

    def undo(self) -> None:
        """Put back every tensor and attribute surgery replaced (valid until the model is cut again)."""
        if self._snapshot is None:
            raise RuntimeError("this report has no snapshot to undo (already undone?)")
        self._snapshot.restore()
        self._snapshot = None


def apply_plan(model: nn.Module, plan: CompressionPlan, optimizer: torch.optim.Optimizer | None = None
               ) -> CompressionReport:
    """Apply ``plan`` atomically; re-wrap a DistributedDataParallel model afterwards (its buckets hold old shapes)."""
    mixers = find_mixers(model)
    for lp in plan.layers:
        if lp.name not in mixers:
            raise ValueError(f"plan names mixer {lp.name!r}, which the model does not have")
        if mixers[lp.name].A_log.shape[1] != lp.n_before:
            n = mixers[lp.name].A_log.shape[1]
            raise ValueError(f"stale plan: {lp.name} has N={n}, the plan expects {lp.n_before}")
        try:  # every kind of mixer, before anything changes (indexing would repeat a state or fail midway)
            validated_keep(lp.keep, lp.n_before)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{lp.name}: {err}") from None
    changes = plan.changes
    _check_hf_caches(mixers, {lp.name: int(lp.keep.numel()) for lp in changes}, [lp.name for lp in changes])
    configs = [getattr(mixers[lp.name], "config", None) for lp in changes]
    snapshot = _Snapshot([mixers[lp.name] for lp in changes], optimizer, [c for c in configs if c is not None])
    try:
        slices = []
        for lp in changes:
            mixer = mixers[lp.name]
            if lp.keep.numel() < lp.n_before:
                slices += _state_slices(mixer, lp)
            _apply_layer(mixer, lp)
            if mixer.A_log.shape[1] != lp.keep.numel():
                raise RuntimeError(f"{lp.name}: N is {mixer.A_log.shape[1]} after surgery, expected {lp.keep.numel()}")
        if optimizer is not None:
            _slice_optimizer_state(optimizer, slices)
        _fix_configs(mixers, [lp.name for lp in changes])
    except BaseException:
        snapshot.restore()
        raise
    sizes = {lp.name: (lp.n_before, mixers[lp.name].A_log.shape[1]) for lp in plan.layers}
    return CompressionReport(plan, sizes, snapshot)


def compress_model(model: nn.Module, calib: Iterable[Any] | Mapping[str, HankelAccumulator], *,
                   tau: float | None = None, rank: int | None = None, fraction: float | None = None,
                   mode: Mode = "shared", optimizer: torch.optim.Optimizer | None = None, min_rank: int = 1,
                   gate: float = 0.95, scale: Scale = "input",
                   forward: Callable[[nn.Module, Any], Any] | None = None) -> CompressionReport:
    """Rank every Mamba mixer's states by Hankel energy on ``calib`` and cut the weak ones, atomically.

    See :func:`plan_compression` for the arguments. ``optimizer``'s per-parameter state is sliced to the kept
    states (its step count is kept). Returns a :class:`CompressionReport` (print it; ``undo()`` reverts).
    A model wrapped in DistributedDataParallel must be re-wrapped afterwards.
    """
    plan = plan_compression(model, calib, tau=tau, rank=rank, fraction=fraction, mode=mode, min_rank=min_rank,
                            gate=gate, scale=scale, forward=forward)
    return apply_plan(model, plan, optimizer)


def state_sizes(state_dict: Mapping[str, Tensor]) -> dict[str, int]:
    """Per-mixer state size N read from a state dict (``<mixer>.A_log`` is ``(D, N)``; ``A_log`` when the model is
    the mixer itself, named ``""``)."""
    sizes = {}
    for key, value in state_dict.items():
        name, _, leaf = key.rpartition(".")
        if leaf == "A_log" and value.dim() == 2:
            sizes[name] = value.shape[1]
    return sizes


def resize_for_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, int]:
    """Shrink a freshly built model's mixers to the state sizes in ``state_dict`` so that it loads.

    The kept states are the first N (their values come from the state dict anyway). Returns the sizes set.
    A compressed checkpoint is restored with::

        model = build_model(config)               # full size
        resize_for_state_dict(model, state_dict)  # per-layer N from the checkpoint
        model.load_state_dict(state_dict)

    (a transformers model saved with uneven N: ``MambaForCausalLM(MambaConfig.from_pretrained(path))`` and
    the checkpoint's ``model.safetensors``; ``from_pretrained`` alone builds every layer at ``config.state_size``).
    Nothing changes if any size is refused (see :func:`plan_compression` for transformers 4.x).
    """
    sizes = state_sizes(state_dict)
    mixers = find_mixers(model)
    changed = {}
    for name, n in sizes.items():  # check everything before changing anything
        mixer = mixers.get(name)
        if mixer is None or mixer.A_log.shape[1] == n:
            continue
        if n > mixer.A_log.shape[1]:
            raise ValueError(f"{name}: checkpoint has N={n}, more than the model's {mixer.A_log.shape[1]}")
        changed[name] = n
    _check_hf_caches(mixers, changed, changed)
    for name, n in changed.items():
        mixer = mixers[name]
        lp = LayerPlan(name, mixer_kind(mixer), mixer.A_log.shape[1], torch.arange(n), None, float(n), 1.0, 1.0, True,
                       None)  # type: ignore[arg-type]
        _apply_layer(mixer, lp)
    _fix_configs(mixers, changed)
    return changed


__all__ = ["CompressionReport", "apply_plan", "compress_model", "plan_compression", "resize_for_state_dict",
           "state_sizes", "unwrap", "x_proj_rows"]
