"""Property-based, over real HTTP: ``POST /v1/studies`` answers every body with 201 or a
4xx, never a 5xx. The real app (SQLite, no workers) runs in uvicorn in a thread on a
free loopback port; hypothesis posts malformed specs as JSON and as YAML, and raw text."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.config import Settings
from tests.servers import serve_in_thread
from tests.unit.test_spec_fuzz import spec_documents

YAML = {"Content-Type": "application/yaml"}
JSON = {"Content-Type": "application/json"}
HTTP_FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A client of the real app served by uvicorn in a thread (no workers)."""
    data_dir: Path = tmp_path_factory.mktemp("data")
    with serve_in_thread(Settings(data_dir=data_dir)) as server:
        yield server.http


def assert_not_a_server_error(response: httpx.Response) -> None:
    """201 (created) or a 4xx with a message; a created study reads back."""
    assert response.status_code == 201 or 400 <= response.status_code < 500, response.text
    body = response.json()
    if response.status_code == 201:
        assert httpx.get(str(response.url.join(f"/v1/studies/{body['id']}"))).status_code == 200
    else:
        assert body.get("detail"), body


def _yaml_text(doc: Any) -> str | None:
    try:
        return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    except (ValueError, yaml.YAMLError):  # e.g. an integer of more than 4300 digits
        return None


@HTTP_FUZZ
@given(doc=spec_documents())
def test_json_spec_is_201_or_4xx(http: httpx.Client, doc: dict[str, Any]) -> None:
    try:
        body = json.dumps(doc)  # NaN and inf become JSON's NaN / Infinity extensions
    except ValueError:  # an integer with no text form
        return
    assert_not_a_server_error(http.post("/v1/studies", content=body, headers=JSON))


@HTTP_FUZZ
@given(doc=spec_documents())
def test_yaml_spec_is_201_or_4xx(http: httpx.Client, doc: dict[str, Any]) -> None:
    text = _yaml_text(doc)
    if text is None:
        return
    assert_not_a_server_error(http.post("/v1/studies", content=text, headers=YAML))


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=st.binary(max_size=300)
    | st.text(max_size=300).map(str.encode)
    | st.sampled_from(
        [
            b'{"task": {"kind": "adding", "kind": "adding"}}',
            b'{"task": {"kind": "adding"}, "study": {"timeout_s": Infinity}}',
            b'{"task": {"kind": "adding"}, "study": {"timeout_s": 1e999}}',
            b'{"task": {"kind": "adding", "data_seed": ' + b"9" * 5000 + b"}}",
            b"[" * 100_000,
            b"task: &a [*a]",
            b"a: \xff\xfe",
            b'"\\ud800": 1',
        ]
    ),
    content_type=st.sampled_from(["application/json", "application/yaml", "text/plain"]),
)
def test_any_body_is_201_or_4xx(http: httpx.Client, body: bytes, content_type: str) -> None:
    response = http.post("/v1/studies", content=body, headers={"Content-Type": content_type})
    assert_not_a_server_error(response)


INT_WRITTEN_AS_FLOAT = {
    "name": "int-written-as-float",
    "task": {"kind": "synthetic"},
    "space": {
        "num_layers": 2.0,
        "hidden_mode": "per_layer",
        "hidden_size": {"type": "int", "low": 16, "high": 128},
        "max_epochs": 2,
    },
    "study": {"n_trials": 4, "sampler": "random", "pruner": "none", "seed": 0},
}


def test_shared_cases_over_http(http: httpx.Client) -> None:
    """The reported inputs: 2.0 stored as 2; duplicate keys, NaN and a huge timeout are 422s."""
    created = http.post("/v1/studies", json=INT_WRITTEN_AS_FLOAT)
    assert created.status_code == 201, created.text
    spec = http.get(f"/v1/studies/{created.json()['id']}").json()["spec"]
    assert spec["space"]["num_layers"] == 2 and isinstance(spec["space"]["num_layers"], int)

    duplicate = b'{"task": {"kind": "synthetic"}, "space": {"lr": 0.1, "lr": 0.5}}'
    refused = http.post("/v1/studies", content=duplicate, headers=JSON)
    assert refused.status_code == 422
    assert refused.json()["errors"] == [{"loc": "space.lr", "msg": "duplicate key `lr`"}]

    nan = b'{"task": {"kind": "synthetic"}, "space": {"lr": NaN}}'
    refused = http.post("/v1/studies", content=nan, headers=JSON)
    assert refused.status_code == 422 and "NaN" in refused.text

    huge_timeout = "task: {kind: synthetic}\nstudy:\n  timeout_s: 1.0e+12\n"
    refused = http.post("/v1/studies", content=huge_timeout, headers=YAML)
    assert refused.status_code == 422
    assert refused.json()["errors"] == [
        {"loc": "study.timeout_s", "msg": "must be <= 2592000 (LSTM_HPO_MAX_TIMEOUT_S)"}
    ]
