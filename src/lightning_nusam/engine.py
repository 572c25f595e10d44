"""The sharpness-aware step in one place: one optimizer step over ``k`` micro-batches, pure PyTorch.

Every way in (the drop-in callback, :class:`~lightning_nusam.SAMMixin`, a plain or Fabric loop,
:class:`~lightning_nusam.optim.SAMOptimizer`) runs its steps through a :class:`StepEngine`.
:meth:`StepEngine.step` is the whole step, the paper's Algorithm 3 with accumulation::

    first pass:   for each micro-batch j: forward + backward(loss_j / k)   at w
                  (data parallel: no gradient all-reduce when the perturbation reduces what it
                  reads itself, else on the last micro-batch; never for m-SAM)
    perturb(ρ_t)  w ← w + ε from the accumulated first-pass gradient (νSAM under DDP: from the
                  power iteration's products averaged over the ranks, Σ(n+m) numbers)
    zero grads
    second pass:  for each micro-batch j that gave a loss: forward + backward(loss_j / k)
                  at w + ε, with the random state j's first pass had (dropout masks, draws);
                  gradients all-reduced on the last one only
    restore()     w ← w − ε, right after the last backward
    optimizer step on the second-pass gradients; m-SAM: rank 0's weights broadcast every
    ``resync_every`` steps

A *one-pass* step (``one_pass``) applies ``ε_t`` from the direction estimated at the end of the
previous step, runs the single pass at ``w + ε_t``, restores, estimates the direction for the
next step from this gradient, and steps. A *plain* step (before the start, between
``every_n_steps``) is one pass at ``w``.

What the user's loss code sees is kept as if it ran once: both passes draw the same random
numbers, from the global streams and the generators the model owns, and the random stream
afterwards is a plain step's (``same_random_draws``); buffers and parameters that do not train
are as the first pass left them, and the second pass starts from what the first pass saw
(:class:`~lightning_nusam.pass_state.ModuleStateGuard`); the second pass replays the batch as
given, whatever the first pass did to it (:func:`~lightning_nusam.pass_state.copy_batch`);
BatchNorm running statistics are updated by one pass (``batchnorm_update``); ``torchmetrics``
metrics in the model keep what the first pass added (the second pass's updates are undone); a
LightningModule's ``self.log`` records nothing in the second pass; and with ``ρ = 0`` the step
gives exactly the weights of a plain step.

A way in drives the engine in one of two call orders (each call once, in this order; no call is
made twice for the same event):

- a host that runs every pass through :class:`Passes` (a plain loop, the mixin,
  :class:`~lightning_nusam.optim.SAMOptimizer`, Fabric): :meth:`~StepEngine.feed` for each
  micro-batch as it arrives (the first one opens the step with its plan), then
  :meth:`~StepEngine.complete_passes` after the last, then the optimizer step, then
  :meth:`~StepEngine.end`. :meth:`~StepEngine.step` is exactly these calls.
- a host whose framework runs some passes itself and owns the optimizer step (Lightning's
  automatic optimization, the drop-in): :meth:`~StepEngine.open_micro_batch` before each
  micro-batch (the framework runs its pass), :meth:`~StepEngine.after_backward` after each
  backward the framework ran, :meth:`~StepEngine.finish_in_closure` inside the optimizer's step
  on a two-pass step, :meth:`~StepEngine.before_optimizer_step` before gradient clipping, and
  :meth:`~StepEngine.close_micro_batch` after each micro-batch, which ends the step once the
  optimizer stepped.

:meth:`~StepEngine.abandon` drops a step in progress (an exception) from either order.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from lightning_nusam.pass_state import (
    ModuleStateGuard,
    RandomState,
    copy_batch,
    frozen_running_stats,
    metric_updates_undone,
    muted_logging,
    owned_generators,
    version,
)
from lightning_nusam.plan import PLAIN_STEP, PassName, StepPlan, StepResult
from lightning_nusam.step_options import (
    DEFAULT_RESYNC_EVERY,
    BatchNormUpdate,
    FirstPassReduction,
    StepOptions,
)

if TYPE_CHECKING:
    from lightning_nusam.perturbations import Perturbation


def data_parallel_replicas(world_size: int, model: nn.Module | None = None) -> dist.ProcessGroup | None:
    """The process group data parallelism averages gradients over: None on one process, else the
    group of the DDP-wrapped ``model`` (``DistributedDataParallel.process_group``) or the world.
    Both Lightning's and Fabric's adapters ask this (each knows whether its strategy is DDP)."""
    if world_size < 2:
        return None
    return getattr(model, "process_group", None) or dist.group.WORLD


def optimizer_needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Closure-driven optimizers (LBFGS) evaluate the loss several times per ``step``: no way in can
    wrap them."""
    if isinstance(optimizer, torch.optim.LBFGS):
        return True
    closure = inspect.signature(type(optimizer).step).parameters.get("closure")
    return closure is not None and closure.default is inspect.Parameter.empty


class Passes(Protocol):
    """How a way in runs one pass of one micro-batch; the engine decides when and in which context."""

    def forward_backward(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        """Forward and backward of one micro-batch, the loss divided by the micro-batches of the
        step (as gradient accumulation does); returns the undivided loss, detached, or None when
        the micro-batch is skipped (no backward)."""

    def no_sync(self) -> contextlib.AbstractContextManager[Any]:
        """A context in which backward does not all-reduce gradients (DDP's ``no_sync``)."""


@dataclass
class LossPasses:
    """:class:`Passes` from a function giving the loss: a plain PyTorch or Fabric loop, and each
    Lightning way in (with the strategy's or the module's backward).

    Args:
        loss: ``loss(batch, batch_idx)``, the training loss of a micro-batch (a tensor, or a
            mapping with a ``"loss"`` entry as a ``training_step`` may return), or None to skip it.
        micro_batches_per_step: ``k``, the divisor of each micro-batch's loss.
        backward: how to run backward (``fabric.backward`` under Fabric).
        no_sync: a context without gradient all-reduce (``model.no_sync`` under DDP,
            ``lambda: fabric.no_backward_sync(model)`` under Fabric).
    """

    loss: Callable[[Any, int], torch.Tensor | Mapping[str, Any] | None]
    micro_batches_per_step: int = 1
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward
    no_sync: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext

    def forward_backward(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        output = self.loss(batch, batch_idx)
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if loss is None:
            return None
        self.backward(loss / self.micro_batches_per_step)
        return loss.detach()


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters in ``optimizer``'s groups: what it updates."""
    return [parameter for group in optimizer.param_groups for parameter in group["params"]]


@dataclass
class _MicroBatch:
    """A micro-batch of the step in progress: kept for the second pass, with the random state
    its first pass started from and whether that pass ran a backward.

    On a two-pass step ``replay`` is a copy of the batch's containers (with clones of the tensors
    that change in place) and ``leaves`` its tensors as ``(path, original, copy)``; one pass gets
    the batch as given, the other the copy (:func:`~lightning_nusam.pass_state.copy_batch`).
    """

    batch: Any
    batch_idx: int
    random_state: RandomState | None = None
    backward: bool = False
    replay: Any = None
    leaves: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    #: versions of the leaves (original, copy) when the first pass opened / closed
    opened: list[tuple[int, int]] = field(default_factory=list)
    closed: list[tuple[int, int]] = field(default_factory=list)
    first_got_copy: bool = False

    def versions(self) -> list[tuple[int, int]]:
        return [(version(original), version(copied)) for _, original, copied in self.leaves]

    def for_second_pass(self) -> Any:
        """The batch object the engine's second pass gets: the one the first pass did not."""
        return self.batch if self.first_got_copy else self.replay


@dataclass
class _Step:
    """The optimizer step in progress."""

    plan: StepPlan
    micro_batches: list[_MicroBatch] = field(default_factory=list)
    losses: dict[str, list[torch.Tensor]] = field(default_factory=lambda: {"first": [], "second": []})
    random_state_after: RandomState | None = None
    #: the CUDA devices whose random streams the passes restore (looked up once per step)
    cuda_devices: list[int] = field(default_factory=list)
    #: the random generators the model owns (looked up once per step)
    generators: list[Any] = field(default_factory=list)
    #: paths of batch tensors changed in place during the step (first pass, or by the loader)
    changed_paths: set[str] = field(default_factory=set)
    estimated: bool = False
    perturbed: bool = False


class StepEngine:
    """Runs optimizer steps of a sharpness-aware method (see the module docstring).

    Args:
        model: the module trained (its BatchNorm layers, metrics and, for m-SAM, weights).
        perturbation: the method, or None for plain steps only (a mixin module without a
            sharpness-aware callback).
        options: the step's options (:class:`~lightning_nusam.step_options.StepOptions`); or
            give them one by one as keywords (``sync_first_pass=False``, ...), checked the same way.
        replicas: the data-parallel process group (DDP's), or None (one process, or a sharded
            strategy whose gradients the first pass must reduce itself).

    Example (a plain loop; :class:`LossPasses` gives the loss of a micro-batch):
        >>> from lightning_nusam.perturbations import NuclearPerturbation
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> engine = StepEngine(model, NuclearPerturbation(model, rho=0.05))
        >>> data = [(torch.randn(6, 4), torch.randint(0, 2, (6,))) for _ in range(3)]
        >>> passes = LossPasses(lambda batch, _: nn.functional.cross_entropy(model(batch[0]), batch[1]))
        >>> for index, batch in enumerate(data):
        ...     result = engine.step(passes, [(batch, index)], optimizer)
        >>> result.perturbed, engine.perturbation.steps
        (True, 3)
    """

    def __init__(
        self,
        model: nn.Module,
        perturbation: Perturbation | None,
        options: StepOptions | None = None,
        *,
        replicas: dist.ProcessGroup | None = None,
        **option_values: Any,
    ) -> None:
        if options is not None and option_values:
            raise TypeError("StepEngine takes `options` or the options one by one "
                            f"({', '.join(option_values)}), not both: put them in the StepOptions")
        self.options = options if options is not None else StepOptions(**option_values)
        self.model = model
        self.perturbation = perturbation
        self.replicas = replicas
        self.resyncs = 0
        #: the global step of the last m-SAM re-synchronisation (its period counts from there)
        self.last_resync_step = 0
        self.steps_taken = 0
        #: the pass running now: "first", "second", or None (a plain or one-pass step's only pass)
        self.current_pass: PassName | None = None
        self._step: _Step | None = None
        self._open: contextlib.ExitStack | None = None
        self._current: _MicroBatch | None = None
        self._current_is_last = False
        #: keeps buffers and frozen parameters as one pass leaves them (see pass_state)
        self.state_guard = ModuleStateGuard(model)
        #: paths of batch tensors cloned for the replay (None: all, until the first two-pass step ends)
        self.batch_clones: set[str] | None = None

    @property
    def perturbation_reduces(self) -> bool:
        """Whether a synced first pass runs without the gradient all-reduce, the perturbation
        averaging over :attr:`replicas` only what it reads."""
        options = self.options
        return (self.replicas is not None and options.sync_first_pass
                and options.first_pass_reduction == "auto" and self.perturbation is not None
                and self.perturbation.replica_reduction != "gradient")

    @property
    def plan(self) -> StepPlan:
        """The plan of the step in progress (a plain step between steps)."""
        return self._step.plan if self._step is not None else PLAIN_STEP

    @property
    def in_step(self) -> bool:
        return self._step is not None

    @property
    def micro_batches(self) -> list[tuple[Any, int]]:
        """``(batch, batch_idx)`` of the micro-batches kept for the second pass."""
        return [(m.batch, m.batch_idx) for m in self._step.micro_batches] if self._step else []

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, int]:
        """What a resumed run needs to continue m-SAM's re-synchronisation period."""
        return {"resyncs": self.resyncs, "last_resync_step": self.last_resync_step}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.resyncs = int(state_dict.get("resyncs", 0))
        self.last_resync_step = int(state_dict.get("last_resync_step", 0))

    # ----------------------------------------------------------------------------- the whole step
    def step(self, passes: Passes, micro_batches: Sequence[tuple[Any, int]], optimizer: torch.optim.Optimizer,
             plan: StepPlan | None = None, *, optimizer_step: Callable[[], Any] | None = None,
             global_step: int | None = None) -> StepResult:
        """One whole optimizer step over ``micro_batches`` (``(batch, batch_idx)`` pairs).

        ``plan`` defaults to a two-pass step at the perturbation's radius (a plain step without
        a perturbation); ``optimizer_step`` to ``optimizer.step`` (pass e.g. the GradScaler's
        step). The step starts from cleared gradients, as Lightning's does. ``global_step`` is
        the number of optimizer steps taken after this one (m-SAM's re-synchronisation counts
        them; default: the steps this engine has taken).
        """
        if plan is None:
            plan = StepPlan(True, self.perturbation.rho) if self.perturbation is not None else PLAIN_STEP
        optimizer.zero_grad(set_to_none=True)
        try:
            for position, (batch, batch_idx) in enumerate(micro_batches):
                self.feed(passes, batch, batch_idx, last=position == len(micro_batches) - 1,
                          plan=lambda: plan, optimizer=optimizer)
            self.complete_passes(passes, optimizer)
        except BaseException:
            self.abandon()
            raise
        (optimizer_step or optimizer.step)()
        return self.end(global_step)

    # ----------------------------------------------------------------------------- host runs every pass
    def feed(self, passes: Passes, batch: Any, batch_idx: int, *, last: bool,
             plan: Callable[[], StepPlan],
             optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor | None:
        """The first (or only) pass of one micro-batch, run through ``passes``; its loss, or None.

        The first micro-batch of a step opens it: ``plan()`` is asked then (once per step) and,
        with the ``optimizer`` that will step, the perturbation covers what it updates. ``last``:
        this micro-batch ends the step's window (its first pass syncs the gradients).
        """
        self._begin_if_needed(plan, optimizer)
        self._open_first_pass(batch, batch_idx, last=last, no_sync=passes.no_sync)
        return self._run_open_pass(passes)

    def complete_passes(self, passes: Passes, optimizer: torch.optim.Optimizer | None = None) -> None:
        """After the last micro-batch's first pass: on a two-pass step ``perturb()``, the second
        pass of every micro-batch that gave a loss at ``w + ε``, ``restore()``; then what must
        happen before the optimizer steps (:meth:`before_optimizer_step`)."""
        self._second_pass(passes, optimizer)
        self.before_optimizer_step()

    # ----------------------------------------------------------------------------- host runs some passes
    def open_micro_batch(self, batch: Any, batch_idx: int, *, last: bool, plan: Callable[[], StepPlan],
                         optimizer: torch.optim.Optimizer | None = None,
                         no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None) -> None:
        """Before a micro-batch whose first pass the host runs itself: opens the step at its first
        micro-batch (as :meth:`feed` does) and enters the pass's context (the kept batch and its
        random state; the gradient all-reduce blocked with ``no_sync`` unless it must sync; BatchNorm
        frozen when the second pass is to update it; on a one-pass step ``ε`` applied).
        :meth:`close_micro_batch` leaves it."""
        self._begin_if_needed(plan, optimizer)
        self._open_first_pass(batch, batch_idx, last=last, no_sync=no_sync)

    def after_backward(self) -> PassName | None:
        """After a backward the host ran itself (not one run through :class:`Passes`, which the
        engine follows on its own); returns the pass it belonged to. Marks the micro-batch as
        trained; on the last backward of a second pass removes ``ε`` at once, before anything reads
        the weights; on a one-pass step removes ``ε`` and, after the last micro-batch, estimates
        the next direction from this unclipped gradient."""
        name = self.current_pass
        self._after_backward()
        return name

    def finish_in_closure(self, passes: Passes, optimizer: torch.optim.Optimizer,
                          host_closure: Callable[[], Any], *, host_ran_first_pass: bool,
                          zero_grad: Callable[[], None], host_loss_scale: float = 1.0) -> Any:
        """Inside the optimizer's step of a two-pass step (the closure the optimizer calls): the
        rest of the step, ending with ``host_closure``, the host's own closure.

        If the host already ran this micro-batch's first pass (``host_ran_first_pass``), the
        second passes are all the engine's and ``host_closure`` runs after them (its hooks and
        clipping). Otherwise the engine runs the open first pass on a copy of the batch (after
        ``zero_grad`` when it is the step's only micro-batch), ``perturb()``, the second passes,
        the last one through ``host_closure``, whose result (a loss divided by
        ``host_loss_scale``, as Lightning's closure returns it) is kept as a second-pass loss and
        returned.
        """
        if host_ran_first_pass:
            self._close_pass()
            self._second_pass(passes, optimizer)
            return host_closure()
        if len(self._step.micro_batches) == 1:  # the step starts here: clear the previous gradients
            zero_grad()
        self._run_open_pass(passes, replayed_by_caller=True)
        result = self._second_pass(passes, optimizer, last_pass=host_closure)
        if isinstance(result, torch.Tensor):
            self.record_loss(result.detach() * host_loss_scale, "second")
        return result

    def close_micro_batch(self, *, stepped: bool, window_ends: bool, host_loss: torch.Tensor | None = None,
                          global_step: int | None = None) -> StepResult | None:
        """After a micro-batch whose pass the host ran: leaves its context and keeps ``host_loss``
        (the undivided loss of a first pass the host ran); when the optimizer ``stepped`` ends the
        step (:meth:`end`) and returns what it did; when the window ends without a step (an
        ``optimizer_step`` that did not step) drops it. None while the step goes on."""
        if self._step is None:
            return None
        self._close_pass()
        if host_loss is not None:
            self.record_loss(host_loss)
        if stepped:
            return self.end(global_step)
        if window_ends:
            self.abandon()
        return None

    # ----------------------------------------------------------------------------- both orders
    def before_optimizer_step(self) -> None:
        """Just before the optimizer steps (before gradient clipping): no ``ε`` may be left, and a
        one-pass step whose last micro-batch gave no loss estimates its direction here."""
        if self.perturbation is not None:
            self.perturbation.restore()
        self._estimate_once()

    def end(self, global_step: int | None = None) -> StepResult:
        """Close the step after the optimizer stepped: m-SAM re-synchronisation (every
        ``resync_every`` steps of ``global_step``, the optimizer steps taken so far; default: the
        steps this engine has ended), the losses."""
        self.steps_taken += 1
        global_step = self.steps_taken if global_step is None else global_step
        step = self._step
        self._close_pass()
        self.state_guard.drop()
        self._step, self.current_pass = None, None
        first, second = (torch.stack(v).float().mean() if v else None for v in step.losses.values())
        if step.plan.two_pass and step.perturbed and not self.options.sync_first_pass:
            self.resynchronize(global_step)
        return StepResult(step.plan, step.perturbed, first, second)

    def abandon(self) -> None:
        """Drop the step in progress (an exception, an epoch that ended mid-window): no ``ε`` left."""
        if self._open is not None:
            stack, self._open = self._open, None
            stack.close()
        if self.perturbation is not None:
            self.perturbation.restore()
        self.state_guard.drop()
        self._step, self._current, self.current_pass = None, None, None

    def record_loss(self, loss: torch.Tensor, name: PassName | None = None) -> None:
        """Keep a micro-batch's (undivided) loss for the step's mean, first or second pass."""
        if self._step is not None:
            self._step.losses["second" if name == "second" else "first"].append(loss.detach())

    # ----------------------------------------------------------------------------- the pieces
    def _begin_if_needed(self, plan: Callable[[], StepPlan], optimizer: torch.optim.Optimizer | None) -> None:
        if self._step is None:
            self._begin(plan(), optimizer)

    def _begin(self, plan: StepPlan, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Open a step with its plan. With the ``optimizer`` that will step, the perturbation
        covers what it updates (:meth:`~lightning_nusam.perturbations.Perturbation.restrict_to`
        its parameters; an optimizer replaced or given new groups is followed)."""
        if plan.perturb and self.perturbation is None:
            raise ValueError("a perturbing plan needs a perturbation")
        if optimizer is not None and self.perturbation is not None:
            self.perturbation.restrict_to(optimizer_parameters(optimizer))
        self.state_guard.drop()
        self._step = _Step(plan)
        if plan.two_pass:
            modules = list(self.model.named_modules())  # one walk for both
            self.state_guard.begin(modules)
            if self.options.same_random_draws:
                self._step.cuda_devices = self._cuda_devices()
                self._step.generators = owned_generators(self.model, modules)

    def _open_first_pass(self, batch: Any, batch_idx: int, *, last: bool,
                        no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None) -> None:
        """Enter the context of a micro-batch's first (or only) pass, for a pass that the caller
        runs itself (Lightning's own closure); :meth:`_close_pass` leaves it.

        Keeps the micro-batch for the second pass with the random state it starts from; blocks
        the gradient all-reduce unless this is the last micro-batch of a pass that syncs (with
        ``no_sync``, the way in's context for that); freezes BatchNorm statistics when the second
        pass is to update them; on a one-pass step applies ``ε`` for this micro-batch.
        """
        step = self._step
        plan = step.plan
        first_of_step = not step.micro_batches
        micro_batch = _MicroBatch(batch, batch_idx)
        step.micro_batches.append(micro_batch)
        stack = contextlib.ExitStack()
        if plan.two_pass:
            if self.options.same_random_draws:
                micro_batch.random_state = RandomState.capture(step.cuda_devices, step.generators)
            clones = True if self.batch_clones is None else self.batch_clones
            micro_batch.replay, micro_batch.leaves = copy_batch(batch, clones)
            micro_batch.opened = micro_batch.versions()
            sync = last and self.options.sync_first_pass and not self.perturbation_reduces
            if self.options.batchnorm_update == "second":
                stack.enter_context(frozen_running_stats(self.model))
            name: PassName | None = "first"
        else:
            sync = last
            name = None
            if plan.perturb:  # one pass at w + ε, removed after this micro-batch
                self.perturbation.apply(plan.rho, repeat=not first_of_step)
                step.perturbed = self.perturbation.is_perturbed
        if not sync and no_sync is not None:
            stack.enter_context(no_sync())
        stack.enter_context(self._naming(name))
        self._open, self._current, self._current_is_last = stack, micro_batch, last

    def _run_open_pass(self, passes: Passes, *, replayed_by_caller: bool = False) -> torch.Tensor | None:
        """Run the micro-batch opened by :meth:`_open_first_pass` through ``passes``, then
        :meth:`_close_pass`; its loss, or None when it gave none. ``replayed_by_caller``: the
        caller's own pass replays this micro-batch with the batch object as given (Lightning's
        closure), so this first pass gets the engine's copy of it."""
        micro_batch = self._current
        try:
            batch = micro_batch.batch
            if replayed_by_caller and self.plan.two_pass:
                batch, micro_batch.first_got_copy = micro_batch.replay, True
            loss = passes.forward_backward(batch, micro_batch.batch_idx)
            if loss is not None:
                self._after_backward()
                self.record_loss(loss)
        finally:
            self._close_pass()
        return loss

    def _close_pass(self) -> None:
        """Leave the context of the pass opened by :meth:`_open_first_pass`; after the last first
        pass of a two-pass step, remember the random state the step must end with."""
        if self._open is None:
            return
        stack, self._open = self._open, None
        stack.close()
        step, last = self._step, self._current_is_last
        if step.plan.two_pass and self._current is not None:
            self._check_first_pass_batch(self._current)
        if step.plan.one_pass and step.plan.perturb:
            self.perturbation.restore()
        if last and step.plan.two_pass and self.options.same_random_draws:
            step.random_state_after = RandomState.capture(step.cuda_devices)
        if last:
            self._estimate_once()
        self._current = None

    def _after_backward(self) -> None:
        """After a backward of the step, once (the engine after the passes it runs, the host through
        :meth:`after_backward` after its own): marks the micro-batch as trained; on the last
        backward of a second pass removes ``ε`` at once, before anything reads the weights; on a
        one-pass step removes ``ε`` and, after the last micro-batch, estimates the next direction
        from this unclipped gradient."""
        step = self._step
        if step is None:
            return
        if self.current_pass == "second":
            if self._current_is_last:
                self.perturbation.restore()
            return
        if self._current is not None:
            self._current.backward = True
        if step.plan.one_pass and step.plan.perturb:
            self.perturbation.restore()
        if self._current_is_last:
            self._estimate_once()

    def _second_pass(self, passes: Passes, optimizer: torch.optim.Optimizer | None = None, *,
                     last_pass: Callable[[], Any] | None = None) -> Any:
        """``perturb()``, the second pass of every micro-batch that gave a loss at ``w + ε``,
        ``restore()``. Does nothing on a plain or one-pass step, or when no micro-batch gave a
        loss (the step then counts as not perturbed).

        ``last_pass``, when given, runs the last micro-batch's second pass itself (Lightning's
        closure, with its hooks and clipping) and its result is returned; it is called even
        when that micro-batch gave no loss.
        """
        step = self._step
        if not step.plan.two_pass:
            return last_pass() if last_pass is not None else None
        kept = step.micro_batches
        trained = [m for m in kept if m.backward]
        by_caller = kept[-1] if last_pass is not None else None
        ours = [m for m in trained if m is not by_caller]
        self._check_replayed_batches(kept)
        self.state_guard.before_second_pass()
        if not trained:  # no loss in the step: no perturbation; the caller's pass still runs
            try:
                if last_pass is None:
                    return None
                with self._second_pass_context(kept[-1], True, None):
                    return last_pass()
            finally:
                self._end_second_pass(step)
        try:
            replicas = self.replicas if self.perturbation_reduces else None
            self.perturbation.perturb(step.plan.rho, replicas=replicas)
        except BaseException:
            self._end_second_pass(step)
            raise
        step.perturbed = self.perturbation.is_perturbed
        result = None
        try:
            self._zero_grad(optimizer)
            with metric_updates_undone(self.model):
                for position, micro_batch in enumerate(ours):
                    last = position == len(ours) - 1 and (by_caller is None or not by_caller.backward)
                    with self._second_pass_context(micro_batch, last, passes):
                        loss = passes.forward_backward(micro_batch.for_second_pass(), micro_batch.batch_idx)
                        if loss is not None:
                            self._after_backward()
                            self.record_loss(loss, "second")
                if by_caller is not None:
                    with self._second_pass_context(by_caller, True, None):
                        result = last_pass()
        finally:
            self.perturbation.restore()
            self._end_second_pass(step)
        return result

    def _end_second_pass(self, step: _Step) -> None:
        """After the second passes (also on an exception): the random stream, the module state
        and the batch copies as one pass leaves them."""
        self._restore_random_state(step.random_state_after)
        self._current, self._current_is_last = None, False
        if self.batch_clones is None:  # the first two-pass step: what changes in place is known now
            self.batch_clones = set(step.changed_paths)
        for micro_batch in step.micro_batches:  # the copies are not needed anymore
            micro_batch.replay, micro_batch.leaves = None, []
        self.state_guard.after_second_pass()

    # ----------------------------------------------------------------------------- m-SAM
    @torch.no_grad()
    def resynchronize(self, global_step: int) -> bool:
        """Broadcast rank 0's weights under m-SAM once ``resync_every`` steps have passed since the
        last time (counted in optimizer steps, perturbed or not, so that ``every_n_steps`` cannot
        keep the perturbed steps off the period).

        With per-rank ε, ``w + ε − ε`` leaves a different last-bit rounding on each rank; the
        all-reduced second-pass gradients do not amplify it (every rank applies the same
        update), so the difference is a random walk of about one ulp per step. One broadcast of
        the weights costs as much as one gradient all-reduce: every 100 steps it adds about 1%
        to m-SAM's communication and keeps the ranks within a few ulp of each other. Methods
        whose restore is exact (SAM, SAM-ON, and νSAM/GaussSAM on bf16/fp16 weights) skip it.
        """
        if (
            self.options.resync_every == 0
            or self.perturbation is None
            or self.perturbation.exact_restore
            or not (dist.is_available() and dist.is_initialized())
            or dist.get_world_size() == 1
            or global_step - self.last_resync_step < self.options.resync_every
        ):
            return False
        for parameter in self.model.parameters():
            dist.broadcast(parameter.data, src=0)
        self.resyncs += 1
        self.last_resync_step = global_step
        return True

    # ----------------------------------------------------------------------------- contexts
    @contextlib.contextmanager
    def _second_pass_context(self, micro_batch: _MicroBatch, last: bool,
                             passes: Passes | None) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if not last and passes is not None:
                stack.enter_context(passes.no_sync())
            if self.options.batchnorm_update == "first":
                stack.enter_context(frozen_running_stats(self.model))
            if micro_batch.random_state is not None:
                micro_batch.random_state.restore()
            stack.enter_context(muted_logging(self.model))
            stack.enter_context(self._naming("second"))
            self._current, self._current_is_last = micro_batch, last
            yield

    @contextlib.contextmanager
    def _naming(self, name: PassName | None) -> Iterator[None]:
        previous, self.current_pass = self.current_pass, name
        try:
            yield
        finally:
            self.current_pass = previous

    def _check_first_pass_batch(self, micro_batch: _MicroBatch) -> None:
        """After a micro-batch's first pass: the paths of its batch changed in place are learned
        (first two-pass step) or were cloned for the replay; else the replay is lost: an error."""
        if not micro_batch.leaves or micro_batch.closed:
            return
        micro_batch.closed = micro_batch.versions()
        for (path, original, copied), before, after in zip(micro_batch.leaves, micro_batch.opened,
                                                          micro_batch.closed, strict=True):
            if before != after:
                self._step.changed_paths.add(path)
                if original is copied:
                    raise RuntimeError(
                        f"the first pass changed {path} (micro-batch {micro_batch.batch_idx}) in place, "
                        "which it did not on the first perturbed step, so the second pass cannot see the "
                        "batch as the loader gave it: change a copy (`x = x.sub(mean)`), or change it "
                        "in place on every step")

    def _check_replayed_batches(self, kept: list[_MicroBatch]) -> None:
        """Before the second passes: a batch tensor changed in place after its first pass (a
        loader that reuses its buffers) is learned (first two-pass step) or was cloned; else the
        replay would see another micro-batch: an error."""
        for micro_batch in kept:
            if not micro_batch.closed:
                continue
            for (path, original, copied), (after, _) in zip(micro_batch.leaves, micro_batch.closed,
                                                          strict=True):
                if version(original) != after and not micro_batch.first_got_copy:
                    self._step.changed_paths.add(path)
                    if original is copied:
                        raise RuntimeError(
                            f"{path} of micro-batch {micro_batch.batch_idx} was changed in place after "
                            "its first pass and before its second (a data loader that reuses its batch "
                            "buffers?), which did not happen on the first perturbed step, so the second "
                            "pass would replay other data: let the loader yield new tensors per batch")

    def _restore_random_state(self, state: RandomState | None) -> None:
        if state is not None:
            state.restore()

    def _estimate_once(self) -> None:
        """A one-pass step estimates the next direction once, from a gradient it has (after the
        last micro-batch's backward, or at the optimizer step when that one gave no loss)."""
        step = self._step
        if step is not None and step.plan.estimate and not step.estimated \
                and any(m.backward for m in step.micro_batches):
            step.estimated = True
            self.perturbation.estimate()

    def _cuda_devices(self) -> list[int]:
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return []
        return sorted({p.device.index for p in self.model.parameters() if p.device.type == "cuda"})

    def _zero_grad(self, optimizer: torch.optim.Optimizer | None) -> None:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        else:
            self.model.zero_grad(set_to_none=True)


#: what this module defines, and what it re-exports from the modules below it (as before)
__all__ = [
    "DEFAULT_RESYNC_EVERY",
    "PLAIN_STEP",
    "BatchNormUpdate",
    "FirstPassReduction",
    "LossPasses",
    "PassName",
    "Passes",
    "RandomState",
    "StepEngine",
    "StepOptions",
    "StepPlan",
    "StepResult",
    "data_parallel_replicas",
    "frozen_running_stats",
    "metric_updates_undone",
    "optimizer_needs_closure",
    "optimizer_parameters",
]
