"""Training core: one loop for every family (EMA, clipping, autocast, DDP, exact resume)."""

from fastsample.train.loop import (StepContext, TrainConfig, TrainingError, TrainingInterrupted,
                                   train)

__all__ = ["StepContext", "TrainConfig", "TrainingError", "TrainingInterrupted", "train"]
