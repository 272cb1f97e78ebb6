"""Multivariate, variable-length sequence classification: JapaneseVowels or a JSON Lines file."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from service.errors import DataError, MissingExtra
from service.search_space import ClassifyTask, LSTMConfig, resolve_data_path
from service.training.data.base import InMemoryDataModule, Problem, TaskData

Label = str | int
#: Fixed seeds: the splits depend on the data only, never on the model's seed.
_TEST_SPLIT_SEED = 0
_VAL_SPLIT_SEED = 1
#: Problems reported from one JSON Lines file before giving up.
_MAX_REPORTED = 10


@dataclass(frozen=True)
class LabelledSequences:
    """Time-major sequences ``(T_i, F)`` with their labels; ``splits`` is None without a split."""

    xs: list[np.ndarray]
    labels: list[Label]
    splits: list[str] | None


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
        raise MissingExtra(
            f"classify: the japanese_vowels data set needs the datasets extra ({err.name} is "
            'missing): pip install "lstm-hpo[datasets]"'
        ) from None
    xs: list[np.ndarray] = []
    labels: list[Label] = []
    splits: list[str] = []
    for split in ("train", "test"):
        x, y = load(split=split)
        xs += [np.asarray(a, dtype=np.float64).T for a in x]  # aeon: (channels, length)
        labels += [str(label) for label in y]
        splits += [split] * len(x)
    return LabelledSequences(xs, labels, splits)


def read_jsonl(path: Path) -> LabelledSequences:
    """Read ``{"x": [[f1, ...], ...], "label": ..., "split": "train" | "test"}`` per line.

    Every problem is reported with its line number (up to ten at once) in a :class:`DataError`.
    """
    try:
        with path.open(encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        raise DataError(f"classify: {path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"classify: {path}: is a directory, not a JSON Lines file") from None
    except UnicodeDecodeError as err:
        raise DataError(
            f"classify: {path}: not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None
    except OSError as err:
        raise DataError(f"classify: {path}: cannot read ({err.strerror})") from None

    errors: list[str] = []
    rows: list[_Row] = []
    for lineno, line in enumerate(lines, start=1):
        if len(errors) >= _MAX_REPORTED:
            break
        if not line.strip():
            continue
        row = _parse_line(line, lineno)
        problem = row if isinstance(row, str) else _mismatch(row, rows[0] if rows else None)
        if problem is not None:
            errors.append(f"line {lineno}: {problem}")
        elif isinstance(row, _Row):
            rows.append(row)
    if errors:
        more = " (stopped there)" if len(errors) >= _MAX_REPORTED else ""
        raise DataError(f"classify: {path}: " + "; ".join(errors) + more)
    if not rows:
        raise DataError(f"classify: {path}: no sequences (the file has no non-blank lines)")
    odd = next((r for r in rows if (r.split is None) != (rows[0].split is None)), None)
    if odd is not None:
        raise DataError(
            f"classify: {path} line {odd.lineno}: `split` must be on every line or on none"
        )
    xs, labels = [r.x for r in rows], [r.label for r in rows]
    if rows[0].split is None:
        return LabelledSequences(xs, labels, None)
    splits = [r.split for r in rows if r.split is not None]
    for needed in ("train", "test"):
        if needed not in splits:
            raise DataError(f'classify: {path}: no line has "split": "{needed}"')
    return LabelledSequences(xs, labels, splits)


@dataclass(frozen=True)
class _Row:
    lineno: int
    x: np.ndarray
    label: Label
    split: str | None


def _parse_line(line: str, lineno: int) -> _Row | str:
    """One line's sequence, label and split; or what is wrong with it."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err.msg} at column {err.colno})"
    if not isinstance(obj, dict):
        return "expected a JSON object with `x` and `label`"
    if "x" not in obj or "label" not in obj:
        return "`x` and `label` are required"
    x, label, split = obj["x"], obj["label"], obj.get("split")
    if not isinstance(x, list) or not x or not all(isinstance(step, list) and step for step in x):
        return "`x` must be a non-empty list of time steps, each a non-empty list of numbers"
    width = len(x[0])
    for t, step in enumerate(x):
        if len(step) != width:
            return f"`x` time step {t} has {len(step)} features, time step 0 has {width}"
        # numpy would silently turn "1.5" or true into numbers: check the JSON types here.
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in step):
            return f"`x` time step {t} has a value that is not a number"
        if not all(math.isfinite(v) for v in step):
            return f"`x` time step {t} has a value that is not finite"
    if not isinstance(label, str | int) or isinstance(label, bool):
        return f"`label` must be a string or an integer, not {json.dumps(label)}"
    if split is not None and split not in ("train", "test"):
        return f'`split` must be "train" or "test", not {json.dumps(split)}'
    return _Row(lineno, np.asarray(x, dtype=np.float64), label, split)


def _mismatch(row: _Row, first: _Row | None) -> str | None:
    """What makes ``row`` inconsistent with the file's first good line, if anything."""
    if first is None:
        return None
    if row.x.shape[1] != first.x.shape[1]:
        return (
            f"`x` has {row.x.shape[1]} features per time step, "
            f"line {first.lineno} has {first.x.shape[1]}"
        )
    if type(row.label) is not type(first.label):
        kinds = {str: "a string", int: "an integer"}
        return (
            f"`label` is {kinds[type(row.label)]} but on line {first.lineno} it is "
            f"{kinds[type(first.label)]}: use one type for all labels"
        )
    return None


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices, sorted: about ``fraction`` of each class held out, seeded."""
    rng = np.random.default_rng(seed)
    kept: list[np.ndarray] = []
    held: list[np.ndarray] = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_held = math.floor(len(idx) * fraction + 0.5)  # round half up
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def build_classify(
    task: ClassifyTask, params: LSTMConfig, data_roots: tuple[Path, ...] | None = None
) -> TaskData:
    """Load labelled sequences, split them, standardise on train; baseline: the majority class."""
    if task.path is not None:
        path = resolve_data_path(task.path, data_roots)
        data = read_jsonl(path)
        source = path.name
    else:
        data = load_japanese_vowels()
        source = "japanese_vowels (aeon)"
    classes: list[Label] = sorted(set(data.labels))  # one label type per file (checked)
    class_id = {c: i for i, c in enumerate(classes)}
    y = np.array([class_id[label] for label in data.labels], dtype=np.int64)

    if data.splits is not None:
        is_test = np.array([s == "test" for s in data.splits])
        train_pool, test_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    else:
        kept, held = stratified_split(y, task.test_fraction, _TEST_SPLIT_SEED)
        train_pool, test_idx = kept, held
    kept, held = stratified_split(y[train_pool], task.val_fraction, _VAL_SPLIT_SEED)
    train_idx, val_idx = train_pool[kept], train_pool[held]
    for name, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
        if len(idx) == 0:
            raise DataError(
                f"classify: {source}: the {name} split is empty ({len(y)} sequences); "
                "give more sequences or larger fractions"
            )

    stacked = np.concatenate([data.xs[i] for i in train_idx])
    mean, std = stacked.mean(axis=0), stacked.std(axis=0)
    std[std == 0.0] = 1.0  # a constant feature: centre it, do not blow it up

    def dataset(idx: np.ndarray) -> SequenceDataset:
        xs = [torch.from_numpy(((data.xs[i] - mean) / std).astype(np.float32)) for i in idx]
        return SequenceDataset(xs, torch.from_numpy(y[idx]))

    datamodule = ClassifyDataModule(
        classes, dataset(train_idx), dataset(val_idx), dataset(test_idx), params.batch_size
    )
    majority = int(np.bincount(y[train_idx], minlength=len(classes)).argmax())
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
        val_baselines={"majority": float(np.mean(y[val_idx] == majority))},
        test_baselines={"majority": float(np.mean(y[test_idx] == majority))},
        primary_baseline="majority",
        description=(
            f"classify: {source}, {len(y):,} sequences, {n_features} features, "
            f"{len(classes)} classes, length {min(lengths)}-{max(lengths)} "
            f"(train {len(train_idx):,} / val {len(val_idx):,} / test {len(test_idx):,})"
        ),
    )
