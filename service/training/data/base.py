"""What every task's data provides to the model and the training loop."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import lightning as L


@dataclass(frozen=True)
class Problem:
    """The shape of a task, as the model and the LightningModule need it.

    Batches are ``(x, y)`` for fixed-length tasks and ``(x, y, lengths)`` for
    variable-length ones (``lengths``: LongTensor[B] on the CPU, x right-padded):

    - tokens / every_step / cross_entropy (char_lm): x Long[B, T], y Long[B, T]
    - features / last_step / mse (forecast): x Float[B, lookback, 1], y Float[B, horizon]
    - features / last_step / cross_entropy (classify): x Float[B, T, F], y Long[B], lengths
    - features / last_step / mse (adding): x Float[B, T, 2], y Float[B, 1]
    """

    input_kind: Literal["tokens", "features"]
    #: Vocabulary size (tokens) or features per time step.
    input_size: int
    #: Vocabulary size, forecast horizon, number of classes, or 1.
    output_size: int
    readout: Literal["every_step", "last_step"]
    loss: Literal["cross_entropy", "mse"]
    #: The validation metric trials are ranked by (``search_space.TASK_METRICS``): ``val_rmse``...
    metric: str
    #: forecast: targets are standardised; RMSE on the original scale = RMSE * target_scale.
    target_scale: float = 1.0


@dataclass(frozen=True)
class TaskData:
    """A task's data, ready to train on."""

    problem: Problem
    datamodule: L.LightningDataModule
    #: Trivial predictors' metric values on the validation and test splits, by name,
    #: e.g. {"unigram": 3.05} or {"naive": 41.2, "seasonal_naive": 35.1}.
    val_baselines: Mapping[str, float] = field(default_factory=dict)
    test_baselines: Mapping[str, float] = field(default_factory=dict)
    #: The baseline a trained model must beat to have learned anything (a key of the above).
    primary_baseline: str = ""
    #: One line for humans: what was loaded, sizes of the splits.
    description: str = ""
