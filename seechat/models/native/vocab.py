"""Image codes <-> LM vocabulary ids: the codebook sits right after the text vocabulary.

With a text vocabulary of `offset` ids (tokenizer, seechat's special tokens and the image
boundary tokens included) and a codebook of `size` codes, code c is id `offset + c`; the LM's
vocabulary is `offset + size`. Anything outside those ranges is an error, never a silent wrap.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CodeVocab:
    offset: int
    size: int

    def __post_init__(self) -> None:
        if self.offset < 0 or self.size < 1:
            raise ValueError(f"CodeVocab needs offset >= 0 and size >= 1, got offset={self.offset}, size={self.size}")

    @property
    def vocab_size(self) -> int:
        """The LM's vocabulary: text ids, then one id per code."""
        return self.offset + self.size

    def to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes in [0, size) -> vocabulary ids in [offset, offset + size)."""
        self._check(codes, 0, self.size, "codes")
        return codes.long() + self.offset

    def to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids in [offset, offset + size) -> codes in [0, size)."""
        self._check(ids, self.offset, self.vocab_size, "image code ids")
        return ids.long() - self.offset

    def is_code(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.offset) & (ids < self.vocab_size)

    def code_mask(self) -> torch.Tensor:
        """Boolean [vocab_size]: True at the image-code ids."""
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        mask[self.offset :] = True
        return mask

    @staticmethod
    def _check(values: torch.Tensor, low: int, high: int, what: str) -> None:
        if values.is_floating_point():
            raise TypeError(f"{what} must be integers, got {values.dtype}")
        if values.numel() and (int(values.min()) < low or int(values.max()) >= high):
            bad = values[(values < low) | (values >= high)].flatten()[:5].tolist()
            raise ValueError(f"{what} must lie in [{low}, {high}); out of range: {bad}")
