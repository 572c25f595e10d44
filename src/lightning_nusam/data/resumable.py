"""A data order that survives a restart: resuming mid-epoch continues with the very next batch.

The order of epoch ``e`` is a function of ``(seed, e)`` only, and the loader reports how many
batches of the current epoch it has handed out. Lightning saves that count with the checkpoint
(any loader with ``state_dict``/``load_state_dict`` is resumable for it) and hands it back on
restart; the sampler then skips the indices already seen, without loading their samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler


class ResumableSampler(DistributedSampler):
    """Indices of epoch ``e`` permuted by a generator seeded with ``seed + e``, split by rank.

    It is a :class:`~torch.utils.data.distributed.DistributedSampler` (same order and padding),
    so Lightning keeps it under DDP instead of swapping in its own; the number of replicas and the
    rank are read from ``torch.distributed`` when it is initialised, else 1 and 0.

    Example:
        >>> sampler = ResumableSampler(range(6), seed=0)
        >>> sampler.set_epoch(1); first = list(sampler)
        >>> sampler.skip_samples(epoch=1, count=2); list(sampler) == first[2:]
        True
    """

    def __init__(
        self,
        dataset: Sized,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        # DistributedSampler.__init__ insists on an initialised process group; resolve lazily.
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = False
        self.epoch = 0
        self._fixed_replicas, self._fixed_rank = num_replicas, rank
        self._skip_epoch: int | None = None
        self._skip_count = 0

    @property
    def num_replicas(self) -> int:  # type: ignore[override]
        if self._fixed_replicas is not None:
            return self._fixed_replicas
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @num_replicas.setter
    def num_replicas(self, value: int) -> None:
        self._fixed_replicas = value

    @property
    def rank(self) -> int:  # type: ignore[override]
        if self._fixed_rank is not None:
            return self._fixed_rank
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @rank.setter
    def rank(self, value: int) -> None:
        self._fixed_rank = value

    @property
    def num_samples(self) -> int:  # type: ignore[override]
        return math.ceil(len(self.dataset) / self.num_replicas)

    @num_samples.setter
    def num_samples(self, value: int) -> None:  # set by DistributedSampler code paths; derived here
        pass

    @property
    def total_size(self) -> int:  # type: ignore[override]
        return self.num_samples * self.num_replicas

    @total_size.setter
    def total_size(self, value: int) -> None:
        pass

    def skip_samples(self, epoch: int, count: int) -> None:
        """Make the next iteration over ``epoch`` start after its first ``count`` samples."""
        self._skip_epoch, self._skip_count = int(epoch), int(count)

    def epoch_indices(self) -> list[int]:
        """This rank's indices of the current epoch, in order, before any skipping."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = torch.randperm(len(self.dataset), generator=generator).tolist()
        else:
            indices = list(range(len(self.dataset)))
        padding = self.total_size - len(indices)
        indices += (indices * math.ceil(padding / max(len(indices), 1)))[:padding]
        return indices[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices()
        if self._skip_epoch == self.epoch:
            indices = indices[self._skip_count :]
        self._skip_epoch, self._skip_count = None, 0
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` over a :class:`ResumableSampler` that Lightning
    can checkpoint: ``state_dict()`` holds the epoch and the batches handed out in it.

    The loader's own generator (seeded with ``seed``) seeds its workers, so creating an iterator
    never draws from the global RNG (which would shift dropout masks after a resume).

    Example:
        >>> loader = ResumableDataLoader(list(range(10)), batch_size=4, seed=0)
        >>> it = iter(loader); _ = next(it)
        >>> state = loader.state_dict()
        >>> resumed = ResumableDataLoader(list(range(10)), batch_size=4, seed=0)
        >>> resumed.load_state_dict(state)
        >>> [b.tolist() for b in resumed] == [b.tolist() for b in it]
        True
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if "sampler" in kwargs or "batch_sampler" in kwargs:
            raise ValueError("ResumableDataLoader builds its own sampler; do not pass `sampler`")
        kwargs.setdefault("generator", torch.Generator().manual_seed(int(seed)))
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=ResumableSampler(dataset, shuffle=shuffle, seed=seed),  # type: ignore[arg-type]
            **kwargs,
        )
        self._batches_seen = 0

    def __iter__(self) -> Iterator[Any]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        skipped = sampler._skip_count if sampler._skip_epoch == sampler.epoch else 0
        self._batches_seen = skipped // self.batch_size if self.batch_size else 0
        for batch in super().__iter__():
            self._batches_seen += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        return {"epoch": sampler.epoch, "batches_seen": self._batches_seen, "seed": sampler.seed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        if int(state_dict["seed"]) != sampler.seed:
            raise ValueError(
                f"the checkpoint's data order used seed {state_dict['seed']}, this loader uses "
                f"{sampler.seed}; pass the same `seed` to resume the same order"
            )
        sampler.set_epoch(int(state_dict["epoch"]))
        seen = int(state_dict["batches_seen"]) * (self.batch_size or 1)
        sampler.skip_samples(int(state_dict["epoch"]), seen)
