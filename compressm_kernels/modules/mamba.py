"""``Mamba``: a drop-in for ``mamba_ssm.modules.mamba_simple.Mamba`` whose state size can shrink.

Same constructor, parameter names, shapes and initialisation as mamba_ssm's layer, so state dicts load
both ways. On top of it: ``reduce_state(keep)`` removes states physically (A_log columns and x_proj's B/C
rows, in place on the same Parameter objects), ``set_state_mask(mask)`` switches states off without
removing them (shared ``(N,)`` or per-channel ``(D, N)``), and the decode path (``step``,
``allocate_inference_cache``, mamba_ssm's ``InferenceParams``) follows the current state size.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops.conv1d import causal_conv1d, causal_conv1d_update
from ..ops.mamba_inner import mamba_inner_fn, project_channels, project_to_tokens, split_channels
from ..ops.selective_scan import selective_scan_fn
from ..ops.state_update import selective_state_update
from .parameters import reseat_parameter


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def validated_keep(keep: Tensor, n: int) -> Tensor:
    """``keep`` as int64 indices into ``n`` states, after checking it is a non-empty 1-D integer tensor of unique
    indices in [0, n) (``TypeError``/``ValueError`` naming it otherwise). Shared by every way of cutting states."""
    if not isinstance(keep, Tensor):
        raise TypeError(f"keep must be an integer tensor of state indices, got {type(keep).__name__}")
    if keep.dtype.is_floating_point or keep.dtype.is_complex or keep.dtype == torch.bool:
        raise TypeError(f"keep must be an integer tensor of state indices, got dtype {keep.dtype}")
    if keep.dim() != 1 or keep.numel() == 0:
        raise ValueError(f"keep must be a non-empty 1-D tensor of state indices, got shape {_shape(keep)}")
    keep = keep.long()
    if int(keep.min()) < 0 or int(keep.max()) >= n:
        raise ValueError(f"keep indices must lie in [0, {n}), got min {int(keep.min())}, max {int(keep.max())}")
    if keep.unique().numel() != keep.numel():
        raise ValueError("keep indices must be unique")
    return keep


class Mamba(nn.Module):
    """Mamba-1 mixer ``(Bt, L, d_model) -> (Bt, L, d_model)`` with a reducible state.

    Arguments and defaults are mamba_ssm's (``d_state`` is the initial state size). Parameters:
    ``in_proj (2·d_inner, d_model)``, ``conv1d (d_inner, 1, d_conv)``, ``x_proj (dt_rank + 2·N, d_inner)``
    with rows ``[dt | B | C]``, ``dt_proj (d_inner, dt_rank)`` + bias, ``A_log (d_inner, N)``, ``D (d_inner,)``,
    ``out_proj (d_model, d_inner)``. ``N`` is :attr:`d_state`, the *current* state size.
    The optional ``state_mask`` buffer is saved in state dicts when set, and loading a state dict that holds
    this layer adopts its mask or clears ours; an unmasked layer's state dict is mamba_ssm's.
    :meth:`reduce_state` makes a cut permanent.

    ``checkpoint_lvl`` (keyword only) is what the fused path keeps for backward (see
    :func:`~compressm_kernels.ops.mamba_inner.mamba_inner_fn`): ``1`` only ``xz`` and the scan's outputs, so
    backward recomputes conv1d and the projections (mamba_ssm's choice: GPU memory is the limit); ``0`` every
    activation. ``None`` picks 1 for CUDA inputs and 0 otherwise, where memory is rarely the limit and
    recomputing costs time (a training step of the digits demo on this package's 2-core CPU: 16 % more at 1).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int | float = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
        layer_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        checkpoint_lvl: int | None = None,
    ) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        if dt_init not in ("random", "constant"):
            raise NotImplementedError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        if checkpoint_lvl not in (None, 0, 1):
            raise ValueError(f"checkpoint_lvl must be None, 0 or 1, got {checkpoint_lvl!r}")
        self.checkpoint_lvl = checkpoint_lvl
        self.d_model = d_model
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx

        # Same modules in the same order as mamba_ssm, so one seed gives one set of weights.
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        self.activation = "silu"
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)

        # dt_proj: weight keeps dt's variance at init; bias = softplus⁻¹(dt), dt log-uniform in [dt_min, dt_max].
        std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        else:
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        log_lo, log_hi = math.log(dt_min), math.log(dt_max)
        dt = torch.exp(torch.rand(self.d_inner, **factory) * (log_hi - log_lo) + log_lo).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True

        # S4D-real: A[d, n] = -(n + 1); A_log and D stay fp32 whatever the module dtype.
        a = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).expand(self.d_inner, d_state)
        self.A_log = nn.Parameter(torch.log(a).contiguous())
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

        self.register_buffer("state_mask", None)  # saved when set: a channel-mode cut lives in its mask
        # Decode caches this layer handed out (weakly held), resized/masked together with the layer.
        self._ssm_caches: list[weakref.ref[Tensor]] = []

    # ---- state size ---------------------------------------------------------------------------------
    @property
    def d_state(self) -> int:
        """The current state size N (A_log's second dimension)."""
        return self.A_log.shape[1]

    def extra_repr(self) -> str:
        mask = ""
        if self.state_mask is not None:
            kept = self.state_mask.sum(-1)
            mask = (f", state_mask=shared({int(kept)} kept)" if self.state_mask.dim() == 1 else
                    f", state_mask=per-channel({int(kept.min())}..{int(kept.max())} kept)")
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"dt_rank={self.dt_rank}{mask}")

    def _live_caches(self) -> list[Tensor]:
        return [c for c in (ref() for ref in self._ssm_caches) if c is not None]

    def __getstate__(self) -> dict:
        # A copy (deepcopy, pickle) does not share this layer's decode caches.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "_ssm_caches": []}

    def _check_mask(self, mask: Tensor | None, dstate: int) -> Tensor | None:
        if mask is None:
            return None
        if not isinstance(mask, Tensor):
            raise TypeError(f"state mask must be a bool tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"state mask must have dtype bool, got {str(mask.dtype).replace('torch.', '')}")
        if tuple(mask.shape) not in ((dstate,), (self.d_inner, dstate)):
            raise ValueError(f"state mask must have shape (N,) = ({dstate},) or (D, N) = ({self.d_inner}, {dstate}), "
                             f"got {_shape(mask)}")
        if not bool(mask.any()):
            raise ValueError("state mask keeps no state (all False); keep at least one state")
        return mask.to(self.A_log.device)

    def set_state_mask(self, mask: Tensor | None) -> None:
        """Switch states off without removing them: bool ``(N,)`` (shared) or ``(D, N)`` (per channel), or
        ``None`` to clear. Masked states contribute nothing to the output, get zero gradient, and are zeroed
        in the live decode caches of this layer."""
        mask = self._check_mask(mask, self.d_state)
        self.state_mask = mask
        if mask is not None:
            for cache in self._live_caches():
                if cache.shape[-1] == self.d_state:
                    with torch.inference_mode(cache.is_inference()):
                        cache.mul_(mask.to(cache.dtype))

    @torch.no_grad()
    def reduce_state(self, keep: Tensor) -> None:
        """Keep only the states ``keep`` (int indices into the current N, unique, in the order given).

        Slices ``A_log`` columns and ``x_proj`` rows ``[dt | B[keep] | C[keep]]`` in place on the same
        Parameter objects (re-seated on fresh tensors with their ``.grad``, so optimizers keep their references
        and a graph still alive from the last step does not break the next backward; slicing optimizer
        state is the caller's job), the state mask's columns, and this layer's live decode
        caches. Atomic: everything is validated before anything changes.
        """
        n = self.d_state
        keep = validated_keep(keep, n).to(self.A_log.device)
        rank = self.dt_rank
        if tuple(self.x_proj.weight.shape[:1]) != (rank + 2 * n,):
            raise RuntimeError(f"x_proj has {self.x_proj.weight.shape[0]} rows, expected dt_rank + 2·N = "
                               f"{rank + 2 * n}")
        mask = None if self.state_mask is None else self.state_mask.index_select(-1, keep)
        if mask is not None and not bool(mask.any()):
            raise ValueError("keep selects only masked-out states; the state mask would keep none")
        rows = torch.cat([torch.arange(rank, device=keep.device), rank + keep, rank + n + keep])

        def take(p: nn.Parameter, dim: int, index: Tensor) -> None:
            grad = None if p.grad is None else p.grad.index_select(dim, index).contiguous()
            reseat_parameter(p, p.data.index_select(dim, index).contiguous(), grad)

        take(self.A_log, 1, keep)
        take(self.x_proj.weight, 0, rows)
        self.x_proj.out_features = rows.numel()
        self.state_mask = None if mask is None or bool(mask.all()) else mask
        for cache in self._live_caches():
            if cache.shape[-1] == n:
                with torch.inference_mode(cache.is_inference()):
                    cache.data = cache.data.index_select(-1, keep.to(cache.device)).contiguous()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A checkpoint of a compacted layer: adopt its state size before the shape-checked copy.
        a_log, x_proj = state_dict.get(prefix + "A_log"), state_dict.get(prefix + "x_proj.weight")
        if a_log is not None and x_proj is not None and a_log.dim() == 2 and a_log.shape[1] != self.d_state:
            n = a_log.shape[1]
            if tuple(a_log.shape) == (self.d_inner, n) and tuple(x_proj.shape) == (self.dt_rank + 2 * n, self.d_inner):
                self.A_log.data = self.A_log.data.new_empty(a_log.shape)
                self.x_proj.weight.data = self.x_proj.weight.data.new_empty(x_proj.shape)
                self.x_proj.out_features = x_proj.shape[0]
        # A checkpoint of this layer brings its mask, or none: it replaces ours (the copy below fills it,
        # shape-checked). A partial state dict without this layer's A_log leaves the mask alone.
        mask = state_dict.get(prefix + "state_mask")
        if mask is not None:
            self.state_mask = torch.zeros(mask.shape, dtype=torch.bool, device=self.A_log.device)
        elif prefix + "A_log" in state_dict:
            self.state_mask = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ---- forward ------------------------------------------------------------------------------------
    def forward(self, hidden_states: Tensor, inference_params=None) -> Tensor:
        """``hidden_states`` ``(Bt, L, d_model)`` → ``(Bt, L, d_model)``. With mamba_ssm's ``InferenceParams``
        the prompt fills this layer's cache and later calls (``seqlen_offset > 0``) decode one token."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"hidden_states must have shape (Bt, L, d_model={self.d_model}), "
                             f"got {_shape(hidden_states)}")
        batch, seqlen, _ = hidden_states.shape
        conv_state = ssm_state = None
        if inference_params is not None:
            conv_state, ssm_state = self._get_states_from_cache(inference_params, batch)
            if inference_params.seqlen_offset > 0:
                out, _, _ = self.step(hidden_states, conv_state, ssm_state)
                return out

        xz = self._in_proj_channels_first(hidden_states)  # (Bt, 2D, L)
        A = -torch.exp(self.A_log.float())  # (D, N)
        if self.use_fast_path and inference_params is None:
            return mamba_inner_fn(
                xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                self.out_proj.weight, self.out_proj.bias, A, None, None, self.D.float(),
                delta_bias=self.dt_proj.bias.float(), delta_softplus=True, state_mask=self.state_mask,
                checkpoint_lvl=self.checkpoint_lvl if self.checkpoint_lvl is not None else int(xz.is_cuda),
            )
        # The unfused path (a prefill into a cache, or use_fast_path=False), in the fused path's (Bt, channels, L)
        # layout, so no activation is copied to another one.
        x, z = split_channels(xz)
        if conv_state is not None:
            conv_state.copy_(F.pad(x, (self.d_conv - seqlen, 0)))  # the last d_conv inputs (zero-padded)
        x = causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation=self.activation)
        x_dbl = project_channels(self.x_proj.weight, x)  # (Bt, dt_rank + 2N, L)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        dt = project_channels(self.dt_proj.weight, dt)  # (Bt, D, L); the bias goes to the scan
        y = selective_scan_fn(
            x, dt, A, B, C, self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            return_last_state=ssm_state is not None, state_mask=self.state_mask,
        )
        if ssm_state is not None:
            y, last_state = y
            ssm_state.copy_(last_state)
        return project_to_tokens(y, self.out_proj.weight, self.out_proj.bias)

    def _in_proj_channels_first(self, hidden_states: Tensor) -> Tensor:
        """in_proj as ``(Bt, 2D, L)`` with unit stride along L, the conv's and the scan's layout: one GEMM into
        ``(2D, Bt·L)`` (as mamba_ssm computes it). ``in_proj(h).transpose(1, 2)`` leaves L strided, which costs a
        copy of x and of z in the forward and a transposing copy of their gradient in the backward (about a tenth
        of a training step of the CPU benchmark's block)."""
        flat = hidden_states.reshape(-1, self.d_model).t()  # (d_model, Bt·L)
        weight, bias = self.in_proj.weight, self.in_proj.bias
        xz = weight @ flat if bias is None else torch.addmm(bias[:, None], weight, flat)
        return xz.view(-1, *hidden_states.shape[:2]).permute(1, 0, 2)

    # ---- decode -------------------------------------------------------------------------------------
    def _check_cache(self, conv_state: Tensor, ssm_state: Tensor, batch: int) -> None:
        if tuple(ssm_state.shape) != (batch, self.d_inner, self.d_state):
            raise ValueError(
                f"ssm_state must have shape (Bt, d_inner, d_state) = ({batch}, {self.d_inner}, {self.d_state}), "
                f"got {_shape(ssm_state)}; caches made before a state change must be reallocated"
            )
        if tuple(conv_state.shape) != (batch, self.d_inner, self.d_conv):
            raise ValueError(f"conv_state must have shape ({batch}, {self.d_inner}, {self.d_conv}), "
                             f"got {_shape(conv_state)}")

    def step(self, hidden_states: Tensor, conv_state: Tensor, ssm_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Decode one token: ``hidden_states`` ``(Bt, 1, d_model)``; ``conv_state`` ``(Bt, D, d_conv)`` and
        ``ssm_state`` ``(Bt, D, N)`` are updated in place. Returns ``(out (Bt, 1, d_model), conv_state,
        ssm_state)``."""
        if hidden_states.dim() != 3 or hidden_states.shape[1] != 1 or hidden_states.shape[2] != self.d_model:
            raise ValueError(f"step decodes one token: hidden_states must have shape (Bt, 1, {self.d_model}), "
                             f"got {_shape(hidden_states)}")
        self._check_cache(conv_state, ssm_state, hidden_states.shape[0])
        dtype = hidden_states.dtype
        x, z = self.in_proj(hidden_states.squeeze(1)).chunk(2, dim=-1)  # (Bt, D) each
        x = causal_conv1d_update(x, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                 self.activation).to(dtype)
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # (Bt, D); bias added by the update
        A = -torch.exp(self.A_log.float())
        y = selective_state_update(ssm_state, x, dt, A, B, C, self.D, z=z, dt_bias=self.dt_proj.bias,
                                   dt_softplus=True, state_mask=self.state_mask)
        return self.out_proj(y).unsqueeze(1), conv_state, ssm_state

    def _new_cache(self, batch: int, conv_dtype: torch.dtype, ssm_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        device = self.out_proj.weight.device
        conv_state = torch.zeros(batch, self.d_inner, self.d_conv, device=device, dtype=conv_dtype)
        ssm_state = torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=ssm_dtype)
        self._ssm_caches = [ref for ref in self._ssm_caches if ref() is not None] + [weakref.ref(ssm_state)]
        return conv_state, ssm_state

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 **kwargs) -> tuple[Tensor, Tensor]:
        """``(conv_state (Bt, D, d_conv), ssm_state (Bt, D, N))`` zeros at the current N (mamba_ssm's API)."""
        return self._new_cache(batch_size, dtype or self.conv1d.weight.dtype, dtype or self.dt_proj.weight.dtype)

    def _get_states_from_cache(self, inference_params, batch_size: int, initialize_states: bool = False):
        if self.layer_idx is None:
            raise ValueError("decoding with inference_params needs the layer's layer_idx (set it in the constructor)")
        cache = inference_params.key_value_memory_dict
        if self.layer_idx not in cache:
            cache[self.layer_idx] = self._new_cache(batch_size, self.conv1d.weight.dtype, self.dt_proj.weight.dtype)
        conv_state, ssm_state = cache[self.layer_idx]
        if initialize_states:
            conv_state.zero_()
            ssm_state.zero_()
        self._check_cache(conv_state, ssm_state, batch_size)
        return conv_state, ssm_state

    # ---- conversion ---------------------------------------------------------------------------------
    def _config(self) -> dict:
        return {"d_model": self.d_model, "d_conv": self.d_conv, "expand": self.expand, "dt_rank": self.dt_rank,
                "conv_bias": self.conv1d.bias is not None, "bias": self.in_proj.bias is not None,
                "use_fast_path": self.use_fast_path, "layer_idx": self.layer_idx}

    @classmethod
    def from_mamba_ssm(cls, layer: nn.Module) -> Mamba:
        """A copy of a ``mamba_ssm.modules.mamba_simple.Mamba`` (or any layer with its attributes and
        parameter names) as a :class:`Mamba` with the same weights, device and dtypes."""
        for name in ("d_model", "d_state", "d_conv", "expand", "dt_rank", "in_proj", "conv1d", "x_proj", "A_log"):
            if not hasattr(layer, name):
                raise TypeError(f"from_mamba_ssm needs a mamba_ssm Mamba layer; {type(layer).__name__} has no {name!r}")
        n = layer.A_log.shape[1]
        new = cls(layer.d_model, d_state=n, d_conv=layer.d_conv, expand=layer.expand, dt_rank=layer.dt_rank,
                  conv_bias=layer.conv1d.bias is not None, bias=layer.in_proj.bias is not None,
                  use_fast_path=getattr(layer, "use_fast_path", True), layer_idx=getattr(layer, "layer_idx", None),
                  device="meta")
        new.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()}, strict=True, assign=True)
        new.A_log._no_weight_decay = True
        new.D._no_weight_decay = True
        new.dt_proj.bias._no_reinit = True
        return new

    def to_mamba_ssm(self) -> nn.Module:
        """A ``mamba_ssm.modules.mamba_simple.Mamba`` with these weights (at the current state size). A state
        mask cannot be expressed there: raises ``ValueError`` if one is set (compact first)."""
        if self.state_mask is not None:
            raise ValueError("to_mamba_ssm: mamba_ssm's Mamba has no state mask; call reduce_state(...) or "
                             "set_state_mask(None) first")
        from mamba_ssm.modules.mamba_simple import Mamba as MambaSSM

        layer = MambaSSM(d_state=self.d_state, device="meta", **self._config())
        layer.load_state_dict({k: v.clone() for k, v in self.state_dict().items()}, strict=True, assign=True)
        layer.A_log._no_weight_decay = True
        layer.D._no_weight_decay = True
        layer.dt_proj.bias._no_reinit = True
        return layer
