"""What the second pass of a two-pass step may not change: it must look like the first pass again.

The user's loss code runs twice per micro-batch on a two-pass step. Besides the gradients it may
change state: the running statistics of a normalisation layer, spectral normalisation's power
iteration vectors, an EMA teacher or a MoCo queue updated under ``torch.no_grad()``, a VQ
codebook, the batch object (``batch.pop("labels")``, ``x.sub_(mean)``), the draws of a generator
it owns. This module keeps each of them as one pass leaves them:

- :class:`ModuleStateGuard`: buffers and parameters that do not train (``requires_grad=False``).
  Let ``S₀`` be their values before the first pass of a step and ``Sₖ`` after its last first
  pass. The second pass starts from ``S₀`` (it sees what the first pass saw) and the step ends
  with ``Sₖ`` (what one pass leaves). What a pass changes is found by autograd's version counters
  (every in-place operation bumps ``t._version``) and storage pointers (``p.data = ...``), so only
  the tensors a first pass changes are copied: nothing for a model whose passes change only
  BatchNorm statistics (frozen by ``batchnorm_update``). The first two-pass step has no such
  knowledge yet: it keeps one copy of every guarded tensor in host memory (the *census*), learns
  from it what each pass changes (values too, for in-place updates through ``.data`` that no
  counter sees: those are found only if they change a value on that step), and frees it at the
  end of that step.
- :func:`copy_batch`: a shallow copy of the batch's containers (dict, list, tuple, named tuple,
  dataclass, ``UserDict``-style mappings such as Hugging Face's ``BatchEncoding``) for the
  replay, with a clone of the tensors that change in place, learned the same way (every tensor
  is cloned on the first two-pass step).
- :func:`owned_generators`: the random generators the model holds as attributes of itself or its
  submodules (``np.random.Generator``, ``np.random.RandomState``, ``torch.Generator``,
  ``random.Random``), replayed like the global streams.
- :func:`muted_logging`: ``self.log`` of a LightningModule records nothing during the second pass,
  so what it logs in ``training_step`` is the clean (first) pass's, on step and on epoch.

Example (an EMA teacher updated in the loss, as BYOL or DINO do):
    >>> import torch
    >>> from torch import nn
    >>> model = nn.ModuleDict({"student": nn.Linear(3, 2), "teacher": nn.Linear(3, 2)})
    >>> _ = model["teacher"].requires_grad_(False)
    >>> guard = ModuleStateGuard(model)
    >>> def update():
    ...     with torch.no_grad():
    ...         model["teacher"].weight.mul_(0.5)
    >>> guard.begin()
    >>> update()                                   # the first pass
    >>> after_first = model["teacher"].weight.clone()
    >>> guard.before_second_pass()                 # back to what the first pass saw
    >>> update()                                   # the second pass
    >>> guard.after_second_pass()                  # as the first pass left it
    >>> torch.equal(model["teacher"].weight, after_first)
    True
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import random
import sys
import warnings
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

#: what the fix is, in every message about state a second pass would change
FIX = ("update it in on_train_batch_end (after the step), or guard it with "
       "`if sam_pass(self) != 'second':` (lightning_nusam.sam_pass)")


@functools.cache
def _is_excluded(module_type: type) -> bool:
    """Layers whose state has its own rule: BatchNorm (``batchnorm_update``) and torchmetrics
    metrics (their updates are undone as a whole by ``engine.metric_updates_undone``)."""
    if issubclass(module_type, nn.modules.batchnorm._BatchNorm):
        return True
    return any(cls.__name__ == "Metric" and cls.__module__.startswith("torchmetrics")
               for cls in module_type.__mro__)


NamedModules = list[tuple[str, nn.Module]]


def guarded_tensors(model: nn.Module, modules: NamedModules | None = None) -> dict[str, torch.Tensor]:
    """The tensors whose changes a second pass must not leave: every registered buffer and every
    parameter with ``requires_grad=False`` (BatchNorm layers and metrics excepted), by name.
    ``modules``: ``list(model.named_modules())`` when the caller has it already."""
    found: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for prefix, module in model.named_modules() if modules is None else modules:
        if _is_excluded(type(module)):
            continue
        for tensors, frozen_only in ((module._buffers, False), (module._parameters, True)):
            for name, tensor in tensors.items():
                if tensor is None or id(tensor) in seen or (frozen_only and tensor.requires_grad):
                    continue
                if isinstance(tensor, nn.parameter.UninitializedTensorMixin):
                    continue
                seen.add(id(tensor))
                found[f"{prefix}.{name}" if prefix else name] = tensor
    return found


def version(tensor: torch.Tensor) -> int:
    """Autograd's count of in-place changes to ``tensor`` (-1 for inference tensors, which keep none)."""
    try:
        return tensor._version
    except RuntimeError:
        return -1


def _mark(tensor: torch.Tensor) -> tuple[int, int]:
    """The version and the storage address (0 for tensor subclasses without one, e.g. DTensor)."""
    try:
        address = tensor.data_ptr()
    except RuntimeError:
        address = 0
    return version(tensor), address


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy in host memory for plain tensors (the census), on the device for tensor subclasses."""
    tensor = tensor.detach()
    if type(tensor) is torch.Tensor:
        return tensor.to("cpu", copy=True)
    return tensor.clone()


class ModuleStateGuard:
    """Keeps the buffers and non-trained parameters of a two-pass step as one pass leaves them.

    Call :meth:`begin` before the first pass of the step, :meth:`before_second_pass` after the
    last first pass, :meth:`after_second_pass` after the last second pass (also on an exception)
    and :meth:`drop` when a step ends without a second pass. See the module docstring.

    Args:
        model: the module whose state is guarded.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        #: names a first pass changed (learned on the first two-pass step; None before it)
        self.changed_by_first: set[str] | None = None
        #: names only a second pass changed (learned on the first two-pass step)
        self.changed_by_second: set[str] = set()
        self._tensors: dict[str, torch.Tensor] = {}
        self._marks: dict[str, tuple[int, int]] = {}
        self._census: dict[str, torch.Tensor] | None = None
        self._start: dict[str, torch.Tensor] = {}  # S₀ of what a first pass changes
        self._end: dict[str, torch.Tensor] = {}  # Sₖ of what the passes change
        self._warned: set[str] = set()

    def begin(self, modules: NamedModules | None = None) -> None:
        """Before the first pass: remember what the tensors are; copy those a first pass changes
        (all of them, to the host, on the first two-pass step). ``modules``: the model's
        ``named_modules()`` when the caller has them."""
        self.drop()
        self._tensors = guarded_tensors(self.model, modules)
        self._marks = {name: _mark(t) for name, t in self._tensors.items()}
        if self.changed_by_first is None:
            self._census = {name: _host_copy(t) for name, t in self._tensors.items()}
        else:
            self._start = {name: self._tensors[name].detach().clone()
                           for name in self.changed_by_first if name in self._tensors}

    def before_second_pass(self) -> None:
        """After the last first pass: keep ``Sₖ`` of what changed and put ``S₀`` back."""
        if not self._tensors:
            return
        changed = {name for name, t in self._tensors.items() if _mark(t) != self._marks[name]}
        if self._census is not None:  # the first two-pass step: compare values too (``.data``)
            changed |= {name for name, t in self._tensors.items()
                        if name not in changed
                        and not torch.equal(self._census[name], t.detach().to(self._census[name].device))}
            self.changed_by_first = set(changed)
        else:
            new = sorted(changed - self.changed_by_first)
            if new:
                self._warn_new(new)
                self.changed_by_first |= set(new)
            # what a first pass changed before, even where no counter sees it (``.data``)
            changed |= self.changed_by_first & self._tensors.keys()
        to_keep = changed | (self.changed_by_second & self._tensors.keys())
        self._end = {name: self._tensors[name].detach().clone() for name in to_keep}
        with torch.no_grad():
            for name in changed:
                start = self._census[name] if self._census is not None else self._start.get(name)
                if start is not None:
                    self._tensors[name].copy_(start)
        self._start = {}
        self._marks = {name: _mark(t) for name, t in self._tensors.items()}

    def after_second_pass(self) -> None:
        """After the last second pass: everything back to ``Sₖ``; a tensor only the second pass
        changed, unknown from the first two-pass step, is an error naming it and the fix."""
        if not self._tensors:
            return
        changed = {name for name, t in self._tensors.items() if _mark(t) != self._marks[name]}
        unexpected = sorted(name for name in changed if name not in self._end)
        try:
            with torch.no_grad():
                for name, value in self._end.items():
                    self._tensors[name].copy_(value)
                if self._census is not None:
                    for name in unexpected:
                        self._tensors[name].copy_(self._census[name])
                    self.changed_by_second |= set(unexpected)
                    unexpected = []
        finally:
            self.drop()
        if unexpected:
            raise RuntimeError(
                f"the second pass of a sharpness-aware step changed {', '.join(unexpected)}, which the "
                "first pass and the first perturbed step did not, so the step cannot be kept as if it "
                f"ran once (its value before the second pass was not kept): {FIX}")

    def drop(self) -> None:
        """Forget the step in progress (its copies are freed)."""
        self._tensors, self._marks, self._start, self._end, self._census = {}, {}, {}, {}, None

    def _warn_new(self, names: list[str]) -> None:
        names = [n for n in names if n not in self._warned]
        if names:
            self._warned.update(names)
            warnings.warn(
                f"the first pass of this sharpness-aware step changed {', '.join(names)} for the first "
                "time since the first perturbed step, so its second pass saw the value after the first "
                f"(from the next step on both passes see the same); to avoid it, {FIX}", stacklevel=2)


# ----------------------------------------------------------------------------------- the batch
Leaves = list[tuple[str, torch.Tensor, torch.Tensor]]


def copy_batch(batch: Any, clone: bool | set[str] = True, path: str = "batch") -> tuple[Any, Leaves]:
    """A copy of ``batch``'s containers for the replay, and its tensors as ``(path, original,
    copy)``. ``clone`` is True (clone every tensor) or a set of paths to clone; the others are
    shared. Containers the function does not know are shared as they are.

    >>> batch = {"inputs": torch.zeros(2), "labels": torch.ones(2)}
    >>> replay, leaves = copy_batch(batch, clone={"batch['inputs']"})
    >>> labels = batch.pop("labels")
    >>> sorted(replay), replay["inputs"] is batch["inputs"], replay["labels"] is labels
    (['inputs', 'labels'], False, True)
    """
    leaves: Leaves = []

    def visit(value: Any, where: str) -> Any:
        if isinstance(value, torch.Tensor):
            copied = value
            if clone is True or where in clone:
                copied = value.detach().clone().requires_grad_(value.requires_grad)
            leaves.append((where, value, copied))
            return copied
        if isinstance(value, MutableMapping):
            copied = copy.copy(value)
            for key, item in list(value.items()):
                copied[key] = visit(item, f"{where}[{key!r}]")
            return copied
        if isinstance(value, Mapping):
            return value
        if isinstance(value, tuple):
            items = [visit(item, f"{where}[{i}]") for i, item in enumerate(value)]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        if isinstance(value, list):
            copied = copy.copy(value)
            copied[:] = [visit(item, f"{where}[{i}]") for i, item in enumerate(value)]
            return copied
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            copied = copy.copy(value)
            for item in dataclasses.fields(value):
                field_value = visit(getattr(value, item.name), f"{where}.{item.name}")
                object.__setattr__(copied, item.name, field_value)
            return copied
        return value

    return visit(batch, path), leaves


# ----------------------------------------------------------------------------------- generators
GENERATOR_TYPES = (np.random.Generator, np.random.RandomState, torch.Generator, random.Random)


#: per type: whether values of it are generators (filled as types are met)
_GENERATOR_TYPE: dict[type, bool] = {}


@functools.cache
def _may_own_generators(module_type: type) -> bool:
    """PyTorch's own layers hold no generators; every other module type (the user's, timm's) may."""
    return not module_type.__module__.startswith("torch.nn.")


def owned_generators(model: nn.Module, modules: NamedModules | None = None) -> list[Any]:
    """The random generators held as attributes of ``model`` or its submodules (``modules``:
    ``list(model.named_modules())`` when the caller has it already)."""
    found, seen, known = [], set(), _GENERATOR_TYPE
    for _, module in model.named_modules() if modules is None else modules:
        if not _may_own_generators(type(module)):
            continue
        for value in module.__dict__.values():
            value_type = type(value)
            is_generator = known.get(value_type)
            if is_generator is None:
                is_generator = known[value_type] = issubclass(value_type, GENERATOR_TYPES)
            if is_generator and id(value) not in seen:
                seen.add(id(value))
                found.append(value)
    return found


def generator_state(generator: Any) -> Any:
    if isinstance(generator, np.random.Generator):
        return generator.bit_generator.state
    if isinstance(generator, np.random.RandomState):
        return generator.get_state()
    if isinstance(generator, torch.Generator):
        return generator.get_state()
    return generator.getstate()


def set_generator_state(generator: Any, state: Any) -> None:
    if isinstance(generator, np.random.Generator):
        generator.bit_generator.state = state
    elif isinstance(generator, np.random.RandomState):
        generator.set_state(state)
    elif isinstance(generator, torch.Generator):
        generator.set_state(state)
    else:
        generator.setstate(state)


# ------------------------------------------------------------------- random streams, BatchNorm, metrics
@dataclass
class RandomState:
    """The random streams a loss computation draws from: torch (CPU and the CUDA devices given),
    numpy's and Python's global generators, and the generator objects given (those the model
    owns, see :func:`~lightning_nusam.pass_state.owned_generators`; not part of a checkpoint)."""

    torch_cpu: torch.Tensor
    cuda: dict[int, torch.Tensor]
    numpy: Any
    python: Any
    owned: list[tuple[Any, Any]] = field(default_factory=list)

    @classmethod
    def capture(cls, cuda_devices: Sequence[int] = (), generators: Sequence[Any] = ()) -> RandomState:
        return cls(torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in cuda_devices},
                   np.random.get_state(), random.getstate(), [(g, generator_state(g)) for g in generators])

    @classmethod
    def capture_all(cls) -> RandomState:
        """Every stream this process has: the CPU's and those of the CUDA devices in use."""
        in_use = torch.cuda.is_available() and torch.cuda.is_initialized()
        return cls.capture(list(range(torch.cuda.device_count())) if in_use else [])

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        for device, state in self.cuda.items():
            torch.cuda.set_rng_state(state, device)
        np.random.set_state(self.numpy)
        random.setstate(self.python)
        for generator, state in self.owned:
            set_generator_state(generator, state)

    def as_dict(self) -> dict[str, Any]:
        """For a checkpoint, in types a ``weights_only`` load accepts: ``cpu``, ``cuda`` (a list over
        the devices), ``numpy`` (its MT19937 keys as a tensor) and ``python``."""
        name, keys, position, has_gauss, cached = self.numpy
        state: dict[str, Any] = {"cpu": self.torch_cpu, "python": self.python,
                                 "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(position),
                                           int(has_gauss), float(cached)]}
        if self.cuda:
            state["cuda"] = [self.cuda[d] for d in sorted(self.cuda)]
        return state

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> RandomState:
        """The inverse of :meth:`as_dict` (checkpoints with only ``cpu``/``cuda`` leave numpy's and
        Python's generators as they are)."""
        cuda = dict(enumerate(state.get("cuda", []))) if torch.cuda.is_available() else {}
        numpy_state = np.random.get_state()
        if "numpy" in state:
            name, keys, position, has_gauss, cached = state["numpy"]
            numpy_state = (name, keys.numpy().astype(np.uint32), position, has_gauss, cached)
        python = state.get("python")
        python = random.getstate() if python is None else (python[0], tuple(python[1]), python[2])
        return cls(state["cpu"], cuda, numpy_state, python)


@contextlib.contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Run BatchNorm layers on batch statistics without updating their running statistics.

    ``track_running_stats=False`` in training mode normalises with the batch statistics, as
    before, but passes no running buffers to ``batch_norm`` and does not count the batch, so
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` stay exactly as they are.
    """
    layers = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training
    ]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


@contextlib.contextmanager
def metric_updates_undone(module: nn.Module) -> Iterator[None]:
    """Give the ``torchmetrics`` metrics inside ``module`` back the state they had on entry.

    The second pass runs the user's loss code again; a metric updated there (``self.acc(preds,
    y)`` in ``training_step``) would count every sample twice and mix the perturbed predictions
    into the clean ones. Its states, update count and cached values are put back on exit, so the
    metric holds what the first pass added. Metrics are found as submodules (attributes of the
    module, ``MetricCollection`` members); without torchmetrics installed this does nothing.
    """
    try:
        from torchmetrics import Metric
    except ImportError:
        yield
        return
    bookkeeping = ("_update_count", "_computed", "_forward_cache")
    saved = []
    for metric in module.modules():
        if isinstance(metric, Metric):
            states = {name: value.clone() if isinstance(value, torch.Tensor) else list(value)
                      for name, value in metric.metric_state.items()}
            saved.append((metric, states, {k: getattr(metric, k, None) for k in bookkeeping}))
    try:
        yield
    finally:
        for metric, states, kept in saved:
            for name, value in {**states, **kept}.items():
                setattr(metric, name, value)


# ----------------------------------------------------------------------------------- logging
def _discard(*args: Any, **kwargs: Any) -> None:
    """``self.log`` during the second pass: records nothing."""


@contextlib.contextmanager
def muted_logging(module: nn.Module) -> Iterator[None]:
    """``module.log`` (and ``log_dict``, which calls it) records nothing inside the context, when
    ``module`` is a LightningModule; the module's own method is back on exit. (Lightning is not
    imported here: a LightningModule exists only once ``lightning.pytorch`` has been loaded.)"""
    lightning = sys.modules.get("lightning.pytorch")
    if lightning is None or not isinstance(module, lightning.LightningModule) or "log" in vars(module):
        yield
        return
    module.log = _discard  # an attribute of this instance, over the class's method
    try:
        yield
    finally:
        del module.log
