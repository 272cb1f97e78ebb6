"""``study.pruner_warmup_epochs``: the epochs a trial trains before any pruner may stop it."""

from __future__ import annotations

import optuna
import pytest

from service.errors import InvalidSpec
from service.search_space import parse_spec
from service.training.objective import build_pruner


def spec(pruner: str, **study: object) -> dict[str, object]:
    return {
        "task": {"kind": "synthetic"},
        "space": {"max_epochs": 9, "lr": {"type": "float", "low": 1e-4, "high": 1e-1}},
        "study": {"n_trials": 4, "pruner": pruner, **study},
    }


def prunes_at(pruner: str, warmup: int) -> int:
    """The first epoch (0-based step) at which a clearly worse trial is pruned."""
    study = optuna.create_study(
        study_name="warmup",  # Hyperband picks each trial's bracket from a hash of it
        pruner=build_pruner(parse_spec(spec(pruner, pruner_warmup_epochs=warmup))),
    )
    for _ in range(6):  # good trials: the bar to be measured against
        good = study.ask()
        for step in range(9):
            good.report(1.0, step)
            assert not good.should_prune()  # records the rungs it passes (Hyperband, SHA)
        study.tell(good, 1.0)
    bad = study.ask()
    for step in range(9):
        bad.report(100.0, step)
        if bad.should_prune():
            return step
    return -1


@pytest.mark.parametrize("pruner", ["median", "hyperband", "successive_halving"])
def test_no_trial_is_pruned_inside_its_warmup_epochs(pruner: str) -> None:
    for warmup in (1, 4):  # 1: the default, as before; 4: never during epochs 0-3
        step = prunes_at(pruner, warmup)
        if pruner == "hyperband":  # a later bracket's first rung is later still
            assert step >= warmup
        else:
            assert step == warmup


def test_warmup_must_be_a_whole_number_of_epochs() -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(InvalidSpec) as err:
            parse_spec(spec("median", pruner_warmup_epochs=bad))
        assert "pruner_warmup_epochs" in str(err.value)


def test_zero_warmup_lets_the_median_pruner_compare_after_the_first_epoch() -> None:
    assert prunes_at("median", 0) == 0
    assert prunes_at("successive_halving", 0) == 1  # its resource is at least one epoch


def test_a_warmup_that_turns_pruning_off_is_refused() -> None:
    with pytest.raises(InvalidSpec) as err:
        parse_spec(spec("none", pruner_warmup_epochs=2))
    assert "no effect with pruner: none" in str(err.value)
    with pytest.raises(InvalidSpec) as err:
        parse_spec(spec("median", pruner_warmup_epochs=9))  # max_epochs is 9
    [error] = err.value.errors
    assert error.loc == "study.pruner_warmup_epochs" and "below max_epochs (9)" in error.msg
    parse_spec(spec("median", pruner_warmup_epochs=8))
