"""``study.enqueue`` and ``study.warm_start_from`` as spec fields: every enqueued value is
a point of the space, named by its Optuna name, used by its entry, and stored typed; the
stored spec (what workers re-parse) round-trips."""

from __future__ import annotations

import json
from typing import Any

import pytest

from service.errors import InvalidSpec
from service.search_space import (
    STORED_SPEC_LIMITS,
    CategoricalDistribution,
    IntDistribution,
    parse_spec,
    searched_distributions,
)

SPACE: dict[str, Any] = {
    "num_layers": {"type": "int", "low": 1, "high": 3},
    "hidden_size": {"type": "int", "low": 32, "high": 256, "step": 32},
    "hidden_mode": {"type": "categorical", "choices": ["tied", "per_layer"]},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.1},
    "init": {"type": "categorical", "choices": ["pytorch_default", "uniform"]},
    "init_range": {"type": "float", "low": 0.01, "high": 0.1},
    "forget_bias": {"type": "categorical", "choices": [None, 1.0]},
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "max_epochs": 2,
}


def _spec(enqueue: Any = None, **study: Any) -> dict[str, Any]:
    return {
        "task": {"kind": "synthetic"},
        "space": SPACE,
        "study": {"n_trials": 5, "enqueue": enqueue} | study,
    }


def _errors(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidSpec) as err:
        parse_spec(data)
    return {e.loc: e.msg for e in err.value.errors}


def test_enqueued_values_are_stored_typed_and_round_trip() -> None:
    entries = [
        {"num_layers": 2.0, "hidden_size": "64", "dropout": 0.3, "lr": 1e-2},
        {"init": "uniform", "init_range": 0.05, "forget_bias": None},
        {"hidden_mode": "per_layer", "num_layers": 2, "hidden_size_l0": 128, "hidden_size_l1": 64},
    ]
    spec = parse_spec(_spec(entries, warm_start_from=["0123abcd", "other-study_1"]))
    assert spec.study.enqueue is not None
    assert spec.study.enqueue[0] == {"num_layers": 2, "hidden_size": 64, "dropout": 0.3, "lr": 0.01}
    assert type(spec.study.enqueue[0]["num_layers"]) is int
    assert spec.study.warm_start_from == ("0123abcd", "other-study_1")
    stored = json.loads(json.dumps(spec.model_dump(mode="json")))
    assert parse_spec(stored, STORED_SPEC_LIMITS) == spec
    assert parse_spec(json.loads(json.dumps(parse_spec(_spec()).model_dump(mode="json"))))


def test_searched_distributions_name_the_per_layer_widths() -> None:
    dists = searched_distributions(parse_spec(_spec()))
    assert dists["hidden_size_l2"] == dists["hidden_size"]
    assert isinstance(dists["hidden_size"], IntDistribution)
    assert "hidden_size_l3" not in dists and "max_epochs" not in dists
    only = parse_spec(_spec() | {"space": SPACE | {"hidden_mode": "per_layer", "hidden_size": 64}})
    assert "hidden_size" not in searched_distributions(only)  # fixed: nothing per layer
    assert isinstance(searched_distributions(only)["num_layers"], IntDistribution)
    assert isinstance(searched_distributions(parse_spec(_spec()))["init"], CategoricalDistribution)


@pytest.mark.parametrize(
    ("entry", "loc", "msg"),
    [
        ({"hidden_size": 48}, "hidden_size", "must be on the space's step: 32 + k * 32"),
        ({"hidden_size": 512}, "hidden_size", "must be within the space's range [32, 256]"),
        ({"dropout": 0.25}, "dropout", "must be on the space's step: 0.0 + k * 0.1"),
        ({"lr": True}, "lr", "must be a number"),
        ({"lr": "fast"}, "lr", "must be a number"),
        ({"num_layers": 1.5}, "num_layers", "must be an integer"),
        ({"init": "orthogonal"}, "init", "must be one of the space's choices: pytorch_default"),
        ({"forget_bias": 0.0}, "forget_bias", "must be one of the space's choices: null, 1.0"),
        ({"max_epochs": 3}, "max_epochs", "fixed in the space (to 2): leave it out"),
        ({"batch_size": 32}, "batch_size", "not searched in this space"),
        ({"hidden": 32}, "hidden", "unknown parameter (this space searches: dropout,"),
        ({"hidden_size_l7": 64}, "hidden_size_l7", "unknown parameter"),
        (
            {"init": "pytorch_default", "init_range": 0.05},
            "init_range",
            "only used with init: uniform",
        ),
        (
            {"init_range": 0.05},
            "init_range",
            "only used with init: uniform; give init in this entry too",
        ),
        ({"num_layers": 1, "dropout": 0.2}, "dropout", "only used with num_layers >= 2"),
        (
            {"hidden_mode": "per_layer", "num_layers": 2, "hidden_size_l2": 64},
            "hidden_size_l2",
            "only used with hidden_mode: per_layer and num_layers >= 3",
        ),
        (
            {"hidden_mode": "per_layer", "hidden_size": 64},
            "hidden_size",
            "not used with hidden_mode: per_layer",
        ),
    ],
)
def test_an_entry_outside_the_space_is_refused_naming_index_and_field(
    entry: dict[str, Any], loc: str, msg: str
) -> None:
    errors = _errors(_spec([{"lr": 0.01}, entry]))
    assert f"study.enqueue.1.{loc}" in errors, errors
    assert errors[f"study.enqueue.1.{loc}"].startswith(msg), errors
    assert not any(k.startswith("study.enqueue.0") for k in errors)


def test_enqueue_and_warm_start_as_a_whole() -> None:
    assert _errors(_spec([{}])) == {
        "study.enqueue.0": "empty: give at least one searched parameter"
    }
    many = _errors(_spec([{"lr": 0.01}] * 6))
    assert many["study.enqueue"].startswith("lists 6 configurations, more than study.n_trials (5)")
    assert "study.enqueue.0" in _errors(_spec(["lr"]))  # not a mapping
    for field, value in (("enqueue", [{"num_layers": 2}]), ("warm_start_from", ["abc"])):
        grid: dict[str, Any] = {
            "task": {"kind": "synthetic"},
            "space": {"num_layers": {"type": "int", "low": 1, "high": 3}},
            "study": {"n_trials": 2, "sampler": "grid", field: value},
        }
        errors = _errors(grid)
        assert errors[f"study.{field}"].startswith("not with sampler grid"), errors
    assert _errors(_spec(warm_start_from=["a", "b", "a"])) == {
        "study.warm_start_from.2": "repeats study.warm_start_from.0"
    }
    assert _errors(_spec(warm_start_from=["../etc"]))["study.warm_start_from.0"].startswith(
        "must be a study id"
    )
    assert "study.warm_start_from" in _errors(_spec(warm_start_from=["x"] * 21))
