"""The client's request programs (service.client._Api) driven by hand: which failures are
retried for which request, how long it waits, when it gives up, and what a retried cancel,
delete and submit answer. No server and no sleeping: a program only says what to send and
how long to wait (the real server's side: tests/integration/test_client.py)."""

from __future__ import annotations

import io
from typing import Any

import httpx
import pytest

from service.client import RetryPolicy, _Api, _Program, _Request, _Sleep
from service.errors import (
    ApiError,
    InvalidRequest,
    InvalidSpec,
    ServerUnreachable,
    WaitTimeout,
)

URL = "http://127.0.0.1:9"
STUDY = {
    "id": "s1",
    "name": "n",
    "state": "cancelled",
    "task": "synthetic",
    "metric": "value",
    "direction": "minimize",
    "n_trials": 3,
    "n_finished": 0,
    "counts": {},
    "created_at": "2025-01-01T00:00:00Z",
    "dashboard_url": "http://x/dashboard",
    "optuna_study_name": "n-s1",
}
Reply = httpx.Response | httpx.TransportError


def _answer(status: int, body: Any = None, **headers: str) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers)


def _error(status: int, error: str, detail: str = "no", **headers: str) -> httpx.Response:
    return _answer(status, {"detail": detail, "error": error}, **headers)


def _drive(program: _Program[Any], replies: list[Reply]) -> tuple[Any, list[_Request], list[float]]:
    """Run ``program`` answering its requests with ``replies`` in turn: its result, the
    requests it sent and the waits it asked for."""
    sent: list[_Request] = []
    waits: list[float] = []
    reply: Reply | None = None
    try:
        while True:
            step = program.send(reply)
            if isinstance(step, _Sleep):
                waits.append(step.seconds)
                reply = None
            else:
                sent.append(step)
                reply = replies[len(sent) - 1]
    except StopIteration as done:
        return done.value, sent, waits


def _api(**policy: Any) -> _Api:
    return _Api(URL, RetryPolicy(**policy))


def test_a_get_is_retried_on_connection_errors_and_gateway_answers_with_backoff() -> None:
    api = _api()
    replies: list[Reply] = [
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("timed out"),
        _error(502, "BadGateway"),
        _error(503, "DatabaseUnavailable", **{"Retry-After": "3"}),
        _answer(200, STUDY),
    ]
    study, sent, waits = _drive(api.get("s1"), replies)
    assert study.id == "s1" and len(sent) == 5
    assert waits == [0.5, 1.0, 2.0, 4.0]  # Retry-After 3 < the 4 s the backoff had reached
    first, *_ = _drive(
        _api().get("s1"), [_error(503, "X", **{"Retry-After": "7"}), _answer(200, STUDY)]
    )[2]
    assert first == 7.0  # Retry-After, when longer than the backoff


def test_retries_are_bounded_by_count_and_by_time() -> None:
    refused: list[Reply] = [httpx.ConnectError("refused")] * 10
    with pytest.raises(ServerUnreachable) as gave_up:
        _drive(_api(retries=2).get("s1"), refused)
    assert gave_up.value.status_code == 0 and "attempt 3" in gave_up.value.message
    assert isinstance(gave_up.value, ApiError) and gave_up.value.retryable
    # 10 s, then 20 s would end past the 15 s budget: two attempts only.
    program = _api(backoff_s=10.0, budget_s=15.0).get("s1")
    with pytest.raises(ServerUnreachable, match="attempt 2"):
        _drive(program, refused)
    with pytest.raises(ServerUnreachable, match="attempt 1"):
        _drive(_api(retries=0).get("s1"), refused)


def test_errors_carry_status_detail_class_and_fields_and_are_not_retried() -> None:
    body = {
        "detail": "study.n_trials: must be >= 1",
        "error": "InvalidSpec",
        "errors": [{"loc": "study.n_trials", "msg": "must be >= 1"}],
    }
    with pytest.raises(InvalidRequest) as invalid:
        _drive(_api().submit({"task": {}}, None), [_answer(422, body)])
    err = invalid.value
    assert isinstance(err, InvalidSpec) and isinstance(err, ApiError)
    assert (err.status_code, err.error, err.detail) == (422, "InvalidSpec", body["detail"])
    assert [(e.loc, e.msg) for e in err.errors] == [("study.n_trials", "must be >= 1")]
    with pytest.raises(ApiError) as quota:
        _drive(_api().get("s1"), [_error(429, "QuotaExceeded", **{"Retry-After": "60"})])
    assert (quota.value.status_code, quota.value.retry_after_s) == (429, 60.0)
    assert not quota.value.retryable
    proxy = httpx.Response(502, text="<html>Bad Gateway</html>")
    with pytest.raises(ApiError) as gateway:
        _drive(_api(retries=0).get("s1"), [proxy])
    assert (gateway.value.detail, gateway.value.error) == ("<html>Bad Gateway</html>", None)


@pytest.mark.parametrize("call", ["extend", "confirm"])
def test_extend_and_confirm_are_resent_only_when_never_sent(call: str) -> None:
    api = _api()
    program = api.extend("s1", 2) if call == "extend" else api.confirm("s1", 2, 3)
    study, sent, _ = _drive(program, [httpx.ConnectError("refused"), _answer(202, STUDY)])
    assert study.id == "s1" and len(sent) == 2
    # Sent, answer lost (or a gateway's 502 after the server may have done it): not again.
    for lost in (httpx.ReadTimeout("timed out"), _error(502, "BadGateway")):
        program = api.extend("s1", 2) if call == "extend" else api.confirm("s1", 2, 3)
        with pytest.raises(ApiError):
            _drive(program, [lost, _answer(202, STUDY)])


def test_a_submit_sends_one_idempotency_key_on_every_attempt_and_a_new_one_per_call() -> None:
    api = _api()
    replies: list[Reply] = [httpx.ReadTimeout("timed out"), _answer(200, STUDY)]
    _, sent, _ = _drive(api.submit("task: {kind: synthetic}\n", None), replies)
    keys = {r.headers["Idempotency-Key"] for r in sent if r.headers}
    assert len(sent) == 2 and len(keys) == 1
    _, again, _ = _drive(api.submit("task: {kind: synthetic}\n", None), replies)
    assert again[0].headers and again[0].headers["Idempotency-Key"] not in keys
    _, given, _ = _drive(api.submit({"task": {}}, "mine"), replies)
    assert given[0].headers == {"Idempotency-Key": "mine"}


def test_a_retried_cancel_or_delete_that_was_done_answers_as_done() -> None:
    api = _api()
    lost = httpx.ReadTimeout("timed out")
    study, sent, _ = _drive(
        api.cancel("s1"), [lost, _error(409, "StudyNotActive"), _answer(200, STUDY)]
    )
    assert study.state == "cancelled" and [r.method for r in sent] == ["POST", "POST", "GET"]
    assert _drive(api.delete("s1"), [lost, _error(404, "StudyNotFound")])[0] is None
    # Never sent before: the 404 / 409 is the truth.
    with pytest.raises(ApiError, match="404"):
        _drive(api.delete("s1"), [httpx.ConnectError("refused"), _error(404, "StudyNotFound")])
    with pytest.raises(ApiError, match="409"):
        _drive(api.cancel("s1"), [_error(409, "StudyNotActive")])


def test_text_that_cannot_be_a_study_id_is_a_404_before_any_request() -> None:
    # Quoting was not enough: servers decode %2F, so "ID/trials" reached the trials route.
    for not_an_id in ("../health?x", "abc/trials", ""):
        with pytest.raises(ApiError, match="is not a study id") as caught:
            _api().get(not_an_id)
        assert (caught.value.status_code, caught.value.error) == (404, "StudyNotFound")
    _, sent, _ = _drive(_api().get("s1_-Z9"), [_answer(200, STUDY)])
    assert sent[0].path == "/v1/studies/s1_-Z9"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_wait_shows_its_progress_and_gives_up_at_its_timeout() -> None:
    counts = {"complete": 1, "running": 1}
    running = STUDY | {"state": "running", "n_finished": 1, "counts": counts, "best_value": 0.25}
    done = STUDY | {"state": "succeeded", "n_finished": 3, "counts": {"complete": 3}}
    polls = [running | {"elapsed_s": 3}, running | {"elapsed_s": 5}, done | {"elapsed_s": 9}]
    first = "n running: 1/3 finished (1 complete, 0 pruned, 0 failed, 1 running) best=0.25"
    last = "n succeeded: 3/3 finished (3 complete, 0 pruned, 0 failed, 0 running) best=-"
    log, terminal = io.StringIO(), _Terminal()
    for stream in (log, terminal):
        program = _api().wait("s1", None, 2.0, None, stream)
        study, _, waits = _drive(program, [_answer(200, p) for p in polls])
        assert study.state == "succeeded" and waits == [2.0, 2.0]
    # A log: a line when something but the time changed; a terminal: redrawn each poll.
    assert log.getvalue() == f"{first} after 3s\n{last} after 9s\n"
    assert (
        terminal.getvalue()
        == "".join(
            f"\r{text}\x1b[K"
            for text in (f"{first} after 3s", f"{first} after 5s", f"{last} after 9s")
        )
        + "\n"
    )
    with pytest.raises(WaitTimeout, match=r"still running after 0 s \(1/3 trials finished\)"):
        _drive(_api().wait("s1", 0.0, 1.0, None, False), [_answer(200, running)])
