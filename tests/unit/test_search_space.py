"""Spec parsing, validation messages and the (spec, trial) -> resolved config mapping."""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from pydantic import ValidationError

from service.api.routes.studies import _json_document
from service.config import Settings
from service.errors import InvalidConfig, InvalidSpec
from service.search_space import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    LSTMConfig,
    ResolvedConfig,
    SpecLimits,
    SyntheticTask,
    largest_config,
    load_config_file,
    load_spec_file,
    lowest_config,
    parse_config,
    parse_spec,
    sample_config,
)
from service.training.objective import grid_search_space

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
        (
            {"task": {"kind": "classify", "metric": "val_rmse"}},
            "task.metric: input should be 'val_acc' or 'val_loss'",
        ),
        ({"task": {"kind": "adding", "metric": "val_loss"}}, "task.metric: unknown field"),
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
        (_spec(name="has spaces"), "name: must be 1-100 ASCII letters"),
        (_spec(name="café"), "name: must be 1-100 ASCII letters"),
        # At the field's path (was "study: n_trials: must be ...").
        (_spec(study={"n_trials": True}), "study.n_trials: must be a number, not true/false"),
        # As a parameter's true/false: YAML 1.1's words and numbers are not booleans.
        (
            _spec({"hidden_size": {"type": "int", "low": 8, "high": 64, "log": "yes"}}),
            "space.hidden_size.log: must be true or false (got the text 'yes'",
        ),
        (
            _spec({"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": 1}}),
            "space.lr.log: must be true or false (got 1)",
        ),
        (
            {"task": {"kind": "synthetic", "fail_when": {"num_layer": 2}}},
            "task.fail_when: unknown parameter(s) 'num_layer'",
        ),
        # A value the parameter never takes: a condition that never fires.
        (
            {"task": {"kind": "synthetic", "nan_when": {"num_layers": "two"}}},
            "task.nan_when: num_layers: 'two' is not a value it takes",
        ),
        (
            {"task": {"kind": "synthetic", "hang_when": {"cell": ["gru", "lsmt"]}}},
            "cell: 'lsmt' is not a value it takes (Input should be 'lstm', 'gru' or 'rnn')",
        ),
        (
            {"task": {"kind": "synthetic", "fail_when": {"dropout": 5}}},
            "dropout: 5 is not a value it takes (Input should be less than or equal to 0.9)",
        ),
        (
            {"task": {"kind": "synthetic", "fail_when": {"num_layers": None}}},
            "num_layers: None is not a value it takes",
        ),
        # A tester's: lax pydantic read true as 1; an empty list or {} matches nothing; a
        # list in a list is no value of a number; a per-layer width list names its bad width.
        (
            {"task": {"kind": "synthetic", "fail_when": {"num_layers": True}}},
            "num_layers: true/false is not a value it takes",
        ),
        (
            {"task": {"kind": "synthetic", "fail_when": {"hidden_sizes": [True]}}},
            "hidden_sizes: true/false is not a value it takes",
        ),
        (
            {"task": {"kind": "synthetic", "nan_when": {"num_layers": []}}},
            "num_layers: an empty list is not a value it takes",
        ),
        (
            {"task": {"kind": "synthetic", "nan_when": {"hidden_sizes": [[]]}}},
            "hidden_sizes: an empty list is not a value it takes",
        ),
        (
            {"task": {"kind": "synthetic", "hang_when": {}}},
            "task.hang_when: names no parameter: it would never fire",
        ),
        (
            {"task": {"kind": "synthetic", "fail_when": {"num_layers": [[1, 2]]}}},
            "num_layers: [1, 2] is not a value it takes (Input should be a valid integer)",
        ),
        (
            {"task": {"kind": "synthetic", "fail_when": {"hidden_sizes": [64, 0]}}},
            "hidden_sizes[1]: [64, 0] is not a value it takes (Input should be greater than",
        ),
    ],
)
def test_malformed_spec_names_field_and_rule(data: Any, expected: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        parse_spec(data)
    assert expected in str(info.value), str(info.value)
    assert all(e.msg for e in info.value.errors)


def test_synthetic_conditions_are_read_as_the_parameter_reads_them() -> None:
    """``num_layers: "2"`` is 2, as everywhere in a spec (was: kept as text, never equal to
    the config's 2); a list is "one of"; a per-layer width list is a value."""
    task = parse_spec(
        {
            "task": {
                "kind": "synthetic",
                "fail_when": {"num_layers": "2", "lr": [0.01, "1e-3"], "cell": ["gru"]},
                "nan_when": {"hidden_sizes": [8, 16], "forget_bias": None},
            }
        }
    ).task
    assert isinstance(task, SyntheticTask)
    assert task.fail_when == {"num_layers": 2, "lr": [0.01, 0.001], "cell": ["gru"]}
    assert task.nan_when == {"hidden_sizes": [8, 16], "forget_bias": None}
    one_of = parse_spec(
        {"task": {"kind": "synthetic", "hang_when": {"hidden_sizes": [[64, 32], [128]]}}}
    ).task
    assert isinstance(one_of, SyntheticTask)
    assert one_of.hang_when == {"hidden_sizes": [[64, 32], [128]]}


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


def test_data_path_is_checked_as_the_file_the_workers_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check follows ``~``, ``..`` and links as reading does (a tester read files
    outside the data directories through ``~/..`` and saw their first line in the error)."""
    first, second, outside = tmp_path / "first", tmp_path / "second", tmp_path / "outside"
    for folder in (first, second, outside):
        folder.mkdir()
    (outside / "secret.txt").write_text("secret\n")
    (second / "corpus.txt").write_text("text\n")
    limits = SpecLimits(data_roots=(first, second))
    monkeypatch.setenv("HOME", str(outside))

    def refused(path: str) -> bool:
        try:
            parse_spec({"task": {"kind": "char_lm", "path": path}}, limits)
        except InvalidSpec as err:
            assert [e.loc for e in err.errors] == ["task.path"], err
            return True
        return False

    assert refused("~/secret.txt")
    assert refused("~/../outside/secret.txt")
    assert refused(f"~{getpass.getuser()}/../../../etc/passwd")
    assert not refused("corpus.txt")  # found in the second root
    # A link in the first root shadows the second root's file: what is read is outside.
    (first / "corpus.txt").symlink_to(outside / "secret.txt")
    assert refused("corpus.txt")
    monkeypatch.setenv("HOME", str(second))
    (first / "corpus.txt").unlink()
    assert not refused("~/corpus.txt")  # a home inside a root is fine
    assert not refused("~nobody-of-that-name/corpus.txt")  # no such home: a relative path
    (first / "loop").symlink_to(first / "loop")
    assert not refused("loop")  # inside; the data check says it cannot be read


def test_direction_defaults_from_task_metric() -> None:
    assert parse_spec({"task": {"kind": "classify"}}).direction == "maximize"
    by_loss = parse_spec({"task": {"kind": "classify", "metric": "val_loss"}})
    assert (by_loss.metric.name, by_loss.direction) == ("val_loss", "minimize")
    assert by_loss.objective_labels() == ["val_loss (validation cross-entropy, nats)"]
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


# --------------------------------------------------------------------------------------
# Numbers as the user meant them, duplicate keys, steps and bounds (the shared cases)
# --------------------------------------------------------------------------------------

DUPLICATE_KEY_YAML = """\
# `lr` given twice in `space` (the later, fixed one silently wins in PyYAML).
name: duplicate-key
task:
  kind: synthetic
space:
  lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  num_layers: {type: int, low: 1, high: 4}
  lr: 0.5
  max_epochs: 2
study:
  n_trials: 4
"""

GRID_STEP_OVERSHOOTS_YAML = """\
name: grid-step
task:
  kind: synthetic
space:
  num_layers: 2
  dropout: {type: float, low: 0.0, high: 0.9, step: 0.6}
  lr: {type: categorical, choices: [0.001, 0.01]}
  max_epochs: 2
study:
  n_trials: 6
  sampler: grid
"""

INT_WRITTEN_AS_FLOAT_BEST_YAML = """\
task:
  kind: adding
  seq_len: 20
  n_train: 200
  n_val: 50
  n_test: 50
params:
  num_layers: 2.0
  hidden_mode: per_layer
  hidden_size: 16
  max_epochs: 1
"""


def _errors(data: Any, limits: SpecLimits | None = None) -> list[tuple[str, str]]:
    with pytest.raises(InvalidSpec) as info:
        parse_spec(data, limits or SpecLimits())
    return [(e.loc, e.msg) for e in info.value.errors]


def test_duplicate_key_in_yaml_names_the_key_its_path_and_both_lines() -> None:
    assert _errors(DUPLICATE_KEY_YAML) == [("space.lr", "duplicate key `lr` (lines 6 and 8)")]
    assert _errors("task: {kind: adding, kind: adding}") == [
        ("task.kind", "duplicate key `kind` (line 1, columns 8 and 22)")
    ]


def test_yaml_merge_keys_are_refused_naming_their_mapping() -> None:
    """``<<`` is YAML 1.1 (the spec is 1.2): it let ``lr`` come from two places, the merged
    one silently losing, and ``<<: [a, b]`` silently took the first."""
    merged = (
        "task: {kind: adding}\nspace:\n  <<: {lr: {type: float, low: 0.001, high: 0.1}}\n"
        "  lr: 0.5\n"
    )
    assert _errors(merged) == [
        (
            "space",
            "merge key `<<` (line 3): YAML 1.1, not 1.2; write the keys out (it let a "
            "key given twice pass silently)",
        )
    ]
    anchored = "base: &b {lr: 0.7}\ntask: {kind: adding}\nspace: {<<: [*b, {lr: 0.9}]}\n"
    assert [loc for loc, _ in _errors(anchored)] == ["space"]
    assert _errors('task: {kind: adding}\nspace: {"<<": 1}\n') != []  # quoted: a plain key
    # As a value, << is text (YAML 1.2): was "could not determine a constructor".
    named = parse_spec("name: x\ntask: {kind: adding}\nspace: {max_epochs: 1}\n")
    assert _errors("name: <<\ntask: {kind: adding}\nspace: {max_epochs: 1}\n") == [
        ("name", "must be 1-100 ASCII letters, digits, '.', '_' or '-', starting alphanumeric")
    ]
    assert named.name == "x"


def test_duplicate_key_in_json_is_refused() -> None:
    text = '{"task": {"kind": "adding"},\n "space": {"lr": 0.1,\n "lr": 0.5}}'
    assert _errors(text) == [("space.lr", "duplicate key `lr` (lines 2 and 3)")]
    # A JSON request body is parsed by the route, which refuses them too.
    with pytest.raises(InvalidSpec) as info:
        _json_document(text.encode())
    assert [(e.loc, e.msg) for e in info.value.errors] == [("space.lr", "duplicate key `lr`")]


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_json_body_refuses_nan_and_infinity(literal: bytes) -> None:
    with pytest.raises(InvalidSpec, match="body: not valid JSON"):
        _json_document(b'{"task": {"kind": "adding"}, "space": {"lr": ' + literal + b"}}")


def test_whole_numbers_are_stored_with_the_parameters_type() -> None:
    spec = parse_spec(
        {
            "task": {"kind": "synthetic"},
            "space": {
                "num_layers": 2.0,
                "hidden_mode": "per_layer",
                "hidden_size": {"type": "int", "low": 16, "high": 128},
                "batch_size": {"type": "categorical", "choices": [32.0, "64", 128]},
                "lr": 1,
            },
        }
    )
    assert spec.space["num_layers"] == 2 and type(spec.space["num_layers"]) is int
    batch = spec.space["batch_size"]
    assert isinstance(batch, CategoricalDistribution) and batch.choices == [32, 64, 128]
    assert all(type(c) is int for c in batch.choices)
    assert type(spec.space["lr"]) is float
    stored = spec.model_dump(mode="json")
    assert stored["space"]["num_layers"] == 2 and json.dumps(stored).count("2.0") == 0
    trial = optuna.trial.FixedTrial({"hidden_size_l0": 16, "hidden_size_l1": 32, "batch_size": 64})
    config = sample_config(trial, spec)
    assert config.params.hidden_sizes == (16, 32) and config.params.batch_size == 64


def test_one_layer_written_as_text_does_not_search_dropout() -> None:
    spec = parse_spec(
        _spec({"num_layers": "1", "dropout": {"type": "float", "low": 0.1, "high": 0.5}})
    )
    assert spec.space["num_layers"] == 1
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    config = sample_config(trial, spec)
    assert "dropout" not in trial.params and config.params.dropout == 0.0


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ({"num_layers": 2.5}, ("space.num_layers", "input should be a valid integer")),
        ({"num_layers": True}, ("space.num_layers", "must be a number, not true/false")),
        (
            {"num_layers": {"type": "int", "low": 1.5, "high": 4}},
            ("space.num_layers.low", "input should be a valid integer"),
        ),
        (
            {"batch_size": {"type": "categorical", "choices": [32, 64.5]}},
            ("space.batch_size.choices.1", "input should be a valid integer"),
        ),
        (
            {"num_layers": {"type": "categorical", "choices": [2, 2.0]}},
            ("space.num_layers.choices", "must not repeat a choice"),
        ),
        # Was pydantic's "unable to parse input string as an integer, exceeded maximum size".
        ({"num_layers": 1e30}, ("space.num_layers", "input should be a valid integer, 1e+30 is")),
    ],
)
def test_a_number_that_is_not_the_parameters_type_is_refused(
    space: dict[str, Any], expected: tuple[str, str]
) -> None:
    loc, msg = expected
    assert any(e[0] == loc and e[1].startswith(msg) for e in _errors(_spec(space))), _errors(
        _spec(space)
    )


def test_integer_bounds_written_as_floats_are_read_as_ints() -> None:
    spec = parse_spec(_spec({"num_layers": {"type": "int", "low": 1.0, "high": 4}}))
    dist = spec.space["num_layers"]
    assert isinstance(dist, IntDistribution) and (dist.low, dist.high) == (1, 4)
    assert type(dist.low) is int


def test_lstm_config_refuses_bad_user_data_with_validation_errors_only() -> None:
    assert LSTMConfig.model_validate(
        {"num_layers": 2.0, "hidden_mode": "per_layer", "hidden_size": 16}
    ).hidden_sizes == (16, 16)
    assert LSTMConfig.model_validate({"num_layers": "1", "dropout": 0.5}).dropout == 0.0
    for num_layers in (2.5, "two", 10**9, [2], None, float("nan")):
        with pytest.raises(ValidationError):
            LSTMConfig.model_validate({"num_layers": num_layers, "hidden_mode": "per_layer"})


def test_best_config_with_an_int_written_as_float_loads(tmp_path: Path) -> None:
    path = tmp_path / "int-written-as-float.best.yaml"
    path.write_text(INT_WRITTEN_AS_FLOAT_BEST_YAML)
    config = load_config_file(path)
    assert config.params.num_layers == 2 and config.params.hidden_sizes == (16, 16)


def test_yaml_is_read_as_yaml_1_2() -> None:
    spec = parse_spec(
        "name: 2024-01-01\ntask: {kind: adding, seq_len: 010}\nspace:\n  lr: 1e-3\n  grad_clip: 5\n"
    )
    assert spec.name == "2024-01-01"  # YAML 1.2 has no dates: it is text
    assert spec.task.kind == "adding" and spec.task.seq_len == 10  # not octal 8
    assert spec.space["lr"] == 0.001 and type(spec.space["lr"]) is float
    assert _errors("task: {kind: adding}\nspace: {bidirectional: yes}") == [
        (
            "space.bidirectional",
            "must be true or false (got the text 'yes': YAML 1.2 reads yes/no as text)",
        )
    ]


def test_to_yaml_quotes_text_a_yaml_1_2_reader_would_take_for_a_number() -> None:
    config = parse_config({"task": {"kind": "forecast", "path": "1e3", "column": "0o10"}})
    assert "'1e3'" in config.to_yaml() and "'0o10'" in config.to_yaml()
    assert parse_config(config.to_yaml()) == config
    assert yaml.safe_load(config.to_yaml())["task"]["column"] == "0o10"


def test_step_that_does_not_divide_the_range_names_what_would_fit() -> None:
    assert _errors(GRID_STEP_OVERSHOOTS_YAML) == [
        (
            "space.dropout.step",
            "step 0.6 does not divide high - low = 0.9: the points would be 0.0, 0.6; "
            "set high to 0.6 or a step that divides 0.9",
        )
    ]
    # Any sampler: Optuna would silently lower `high` to 0.6 for every one of them.
    random = GRID_STEP_OVERSHOOTS_YAML.replace("sampler: grid", "sampler: random")
    assert [loc for loc, _ in _errors(random)] == ["space.dropout.step"]
    assert _errors(_spec({"batch_size": {"type": "int", "low": 16, "high": 64, "step": 10}})) == [
        (
            "space.batch_size.step",
            "step 10 does not divide high - low = 48: the points would be 16, 26, ..., 56; "
            "set high to 56 or a step that divides 48",
        )
    ]


def test_step_that_divides_up_to_float_rounding_is_accepted_and_the_grid_stays_inside() -> None:
    spec = parse_spec(
        GRID_STEP_OVERSHOOTS_YAML.replace("step: 0.6", "step: 0.1").replace(
            "lr: {type: categorical, choices: [0.001, 0.01]}",
            "lr: {type: float, low: 0.1, high: 0.7, step: 0.2}",
        )
    )
    grid = grid_search_space(spec)
    assert grid["dropout"] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert grid["lr"] == [0.1, 0.3, 0.5, 0.7]
    assert largest_config(spec).params.dropout == 0.9
    # Even a step that validation would refuse never puts a grid point above `high`.
    unchecked = spec.model_copy(
        update={"space": {"dropout": FloatDistribution(type="float", low=0.0, high=0.9, step=0.6)}}
    )
    assert grid_search_space(unchecked) == {"dropout": [0.0, 0.6]}


def test_grid_too_large_to_list_is_refused() -> None:
    space = {"seed": {"type": "int", "low": 0, "high": 2**32 - 1}}
    assert [loc for loc, _ in _errors(_spec(space, study={"sampler": "grid"}))] == ["study.sampler"]
    assert parse_spec(_spec(space)).searched()  # other samplers draw from it


def test_timeout_is_bounded_by_the_settings() -> None:
    settings = Settings()
    limits = SpecLimits(max_timeout_s=settings.max_timeout_s)
    assert settings.max_timeout_s == 30 * 24 * 3600
    assert _errors(_spec(study={"timeout_s": 1e12}), limits) == [
        ("study.timeout_s", "must be <= 2592000 (LSTM_HPO_MAX_TIMEOUT_S)")
    ]
    assert parse_spec(_spec(study={"timeout_s": 3600}), limits).study.timeout_s == 3600
    # Without settings (the CLI, a worker re-reading a stored spec): the hard cap.
    assert [loc for loc, _ in _errors(_spec(study={"timeout_s": 1e12}))] == ["study.timeout_s"]
    with pytest.raises(ValidationError):
        Settings(max_timeout_s=1e12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize(
    "where",
    [
        lambda v: _spec({"lr": v}),
        lambda v: _spec({"lr": {"type": "float", "low": 0.001, "high": v}}),
        lambda v: _spec({"forget_bias": {"type": "categorical", "choices": [0.0, v]}}),
        lambda v: _spec(study={"timeout_s": v}),
        lambda v: {"task": {"kind": "synthetic", "sleep_s": v}},
        lambda v: {"task": {"kind": "synthetic", "fail_when": {"lr": v}}},
    ],
)
def test_nan_and_inf_are_refused_everywhere(bad: float, where: Any) -> None:
    assert any("finite number" in msg for _, msg in _errors(where(bad)))


def test_yaml_nan_and_inf_are_refused() -> None:
    assert _errors("task: {kind: adding}\nspace: {lr: .inf}") == [
        ("space.lr", "must be a finite number (got inf)")
    ]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"task": {"kind": "adding", "data_seed": 2**64}}, "task.data_seed: integer too large"),
        ({"task": {"kind": "char_lm", "path": "a\x00b"}}, "task.path: text must not contain a NUL"),
        ({"task": {"kind": "adding"}, "space": {1: 2}}, "space.1: a key must be text"),
        ({"task": {"kind": "char_lm", "encoding": "rot13"}}, "'rot13' is not a text encoding"),
        ("a: &a [*a]", "nested more than 32 levels deep"),
        (
            "a: &a [1,2,3,4,5,6,7,8,9,0]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
            "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\n",
            "d: the document holds more than 10,000 values",
        ),
        (  # named at the list that is too long, not left without a field
            {"task": {"kind": "adding"}, "space": {"init": {"choices": list(range(10_001))}}},
            "space.init.choices: the document holds more than 10,000 values",
        ),
        (b"task: {kind: \xff}", "not UTF-8 text (byte 13)"),
        ("task: " + "9" * 5000, "not valid YAML or JSON: a number of more than 4300 digits"),
        ("[" * 5000, "nested more than 32 levels deep"),
        ("task: !!binary aGVsbG8=", "task: not a JSON value (a bytes)"),
    ],
)
def test_documents_that_cannot_be_a_spec_are_refused_cleanly(data: Any, expected: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        parse_spec(data)
    assert expected in str(info.value), str(info.value)


def test_a_grid_study_may_not_ask_for_more_trials_than_points() -> None:
    spec = {
        "task": {"kind": "synthetic"},
        "space": {"num_layers": {"type": "int", "low": 1, "high": 3}},
        "study": {"n_trials": 10, "sampler": "grid"},
    }
    with pytest.raises(InvalidSpec) as caught:
        parse_spec(spec)
    [error] = caught.value.errors
    assert error.loc == "study.n_trials" and "<= 3" in error.msg
    spec["study"]["n_trials"] = 3  # type: ignore[index]
    assert parse_spec(spec).study.n_trials == 3


# --------------------------------------------------------------------------------------
# cell: lstm | gru | rnn, and the LSTM-only forget_bias
# --------------------------------------------------------------------------------------

CELLS = {"type": "categorical", "choices": ["lstm", "gru", "rnn"]}
FORGET_BIAS_ONLY_LSTM = "the forget-gate bias exists only in LSTM cells (cell: lstm)"


def test_cell_is_fixed_or_searched_like_any_categorical() -> None:
    assert LSTMConfig().cell == "lstm"
    assert (
        parse_config({"task": {"kind": "adding"}, "params": {"cell": "gru"}}).params.cell == "gru"
    )
    assert lowest_config_of({"cell": "rnn"}).cell == "rnn"
    configs = _tpe_trials(_spec({"cell": CELLS}), 20)
    assert {c.params.cell for c in configs} == {"lstm", "gru", "rnn"}
    assert _errors(_spec({"cell": "tree"})) == [
        ("space.cell", "input should be 'lstm', 'gru' or 'rnn'")
    ]
    assert _errors(_spec({"cell": {"type": "categorical", "choices": ["lstm", "lstm"]}})) == [
        ("space.cell.choices", "must not repeat a choice")
    ]
    [(loc, _)] = _errors(_spec({"cell": {"type": "int", "low": 0, "high": 2}}))
    assert loc == "space.cell.type"


def test_a_grid_over_cells_counts_its_points_and_runs_each_once() -> None:
    space = {"cell": CELLS, "num_layers": {"type": "int", "low": 1, "high": 2}}
    assert _errors(_spec(space, study={"n_trials": 7, "sampler": "grid"}))[0][0] == "study.n_trials"
    spec = parse_spec(_spec(space, study={"n_trials": 6, "sampler": "grid"}))
    sampler = optuna.samplers.GridSampler(grid_search_space(spec), seed=0)
    study = optuna.create_study(sampler=sampler)
    seen = set()

    def objective(trial: optuna.Trial) -> float:
        params = sample_config(trial, spec).params
        seen.add((params.cell, params.num_layers))
        return 0.0

    study.optimize(objective, n_trials=6)
    assert seen == {(c, n) for c in ("lstm", "gru", "rnn") for n in (1, 2)}


@pytest.mark.parametrize("cell", ["gru", "rnn", {"type": "categorical", "choices": ["gru", "rnn"]}])
@pytest.mark.parametrize(
    "forget_bias", [1.0, 0.0, {"type": "float", "low": 0.0, "high": 2.0},
                    {"type": "categorical", "choices": [0.0, 1.0]}]
)  # fmt: skip
def test_forget_bias_without_an_lstm_cell_is_refused_naming_it(cell: Any, forget_bias: Any) -> None:
    errors = _errors(_spec({"cell": cell, "forget_bias": forget_bias}))
    assert errors == [("space.forget_bias", FORGET_BIAS_ONLY_LSTM)]


def test_forget_bias_null_is_accepted_with_any_cell() -> None:
    assert lowest_config_of({"cell": "gru", "forget_bias": None}).forget_bias is None


@pytest.mark.parametrize("forget_bias", [1.0, {"type": "float", "low": 0.5, "high": 2.0}])
def test_forget_bias_applies_to_the_lstm_trials_when_cell_is_searched(forget_bias: Any) -> None:
    spec = parse_spec(_spec({"cell": CELLS, "forget_bias": forget_bias}))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    cells = set()
    for _ in range(20):
        trial = study.ask()
        config = sample_config(trial, spec).params
        cells.add(config.cell)
        if config.cell == "lstm":
            assert config.forget_bias is not None and 0.5 <= config.forget_bias <= 2.0
        else:
            assert config.forget_bias is None
            assert "forget_bias" not in trial.params
        assert sample_config(optuna.trial.FixedTrial(trial.params), spec).params == config
        study.tell(trial, 0.0)
    assert cells == {"lstm", "gru", "rnn"}


def lowest_config_of(space: dict[str, Any]) -> LSTMConfig:
    return parse_config(_spec(space)).params


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[2] / "search_spaces").glob("*.yaml")), ids=str
)
def test_every_shipped_spec_and_its_configs_round_trip(path: Path) -> None:
    """What is stored (the spec, re-validated by every worker) and served (a trial's config,
    `/best`, read back by `lstm-hpo train`) must parse to the same thing again."""
    spec = load_spec_file(path)
    assert parse_spec(json.loads(json.dumps(spec.model_dump(mode="json")))) == spec
    for config in (lowest_config(spec), largest_config(spec)):
        assert parse_config(config.to_yaml()) == config
        assert parse_config(config.model_dump(mode="json")) == config
