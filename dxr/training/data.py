"""Resumable, distributed data order and per-step seeding.

Each rank reads an endless stream of samples: epoch e is a permutation of the dataset drawn from
(seed, e), padded to a multiple of the world size and dealt out round-robin (as
``torch.utils.data.DistributedSampler`` does); the stream is cut into batches, one per training step.
So the batch of step s is a function of (seed, s, rank, world size): resuming at step s is starting
the stream there. Every item carries a seed drawn from (seed, epoch, position) under which the dataset
does its own random work (augmentation, unpaired partners), whatever the number of loader workers.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def mixed_seed(*values: int) -> int:
    """A 63-bit seed that mixes ``values`` thoroughly (nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed torch's global generators (CPU and every GPU) for one training step of one rank."""
    torch.manual_seed(mixed_seed(seed, rank, step))


class StepBatches(Sampler):
    """Batches of ``(index, item_seed)`` pairs for steps ``start``, ``start + 1``, … (endless).

    ``dataset_size`` items; this rank's share of each epoch is ⌈dataset_size / world_size⌉ items.
    Raises ValueError for an empty dataset or a bad rank.
    """

    def __init__(self, dataset_size: int, batch_size: int, *, seed: int, start: int = 0, rank: int = 0,
                 world_size: int = 1):
        if dataset_size < 1:
            raise ValueError("the dataset is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        self.size, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.start, self.rank, self.world_size = start, rank, world_size
        self.per_rank = math.ceil(dataset_size / world_size)

    def _epoch(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(mixed_seed(self.seed, epoch))
        order = torch.randperm(self.size, generator=generator).tolist()
        order += order[: self.per_rank * self.world_size - self.size]  # pad so every rank gets as many
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        position = self.start * self.batch_size  # in this rank's stream
        epoch, cached = -1, []
        while True:
            batch = []
            for _ in range(self.batch_size):
                e, j = divmod(position, self.per_rank)
                if e != epoch:
                    epoch, cached = e, self._epoch(e)
                batch.append((cached[j], mixed_seed(self.seed, e, j * self.world_size + self.rank)))
                position += 1
            yield batch

    def state(self) -> dict:
        """What the data order depends on besides the step (checked when resuming)."""
        return {"dataset_size": self.size, "batch_size": self.batch_size, "world_size": self.world_size}


class SeededItems(Dataset):
    """``dataset[index]`` computed under torch's global generator seeded with the item's seed, leaving
    the caller's generator state as it was."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


__all__ = ["StepBatches", "SeededItems", "seed_step", "mixed_seed"]
