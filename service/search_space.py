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
import functools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, TypeAlias

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from service.errors import FieldError, InvalidConfig, InvalidSpec

# --------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------

Direction: TypeAlias = Literal["minimize", "maximize"]
TaskKind: TypeAlias = Literal["char_lm", "forecast", "classify", "adding", "synthetic"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _known_encoding(name: str) -> str:
    try:
        codecs.lookup(name)
    except LookupError:
        raise ValueError(f"unknown text encoding {name!r} (e.g. utf-8, cp1252, latin-1)") from None
    return name


#: The text encoding of a user's data file (``task.path``): any name Python's codecs know.
Encoding: TypeAlias = Annotated[str, Field(max_length=40), AfterValidator(_known_encoding)]


class CharLMTask(_Frozen):
    """Character language model. Metric: validation loss in nats/char."""

    kind: Literal["char_lm"]
    #: A text file. Default: the Python standard library's own source files.
    path: str | None = None
    encoding: Encoding = "utf-8"
    #: The corpus is capped to this many characters (deterministically) before splitting.
    max_chars: int = Field(default=1_000_000, ge=1_000, le=200_000_000)
    val_fraction: float = Field(default=0.05, gt=0.0, lt=0.5)
    test_fraction: float = Field(default=0.05, gt=0.0, lt=0.5)


class ForecastTask(_Frozen):
    """Univariate forecasting. Metric: validation RMSE on the original scale."""

    kind: Literal["forecast"]
    #: A bundled series (needs the ``datasets`` extra) ...
    dataset: Literal["airline", "sunspots"] | None = None
    #: ... or a CSV file with a header row, and the column to forecast.
    path: str | None = None
    column: str | None = None
    encoding: Encoding = "utf-8"
    lookback: int = Field(default=24, ge=1, le=10_000)
    horizon: int = Field(default=1, ge=1, le=1_000)
    #: last_value: inputs and targets are taken relative to each window's last value (the
    #: model learns changes, so a trend beyond the training range does not break it);
    #: none: absolute (standardised) levels.
    normalize: Literal["last_value", "none"] = "last_value"
    #: Seasonal period for the seasonal-naive baseline (default: 12 airline, 11 sunspots).
    season: int | None = Field(default=None, ge=2, le=10_000)
    val_fraction: float = Field(default=0.15, gt=0.0, lt=0.5)
    test_fraction: float = Field(default=0.15, gt=0.0, lt=0.5)

    @model_validator(mode="after")
    def _one_source(self) -> ForecastTask:
        if (self.dataset is None) == (self.path is None):
            raise ValueError("give exactly one of `dataset` (airline | sunspots) or `path`")
        if self.path is not None and self.column is None:
            raise ValueError("`column` is required with `path`")
        return self


class ClassifyTask(_Frozen):
    """Multivariate, variable-length sequence classification. Metric: validation accuracy."""

    kind: Literal["classify"]
    #: A bundled UEA data set (needs the ``datasets`` extra) ...
    dataset: Literal["japanese_vowels"] | None = None
    #: ... or a JSON Lines file: one ``{"x": [[f1, f2, ...], ...], "label": ..., "split": ...}``
    #: per line (time-major; ``split`` optional: train | test).
    path: str | None = None
    encoding: Encoding = "utf-8"
    #: Part of the training split held out for validation.
    val_fraction: float = Field(default=0.2, gt=0.0, lt=0.5)
    #: Used when the data has no ``split`` column.
    test_fraction: float = Field(default=0.2, gt=0.0, lt=0.5)

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
    data_seed: int = Field(default=1234, ge=0)


class SyntheticTask(_Frozen):
    """No training: a deterministic function of the params, reported once per "epoch".

    For tests and benchmarks of the service path. ``fail_when`` / ``nan_when`` make chosen
    configurations raise or report NaN, so failure handling can be driven end to end.
    """

    kind: Literal["synthetic"]
    sleep_s: float = Field(default=0.0, ge=0.0, le=3600.0)
    fail_when: dict[str, Any] | None = None
    nan_when: dict[str, Any] | None = None


TaskSpec: TypeAlias = Annotated[
    CharLMTask | ForecastTask | ClassifyTask | AddingTask | SyntheticTask,
    Field(discriminator="kind"),
]


@dataclass(frozen=True)
class TaskMetric:
    """The validation metric a task's trials are ranked by."""

    name: str
    direction: Direction
    description: str


TASK_METRICS: Mapping[str, TaskMetric] = {
    "char_lm": TaskMetric("val_loss", "minimize", "validation cross-entropy, nats/char"),
    "forecast": TaskMetric("val_rmse", "minimize", "validation RMSE, original scale"),
    "classify": TaskMetric("val_acc", "maximize", "validation accuracy"),
    "adding": TaskMetric("val_mse", "minimize", "validation mean squared error"),
    "synthetic": TaskMetric("value", "minimize", "synthetic objective"),
}


def task_metric(task: TaskSpec) -> TaskMetric:
    return TASK_METRICS[task.kind]


# --------------------------------------------------------------------------------------
# Parameters (the resolved, fixed side)
# --------------------------------------------------------------------------------------

HiddenMode: TypeAlias = Literal["tied", "pyramid", "per_layer"]
InitStrategy: TypeAlias = Literal["pytorch_default", "uniform", "xavier_uniform", "orthogonal"]
OptimizerName: TypeAlias = Literal["adam", "adamw", "sgd", "rmsprop"]
LRSchedule: TypeAlias = Literal["none", "step", "cosine", "plateau"]

MAX_LAYERS = 8
MAX_HIDDEN = 4096
#: Pyramid mode halves the width per layer but never goes below this (or the first width).
PYRAMID_MIN_HIDDEN = 8


class LSTMConfig(_Frozen):
    """Every hyperparameter of one trial, fixed. Defaults are the documented defaults."""

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
    max_epochs: int = Field(default=10, ge=1, le=100_000)
    #: Stop after this many epochs without improvement; 0 turns it off.
    early_stopping_patience: int = Field(default=0, ge=0, le=100_000)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        if data.get("hidden_mode") == "per_layer" and data.get("hidden_sizes") is None:
            width = data.get("hidden_size", cls.model_fields["hidden_size"].default)
            data["hidden_sizes"] = [width] * data.get("num_layers", 2)
        if data.get("num_layers") == 1:
            # Dropout sits between layers: with one layer there is nowhere to put it.
            data["dropout"] = 0.0
        return data

    @model_validator(mode="after")
    def _consistent(self) -> LSTMConfig:
        if self.hidden_mode == "per_layer":
            assert self.hidden_sizes is not None  # filled in by _normalise
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
        return params

    def to_yaml(self) -> str:
        """YAML that :func:`load_config_file` reads back (unset optional fields left out)."""
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


_BIDIRECTIONAL_LM = "not allowed for task kind char_lm (a language model must not see the future)"

# --------------------------------------------------------------------------------------
# The search space (the spec side)
# --------------------------------------------------------------------------------------

Scalar: TypeAlias = bool | int | float | str | None


class IntDistribution(_Frozen):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(default=1, ge=1)
    log: bool = False


class FloatDistribution(_Frozen):
    type: Literal["float"]
    low: float
    high: float
    step: float | None = Field(default=None, gt=0.0)
    log: bool = False


class CategoricalDistribution(_Frozen):
    type: Literal["categorical"]
    choices: list[Scalar] = Field(min_length=1)


Distribution: TypeAlias = Annotated[
    IntDistribution | FloatDistribution | CategoricalDistribution, Field(discriminator="type")
]


def _param_spec_kind(value: Any) -> str:
    return "distribution" if isinstance(value, Mapping | BaseModel) else "fixed"


#: A space entry: a mapping ``{type: ...}`` is searched, anything else is a fixed value.
ParamSpec: TypeAlias = Annotated[
    Annotated[Distribution, Tag("distribution")] | Annotated[Scalar | list[int], Tag("fixed")],
    Discriminator(_param_spec_kind),
]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class SpecLimits(BaseModel):
    """Bounds that come from the deployment's settings rather than from the model."""

    model_config = ConfigDict(frozen=True)

    max_trials: int = 10_000
    max_retries: int = 10
    #: Directories user-supplied data paths must lie in; None allows any path (CLI use).
    data_roots: tuple[Path, ...] | None = None


DEFAULT_LIMITS = SpecLimits()


class StudySettings(_Frozen):
    """How the search runs."""

    #: Finished trials the study ends with (COMPLETE + PRUNED + FAIL that are not retried).
    n_trials: int = Field(default=20, ge=1)
    #: Default: the task metric's direction.
    direction: Direction | None = None
    sampler: Literal["tpe", "random", "cmaes", "gp", "grid"] = "tpe"
    pruner: Literal["none", "median", "hyperband", "successive_halving"] = "median"
    #: Sampler seed; each trial's sampler is seeded from it and the trial's slot.
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    #: A trial whose worker died is retried with the same parameters this many times.
    max_retries: int = Field(default=2, ge=0)
    #: Optional wall-clock budget: no new trial starts after this many seconds.
    timeout_s: float | None = Field(default=None, gt=0)


class StudySpec(_Frozen):
    """A whole study spec as submitted."""

    name: str | None = None
    task: TaskSpec
    space: dict[str, ParamSpec] = Field(default_factory=dict)
    study: StudySettings = StudySettings()

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str | None) -> str | None:
        if v is not None and not _NAME_RE.match(v):
            raise ValueError(
                "must be 1-100 letters, digits, '.', '_' or '-', starting alphanumeric"
            )
        return v

    @property
    def direction(self) -> Direction:
        return self.study.direction or task_metric(self.task).direction

    @property
    def metric(self) -> TaskMetric:
        return task_metric(self.task)

    def searched(self) -> dict[str, Distribution]:
        """The parameters that are searched (not fixed), by name."""
        return {
            k: v
            for k, v in self.space.items()
            if isinstance(v, IntDistribution | FloatDistribution | CategoricalDistribution)
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------

_PARAM_FIELDS: Mapping[str, FieldInfo] = LSTMConfig.model_fields
#: Parameters that only exist for some task kinds.
_TASK_ONLY_PARAMS: Mapping[str, tuple[str, ...]] = {
    "bptt": ("char_lm",),
    "embedding_dim": ("char_lm",),
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
    if e["type"] == "missing":
        return "required"
    if e["type"] == "union_tag_invalid":
        return f"must be one of {e['ctx']['expected_tags']} (got {e['ctx']['tag']!r})"
    msg: str = e["msg"].removeprefix("Value error, ")
    return msg[0].lower() + msg[1:] if msg else msg


def _from_validation_error(
    err: ValidationError, prefix: Sequence[str | int] = ()
) -> list[FieldError]:
    out: list[FieldError] = []
    for e in err.errors(include_url=False):
        loc = [*prefix, *(p for p in e["loc"] if p not in _UNION_TAGS)]
        if e["type"] == "union_tag_invalid":
            loc.append(e["ctx"]["discriminator"].strip("'"))
        error = FieldError(_loc(loc), _message(e))
        if error not in out:
            out.append(error)
    return out


@functools.cache
def _param_adapter(name: str) -> TypeAdapter[Any]:
    info = _PARAM_FIELDS[name]
    form: Any = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
    return TypeAdapter(form)


def _bound_messages(name: str, value: Any) -> list[str]:
    """Why ``value`` is not a valid ``name`` parameter; empty when it is."""
    try:
        _param_adapter(name).validate_python(value)
    except ValidationError as err:
        return [_message(e) for e in err.errors(include_url=False)]
    return []


def _check_distribution(name: str, dist: Distribution) -> list[FieldError]:
    where = f"space.{name}"
    errors: list[FieldError] = []
    if isinstance(dist, CategoricalDistribution):
        for i, choice in enumerate(dist.choices):
            errors += [FieldError(f"{where}.choices.{i}", m) for m in _bound_messages(name, choice)]
        if len(set(map(repr, dist.choices))) != len(dist.choices):
            errors.append(FieldError(f"{where}.choices", "must not repeat a choice"))
        return errors
    annotation = _PARAM_FIELDS[name].annotation
    numeric = annotation in (int, float, float | None)
    if not numeric:
        return [FieldError(f"{where}.type", f"{name} is not numeric: use type: categorical")]
    if annotation is int and isinstance(dist, FloatDistribution):
        return [FieldError(f"{where}.type", f"{name} is an integer: use type: int")]
    if dist.low > dist.high:
        errors.append(FieldError(f"{where}.low", f"must be <= high ({dist.high})"))
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
    return errors


def _check_limits(spec: StudySpec, limits: SpecLimits) -> list[FieldError]:
    errors = []
    if spec.study.n_trials > limits.max_trials:
        errors.append(FieldError("study.n_trials", f"must be <= {limits.max_trials}"))
    if spec.study.max_retries > limits.max_retries:
        errors.append(FieldError("study.max_retries", f"must be <= {limits.max_retries}"))
    errors += check_data_paths(spec.task, limits.data_roots)
    return errors


def check_data_paths(task: TaskSpec, data_roots: tuple[Path, ...] | None) -> list[FieldError]:
    """A user's ``task.path`` must resolve inside one of ``data_roots`` (None: anywhere)."""
    path = getattr(task, "path", None)
    if path is None or data_roots is None:
        return []
    candidates = [Path(path)] if Path(path).is_absolute() else [r / path for r in data_roots]
    for candidate in candidates:
        resolved = candidate.resolve()
        if any(resolved.is_relative_to(r.resolve()) for r in data_roots):
            return []
    roots = ", ".join(str(r) for r in data_roots) or "(none configured)"
    return [FieldError("task.path", f"must be a file inside the data directories: {roots}")]


def resolve_data_path(path: str, data_roots: tuple[Path, ...] | None) -> Path:
    """The file a (validated) ``task.path`` names: relative paths are tried in each root."""
    p = Path(path).expanduser()
    if p.is_absolute() or not data_roots:
        return p
    for root in data_roots:
        if (root / p).exists():
            return root / p
    return data_roots[0] / p


def parse_spec(data: Any, limits: SpecLimits = DEFAULT_LIMITS) -> StudySpec:
    """Validate a spec (a mapping, or YAML/JSON text).

    Raises :class:`InvalidSpec` naming every bad field with its dotted path and the rule.
    """
    if isinstance(data, str | bytes):
        data = _load_yaml(data, InvalidSpec)
    if not isinstance(data, Mapping):
        raise InvalidSpec([FieldError("", "a spec must be a mapping with `task` and `space`")])
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as err:
        raise InvalidSpec(_from_validation_error(err)) from None
    errors = _check_space(spec) + _check_limits(spec, limits)
    if errors:
        raise InvalidSpec(errors)
    # One full sample proves that the fixed values combine into a valid config.
    try:
        sample_config(_LowestTrial(), spec)
    except InvalidConfig as err:
        raise InvalidSpec(err.errors) from None
    return spec


def parse_config(data: Any) -> ResolvedConfig:
    """Validate a resolved config, or a spec whose space has nothing left to search."""
    if isinstance(data, str | bytes):
        data = _load_yaml(data, InvalidConfig)
    if not isinstance(data, Mapping):
        raise InvalidConfig([FieldError("", "a config must be a mapping with `task` and `params`")])
    if "space" in data and "params" not in data:
        spec = parse_spec(data)
        if spec.searched():
            names = ", ".join(sorted(spec.searched()))
            raise InvalidConfig(
                [FieldError("space", f"still searches {names}: fix every value to train it")]
            )
        return sample_config(_LowestTrial(), spec)
    try:
        return ResolvedConfig.model_validate(data)
    except ValidationError as err:
        raise InvalidConfig(_from_validation_error(err)) from None


def load_config_file(path: str | Path) -> ResolvedConfig:
    """Read a resolved config (or a fully fixed spec) from a YAML or JSON file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise InvalidConfig([FieldError("", f"cannot read {path}: {err.strerror}")]) from None
    return parse_config(text)


def load_spec_file(path: str | Path, limits: SpecLimits = DEFAULT_LIMITS) -> StudySpec:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise InvalidSpec([FieldError("", f"cannot read {path}: {err.strerror}")]) from None
    return parse_spec(text, limits)


def _load_yaml(text: str | bytes, error: type[InvalidSpec]) -> Any:
    try:
        return yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise error([FieldError("", f"not valid YAML or JSON{where}: {problem}")]) from None


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
}


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
    two or more layers, ``momentum`` only for sgd/rmsprop, ``init_range`` only for uniform.
    Fixed (scalar) values are always kept; only searched ones are conditional.
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
    return name in _ACTIVE_WHEN and not _is_fixed(value)


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


def largest_config(spec: StudySpec) -> ResolvedConfig:
    """Every searched value at its top end: the most expensive config a space allows."""

    class _Highest(_LowestTrial):
        def suggest_int(
            self, name: str, low: int, high: int, *, step: int = 1, log: bool = False
        ) -> int:
            return low + (high - low) // step * step

        def suggest_float(
            self,
            name: str,
            low: float,
            high: float,
            *,
            step: float | None = None,
            log: bool = False,
        ) -> float:
            return high if step is None else low + math.floor((high - low) / step) * step

        def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
            return choices[-1]

    return sample_config(_Highest(), spec)
