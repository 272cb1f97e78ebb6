"""The LightningModule that trains a :class:`~service.training.model.StackedLSTM`.

Thin on purpose: the network lives in ``model.py``, the data in a DataModule, gradient
clipping in the Trainer (``gradient_clip_val``), early stopping and pruning in callbacks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, cast

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.regression import MeanSquaredError

from service.search_space import CLASSIFY_LOSS_METRIC, TASK_METRICS, LSTMConfig
from service.training.data.base import Problem, split_batch
from service.training.model import RecurrentState, StackedLSTM, detach_state

STAGES = ("train", "val", "test")
_LN2 = math.log(2)
# Every metric a task can be ranked by (a kind's, or one its ``metric`` field chooses).
_METRIC_DIRECTIONS = {m.name: m.direction for m in (*TASK_METRICS.values(), CLASSIFY_LOSS_METRIC)}


class DivergedError(RuntimeError):
    """Training diverged: the training loss became NaN or infinite."""

    def __init__(self, step: int, epoch: int, loss: float) -> None:
        self.step = step
        self.epoch = epoch
        self.loss = loss
        super().__init__(
            f"training diverged: loss is {loss} at global step {step} (epoch {epoch}); "
            "try a lower learning rate or gradient clipping"
        )


def _accuracy(problem: Problem) -> Metric:
    # validate_args=False: the argument checks cost a device sync on every update.
    return MulticlassAccuracy(problem.output_size, average="micro", validate_args=False)


class ScaledRMSE(MeanSquaredError):
    """RMSE of values given in units of ``unit``, reported in the original units:
    RMSE(u * a, u * b) = u * RMSE(a, b), so squares stay within float32 for any series."""

    def __init__(self, unit: float) -> None:
        super().__init__(squared=False)
        self.unit = unit

    def compute(self) -> Tensor:
        """The epoch's RMSE in the original units."""
        value: Tensor = super().compute()
        return value * self.unit


#: Metric name (the problem's metric without ``val_``) -> a fresh epoch accumulator for it.
_METRICS: Mapping[str, Callable[[Problem], Metric]] = {
    "rmse": lambda problem: ScaledRMSE(problem.metric_unit),
    "mse": lambda problem: MeanSquaredError(),
    "acc": _accuracy,
}


class LSTMLightningModule(L.LightningModule):
    """Trains a :class:`StackedLSTM` for one :class:`Problem` with one :class:`LSTMConfig`.

    Takes plain dicts (``LSTMConfig.model_dump()``, ``dataclasses.asdict(Problem)``) so that
    ``save_hyperparameters()`` stores them in checkpoints and ``load_from_checkpoint`` can
    rebuild the module; :meth:`from_config` builds one from the typed objects. ``task`` (the
    resolved task spec, a dict) is not used here: it is kept in the checkpoint's
    hyperparameters so that the checkpoint says what it was trained on (`lstm-hpo train
    --evaluate` needs no config for it); None in checkpoints written before it was kept.

    Logged per epoch, for ``stage`` in train / val / test: ``{stage}_loss`` (mean per
    prediction: per character for a language model), ``{stage}_bpc`` (cross-entropy
    every-step problems), and the problem's metric: ``{stage}_rmse`` (original scale),
    ``{stage}_mse`` or ``{stage}_acc``. ``train_loss`` is also logged per step (``train_loss``
    / ``train_loss_step``); the other training metrics are logged in ``on_train_epoch_end``.
    """

    def __init__(
        self,
        params: Mapping[str, Any],
        problem: Mapping[str, Any],
        task: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = LSTMConfig.model_validate(dict(params))
        self.problem = Problem(**problem)
        self.model = StackedLSTM(self.problem, self.config)
        self._reports_bpc = (
            self.problem.loss == "cross_entropy" and self.problem.readout == "every_step"
        )
        #: The problem's metric without its stage prefix (rmse | mse | acc), if it has one.
        self._metric_name: str | None = None
        self.metrics = nn.ModuleDict()
        for name, make in _METRICS.items():
            if self.problem.metric == f"val_{name}":
                self._metric_name = name
                for stage in STAGES:
                    self.metrics[f"{stage}_{name}"] = make(self.problem)
        # Training loss accumulated over the epoch, for train_bpc (see _common_step).
        self._train_loss_sum = torch.zeros(())
        self._train_count = 0
        #: ``stateful``: the recurrent state each stage carries from batch to batch (each
        #: stage its own: validation runs inside a training epoch), reset at epoch start.
        self._states: dict[str, RecurrentState | None] = {}

    @classmethod
    def from_config(cls, problem: Problem, params: LSTMConfig) -> LSTMLightningModule:
        """Build the module from the typed problem and config."""
        return cls(params=params.model_dump(), problem=dataclasses.asdict(problem))

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """The model's outputs: logits or regression values (see :class:`StackedLSTM`)."""
        out: Tensor = self.model(x, lengths)
        return out

    def _common_step(self, batch: Sequence[Tensor], stage: str) -> Tensor:
        parts = split_batch(self.problem, batch)
        x, y, lengths = parts.x, parts.y, parts.lengths
        if self.config.stateful:
            # Truncated BPTT: start from where the previous batch ended, stop the gradient there.
            out, state = self.model.forward_stateful(x, self._states.get(stage))
            self._states[stage] = detach_state(state)
        else:
            out = self.model(x, lengths)
        if self.problem.readout == "every_step":
            if lengths is not None:
                # Padding positions are neither trained on nor scored.
                steps = torch.arange(x.shape[1], device=out.device)
                valid = steps[None, :] < lengths.to(out.device)[:, None]
                out, y = out[valid], y[valid]
            else:
                out = out.flatten(0, 1)
                y = y.flatten(0, 1)
        n = out.shape[0]  # predictions in this batch: the weight of its loss in the epoch mean

        if self.problem.loss == "cross_entropy":
            loss = F.cross_entropy(out, y)
        else:
            y = y.reshape(out.shape).to(out.dtype)  # never broadcast [B, 1] against [B]
            loss = F.mse_loss(out, y)

        metric = self._update_metric(stage, out.detach(), y, parts.anchor)
        if stage == "train":
            # A self.log call costs ~0.5 ms on a CPU (Lightning re-homes its whole result record
            # each time), as much as the rest of its per-step overhead; so a training step logs
            # only train_loss and the other training metrics are logged at epoch end.
            self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
            self._train_loss_sum = self._train_loss_sum + loss.detach() * n
            self._train_count += n
            return loss
        name = f"{stage}_loss"
        self.log(name, loss, on_step=False, on_epoch=True, prog_bar=stage == "val", batch_size=n)
        if self._reports_bpc:
            self.log(f"{stage}_bpc", loss / _LN2, on_step=False, on_epoch=True, batch_size=n)
        if metric is not None:
            name = f"{stage}_{self._metric_name}"
            self.log(name, metric, on_step=False, on_epoch=True, batch_size=y.shape[0])
        return loss

    def _update_metric(
        self, stage: str, out: Tensor, y: Tensor, anchor: Tensor | None
    ) -> Metric | None:
        if self._metric_name is None:
            return None
        metric = cast(Metric, self.metrics[f"{stage}_{self._metric_name}"])
        if self._metric_name == "rmse":
            # The epoch's squared errors on the original scale (not the standardised,
            # perhaps logged one) in metric units: the logged value is the exact RMSE.
            in_units = self.problem.in_metric_units
            metric.update(in_units(out, anchor), in_units(y, anchor))
        elif self._metric_name == "acc":
            metric.update(out.argmax(dim=-1), y)
        else:
            metric.update(out, y)
        return metric

    def on_train_epoch_start(self) -> None:
        """Reset the training-epoch accumulators (and the carried state: a new pass)."""
        self._train_loss_sum = torch.zeros((), device=self.device)
        self._train_count = 0
        self._states.pop("train", None)

    def on_validation_epoch_start(self) -> None:
        """Evaluation starts every stream from a zero state."""
        self._states.pop("val", None)

    def on_test_epoch_start(self) -> None:
        """Evaluation starts every stream from a zero state."""
        self._states.pop("test", None)

    def on_train_epoch_end(self) -> None:
        """Log the training metrics that are accumulated rather than logged per step."""
        if self._reports_bpc and self._train_count:
            train_bpc = self._train_loss_sum / self._train_count / _LN2
            self.log("train_bpc", train_bpc, on_step=False, on_epoch=True)
        if self._metric_name is not None:
            metric = cast(Metric, self.metrics[f"train_{self._metric_name}"])
            if metric.update_called:
                self.log(
                    f"train_{self._metric_name}", metric.compute(), on_step=False, on_epoch=True
                )
            metric.reset()

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        """One training batch; raises :class:`DivergedError` when the loss is not finite."""
        loss = self._common_step(batch, "train")
        if not torch.isfinite(loss):
            raise DivergedError(self.global_step, self.current_epoch, loss.item())
        return loss

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        """One validation batch."""
        return self._common_step(batch, "val")

    def test_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        """One test batch."""
        return self._common_step(batch, "test")

    def configure_optimizers(self) -> OptimizerLRScheduler:
        """The configured optimizer and, unless ``lr_schedule`` is none, its epoch scheduler."""
        cfg = self.config
        params = self.parameters()
        optimizer: torch.optim.Optimizer
        if cfg.optimizer == "adam":
            optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        elif cfg.optimizer == "rmsprop":
            optimizer = torch.optim.RMSprop(
                params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        else:
            raise ValueError(f"unknown optimizer {cfg.optimizer!r}")

        scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau
        if cfg.lr_schedule == "none":
            return optimizer
        if cfg.lr_schedule == "step":
            decay, start = cfg.lr_decay, cfg.lr_decay_start
            # Epoch e (0-based) runs at lr * decay ** (epochs in [start, e]), as Zaremba et al.
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda epoch: decay ** max(0, epoch - start + 1)
            )
        elif cfg.lr_schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.max_epochs)
        elif cfg.lr_schedule == "plateau":
            if cfg.lr_decay >= 1.0:
                return optimizer  # a factor of 1 never changes the rate (and torch rejects it)
            mode: Literal["min", "max"] = (
                "max" if _METRIC_DIRECTIONS.get(self.problem.metric) == "maximize" else "min"
            )
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode=mode, factor=cfg.lr_decay, patience=1
            )
        else:
            raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}")
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "interval": "epoch",
                "monitor": self.problem.metric,
            },
        }
