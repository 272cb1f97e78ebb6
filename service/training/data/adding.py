"""The adding problem (Hochreiter & Schmidhuber 1997), generated from a seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from service.search_space import AddingTask, LSTMConfig
from service.training.data.base import InMemoryDataModule, Problem, TaskData


class AddingDataModule(InMemoryDataModule):
    """Generated adding-problem sequences, held in memory."""


def adding_sequences(
    n: int, seq_len: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` sequences ``x`` Float[n, seq_len, 2] and their targets ``y`` Float[n, 1].

    Feature 0 is a value drawn from U(0, 1); feature 1 marks exactly two steps, one in the
    first half ``[0, seq_len // 2)`` and one in the second ``[seq_len // 2, seq_len)`` (the
    modern formulation, e.g. Arjovsky et al. 2016). The target is the sum of the two marked
    values.
    """
    half = seq_len // 2
    values = rng.random((n, seq_len), dtype=np.float32)
    first = rng.integers(0, half, size=n)
    second = rng.integers(half, seq_len, size=n)
    markers = np.zeros((n, seq_len), dtype=np.float32)
    rows = np.arange(n)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    y = (values[rows, first] + values[rows, second]).reshape(n, 1)
    return np.stack([values, markers], axis=-1), y


def build_adding(
    task: AddingTask, params: LSTMConfig, data_roots: tuple[Path, ...] | None = None
) -> TaskData:
    """Generate train / val / test from independent streams of ``data_seed``; baseline: the mean."""
    # Three child streams: changing n_train does not change the val or test sequences.
    streams = np.random.SeedSequence(task.data_seed).spawn(3)
    sizes = (task.n_train, task.n_val, task.n_test)
    splits = [
        adding_sequences(n, task.seq_len, np.random.default_rng(s))
        for n, s in zip(sizes, streams, strict=True)
    ]
    (_, y_train), (_, y_val), (_, y_test) = splits
    train, val, test = ((torch.from_numpy(x), torch.from_numpy(y)) for x, y in splits)
    mean = float(y_train.mean(dtype=np.float64))
    return TaskData(
        problem=Problem(
            input_kind="features",
            input_size=2,
            output_size=1,
            readout="last_step",
            loss="mse",
            metric="val_mse",
        ),
        datamodule=AddingDataModule(train, val, test, batch_size=params.batch_size),
        val_baselines={"constant": float(np.mean((y_val.astype(np.float64) - mean) ** 2))},
        test_baselines={"constant": float(np.mean((y_test.astype(np.float64) - mean) ** 2))},
        primary_baseline="constant",
        description=(
            f"adding: seq_len {task.seq_len}, {task.n_train:,} / {task.n_val:,} / "
            f"{task.n_test:,} sequences (data_seed {task.data_seed})"
        ),
    )
