"""The statistics of a confirmation (service.confirm): Student's t against closed forms
and scipy, mean / sd / 95% interval against a hand-computed example, the paired test
against a known value; the request's bounds; the derived spec (round trip through the
stored-spec limits, seeds distinct from the study's)."""

from __future__ import annotations

import math
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from service.confirm import (
    confirm_request,
    confirmation_seeds,
    confirmation_spec,
    paired_t_test,
    summarize,
    t_critical,
    t_two_sided_p,
)
from service.errors import InvalidSpec
from service.search_space import STORED_SPEC_LIMITS, parse_spec, sample_config
from service.training.objective import synthetic_test_value


def test_t_distribution_matches_its_closed_forms() -> None:
    # df 1 (Cauchy): P(|T| >= t) = 1 - 2 atan(t) / pi; df 2: 1 - t / sqrt(2 + t^2).
    for t in (0.0, 0.3, 1.0, 2.0, 12.706):
        assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, abs=1e-15)
        assert t_two_sided_p(-t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-15)
    assert t_two_sided_p(2.0, 2) == pytest.approx(0.18350341907227397, abs=1e-15)
    assert t_two_sided_p(math.inf, 5) == 0.0
    # Textbook two-sided 95% critical values.
    for df, critical in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (19, 2.093)):
        assert t_critical(df) == pytest.approx(critical, abs=5e-4)


def test_t_distribution_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")  # the dev extra has it (statsmodels)
    for df in range(1, 41):
        assert t_critical(df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-10)
        assert t_critical(df, 0.99) == pytest.approx(stats.t.ppf(0.995, df), rel=1e-10)
        for t in (0.0, 0.1, 0.5, 1.0, 1.96, 2.5, 4.0, 8.0, 30.0):
            expected = 2 * stats.t.sf(t, df)
            assert t_two_sided_p(t, df) == pytest.approx(expected, rel=1e-9, abs=1e-14), (t, df)


def test_summary_of_a_hand_computed_example() -> None:
    s = summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3; sd sqrt(10 / 4) = 1.5811; t(0.975, 4) = 2.7764; half 2.7764 * 1.5811 / sqrt 5
    assert (s.n, s.mean) == (5, 3.0)
    assert s.sd == pytest.approx(1.5811388300841898, rel=1e-12)
    assert s.ci95_low == pytest.approx(3 - 1.9632432, abs=1e-6)
    assert s.ci95_high == pytest.approx(3 + 1.9632432, abs=1e-6)
    one = summarize([0.5])
    assert (one.n, one.mean, one.sd, one.ci95_low) == (1, 0.5, None, None)
    assert summarize([]).mean is None


def test_paired_t_test_against_a_known_value_and_scipy() -> None:
    best = [0.50, 0.52, 0.49, 0.51, 0.53]
    runner_up = [0.53, 0.55, 0.50, 0.54, 0.56]
    # d = best - runner_up = -0.03, -0.03, -0.01, -0.03, -0.03: mean -0.026, sd sqrt(8e-5),
    # t = -0.026 / (sqrt(8e-5) / sqrt 5) = -6.5 with 4 degrees of freedom; by hand (A&S
    # 26.7.4, theta = atan(6.5 / 2)): p = 1 - sin(theta) (1 + cos(theta)^2 / 2) = 0.0028900.
    test = paired_t_test(best, runner_up)
    assert (test.n, test.df) == (5, 4)
    assert test.mean_difference == pytest.approx(-0.026, abs=1e-12)
    assert test.t == pytest.approx(-6.5, rel=1e-9)
    assert test.p_value == pytest.approx(0.0028900071, abs=1e-10)
    low, mean, high = test.ci95_low, test.mean_difference, test.ci95_high
    assert low is not None and mean is not None and high is not None
    assert low < mean < high < 0
    stats = pytest.importorskip("scipy.stats")
    expected = stats.ttest_rel(best, runner_up)
    assert test.t == pytest.approx(expected.statistic, rel=1e-9)
    assert test.p_value == pytest.approx(expected.pvalue, rel=1e-9)
    # Differences that do not vary: no t; p 0 for a constant gap, 1 for none.
    constant = paired_t_test([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])
    assert (constant.t, constant.p_value) == (None, 0.0)
    assert paired_t_test([1.0, 2.0], [1.0, 2.0]).p_value == 1.0
    assert paired_t_test([1.0], [2.0]).p_value is None


def test_confirm_request_defaults_bounds_and_fields() -> None:
    assert confirm_request(None) == (3, 5)
    assert confirm_request({}) == (3, 5)
    assert confirm_request({"top_k": 1, "seeds": 20.0}) == (1, 20)

    def errors(document: Any) -> list[tuple[str, str]]:
        with pytest.raises(InvalidSpec) as err:
            confirm_request(document)
        return [(e.loc, e.msg) for e in err.value.errors]

    assert errors({"top_k": 0, "seeds": 1}) == [
        ("top_k", "must be within 1..20 (configs to confirm)"),
        ("seeds", "must be within 2..20 (a mean's interval and the paired test need 2)"),
    ]
    assert errors({"top_k": 21, "seeds": True}) == [
        ("top_k", "must be within 1..20 (configs to confirm)"),
        ("seeds", "must be a whole number"),
    ]
    assert errors({"top_k": "3.5", "k": 2}) == [
        ("k", "unknown field (top_k, seeds)"),
        ("top_k", "must be a whole number"),
    ]
    assert confirm_request({"top_k": "3", "seeds": "4"}) == (3, 4)  # as a spec reads "3"
    assert errors([3, 5])[0][0] == ""


def test_confirmation_seeds_skip_the_seeds_the_study_used() -> None:
    assert confirmation_seeds(set(), 3) == [1000, 1001, 1002]
    assert confirmation_seeds({0, 1001, 1003}, 4) == [1000, 1002, 1004, 1005]


PARENT: dict[str, Any] = {
    "name": "p",
    "task": {"kind": "synthetic"},
    "space": {
        "num_layers": {"type": "int", "low": 1, "high": 3},
        "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
        "momentum": {"type": "float", "low": 0.0, "high": 0.9},
        "seed": {"type": "int", "low": 0, "high": 2000},
        "max_epochs": 2,
    },
    "study": {"n_trials": 10, "sampler": "tpe", "pruner": "median", "timeout_s": 60, "seed": 3},
}


def _trial(number: int, value: float, **params: Any) -> optuna.trial.FrozenTrial:
    dists: dict[str, optuna.distributions.BaseDistribution] = {
        "num_layers": IntDistribution(1, 3),
        "optimizer": CategoricalDistribution(["adam", "sgd"]),
        "momentum": FloatDistribution(0.0, 0.9),
        "seed": IntDistribution(0, 2000),
    }
    trial = optuna.trial.create_trial(
        state=TrialState.COMPLETE,
        value=value,
        params=params,
        distributions={k: dists[k] for k in params},
    )
    trial.number = number
    return trial


def test_the_derived_spec_validates_and_round_trips_as_a_stored_spec() -> None:
    spec = parse_spec(PARENT)
    top = [
        _trial(4, 0.1, num_layers=2, optimizer="sgd", momentum=0.5, seed=1000),
        _trial(1, 0.2, num_layers=1, optimizer="adam", seed=7),
    ]
    seeds = confirmation_seeds({1000, 7}, 3)
    derived = parse_spec(confirmation_spec(spec, "abc123", top, seeds), STORED_SPEC_LIMITS)
    assert seeds == [1001, 1002, 1003]
    assert derived.name == "p-confirm"
    study = derived.study
    assert (study.n_trials, study.sampler, study.pruner, study.confirm_of) == (
        6,
        "random",
        "none",
        "abc123",
    )
    assert study.timeout_s is None and study.seed is None
    assert study.enqueue is not None and len(study.enqueue) == 6
    assert study.enqueue[0] == {"num_layers": 2, "optimizer": "sgd", "momentum": 0.5, "seed": 1001}
    assert study.enqueue[5] == {"num_layers": 1, "optimizer": "adam", "seed": 1003}
    # Stored and re-read by a worker: the defaults written back validate, unchanged.
    stored = derived.model_dump(mode="json")
    assert parse_spec(stored, STORED_SPEC_LIMITS).model_dump(mode="json") == stored
    # The marker defaults to null, and a plain spec round-trips with it too.
    plain = spec.model_dump(mode="json")
    assert plain["study"]["confirm_of"] is None
    assert parse_spec(plain, STORED_SPEC_LIMITS).model_dump(mode="json") == plain


def test_the_synthetic_stand_in_test_value_is_deterministic_and_seeded() -> None:
    spec = parse_spec({"task": {"kind": "synthetic"}, "space": {"seed": 1000}})
    config = sample_config(optuna.trial.FixedTrial({}), spec)
    other = sample_config(
        optuna.trial.FixedTrial({}), parse_spec({"task": {"kind": "synthetic"}, "space": {}})
    )
    assert synthetic_test_value(config) == synthetic_test_value(config)
    assert synthetic_test_value(config) != synthetic_test_value(other)


def test_every_test_metric_of_the_confirmed_trials_is_summarised_per_config() -> None:
    """What a classify confirmation reports beside the ranked metric's test twin (test
    cross-entropy): accuracy over the seeds; failed seeds, other configs and non-finite
    values stay out."""
    from service.confirm import _Config, _config_public, _runs
    from service.states import TEST_METRICS_ATTR

    configs = [_Config(3, 0.01, {"num_layers": 1}), _Config(5, 0.02, {"num_layers": 2})]
    trials = []
    for number, (layers, seed, acc) in enumerate(
        [(1, 1000, 0.97), (1, 1001, 0.99), (2, 1000, 0.95), (2, 1001, float("nan"))]
    ):
        trial = _trial(number, 0.1, num_layers=layers, seed=seed)
        trial.set_user_attr(TEST_METRICS_ATTR, {"test_acc": acc, "test_loss": 0.2})
        trials.append(trial)
    trials.append(_trial(9, 0.1, num_layers=3, seed=1000))  # not a confirmed config

    one, two = (
        _config_public(i + 1, r, [1000, 1001])
        for i, r in enumerate(_runs(configs, [1000, 1001], trials))
    )

    assert one.test_metrics["test_acc"].mean == pytest.approx(0.98)
    assert one.test_metrics["test_acc"].values == {1000: 0.97, 1001: 0.99}
    assert one.test_metrics["test_acc"].sd == pytest.approx(0.0141421356)
    assert two.test_metrics["test_acc"].values == {1000: 0.95}  # the NaN left out
    assert sorted(one.test_metrics) == ["test_acc", "test_loss"]


@pytest.mark.parametrize("keep_notify", [False, True])
def test_the_derived_spec_drops_confirm_and_keeps_the_webhook_only_when_asked(
    keep_notify: bool,
) -> None:
    """A confirmation is never confirmed again; ``study.confirm``'s confirmation (nobody
    waits on it) tells the study's webhook, one asked for over the API does not."""
    hook = {"url": "https://hooks.example.com/ci", "on": ["finished"]}
    spec = parse_spec(
        PARENT | {"study": PARENT["study"] | {"notify": hook, "confirm": True}},
        STORED_SPEC_LIMITS,
    )
    top = [_trial(0, 0.1, num_layers=2, seed=0)]

    doc = confirmation_spec(spec, "abc123", top, [1000, 1001], keep_notify=keep_notify)
    derived = parse_spec(doc, STORED_SPEC_LIMITS).study

    assert derived.confirm is None
    assert (derived.notify is not None) == keep_notify
    if derived.notify is not None:
        assert derived.notify.url == hook["url"] and derived.notify.on == ("finished",)
