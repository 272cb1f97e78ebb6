"""Multivariate, variable-length sequence classification: JapaneseVowels or a JSON Lines file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from service.data_checks import (
    BUNDLED_PACKAGES,
    Label,
    LabelledSequences,
    feature_scaling,
    needs_datasets_extra,
    read_jsonl,
    split_classify,
)
from service.errors import MissingExtra
from service.search_space import ClassifyTask, LSTMConfig, resolve_data_path
from service.training.data.base import InMemoryDataModule, Problem, TaskData


class SequenceDataset(Dataset[tuple[torch.Tensor, int]]):
    """Variable-length sequences (Float[T_i, F]) with class ids."""

    def __init__(self, xs: list[torch.Tensor], ys: torch.Tensor) -> None:
        self.xs = xs
        self.ys = ys

    def __len__(self) -> int:
        return len(self.xs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.xs[i], int(self.ys[i])


def pad_batch(
    batch: Sequence[tuple[torch.Tensor, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x Float[B, T_max, F] right-padded with zeros, y Long[B], lengths Long[B])``."""
    xs = [x for x, _ in batch]
    y = torch.tensor([label for _, label in batch], dtype=torch.long)
    lengths = torch.tensor([len(x) for x in xs], dtype=torch.long)
    return pad_sequence(xs, batch_first=True), y, lengths


class ClassifyDataModule(InMemoryDataModule):
    """Standardised variable-length sequences, padded per batch, held in memory."""

    def __init__(
        self,
        classes: list[Label],
        train: SequenceDataset,
        val: SequenceDataset,
        test: SequenceDataset,
        batch_size: int,
    ) -> None:
        super().__init__(train, val, test, batch_size, collate_fn=pad_batch)
        #: class id -> original label
        self.classes = classes


def load_japanese_vowels() -> LabelledSequences:
    """The UEA JapaneseVowels data set (270 train / 370 test, 12 features, 9 speakers)."""
    try:
        from aeon.datasets import load_japanese_vowels as load
    except ImportError as err:
        package = err.name or BUNDLED_PACKAGES["japanese_vowels"]
        raise MissingExtra(needs_datasets_extra("classify", "japanese_vowels", package)) from None
    xs: list[np.ndarray] = []
    labels: list[Label] = []
    splits: list[str] = []
    for split in ("train", "test"):
        x, y = load(split=split)
        xs += [np.asarray(a, dtype=np.float64).T for a in x]  # aeon: (channels, length)
        labels += [str(label) for label in y]
        splits += [split] * len(x)
    return LabelledSequences(xs, labels, splits)


def build_classify(
    task: ClassifyTask, params: LSTMConfig, data_roots: tuple[Path, ...] | None = None
) -> TaskData:
    """Load labelled sequences, split them, standardise on train. Baselines: the majority
    class (accuracy) and the class prior (cross-entropy, nats: every sequence predicted
    with the training split's class frequencies, add-one smoothed), the primary one by
    ``task.metric``."""
    if task.path is not None:
        path = resolve_data_path(task.path, data_roots)
        data = read_jsonl(path, task.encoding)
        source = path.name
    else:
        data = load_japanese_vowels()
        source = "japanese_vowels (aeon)"
    splits = split_classify(data, task.val_fraction, task.test_fraction, source)
    classes, y = splits.classes, splits.y
    train_idx, val_idx, test_idx = splits.train, splits.val, splits.test

    mean, std = feature_scaling(data, train_idx, f"classify: {source}")

    def dataset(idx: np.ndarray) -> SequenceDataset:
        xs = [torch.from_numpy(((data.xs[i] - mean) / std).astype(np.float32)) for i in idx]
        return SequenceDataset(xs, torch.from_numpy(y[idx]))

    datamodule = ClassifyDataModule(
        classes, dataset(train_idx), dataset(val_idx), dataset(test_idx), params.batch_size
    )
    counts = np.bincount(y[train_idx], minlength=len(classes))
    majority = int(counts.argmax())
    log_prior = np.log((counts + 1.0) / (counts.sum() + len(classes)))
    lengths = [len(x) for x in data.xs]
    n_features = data.xs[0].shape[1]
    return TaskData(
        problem=Problem(
            input_kind="features",
            input_size=n_features,
            output_size=len(classes),
            readout="last_step",
            loss="cross_entropy",
            metric="val_acc",
        ),
        datamodule=datamodule,
        val_baselines={
            "majority": float(np.mean(y[val_idx] == majority)),
            "prior": float(-np.mean(log_prior[y[val_idx]])),
        },
        test_baselines={
            "majority": float(np.mean(y[test_idx] == majority)),
            "prior": float(-np.mean(log_prior[y[test_idx]])),
        },
        primary_baseline="prior" if task.metric == "val_loss" else "majority",
        description=(
            f"classify: {source}, {len(y):,} sequences, {n_features} features, "
            f"{len(classes)} classes, length {min(lengths)}-{max(lengths)} "
            f"(train {len(train_idx):,} / val {len(val_idx):,} / test {len(test_idx):,})"
        ),
    )
