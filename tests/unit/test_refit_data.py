"""A refit's training data (``InMemoryDataModule.train_on_val``): every task's training
loader serves the train split and then the validation split, each example once an epoch;
the validation and test loaders do not change; char_lm's stateful streams keep their
order (validation rows continue train rows)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch

from service.search_space import parse_config
from service.training.data import TaskData, build_task_data
from service.training.data.char_lm import StreamBatches

#: Small but real configs of every task kind (the bundled data where a task has them).
CONFIGS: dict[str, dict[str, Any]] = {
    "adding": {"task": {"kind": "adding", "seq_len": 8, "n_train": 96, "n_val": 40, "n_test": 10}},
    "forecast": {"task": {"kind": "forecast", "dataset": "airline"}},
    "classify": {"task": {"kind": "classify"}},
    "char_lm": {"task": {"kind": "char_lm", "max_chars": 20_000}, "params": {"bptt": 20}},
}


def build(kind: str, **params: Any) -> TaskData:
    raw = CONFIGS[kind]
    config = parse_config(
        {"task": raw["task"], "params": {"batch_size": 16, **raw.get("params", {}), **params}}
    )
    return build_task_data(config.task, config.params)


def targets(batches: Any) -> Counter[bytes]:
    """Every example's target, as bytes: a multiset comparable across batchings."""
    found: Counter[bytes] = Counter()
    for batch in batches:
        for y in batch[1]:
            found[np.ascontiguousarray(y.numpy()).tobytes()] += 1
    return found


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_the_refit_trains_on_train_then_validation_and_scores_the_same_splits(kind: str) -> None:
    data = build(kind)
    module = data.datamodule
    train, val = list(module.train_dataloader()), list(module.val_dataloader())
    test_before = targets(module.test_dataloader())

    module.train_on_val = True  # type: ignore[attr-defined]
    refit = list(module.train_dataloader())

    assert sum(len(b[1]) for b in refit) == sum(len(b[1]) for b in train + val)
    assert targets(refit) == targets(train) + targets(val)  # each example once, nothing else
    assert targets(module.val_dataloader()) == targets(val)
    assert targets(module.test_dataloader()) == test_before


def test_stateful_streams_are_served_in_order_train_rows_then_validation_rows() -> None:
    data = build("char_lm", stateful=True, bptt=25, batch_size=4)
    module = data.datamodule
    module.train_on_val = True  # type: ignore[attr-defined]
    loader = module.train_dataloader()

    batches = list(loader)
    train = module._train  # type: ignore[attr-defined]
    val = module._val  # type: ignore[attr-defined]
    assert isinstance(train, StreamBatches) and isinstance(val, StreamBatches)
    assert len(batches) == len(train) + len(val)
    expected = [train[i] for i in range(len(train))] + [val[i] for i in range(len(val))]
    for (x, y), (ex, ey) in zip(batches, expected, strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey)  # whole stream pieces, never shuffled
    # Row r of the validation stream continues the same row index: one (streams, T) batch.
    assert batches[len(train)][0].shape[0] == train.rows.shape[0]


def test_a_data_module_trains_on_train_only_unless_asked() -> None:
    data = build("adding")
    assert data.datamodule.train_on_val is False  # type: ignore[attr-defined]
    assert sum(len(b[1]) for b in data.datamodule.train_dataloader()) == 96
