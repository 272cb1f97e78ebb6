"""What every task's data provides to the model and the training loop."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, TensorDataset


@dataclass(frozen=True)
class Problem:
    """The shape of a task, as the model and the LightningModule need it.

    Batches are ``(x, y)`` for fixed-length tasks, ``(x, y, lengths)`` for
    variable-length ones (``lengths``: LongTensor[B] on the CPU, x right-padded) and
    ``(x, y, anchor)`` for log-transformed forecasts (see :func:`split_batch`):

    - tokens / every_step / cross_entropy (char_lm): x Long[B, T], y Long[B, T]
    - features / last_step / mse (forecast): x Float[B, lookback, 1], y Float[B, horizon],
      with ``target_transform="log"`` also anchor Float[B, 1]
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
    #: forecast with ``task.transform: log``: targets are standardised logs, relative to a
    #: per-window anchor (the batch's third tensor); a value on the original scale is
    #: ``exp((y + anchor) * target_scale + target_offset)`` (:meth:`to_original`).
    target_transform: Literal["none", "log"] = "none"
    target_offset: float = 0.0

    def to_original(self, y: torch.Tensor, anchor: torch.Tensor | None) -> torch.Tensor:
        """Predictions or targets ``y`` (Float[B, horizon], standardised) on the original
        scale; ``anchor`` (Float[B, 1]) is required with ``target_transform="log"``."""
        return self.in_metric_units(y, anchor) * self.metric_unit

    @property
    def metric_unit(self) -> float:
        """What one of :meth:`in_metric_units` is on the original scale: the training
        split's sd (none) or geometric mean (log)."""
        if self.target_transform == "none":
            return self.target_scale
        return math.exp(self.target_offset)

    def in_metric_units(self, y: torch.Tensor, anchor: torch.Tensor | None) -> torch.Tensor:
        """``y`` on the original scale divided by :attr:`metric_unit`: errors of a series of
        1e21 square without overflowing float32 (an RMSE is multiplied back once)."""
        if self.target_transform == "none":
            return y
        if anchor is None:
            raise ValueError("a log-transformed forecast needs each window's anchor")
        return torch.exp((y + anchor) * self.target_scale)


@dataclass(frozen=True)
class Batch:
    """A batch's tensors by role: see :class:`Problem` for the shapes."""

    x: torch.Tensor
    y: torch.Tensor
    lengths: torch.Tensor | None = None
    anchor: torch.Tensor | None = None


def split_batch(problem: Problem, batch: Sequence[torch.Tensor]) -> Batch:
    """``batch`` as the data module made it, its optional third tensor named by ``problem``:
    the anchors of a log-transformed forecast, else variable lengths."""
    x, y = batch[0], batch[1]
    third = batch[2] if len(batch) > 2 else None
    if problem.target_transform == "log":
        return Batch(x, y, anchor=third)
    return Batch(x, y, lengths=third)


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


class InMemoryDataModule(L.LightningDataModule):
    """Train / val / test datasets already in memory; only train is shuffled.

    ``num_workers=0``: the tensors are in memory, so loader processes would only add start-up
    cost. The shuffle order comes from torch's global RNG, which ``seed_everything`` sets.

    ``train_on_val`` (a refit, :func:`service.training.fit.refit_config`): the training
    loader serves the train and validation splits together (shuffled together; char_lm's
    stateful streams are one stream over both texts). Validation then scores data the
    model has trained on.
    """

    #: Train on train + validation (a refit); the splits themselves do not change.
    train_on_val: bool = False

    def __init__(
        self,
        train: Dataset[Any] | tuple[torch.Tensor, ...],
        val: Dataset[Any] | tuple[torch.Tensor, ...],
        test: Dataset[Any] | tuple[torch.Tensor, ...],
        batch_size: int,
        *,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self._collate_fn = collate_fn
        self._train, self._val, self._test = (
            TensorDataset(*split) if isinstance(split, tuple) else split
            for split in (train, val, test)
        )

    def _loader(self, dataset: Dataset[Any], shuffle: bool) -> DataLoader[Any]:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=self._collate_fn,
            num_workers=0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader[Any]:
        if self.train_on_val:
            return self._loader(ConcatDataset([self._train, self._val]), shuffle=True)
        return self._loader(self._train, shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader(self._val, shuffle=False)

    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader(self._test, shuffle=False)
