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


def test_a_stateful_refit_is_one_stream_over_train_then_validation_text() -> None:
    """Each row of a stateful refit is one contiguous piece of the train-then-validation text
    (a carried state always continues its own text), served in order, never shuffled."""
    data = build("char_lm", stateful=True, bptt=25, batch_size=4)
    module = data.datamodule
    train = module._train  # type: ignore[attr-defined]
    val = module._val  # type: ignore[attr-defined]
    assert isinstance(train, StreamBatches) and isinstance(val, StreamBatches)
    module.train_on_val = True  # type: ignore[attr-defined]

    batches = list(module.train_dataloader())

    x = torch.cat([b[0] for b in batches], dim=1)
    y = torch.cat([b[1] for b in batches], dim=1)
    assert x.shape[0] == 4 and torch.equal(x[:, 1:], y[:, :-1])  # targets: inputs shifted
    text = torch.cat([train.rows.flatten(), val.rows.flatten()])
    rows = torch.cat([x[:, :1], y], dim=1)
    for r in range(4):  # row r is the r-th quarter of the joined text, in order
        start = r * rows.shape[1]
        assert torch.equal(rows[r], text[start : start + rows.shape[1]])
    assert rows.numel() > train.rows.numel()  # validation text was added
    assert len(list(module.train_dataloader())) == len(batches)  # the same each epoch


def test_a_data_module_trains_on_train_only_unless_asked() -> None:
    data = build("adding")
    assert data.datamodule.train_on_val is False  # type: ignore[attr-defined]
    assert sum(len(b[1]) for b in data.datamodule.train_dataloader()) == 96
