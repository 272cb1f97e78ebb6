"""Spec parsing, validation messages and the (spec, trial) -> resolved config mapping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from service.errors import InvalidConfig, InvalidSpec
from service.search_space import (
    LSTMConfig,
    ResolvedConfig,
    SpecLimits,
    largest_config,
    load_config_file,
    parse_config,
    parse_spec,
    sample_config,
)

REPO = Path(__file__).resolve().parents[2]

ISSUE_EXAMPLE = """
name: adding-t200
task:
  kind: adding
  seq_len: 200
space:
  num_layers: {type: int, low: 1, high: 4}
  hidden_size: {type: int, low: 32, high: 512, log: true}
  hidden_mode: {type: categorical, choices: [tied, pyramid]}
  dropout: {type: float, low: 0.0, high: 0.6}
  init: {type: categorical, choices: [pytorch_default, uniform, xavier_uniform, orthogonal]}
  init_range: 0.05
  forget_bias: {type: categorical, choices: [0.0, 1.0]}
  optimizer: adam
  lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  batch_size: 64
  grad_clip: 5.0
  max_epochs: 5
study:
  n_trials: 20
  direction: minimize
  sampler: tpe
  pruner: hyperband
  seed: 0
"""


def _spec(space: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    return {"task": {"kind": "adding", "seq_len": 20}, "space": space or {}, **top}


def test_issue_example_parses_with_its_values() -> None:
    spec = parse_spec(ISSUE_EXAMPLE)
    assert spec.name == "adding-t200"
    assert spec.task.kind == "adding" and spec.task.seq_len == 200
    assert spec.direction == "minimize"
    assert spec.study.pruner == "hyperband" and spec.study.n_trials == 20
    assert set(spec.searched()) == {
        "num_layers",
        "hidden_size",
        "hidden_mode",
        "dropout",
        "init",
        "forget_bias",
        "lr",
    }


def test_every_shipped_search_space_is_valid() -> None:
    files = sorted((REPO / "search_spaces").glob("*.yaml"))
    assert files, "search_spaces/ ships at least one spec"
    for path in files:
        spec = parse_spec(path.read_text())
        assert spec.task.kind in {"char_lm", "forecast", "classify", "adding", "synthetic"}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            _spec({"dropout": {"type": "float", "low": 0.0, "high": 0.95}}),
            "space.dropout.high: must be <= 0.9",
        ),
        (
            _spec({"num_layers": {"type": "int", "low": 1, "high": 9}}),
            "space.num_layers.high: must be <= 8",
        ),
        (_spec({"hidden_size": 8192}), "space.hidden_size: must be <= 4096"),
        (_spec({"dropuot": 0.1}), "space.dropuot: unknown parameter"),
        (
            _spec({"lr": {"type": "float", "low": 0.1, "high": 0.01}}),
            "space.lr.low: must be <= high (0.01)",
        ),
        (
            _spec({"lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}),
            "space.lr.low: must be > 0 with log: true",
        ),
        (
            _spec({"lr": {"type": "floaty", "low": 0.1, "high": 1.0}}),
            "space.lr.type: must be one of",
        ),
        (
            _spec({"hidden_size": {"type": "float", "low": 8.0, "high": 64.0}}),
            "space.hidden_size.type: hidden_size is an integer: use type: int",
        ),
        (
            _spec({"optimizer": {"type": "int", "low": 1, "high": 3}}),
            "space.optimizer.type: optimizer is not numeric",
        ),
        (
            _spec({"init": {"type": "categorical", "choices": ["he"]}}),
            "space.init.choices.0: input should be 'pytorch_default'",
        ),
        (_spec({"num_layers": 2.5}), "space.num_layers: input should be a valid integer"),
        (_spec({"bptt": 50}), "space.bptt: only for task kind char_lm"),
        (
            {"task": {"kind": "char_lm"}, "space": {"bidirectional": True}},
            "space.bidirectional: not allowed for task kind char_lm",
        ),
        (_spec(study={"n_trials": 0}), "study.n_trials: must be >= 1"),
        (_spec(study={"samplr": "tpe"}), "study.samplr: unknown field"),
        (_spec(study={"sampler": "anneal"}), "study.sampler: input should be"),
        ({"task": {"kind": "adding", "seq_len": 1}}, "task.seq_len: must be >= 2"),
        ({"task": {"kind": "nope"}}, "task.kind: must be one of"),
        ({"space": {}}, "task: required"),
        ({"task": {"kind": "forecast"}}, "task: give exactly one of `dataset`"),
        ({"task": {"kind": "forecast", "path": "x.csv"}}, "task: `column` is required"),
        (_spec(extra_key=1), "extra_key: unknown field"),
        (_spec({"hidden_size_l0": 64}), "space.hidden_size_l0: per-layer widths are sampled"),
        (
            _spec({"lr": {"type": "float", "low": 0.001, "high": 0.1}}, study={"sampler": "grid"}),
            "space.lr: sampler grid needs a `step`",
        ),
        (
            _spec({"num_layers": 3, "hidden_mode": "per_layer", "hidden_sizes": [4, 5]}),
            "hidden_sizes has 2 entries but num_layers is 3",
        ),
        (
            _spec({"forget_bias": {"type": "categorical", "choices": [1.0, 1.0]}}),
            "space.forget_bias.choices: must not repeat a choice",
        ),
        ("task: [", "not valid YAML or JSON at line 1"),
        ("- just\n- a list\n", "a spec must be a mapping"),
        (_spec(name="has spaces"), "name: must be 1-100 letters"),
    ],
)
def test_malformed_spec_names_field_and_rule(data: Any, expected: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        parse_spec(data)
    assert expected in str(info.value), str(info.value)
    assert all(e.msg for e in info.value.errors)


def test_all_errors_are_reported_at_once() -> None:
    data = _spec({"dropout": 2.0, "num_layers": 0}, study={"n_trials": -1})
    with pytest.raises(InvalidSpec) as info:
        parse_spec(data)
    locs = {e.loc for e in info.value.errors}
    assert {"study.n_trials"} <= locs or {"space.dropout", "space.num_layers"} <= locs


def test_limits_from_settings(tmp_path: Path) -> None:
    limits = SpecLimits(max_trials=5, data_roots=(tmp_path,))
    with pytest.raises(InvalidSpec, match=r"study.n_trials: must be <= 5"):
        parse_spec(_spec(study={"n_trials": 6}), limits)
    outside = {"task": {"kind": "char_lm", "path": "/etc/passwd"}}
    with pytest.raises(InvalidSpec, match=r"task.path: must be a file inside the data directories"):
        parse_spec(outside, limits)
    escape = {"task": {"kind": "char_lm", "path": "../../etc/passwd"}}
    with pytest.raises(InvalidSpec, match=r"task.path"):
        parse_spec(escape, limits)
    inside = parse_spec(
        {"task": {"kind": "char_lm", "path": "corpus.txt"}, "study": {"n_trials": 5}}, limits
    )
    assert inside.task.kind == "char_lm"


def test_direction_defaults_from_task_metric() -> None:
    assert parse_spec({"task": {"kind": "classify"}}).direction == "maximize"
    assert parse_spec({"task": {"kind": "char_lm"}}).metric.name == "val_loss"
    assert parse_spec(_spec(study={"direction": "maximize"})).direction == "maximize"


def _tpe_trials(spec_data: Any, n: int) -> list[ResolvedConfig]:
    spec = parse_spec(spec_data)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    configs = []
    for _ in range(n):
        trial = study.ask()
        config = sample_config(trial, spec)
        study.tell(trial, 0.0)
        configs.append(config)
    return configs


def test_sampling_respects_space_and_fixed_values() -> None:
    configs = _tpe_trials(ISSUE_EXAMPLE, 30)
    for c in configs:
        p = c.params
        assert 1 <= p.num_layers <= 4 and 32 <= p.hidden_size <= 512
        assert 0.0 <= p.dropout <= 0.6
        assert p.batch_size == 64 and p.grad_clip == 5.0 and p.max_epochs == 5
        assert p.forget_bias in (0.0, 1.0)
        if p.num_layers == 1:
            assert p.dropout == 0.0
    assert len({c.params.num_layers for c in configs}) > 1


def test_conditional_parameters_are_only_sampled_when_active() -> None:
    spec = parse_spec(
        _spec(
            {
                "num_layers": {"type": "int", "low": 1, "high": 3},
                "hidden_mode": {"type": "categorical", "choices": ["per_layer"]},
                "hidden_size": {"type": "int", "low": 8, "high": 64},
                "dropout": {"type": "float", "low": 0.1, "high": 0.5},
                "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
                "momentum": {"type": "float", "low": 0.5, "high": 0.99},
                "init": {"type": "categorical", "choices": ["uniform", "orthogonal"]},
                "init_range": {"type": "float", "low": 0.01, "high": 0.1},
            }
        )
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(25):
        trial = study.ask()
        config = sample_config(trial, spec).params
        names = set(trial.params)
        layers = {f"hidden_size_l{i}" for i in range(config.num_layers)}
        assert layers <= names and not any(
            f"hidden_size_l{i}" in names for i in range(config.num_layers, 3)
        )
        assert config.hidden_sizes is not None and len(config.hidden_sizes) == config.num_layers
        assert ("dropout" in names) == (config.num_layers > 1)
        assert ("momentum" in names) == (config.optimizer == "sgd")
        assert ("init_range" in names) == (config.init == "uniform")
        study.tell(trial, 0.0)


def test_fixed_trial_replays_the_same_config() -> None:
    spec = parse_spec(ISSUE_EXAMPLE)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=3))
    trial = study.ask()
    config = sample_config(trial, spec)
    replayed = sample_config(optuna.trial.FixedTrial(trial.params), spec)
    assert replayed == config


def test_layer_sizes_for_each_mode() -> None:
    assert LSTMConfig(num_layers=3, hidden_size=64).layer_sizes() == (64, 64, 64)
    assert LSTMConfig(num_layers=4, hidden_size=64, hidden_mode="pyramid").layer_sizes() == (
        64,
        32,
        16,
        8,
    )
    assert LSTMConfig(num_layers=5, hidden_size=32, hidden_mode="pyramid").layer_sizes()[-1] == 8
    per = LSTMConfig(num_layers=2, hidden_mode="per_layer", hidden_sizes=(10, 20))
    assert per.layer_sizes() == (10, 20)
    assert LSTMConfig(num_layers=1, dropout=0.5).dropout == 0.0


def test_largest_config_takes_the_top_of_every_range() -> None:
    params = largest_config(parse_spec(ISSUE_EXAMPLE)).params
    assert params.num_layers == 4 and params.hidden_size == 512 and params.lr == pytest.approx(1e-2)


def test_resolved_config_round_trips_through_yaml(tmp_path: Path) -> None:
    config = _tpe_trials(ISSUE_EXAMPLE, 1)[0]
    path = tmp_path / "best.yaml"
    path.write_text(config.to_yaml())
    assert load_config_file(path) == config
    assert parse_config(yaml.safe_load(config.to_yaml())) == config


def test_parse_config_accepts_a_fully_fixed_spec_and_refuses_a_searching_one() -> None:
    fixed = parse_config(_spec({"num_layers": 1, "hidden_size": 16}))
    assert fixed.params.num_layers == 1 and fixed.params.hidden_size == 16
    with pytest.raises(InvalidConfig, match="space: still searches lr"):
        parse_config(_spec({"lr": {"type": "float", "low": 0.001, "high": 0.01}}))
    with pytest.raises(InvalidConfig, match=r"params.dropout: must be <= 0.9"):
        parse_config({"task": {"kind": "adding"}, "params": {"dropout": 1.5}})
    with pytest.raises(
        InvalidConfig, match=r"params: bidirectional is not allowed for task kind char_lm"
    ):
        parse_config({"task": {"kind": "char_lm"}, "params": {"bidirectional": True}})
    with pytest.raises(InvalidConfig, match="cannot read"):
        load_config_file("/nonexistent/config.yaml")
