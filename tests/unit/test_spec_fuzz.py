"""Property-based: no spec, however malformed, makes ``parse_spec`` raise anything but
InvalidSpec, and a spec it accepts samples, stores and reloads without surprises.

Arbitrary JSON-like values (huge integers, NaN, inf, text, nested lists and mappings) go
into every field of a valid spec: each task field of each task kind, each space parameter
as a fixed value and inside a distribution, every study field and the top level. The
strategies are shared with the HTTP variant (tests/integration/test_spec_fuzz_http.py).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.errors import InvalidConfig, InvalidSpec
from service.search_space import (
    AddingTask,
    CharLMTask,
    ClassifyTask,
    ForecastTask,
    LSTMConfig,
    StudySettings,
    StudySpec,
    SyntheticTask,
    largest_config,
    lowest_config,
    parse_config,
    parse_spec,
)
from service.training.objective import grid_search_space

TASK_BASES: dict[str, dict[str, Any]] = {
    "char_lm": {"kind": "char_lm"},
    "forecast": {"kind": "forecast", "dataset": "airline"},
    "classify": {"kind": "classify"},
    "adding": {"kind": "adding", "seq_len": 20},
    "synthetic": {"kind": "synthetic"},
}
TASK_FIELDS: dict[str, list[str]] = {
    "char_lm": sorted(CharLMTask.model_fields),
    "forecast": sorted(ForecastTask.model_fields),
    "classify": sorted(ClassifyTask.model_fields),
    "adding": sorted(AddingTask.model_fields),
    "synthetic": sorted(SyntheticTask.model_fields),
}
PARAMS = sorted(LSTMConfig.model_fields)
NUMERIC = [n for n in PARAMS if LSTMConfig.model_fields[n].annotation in (int, float, float | None)]
STUDY_FIELDS = sorted(StudySettings.model_fields)
TOP_FIELDS = ["name", "task", "space", "study", "extra"]

#: Values that sit on the edges of what the rules accept.
EDGE_VALUES: list[Any] = [
    0, 1, -1, 2, 8, 9, 2.0, 2.5, 0.5, 0.9, 1e-3, -0.0, 1e308, 5e-324, 2**31, 2**32 - 1,
    2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30,
    "1", "2.0", "1e-3", "yes", "nan", "inf", "", "\x00", "\ud800", "per_layer", "tied",
    "uniform", "sgd", "step", "grid", "int", "float", "categorical", "../../etc/passwd",
    "/etc/passwd", "rot13", "utf-8", "x" * 300,
]  # fmt: skip


def more_digits_than_python_prints() -> int:
    """An integer Python refuses to turn into text (more than 4300 digits)."""
    return 10**5000


huge_integers = (
    st.integers(min_value=2**62, max_value=2**70)
    | st.integers(max_value=-(2**62))
    | st.builds(more_digits_than_python_prints)
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-1000, max_value=1000)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(EDGE_VALUES)
    | huge_integers
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

small_numbers = (
    st.integers(min_value=-3, max_value=300)
    | st.floats(min_value=-1.0, max_value=10.0, allow_nan=False)
    | st.sampled_from([0.0, 0.1, 0.3, 0.6, 0.9, 1e-4, 1e-2, 1.0, 16, 64, 128])
)


#: Values a parameter plausibly takes: small numbers and the names the literals use.
plausible = small_numbers | st.sampled_from(
    [True, False, None, "tied", "pyramid", "per_layer", "uniform", "orthogonal", "sgd",
     "adamw", "step", "plateau", "cosine", "1", "2.0", 1.0, 2.0, [16, 32], [8.0, 8]]
)  # fmt: skip


def _range(name: str) -> tuple[float, float]:
    """The closed range a numeric parameter's field accepts (open ends nudged inward)."""
    low, high = -10.0, 1e6
    for rule in LSTMConfig.model_fields[name].metadata:
        if getattr(rule, "ge", None) is not None:
            low = float(rule.ge)
        if getattr(rule, "gt", None) is not None:
            low = math.nextafter(float(rule.gt), math.inf)
        if getattr(rule, "le", None) is not None:
            high = min(float(rule.le), 1e6)
        if getattr(rule, "lt", None) is not None:
            high = math.nextafter(float(rule.lt), -math.inf)
    return low, high


@st.composite
def distributions(draw: st.DrawFn, name: str) -> dict[str, Any]:
    """A distribution for parameter ``name``: mostly plausible, sometimes with one key
    replaced by anything."""
    annotation = LSTMConfig.model_fields[name].annotation
    dist_type = draw(st.sampled_from(["int", "float", "categorical"]))
    if annotation is int:
        dist_type = draw(st.sampled_from(["int", "int", "int", dist_type]))
    elif annotation in (float, float | None):
        dist_type = draw(st.sampled_from(["float", "float", "float", dist_type]))
    dist: dict[str, Any] = {"type": dist_type}
    if dist_type == "categorical":
        literals = [a for a in getattr(annotation, "__args__", ()) if isinstance(a, str)]
        choices = st.sampled_from(literals) if literals else plausible
        dist["choices"] = draw(st.lists(choices | plausible, min_size=1, max_size=4))
    else:
        lo, hi = _range(name) if name in NUMERIC else (0.0, 10.0)
        if dist_type == "int":
            low = draw(st.integers(math.ceil(lo), min(math.ceil(lo) + 20, math.floor(hi))))
            high = draw(st.integers(low, min(low + 300, math.floor(hi))))
            dist["low"], dist["high"] = low, high
            if draw(st.booleans()):
                dist["step"] = draw(st.integers(1, 7))
        else:
            flow = draw(st.floats(lo, hi))
            dist["low"], dist["high"] = flow, draw(st.floats(flow, hi))
            if draw(st.booleans()):
                span = dist["high"] - flow
                steps = [0.1, 0.2, 0.25, 0.6, 1.0, 1e-300] + [span / k for k in (1, 3, 7)]
                dist["step"] = draw(st.sampled_from(steps) | small_numbers)
        if draw(st.integers(0, 3)) == 0:
            dist["log"] = draw(st.booleans())
    if draw(st.integers(min_value=0, max_value=3)) == 0:
        key = draw(st.sampled_from(["type", "low", "high", "step", "log", "choices", "other"]))
        dist[key] = draw(json_values)
    return dist


@st.composite
def spec_documents(draw: st.DrawFn) -> dict[str, Any]:
    """A valid spec with one to three fields replaced by arbitrary or edge values."""
    kind = draw(st.sampled_from(sorted(TASK_BASES)))
    doc: dict[str, Any] = {
        "name": "fuzz",
        "task": copy.deepcopy(TASK_BASES[kind]),
        "space": {"num_layers": {"type": "int", "low": 1, "high": 3}, "max_epochs": 1},
        "study": {"n_trials": 2, "sampler": draw(st.sampled_from(["random", "grid", "tpe"]))},
    }
    # Half the documents change only the space, with mostly plausible values: they reach
    # sampling, storing and the grid; the other half put garbage anywhere.
    anywhere = draw(st.booleans())
    places = (
        ["task", "fixed", "distribution", "study", "top"] if anywhere else ["fixed", "distribution"]
    )
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        where = draw(st.sampled_from(places))
        if where == "task":
            doc["task"][draw(st.sampled_from(TASK_FIELDS[kind]))] = draw(json_values)
        elif where == "fixed":
            value = draw(plausible | json_values) if anywhere else draw(plausible)
            doc["space"][draw(st.sampled_from(PARAMS))] = value
        elif where == "distribution":
            name = draw(st.sampled_from(PARAMS))
            doc["space"][name] = draw(distributions(name))
        elif where == "study":
            doc["study"][draw(st.sampled_from(STUDY_FIELDS))] = draw(json_values)
        else:
            top = draw(st.sampled_from(TOP_FIELDS))
            doc[top] = draw(json_values)
            if top in ("task", "space", "study"):
                break  # no longer a mapping to put fields into
    return doc


def check_accepted_spec(spec: StudySpec) -> None:
    """What must hold of every spec parse_spec accepts."""
    with contextlib.suppress(InvalidConfig):
        lowest = lowest_config(spec)
        # A trial's config is stored and served as `/best`; `lstm-hpo train` reads it back.
        assert parse_config(lowest.to_yaml()) == lowest
    with contextlib.suppress(InvalidConfig):
        largest_config(spec)
    # What is stored is re-validated by every worker: it must parse to the same spec.
    stored = json.loads(json.dumps(spec.model_dump(mode="json"), allow_nan=False))
    assert parse_spec(stored) == spec
    assert parse_spec(spec.to_yaml()) == spec
    if spec.study.sampler == "grid":
        for name, points in grid_search_space(spec).items():
            dist = spec.searched()[name]
            low, high = getattr(dist, "low", None), getattr(dist, "high", None)
            if low is not None and high is not None:
                assert all(low <= p <= high for p in points), (name, points)


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(spec_documents())
def test_parse_spec_raises_only_invalid_spec(doc: dict[str, Any]) -> None:
    try:
        spec = parse_spec(doc)
    except InvalidSpec:
        return
    check_accepted_spec(spec)


@FUZZ
@given(spec_documents())
def test_parse_spec_of_yaml_or_json_text_raises_only_invalid_spec(doc: dict[str, Any]) -> None:
    try:
        text = json.dumps(doc)  # NaN and inf as JSON's extension literals; YAML has neither
    except ValueError:  # an integer of more than 4300 digits has no text form
        return
    try:
        spec = parse_spec(text)
    except InvalidSpec:
        return
    check_accepted_spec(spec)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_parse_spec_of_anything_raises_only_invalid_spec(value: Any) -> None:
    for data in (value, {"task": value}, {"task": {"kind": "adding"}, "space": value}):
        with contextlib.suppress(InvalidSpec):
            parse_spec(data)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_parse_spec_of_any_text_raises_only_invalid_spec(text: str | bytes) -> None:
    with contextlib.suppress(InvalidSpec):
        parse_spec(text)
