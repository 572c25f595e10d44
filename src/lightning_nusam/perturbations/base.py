"""The contract every sharpness-aware perturbation follows.

A perturbation reads the first-pass gradients (``p.grad``), adds ``ε`` to the selected weights
in place (:meth:`Perturbation.perturb`), and later removes exactly that ``ε`` in place
(:meth:`Perturbation.restore`). What it keeps in between is reported by :meth:`held_numel`.

``perturb()`` is two steps that a one-pass step uses apart (see :attr:`Perturbation.supports_one_pass`):
:meth:`~Perturbation.estimate` reads the gradients and keeps the direction of ``ε`` (νSAM: the
singular vectors), and :meth:`~Perturbation.apply` adds ``ε`` of a given radius from that
direction, without reading any gradient.

A perturbation follows the model it was built on: parameters that start or stop training are
perturbed or skipped at each step, and when the model's parameters change (a replaced layer,
``load_state_dict(assign=True)``, a cast to bf16, a move to another device) the selection is
taken again before the next ``perturb()``. While ``ε`` is applied, ``model.state_dict()`` (and so
every checkpoint, from any hook or signal handler) holds the weights without it.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parameter import is_lazy

from lightning_nusam.checks import check_choice, check_integer, check_positive, check_rho
from lightning_nusam.perturbations.selection import (
    SelectedParameter,
    as_patterns,
    nothing_to_perturb,
    uninitialized_parameters,
    unwrap_module,
)
from lightning_nusam.perturbations.sharding import RowSharding, all_reduce_sum, local, row_sharding

#: τ of Algorithm 2: keeps the normalisations finite for a zero gradient.
DEFAULT_TAU = 1e-12

#: Chooses the parameters of a model that a perturbation may touch (frozen ones included).
Selection = Callable[[nn.Module], list[SelectedParameter]]


class _StructureStamp:
    """Counts registrations of parameters and submodules anywhere (``setattr`` of a parameter
    or a module, ``register_parameter``, ``load_state_dict(assign=True)``): while it has not
    moved, no model has gained or swapped a parameter or a layer, so a perturbation checks only
    its own selected parameters at each step instead of walking the whole model."""

    count = 0

    @classmethod
    def bump(cls, *args: Any) -> None:
        cls.count += 1


nn.modules.module.register_module_parameter_registration_hook(_StructureStamp.bump)
nn.modules.module.register_module_module_registration_hook(_StructureStamp.bump)


def own_options(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """A constructor's ``locals()`` without ``self``, ``model`` and ``__class__``: its options."""
    return {k: v for k, v in arguments.items() if k not in ("self", "model", "__class__")}


class Perturbation(abc.ABC):
    """Base class: step bookkeeping, the perturb/restore protocol and memory accounting.

    Subclasses set their options, call ``super().__init__(model, rho, select, empty_hint)``,
    build their state from the selection in :meth:`_selection_changed`, implement
    :meth:`_estimate`, :meth:`_apply`, :meth:`_restore` and :meth:`_unperturbed_copies`, and list
    the tensors they keep in :meth:`held_tensors`. Their options are checked by
    :meth:`check_options` (also without a model, by the callbacks that take them). Counters:
    ``steps`` (perturbations applied) and ``skipped_steps`` (steps whose gradients were not
    finite, e.g. an fp16 overflow, so nothing was added).
    """

    #: Whether :meth:`restore` returns every weight bit-exactly (it copies them back, or fixes
    #: the entries that a subtraction would round elsewhere) rather than subtracting ``ε``,
    #: which can leave a last-bit rounding (see the m-SAM re-synchronisation of the callbacks).
    #: Such a restore would also undo an optimizer step taken before it, which is refused.
    exact_restore: bool = False
    #: Whether :meth:`estimate` and :meth:`apply` can be used apart (a one-pass step applies
    #: the direction estimated from the previous step's gradient). The ℓ2 methods cannot: their
    #: direction is the whole gradient, which would have to be kept between steps.
    supports_one_pass: bool = False
    #: What :meth:`perturb` communicates with ``replicas`` (data parallelism without the first
    #: pass's gradient all-reduce): ``"vectors"`` (νSAM: the power iteration's products),
    #: ``"selected gradients"`` (SAM-ON: the normalisation layers' gradients), ``"nothing"``
    #: (GaussSAM: ε does not read the gradient), or ``"gradient"`` (SAM: ε is elementwise in the
    #: whole gradient, so it is better all-reduced by the first pass itself, overlapped with backward).
    replica_reduction: ClassVar[str] = "gradient"
    #: Checks of the options (argument name → a function returning the accepted value or raising
    #: a ``ValueError`` that names the argument), applied by :meth:`check_options`; those shared
    #: by several methods are here (a class applies the checks of the options it takes).
    option_checks: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "rho": check_rho,
        "include": lambda v: None if v is None else as_patterns("include", v),
        "exclude": lambda v: () if v is None else as_patterns("exclude", v),
        "tau": lambda v: check_positive("tau", v, allow_zero=True),
        "seed": lambda v: check_integer("seed", v),
        "exact_restore": lambda v: check_choice("exact_restore", v, (None, True, False)),
    }

    def __init__(self, model: nn.Module, rho: float, select: Selection, empty_hint: str) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        self.rho = check_rho(rho)
        self.model = unwrap_module(model)
        self._select, self._empty_hint = select, empty_hint
        self._selected: list[SelectedParameter] = []
        #: ``id`` of the parameters the perturbation is restricted to (see :meth:`restrict_to`)
        self._restriction: frozenset[int] | None = None
        self._restriction_key: tuple[int, ...] | None = None  # their ids in the optimizer's order
        self._lazy: list[nn.Parameter] = []  # lazy parameters not initialised at the last selection
        self._shardings: list[RowSharding | None] = []
        self._layout: list[tuple[nn.Parameter, torch.dtype, torch.Size, torch.device]] = []
        self._selected_layout: list[tuple[nn.Parameter, dict, str, torch.dtype, torch.Size,
                                          torch.device]] = []
        self._stamp = -1
        #: whether some (not necessarily all) perturbed weights are restored exactly
        self._partly_exact = False
        self._hook_handles: list[Any] = []
        self._is_perturbed = False
        self._applied_rho = 0.0
        self._versions: list[int] = []
        self._clean: dict[int, torch.Tensor] | None = None
        self._warned_no_gradient = False
        self.steps = 0
        self._skipped = 0
        self._take_selection()
        self._selection_changed({})

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options of this class (every argument but ``model``) checked without a model.

        Returns them as accepted (patterns as tuples, counts as ints); raises ``TypeError`` for
        a name the class does not take and ``ValueError`` naming a bad value.

        Example:
            >>> from lightning_nusam.perturbations import NuclearPerturbation
            >>> NuclearPerturbation.check_options({"rho": 0.1, "include": "blocks.*"})
            {'rho': 0.1, 'include': ('blocks.*',)}
        """
        accepted = [name for name in inspect.signature(cls).parameters if name != "model"]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise TypeError(f"{cls.__name__} has no option {', '.join(map(repr, unknown))}; "
                            f"its options are {', '.join(accepted)}")
        checks = cls.option_checks
        return {name: checks[name](value) if name in checks else value for name, value in options.items()}

    # ----------------------------------------------------------------------------- selection
    def _take_selection(self) -> None:
        """Select from the model. An empty selection is an error, except while the model has lazy
        parameters that their first forward has not initialised (the selection is taken again
        then).
        """
        selected = self._select(self.model)
        self._lazy = uninitialized_parameters(self.model)
        if not selected and not self._lazy:
            raise nothing_to_perturb(self.model, self._empty_hint)
        self._selected = selected
        self._shardings = [row_sharding(item.name, item.parameter) for item in selected]
        self._remember_layout()
        self._hold_state_dicts_unperturbed()

    def _remember_layout(self) -> None:
        self._stamp = _StructureStamp.count
        self._layout = [(p, p.dtype, _shape(p), p.device) for p in self.model.parameters()]
        self._selected_layout = [
            (item.parameter, self._owner(item)._parameters, item.name.rpartition(".")[2],
             item.parameter.dtype, item.parameter.shape, item.parameter.device)
            for item in self._selected
        ]

    def restrict_to(self, parameters: Iterable[torch.Tensor] | None) -> None:
        """Perturb only the selected parameters that are among ``parameters`` (those of the
        optimizer: what it updates), or every selected one (``None``, the default).

        SAM's ``ε = ρ g / ‖g‖₂`` is then normalised over the optimizer's parameters only, as a
        SAM optimizer built on them would do (linear probing: a backbone left out of the
        optimizer is neither perturbed nor counted). A selected parameter outside ``parameters``
        is skipped as a frozen one is (:meth:`trains`): the selection, its state and
        checkpoints stay the same, and it is perturbed again once the optimizer updates it.
        Every way in calls this at the start of a step with its optimizer's parameters.

        Example:
            >>> from lightning_nusam.perturbations import L2Perturbation
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
            >>> sam = L2Perturbation(model, rho=0.05)
            >>> sam.restrict_to(model[2].parameters())  # an optimizer of the head only
            >>> sam.parameter_names
            ['2.weight', '2.bias']
        """
        key = None if parameters is None else tuple(map(id, parameters))
        if key == self._restriction_key:  # the optimizer of the last call, unchanged
            return
        if self._is_perturbed:
            raise RuntimeError(f"{type(self).__name__}.restrict_to() while ε is applied: "
                               "call restore() first")
        self._restriction_key = key
        restriction = self._restriction = None if key is None else frozenset(key)
        if restriction is not None and self._selected and not any(
                id(item.parameter) in restriction for item in self._selected):
            warnings.warn(f"{type(self).__name__}: the optimizer updates none of the {len(self._selected)} "
                          "parameters this method perturbs: nothing is perturbed", UserWarning, stacklevel=2)

    def trains(self, item: SelectedParameter) -> bool:
        """Whether a selected parameter is perturbed now: it requires grad and is among those of
        :meth:`restrict_to` (the optimizer's), when given."""
        return item.parameter.requires_grad and (self._restriction is None
                                                 or id(item.parameter) in self._restriction)

    def _owner(self, item: SelectedParameter) -> nn.Module:
        """The module that holds ``item`` under its name's last part."""
        try:
            return self.model.get_submodule(item.name.rpartition(".")[0])
        except AttributeError:
            return item.module

    def _follow_model(self) -> None:
        """Take the selection again if the model's parameters changed since it was taken (lazy
        parameters initialised by a forward included).

        At each step this checks the selected parameters only (still held by their module, with
        the dtype, shape and device they had: a cast or a move changes those) and the lazy ones
        left out at the last selection; the whole model is walked only when a parameter or a
        layer was registered somewhere since the last check (a swapped layer,
        ``load_state_dict(assign=True)``), so the host time per step does not grow with the
        model's parameter count."""
        if _StructureStamp.count == self._stamp and all(is_lazy(p) for p in self._lazy) and all(
            owned.get(leaf) is p and p.dtype == dtype and p.shape == shape and p.device == device
            for p, owned, leaf, dtype, shape, device in self._selected_layout
        ):
            return
        parameters = list(self.model.parameters())
        if all(is_lazy(p) for p in self._lazy) and len(parameters) == len(self._layout) and all(
            p is q and p.dtype == dtype and _shape(p) == shape and p.device == device
            for p, (q, dtype, shape, device) in zip(parameters, self._layout, strict=True)
        ):
            self._stamp = _StructureStamp.count  # a registration elsewhere: nothing changed here
            return
        previous = {item.name: item for item in self._selected}
        self._take_selection()
        self._selection_changed(previous)

    def _no_autocast(self) -> contextlib.AbstractContextManager:
        """Autocast off for the device type of the perturbed weights: ε is computed and added in
        the weights' own precision whether or not the caller runs under ``torch.autocast``."""
        device_type = local(self._selected[0].parameter.detach()).device.type
        available = getattr(torch.amp, "is_autocast_available",
                            lambda kind: kind in ("cpu", "cuda"))  # torch < 2.4 has no such function
        if available(device_type):
            return torch.autocast(device_type, enabled=False)
        return contextlib.nullcontext()

    @abc.abstractmethod
    def _selection_changed(self, previous: dict[str, SelectedParameter]) -> None:
        """Build the state for ``self._selected``, keeping what belongs to ``previous`` members
        (by name) that are still selected and compatible (empty at construction)."""

    # ----------------------------------------------------------------------------- protocol
    @property
    def is_perturbed(self) -> bool:
        """Whether ``ε`` is currently added to the weights."""
        return self._is_perturbed

    @property
    def parameter_names(self) -> list[str]:
        """Names (as in ``model.named_parameters()``) of the parameters this perturbation touches
        now: the selected ones that require grad and the optimizer updates (frozen ones are
        perturbed once they train; see :meth:`restrict_to`)."""
        if not self._is_perturbed:
            self._follow_model()
        return [item.name for item in self._selected if self.trains(item)]

    @property
    def parameters(self) -> list[nn.Parameter]:
        """The parameters of :attr:`parameter_names`."""
        if not self._is_perturbed:
            self._follow_model()
        return [item.parameter for item in self._selected if self.trains(item)]

    @property
    def skipped_steps(self) -> int:
        """Steps whose gradients were not finite, so that no perturbation was applied."""
        return int(self._skipped)

    @property
    def skipped_count(self) -> torch.Tensor:
        """``skipped_steps`` as a float tensor, without a host synchronisation (for logging)."""
        return torch.as_tensor(self._skipped).float()

    @property
    def has_direction(self) -> bool:
        """Whether an estimate has left a direction for :meth:`apply` (some parameter had a
        gradient)."""
        return False

    @property
    def applied_rho(self) -> float:
        """The radius of the ``ε`` currently added (0 when none is)."""
        return self._applied_rho if self._is_perturbed else 0.0

    @torch.no_grad()
    def perturb(self, rho: float | None = None, *, replicas: dist.ProcessGroup | None = None) -> None:
        """Read ``p.grad`` of the selected parameters and add ``ε`` to them in place.

        ``rho`` overrides :attr:`rho` for this step only (a radius schedule); :meth:`restore`
        removes exactly what was added whatever :attr:`rho` is then. Raises ``RuntimeError``
        when the model has no gradient at all (no backward pass before it).

        ``replicas``: the data-parallel process group when ``p.grad`` holds this process's own
        gradient (DDP's first pass without its all-reduce). ``ε`` is then that of the mean
        gradient over the group, the same on every process, and only what it needs is
        communicated (:attr:`replica_reduction`).
        """
        self._check_not_perturbed("perturb")
        self._follow_model()
        self._require_gradients("perturb")
        with self._no_autocast():
            self._perturb(rho, replicas)

    @torch.no_grad()
    def estimate(self) -> None:
        """Read ``p.grad`` and keep the direction of the next ``ε`` without touching the weights
        (the half of :meth:`perturb` that a one-pass step runs after its backward pass)."""
        self._require_one_pass("estimate")
        self._check_not_perturbed("estimate")
        self._follow_model()
        self._require_gradients("estimate")
        with self._no_autocast():
            self._estimate(None)

    @torch.no_grad()
    def apply(self, rho: float | None = None, *, repeat: bool = False) -> None:
        """Add ``ε`` of radius ``rho`` (default :attr:`rho`) along the direction of the last
        :meth:`estimate`, reading no gradient (the other half of :meth:`perturb`).

        ``repeat=True`` adds the same ``ε`` as the last ``apply`` again (the next micro-batch of
        the same step; GaussSAM then redraws the same noise) and does not count a new step.
        """
        self._require_one_pass("apply")
        self._check_not_perturbed("apply")
        self._follow_model()
        with self._no_autocast():
            self._apply_checked(rho, repeat)

    @torch.no_grad()
    def restore(self) -> None:
        """Remove the ``ε`` added by the last :meth:`perturb`; does nothing when none is applied.

        With an exact restore (a copy put back, or rounding exceptions written back) a change of
        the weights since :meth:`perturb`, such as an ``optimizer.step()``, would be undone: that
        is refused with a ``RuntimeError`` and the weights are left as they are.
        """
        if not self._is_perturbed:
            return
        if self.exact_restore or self._partly_exact:
            changed = [item.name for item, version in zip(self._selected, self._versions, strict=True)
                       if item.parameter._version != version]
            if changed:
                raise RuntimeError(
                    f"{type(self).__name__}.restore(): {len(changed)} perturbed weights changed since "
                    f"perturb() (e.g. {changed[0]!r}; an optimizer.step()?), and an exact restore would "
                    "undo that change. Call restore() before optimizer.step()"
                )
        with self._no_autocast():
            self._restore()
        self._is_perturbed = False
        self._applied_rho = 0.0
        self._clean = None

    def _perturb(self, rho: float | None, replicas: dist.ProcessGroup | None) -> None:
        """:meth:`perturb`'s work: :meth:`_estimate`, then :meth:`_apply_checked` (a subclass may
        run both halves' arithmetic in one go)."""
        self._estimate(replicas)
        self._apply_checked(rho)

    def _apply_checked(self, rho: float | None, repeat: bool = False) -> None:
        radius = self.rho if rho is None else check_rho(rho)
        if not self.has_direction:  # no selected parameter had a gradient: nothing to add
            return
        self._is_perturbed, self._applied_rho, self._clean = True, radius, None
        # ε is written through .data, which leaves the version counters alone: a change of them
        # before restore() is someone else's in-place update (an optimizer step)
        self._versions = [item.parameter._version for item in self._selected]
        try:
            self._apply(radius, repeat)
        except BaseException:
            self.restore()  # undo whatever part of ε was added before the error
            raise
        if not repeat:
            self.steps += 1

    def _require_gradients(self, method: str) -> None:
        """An error when the model has no gradient at all; a note (once) when only the selected
        parameters have none (all frozen, or unused by the loss), as nothing is perturbed then."""
        if any(item.parameter.grad is not None for item in self._selected):
            return
        if not any(p.grad is not None for p in self.model.parameters()):
            raise RuntimeError(
                f"{type(self).__name__}.{method}() found no gradients in the model: run the first "
                f"forward and backward pass (loss.backward()) before {method}()"
            )
        if not self._warned_no_gradient:
            self._warned_no_gradient = True
            warnings.warn(f"{type(self).__name__}: none of the {len(self._selected)} selected parameters "
                          "has a gradient (frozen, or not used by the loss): nothing is perturbed",
                          UserWarning, stacklevel=3)

    def _check_not_perturbed(self, method: str) -> None:
        if self._is_perturbed:
            raise RuntimeError(
                f"{type(self).__name__}.{method}() called while ε is applied (twice without restore()): "
                "call restore() after the second backward pass, before the optimizer step"
            )

    def _require_one_pass(self, method: str) -> None:
        if not self.supports_one_pass:
            raise RuntimeError(
                f"{type(self).__name__}.{method}() is not available: its direction is the whole "
                "gradient, which a one-pass step would have to keep between steps; use perturb()"
            )

    # ----------------------------------------------------------------------------- checkpoints
    def unperturbed_values(self) -> dict[int, torch.Tensor]:
        """While ``ε`` is applied: ``{id(parameter): its value without ε}`` (new tensors, equal to
        what :meth:`restore` will give back) for every parameter that carries ``ε``; empty when
        none is applied. This is what ``model.state_dict()`` returns for them meanwhile."""
        if not self._is_perturbed:
            return {}
        if self._clean is None:
            with self._no_autocast():
                copies = self._unperturbed_copies()
            self._clean = {id(self._selected[i].parameter): value for i, value in copies.items()}
        return self._clean

    def _hold_state_dicts_unperturbed(self) -> None:
        """Register, on every module owning a selected parameter, a ``state_dict`` post-hook that
        replaces a perturbed value by its value without ``ε`` (see :meth:`unperturbed_values`)."""
        for handle in self._hook_handles:
            handle.remove()
        owners = {id(module): module for item in self._selected for module in item.owners}
        hook = _UnperturbedStateDict(weakref.ref(self))
        register = ("register_state_dict_post_hook" if hasattr(nn.Module, "register_state_dict_post_hook")
                    else "_register_state_dict_hook")  # torch < 2.5
        self._hook_handles = [getattr(module, register)(hook) for module in owners.values()]

    def __del__(self) -> None:
        for handle in getattr(self, "_hook_handles", ()):
            handle.remove()

    # ----------------------------------------------------------------------------- accounting
    @abc.abstractmethod
    def held_tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor this object keeps to restore the weights (and to warm-start)."""

    def held_numel(self, total: bool = False) -> int:
        """How many numbers the perturbation holds between :meth:`perturb` and :meth:`restore`.

        Counted from the tensors it actually keeps (:meth:`held_tensors`), not from a formula.
        SAM keeps a full copy of the perturbed weights; νSAM keeps ``u`` and ``v`` per matrix.
        For sharded parameters this is what this rank holds; ``total=True`` sums over the ranks
        (a collective call) where a subclass supports sharding, and equals it otherwise.
        """
        count = sum(t.numel() for t in self.held_tensors())
        sharding = self._sharding() if total else None
        if sharding is None:
            return count
        device = local(self._selected[0].parameter.detach()).device
        counts = torch.tensor([count], dtype=torch.int64, device=device)
        return int(all_reduce_sum(counts, sharding.group).item())

    def _sharding(self) -> RowSharding | None:
        """The row sharding of the perturbed parameters (None when none is sharded)."""
        return next((s for s in self._shardings if s is not None), None)

    def perturbed_numel(self) -> int:
        """How many weights :meth:`perturb` may change now (what SAM would have to copy)."""
        return sum(parameter.numel() for parameter in self.parameters)

    def describe(self) -> str:
        """A short human-readable account of what is perturbed and what is held."""
        return (
            f"{type(self).__name__}(rho={self.rho}): {len(self.parameter_names)} tensors, "
            f"{self.perturbed_numel():,} weights perturbed, {self.held_numel():,} numbers held"
        )

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if self._is_perturbed:
            raise RuntimeError("load_state_dict() while the weights are perturbed: call restore() first")
        self._follow_model()
        self.steps = int(state_dict["steps"])
        self._skipped = int(state_dict["skipped_steps"])

    # ----------------------------------------------------------------------------- subclasses
    @abc.abstractmethod
    def _estimate(self, replicas: dist.ProcessGroup | None) -> None:
        """Read the gradients and keep what :meth:`_apply` needs (no weight changes); with
        ``replicas``, for the mean of the replicas' gradients (see :meth:`perturb`)."""

    @abc.abstractmethod
    def _apply(self, rho: float, repeat: bool) -> None:
        """Add ``ε`` of radius ``rho`` from what :meth:`_estimate` kept (``repeat``: the same ``ε``
        as the last time), recording each parameter as it is changed so that :meth:`_restore`
        undoes exactly the changed ones even when interrupted."""

    @abc.abstractmethod
    def _restore(self) -> None:
        """Remove ``ε`` parameter by parameter, forgetting each one as it is restored."""

    @abc.abstractmethod
    def _unperturbed_copies(self) -> dict[int, torch.Tensor]:
        """``{index in the selection: a new tensor holding that parameter without ε}`` for the
        parameters that carry ``ε`` now."""

    def __repr__(self) -> str:
        return self.describe()


def _shape(parameter: torch.Tensor) -> torch.Size | None:
    """A parameter's shape, None for a lazy one that has none yet."""
    return None if is_lazy(parameter) else parameter.shape


class _UnperturbedStateDict:
    """``state_dict`` post-hook of one module: its perturbed parameters' values without ε."""

    def __init__(self, perturbation: weakref.ReferenceType[Perturbation]) -> None:
        self.perturbation = perturbation

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, metadata: Any) -> None:
        perturbation = self.perturbation()
        if perturbation is None or not perturbation.is_perturbed:
            return
        clean = perturbation.unperturbed_values()
        for name, parameter in module.named_parameters(recurse=False):
            key, value = prefix + name, clean.get(id(parameter))
            if value is None or key not in state_dict:
                continue
            if isinstance(state_dict[key], nn.Parameter):  # state_dict(keep_vars=True)
                value = nn.Parameter(value, requires_grad=parameter.requires_grad)
            state_dict[key] = value
