"""A small typed Python client for the lstm-hpo REST API: :class:`Client` (blocking) and
:class:`AsyncClient` (asyncio), with the same methods.

    from pathlib import Path
    from service.client import Client

    with Client("http://127.0.0.1:8000") as c:
        study = c.submit(Path("search_spaces/adding.yaml"))  # or a dict, or YAML/JSON text
        c.wait(study.id, progress=True)
        print(c.best(study.id).config)

Errors: every error answer raises :class:`ApiError` (``status_code``, the server's
``detail``, its error class name ``error`` and field ``errors``); a 422 raises
:class:`InvalidRequest`, which is also an :class:`InvalidSpec`; no answer at all,
:class:`ServerUnreachable` (``status_code`` 0). All are :class:`LstmHpoError`.

Retries, bounded (``retries`` more attempts after the first, 4 by default; the waits
start at ``backoff_s``, 0.5 s, and double, honour ``Retry-After``, and stop once
``retry_budget_s``, 30 s, would pass):

- GET, DELETE and cancel: connection errors and 502/503/504. A retried cancel or delete
  whose earlier attempt may have been done answers as if it were (the study, or nothing),
  not 409 / 404.
- submit: the same, and always with an ``Idempotency-Key`` (a new uuid4 per call when the
  caller gives none): the server answers a repeated key with the study the first attempt
  made, so a submit retried after a lost answer never makes a second study.
- extend and confirm: only errors before the request was sent (connection refused, connect
  timeout). Each adds trials or makes a study and takes no idempotency key, so a request
  that may have reached the server (a read timeout, a gateway's 502) is never sent again.

How it is built: each method is a *program*, a generator in :class:`_Api` that yields what
to do (send this request, sleep this long), gets back the answer and returns the typed
result; :meth:`Client._run` and :meth:`AsyncClient._run` only do those two things, one
blocking and one awaiting. Requests, retries, parsing and polling are written once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import IO, Any, Generic, TypeAlias, TypeVar, cast, overload
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from service.atomic_file import write_file
from service.errors import (
    AmbiguousStudyId,
    ApiError,
    FieldError,
    InvalidRequest,
    InvalidServerUrl,
    ServerUnreachable,
    StudyNotFound,
    WaitTimeout,
)
from service.schemas import (
    ID_PREFIX_PATTERN,
    STUDY_ID_LENGTH,
    BestPublic,
    ConfirmationPublic,
    EstimatePublic,
    Page,
    ProgressPublic,
    StudyPublic,
    TrialPublic,
)
from service.states import TERMINAL_JOB_STATES

__all__ = [
    "TERMINAL_STATES",
    "ApiError",
    "AsyncClient",
    "Client",
    "InvalidRequest",
    "RetryPolicy",
    "ServerUnreachable",
    "WaitTimeout",
]

#: Study states after which nothing of a study runs any more (``JobState.is_terminal``).
TERMINAL_STATES = TERMINAL_JOB_STATES
DEFAULT_URL = "http://127.0.0.1:8000"

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
H = TypeVar("H", httpx.Client, httpx.AsyncClient)
#: What ``submit`` takes: a mapping, YAML/JSON text, or a file (see :func:`_spec_request`).
Spec: TypeAlias = "Mapping[str, Any] | str | os.PathLike[str]"
#: ``list`` is a method of the clients: their annotations use these.
BestList: TypeAlias = "list[BestPublic]"
#: Where ``wait(progress=...)`` writes: True for stderr.
ProgressTo: TypeAlias = "bool | IO[str]"

#: Errors raised before any byte of the request left: sending it again cannot do it twice.
_UNSENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_SPEC_SUFFIXES = (".yaml", ".yml", ".json")
_CHECKPOINT = "application/octet-stream"
#: In every report's <head> (service.report): a text/html answer without it is not one.
_REPORT_MARK = '<meta name="generator" content="lstm-hpo">'


class _Retry(Enum):
    #: Safe to repeat (GET, DELETE, cancel, submit with its key): every retryable failure.
    REPEATABLE = "repeatable"
    #: Not safe to repeat: only a failure before the request was sent.
    UNSENT_ONLY = "unsent-only"


@dataclass(frozen=True)
class _Request:
    """One HTTP request of the API, and how it may be retried."""

    method: str
    path: str
    params: Mapping[str, Any] | None = None
    json: Any = None
    content: bytes | None = None
    headers: Mapping[str, str] | None = None
    retry: _Retry = _Retry.REPEATABLE
    #: The media type of a success answer (None: any, or no body): anything else did not
    #: come from lstm-hpo's API (the server URL names the dashboard or a proxy's page).
    expect: str | None = "application/json"
    #: Server error classes that, after an attempt that may have reached the server, mean
    #: that attempt did what was asked (e.g. ``StudyNotFound`` for a retried delete).
    done_if: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class _Sleep:
    seconds: float


#: What a program is sent back: the answer to a request (or why none came); None after a sleep.
_Reply: TypeAlias = "httpx.Response | httpx.TransportError | None"
_Program: TypeAlias = Generator["_Request | _Sleep", _Reply, T]


@dataclass(frozen=True)
class RetryPolicy:
    """How failed requests are retried (see the module's docstring for which)."""

    #: Attempts after the first (0: none).
    retries: int = 4
    #: The first wait; each next one doubles.
    backoff_s: float = 0.5
    #: No wait starts that would end later than this after the first attempt.
    budget_s: float = 30.0


class _Api:
    """The API as programs (generators), shared by both clients; no I/O of its own."""

    def __init__(self, base_url: str, policy: RetryPolicy) -> None:
        self.base_url = base_url
        self.policy = policy

    # -- sending ---------------------------------------------------------------------

    def exchange(self, request: _Request) -> _Program[httpx.Response]:
        """Send ``request``, retried as its ``retry`` and the policy allow; the success
        answer (or a ``done_if`` error answer). Raises :class:`ApiError`."""
        started = time.monotonic()
        delay = self.policy.backoff_s
        reached = False  # whether an earlier attempt may have reached the server
        attempt = 0
        while True:
            attempt += 1
            reply = yield request
            assert reply is not None
            if isinstance(reply, httpx.Response):
                if not reply.is_error:
                    return _checked(reply, request.expect, self.base_url)
                error = _api_error(reply)
                if reached and error.error in request.done_if:
                    return reply
                # A gateway's 502/504 may come after the server did it: never sent again
                # unless the request may be repeated.
                retry = error.retryable and request.retry is _Retry.REPEATABLE
                reached = True
            else:
                unsent = isinstance(reply, _UNSENT)
                error = ServerUnreachable(
                    f"cannot reach {self.base_url}: {str(reply) or type(reply).__name__}"
                    f" (attempt {attempt})"
                )
                retry = unsent or request.retry is _Retry.REPEATABLE
                reached = reached or not unsent
            wait = max(delay, error.retry_after_s or 0.0)
            elapsed = time.monotonic() - started
            if not retry or attempt > self.policy.retries or elapsed + wait > self.policy.budget_s:
                raise error
            yield _Sleep(wait)
            delay *= 2

    def model(self, request: _Request, model: type[M]) -> _Program[M]:
        response = yield from self.exchange(request)
        return model.model_validate(response.json())

    def text(self, request: _Request, expect: str) -> _Program[str]:
        response = yield from self.exchange(replace(request, expect=expect))
        return response.text

    # -- studies ---------------------------------------------------------------------

    def submit(self, spec: Spec, idempotency_key: str | None) -> _Program[StudyPublic]:
        # One key per call, the same on each of its attempts: the server makes one study.
        key = idempotency_key or uuid.uuid4().hex
        request = _spec_request("/v1/studies", spec, {"Idempotency-Key": key})
        return self.model(request, StudyPublic)

    def estimate(self, spec: Spec) -> _Program[EstimatePublic]:
        return self.model(_spec_request("/v1/studies/estimate", spec, {}), EstimatePublic)

    def get(self, study_id: str) -> _Program[StudyPublic]:
        return self.model(_Request("GET", _study(study_id)), StudyPublic)

    def studies(
        self, state: str | None, limit: int, offset: int, id_prefix: str | None = None
    ) -> _Program[Page[StudyPublic]]:
        params = _params(state=state, id_prefix=id_prefix, limit=limit, offset=offset)
        return self.model(_Request("GET", "/v1/studies", params=params), Page[StudyPublic])

    def resolve(self, study_id: str) -> _Program[str]:
        short = study_id.strip().lower()
        if not short:
            raise StudyNotFound("the study id is empty")
        if not re.fullmatch(ID_PREFIX_PATTERN, short):
            return study_id  # not an id at all: the server says so
        if len(short) == STUDY_ID_LENGTH:
            return short
        page = yield from self.studies(None, 3, 0, id_prefix=short)
        if page.total == 1:
            return page.items[0].id
        if page.total == 0:
            raise StudyNotFound(f"no study's id starts with {short}")
        some = ", ".join(item.id[: len(short) + 4] + "..." for item in page.items)
        raise AmbiguousStudyId(
            f"{short} starts {page.total} studies' ids ({some}): give more of the id"
        )

    def trials(
        self, study_id: str, state: str | None, limit: int, offset: int
    ) -> _Program[Page[TrialPublic]]:
        params = _params(state=state, limit=limit, offset=offset)
        request = _Request("GET", _study(study_id, "trials"), params=params)
        return self.model(request, Page[TrialPublic])

    def trials_csv(self, study_id: str, state: str | None) -> _Program[str]:
        request = _Request("GET", _study(study_id, "trials.csv"), _params(state=state))
        return self.text(request, "text/csv")

    def report(self, study_id: str, top_k: int | None) -> _Program[str]:
        request = _Request("GET", _study(study_id, "report"), _params(top_k=top_k))
        return self.text(request, "text/html")

    def progress(self, study_id: str) -> _Program[ProgressPublic]:
        return self.model(_Request("GET", _study(study_id, "progress")), ProgressPublic)

    def best(self, study_id: str, k: int | None) -> _Program[BestPublic | BestList]:
        """``k`` None: the best (a multi-objective study's: its front's first, the best
        task metric); else a list of at most ``k``, as the server answers."""
        response = yield from self.exchange(_Request("GET", _study(study_id, "best"), _params(k=k)))
        body = response.json()
        top = [BestPublic.model_validate(b) for b in (body if isinstance(body, list) else [body])]
        return top if k is not None else top[0]

    def pareto_front(self, study_id: str) -> _Program[BestList]:
        response = yield from self.exchange(_Request("GET", _study(study_id, "best")))
        body = response.json()
        return [BestPublic.model_validate(b) for b in (body if isinstance(body, list) else [body])]

    def best_yaml(self, study_id: str, confirmed: bool = False) -> _Program[str]:
        params = {"format": "yaml", **({"confirmed": "true"} if confirmed else {})}
        return self.text(_Request("GET", _study(study_id, "best"), params), "application/yaml")

    def confirmed_best(self, study_id: str) -> _Program[BestPublic]:
        request = _Request("GET", _study(study_id, "best"), {"confirmed": "true"})
        return self.model(request, BestPublic)

    def best_checkpoint(self, study_id: str, dest: str | os.PathLike[str]) -> _Program[Path]:
        request = _Request("GET", _study(study_id, "best/checkpoint"), expect=_CHECKPOINT)
        response = yield from self.exchange(request)
        path = Path(dest)
        # Never a torn file at dest, nor a temporary file left when it cannot be written.
        write_file(path, response.content)
        return path

    def cancel(self, study_id: str) -> _Program[StudyPublic]:
        request = _Request(
            "POST", _study(study_id, "cancel"), done_if=frozenset({"StudyNotActive"})
        )
        response = yield from self.exchange(request)
        if response.is_error:  # an earlier attempt cancelled it: the study as it is now
            return (yield from self.get(study_id))
        return StudyPublic.model_validate(response.json())

    def delete(self, study_id: str) -> _Program[None]:
        request = _Request(
            "DELETE", _study(study_id), done_if=frozenset({"StudyNotFound"}), expect=None
        )
        yield from self.exchange(request)

    def extend(self, study_id: str, n_trials: int) -> _Program[StudyPublic]:
        request = _Request(
            "POST",
            _study(study_id, "extend"),
            json={"n_trials": n_trials},
            retry=_Retry.UNSENT_ONLY,  # twice would add 2 x n_trials
        )
        return self.model(request, StudyPublic)

    def confirm(self, study_id: str, top_k: int, seeds: int) -> _Program[StudyPublic]:
        request = _Request(
            "POST",
            _study(study_id, "confirm"),
            json={"top_k": top_k, "seeds": seeds},
            retry=_Retry.UNSENT_ONLY,  # twice would make two confirmation studies
        )
        return self.model(request, StudyPublic)

    def confirmation(self, study_id: str) -> _Program[ConfirmationPublic]:
        return self.model(_Request("GET", _study(study_id, "confirmation")), ConfirmationPublic)

    def health(self) -> _Program[dict[str, Any]]:
        response = yield from self.exchange(_Request("GET", "/v1/health"))
        return cast(dict[str, Any], response.json())

    def wait(
        self,
        study_id: str,
        timeout_s: float | None,
        poll_s: float,
        on_update: Callable[[StudyPublic], None] | None,
        progress: ProgressTo,
    ) -> _Program[StudyPublic]:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        line = _ProgressLine(sys.stderr if progress is True else progress) if progress else None
        try:
            while True:
                study = yield from self.get(study_id)
                if on_update is not None:
                    on_update(study)
                if line is not None:
                    line.show(study)
                if study.state in TERMINAL_STATES:
                    return study
                now = time.monotonic()
                if deadline is not None and timeout_s is not None and now >= deadline:
                    raise WaitTimeout(study_id, study.state, timeout_s, _counts(study))
                yield _Sleep(poll_s if deadline is None else min(poll_s, deadline - now))
        finally:
            if line is not None:
                line.close()


#: What a study id may hold (ours are 32 hex digits; ``search_space.StudyId``'s rule).
_STUDY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _study(study_id: str, *rest: str) -> str:
    """The path of a study's route. Raises the ApiError 404 the server gives a missing
    study for text that cannot be an id: quoted, "ID/trials" would still reach the trials
    route (servers decode %2F)."""
    if not _STUDY_ID.fullmatch(study_id):
        raise ApiError(404, f"{study_id[:80]!r} is not a study id", error="StudyNotFound")
    return "/".join(("/v1/studies", quote(study_id, safe=""), *rest))


def _params(**values: Any) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


def _spec_request(path: str, spec: Spec, headers: Mapping[str, str]) -> _Request:
    """A spec as a POST body: a mapping as JSON; a file as its bytes (JSON for ``.json``,
    YAML otherwise); text as YAML (JSON text is YAML too).

    What is a file: any ``os.PathLike``, and a ``str`` of one line that ends in ``.yaml``,
    ``.yml`` or ``.json``, which as text could never be a spec (a spec is a mapping, that
    line a YAML scalar): ``submit("search_spaces/adding.yaml")`` reads the file, and a
    missing one is a ``FileNotFoundError`` here rather than the server's "not a mapping".
    Every other ``str`` is the spec's text.
    """
    if isinstance(spec, Mapping):
        return _Request("POST", path, json=dict(spec), headers=headers)
    if isinstance(spec, str) and not _names_a_file(spec):
        content, kind = spec.encode("utf-8", "surrogateescape"), "yaml"
    else:
        file = Path(spec)
        content = file.read_bytes()  # the server names the byte that is not UTF-8
        kind = "json" if file.suffix.lower() == ".json" else "yaml"
    content_type = {"Content-Type": f"application/{kind}"}
    return _Request("POST", path, content=content, headers={**headers, **content_type})


def _names_a_file(text: str) -> bool:
    one_line = "\n" not in text.strip()
    return one_line and text.strip().lower().endswith(_SPEC_SUFFIXES)


def _media_type(response: httpx.Response) -> str:
    return str(response.headers.get("content-type", "")).partition(";")[0].strip().lower()


def _checked(response: httpx.Response, expect: str | None, base_url: str) -> httpx.Response:
    """``response``, when it is what lstm-hpo's API answers (``expect``; a report also
    says it is ours). Raises ApiError naming the server URL otherwise."""
    got = _media_type(response)
    if expect is None or response.status_code == 204:
        return response
    if got == expect and (expect != "text/html" or _REPORT_MARK in response.text):
        return response
    what = "an HTML page" if got == "text/html" else (got or "no content type")
    raise ApiError(
        response.status_code,
        f"{response.request.url} answered {what}, not lstm-hpo's API: is {base_url} the "
        "service's root URL (the one `lstm-hpo serve` prints, not /dashboard)?",
    )


def _api_error(response: httpx.Response) -> ApiError:
    """The error an answer says: the server's ``{"detail", "error", "errors"}``, or the
    text of whatever else answered (a proxy's page)."""
    detail = response.text.strip() or response.reason_phrase
    if _media_type(response) == "text/html":  # a proxy's or the dashboard's page, not ours
        detail = f"{response.reason_phrase or 'error'} (an HTML page, not lstm-hpo's API)"
    elif len(detail) > 300:
        detail = detail[:300] + "..."
    name: str | None = None
    fields: list[FieldError] = []
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        said = body.get("detail", detail)
        detail = said if isinstance(said, str) else json.dumps(said)
        name = body["error"] if isinstance(body.get("error"), str) else None
        fields = [
            FieldError(str(e.get("loc", "")), str(e.get("msg", "")))
            for e in body.get("errors") or ()
            if isinstance(e, dict)
        ]
    retry_after = response.headers.get("Retry-After", "")
    cls = InvalidRequest if response.status_code == 422 else ApiError
    if cls is InvalidRequest and not fields:  # a task's data: one error, the message
        fields = [FieldError("", detail)]
    return cls(
        response.status_code,
        detail,
        errors=fields,
        error=name,
        # Only the delay-seconds form: an HTTP date is left to the backoff.
        retry_after_s=float(retry_after) if retry_after.isdigit() else None,
    )


def _counts(study: StudyPublic) -> str:
    return f"{study.n_finished}/{study.n_trials} trials finished"


class _ProgressLine:
    """``wait(progress=...)``: redrawn in place at each poll on a terminal; elsewhere (a
    log, a pipe) one line when the state, the counts or the best value change."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._redraw = stream.isatty()
        self._shown = ""  # what the last line said, its elapsed time left out

    def show(self, study: StudyPublic) -> None:
        c = study.counts
        best = "-" if study.best_value is None else f"{study.best_value:.6g}"
        text = (
            f"{study.name} {study.state}: {study.n_finished}/{study.n_trials} finished "
            f"({c.complete} complete, {c.pruned} pruned, {c.failed} failed, "
            f"{c.running} running) best={best}"
        )
        if text == self._shown and not self._redraw:
            return
        self._shown = text
        if study.elapsed_s is not None:
            text += f" after {study.elapsed_s:.0f}s"
        self._stream.write(f"\r{text}\x1b[K" if self._redraw else text + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._redraw and self._shown:
            self._stream.write("\n")
            self._stream.flush()


def server_url(text: str) -> str:
    """``text`` as the base URL requests are made from: no trailing ``/``, and no
    trailing ``/v1`` (the client adds it; ``http://host:8000/v1`` is a common paste).

    Raises :class:`InvalidServerUrl` naming what is wrong, before any request (no retry
    can mend these): not http(s), no host or not a host name (RFC 1123 labels, an IP
    address), a port outside 1-65535, a user or password (the API takes a token:
    ``--token``; httpx would send them as Basic auth in its place), or no URL at all
    (``127.0.0.1:8000`` needs ``http://``). The message never shows a password."""
    shown = _masked(text.strip())
    try:
        url = httpx.URL(text.strip())
        port = url.port
    except (httpx.InvalidURL, ValueError) as err:
        raise InvalidServerUrl(f"server URL {shown!r} is not a valid URL: {err}") from None
    if url.scheme not in ("http", "https") or not url.host:
        plain = "://" not in shown and ":/" not in shown and not shown.startswith("/")
        hint = f" (did you mean http://{shown}?)" if plain and shown else ""
        raise InvalidServerUrl(f"server URL {shown!r} needs http:// or https:// and a host{hint}")
    if url.userinfo:
        raise InvalidServerUrl(
            f"server URL {shown!r}: no user or password in it; the API takes a token "
            "(--token or LSTM_HPO_TOKEN)"
        )
    if not _is_host(url.host):
        raise InvalidServerUrl(f"server URL {shown!r}: {url.host[:80]!r} is not a host name")
    if port is not None and not 1 <= port <= 65535:
        raise InvalidServerUrl(f"server URL {shown!r}: port {port} is not in 1-65535")
    base = str(url.copy_with(query=None, fragment=None)).rstrip("/")
    return base[:-3] if base.lower().endswith("/v1") else base


_USERINFO_PASSWORD = re.compile(r"(//[^/@:]*:)[^/@]*@")
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")  # _: Docker service names


def _masked(text: str) -> str:
    """``text`` shortened to 200 characters, with any ``user:password@`` as ``user:***@``."""
    masked = _USERINFO_PASSWORD.sub(r"\1***@", text)
    return masked if len(masked) <= 200 else masked[:200] + "..."


def _is_host(host: str) -> bool:
    """An IP address, or a DNS name whose IDNA labels are RFC 1123's (httpx would fail
    on it only when sending, with a UnicodeError)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    try:
        ascii_name = host.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    labels = ascii_name.removesuffix(".").split(".")
    return len(ascii_name) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)


# -- the two clients ---------------------------------------------------------------------


class _Base(Generic[H]):
    """What both clients share: settings, the programs, the HTTP client's options."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        retries: int = RetryPolicy.retries,
        backoff_s: float = RetryPolicy.backoff_s,
        retry_budget_s: float = RetryPolicy.budget_s,
    ) -> None:
        """``token``: an API token (``lstm-hpo token create NAME``), sent as
        ``Authorization: Bearer``; default ``LSTM_HPO_TOKEN``; none for a server in open
        mode. ``timeout``: seconds per request. ``retries``, ``backoff_s``,
        ``retry_budget_s``: see the module's docstring (``retries=0``: never retry)."""
        token = token or os.environ.get("LSTM_HPO_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        base_url = server_url(base_url)
        self._api = _Api(base_url, RetryPolicy(retries, backoff_s, retry_budget_s))
        self._http: H = self._connect(base_url, timeout, headers)

    def _connect(self, base_url: str, timeout: float, headers: dict[str, str]) -> H:
        raise NotImplementedError


def _advance(program: _Program[T], reply: _Reply) -> _Request | _Sleep | _Done[T]:
    try:
        return program.send(reply)
    except StopIteration as done:
        return _Done(cast(T, done.value))


@dataclass(frozen=True)
class _Done(Generic[T]):
    value: T


def _pause(step: _Sleep) -> _Reply:
    time.sleep(step.seconds)
    return None


async def _apause(step: _Sleep) -> _Reply:
    await asyncio.sleep(step.seconds)
    return None


class Client(_Base[httpx.Client]):
    """Talks to one lstm-hpo server. Use as a context manager, or call :meth:`close`."""

    def _connect(self, base_url: str, timeout: float, headers: dict[str, str]) -> httpx.Client:
        return httpx.Client(base_url=base_url, timeout=timeout, headers=headers)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _run(self, program: _Program[T]) -> T:
        reply: _Reply = None
        while not isinstance(step := _advance(program, reply), _Done):
            reply = self._send(step) if isinstance(step, _Request) else _pause(step)
        return step.value

    def _send(self, request: _Request) -> httpx.Response | httpx.TransportError:
        try:
            return self._http.request(request.method, request.path, **_send_options(request))
        except httpx.TransportError as err:
            return err

    def submit(self, spec: Spec, *, idempotency_key: str | None = None) -> StudyPublic:
        """Queue a study from a mapping, YAML/JSON text, or a file (a ``Path``, or a
        one-line ``str`` ending in .yaml/.yml/.json: :func:`_spec_request`). Retried
        safely: the same ``idempotency_key`` (one per call when not given) makes one study.
        :class:`InvalidRequest` (an ``InvalidSpec``) names every bad field."""
        return self._run(self._api.submit(spec, idempotency_key))

    def estimate(self, spec: Spec) -> EstimatePublic:
        """The cost of the costliest config a spec allows, without submitting it."""
        return self._run(self._api.estimate(spec))

    def get(self, study_id: str) -> StudyPublic:
        """One study: state, trial counts, best value, elapsed time, spec."""
        return self._run(self._api.get(study_id))

    def list(
        self,
        *,
        state: str | None = None,
        limit: int = 20,
        offset: int = 0,
        id_prefix: str | None = None,
    ) -> Page[StudyPublic]:
        """Studies, newest first (``state``: only those in it; ``id_prefix``: only those
        whose id starts with it, 1-32 lowercase hex digits)."""
        return self._run(self._api.studies(state, limit, offset, id_prefix))

    def resolve(self, study_id: str) -> str:
        """The whole id of the one study whose id starts with ``study_id`` (a short id as
        ``lstm-hpo status`` shows it; any case, blanks around it ignored). A whole id comes
        back in lower case, and text that cannot start an id unchanged, without asking the
        server. Raises ``StudyNotFound`` when no study of yours starts so (or ``study_id``
        is blank), :class:`AmbiguousStudyId` when several do."""
        return self._run(self._api.resolve(study_id))

    studies = list

    def trials(
        self, study_id: str, *, state: str | None = None, limit: int = 100, offset: int = 0
    ) -> Page[TrialPublic]:
        """Trials in number order (``state``: only those in it)."""
        return self._run(self._api.trials(study_id, state, limit, offset))

    def trials_csv(self, study_id: str, *, state: str | None = None) -> str:
        """Every trial as CSV text (``GET /v1/studies/{id}/trials.csv``), for spreadsheets."""
        return self._run(self._api.trials_csv(study_id, state))

    def report(self, study_id: str, *, top_k: int | None = None) -> str:
        """The study's report: one self-contained HTML page (``GET .../report``)."""
        return self._run(self._api.report(study_id, top_k))

    def progress(self, study_id: str) -> ProgressPublic:
        """Running trials (epoch, last intermediate value), ETA and timeout left."""
        return self._run(self._api.progress(study_id))

    @overload
    def best(self, study_id: str) -> BestPublic: ...
    @overload
    def best(self, study_id: str, k: int) -> BestList: ...
    def best(self, study_id: str, k: int | None = None) -> BestPublic | BestList:
        """The best completed trial and its resolved config; with ``k`` (even 1), a list of
        the top ``k``, best first. A multi-objective study's best is its Pareto front's
        member with the best task metric (``values`` set); :meth:`pareto_front` gives the
        whole front. ApiError 409 before a trial has completed."""
        return self._run(self._api.best(study_id, k))

    def top(self, study_id: str, k: int) -> BestList:
        """The top ``k`` (``best(study_id, k)``)."""
        return self.best(study_id, k)

    def pareto_front(self, study_id: str) -> BestList:
        """A multi-objective study's Pareto front, best task metric first, each with its
        ``values``; a single-objective study's best alone."""
        return self._run(self._api.pareto_front(study_id))

    def best_yaml(self, study_id: str, *, confirmed: bool = False) -> str:
        """The best config as YAML, as `lstm-hpo train` takes it (``confirmed``: the one
        the study's confirmation ranks first, :meth:`confirmed_best`)."""
        return self._run(self._api.best_yaml(study_id, confirmed))

    def confirmed_best(self, study_id: str) -> BestPublic:
        """The config the study's newest confirmation ranks first (the best mean over new
        seeds), with its ``confirmation``. ApiError 404 when it was never confirmed, 409
        while that confirmation has not succeeded."""
        return self._run(self._api.confirmed_best(study_id))

    def best_checkpoint(self, study_id: str, dest: str | os.PathLike[str]) -> Path:
        """Save the best trial's checkpoint to ``dest`` and return it (ApiError 409 before
        a trial has completed, 404 when it has no checkpoint; OSError when ``dest`` cannot
        be written, with nothing left behind)."""
        return self._run(self._api.best_checkpoint(study_id, dest))

    def cancel(self, study_id: str) -> StudyPublic:
        """Stop claiming new trials (running ones finish); the study. ApiError 409 if it
        already ended."""
        return self._run(self._api.cancel(study_id))

    def extend(self, study_id: str, n_trials: int) -> StudyPublic:
        """Add ``n_trials`` trials to a study (queued, running or ended); the study as it
        is now. ApiError 409 for a failed study, 404 unknown; InvalidRequest past the limit."""
        return self._run(self._api.extend(study_id, n_trials))

    def confirm(self, study_id: str, *, top_k: int = 3, seeds: int = 5) -> StudyPublic:
        """Re-train the study's ``top_k`` best configs with ``seeds`` new seeds each, as
        their own study: that study (``n_trials`` = top_k x seeds; wait on its id, then
        :meth:`confirmation`). ApiError 409 with fewer completed configs than ``top_k``,
        404 unknown; InvalidRequest for top_k outside 1..20 or seeds outside 2..20."""
        return self._run(self._api.confirm(study_id, top_k, seeds))

    def confirmation(self, study_id: str) -> ConfirmationPublic:
        """A confirmation study's statistics (or a confirmed study's newest confirmation's):
        per config mean, sd and 95% interval of the validation and test metric, and the
        paired test of the best against the runner-up. ApiError 404 if never confirmed."""
        return self._run(self._api.confirmation(study_id))

    def delete(self, study_id: str) -> None:
        """Delete a study and its trials (cancelled first if it runs); ApiError 404 if unknown."""
        return self._run(self._api.delete(study_id))

    def health(self) -> dict[str, Any]:
        return self._run(self._api.health())

    def wait(
        self,
        study_id: str,
        *,
        timeout_s: float | None = None,
        poll_s: float = 1.0,
        on_update: Callable[[StudyPublic], None] | None = None,
        progress: ProgressTo = False,
    ) -> StudyPublic:
        """Poll until the study is succeeded, failed or cancelled; the study then.
        ``progress``: a line on stderr (or this stream) at each change: state, finished /
        n_trials, trials by outcome, best value. :class:`WaitTimeout` (a ``TimeoutError``)
        once ``timeout_s`` has passed."""
        return self._run(self._api.wait(study_id, timeout_s, poll_s, on_update, progress))


class AsyncClient(_Base[httpx.AsyncClient]):
    """:class:`Client` for asyncio: the same methods, arguments and results, awaited.
    Use as an async context manager, or await :meth:`aclose`."""

    def _connect(self, base_url: str, timeout: float, headers: dict[str, str]) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=base_url, timeout=timeout, headers=headers)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _run(self, program: _Program[T]) -> T:
        reply: _Reply = None
        while not isinstance(step := _advance(program, reply), _Done):
            reply = await (self._send(step) if isinstance(step, _Request) else _apause(step))
        return step.value

    async def _send(self, request: _Request) -> httpx.Response | httpx.TransportError:
        try:
            return await self._http.request(request.method, request.path, **_send_options(request))
        except httpx.TransportError as err:
            return err

    async def submit(self, spec: Spec, *, idempotency_key: str | None = None) -> StudyPublic:
        return await self._run(self._api.submit(spec, idempotency_key))

    async def estimate(self, spec: Spec) -> EstimatePublic:
        return await self._run(self._api.estimate(spec))

    async def get(self, study_id: str) -> StudyPublic:
        return await self._run(self._api.get(study_id))

    async def list(
        self,
        *,
        state: str | None = None,
        limit: int = 20,
        offset: int = 0,
        id_prefix: str | None = None,
    ) -> Page[StudyPublic]:
        return await self._run(self._api.studies(state, limit, offset, id_prefix))

    async def resolve(self, study_id: str) -> str:
        return await self._run(self._api.resolve(study_id))

    studies = list

    async def trials(
        self, study_id: str, *, state: str | None = None, limit: int = 100, offset: int = 0
    ) -> Page[TrialPublic]:
        return await self._run(self._api.trials(study_id, state, limit, offset))

    async def trials_csv(self, study_id: str, *, state: str | None = None) -> str:
        return await self._run(self._api.trials_csv(study_id, state))

    async def report(self, study_id: str, *, top_k: int | None = None) -> str:
        return await self._run(self._api.report(study_id, top_k))

    async def progress(self, study_id: str) -> ProgressPublic:
        return await self._run(self._api.progress(study_id))

    @overload
    async def best(self, study_id: str) -> BestPublic: ...
    @overload
    async def best(self, study_id: str, k: int) -> BestList: ...
    async def best(self, study_id: str, k: int | None = None) -> BestPublic | BestList:
        return await self._run(self._api.best(study_id, k))

    async def top(self, study_id: str, k: int) -> BestList:
        return await self.best(study_id, k)

    async def pareto_front(self, study_id: str) -> BestList:
        return await self._run(self._api.pareto_front(study_id))

    async def best_yaml(self, study_id: str, *, confirmed: bool = False) -> str:
        return await self._run(self._api.best_yaml(study_id, confirmed))

    async def confirmed_best(self, study_id: str) -> BestPublic:
        return await self._run(self._api.confirmed_best(study_id))

    async def best_checkpoint(self, study_id: str, dest: str | os.PathLike[str]) -> Path:
        return await self._run(self._api.best_checkpoint(study_id, dest))

    async def cancel(self, study_id: str) -> StudyPublic:
        return await self._run(self._api.cancel(study_id))

    async def extend(self, study_id: str, n_trials: int) -> StudyPublic:
        return await self._run(self._api.extend(study_id, n_trials))

    async def confirm(self, study_id: str, *, top_k: int = 3, seeds: int = 5) -> StudyPublic:
        return await self._run(self._api.confirm(study_id, top_k, seeds))

    async def confirmation(self, study_id: str) -> ConfirmationPublic:
        return await self._run(self._api.confirmation(study_id))

    async def delete(self, study_id: str) -> None:
        return await self._run(self._api.delete(study_id))

    async def health(self) -> dict[str, Any]:
        return await self._run(self._api.health())

    async def wait(
        self,
        study_id: str,
        *,
        timeout_s: float | None = None,
        poll_s: float = 1.0,
        on_update: Callable[[StudyPublic], None] | None = None,
        progress: ProgressTo = False,
    ) -> StudyPublic:
        return await self._run(self._api.wait(study_id, timeout_s, poll_s, on_update, progress))


def _send_options(request: _Request) -> dict[str, Any]:
    return {
        "params": request.params,
        "json": request.json,
        "content": request.content,
        "headers": request.headers,
    }
