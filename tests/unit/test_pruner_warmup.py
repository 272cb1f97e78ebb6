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


def test_warmup_must_be_a_positive_number_of_epochs() -> None:
    with pytest.raises(InvalidSpec) as err:
        parse_spec(spec("median", pruner_warmup_epochs=0))
    assert [e.loc for e in err.value.errors] == ["study.pruner_warmup_epochs"]
