"""The evaluation suite's pure parts: family specs, the sampler comparison, the tables."""

from __future__ import annotations

import pytest

from bench.evaluate import FAMILIES, TASKS, family_spec, load_base_spec
from bench.harness import StudyRun
from bench.search_efficiency import CONFIGS, compare, config_spec
from service.search_space import CategoricalDistribution, IntDistribution, parse_spec


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_of_every_shipped_spec_is_a_valid_study(task: str, family: str) -> None:
    spec = parse_spec(family_spec(load_base_spec(task, quick=False), family, 3, "x"))
    assert spec.study.seed == 3 and spec.name == "x"
    cell = spec.space["cell"]
    assert cell == ("lstm" if family in ("stacked_lstm", "lstm_1layer") else family)
    layers = spec.space["num_layers"]
    if family == "stacked_lstm":
        low = layers.low if isinstance(layers, IntDistribution) else layers
        assert isinstance(low, int) and low >= 2
    elif family == "lstm_1layer":
        assert layers == 1 and spec.space["dropout"] == 0.0
    else:
        assert "forget_bias" not in spec.space


def test_the_shipped_char_lm_spec_searches_stateful_bptt_on_english_prose() -> None:
    spec = parse_spec(load_base_spec("char_lm", quick=False))
    assert spec.task.kind == "char_lm" and spec.task.dataset == "moby_dick"
    stateful = spec.space["stateful"]
    assert isinstance(stateful, CategoricalDistribution) and True in stateful.choices


def test_the_shipped_airline_spec_is_the_1960_hold_out() -> None:
    task = parse_spec(load_base_spec("forecast", quick=False)).task
    assert task.kind == "forecast"
    assert (task.test_size, task.horizon) == (12, 12)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_search_configurations_set_sampler_pruner_and_seed(config: str) -> None:
    # The shipped adding spec has a pruner warm-up: a configuration without a pruner must
    # still be a valid study.
    spec = parse_spec(config_spec(load_base_spec("adding", quick=False), config, 4))
    assert (spec.study.sampler, spec.study.pruner) == CONFIGS[config]
    assert spec.study.seed == 4


def run(best: float | None, trials: int, pruned: int, wall_s: float = 60.0) -> StudyRun:
    return StudyRun(
        study={},
        trials=[],
        best_so_far=[],
        best_value=best,
        best_config=None,
        wall_s=wall_s,
        trials_per_hour=trials / wall_s * 3600,
        counts={"complete": trials - pruned, "pruned": pruned, "failed": 0},
    )


def test_compare_counts_seeds_where_tpe_hyperband_is_better_or_equal() -> None:
    runs = {
        "tpe_hyperband": [run(0.10, 30, 20), run(0.20, 30, 20), run(None, 30, 30)],
        "tpe": [run(0.10, 10, 0), run(0.15, 10, 0), run(0.30, 10, 0)],
    }
    minimized = compare(runs, maximize=False)
    assert minimized["tpe"]["tpe_hyperband_better_or_equal"] == "1/3"  # tie yes, worse, none
    assert minimized["tpe"]["tpe_hyperband_trials_per_hour_ratio"] == pytest.approx(3.0)
    assert minimized["tpe_hyperband"]["pruned"] == [20, 20, 30]
    maximized = compare(runs, maximize=True)
    assert maximized["tpe"]["tpe_hyperband_better_or_equal"] == "2/3"
