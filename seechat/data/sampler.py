"""Length-grouped sampling: batches of similar length, so little of each batch is padding.

Indices are shuffled, cut into mega-batches of `batch_size * mega_batch_mult`, and sorted by
length inside each mega-batch; consecutive `batch_size` chunks then hold similar lengths while
the order across the epoch stays random. The order depends only on `seed` and the epoch.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """Yields every index of `lengths` once per epoch, grouped by length (see module docstring).
    Call `set_epoch(epoch)` before each epoch for a new order."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        mega_batch_mult: int = 50,
    ) -> None:
        if batch_size < 1 or mega_batch_mult < 1:
            raise ValueError(f"batch_size ({batch_size}) and mega_batch_mult ({mega_batch_mult}) must be >= 1")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        # A local generator: the order must not depend on (or disturb) the global RNG state.
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        size = self.batch_size * self.mega_batch_mult
        grouped: list[int] = []
        for start in range(0, len(order), size):
            mega = order[start : start + size]
            grouped.extend(sorted(mega, key=lambda i: self.lengths[i], reverse=True))
        if grouped:
            # Put the longest sample in the first batch, so an out-of-memory batch size fails
            # at step one instead of hours into the epoch.
            longest = max(range(len(grouped)), key=lambda p: self.lengths[grouped[p]])
            grouped[0], grouped[longest] = grouped[longest], grouped[0]
        return iter(grouped)
