"""char_lm ``stateful: true`` (truncated BPTT over contiguous streams) and the bundled corpora."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from service.corpora import MOBY_DICK_CHARS, MOBY_DICK_VOCAB_BOUND, load_corpus
from service.data_checks import check_task_data
from service.errors import DataError, InvalidConfig, InvalidSpec
from service.search_space import CharLMTask, LSTMConfig, parse_config, parse_spec
from service.training.data import build_task_data
from service.training.data.char_lm import StreamBatches
from service.training.fit import silence_lightning
from service.training.module import LSTMLightningModule

#: Every test here trains: one torch thread, as a worker runs (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_stream_batches_continue_row_by_row_and_target_every_character_once() -> None:
    ids = np.arange(103, dtype=np.int64)  # 3 streams of 34, one character dropped
    batches = StreamBatches(ids, streams=3, bptt=10)
    assert len(batches) == 4  # 33 targets per row: 10 + 10 + 10 + 3
    xs, ys = zip(*(batches[i] for i in range(len(batches))), strict=True)
    assert [tuple(x.shape) for x in xs] == [(3, 10), (3, 10), (3, 10), (3, 3)]
    x, y = torch.cat(xs, dim=1), torch.cat(ys, dim=1)
    # Row r is the r-th contiguous third of the stream; targets are the inputs shifted by one.
    assert x[:, 0].tolist() == [0, 34, 68]
    assert torch.equal(y, x + 1)
    assert torch.equal(torch.cat([x[:, :1], y], dim=1), torch.arange(102).view(3, 34))
    with pytest.raises(IndexError):
        batches[4]


def test_stream_batches_refuse_a_split_too_small_for_the_batch_size() -> None:
    with pytest.raises(DataError, match=r"val split \(9 characters\).*batch_size 5.*<= 4"):
        StreamBatches(np.zeros(9, dtype=np.int64), streams=5, bptt=4, split="val")


def tiny_stateful(tmp_path: Path, **params: object) -> tuple[CharLMTask, LSTMConfig]:
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("abcde "), size=6000))
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    task = CharLMTask(kind="char_lm", path=str(tmp_path / "t.txt"), val_fraction=0.1)
    base = {"num_layers": 2, "hidden_size": 12, "batch_size": 4, "bptt": 16, "max_epochs": 1}
    return task, LSTMConfig.model_validate({**base, "stateful": True, **params})


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_stateful_evaluation_equals_one_pass_over_each_stream(tmp_path: Path, cell: str) -> None:
    """Carrying the state between evaluation batches is exactly one forward pass over each
    whole stream: the logged val_loss equals that computed in one call."""
    silence_lightning()
    task, params = tiny_stateful(tmp_path, cell=cell)
    data = build_task_data(task, params)
    L.seed_everything(0, verbose=False)
    module = LSTMLightningModule.from_config(data.problem, params)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data.datamodule)
    logged = trainer.validate(module, datamodule=data.datamodule, verbose=False)[0]["val_loss"]

    val = data.datamodule.val_dataloader().dataset
    assert isinstance(val, StreamBatches) and len(val) > 1  # several carried pieces
    rows = val.rows
    module.eval()
    with torch.no_grad():
        logits, _ = module.model.forward_stateful(rows[:, :-1], None)
        expected = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()).item()
    assert logged == pytest.approx(expected, rel=1e-5)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_stateful_training_carries_and_detaches_the_state(tmp_path: Path) -> None:
    silence_lightning()
    task, params = tiny_stateful(tmp_path)
    data = build_task_data(task, params)
    module = LSTMLightningModule.from_config(data.problem, params)
    batches = iter(data.datamodule.train_dataloader())
    first, second = next(batches), next(batches)
    module.training_step(first, 0)
    carried = module._states["train"]
    assert carried is not None
    for tensor in torch.utils._pytree.tree_leaves(carried):
        assert tensor.grad_fn is None and not tensor.requires_grad
        assert tensor.shape[-2:] == (params.batch_size, params.hidden_size)
    loss = module.training_step(second, 1)
    loss.backward()  # type: ignore[no-untyped-call]  # the graph stops at the batch boundary: nothing of batch 1 is needed
    assert module._states["train"] is not carried
    module.on_train_epoch_start()
    assert "train" not in module._states


def spec(task: dict[str, object], space: dict[str, object]) -> dict[str, object]:
    return {"name": "s", "task": task, "space": space, "study": {"n_trials": 2}}


def test_stateful_is_searchable_for_char_lm_and_refused_elsewhere() -> None:
    ok = parse_spec(
        spec({"kind": "char_lm"}, {"stateful": {"type": "categorical", "choices": [False, True]}})
    )
    assert "stateful" in ok.searched()
    with pytest.raises(InvalidSpec) as err:
        parse_spec(spec({"kind": "adding"}, {"stateful": True}))
    assert [e.loc for e in err.value.errors] == ["space.stateful"]
    assert "only for task kind char_lm" in err.value.errors[0].msg


def test_moby_dick_is_bundled_english_prose() -> None:
    text, source = load_corpus("moby_dick", 10**8)
    assert len(text) == MOBY_DICK_CHARS
    assert len(set(text)) + 1 <= MOBY_DICK_VOCAB_BOUND
    assert text.startswith("CHAPTER 1. Loomings.\n\nCall me Ishmael.")
    assert "public domain" in source
    data = build_task_data(
        CharLMTask(kind="char_lm", dataset="moby_dick", max_chars=20_000), LSTMConfig(bptt=50)
    )
    assert data.description.startswith("char_lm: moby_dick")
    assert data.problem.input_size <= MOBY_DICK_VOCAB_BOUND


def test_char_lm_dataset_and_path_are_exclusive_and_splits_are_checked() -> None:
    with pytest.raises(InvalidSpec) as err:
        parse_spec(spec({"kind": "char_lm", "dataset": "moby_dick", "path": "a.txt"}, {}))
    assert "not both" in str(err.value)
    with pytest.raises(InvalidSpec) as err:
        parse_spec(spec({"kind": "char_lm", "dataset": "shakespeare"}, {}))
    assert err.value.errors[0].loc == "task.dataset"
    # moby_dick holds 1.19 M characters whatever max_chars asks: 5% of it holds bptt 1000.
    big = parse_spec(
        spec({"kind": "char_lm", "dataset": "moby_dick", "max_chars": 10**8}, {"bptt": 1000})
    )
    check_task_data(big, None)
    small = parse_spec(
        spec({"kind": "char_lm", "dataset": "moby_dick", "max_chars": 5_000}, {"bptt": 1000})
    )
    with pytest.raises(InvalidSpec) as err:
        check_task_data(small, None)
    assert err.value.errors[0].loc == "task.max_chars"


def test_forecast_test_size_is_the_airline_1960_hold_out() -> None:
    from service.search_space import ForecastTask

    task = ForecastTask(kind="forecast", dataset="airline", test_size=12, val_fraction=0.1)
    data = build_task_data(task, LSTMConfig(batch_size=64))
    assert "(train 118 / val 14 / test 12)" in data.description
    test = data.datamodule.test_dataloader().dataset
    assert len(test) == 12
    assert dataclasses.asdict(data.problem)["metric"] == "val_rmse"


def test_a_stateful_space_whose_batch_cannot_be_cut_from_a_split_is_refused() -> None:
    space = {
        "stateful": {"type": "categorical", "choices": [False, True]},
        "bptt": 50,
        "batch_size": {"type": "categorical", "choices": [64, 4096]},
    }
    task = {"kind": "char_lm", "dataset": "moby_dick", "max_chars": 100_000}
    with pytest.raises(InvalidSpec) as err:
        check_task_data(parse_spec(spec(task, space)), None)
    [error] = err.value.errors
    assert error.loc == "space.batch_size"
    assert "val split (5,000 characters)" in error.msg and "batch_size <= 2500" in error.msg
    check_task_data(parse_spec(spec(task, {**space, "stateful": False})), None)


def test_stateful_in_a_resolved_config_of_another_task_is_refused() -> None:
    with pytest.raises(InvalidConfig, match="stateful: only for task kind char_lm"):
        parse_config({"task": {"kind": "adding", "seq_len": 10}, "params": {"stateful": True}})
    parse_config({"task": {"kind": "adding", "seq_len": 10}, "params": {"stateful": False}})


@pytest.mark.parametrize(
    ("task", "study", "message"),
    [
        (
            {"kind": "forecast", "dataset": "airline", "test_size": True},
            {},
            "test_size: must be a number",
        ),
        (
            {"kind": "forecast", "dataset": "airline", "lookback": False},
            {},
            "lookback: must be a number",
        ),
        ({"kind": "adding"}, {"n_trials": True}, "n_trials: must be a number"),
        (
            {"kind": "adding"},
            {"pruner_warmup_epochs": True},
            "pruner_warmup_epochs: must be a number",
        ),
    ],
)
def test_true_and_false_are_never_numbers(
    task: dict[str, object], study: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidSpec, match=message):
        parse_spec({"task": task, "space": {}, "study": {"n_trials": 2, **study}})


def test_forecast_test_size_errors_name_it() -> None:

    def errors(**task: object) -> list[tuple[str, str]]:
        spec = {
            "task": {"kind": "forecast", "dataset": "airline", **task},
            "study": {"n_trials": 1},
        }
        try:
            check_task_data(parse_spec(spec), None)
        except InvalidSpec as err:
            return [(e.loc, e.msg) for e in err.errors]
        return []

    assert errors(test_size=12) == []
    assert errors(test_size=144) == [
        ("task.test_size", "must be below the 144 points of the airline series (it is 144)")
    ]
    [(loc, msg)] = errors(test_size=12, horizon=13)
    assert loc == "task.test_size" and "at least horizon (13)" in msg
    # A stored or best config writes every field back: it must read back (round trip).
    spec = parse_spec(
        {
            "task": {"kind": "forecast", "dataset": "airline", "test_size": 12},
            "study": {"n_trials": 1},
        }
    )
    config = parse_config({"task": spec.task.model_dump(mode="json"), "params": {}})
    assert parse_config(yaml.safe_load(config.to_yaml())) == config
    assert config.task.model_dump()["test_size"] == 12
    with pytest.raises(InvalidSpec, match="not both"):
        parse_spec(
            {
                "task": {
                    "kind": "forecast",
                    "dataset": "airline",
                    "test_size": 12,
                    "test_fraction": 0.3,
                },
                "study": {"n_trials": 1},
            }
        )


def test_the_default_corpus_is_named_and_its_real_length_is_checked_at_submit() -> None:
    task = parse_spec({"task": {"kind": "char_lm"}, "study": {"n_trials": 1}}).task
    assert task.kind == "char_lm" and task.dataset == "python_stdlib"
    # max_chars far above what the standard library holds: the splits are checked against
    # what it really holds, so a bptt that cannot fit is a 422 and never a failed trial.
    big = {
        "kind": "char_lm",
        "max_chars": 200_000_000,
        "val_fraction": 0.001,
        "test_fraction": 0.001,
    }
    with pytest.raises(InvalidSpec) as err:
        check_task_data(
            parse_spec({"task": big, "space": {"bptt": 50_000}, "study": {"n_trials": 1}}), None
        )
    assert err.value.errors[0].loc == "task.max_chars"
