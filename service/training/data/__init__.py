"""Task data: one builder per task kind, each returning a :class:`TaskData` ready to train on.

Splits depend only on the task spec (and the data), never on the model's seed, so every
trial of a study trains and is scored on the same examples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeAlias

from service.errors import DataError
from service.search_space import LSTMConfig, TaskSpec
from service.training.data.adding import build_adding
from service.training.data.base import Problem, TaskData
from service.training.data.char_lm import build_char_lm
from service.training.data.classify import build_classify
from service.training.data.forecast import build_forecast

__all__ = ["BUILDERS", "Problem", "TaskData", "build_task_data"]

Builder: TypeAlias = Callable[[Any, LSTMConfig, "tuple[Path, ...] | None"], TaskData]

#: task kind -> the function that loads its data.
BUILDERS: Mapping[str, Builder] = {
    "char_lm": build_char_lm,
    "forecast": build_forecast,
    "classify": build_classify,
    "adding": build_adding,
}


def build_task_data(
    task: TaskSpec, params: LSTMConfig, data_roots: tuple[Path, ...] | None = None
) -> TaskData:
    """Load (or generate) ``task``'s data, split it and wrap it in a LightningDataModule.

    ``params`` supplies ``batch_size`` (and ``bptt`` for char_lm); ``data_roots`` are where
    relative user paths are looked up. Raises :class:`~service.errors.DataError` naming the
    file and the problem when the data cannot be used, and
    :class:`~service.errors.MissingExtra` when a bundled data set needs the ``datasets`` extra.
    """
    builder = BUILDERS.get(task.kind)
    if builder is None:
        raise DataError(f"{task.kind} tasks have no data")
    return builder(task, params, data_roots)
