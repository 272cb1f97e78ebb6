"""schemathesis against the service's own OpenAPI schema, over a real server, authenticated:
every operation gets a few hundred generated cases and every check schemathesis has (no
5xx, responses conform to the schema, the documented status codes and content types, auth
is enforced). The case counts go into SECURITY.md."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service import auth
from service.config import Settings
from tests.servers import serve_in_thread

#: Cases per operation (hypothesis examples); SECURITY.md records what a run executed.
CASES_PER_OPERATION = 200
#: Checks excluded per operation, each with its reason (listed in SECURITY.md too): a
#: study spec has rules JSON Schema cannot state (low <= high, which parameters a task
#: kind takes, that a data file exists and parses), so a schema-valid body may rightly be
#: a 422 that names the field.
_SPEC_BODY = [positive_data_acceptance]
ACCEPTED: dict[str, list[Any]] = {
    "POST /v1/studies": _SPEC_BODY,
    "POST /v1/studies/estimate": _SPEC_BODY,
}


def test_every_operation_conforms_to_its_schema(tmp_path: Path) -> None:
    """Each operation of /openapi.json in turn, with its own hypothesis run (schemathesis'
    pytest loader is bypassed: it does not work with this pytest's fixtures)."""
    executed: Counter[str] = Counter()
    with serve_in_thread(Settings(data_dir=tmp_path / "data")) as server:
        token = auth.create_token(server.backend.sessions, "fuzzer")
        headers = {"Authorization": f"Bearer {token}"}
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        results = list(schema.get_all_operations())
        assert all(isinstance(result, Ok) for result in results), results  # a valid schema
        operations = [result.ok() for result in results if isinstance(result, Ok)]
        assert len(operations) >= 8, [op.label for op in operations]
        for operation in operations:
            _fuzz(operation, server.url, headers, executed)
    print(f"schemathesis cases per operation: {dict(executed)}")
    assert all(n >= 1 for n in executed.values())


def _fuzz(operation: Any, base_url: str, headers: dict[str, str], executed: Counter[str]) -> None:
    @given(case=operation.as_strategy())
    @settings(
        max_examples=CASES_PER_OPERATION,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        executed[operation.label] += 1
        case.call_and_validate(
            base_url=base_url,
            headers=headers,
            excluded_checks=ACCEPTED.get(operation.label, []),
            # Beside the other test process on 2 cores, a write can wait seconds for
            # SQLite's lock; the 10 s default made a slow 404 a failure.
            timeout=60,
        )

    run()
