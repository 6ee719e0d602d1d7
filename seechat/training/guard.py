"""The non-finite guard of the training loop: a step whose loss or gradient norm is NaN/inf is
not applied (the optimizer does not step, gradients are zeroed) and is counted; after
`max_in_a_row` such steps in a row the run stops, since the weights will not recover alone."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from accelerate import Accelerator


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class NonFiniteGuard:
    def __init__(self, max_in_a_row: int) -> None:
        if max_in_a_row < 1:
            raise ValueError(f"train.max_nonfinite_steps must be >= 1, got {max_in_a_row}")
        self.max_in_a_row = max_in_a_row
        self.total = 0
        self.in_a_row = 0
        self.first_bad_step: int | None = None

    @staticmethod
    def is_finite(accelerator: Accelerator, losses: Sequence[torch.Tensor], grad_norm: torch.Tensor | float) -> bool:
        """True when every loss of this update and the gradient norm are finite on every
        process (one collective, so all processes skip or step together)."""
        local = all(bool(torch.isfinite(loss).all()) for loss in losses) and math.isfinite(float(grad_norm))
        flag = torch.tensor([0.0 if local else 1.0], device=accelerator.device)
        return float(accelerator.reduce(flag, reduction="sum").item()) == 0.0

    def update(self, finite: bool, step: int) -> str | None:
        """Count this update; returns the stop message once `max_in_a_row` is reached."""
        if finite:
            self.in_a_row = 0
            return None
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row == 1:
            self.first_bad_step = step
        if self.in_a_row < self.max_in_a_row:
            return None
        return (
            f"stopping: the loss or gradient norm was NaN/inf for {self.in_a_row} steps in a row "
            f"(steps {self.first_bad_step}-{step}; train.max_nonfinite_steps={self.max_in_a_row}). Those "
            "updates were not applied. Lower train.lr, set train.max_grad_norm, check the data of those "
            "steps, or try mixed_precision=no."
        )
