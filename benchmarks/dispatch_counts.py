"""Count what a piece of PyTorch code asks of a device: ATen kernels, bytes, host synchronisations.

A :class:`DispatchCounter` (a ``TorchDispatchMode``) sees every ATen call below autograd. On a
GPU a memory-bound step costs about the largest of its bytes over the memory bandwidth, its
kernel launches times a few µs, and its host time, plus a pipeline drain at every host
synchronisation; these inputs are exact on a CPU, so they are counted here instead of timed:

- **kernels**: ATen calls that compute (views, ``detach`` and ``empty*`` allocations excluded;
  a ``_foreach_*`` call counts once);
- **bytes**: per kernel, the memory footprint of its tensor inputs (read) and outputs (written);
  the destination of a pure write (``copy_``, ``fill_``, ``zero_``, random fills) is not read;
- **host syncs**: calls whose result the host must wait for: ``_local_scalar_dense`` (``.item()``,
  ``bool(t)``, ``float(t)``), ``nonzero``, ``masked_select``, boolean-mask indexing and other ops
  with data-dependent output shapes, ``equal``/``is_nonzero``, and tensors made from Python data
  (``lift_fresh``: ``torch.tensor(list)``, a host-to-device copy on a GPU). Each is recorded with
  the innermost source line outside torch.

Example:
    >>> import torch
    >>> x = torch.randn(8)
    >>> with DispatchCounter() as counter:
    ...     y = x.mul(2).add_(1)
    ...     _ = float(y.sum())
    >>> counter.kernels, counter.syncs
    (3, 1)
"""

from __future__ import annotations

import collections
import os
import traceback
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

#: Calls that make the host wait for the device (or, for ``lift_fresh``, copy host data to it).
SYNC_OPS = frozenset({
    aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default,
    aten.nonzero.default, aten.nonzero.out, aten.masked_select.default, aten.argwhere.default,
    aten.unique_consecutive.default, aten._unique2.default, aten.repeat_interleave.Tensor,
    aten.lift_fresh.default, aten.lift_fresh_copy.default, aten.allclose.default,
})
#: Allocations without a kernel.
NO_KERNEL_OPS = frozenset({
    aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
    aten.new_empty.default, aten.new_empty_strided.default, aten.detach.default, aten.alias.default,
    aten.lift_fresh.default, aten.lift_fresh_copy.default, aten._local_scalar_dense.default,
})
#: Ops that overwrite their first argument without reading it.
WRITE_ONLY_OPS = frozenset({
    aten.copy_.default, aten.fill_.Scalar, aten.fill_.Tensor, aten.zero_.default,
    aten.normal_.default, aten.uniform_.default, aten._foreach_copy_.default,
    aten._foreach_zero_.default, aten.index_copy_.default, aten.index_put_.default,
})
_TORCH_DIR = os.path.dirname(torch.__file__)


def footprint(tensor: torch.Tensor) -> int:
    """Bytes a kernel touches to read or write ``tensor`` once (an expanded dimension once)."""
    if tensor.numel() == 0:
        return 0
    strides = zip(tensor.shape, tensor.stride(), strict=True)
    span = 1 + sum((size - 1) * abs(stride) for size, stride in strides)
    return min(span, tensor.numel()) * tensor.element_size()


def _is_view(func: torch._ops.OpOverload) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _tensors(value: object) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


def _is_bool_index(func: torch._ops.OpOverload, args: tuple) -> bool:
    """``t[mask]`` / ``t[mask] = x``: a boolean index becomes ``nonzero`` (a sync) inside the op."""
    if func not in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
        return False
    return any(t.dtype == torch.bool for t in _tensors(args[1]))


def _source_line() -> str:
    """The innermost frame of the call stack outside torch and this file."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if not frame.filename.startswith(_TORCH_DIR) and frame.filename != __file__:
            return f"{os.path.relpath(frame.filename)}:{frame.lineno} {frame.name}"
    return "?"


@dataclass
class DispatchCounter(TorchDispatchMode):
    """Counts kernels, bytes and host syncs of the ATen calls made while it is active."""

    kernels: int = 0
    bytes: int = 0
    syncs: int = 0
    ops: collections.Counter = field(default_factory=collections.Counter)
    sync_sources: collections.Counter = field(default_factory=collections.Counter)

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in SYNC_OPS or _is_bool_index(func, args):
            self.syncs += 1
            self.sync_sources[f"{func.__name__} at {_source_line()}"] += 1
        if func in NO_KERNEL_OPS or _is_view(func):
            return out
        self.kernels += 1
        self.ops[func.__name__] += 1
        inputs = _tensors((args, kwargs))
        mutated = [t for argument, value in zip(func._schema.arguments, args, strict=False)
                   if argument.alias_info is not None and argument.alias_info.is_write
                   for t in _tensors(value)]
        if func in WRITE_ONLY_OPS:  # the destination is written, not read
            written = {id(t) for t in mutated}
            inputs = [t for t in inputs if id(t) not in written]
        outputs = {id(t): t for t in [*mutated, *_tensors(out)]}  # an in-place result once
        self.bytes += sum(footprint(t) for t in inputs) + sum(footprint(t) for t in outputs.values())
        return out

    def summary(self) -> dict[str, object]:
        return {"kernels": self.kernels, "bytes": self.bytes, "syncs": self.syncs,
                "sync_sources": dict(self.sync_sources), "ops": dict(self.ops.most_common())}
