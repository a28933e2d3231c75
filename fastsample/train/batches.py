"""Batches for the training loop: draws with replacement from a Dataset through the loop's
generator, so the data order is part of the resumable state."""

from __future__ import annotations

from typing import Callable

import torch

from fastsample.data import Dataset, dequantize_digits


def batch_sampler(data: Dataset, dequantize: bool) -> Callable[[int, torch.Generator], torch.Tensor]:
    x = data.x
    if x.shape[0] == 0:
        raise ValueError(f"data set {data.name!r} is empty")

    def sample(n: int, g: torch.Generator) -> torch.Tensor:
        b = x[torch.randint(x.shape[0], (n,), generator=g)]
        # Fresh dequantisation noise every step: the model sees a continuous density.
        return dequantize_digits(b, g) if dequantize else b

    return sample
