"""Parameters sharded by rows (FSDP2's DTensors): local views and the reductions they need.

Under ``torch.distributed.fsdp.fully_shard`` a parameter (and its ``.grad``) is a ``DTensor``
with its global shape, ``Shard(0)`` over a 1-D device mesh: each rank holds a contiguous block
of rows, in ``torch.chunk`` order. The perturbations work on the local block (``to_local()``,
which shares storage, so in-place updates reach the parameter) and all-reduce only what spans
the rows: the m-vector ``Gᵀu`` of the power iteration and squared norms. Nothing here gathers
a matrix or a gradient.

Data-parallel replicas (DDP) are the other case: every process holds the whole parameter and its
own gradient. :func:`average_over` averages small tensors over them (νSAM's power-iteration
products, SAM-ON's few gradients) in one collective call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

try:  # torch >= 2.4 has the public DTensor API
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - older torch
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(tensor: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank-local block of a DTensor (sharing its storage); a plain tensor as is."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


@dataclass(frozen=True)
class RowSharding:
    """Where this rank's rows of a row-sharded parameter sit in the full parameter."""

    group: dist.ProcessGroup
    world_size: int
    rank: int
    rows: int  # global rows
    offset: int  # first local row
    local_rows: int

    @property
    def row_slice(self) -> slice:
        return slice(self.offset, self.offset + self.local_rows)


def row_sharding(name: str, parameter: torch.Tensor) -> RowSharding | None:
    """``None`` for a plain (or replicated) parameter, else how its rows are split.

    Raises ``ValueError`` for a layout the perturbations cannot handle without gathering
    (anything but ``Shard(0)`` or ``Replicate()`` on a 1-D mesh).
    """
    if not is_dtensor(parameter):
        return None
    mesh, placements = parameter.device_mesh, parameter.placements
    if mesh.ndim != 1 or len(placements) != 1:
        raise ValueError(
            f"parameter {name!r} is a DTensor on a {mesh.ndim}-D mesh with placements {placements}; "
            "only row sharding (Shard(0), as fully_shard makes) or replication on a 1-D mesh is supported"
        )
    placement = placements[0]
    if isinstance(placement, Replicate):
        return None
    if not (isinstance(placement, Shard) and placement.dim == 0):
        raise ValueError(
            f"parameter {name!r} is sharded as {placement}; the perturbations need rows (Shard(0))"
        )
    world_size, rank = mesh.size(), mesh.get_local_rank()
    rows = parameter.shape[0]
    chunk = math.ceil(rows / world_size)
    offset = min(rank * chunk, rows)
    local_rows = local(parameter).shape[0]
    return RowSharding(mesh.get_group(), world_size, rank, rows, offset, local_rows)


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """In-place sum over the ranks of ``group`` (a no-op without one)."""
    if group is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def average_over(group: dist.ProcessGroup, tensors: list[torch.Tensor]) -> None:
    """Replace each tensor by its mean over the processes of ``group`` (data-parallel replicas),
    with one ``all_reduce`` per dtype: the tensors are concatenated into one flat buffer."""
    world_size = dist.get_world_size(group)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for same in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(world_size)
        offset = 0
        for tensor in same:
            tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def all_gather_rows(local_rows: torch.Tensor, sharding: RowSharding) -> torch.Tensor:
    """Join the ranks' row blocks of a small ``(rows_local, ...)`` tensor (used for vectors only)."""
    chunk = math.ceil(sharding.rows / sharding.world_size)
    padded = local_rows.new_zeros((chunk, *local_rows.shape[1:]))
    padded[: local_rows.shape[0]] = local_rows
    gathered = [torch.empty_like(padded) for _ in range(sharding.world_size)]
    dist.all_gather(gathered, padded, group=sharding.group)
    return torch.cat(gathered)[: sharding.rows]
