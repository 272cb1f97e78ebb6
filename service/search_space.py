"""Study specs: parsing, validation, the resolved config, and the one sampling function.

A *spec* (``search_spaces/*.yaml``, or the body of ``POST /v1/studies``) has four parts:
``name``, ``task`` (what to learn), ``space`` (a flat mapping: a plain scalar is fixed, a
mapping ``{type: ...}`` is searched) and ``study`` (trials, direction, sampler, pruner).

A *resolved config* is ``{task: {...}, params: {...}}`` with every parameter fixed. It is
what one trial trains, what the service's "best" returns and what ``lstm-hpo train`` takes.
:func:`sample_config` is the only function that maps (spec, trial) to a resolved config.

This module imports neither Optuna nor torch: a trial is anything with Optuna's
``suggest_*`` methods (:class:`ParamSuggester`), so ``optuna.trial.FixedTrial`` replays a
finished trial's parameters into the same resolved config.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import math
import os
import re
import sys
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, TypeAlias

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    StrictBool,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from ruamel.yaml import YAML
from ruamel.yaml.constructor import SafeConstructor
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.resolver import VersionedResolver

from service.corpora import CharCorpus
from service.errors import FieldError, InvalidConfig, InvalidSpec
from service.webhooks import check_webhook_url, url_allowed

# --------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------

Direction: TypeAlias = Literal["minimize", "maximize"]
TaskKind: TypeAlias = Literal["char_lm", "forecast", "classify", "adding", "synthetic"]


class _Frozen(BaseModel):
    # allow_inf_nan: NaN and inf are never a hyperparameter, a bound or a budget.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data: Any) -> Any:
        # Pydantic's lax mode reads true as 1: `test_size: true` is a mistake, never 1. (A
        # model validator: a field validator on "*" would also sit on the `kind` discriminator.)
        if not isinstance(data, Mapping):
            return data
        for name, value in data.items():
            field = cls.model_fields.get(name) if isinstance(name, str) else None
            if field is None or not isinstance(value, bool):
                continue
            kinds = {field.annotation, *typing.get_args(field.annotation)}
            if bool not in kinds and kinds & {int, float}:
                raise _FieldValueError(name, "must be a number, not true/false")
        return data


class _FieldValueError(ValueError):
    """A model validator's finding about one of its fields: reported at that field's path
    (``study.n_trials``), not at the model's (``study``) as a plain ValueError would be."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _known_encoding(name: str) -> str:
    try:
        info = codecs.lookup(name)
    except LookupError:
        raise ValueError(f"unknown text encoding {name!r} (e.g. utf-8, cp1252, latin-1)") from None
    # rot13, base64, zlib ...: codecs Python knows that do not decode bytes into text.
    if not getattr(info, "_is_text_encoding", True):
        raise ValueError(f"{name!r} is not a text encoding (e.g. utf-8, cp1252, latin-1)")
    return name


#: The text encoding of a user's data file (``task.path``): any name Python's codecs know.
Encoding: TypeAlias = Annotated[str, Field(max_length=40), AfterValidator(_known_encoding)]
#: A user's data file, relative to a data directory (or absolute, inside one).
DataPath: TypeAlias = Annotated[str, Field(min_length=1, max_length=4096)]


class CharLMTask(_Frozen):
    """Character language model. Metric: validation loss in nats/char."""

    kind: Literal["char_lm"]
    #: A bundled corpus (``service.corpora``): moby_dick (English prose, 1.19 M characters)
    #: or python_stdlib (the interpreter's own source) ...
    dataset: CharCorpus | None = Field(
        default=None,
        description="A bundled corpus: moby_dick (English prose, public domain) or "
        "python_stdlib (the default when no path is given).",
    )
    #: ... or a text file. Neither: python_stdlib.
    path: DataPath | None = None
    encoding: Encoding = "utf-8"
    #: The corpus is capped to this many characters (deterministically) before splitting.
    max_chars: int = Field(default=1_000_000, ge=1_000, le=200_000_000)
    val_fraction: float = Field(default=0.05, gt=0.0, lt=0.5)
    test_fraction: float = Field(default=0.05, gt=0.0, lt=0.5)

    @model_validator(mode="before")
    @classmethod
    def _default_corpus(cls, data: Any) -> Any:
        # Spelled out, so that a stored spec or best config names the text it was run on.
        if isinstance(data, Mapping) and data.get("path") is None and data.get("dataset") is None:
            return {**data, "dataset": "python_stdlib"}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> CharLMTask:
        if self.dataset is not None and self.path is not None:
            raise ValueError("give `dataset` (moby_dick | python_stdlib) or `path`, not both")
        return self

    @property
    def corpus(self) -> CharCorpus | None:
        """The bundled corpus this task reads (None: ``path``)."""
        return None if self.path is not None else self.dataset


class ForecastTask(_Frozen):
    """Univariate forecasting. Metric: validation RMSE on the original scale."""

    kind: Literal["forecast"]
    #: A bundled series (needs the ``datasets`` extra) ...
    dataset: Literal["airline", "sunspots"] | None = None
    #: ... or a CSV file with a header row, and the column to forecast.
    path: DataPath | None = None
    column: str | None = Field(default=None, min_length=1, max_length=1_000)
    encoding: Encoding = "utf-8"
    lookback: int = Field(default=24, ge=1, le=10_000)
    horizon: int = Field(default=1, ge=1, le=1_000)
    #: last_value: inputs and targets are taken relative to each window's last value (the
    #: model learns changes, so a trend beyond the training range does not break it);
    #: none: absolute (standardised) levels.
    normalize: Literal["last_value", "none"] = "last_value"
    #: log: the model sees and forecasts the logarithm of the series (every value must be
    #: > 0), so a seasonal swing that grows with the level becomes a constant one, as the
    #: airline model assumes (Box & Jenkins 1976); RMSE stays on the original scale.
    transform: Literal["none", "log"] = Field(
        default="none",
        description="log: model the series' logarithm (values > 0; swings proportional to "
        "the level, as in the airline model); RMSE stays on the original scale.",
    )
    #: Seasonal period for the seasonal-naive baseline (default: 12 airline, 11 sunspots).
    season: int | None = Field(default=None, ge=2, le=10_000)
    val_fraction: float = Field(default=0.15, gt=0.0, lt=0.5)
    test_fraction: float = Field(default=0.15, gt=0.0, lt=0.5)
    #: The last ``test_size`` points are the test split (instead of ``test_fraction``): 12
    #: is the classic airline hold-out, the year 1960 (Box & Jenkins 1976).
    test_size: int | None = Field(
        default=None,
        ge=1,
        le=100_000_000,
        description="The last test_size points are the test split (instead of "
        "test_fraction); 12 is the airline 1960 hold-out.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ForecastTask:
        # A test_fraction other than its default next to test_size is a contradiction; the
        # default itself is what a stored config writes back beside test_size (round trip).
        default = type(self).model_fields["test_fraction"].default
        if self.test_size is not None and self.test_fraction != default:
            raise ValueError("give `test_size` (points) or `test_fraction`, not both")
        if (self.dataset is None) == (self.path is None):
            raise ValueError("give exactly one of `dataset` (airline | sunspots) or `path`")
        if self.path is not None and self.column is None:
            raise ValueError("`column` is required with `path`")
        return self


class ClassifyTask(_Frozen):
    """Multivariate, variable-length sequence classification. Metric: validation accuracy
    (``metric: val_acc``, maximised) or validation cross-entropy (``metric: val_loss``,
    minimised, with accuracy recorded beside it)."""

    kind: Literal["classify"]
    #: A bundled UEA data set (needs the ``datasets`` extra) ...
    dataset: Literal["japanese_vowels"] | None = None
    #: ... or a JSON Lines file: one ``{"x": [[f1, f2, ...], ...], "label": ..., "split": ...}``
    #: per line (time-major; ``split`` optional: train | test).
    path: DataPath | None = None
    encoding: Encoding = "utf-8"
    #: Part of the training split held out for validation.
    val_fraction: float = Field(default=0.2, gt=0.0, lt=0.5)
    #: Used when the data has no ``split`` column.
    test_fraction: float = Field(default=0.2, gt=0.0, lt=0.5)
    #: What trials are ranked by. Accuracy stops ranking once a small validation split is
    #: classified perfectly (JapaneseVowels: 54 sequences, every study reached 1.000 in
    #: its first minute, BENCHMARKS.md); cross-entropy still tells those models apart.
    metric: Literal["val_acc", "val_loss"] = "val_acc"

    @model_validator(mode="before")
    @classmethod
    def _default_dataset(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("dataset") is None and data.get("path") is None:
            return {**data, "dataset": "japanese_vowels"}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> ClassifyTask:
        if self.dataset is not None and self.path is not None:
            raise ValueError("give `dataset` or `path`, not both")
        return self


class AddingTask(_Frozen):
    """The adding problem (Hochreiter & Schmidhuber 1997). Metric: validation MSE."""

    kind: Literal["adding"]
    seq_len: int = Field(default=50, ge=2, le=100_000)
    n_train: int = Field(default=10_000, ge=10, le=10_000_000)
    n_val: int = Field(default=1_000, ge=10, le=1_000_000)
    n_test: int = Field(default=1_000, ge=10, le=1_000_000)
    #: Seed of the generated data (not of the model).
    data_seed: int = Field(default=1234, ge=0, le=2**63 - 1)


class SyntheticTask(_Frozen):
    """No training: a deterministic function of the params, reported once per "epoch".

    For tests and benchmarks of the service path. ``fail_when`` / ``nan_when`` make chosen
    configurations raise or report NaN (``{num_layers: [1, 2], lr: 0.01}``: every named
    parameter of the resolved config has its value, or one of a list's), so failure
    handling can be driven end to end;
    ``hang_when`` makes them hang inside a step (a stuck data loader: no step boundary is
    ever reached), so the supervisor's kill of a hung trial can be too.
    """

    kind: Literal["synthetic"]
    sleep_s: float = Field(default=0.0, ge=0.0, le=3600.0)
    fail_when: dict[str, Any] | None = None
    nan_when: dict[str, Any] | None = None
    hang_when: dict[str, Any] | None = None

    @field_validator("fail_when", "nan_when", "hang_when")
    @classmethod
    def _known_params(cls, when: dict[str, Any] | None) -> dict[str, Any] | None:
        # A misspelt name would make a condition that never fires: a test that passes idly.
        unknown = sorted(set(when or {}) - set(LSTMConfig.model_fields))
        if unknown:
            raise ValueError(f"unknown parameter(s) {', '.join(map(repr, unknown))}")
        # So is a value the parameter cannot take (``num_layers: "2"`` never equals 2):
        # each is read as the parameter reads it, and kept in the form the config dumps.
        if when is None:
            return None
        if not when:
            raise ValueError("names no parameter: it would never fire")
        return {name: _condition_value(name, wanted) for name, wanted in when.items()}


def _condition_value(name: str, wanted: Any, *, one_of: bool = True) -> Any:
    """``wanted`` (a value of LSTMConfig's ``name``, or with ``one_of`` a list of them)
    as ``model_dump(mode="json")`` writes it. Raises ValueError naming ``name`` for a
    value the parameter never takes, so that the condition would never fire."""
    field = LSTMConfig.model_fields[name]
    kinds = {field.annotation, *typing.get_args(field.annotation)}
    if _has(wanted, lambda v: isinstance(v, bool)) and bool not in kinds:
        raise ValueError(f"{name}: true/false is not a value it takes")  # lax reads true as 1
    if _has(wanted, lambda v: v == []):
        raise ValueError(f"{name}: an empty list is not a value it takes, nor one of none")
    adapter = _config_field_adapter(name)
    try:
        return adapter.dump_python(adapter.validate_python(wanted), mode="json")
    except ValidationError as err:
        # A list is "one of" (one level); for a list-valued parameter (per-layer widths) a
        # list of numbers is its value, whose error is the one to name.
        takes_lists = any(typing.get_origin(kind) is tuple for kind in kinds)
        if not (one_of and isinstance(wanted, list)) or (
            takes_lists and not any(isinstance(one, list) for one in wanted)
        ):
            why = err.errors(include_url=False)[0]
            where = "".join(f"[{i}]" for i in why["loc"])
            msg = f"{name}{where}: {wanted!r} is not a value it takes ({why['msg']})"
            raise ValueError(msg) from None
    return [_condition_value(name, one, one_of=False) for one in wanted]


def _has(value: Any, test: Callable[[Any], bool]) -> bool:
    """Whether ``value``, or any item of a list in it, passes ``test``."""
    return test(value) or (isinstance(value, list) and any(_has(v, test) for v in value))


@functools.cache
def _config_field_adapter(name: str) -> TypeAdapter[Any]:
    field = LSTMConfig.model_fields[name]
    # The field's type with its constraints (ge, le, ...): what LSTMConfig checks it with.
    typed: Any = Annotated[field.annotation, field]
    return TypeAdapter(typed)


TaskSpec: TypeAlias = Annotated[
    CharLMTask | ForecastTask | ClassifyTask | AddingTask | SyntheticTask,
    Field(discriminator="kind"),
]
#: Each task kind's model, by ``kind``.
TASK_MODELS: Mapping[str, type[BaseModel]] = {
    "char_lm": CharLMTask,
    "forecast": ForecastTask,
    "classify": ClassifyTask,
    "adding": AddingTask,
    "synthetic": SyntheticTask,
}


@dataclass(frozen=True)
class TaskMetric:
    """The validation metric a task's trials are ranked by."""

    name: str
    direction: Direction
    description: str


def stage_metric(name: str, stage: str) -> str:
    """A validation metric's name on another split, as the LightningModule logs it:
    ``stage_metric("val_rmse", "test") == "test_rmse"``."""
    return f"{stage}_" + name.removeprefix("val_")


TASK_METRICS: Mapping[str, TaskMetric] = {
    "char_lm": TaskMetric("val_loss", "minimize", "validation cross-entropy, nats/char"),
    "forecast": TaskMetric("val_rmse", "minimize", "validation RMSE, original scale"),
    "classify": TaskMetric("val_acc", "maximize", "validation accuracy"),
    "adding": TaskMetric("val_mse", "minimize", "validation mean squared error"),
    "synthetic": TaskMetric("value", "minimize", "synthetic objective"),
}


#: ``classify`` with ``metric: val_loss``.
CLASSIFY_LOSS_METRIC = TaskMetric("val_loss", "minimize", "validation cross-entropy, nats")


def metric_of(kind: str, chosen: str | None = None) -> TaskMetric:
    """The metric trials of a ``kind`` task are ranked by: the kind's (:data:`TASK_METRICS`),
    or the one its ``metric`` field (``chosen``) names. The one place that decides it: the
    parsed spec (:func:`task_metric`) and a stored spec's JSON (:func:`stored_metric`) both
    ask here, so a list of studies, the report and the trials' values agree with the
    workers on what "best" means. KeyError for an unknown kind."""
    if kind == "classify" and chosen == CLASSIFY_LOSS_METRIC.name:
        return CLASSIFY_LOSS_METRIC
    return TASK_METRICS[kind]


def task_metric(task: TaskSpec) -> TaskMetric:
    """The metric trials of ``task`` are ranked by (:func:`metric_of`)."""
    return metric_of(task.kind, task.metric if isinstance(task, ClassifyTask) else None)


def stored_metric(spec_json: Mapping[str, Any]) -> TaskMetric:
    """:func:`task_metric` of a stored (already validated) spec's JSON, without parsing it
    again: a page of studies reads many."""
    task = spec_json["task"]
    return metric_of(task["kind"], task.get("metric"))


# --------------------------------------------------------------------------------------
# Parameters (the resolved, fixed side)
# --------------------------------------------------------------------------------------

HiddenMode: TypeAlias = Literal["tied", "pyramid", "per_layer"]
#: The recurrent cell of every layer: torch.nn.LSTM, torch.nn.GRU or torch.nn.RNN (tanh).
CellKind: TypeAlias = Literal["lstm", "gru", "rnn"]
InitStrategy: TypeAlias = Literal["pytorch_default", "uniform", "xavier_uniform", "orthogonal"]
OptimizerName: TypeAlias = Literal["adam", "adamw", "sgd", "rmsprop"]
LRSchedule: TypeAlias = Literal["none", "step", "cosine", "plateau"]

MAX_LAYERS = 8
FORGET_BIAS_LSTM_ONLY = "the forget-gate bias exists only in LSTM cells (cell: lstm)"
MAX_HIDDEN = 4096
#: Pyramid mode halves the width per layer but never goes below this (or the first width).
PYRAMID_MIN_HIDDEN = 8


class LSTMConfig(_Frozen):
    """Every hyperparameter of one trial, fixed. Defaults are the documented defaults."""

    #: The recurrent cell of every layer (lstm, gru, or a tanh rnn).
    cell: CellKind = "lstm"
    num_layers: int = Field(default=2, ge=1, le=MAX_LAYERS)
    hidden_size: int = Field(default=128, ge=1, le=MAX_HIDDEN)
    #: tied: every layer ``hidden_size``; pyramid: halves per layer; per_layer: ``hidden_sizes``.
    hidden_mode: HiddenMode = "tied"
    #: Per-layer widths; set (only) by ``hidden_mode: per_layer``.
    hidden_sizes: tuple[Annotated[int, Field(ge=1, le=MAX_HIDDEN)], ...] | None = None
    bidirectional: StrictBool = False
    #: Dropout between stacked layers (non-recurrent connections, Zaremba et al. 2014).
    dropout: float = Field(default=0.0, ge=0.0, le=0.9)
    #: Dropout on the input (embedding or input projection).
    input_dropout: float = Field(default=0.0, ge=0.0, le=0.9)
    #: Dropout on the last layer's output, before the head.
    output_dropout: float = Field(default=0.0, ge=0.0, le=0.9)
    #: char_lm only: embedding width (default: the first layer's width).
    embedding_dim: int | None = Field(default=None, ge=1, le=MAX_HIDDEN)
    init: InitStrategy = "pytorch_default"
    #: ``uniform`` init draws every weight from U(-init_range, init_range).
    init_range: float = Field(default=0.05, gt=0.0, le=1.0)
    #: Effective forget-gate bias (b_ih + b_hh on the forget slice); None keeps the init's.
    #: LSTM cells only.
    forget_bias: float | None = Field(default=None, ge=-10.0, le=10.0)
    optimizer: OptimizerName = "adam"
    lr: float = Field(default=1e-3, gt=0.0, le=100.0)
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    #: sgd and rmsprop only.
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0)
    lr_schedule: LRSchedule = "none"
    #: Multiplicative decay for ``step`` (per epoch after ``lr_decay_start``) and ``plateau``.
    lr_decay: float = Field(default=0.5, gt=0.0, le=1.0)
    #: ``step``: the first epoch (0-based) whose learning rate is decayed (Zaremba: 4 / 6 / 14).
    lr_decay_start: int = Field(default=4, ge=0, le=100_000)
    #: Gradient norm clipping; 0 turns it off.
    grad_clip: float = Field(default=5.0, ge=0.0, le=1e6)
    batch_size: int = Field(default=64, ge=1, le=65_536)
    #: char_lm only: truncated-BPTT length (characters per training sequence).
    bptt: int = Field(default=100, ge=2, le=100_000)
    #: char_lm only: batches are consecutive pieces of ``batch_size`` contiguous streams and
    #: the hidden state is carried from one batch to the next (detached: truncated BPTT, as
    #: Zaremba et al. 2014 and char-rnn train), in evaluation too; False: every window
    #: starts from a zero state.
    stateful: StrictBool = Field(
        default=False,
        description="char_lm only: carry the hidden state across consecutive batches of "
        "contiguous streams, detached at each (truncated BPTT), in evaluation too.",
    )
    max_epochs: int = Field(default=10, ge=1, le=100_000)
    #: Stop after this many epochs without improvement; 0 turns it off.
    early_stopping_patience: int = Field(default=0, ge=0, le=100_000)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        # Runs on user data before any field is validated: it must never raise (a bad
        # value is left for its field to report) and reads numbers as the fields will.
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        num_layers = _whole_number(data.get("num_layers", cls.model_fields["num_layers"].default))
        if (
            data.get("hidden_mode") == "per_layer"
            and data.get("hidden_sizes") is None
            and num_layers is not None
            and 1 <= num_layers <= MAX_LAYERS
        ):
            width = data.get("hidden_size", cls.model_fields["hidden_size"].default)
            data["hidden_sizes"] = [width] * num_layers
        if num_layers == 1:
            # Dropout sits between layers: with one layer there is nowhere to put it.
            data["dropout"] = 0.0
        return data

    @field_validator("forget_bias")
    @classmethod
    def _forget_bias_needs_lstm(cls, value: float | None, info: ValidationInfo) -> float | None:
        # A field validator (``cell`` is declared first) so that the error names the field.
        if value is not None and info.data.get("cell", "lstm") != "lstm":
            raise ValueError(FORGET_BIAS_LSTM_ONLY)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> LSTMConfig:
        if self.hidden_mode == "per_layer":
            if self.hidden_sizes is None:  # _normalise fills it from hidden_size
                raise ValueError("hidden_mode: per_layer needs hidden_sizes or hidden_size")
            if len(self.hidden_sizes) != self.num_layers:
                raise ValueError(
                    f"hidden_sizes has {len(self.hidden_sizes)} entries but num_layers is "
                    f"{self.num_layers}"
                )
        elif self.hidden_sizes is not None:
            raise ValueError("hidden_sizes is only used with hidden_mode: per_layer")
        return self

    def layer_sizes(self) -> tuple[int, ...]:
        """The hidden width of each stacked layer, bottom first."""
        if self.hidden_mode == "per_layer":
            assert self.hidden_sizes is not None
            return self.hidden_sizes
        if self.hidden_mode == "pyramid":
            floor = min(self.hidden_size, PYRAMID_MIN_HIDDEN)
            return tuple(max(self.hidden_size >> i, floor) for i in range(self.num_layers))
        return (self.hidden_size,) * self.num_layers


_INT = TypeAdapter(int)


def _whole_number(value: Any) -> int | None:
    """``value`` as an int when it is one however written (2, 2.0, "2"); else None."""
    if isinstance(value, bool):
        return None
    try:
        return _INT.validate_python(value)
    except ValidationError:
        return None


class ResolvedConfig(_Frozen):
    """What one trial trains: the task and every parameter, fixed."""

    task: TaskSpec
    params: LSTMConfig = LSTMConfig()

    @field_validator("params")
    @classmethod
    def _params_fit_task(cls, params: LSTMConfig, info: ValidationInfo) -> LSTMConfig:
        task = info.data.get("task")
        if params.bidirectional and task is not None and task.kind == "char_lm":
            raise ValueError(f"bidirectional is {_BIDIRECTIONAL_LM}")
        if params.stateful and task is not None and task.kind not in _TASK_ONLY_PARAMS["stateful"]:
            raise ValueError("stateful: only for task kind char_lm (a contiguous text stream)")
        return params

    def to_yaml(self) -> str:
        """YAML that :func:`load_config_file` reads back (unset optional fields left out)."""
        return dump_yaml(self.model_dump(mode="json", exclude_none=True))


def check_refit(params: LSTMConfig, epochs: int | None, *, epochs_name: str = "epochs") -> None:
    """Raise :class:`InvalidConfig` when ``params`` cannot be refit on train + validation
    (``service.training.fit.refit_config``) for ``epochs`` (None: the validated fit's):
    ``params.lr_schedule`` plateau follows a validation metric a refit trains on, and a
    refit longer than ``max_epochs`` would run past the LR schedule (a cosine spans it).
    ``epochs_name`` names the epochs where the message shows them (the CLI's flag)."""
    errors = []
    if params.lr_schedule == "plateau":
        errors.append(
            FieldError(
                "params.lr_schedule",
                "plateau follows the validation metric, which a refit trains on: refit only "
                "configs with lr_schedule none, step or cosine",
            )
        )
    if epochs is not None and not 1 <= epochs <= params.max_epochs:
        errors.append(
            FieldError(
                epochs_name,
                f"{epochs} must be 1..params.max_epochs ({params.max_epochs}): the LR "
                "schedule spans max_epochs; raise it in the config to refit longer",
            )
        )
    if errors:
        raise InvalidConfig(errors)


_BIDIRECTIONAL_LM = "not allowed for task kind char_lm (a language model must not see the future)"

# --------------------------------------------------------------------------------------
# The search space (the spec side)
# --------------------------------------------------------------------------------------

Scalar: TypeAlias = bool | int | float | str | None

_SCALAR_TYPES = (bool, int, float, str, type(None))


def _scalar(value: Any) -> Any:
    if isinstance(value, _SCALAR_TYPES):
        return value
    raise ValueError("must be a number, text, true/false or null")


def _fixed_value(value: Any) -> Any:
    if isinstance(value, _SCALAR_TYPES):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, _SCALAR_TYPES) for v in value):
        return list(value)
    raise ValueError(
        "must be a number, text, true/false, null, a list of those, or a mapping with `type`"
    )


#: A fixed value or a choice, as written; :class:`StudySpec` then types known parameters'.
ScalarValue: TypeAlias = Annotated[Scalar, PlainValidator(_scalar)]
FixedValue: TypeAlias = Annotated[Scalar | list[Scalar], PlainValidator(_fixed_value)]

#: The largest magnitude of any integer in a spec (a 64-bit integer, as databases store).
MAX_SPEC_INT = 2**63 - 1
#: A float range with a step may hold at most this many points (else: leave ``step`` out).
MAX_STEPS = 10**9
#: The most points a grid (sampler ``grid``: the product of every parameter's points) has.
MAX_GRID_POINTS = 100_000

#: The most configurations ``study.enqueue`` lists, and studies ``study.warm_start_from``.
MAX_ENQUEUED = 1_000
MAX_WARM_START_STUDIES = 20
_STUDY_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _study_id(value: str) -> str:
    if not _STUDY_ID_RE.match(value):
        raise ValueError("must be a study id (1-64 ASCII letters, digits, '-' or '_')")
    return value


#: A study id as ``study.warm_start_from`` names one (ours are 32 hex digits).
StudyId: TypeAlias = Annotated[str, AfterValidator(_study_id)]

#: Hard caps on the deployment's limits (SpecLimits): a study's slots and retries are
#: database integers, and ``started_at + timeout_s`` must be a date (datetime ends in 9999).
MAX_TRIALS = 1_000_000
MAX_RETRIES = 1_000
MAX_TIMEOUT_S = 100 * 365 * 24 * 3600


class IntDistribution(_Frozen):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(default=1, ge=1)
    log: StrictBool = False


class FloatDistribution(_Frozen):
    type: Literal["float"]
    low: float
    high: float
    step: float | None = Field(default=None, gt=0.0)
    log: StrictBool = False


class CategoricalDistribution(_Frozen):
    type: Literal["categorical"]
    choices: list[ScalarValue] = Field(min_length=1)


Distribution: TypeAlias = Annotated[
    IntDistribution | FloatDistribution | CategoricalDistribution, Field(discriminator="type")
]


def _param_spec_kind(value: Any) -> str:
    return "distribution" if isinstance(value, Mapping | BaseModel) else "fixed"


#: A space entry: a mapping ``{type: ...}`` is searched, anything else is a fixed value.
ParamSpec: TypeAlias = Annotated[
    Annotated[Distribution, Tag("distribution")] | Annotated[FixedValue, Tag("fixed")],
    Discriminator(_param_spec_kind),
]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class SpecLimits(BaseModel):
    """Bounds that come from the deployment's settings rather than from the model."""

    model_config = ConfigDict(frozen=True)

    max_trials: int = Field(default=10_000, ge=1, le=MAX_TRIALS)
    max_retries: int = Field(default=10, ge=0, le=MAX_RETRIES)
    #: The longest ``study.timeout_s``. The default is the hard cap: workers re-validate
    #: stored specs with the default limits, which must accept what any server accepted.
    max_timeout_s: float = Field(default=MAX_TIMEOUT_S, gt=0, le=MAX_TIMEOUT_S)
    #: Directories user-supplied data paths must lie in; None allows any path (CLI use).
    data_roots: tuple[Path, ...] | None = None
    #: A worker's memory in GB (10^9 bytes): a space whose most expensive config needs more
    #: for one training step (``service.estimate``) is refused, unless the study says
    #: ``on_too_large: prune``. None: no check.
    worker_memory_gb: float | None = Field(default=None, gt=0)
    #: URL prefixes a ``study.notify.url`` must lie under (``LSTM_HPO_WEBHOOK_ALLOW``,
    #: :mod:`service.webhooks`); empty refuses every webhook. None: not checked (stored
    #: specs, the CLI: the server checked them at submit, and checks again when it sends).
    webhook_allow: tuple[str, ...] | None = None


DEFAULT_LIMITS = SpecLimits()
#: What a stored spec (a job row) is validated with again when it is read back: the hard
#: caps, which every server's settings lie within, so a spec accepted under a
#: deployment's raised limits (``LSTM_HPO_MAX_TRIALS``) is never refused by its workers.
STORED_SPEC_LIMITS = SpecLimits(
    max_trials=MAX_TRIALS, max_retries=MAX_RETRIES, max_timeout_s=MAX_TIMEOUT_S
)


#: What a study's webhook is told of: the study succeeded, failed or was cancelled, or a
#: trial beat every earlier one.
NotifyEvent: TypeAlias = Literal["finished", "failed", "cancelled", "new_best"]


class NotifySettings(_Frozen):
    """A webhook: the server POSTs the study's summary to ``url`` on each event in ``on``
    (:mod:`service.notify`). The URL must lie under ``LSTM_HPO_WEBHOOK_ALLOW``."""

    url: Annotated[str, AfterValidator(check_webhook_url)] = Field(
        description="An http(s) URL under one of the server's LSTM_HPO_WEBHOOK_ALLOW prefixes."
    )
    on: tuple[NotifyEvent, ...] = Field(default=("finished", "failed"), min_length=1)


#: Confirm the winner (:mod:`service.confirm`): its defaults and ranges, for
#: ``POST /v1/studies/{id}/confirm`` and ``study.confirm`` alike. top_k 1 is allowed (its
#: statistics, no comparison); a mean's interval and the paired test need 2 seeds.
CONFIRM_DEFAULT_TOP_K = 3
CONFIRM_DEFAULT_SEEDS = 5
CONFIRM_TOP_K_RANGE = (1, 20)
CONFIRM_SEEDS_RANGE = (2, 20)


class ConfirmSettings(_Frozen):
    """``study.confirm``: once the study has succeeded, the server confirms its winner by
    itself, as ``POST /v1/studies/{id}/confirm`` with this body would (:mod:`service.
    auto_confirm`): its ``top_k`` best distinct configs, each retrained with ``seeds`` new
    seeds, ranked by their mean; ``best`` of the study then names that winner. Why: the
    search's best is a config and a seed picked together, and under new seeds it often
    is not the best (BENCHMARKS.md, "The winner's curse"). ``confirm: true``: the defaults."""

    top_k: int = Field(
        default=CONFIRM_DEFAULT_TOP_K,
        ge=CONFIRM_TOP_K_RANGE[0],
        le=CONFIRM_TOP_K_RANGE[1],
        description="How many of the best distinct configs to retrain.",
    )
    seeds: int = Field(
        default=CONFIRM_DEFAULT_SEEDS,
        ge=CONFIRM_SEEDS_RANGE[0],
        le=CONFIRM_SEEDS_RANGE[1],
        description="New training seeds per config (a mean's interval needs 2).",
    )


def _confirm_shorthand(value: Any) -> Any:
    """``confirm: true`` is ``{}`` (the defaults); ``false`` (and null) is none."""
    if value is True:
        return {}
    if value is False or value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(
            "write true (top_k 3, seeds 5), false, or a mapping such as {top_k: 3, seeds: 5}"
        )
    return value


#: study.pruner_warmup_epochs when a spec does not say: the first epoch is never pruned.
_DEFAULT_WARMUP = 1


#: What ``study.constraints`` may bound: both are known before a trial trains.
ConstraintName: TypeAlias = Literal["params", "latency_ms"]
#: The objectives besides the task's metric, all minimised (see ``study.objectives``).
EXTRA_OBJECTIVES: Mapping[str, str] = {
    "params": "trainable parameters",
    "latency_ms": "latency of one forward pass at batch 1 on the worker's device, ms",
}
_BOUND_RE = re.compile(r"^\s*(<=|>=)\s*([0-9.eE+-]+)\s*$")


def parse_bound(text: str) -> tuple[str, float]:
    """``"<= 1e6"`` -> ``("<=", 1e6)``; ValueError naming the form otherwise."""
    match = _BOUND_RE.match(text)
    value = float("nan")
    if match:
        with contextlib.suppress(ValueError):  # "1e" matches the pattern, not a float
            value = float(match.group(2))
    if not match or not math.isfinite(value) or value < 0:
        raise ValueError(f"{text!r}: write '<= N' or '>= N' with a number N >= 0 (e.g. '<= 1e6')")
    return match.group(1), value


def _bound(value: Any) -> Any:
    if isinstance(value, str):
        parse_bound(value)
    return value


ConstraintBound: TypeAlias = Annotated[str, AfterValidator(_bound), Field(max_length=40)]


class StudySettings(_Frozen):
    """How the search runs."""

    #: Finished trials the study ends with (COMPLETE + PRUNED + FAIL that are not retried).
    n_trials: int = Field(default=20, ge=1)
    #: Default: the task metric's direction.
    direction: Direction | None = None
    sampler: Literal["tpe", "random", "cmaes", "gp", "grid"] = "tpe"
    pruner: Literal["none", "median", "hyperband", "successive_halving"] = "median"
    #: The pruner never stops a trial before it has trained MORE than this many epochs (its
    #: first comparison is at the end of epoch N + 1): the median pruner's
    #: ``n_warmup_steps``, Hyperband's and successive halving's ``min_resource`` (Optuna;
    #: at least 1 for those two). Raise it when learning curves cross late: the adding
    #: problem sits on a plateau (MSE ~0.167) for its first epochs, so an early comparison
    #: prunes at random.
    pruner_warmup_epochs: int = Field(
        default=_DEFAULT_WARMUP,
        ge=0,
        le=100_000,
        description="No trial is pruned before it has trained more than this many epochs.",
    )

    @model_validator(mode="after")
    def _warmup_needs_a_pruner(self) -> StudySettings:
        # Only a value other than the default: a stored spec writes the default back.
        if self.pruner == "none" and self.pruner_warmup_epochs != _DEFAULT_WARMUP:
            raise ValueError("pruner_warmup_epochs has no effect with pruner: none")
        return self

    #: Sampler seed; each trial's sampler is seeded from it and the trial's slot.
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    #: A trial whose worker died is retried with the same parameters this many times.
    max_retries: int = Field(default=2, ge=0)
    #: Optional wall-clock budget: no new trial starts after this many seconds.
    timeout_s: float | None = Field(default=None, gt=0)
    #: Optional limit per trial (per attempt: a resumed retry gets its own), in seconds:
    #: past it the trial stops at its next step boundary and FAILs ("exceeded
    #: trial_timeout_s (N s)"); a trial hung inside a step is killed by the worker's
    #: supervisor ``LSTM_HPO_TRIAL_KILL_GRACE_S`` later, with the same reason.
    trial_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="Seconds one trial may run before it is stopped and failed.",
    )
    #: A space whose most expensive config does not fit a worker's memory
    #: (``LSTM_HPO_WORKER_MEMORY_GB``): refuse it at submit, or accept it and prune each
    #: trial whose config does not fit, at once and untrained (an Optuna constraint).
    on_too_large: Literal["refuse", "prune"] = "refuse"
    #: Which trials' checkpoints (each trial's best epoch) stay once the study ends:
    #: the best trial's, the ``keep_top_k`` best trials', every trial's, or none.
    keep_checkpoints: Literal["best", "top_k", "all", "none"] = "best"
    #: How many of the best trials keep their checkpoints with ``keep_checkpoints: top_k``.
    keep_top_k: int | None = Field(default=None, ge=1, le=1000)
    #: A webhook told when the study ends or finds a new best (None: none).
    notify: NotifySettings | None = None
    # The upper bounds of these three come from the deployment: SpecLimits.
    #: Configurations that run first, in this order: each maps searched parameters (their
    #: Optuna names: ``hidden_size_l0``... with ``hidden_mode: per_layer``) to values inside
    #: the space; the parameters an entry leaves out are sampled. Each runs as one of the
    #: study's ``n_trials`` (:func:`check_enqueue` validates them).
    enqueue: tuple[dict[str, ScalarValue], ...] | None = Field(
        default=None,
        max_length=MAX_ENQUEUED,
        description="Configurations that run first (searched parameter -> value, inside "
        "the space; the parameters left out are sampled).",
    )
    #: Earlier studies (ids) over the same task kind whose COMPLETE trials seed the
    #: sampler's history (``service.studies``: owner, task and direction checked at submit).
    warm_start_from: tuple[StudyId, ...] | None = Field(
        default=None,
        max_length=MAX_WARM_START_STUDIES,
        description="Ids of earlier studies of the same task kind whose completed trials "
        "seed the sampler (they do not count toward n_trials).",
    )
    #: Confirm the winner by itself once the study has succeeded (None: only on request).
    confirm: Annotated[ConfirmSettings | None, BeforeValidator(_confirm_shorthand)] = Field(
        default=None,
        description="Once the study has succeeded, retrain its top_k best configs with new "
        "seeds and rank them by their mean (true: top_k 3, seeds 5).",
    )
    #: Set by the service only (``POST /v1/studies/{id}/confirm``, :mod:`service.confirm`;
    #: refused in a submitted spec): the study this one confirms. Its trials are scored on
    #: the test split too (the trial user attribute ``test_value``).
    confirm_of: StudyId | None = Field(
        default=None,
        description="Set by POST /v1/studies/{id}/confirm (the confirmed study's id); "
        "not allowed in a submitted spec.",
    )
    #: Several objectives (Optuna's multi-objective samplers; ``best`` is the Pareto
    #: front): the task's metric and any of ``params`` (trainable parameters) and
    #: ``latency_ms`` (one forward pass at batch 1 on the worker's device, ms), each
    #: minimised but the metric (its task's direction). None or one: the metric alone.
    objectives: tuple[str, ...] | None = Field(
        default=None,
        min_length=1,
        max_length=3,
        description="Objectives: the task's metric and any of params, latency_ms.",
    )
    #: Upper or lower bounds on ``params`` / ``latency_ms``, e.g. ``{params: "<= 1e6"}``:
    #: a configuration that breaks one is infeasible (an Optuna constraint, which the
    #: samplers learn to avoid) and is pruned untrained.
    constraints: dict[ConstraintName, ConstraintBound] | None = Field(
        default=None,
        description='Bounds on params / latency_ms, e.g. {"params": "<= 1e6"}.',
    )

    @model_validator(mode="after")
    def _several_objectives_need_no_pruner(self) -> StudySettings:
        if len(self.objectives or ()) < 2:
            return self
        if "pruner" not in self.model_fields_set:  # the default pruner cannot rank them
            object.__setattr__(self, "pruner", "none")
        return self  # what else several objectives rule out: _check_objectives


class StudySpec(_Frozen):
    """A whole study spec as submitted."""

    name: str | None = None
    task: TaskSpec
    space: dict[str, ParamSpec] = Field(default_factory=dict)
    study: StudySettings = StudySettings()

    @field_validator("space")
    @classmethod
    def _typed_space(cls, space: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        # What is stored, sampled and sent to Optuna has the parameter's type: 2.0 is
        # num_layers 2, "1" is 1. A value that does not convert is left for _check_space.
        typed: dict[str, ParamSpec] = {}
        for name, value in space.items():
            if isinstance(value, CategoricalDistribution):
                choices = [_as_param_type(name, c) for c in value.choices]
                typed[name] = value.model_copy(update={"choices": choices})
            elif _is_fixed(value):
                typed[name] = _as_param_type(name, value)
            else:
                typed[name] = value
        return typed

    @field_validator("study")
    @classmethod
    def _typed_enqueue(cls, study: StudySettings) -> StudySettings:
        # As _typed_space: enqueued values are stored with their parameter's type.
        if not study.enqueue:
            return study
        typed = tuple(
            {name: _as_param_type(_param_field(name), v) for name, v in entry.items()}
            for entry in study.enqueue
        )
        return study.model_copy(update={"enqueue": typed})

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str | None) -> str | None:
        if v is not None and not _NAME_RE.match(v):
            raise ValueError(
                "must be 1-100 ASCII letters, digits, '.', '_' or '-', starting alphanumeric"
            )
        return v

    @property
    def direction(self) -> Direction:
        return self.study.direction or task_metric(self.task).direction

    @property
    def metric(self) -> TaskMetric:
        return task_metric(self.task)

    @property
    def objectives(self) -> tuple[str, ...]:
        """The objective names, in order: ``study.objectives``, else the metric alone."""
        return self.study.objectives or (self.metric.name,)

    @property
    def directions(self) -> list[Direction]:
        """One Optuna direction per objective: the metric's (or ``study.direction``), and
        ``minimize`` for ``params`` and ``latency_ms``."""
        return [
            self.direction if name == self.metric.name else "minimize" for name in self.objectives
        ]

    @property
    def is_multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def objective_labels(self) -> list[str]:
        """Each objective's name with its meaning and unit, as the dashboard shows it
        (Optuna's ``set_metric_names``): ``val_loss (validation cross-entropy, nats/char)``."""
        meaning = {self.metric.name: self.metric.description, **EXTRA_OBJECTIVES}
        return [f"{name} ({meaning[name]})" for name in self.objectives]

    def searched(self) -> dict[str, Distribution]:
        """The parameters that are searched (not fixed), by name."""
        return {
            k: v
            for k, v in self.space.items()
            if isinstance(v, IntDistribution | FloatDistribution | CategoricalDistribution)
        }

    def to_yaml(self) -> str:
        return dump_yaml(self.model_dump(mode="json", exclude_none=True))


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------

_PARAM_FIELDS: Mapping[str, FieldInfo] = LSTMConfig.model_fields
#: Parameters that only exist for some task kinds.
_TASK_ONLY_PARAMS: Mapping[str, tuple[str, ...]] = {
    "bptt": ("char_lm",),
    "embedding_dim": ("char_lm",),
    "stateful": ("char_lm",),
}


def _loc(parts: Iterable[int | str]) -> str:
    return ".".join(str(p) for p in parts)


_BOUND_OPS = {
    "greater_than_equal": ">=",
    "less_than_equal": "<=",
    "greater_than": ">",
    "less_than": "<",
}
#: Tags pydantic puts into an error's location for a union branch; users never wrote them.
_UNION_TAGS = {*TASK_METRICS, "int", "float", "categorical", "distribution", "fixed"}


def _message(e: Any) -> str:
    """A pydantic error as a short rule: ``must be <= 0.9``, ``unknown field``."""
    if e["type"] in _BOUND_OPS:
        return f"must be {_BOUND_OPS[e['type']]} {next(iter((e.get('ctx') or {}).values()))}"
    if e["type"] == "extra_forbidden":
        return "unknown field"
    if e["type"] in ("missing", "union_tag_not_found"):
        return "required"
    if e["type"] == "union_tag_invalid":
        return f"must be one of {e['ctx']['expected_tags']} (got {e['ctx']['tag']!r})"
    if e["type"] == "bool_type":  # a StrictBool field
        return _not_a_bool(e["input"])
    if e["type"] == "int_parsing_size":  # pydantic: "unable to parse input string ..."
        return f"input should be a valid integer, {e['input']!r} is too large"
    msg: str = e["msg"].removeprefix("Value error, ")
    return msg[0].lower() + msg[1:] if msg else msg


_INT_ADAPTER = TypeAdapter(int)


def whole_number(value: Any) -> int | None:
    """``value`` read as a spec's integer fields read it (``2``, ``2.0``, ``"2"``; not
    ``true``, ``2.5`` or ``"1e3"``), so request bodies (extend, confirm) take what a spec
    takes; None when it is not a whole number."""
    if isinstance(value, bool):
        return None
    try:
        return _INT_ADAPTER.validate_python(value)
    except ValidationError:
        return None


def _not_a_bool(value: Any) -> str:
    if isinstance(value, str):
        return f"must be true or false (got the text {value!r}: YAML 1.2 reads yes/no as text)"
    return f"must be true or false (got {'null' if value is None else repr(value)})"


def _from_validation_error(
    err: ValidationError, prefix: Sequence[str | int] = ()
) -> list[FieldError]:
    out: list[FieldError] = []
    for e in err.errors(include_url=False):
        loc = [*prefix, *(p for p in e["loc"] if p not in _UNION_TAGS)]
        if e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc.append(e["ctx"]["discriminator"].strip("'"))
        if isinstance(cause := (e.get("ctx") or {}).get("error"), _FieldValueError):
            loc.append(cause.field)
        error = FieldError(_loc(loc), _message(e))
        if error not in out:
            out.append(error)
    return out


@functools.cache
def _param_adapter(name: str) -> TypeAdapter[Any]:
    info = _PARAM_FIELDS[name]
    form: Any = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
    return TypeAdapter(form, config=ConfigDict(allow_inf_nan=False))


def _is_numeric_param(name: str) -> bool:
    return _PARAM_FIELDS[name].annotation in (int, float, float | None, int | None)


def _as_param_type(name: str, value: Any) -> Any:
    """``value`` as parameter ``name``'s type when that is lossless and valid, else as is.

    2.0 and "2" become the int 2, 1 the float 1.0 for a float; 2.5 for an int stays 2.5
    (and :func:`_bound_messages` refuses it).
    """
    if name not in _PARAM_FIELDS or (isinstance(value, bool) and _is_numeric_param(name)):
        return value
    try:
        typed = _param_adapter(name).validate_python(value)
    except ValidationError:
        return value
    return list(typed) if isinstance(typed, tuple) else typed


def _bound_messages(name: str, value: Any) -> list[str]:
    """Why ``value`` is not a valid ``name`` parameter; empty when it is."""
    if isinstance(value, bool) and _is_numeric_param(name):
        return ["must be a number, not true/false"]
    if isinstance(value, str) and _PARAM_FIELDS[name].annotation is bool:
        return [_not_a_bool(value)]
    try:
        _param_adapter(name).validate_python(value)
    except ValidationError as err:
        return [_message(e) for e in err.errors(include_url=False)]
    return []


def _number(x: float) -> str:
    """A bound or step as a user would write it: 0.6, not 0.6000000000000001."""
    if isinstance(x, int):
        return str(x)
    return repr(float(f"{x:.12g}"))


def _step_errors(where: str, dist: IntDistribution | FloatDistribution) -> list[FieldError]:
    """A ``step`` must divide ``high - low``: Optuna would silently lower ``high`` to fit."""
    if dist.step is None:
        return []
    span = dist.high - dist.low
    last: int
    if isinstance(dist, IntDistribution):
        last = (dist.high - dist.low) // dist.step
        if span % dist.step == 0:
            return []
    else:
        ratio = span / dist.step
        if ratio > MAX_STEPS:
            msg = f"too small: more than {MAX_STEPS:,} points (leave it out: a continuous range)"
            return [FieldError(f"{where}.step", msg)]
        last = round(ratio)
        # Relative tolerance: 0.9 / 0.1 is 9.000000000000002 in floats, and 0.1 divides 0.9.
        if math.isclose(ratio, last, rel_tol=1e-9, abs_tol=1e-9):
            return []
        last = math.floor(ratio)
    points = [dist.low + i * dist.step for i in range(min(last, 2) + 1)]
    shown = ", ".join(_number(p) for p in points[:2])
    if last >= 2:
        shown += (", ..., " if last > 2 else ", ") + _number(dist.low + last * dist.step)
    fit = _number(dist.low + last * dist.step)
    msg = (
        f"step {_number(dist.step)} does not divide high - low = {_number(span)}: the points "
        f"would be {shown}; set high to {fit} or a step that divides {_number(span)}"
    )
    return [FieldError(f"{where}.step", msg)]


def _grid_points(dist: Distribution) -> int:
    """How many values a (valid) distribution has on a grid."""
    if isinstance(dist, CategoricalDistribution):
        return len(dist.choices)
    if isinstance(dist, IntDistribution):
        return (dist.high - dist.low) // dist.step + 1
    assert dist.step is not None  # checked: sampler grid needs a step on floats
    return grid_steps(dist.low, dist.high, dist.step) + 1


def grid_steps(low: float, high: float, step: float) -> int:
    """The number of whole ``step``s from ``low`` that stay within ``high`` (floats' rounding
    forgiven: 0.1 fits 9 times into [0, 0.9])."""
    ratio = (high - low) / step
    return max(0, math.floor(ratio * (1 + 1e-9) + 1e-9))


def _check_distribution(name: str, dist: Distribution) -> list[FieldError]:
    where = f"space.{name}"
    errors: list[FieldError] = []
    if isinstance(dist, CategoricalDistribution):
        for i, choice in enumerate(dist.choices):
            errors += [FieldError(f"{where}.choices.{i}", m) for m in _bound_messages(name, choice)]
        if len(set(map(repr, dist.choices))) != len(dist.choices):
            errors.append(FieldError(f"{where}.choices", "must not repeat a choice"))
        return errors
    if not _is_numeric_param(name) or _PARAM_FIELDS[name].annotation is int | None:
        return [FieldError(f"{where}.type", f"{name} is not numeric: use type: categorical")]
    if _PARAM_FIELDS[name].annotation is int and isinstance(dist, FloatDistribution):
        return [FieldError(f"{where}.type", f"{name} is an integer: use type: int")]
    if dist.low > dist.high:
        errors.append(FieldError(f"{where}.low", f"must be <= high ({_number(dist.high)})"))
    if dist.log and dist.low <= 0:
        errors.append(FieldError(f"{where}.low", "must be > 0 with log: true"))
    if dist.log and isinstance(dist, IntDistribution) and dist.step != 1:
        errors.append(FieldError(f"{where}.step", "must be 1 with log: true"))
    if dist.log and isinstance(dist, FloatDistribution) and dist.step is not None:
        errors.append(FieldError(f"{where}.step", "cannot be combined with log: true"))
    for end in ("low", "high"):
        if not any(e.loc == f"{where}.{end}" for e in errors):
            errors += [
                FieldError(f"{where}.{end}", m) for m in _bound_messages(name, getattr(dist, end))
            ]
    if not errors:
        errors += _step_errors(where, dist)
    return errors


def _check_space(spec: StudySpec) -> list[FieldError]:
    errors: list[FieldError] = []
    for name, value in spec.space.items():
        if name.startswith("hidden_size_l") or (name == "hidden_sizes" and not _is_fixed(value)):
            msg = "per-layer widths are sampled from `hidden_size` with hidden_mode: per_layer"
            errors.append(FieldError(f"space.{name}", msg))
            continue
        if name not in _PARAM_FIELDS:
            known = ", ".join(sorted(_PARAM_FIELDS))
            errors.append(FieldError(f"space.{name}", f"unknown parameter (known: {known})"))
            continue
        kinds = _TASK_ONLY_PARAMS.get(name)
        if kinds and spec.task.kind not in kinds:
            errors.append(FieldError(f"space.{name}", f"only for task kind {' | '.join(kinds)}"))
            continue
        if not _is_fixed(value):
            errors += _check_distribution(name, value)  # type: ignore[arg-type]
        else:
            errors += [FieldError(f"space.{name}", m) for m in _bound_messages(name, value)]
    bidi = spec.space.get("bidirectional")
    if spec.task.kind == "char_lm" and (
        bidi is True or (isinstance(bidi, CategoricalDistribution) and True in bidi.choices)
    ):
        errors.append(FieldError("space.bidirectional", _BIDIRECTIONAL_LM))
    errors += _forget_bias_errors(spec)
    errors += _pruner_warmup_errors(spec)
    if spec.study.sampler == "grid":
        mode = spec.space.get("hidden_mode")
        if mode == "per_layer" or (
            isinstance(mode, CategoricalDistribution) and "per_layer" in mode.choices
        ):
            errors.append(
                FieldError("space.hidden_mode", "sampler grid cannot search per_layer widths")
            )
        for name, dist in spec.searched().items():
            if isinstance(dist, FloatDistribution) and dist.step is None:
                errors.append(
                    FieldError(f"space.{name}", "sampler grid needs a `step` on float parameters")
                )
        if not errors:
            # Optuna's grid sampler lists every combination up front.
            points = math.prod(_grid_points(d) for d in spec.searched().values())
            if points > MAX_GRID_POINTS:
                shown = f"{points:,}" if points < 10**12 else f"{float(min(points, 10**300)):.0e}"
                msg = (
                    f"the grid has {shown} points, more than {MAX_GRID_POINTS:,}: use "
                    "fewer choices, coarser steps, or another sampler"
                )
                errors.append(FieldError("study.sampler", msg))
            elif spec.study.n_trials > points:
                # A grid runs each point once; more trials would only repeat points.
                msg = (
                    f"must be <= {points:,}, the grid's number of points, with sampler grid "
                    "(each point runs exactly once)"
                )
                errors.append(FieldError("study.n_trials", msg))
    return errors


def _pruner_warmup_errors(spec: StudySpec) -> list[FieldError]:
    """A warm-up as long as the longest trial turns pruning off without saying so."""
    warmup = spec.study.pruner_warmup_epochs
    epochs = spec.space.get("max_epochs", LSTMConfig.model_fields["max_epochs"].default)
    longest = epochs.high if isinstance(epochs, IntDistribution) else epochs
    if (
        spec.study.pruner == "none"
        or warmup == _DEFAULT_WARMUP  # the default, also with one-epoch trials
        or not isinstance(longest, int)
        or warmup < longest
    ):
        return []
    return [
        FieldError(
            "study.pruner_warmup_epochs",
            f"must be below max_epochs ({longest}): no trial trains more than {longest} "
            "epochs, so none could be pruned (use pruner: none to turn pruning off)",
        )
    ]


def _forget_bias_errors(spec: StudySpec) -> list[FieldError]:
    """forget_bias (fixed to a number, or searched) needs a space whose cell can be lstm;
    with cell searched among lstm and others it applies to the lstm trials only."""
    forget_bias = spec.space.get("forget_bias")
    if forget_bias is None:  # absent, or fixed to null (no forget-gate bias set)
        return []
    cell = spec.space.get("cell", _PARAM_FIELDS["cell"].default)
    cells = cell.choices if isinstance(cell, CategoricalDistribution) else (cell,)
    if "lstm" in cells:
        return []
    return [FieldError("space.forget_bias", FORGET_BIAS_LSTM_ONLY)]


def _check_keep(spec: StudySpec) -> list[FieldError]:
    study = spec.study
    if study.keep_checkpoints == "top_k" and study.keep_top_k is None:
        return [FieldError("study.keep_top_k", "required with keep_checkpoints: top_k (e.g. 3)")]
    if study.keep_checkpoints != "top_k" and study.keep_top_k is not None:
        msg = f"only with keep_checkpoints: top_k (it is {study.keep_checkpoints})"
        return [FieldError("study.keep_top_k", msg)]
    return []


_PER_LAYER_NAME = re.compile(r"^hidden_size_l(\d+)$")


def _param_field(name: str) -> str:
    """The LSTMConfig field an Optuna parameter name sets (``hidden_size_l2``: hidden_size)."""
    return "hidden_size" if _PER_LAYER_NAME.match(name) else name


def searched_distributions(spec: StudySpec) -> dict[str, Distribution]:
    """Every parameter a trial of ``spec`` may ask the sampler for, by its Optuna name: the
    searched parameters, and ``hidden_size_l0``, ``hidden_size_l1``... (each with
    ``hidden_size``'s distribution) when ``hidden_mode`` may be per_layer. What
    ``study.enqueue`` entries and warm-started trials may set."""
    dists: dict[str, Distribution] = dict(spec.searched())
    mode = spec.space.get("hidden_mode", _PARAM_FIELDS["hidden_mode"].default)
    modes = mode.choices if isinstance(mode, CategoricalDistribution) else [mode]
    width = spec.space.get("hidden_size", _PARAM_FIELDS["hidden_size"].default)
    if "per_layer" not in modes or "hidden_sizes" in spec.space:
        return dists
    if modes == ["per_layer"]:
        dists.pop("hidden_size", None)  # only the per-layer widths are asked for
    if isinstance(width, IntDistribution | FloatDistribution | CategoricalDistribution):
        layers = spec.space.get("num_layers", _PARAM_FIELDS["num_layers"].default)
        if isinstance(layers, IntDistribution):
            counts: list[Any] = [layers.high]
        elif isinstance(layers, CategoricalDistribution):
            counts = list(layers.choices)
        else:
            counts = [layers]
        most = max((c for c in counts if isinstance(c, int)), default=0)
        for i in range(min(most, MAX_LAYERS)):
            dists[f"hidden_size_l{i}"] = width
    return dists


def grid_points(spec: StudySpec) -> int:
    """How many points the grid of a (valid) spec's searched parameters has."""
    return math.prod(_grid_points(d) for d in spec.searched().values())


_NO_GRID = "not with sampler grid (it runs each of its points once, in its own order)"


def _check_warm_start(spec: StudySpec) -> list[FieldError]:
    """``study.warm_start_from`` as far as the document tells: no grid, no study twice.
    Whether each study exists, is the caller's and ran the same task is the submit's."""
    ids = spec.study.warm_start_from or ()
    if ids and spec.study.sampler == "grid":
        return [FieldError("study.warm_start_from", _NO_GRID)]
    first: dict[str, int] = {}
    errors = []
    for i, study_id in enumerate(ids):
        if study_id in first:
            msg = f"repeats study.warm_start_from.{first[study_id]}"
            errors.append(FieldError(f"study.warm_start_from.{i}", msg))
        first.setdefault(study_id, i)
    return errors


def check_enqueue(spec: StudySpec) -> list[FieldError]:
    """Why ``study.enqueue`` does not fit the space; empty when it does.

    Each entry (``study.enqueue.<i>``) names searched parameters only (by their Optuna
    names), each value a point of its distribution (a choice, or within ``[low, high]``
    on the ``step``), none that the entry's other values switch off (``momentum`` with
    ``optimizer: adam``) and no conditional one without its searched condition
    (``momentum`` needs ``optimizer``), together a valid config. At most ``n_trials``
    entries; not with ``sampler: grid``. Call on a spec whose space is valid.
    """
    entries = spec.study.enqueue or ()
    if not entries:
        return []
    if spec.study.sampler == "grid":
        return [FieldError("study.enqueue", _NO_GRID)]
    errors = []
    if len(entries) > spec.study.n_trials:
        msg = (
            f"lists {len(entries)} configurations, more than study.n_trials "
            f"({spec.study.n_trials}): each runs as one of the study's trials"
        )
        errors.append(FieldError("study.enqueue", msg))
    dists = searched_distributions(spec)
    for i, entry in enumerate(entries):
        errors += _enqueue_entry_errors(spec, dists, f"study.enqueue.{i}", entry)
    return errors


def _enqueue_entry_errors(
    spec: StudySpec, dists: Mapping[str, Distribution], where: str, entry: Mapping[str, Any]
) -> list[FieldError]:
    if not entry:
        return [FieldError(where, "empty: give at least one searched parameter")]
    errors = []
    for name, value in entry.items():
        dist = dists.get(name)
        msg = _not_searched(spec, dists, name) if dist is None else _outside(dist, value)
        if msg:
            errors.append(FieldError(f"{where}.{name}", msg))
    for name in entry:
        parent = _ACTIVE_WHEN.get(name, ("", ()))[0]
        if parent in dists and parent not in entry and name in dists:
            # Else the sampler's pick of the parent could silently switch it off.
            errors.append(FieldError(f"{where}.{name}", _unused_reason(spec, entry, name)))
    if errors:
        return errors
    # Replayed with the rest at each end of the space: a parameter neither replay asks for
    # is one that the entry's own values switch off.
    attempts: list[tuple[set[str], list[FieldError]]] = []
    for fill in (_LowestTrial(), _HighestTrial()):
        trial = _EntryTrial(entry, fill)
        try:
            sample_config(trial, spec)
        except InvalidConfig as err:
            attempts.append((trial.used, err.errors))
        else:
            attempts.append((trial.used, []))
    used = set().union(*(names for names, _ in attempts))
    errors = [
        FieldError(f"{where}.{name}", _unused_reason(spec, entry, name))
        for name in entry
        if name not in used
    ]
    if all(errs for _, errs in attempts):
        errors += [FieldError(where + e.loc.removeprefix("space"), e.msg) for e in attempts[0][1]]
    return errors


def _not_searched(spec: StudySpec, dists: Mapping[str, Distribution], name: str) -> str:
    if name in spec.space:
        return f"fixed in the space (to {_shown(spec.space[name])}): leave it out"
    if name in _PARAM_FIELDS:
        return "not searched in this space: search it in `space`, or leave it out"
    searched = ", ".join(sorted(dists)) or "none"
    return f"unknown parameter (this space searches: {searched})"


def _shown(value: Any) -> str:
    """A value as YAML writes it (true, null, 0.5, adam)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return _number(value) if isinstance(value, int | float) else str(value)


def _outside(dist: Distribution, value: Any) -> str | None:
    """Why ``value`` is not a point of ``dist``; None when it is (as Optuna tests it)."""
    if isinstance(dist, CategoricalDistribution):
        if any(type(value) is type(c) and value == c for c in dist.choices):
            return None
        return f"must be one of the space's choices: {', '.join(map(_shown, dist.choices))}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "must be a number"
    if isinstance(dist, IntDistribution) and not isinstance(value, int):
        return "must be an integer"
    if not dist.low <= value <= dist.high:
        return f"must be within the space's range [{_number(dist.low)}, {_number(dist.high)}]"
    if dist.step is not None:
        k = (value - dist.low) / dist.step
        if abs(k - round(k)) >= 1e-8:  # Optuna's own test (FloatDistribution._contains)
            return f"must be on the space's step: {_number(dist.low)} + k * {_number(dist.step)}"
    return None


def _unused_reason(spec: StudySpec, entry: Mapping[str, Any], name: str) -> str:
    layer = _PER_LAYER_NAME.match(name)
    if layer:
        return f"only used with hidden_mode: per_layer and num_layers >= {int(layer[1]) + 1}"
    if name == "hidden_size":
        return "not used with hidden_mode: per_layer (give hidden_size_l0, hidden_size_l1, ...)"
    if name == "dropout":
        parent, reason = "num_layers", "only used with num_layers >= 2 (it sits between layers)"
    elif name in _ACTIVE_WHEN:
        parent, active = _ACTIVE_WHEN[name]
        reason = f"only used with {parent}: {' | '.join(map(_shown, active))}"
    else:
        return "not used by this configuration"
    if parent not in entry and parent in spec.searched():
        reason += f"; give {parent} in this entry too"
    return reason


def _check_limits(spec: StudySpec, limits: SpecLimits) -> list[FieldError]:
    errors = []
    if spec.study.n_trials > limits.max_trials:
        msg = f"must be <= {limits.max_trials} (LSTM_HPO_MAX_TRIALS)"
        errors.append(FieldError("study.n_trials", msg))
    if (confirm := spec.study.confirm) is not None:
        if confirm.top_k > spec.study.n_trials:
            given = "" if "top_k" in confirm.model_fields_set else " (the default)"
            msg = (
                f"{confirm.top_k}{given} is more than the study's n_trials ({spec.study.n_trials})"
            )
            errors.append(FieldError("study.confirm.top_k", msg))
        if confirm.top_k * confirm.seeds > limits.max_trials:
            msg = (
                f"top_k x seeds = {confirm.top_k * confirm.seeds} trials, more than "
                f"LSTM_HPO_MAX_TRIALS ({limits.max_trials})"
            )
            errors.append(FieldError("study.confirm.seeds", msg))
    if spec.study.max_retries > limits.max_retries:
        msg = f"must be <= {limits.max_retries} (LSTM_HPO_MAX_RETRIES)"
        errors.append(FieldError("study.max_retries", msg))
    limit = limits.max_timeout_s
    for name in ("timeout_s", "trial_timeout_s"):
        seconds = getattr(spec.study, name)
        if seconds is not None and seconds > limit:
            shown = _number(int(limit) if float(limit).is_integer() else limit)
            errors.append(
                FieldError(f"study.{name}", f"must be <= {shown} (LSTM_HPO_MAX_TIMEOUT_S)")
            )
    errors += check_data_paths(spec.task, limits.data_roots)
    return errors


def _check_notify(spec: StudySpec, limits: SpecLimits) -> list[FieldError]:
    """``study.notify.url`` must lie under one of ``limits.webhook_allow`` (None: unchecked)."""
    notify, allowed = spec.study.notify, limits.webhook_allow
    if notify is None or allowed is None or url_allowed(notify.url, allowed):
        return []
    if not allowed:
        msg = "webhooks are off on this server (LSTM_HPO_WEBHOOK_ALLOW is empty)"
    else:
        msg = f"must lie under one of {', '.join(allowed)} (LSTM_HPO_WEBHOOK_ALLOW)"
    return [FieldError("study.notify.url", msg)]


def check_data_paths(task: TaskSpec, data_roots: tuple[Path, ...] | None) -> list[FieldError]:
    """A user's ``task.path`` must resolve inside one of ``data_roots`` (None: anywhere).

    Checks the file the workers will read (:func:`resolve_data_path`: ``~`` expanded, the
    first root that has it), with every symlink and ``..`` followed: not the text, which
    ``~/..`` or a link in the first root could take elsewhere.
    """
    path = getattr(task, "path", None)
    if path is None or data_roots is None:
        return []
    located = Path(os.path.realpath(resolve_data_path(path, data_roots)))
    if any(located.is_relative_to(os.path.realpath(r)) for r in data_roots):
        return []
    roots = ", ".join(str(r) for r in data_roots) or "(none configured)"
    return [FieldError("task.path", f"must be a file inside the data directories: {roots}")]


def expand_home(path: str | Path) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded; as written when that home is
    unknown (os.path's expanduser; ``Path.expanduser`` raises RuntimeError there)."""
    return Path(os.path.expanduser(path))


def resolve_data_path(path: str, data_roots: tuple[Path, ...] | None) -> Path:
    """The file a (validated) ``task.path`` names: ``~`` or ``~user`` expanded (kept as
    written when that home is unknown), relative paths tried in each root in turn."""
    p = expand_home(path)
    if p.is_absolute() or not data_roots:
        return p
    for root in data_roots:
        if os.path.exists(root / p):  # False, not OSError, for a name too long
            return root / p
    return data_roots[0] / p


def parse_spec(data: Any, limits: SpecLimits = DEFAULT_LIMITS) -> StudySpec:
    """Validate a spec (a mapping, or YAML 1.2 / JSON text or UTF-8 bytes).

    Fixed values and choices come back as their parameter's type (``num_layers: 2.0`` is
    the int 2). Whatever ``data`` is, raises only :class:`InvalidSpec`, naming every bad
    field with its dotted path and the rule.
    """
    if isinstance(data, str | bytes):
        data = _load_yaml(data, InvalidSpec)
    if not isinstance(data, Mapping):
        raise InvalidSpec([FieldError("", "a spec must be a mapping with `task` and `space`")])
    if errors := document_errors(data):
        raise InvalidSpec(errors)
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as err:
        raise InvalidSpec(_from_validation_error(err)) from None
    errors = _check_space(spec) + _check_limits(spec, limits) + _check_keep(spec)
    errors += _check_notify(spec, limits) + _check_objectives(spec)
    if errors:
        raise InvalidSpec(errors)
    # A full sample at each end of every range proves that the fixed values combine with
    # the searched ones into valid configs.
    try:
        lowest_config(spec)
        largest_config(spec)
    except InvalidConfig as err:
        raise InvalidSpec(err.errors) from None
    if errors := _check_worker_memory(spec, limits):
        raise InvalidSpec(errors)
    if errors := _check_warm_start(spec) + check_enqueue(spec):
        raise InvalidSpec(errors)
    return spec


def _check_objectives(spec: StudySpec) -> list[FieldError]:
    """``study.objectives`` name the task's metric once and only known extras, each once;
    a multi-objective study cannot be warm-started (its copies carry one value)."""
    names = spec.study.objectives
    if names is None:
        return []
    metric = spec.metric.name
    known = [metric, *EXTRA_OBJECTIVES]
    errors = [
        FieldError(f"study.objectives.{i}", f"unknown objective {name!r}; use {', '.join(known)}")
        for i, name in enumerate(names)
        if name not in known
    ]
    if len(set(names)) != len(names):
        errors.append(FieldError("study.objectives", "an objective is listed twice"))
    if metric not in names:
        msg = f"must include the task's metric {metric!r} (with params and/or latency_ms)"
        errors.append(FieldError("study.objectives", msg))
    if not spec.is_multi_objective:
        return errors
    study = spec.study
    if study.confirm is not None:
        msg = "ranks one objective; a multi-objective study's best is a Pareto front"
        errors.append(FieldError("study.confirm", msg))
    if study.pruner != "none":
        msg = (
            f"{study.pruner!r} ranks one objective; with several objectives use none "
            "(Optuna's pruners do not support multi-objective studies)"
        )
        errors.append(FieldError("study.pruner", msg))
    if study.sampler == "cmaes":
        msg = "cmaes optimises one objective; use tpe, gp, random or grid"
        errors.append(FieldError("study.sampler", msg))
    if study.direction is not None:
        msg = "for one objective; each of several objectives has its own direction"
        errors.append(FieldError("study.direction", msg))
    if study.warm_start_from:
        msg = "a multi-objective study cannot be warm-started (earlier trials carry one value)"
        errors.append(FieldError("study.warm_start_from", msg))
    return errors


def _check_worker_memory(spec: StudySpec, limits: SpecLimits) -> list[FieldError]:
    """The most expensive config of a (valid) spec must fit ``limits.worker_memory_gb``,
    unless the study prunes the configs that do not (``study.on_too_large: prune``)."""
    if limits.worker_memory_gb is None or spec.study.on_too_large == "prune":
        return []
    # Imported here: service.estimate builds on this module (and reads data files).
    from service.estimate import space_too_large

    try:
        return space_too_large(spec, limits.worker_memory_gb, limits.data_roots)
    except InvalidSpec:
        # The data cannot be read: the data check at submit (data_checks.check_task_data)
        # refuses it, naming the line or byte.
        return []


def parse_config(data: Any) -> ResolvedConfig:
    """Validate a resolved config, or a spec whose space has nothing left to search.

    Raises :class:`InvalidConfig` (or :class:`InvalidSpec` for a spec) naming every bad field.
    """
    if isinstance(data, str | bytes):
        data = _load_yaml(data, InvalidConfig)
    if not isinstance(data, Mapping):
        raise InvalidConfig([FieldError("", "a config must be a mapping with `task` and `params`")])
    if errors := document_errors(data):
        raise InvalidConfig(errors)
    if "space" in data and "params" not in data:
        spec = parse_spec(data)
        if spec.searched():
            names = ", ".join(sorted(spec.searched()))
            raise InvalidConfig(
                [FieldError("space", f"still searches {names}: fix every value to train it")]
            )
        return lowest_config(spec)
    try:
        return ResolvedConfig.model_validate(data)
    except ValidationError as err:
        raise InvalidConfig(_from_validation_error(err)) from None


def load_config_file(path: str | Path) -> ResolvedConfig:
    """Read a resolved config (or a fully fixed spec) from a YAML or JSON file.

    Raises :class:`InvalidConfig` when the file cannot be read or is not a valid config.
    """
    try:
        text = Path(path).read_bytes()
    except OSError as err:
        raise InvalidConfig([FieldError("", f"cannot read {path}: {err.strerror}")]) from None
    return parse_config(text)


def load_spec_file(path: str | Path, limits: SpecLimits = DEFAULT_LIMITS) -> StudySpec:
    """Read and validate a spec file. Raises :class:`InvalidSpec` (unreadable or invalid)."""
    try:
        text = Path(path).read_bytes()
    except OSError as err:
        raise InvalidSpec([FieldError("", f"cannot read {path}: {err.strerror}")]) from None
    return parse_spec(text, limits)


# --------------------------------------------------------------------------------------
# Documents: YAML 1.2 in and out, and what any spec or config document must be
# --------------------------------------------------------------------------------------

#: Nesting and size of a document: a spec is a small thing; YAML aliases can make a
#: few lines reach millions of values (the "billion laughs").
MAX_DEPTH = 32
MAX_VALUES = 10_000
_STR_TAG = "tag:yaml.org,2002:str"


class _Yaml12Constructor(SafeConstructor):
    """ruamel's safe constructor, read as YAML 1.2's core schema: no timestamps, and a
    JSON-style escaped surrogate pair ("\\ud83d\\ude00") is the one character it names."""

    def construct_yaml_str(self, node: Any) -> Any:
        value = super().construct_yaml_str(node)
        if isinstance(value, str) and _SURROGATE.search(value):
            try:
                return value.encode("utf-16", "surrogatepass").decode("utf-16")
            except UnicodeDecodeError:  # a lone surrogate: document_errors names it
                return value
        return value


_SURROGATE = re.compile("[\ud800-\udfff]")
_MERGE_TAG = "tag:yaml.org,2002:merge"
_Yaml12Constructor.add_constructor(_STR_TAG, _Yaml12Constructor.construct_yaml_str)
_Yaml12Constructor.add_constructor(
    "tag:yaml.org,2002:timestamp", _Yaml12Constructor.construct_yaml_str
)
# A plain << as a value (``name: <<``) is text in YAML 1.2; as a key, _duplicate_keys
# refuses it before anything is constructed.
_Yaml12Constructor.add_constructor(_MERGE_TAG, _Yaml12Constructor.construct_yaml_str)


def _load_yaml(text: str | bytes, error: type[InvalidSpec]) -> Any:
    """Parse YAML 1.2 (JSON is YAML): ``1e-3`` is a float, ``yes`` text, ``010`` ten.

    A key given twice in one mapping is refused, naming the key, its path and both lines.
    Raises ``error`` (and nothing else) for text that is not one YAML document.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise error([FieldError("", f"not UTF-8 text (byte {err.start})")]) from None
    if _flow_depth(text) > MAX_DEPTH:
        # Refused before parsing: the parser recurses per level, and a body of brackets
        # costs it seconds of CPU before Python's recursion limit stops it.
        raise error([FieldError("", f"nested more than {MAX_DEPTH} levels deep")])
    loader = YAML(typ="safe", pure=True)
    loader.Constructor = _Yaml12Constructor
    try:
        node = loader.compose(text)
        if node is None:
            return None
        if duplicates := _duplicate_keys(node):
            raise error(duplicates)
        return loader.constructor.construct_document(node)
    except MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = err.problem or str(err).splitlines()[0]
        raise error([FieldError("", f"not valid YAML or JSON{where}: {problem}")]) from None
    except YAMLError as err:  # e.g. a character YAML does not allow
        problem = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise error([FieldError("", f"not valid YAML or JSON: {problem}")]) from None
    except RecursionError:
        raise error([FieldError("", f"nested more than {MAX_DEPTH} levels deep")]) from None
    except ValueError as err:  # e.g. an integer past Python's digit cap (CVE-2020-10735)
        problem = str(err)
        if "integer string conversion" in problem:  # its advice is for Python programmers
            problem = f"a number of more than {sys.get_int_max_str_digits()} digits"
        raise error([FieldError("", f"not valid YAML or JSON: {problem}")]) from None


_BRACKETS = re.compile(r"[\[\]{}]")


def _flow_depth(text: str) -> int:
    """An upper bound of the nesting of ``[`` / ``{`` in ``text`` (quotes are not parsed,
    so brackets inside strings count too: a bound, never an underestimate). Block nesting
    by indentation needs a line per level and is bounded by the body size."""
    depth = deepest = 0
    for match in _BRACKETS.finditer(text):
        if match.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth = max(depth - 1, 0)
    return deepest


def _duplicate_keys(root: Node) -> list[FieldError]:
    """Every key given twice in one mapping of the node tree, with its path and lines, and
    every merge key (``<<``): what it merges would be a second, silent source of a key."""
    errors: list[tuple[int, FieldError]] = []
    seen: set[int] = set()  # an alias points at a node already walked (and may loop)
    stack: list[tuple[tuple[str | int, ...], Node]] = [((), root)]
    while stack and len(seen) <= MAX_VALUES:
        path, node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, MappingNode):
            first: dict[str, tuple[int, int]] = {}  # key -> (line, column), 1-based
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, ScalarNode) else None
                if key is None:
                    pass
                elif key_node.tag == _MERGE_TAG:  # YAML 1.1's <<, which ruamel also reads
                    line = key_node.start_mark.line
                    msg = (
                        f"merge key `<<` (line {line + 1}): YAML 1.1, not 1.2; write the "
                        "keys out (it let a key given twice pass silently)"
                    )
                    errors.append((line, FieldError(_as_text(_loc(path)), msg)))
                elif key in first:
                    (line0, col0), mark = first[key], key_node.start_mark
                    where = (
                        f"lines {line0} and {mark.line + 1}"
                        if line0 != mark.line + 1
                        else f"line {line0}, columns {col0} and {mark.column + 1}"
                    )
                    msg = f"duplicate key `{_as_text(key)}` ({where})"
                    errors.append((mark.line, FieldError(_as_text(_loc([*path, key])), msg)))
                else:
                    first[key] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                stack.append(((*path, key if key is not None else "?"), value_node))
        elif isinstance(node, SequenceNode):
            stack.extend(((*path, i), item) for i, item in enumerate(node.value))
    return [error for _, error in sorted(errors, key=lambda e: e[0])]


def _as_text(text: str) -> str:
    """``text`` with any lone surrogate written as an escape: an error message is UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def document_errors(data: Any) -> list[FieldError]:
    """What keeps ``data`` from being a spec or config document, by path; empty if nothing.

    A document is JSON's data model, small: mappings with text keys, lists, text without
    NUL characters, true/false, null, integers of at most 64 bits and finite floats, at
    most :data:`MAX_DEPTH` levels deep and :data:`MAX_VALUES` values in all.
    """
    errors: list[FieldError] = []
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), data)]
    count = 0
    while stack and len(errors) < 20:
        path, value = stack.pop()
        count += 1
        if count > MAX_VALUES:  # named where the count ran out: the list that is too long
            at = list(path)
            while at and isinstance(at[-1], int):
                at.pop()
            too_many = f"the document holds more than {MAX_VALUES:,} values: not a spec"
            return [*errors, FieldError(_loc(at), too_many)]
        if len(path) > MAX_DEPTH:
            errors.append(FieldError(_loc(path), f"nested more than {MAX_DEPTH} levels deep"))
            continue
        msg = _value_problem(value)
        if msg:
            errors.append(FieldError(_loc(path), msg))
        elif isinstance(value, Mapping):
            for key in reversed(list(value)):
                if not isinstance(key, str):
                    where = _loc([*path, _short(key)])
                    errors.append(FieldError(where, "a key must be text (quote it)"))
                elif msg := _value_problem(key):
                    errors.append(FieldError(_loc([*path, ascii(key)]), f"key: {msg}"))
                else:
                    stack.append(((*path, key), value[key]))
        elif isinstance(value, list | tuple):
            stack.extend(((*path, i), value[i]) for i in reversed(range(len(value))))
    return errors


def _value_problem(value: Any) -> str | None:
    if value is None or isinstance(value, bool | Mapping | list | tuple):
        return None
    if isinstance(value, int):
        if abs(value) > MAX_SPEC_INT:
            return f"integer too large: at most {MAX_SPEC_INT} either side of 0"
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"must be a finite number (got {value})"
    if isinstance(value, str):
        if "\x00" in value:
            return "text must not contain a NUL character"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "not valid Unicode text (a lone surrogate)"
        return None
    return f"not a JSON value (a {type(value).__name__})"


def _short(key: Any) -> str:
    """A key as the user wrote it (or its type when it has no short spelling)."""
    if isinstance(key, bool | float) or (isinstance(key, int) and abs(key) <= MAX_SPEC_INT):
        return str(key)
    return f"<{type(key).__name__}>" if key is not None else "null"


class _Yaml12SafeDumper(yaml.SafeDumper):
    """PyYAML's safe dumper, quoting text that a YAML 1.2 reader would take for a number."""


_YAML12 = VersionedResolver(version=(1, 2))


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    quote = str(_YAML12.resolve(ScalarNode, value, (True, False))) != _STR_TAG
    return dumper.represent_scalar(_STR_TAG, value, style="'" if quote else None)


_Yaml12SafeDumper.add_representer(str, _represent_str)


def dump_yaml(data: Any) -> str:
    """YAML that both YAML 1.2 (:func:`_load_yaml`) and 1.1 readers read back as ``data``."""
    return yaml.dump(data, Dumper=_Yaml12SafeDumper, sort_keys=False)


# --------------------------------------------------------------------------------------
# Sampling: the one mapping (spec, trial) -> resolved config
# --------------------------------------------------------------------------------------


class ParamSuggester(Protocol):
    """What :func:`sample_config` needs of a trial (Optuna's ``Trial`` and ``FixedTrial`` fit)."""

    def suggest_int(
        self, name: str, low: int, high: int, *, step: int = 1, log: bool = False
    ) -> int: ...

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float: ...

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


#: When a parameter is searched only if another one has a given value (conditional space).
_ACTIVE_WHEN: Mapping[str, tuple[str, tuple[Any, ...]]] = {
    "init_range": ("init", ("uniform",)),
    "momentum": ("optimizer", ("sgd", "rmsprop")),
    "lr_decay": ("lr_schedule", ("step", "plateau")),
    "lr_decay_start": ("lr_schedule", ("step",)),
    "forget_bias": ("cell", ("lstm",)),
}
#: Conditional parameters the resolved config refuses outside their condition: a fixed
#: value is conditional too (a fixed forget_bias applies to the trials whose cell is lstm).
_CONDITIONAL_EVEN_WHEN_FIXED = frozenset({"forget_bias"})


def _suggest(trial: ParamSuggester, name: str, spec: ParamSpec) -> Any:
    if isinstance(spec, IntDistribution):
        return trial.suggest_int(name, spec.low, spec.high, step=spec.step, log=spec.log)
    if isinstance(spec, FloatDistribution):
        return trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)
    if isinstance(spec, CategoricalDistribution):
        return trial.suggest_categorical(name, spec.choices)
    return spec


def sample_config(trial: ParamSuggester, spec: StudySpec) -> ResolvedConfig:
    """Map (spec, trial) to the resolved config the trial trains. Nothing else samples.

    Parameters are suggested in a fixed order so that conditional ones come after what they
    depend on: per-layer widths only for layers that exist, inter-layer dropout only with
    two or more layers, ``momentum`` only for sgd/rmsprop, ``init_range`` only for uniform,
    ``forget_bias`` only for lstm cells. Fixed (scalar) values are always kept, except a
    fixed ``forget_bias``, which applies only to the trials whose cell is lstm.
    """
    space = dict(spec.space)
    values: dict[str, Any] = {}
    for name in ("num_layers", "hidden_mode"):
        if name in space:
            values[name] = _suggest(trial, name, space.pop(name))
    num_layers = values.get("num_layers", _PARAM_FIELDS["num_layers"].default)
    width = space.pop("hidden_size", _PARAM_FIELDS["hidden_size"].default)
    if values.get("hidden_mode") == "per_layer" and "hidden_sizes" not in space:
        values["hidden_sizes"] = tuple(
            _suggest(trial, f"hidden_size_l{i}", width) for i in range(num_layers)
        )
    else:
        values["hidden_size"] = _suggest(trial, "hidden_size", width)
    if num_layers == 1 and not _is_fixed(space.get("dropout")):
        space.pop("dropout")
    gated = {name: space.pop(name) for name in list(space) if _is_gated(name, space[name])}
    for name, value in space.items():
        values[name] = _suggest(trial, name, value)
    for name, value in gated.items():
        parent, active = _ACTIVE_WHEN[name]
        if values.get(parent, _PARAM_FIELDS[parent].default) in active:
            values[name] = _suggest(trial, name, value)
    try:
        return ResolvedConfig(task=spec.task, params=LSTMConfig(**values))
    except ValidationError as err:
        raise InvalidConfig(_from_validation_error(err, ("space",))) from None


def _is_fixed(value: ParamSpec) -> bool:
    return not isinstance(value, IntDistribution | FloatDistribution | CategoricalDistribution)


def _is_gated(name: str, value: ParamSpec) -> bool:
    return name in _ACTIVE_WHEN and (not _is_fixed(value) or name in _CONDITIONAL_EVEN_WHEN_FIXED)


class _LowestTrial:
    """A stand-in trial that picks the lowest value of every distribution (for validation)."""

    def suggest_int(
        self, name: str, low: int, high: int, *, step: int = 1, log: bool = False
    ) -> int:
        return low

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float:
        return low

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return choices[0]


def lowest_config(spec: StudySpec) -> ResolvedConfig:
    """Every searched value at its low end (the first choice): one config the space allows.

    Raises :class:`InvalidConfig` when the fixed values do not combine into a valid config.
    """
    return sample_config(_LowestTrial(), spec)


class _HighestTrial(_LowestTrial):
    """A stand-in trial that picks the top of every distribution (the last choice)."""

    def suggest_int(
        self, name: str, low: int, high: int, *, step: int = 1, log: bool = False
    ) -> int:
        return low + (high - low) // step * step

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float:
        return high if step is None else min(high, low + grid_steps(low, high, step) * step)

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return choices[-1]


def largest_config(spec: StudySpec) -> ResolvedConfig:
    """Every searched value at its top end: the most expensive config a space allows."""
    return sample_config(_HighestTrial(), spec)


class _EntryTrial:
    """A stand-in trial that replays one ``study.enqueue`` entry, asking ``fill`` for the
    parameters the entry leaves out; ``used`` records the entry's parameters it was asked."""

    def __init__(self, entry: Mapping[str, Any], fill: _LowestTrial) -> None:
        self.entry = entry
        self.fill = fill
        self.used: set[str] = set()

    def _given(self, name: str) -> Any:
        self.used.add(name)
        return self.entry[name]

    def suggest_int(
        self, name: str, low: int, high: int, *, step: int = 1, log: bool = False
    ) -> int:
        if name in self.entry:
            return int(self._given(name))
        return self.fill.suggest_int(name, low, high, step=step, log=log)

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float:
        if name in self.entry:
            return float(self._given(name))
        return self.fill.suggest_float(name, low, high, step=step, log=log)

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        if name in self.entry:
            return self._given(name)
        return self.fill.suggest_categorical(name, choices)
