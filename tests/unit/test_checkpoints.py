"""service.training.checkpoints: what a checkpoint's model is, and how it differs from a
config's (`lstm-hpo train --init-from` / `--evaluate`); the CLI runs are in
tests/integration/test_train_cli.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from service.errors import CheckpointMismatch, InvalidCheckpoint
from service.search_space import ForecastTask, LSTMConfig
from service.training.checkpoints import (
    SavedModel,
    architecture_differences,
    load_model_weights,
    read_model_checkpoint,
    task_differences,
)
from service.training.data.base import Problem
from service.training.model import StackedLSTM

CHAR = Problem("tokens", 65, 65, "every_step", "cross_entropy", "val_loss")
FORECAST = Problem("features", 1, 12, "last_step", "mse", "val_rmse", target_scale=3.0)
CLASSIFY = Problem("features", 12, 9, "last_step", "cross_entropy", "val_acc")
ADDING = Problem("features", 2, 1, "last_step", "mse", "val_mse")


def saved(problem: Problem, task: dict[str, Any] | None = None, **params: Any) -> SavedModel:
    """A checkpoint's model (no file) of ``params`` for ``problem``."""
    return SavedModel(Path("best.ckpt"), LSTMConfig(**params), problem, task, 0, {})


def locs(diffs: list[Any]) -> list[str]:
    return [d.loc for d in diffs]


def test_same_network_fits_whatever_the_training_settings() -> None:
    """Dropout, init, optimizer, epochs and seed are no part of the weights' shapes."""
    ckpt = saved(ADDING, {"kind": "adding"}, num_layers=2, hidden_size=16, lr=0.1)
    params = LSTMConfig(
        num_layers=2, hidden_size=16, dropout=0.3, init="orthogonal", optimizer="sgd", seed=7
    )

    assert architecture_differences(ckpt, params, ADDING, "adding") == []


@pytest.mark.parametrize(
    ("ckpt_params", "params", "expected"),
    [
        ({"hidden_size": 16}, {"hidden_size": 8}, ["params.hidden_size"]),
        ({"cell": "lstm"}, {"cell": "gru"}, ["params.cell"]),
        ({"num_layers": 2}, {"num_layers": 3}, ["params.num_layers"]),
        ({"bidirectional": False}, {"bidirectional": True}, ["params.bidirectional"]),
        (
            {"num_layers": 2, "hidden_size": 32, "hidden_mode": "pyramid"},
            {"num_layers": 2, "hidden_mode": "per_layer", "hidden_sizes": [32, 32]},
            ["params.hidden_sizes"],
        ),
        (
            {"cell": "lstm", "hidden_size": 16},
            {"cell": "rnn", "hidden_size": 32},
            ["params.cell", "params.hidden_size"],
        ),
    ],
    ids=["width", "cell", "depth", "direction", "per-layer widths", "two at once"],
)
def test_each_difference_names_its_field(
    ckpt_params: dict[str, Any], params: dict[str, Any], expected: list[str]
) -> None:
    ckpt = saved(ADDING, **ckpt_params)

    diffs = architecture_differences(ckpt, LSTMConfig(**params), ADDING, "adding")

    assert locs(diffs) == expected
    assert all("checkpoint" in d.msg and "config" in d.msg for d in diffs)


def test_same_widths_written_differently_fit() -> None:
    """Tied 16 x 2 and per_layer [16, 16] are the same network."""
    ckpt = saved(ADDING, num_layers=2, hidden_size=16)
    params = LSTMConfig(num_layers=2, hidden_mode="per_layer", hidden_sizes=(16, 16))

    assert architecture_differences(ckpt, params, ADDING, "adding") == []


def test_another_task_kind_is_named() -> None:
    ckpt = saved(ADDING, {"kind": "adding"})

    by_task = architecture_differences(ckpt, LSTMConfig(), FORECAST, "forecast")
    by_problem = architecture_differences(saved(ADDING), LSTMConfig(), CLASSIFY, "classify")

    assert by_task[0].loc == by_problem[0].loc == "task.kind"
    assert "checkpoint adding, config forecast" in by_task[0].msg


def test_data_sizes_are_named() -> None:
    """A vocabulary of another size (said once, not as input and output), another horizon."""
    char = architecture_differences(
        saved(CHAR),
        LSTMConfig(),
        Problem("tokens", 80, 80, "every_step", "cross_entropy", "val_loss"),
        "char_lm",
    )
    horizon = architecture_differences(
        saved(FORECAST),
        LSTMConfig(),
        Problem("features", 1, 6, "last_step", "mse", "val_rmse"),
        "forecast",
    )

    assert [(d.loc, d.msg) for d in char] == [
        ("task", "vocabulary size: checkpoint 65, the config's data 80")
    ]
    assert [(d.loc, d.msg) for d in horizon] == [
        ("task.horizon", "checkpoint 12, the config's data 6")
    ]


def test_forecast_scale_is_not_architecture() -> None:
    """The target scale comes from the data a model is fine-tuned on, not the weights."""
    other_scale = Problem("features", 1, 12, "last_step", "mse", "val_rmse", target_scale=9.0)

    assert architecture_differences(saved(FORECAST), LSTMConfig(), other_scale, "forecast") == []


def test_embedding_width_is_named() -> None:
    ckpt = saved(CHAR, hidden_size=32, embedding_dim=16)

    diffs = architecture_differences(ckpt, LSTMConfig(hidden_size=32), CHAR, "char_lm")

    assert [(d.loc, d.msg) for d in diffs] == [("params.embedding_dim", "checkpoint 16, config 32")]


def test_task_differences_are_other_data_not_errors() -> None:
    ckpt = saved(ADDING, {"kind": "adding", "seq_len": 10})

    diffs = task_differences(ckpt, {"kind": "adding", "seq_len": 20})

    assert [str(d) for d in diffs] == ["task.seq_len: checkpoint 10, config 20"]
    assert task_differences(saved(ADDING), {"kind": "adding"}) == []


def test_a_task_field_newer_than_the_checkpoint_is_its_default_there() -> None:
    """A checkpoint written before ``task.transform`` existed was trained without it: no
    note for ``transform: none``, one for ``log``."""
    old_task = {"kind": "forecast", "dataset": "airline", "lookback": 24, "normalize": "last_value"}
    ckpt = saved(FORECAST, old_task)
    config = ForecastTask(kind="forecast", dataset="airline").model_dump(
        mode="json", exclude_none=True
    )

    assert task_differences(ckpt, config) == []
    diffs = task_differences(ckpt, config | {"transform": "log"})
    assert [str(d) for d in diffs] == ["task.transform: checkpoint none, config log"]


def test_weights_load_into_the_same_network_and_mismatches_raise() -> None:
    params = LSTMConfig(num_layers=2, hidden_size=8)
    torch.manual_seed(0)
    source = StackedLSTM(ADDING, params)
    ckpt = SavedModel(Path("best.ckpt"), params, ADDING, None, 3, source.state_dict())
    target = StackedLSTM(ADDING, params)

    load_model_weights(target, ckpt, params, ADDING, "adding")

    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name
    wider = LSTMConfig(num_layers=2, hidden_size=16)
    with pytest.raises(CheckpointMismatch) as raised:
        load_model_weights(StackedLSTM(ADDING, wider), ckpt, wider, ADDING, "adding")
    assert raised.value.path == "best.ckpt"
    assert locs(raised.value.errors) == ["params.hidden_size"]


def test_reads_a_saved_lightning_checkpoint(tmp_path: Path) -> None:
    params = LSTMConfig(num_layers=1, hidden_size=4)
    weights = StackedLSTM(ADDING, params).state_dict()
    path = tmp_path / "best.ckpt"
    torch.save(
        {
            "epoch": 2,
            "state_dict": {f"model.{k}": v for k, v in weights.items()},
            "hyper_parameters": {
                "params": params.model_dump(mode="json"),
                "problem": {
                    "input_kind": "features",
                    "input_size": 2,
                    "output_size": 1,
                    "readout": "last_step",
                    "loss": "mse",
                    "metric": "val_mse",
                },
                "task": {"kind": "adding", "seq_len": 10},
            },
        },
        path,
    )

    model = read_model_checkpoint(path)

    assert (model.params, model.problem, model.epoch) == (params, ADDING, 2)
    assert model.task == {"kind": "adding", "seq_len": 10}


class _RunsCode:
    """Unpickling this would run ``touch`` (if it were ever unpickled)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "is not a PyTorch checkpoint"),
        (b"hello: yaml\n", "is not a PyTorch checkpoint"),
        (None, "not loaded, since loading it could run code"),
        ({"state_dict": {}}, "no params and problem"),
        ([1, 2], "not a Lightning checkpoint"),
    ],
    ids=["empty", "text", "code", "not lstm-hpo", "not lightning"],
)
def test_unusable_files_raise_naming_the_file(tmp_path: Path, content: Any, says: str) -> None:
    path = tmp_path / "x.ckpt"
    marker = tmp_path / "ran"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(_RunsCode(marker) if content is None else content, path)

    with pytest.raises(InvalidCheckpoint) as raised:
        read_model_checkpoint(path)

    assert str(path) in raised.value.message
    assert says in raised.value.message
    assert not marker.exists()
