"""A minimal, resumable minibatch iterator over in-memory tensors.

Faster than ``torch.utils.data.DataLoader`` for data that fits in memory, and its whole state
(shuffling generator, current permutation, position) goes into checkpoints, so a run resumed in
the middle of an epoch sees exactly the batches it would have seen.

In a data-parallel run every rank holds the same loader (same seed, same state) and so draws
the same global batches; the trainer gives each rank its equal slice of every batch
(:meth:`kfqn.runner.distributed.DistContext.shard`), which is what a ``DistributedSampler``
over each batch would do, exactly. The loader's position therefore counts global batches, and a
checkpoint resumes under any number of ranks.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
from torch.utils.data import TensorDataset


class BatchLoader:
    """Shuffled minibatches of ``dataset`` (a TensorDataset) from a seeded generator."""

    def __init__(self, dataset: TensorDataset, batch_size: int, shuffle: bool = True,
                 drop_last: bool = True, seed: int = 0) -> None:
        self.tensors = dataset.tensors
        self.n = len(dataset)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last and self.n >= batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._perm: Optional[torch.Tensor] = None
        self._pos = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.n // self.batch_size
        return -(-self.n // self.batch_size)

    @property
    def position(self) -> int:
        """Batches of the current epoch already handed out (0 between epochs)."""
        return -(-self._pos // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """The rest of the current epoch (a fresh epoch when none is in progress)."""
        if self._perm is None:
            self._perm = (torch.randperm(self.n, generator=self.generator) if self.shuffle
                          else torch.arange(self.n))
            self._pos = 0
        need = self.batch_size if self.drop_last else 1
        while self._pos + need <= self.n:
            idx = self._perm[self._pos:self._pos + self.batch_size]
            self._pos += len(idx)
            dev_idx = idx.to(self.tensors[0].device)
            yield tuple(t[dev_idx] for t in self.tensors)
        self._perm, self._pos = None, 0

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "perm": self._perm, "pos": self._pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._perm, self._pos = state["perm"], state["pos"]


def eval_batches(dataset: TensorDataset, batch_size: int,
                 limit: Optional[int] = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """The first ``limit`` samples (all by default) in order, in batches of ``batch_size``."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for start in range(0, n, batch_size):
        yield tuple(t[start:min(start + batch_size, n)] for t in dataset.tensors)
