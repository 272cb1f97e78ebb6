"""Univariate forecasting: a bundled series (airline, sunspots) or one column of a CSV file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from service.data_checks import (
    BUNDLED_PACKAGES,
    check_series_fits,
    forecast_bounds,
    needs_datasets_extra,
    read_csv_column,
    scale_series,
)
from service.errors import DataError, MissingExtra
from service.search_space import ForecastTask, LSTMConfig, resolve_data_path
from service.training.data.base import InMemoryDataModule, Problem, TaskData

#: Seasonal period of each bundled series (monthly airline passengers; ~11-year solar cycle).
DEFAULT_SEASONS = {"airline": 12, "sunspots": 11}


class ForecastDataModule(InMemoryDataModule):
    """Windows of ``lookback`` standardised values -> the next ``horizon`` values, in memory."""

    def __init__(
        self,
        train: tuple[torch.Tensor, ...],
        val: tuple[torch.Tensor, ...],
        test: tuple[torch.Tensor, ...],
        batch_size: int,
        *,
        mean: float,
        std: float,
    ) -> None:
        super().__init__(train, val, test, batch_size)
        #: Standardisation fitted on the train part: original = standardised * std + mean.
        self.mean = mean
        self.std = std


def load_bundled_series(name: str) -> np.ndarray:
    """A bundled series as float64; :class:`MissingExtra` without the ``datasets`` extra."""
    try:
        if name == "airline":
            from aeon.datasets import load_airline

            values = load_airline()
        elif name == "sunspots":
            import statsmodels.api as sm

            values = sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"]
        else:
            raise DataError(f"forecast: unknown data set {name!r}")
    except ImportError as err:
        raise MissingExtra(
            needs_datasets_extra("forecast", name, err.name or BUNDLED_PACKAGES[name])
        ) from None
    return np.asarray(values, dtype=np.float64).reshape(-1)


def window_starts(start: int, stop: int, horizon: int) -> np.ndarray:
    """Indices ``t`` of the first target of every window whose targets lie in ``[start, stop)``."""
    return np.arange(start, stop - horizon + 1)


def make_windows(
    series: np.ndarray,
    starts: np.ndarray,
    lookback: int,
    horizon: int,
    *,
    relative_to_last: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs ``series[t-lookback:t]``, targets ``series[t:t+horizon]`` and the anchor
    each is relative to, for each ``t``: float[N, lookback], float[N, horizon], float[N, 1].

    ``relative_to_last`` subtracts each window's last input value (its anchor; else 0) from
    its inputs and targets: the network learns changes, not levels, so it keeps working
    when the test period lies outside the range of the training levels (a trending
    series). The error, and so the RMSE, is the same in both forms: (last + predicted
    change) - target.
    """
    x = sliding_window_view(series, lookback)[starts - lookback]
    y = sliding_window_view(series, horizon)[starts]
    if relative_to_last:
        last = x[:, -1:]
        return x - last, y - last, last
    return x, y, np.zeros((len(starts), 1))


def naive_rmse(series: np.ndarray, starts: np.ndarray, horizon: int) -> float:
    """RMSE of repeating the last observed value ``series[t-1]`` over the horizon."""
    y = series[starts[:, None] + np.arange(horizon)[None, :]]
    pred = series[starts - 1][:, None]
    return float(np.sqrt(np.mean((y - pred) ** 2)))


def seasonal_naive_rmse(series: np.ndarray, starts: np.ndarray, horizon: int, season: int) -> float:
    """RMSE of predicting each target with the last observed value one or more seasons earlier."""
    k = np.arange(horizon)
    # Target t+k is predicted by t+k - season * (k // season + 1): the same phase, already seen.
    target_idx = starts[:, None] + k[None, :]
    source_idx = target_idx - season * (k // season + 1)[None, :]
    return float(np.sqrt(np.mean((series[target_idx] - series[source_idx]) ** 2)))


def _split_tensors(
    windows: tuple[np.ndarray, np.ndarray, np.ndarray], *, with_anchor: bool
) -> tuple[torch.Tensor, ...]:
    """A split's batch tensors (:class:`~service.training.data.base.Problem`): (x, y),
    with the anchors third when a log transform needs them to recover the original scale."""
    x, y, anchor = (torch.from_numpy(a.astype(np.float32)) for a in windows)
    return (x.unsqueeze(-1), y, anchor) if with_anchor else (x.unsqueeze(-1), y)


def build_forecast(
    task: ForecastTask, params: LSTMConfig, data_roots: tuple[Path, ...] | None = None
) -> TaskData:
    """Load a series, split it in time, standardise on train, window it; baselines: naive ones."""
    dropped: list[int] = []
    source: str
    season: int | None
    if task.dataset is not None:
        series = load_bundled_series(task.dataset)
        source = f"{task.dataset} ({BUNDLED_PACKAGES[task.dataset]})"
        season = task.season or DEFAULT_SEASONS[task.dataset]
    else:
        assert task.path is not None and task.column is not None  # the spec guarantees both
        path = resolve_data_path(task.path, data_roots)
        series, dropped = read_csv_column(
            path, task.column, task.encoding, positive=task.transform == "log"
        )
        source = f"{path.name} column {task.column!r}"
        season = task.season
    lookback, horizon = task.lookback, task.horizon
    bounds = forecast_bounds(task, len(series))
    check_series_fits(bounds, lookback, horizon)
    n_train, n_val, n_test = bounds.sizes

    logged = task.transform == "log"
    source_name = f"forecast: {source}"
    scaled, mean, std = scale_series(series, bounds.val_start, source_name, task.transform)

    starts = {
        "train": window_starts(lookback, bounds.val_start, horizon),
        "val": window_starts(bounds.val_start, bounds.test_start, horizon),
        "test": window_starts(bounds.test_start, bounds.n, horizon),
    }
    train, val, test = (
        _split_tensors(
            make_windows(
                scaled, s, lookback, horizon, relative_to_last=task.normalize == "last_value"
            ),
            with_anchor=logged,
        )
        for s in starts.values()
    )
    datamodule = ForecastDataModule(
        train, val, test, batch_size=params.batch_size, mean=mean, std=std
    )

    val_baselines = {"naive": naive_rmse(series, starts["val"], horizon)}
    test_baselines = {"naive": naive_rmse(series, starts["test"], horizon)}
    # Seasonal naive needs a full season of history before the first val target.
    if season is not None and season <= bounds.val_start:
        val_baselines["seasonal_naive"] = seasonal_naive_rmse(
            series, starts["val"], horizon, season
        )
        test_baselines["seasonal_naive"] = seasonal_naive_rmse(
            series, starts["test"], horizon, season
        )
    missing = f", {len(dropped):,} rows with missing values dropped" if dropped else ""
    counts = " / ".join(f"{len(s):,}" for s in starts.values())
    return TaskData(
        problem=Problem(
            input_kind="features",
            input_size=1,
            output_size=horizon,
            readout="last_step",
            loss="mse",
            metric="val_rmse",
            target_scale=std,
            target_transform=task.transform,
            target_offset=mean if logged else 0.0,
        ),
        datamodule=datamodule,
        val_baselines=val_baselines,
        test_baselines=test_baselines,
        primary_baseline="naive",
        description=(
            f"forecast: {source}, {bounds.n:,} points{missing} (train {n_train:,} / "
            f"val {n_val:,} / test {n_test:,}){', log values' if logged else ''}, "
            f"lookback {lookback}, horizon {horizon}: "
            f"{counts} windows"
        ),
    )
