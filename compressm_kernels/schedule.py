"""When to cut during training: CompreSSM's schedule (MATH.md §2 "Schedule" and "Our own pilot").

Call :meth:`CompreSSM.step` once per training step, after ``optimizer.step()``. Reduction attempts
happen at chosen fractions of training (default: 4 equally spaced, the last at 10 %). Each attempt
calibrates on the inputs of the last ``calib_steps`` training steps (captured by hooks while they ran;
only running second moments are kept) or on a user-supplied iterable, then plans, measures how stable
the state ranking is since the previous attempt (overlap of the kept sets, Spearman correlation of the
energies), and cuts — unless stability is required and not reached, in which case it waits and tries
again (up to ``max_fraction``) and logs why. With a ``validate`` callback a cut that drops the metric by
more than ``margin`` is undone and cutting stops. Every decision goes to :attr:`CompreSSM.log`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .calibration import calibrate, capture, find_mixers, no_mixer_error
from .hankel import HankelAccumulator, Scale
from .plan import Mode, check_selection, ranking_agreement
from .surgery import CompressionReport, apply_plan, plan_compression

logger = logging.getLogger("compressm_kernels")


class CompreSSM:
    """Cut weak Hankel states of every Mamba mixer early in training.

    Args:
        model: the model being trained (DDP-wrapped is fine; pass ``on_change`` to re-wrap it).
        optimizer: its optimizer (state is sliced; step counts kept). May be set later (``.optimizer``).
        total_steps: number of training steps planned.
        tau / rank / fraction: the selection rule (default ``tau=0.05``).
        mode, min_rank, gate, scale: as in :func:`~compressm_kernels.surgery.compress_model`.
        attempts, end: ``attempts`` equally spaced attempts, the last at fraction ``end`` of training.
        at: explicit attempt fractions (overrides attempts/end).
        calib_steps: training steps whose inputs each attempt calibrates on.
        calib: optional iterable of model inputs to calibrate on instead (re-iterated at every attempt).
        forward: how to call the model on one ``calib`` batch.
        min_overlap, min_spearman: if set, cut only when the kept set overlaps the previous attempt's by at
            least this much (and the energies' Spearman ρ reaches ``min_spearman``); otherwise wait.
        max_fraction: with stability required, keep attempting at the same spacing until this fraction.
        validate: optional ``() -> float`` (higher is better) run before and after each cut.
        margin: undo the cut (and stop cutting) if the metric drops by more than this.
        before_change: called right before shapes change. Under DDP, drop the wrapper here (the wrapper holds
            extra references to the parameters, which stops surgery from re-seating them) and pass the bare
            module as ``model``.
        on_change: called with the report after every change of shapes (cut or undo), e.g. to re-wrap DDP, and
            with ``None`` after ``before_change`` when the surgery refused the cut (nothing changed).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, total_steps: int, *,
                 tau: float | None = None, rank: int | None = None, fraction: float | None = None,
                 mode: Mode = "shared", min_rank: int = 1, gate: float = 0.95, scale: Scale = "input",
                 attempts: int = 4, end: float = 0.10, at: Iterable[float] | None = None, calib_steps: int = 4,
                 calib: Iterable[Any] | None = None, forward: Callable[[nn.Module, Any], Any] | None = None,
                 min_overlap: float | None = None, min_spearman: float | None = None, max_fraction: float = 0.5,
                 validate: Callable[[], float] | None = None, margin: float = 0.0,
                 before_change: Callable[[], None] | None = None,
                 on_change: Callable[[CompressionReport | None], None] | None = None) -> None:
        if tau is None and rank is None and fraction is None:
            tau = 0.05
        check_selection(tau, rank, fraction, min_rank, gate)
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
        fractions = list(at) if at is not None else [end * (i + 1) / attempts for i in range(attempts)]
        if not fractions or any(not 0.0 < f <= 1.0 for f in fractions):
            raise ValueError(f"attempt fractions must lie in (0, 1], got {fractions}")
        if calib_steps < 1:
            raise ValueError(f"calib_steps must be >= 1, got {calib_steps}")
        if not find_mixers(model):  # else every attempt would be logged as skipped, silently
            raise no_mixer_error(model)
        self.model, self.optimizer, self.total_steps = model, optimizer, total_steps
        self.select = dict(tau=tau, rank=rank, fraction=fraction, mode=mode, min_rank=min_rank, gate=gate,
                           scale=scale)
        self.attempt_steps = sorted({max(1, round(f * total_steps)) for f in fractions})
        self.spacing = max(1, self.attempt_steps[0] if len(self.attempt_steps) == 1 else
                           self.attempt_steps[-1] - self.attempt_steps[-2])
        self.calib_steps, self.calib, self.forward = calib_steps, calib, forward
        self.min_overlap, self.min_spearman, self.max_fraction = min_overlap, min_spearman, max_fraction
        self.validate, self.margin, self.on_change = validate, margin, on_change
        self.before_change = before_change
        self.step_count = 0
        self.stopped = False
        self.log: list[dict[str, Any]] = []
        self._capture = None  # (context manager, accumulators) while hooks are armed
        self._previous: dict[str, dict[int, float]] = {}  # mixer -> original state id -> energy
        self._ids: dict[str, list[int]] = {}  # mixer -> original ids of its current states
        self._arm_if_due()

    @property
    def requires_stability(self) -> bool:
        return self.min_overlap is not None or self.min_spearman is not None

    def _next_attempt(self) -> int | None:
        later = [s for s in self.attempt_steps if s > self.step_count]
        return later[0] if later else None

    def _arm_if_due(self) -> None:
        """Start capturing the inputs of the training steps just before the next attempt."""
        nxt = self._next_attempt()
        if self.stopped or self.calib is not None or self._capture is not None or nxt is None:
            return
        if nxt - self.step_count <= self.calib_steps:
            mixers = find_mixers(self.model)
            accs = {name: HankelAccumulator(self.select["scale"]) for name in mixers}
            ctx = capture(mixers, accs)
            ctx.__enter__()
            self._capture = (ctx, accs)

    def _disarm(self) -> dict[str, HankelAccumulator] | None:
        if self._capture is None:
            return None
        ctx, accs = self._capture
        ctx.__exit__(None, None, None)
        self._capture = None
        return accs

    def _record(self, action: str, **info: Any) -> dict[str, Any]:
        entry = {"step": self.step_count, "fraction": self.step_count / self.total_steps, "action": action, **info}
        self.log.append(entry)
        logger.info("CompreSSM step %d: %s %s", self.step_count, action,
                    {k: v for k, v in info.items() if k != "plan"})
        return entry

    def step(self) -> CompressionReport | None:
        """Advance one training step; make an attempt when one is due. Returns the report of a kept cut."""
        self.step_count += 1
        report = None
        if not self.stopped and self.step_count in self.attempt_steps:
            report = self._attempt()
        self._arm_if_due()
        return report

    def _stability(self, plan) -> tuple[float | None, float | None]:
        """Worst per-layer overlap and Spearman ρ against the previous attempt (None on the first)."""
        overlaps, rhos = [], []
        for lp in plan.layers:
            ids = self._ids.setdefault(lp.name, list(range(lp.n_before)))
            energy = lp.energies.layer_energy().cpu()
            prev = self._previous.get(lp.name)
            if prev is not None and len(ids) == energy.numel() and all(i in prev for i in ids):
                before = torch.tensor([prev[i] for i in ids], dtype=energy.dtype)
                k = lp.keep.numel() if lp.reduce else int(lp.rank)
                overlap, rho = ranking_agreement(before, energy, k)
                overlaps.append(overlap)
                rhos.append(rho)
            self._previous[lp.name] = {i: float(e) for i, e in zip(ids, energy.tolist(), strict=True)}
        if not overlaps:
            return None, None
        return min(overlaps), min(rhos)

    def _attempt(self) -> CompressionReport | None:
        accs = self._disarm()
        try:
            source = self.calib if self.calib is not None else accs
            if source is None:
                self._record("skip", reason="no calibration inputs were captured (was step() called each step?)")
                return None
            if self.calib is not None:
                source = calibrate(self.model, self.calib, scale=self.select["scale"], forward=self.forward)
            elif all(acc.count is None for acc in source.values()):
                self._record("skip", reason="the mixers' capture hooks saw no forward in the last calib_steps steps; "
                             "a torch.compile'd model does not call hooks added after it compiled: pass calib= "
                             "batches (calibration runs them eagerly)")
                return None
            plan = plan_compression(self.model, source, **self.select)
        except ValueError as err:
            self._record("skip", reason=str(err))
            return None
        overlap, rho = self._stability(plan)
        sizes = {lp.name: (lp.n_before, lp.n_after) for lp in plan.layers}
        info = dict(overlap=overlap, spearman=rho, sizes=sizes, plan=plan)
        if not plan.changes:
            self._record("keep", reason="every layer is within the gate", **info)
            return None
        if self.requires_stability:
            stable = overlap is not None and (self.min_overlap is None or overlap >= self.min_overlap) and \
                (self.min_spearman is None or rho >= self.min_spearman)
            if not stable:
                nxt = self.step_count + self.spacing
                if self._next_attempt() is None and nxt <= self.max_fraction * self.total_steps:
                    self.attempt_steps.append(nxt)
                    self._record("wait", reason="ranking not stable yet", next_attempt=nxt, **info)
                elif self._next_attempt() is None:
                    self.stopped = True
                    self._record("give-up", reason=f"ranking not stable by {self.max_fraction:.0%} of training",
                                 **info)
                else:
                    self._record("wait", reason="ranking not stable yet", **info)
                return None
        before = self.validate() if self.validate is not None else None
        if self.before_change is not None:
            self.before_change()
        try:
            report = apply_plan(self.model, plan, self.optimizer)
        except ValueError as err:  # e.g. optimizer state the surgery cannot slice: model and optimizer as before
            self._record("skip", reason=str(err), **info)
            if self.on_change is not None:
                self.on_change(None)
            return None
        for lp in plan.changes:
            self._ids[lp.name] = [self._ids[lp.name][i] for i in lp.keep.tolist()]
        after = self.validate() if self.validate is not None else None
        if before is not None and before - after > self.margin:
            if self.before_change is not None:
                self.before_change()
            report.undo()
            for lp in plan.changes:  # back to the ids before this cut
                self._ids[lp.name] = list(self._previous[lp.name])
            self.stopped = True
            self._record("rollback", metric_before=before, metric_after=after, **info)
            if self.on_change is not None:
                self.on_change(report)
            return None
        self._record("cut", metric_before=before, metric_after=after, **info)
        if self.on_change is not None:
            self.on_change(report)
        return report

    def close(self) -> None:
        """Remove any capture hooks (also done automatically once the last attempt has run)."""
        self._disarm()


def trainer_callback(compressm: CompreSSM):
    """A transformers ``TrainerCallback`` that calls ``compressm.step()`` at the end of every step.

    The Trainer creates its optimizer lazily: pass ``optimizer=None`` to :class:`CompreSSM` and the callback
    fills it in. (The Trainer's DDP wrapper is not re-wrapped: use single-process training or ``on_change``.)
    """
    from transformers import TrainerCallback

    class CompreSSMCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if compressm.optimizer is None:
                compressm.optimizer = kwargs.get("optimizer")
            compressm.step()
            return control

    return CompreSSMCallback()
