"""optuna-dashboard, mounted at the root, behind one guard: who may see what, and nothing that
splits a study's two records.

optuna-dashboard has no authentication and talks to Optuna's storage directly. The guard
(ASGI middleware in front of its WSGI app) answers before it:

Who: every route needs a principal once authentication is on (:mod:`service.auth`): the
signed session cookie the sign-in page (``/signin``) sets, or HTTP basic / bearer with an
API token as the password, for scripts. Without one, page routes redirect to the sign-in
page and everything else answers 401. Unsafe methods carried by the cookie must come from
our own origin (``Origin`` check, besides ``SameSite=Strict``).

What: a principal sees only its own studies. ``GET /api/studies`` is filtered, and every
route that names a study (``/api/studies/{id}...``, ``/dashboard/studies/{id}...``,
``/csv/{id}``, ``/artifacts/{id}...``) answers 404 for another principal's study, exactly as
for one that does not exist. Admins see all. A route that also names a trial (its note,
its artifacts) answers 404 unless the trial is one of that study's.

Nothing split: ``DELETE /api/studies/{id}`` (the trash icon) goes through
:func:`service.studies.delete_study` (both records, as ``DELETE /v1/studies/{id}``);
creating, renaming, telling or skipping trials, editing trial attributes and upgrading
Optuna's schema are refused with a message (403 ``{"reason": ...}``, the field the
dashboard's front end shows).

Cost: the dashboard reads a study's trials through :class:`DashboardStorage`, which keeps
its finished trials, so that its reread every 10 s fetches only new and unfinished ones.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import re
import threading
from collections.abc import Callable, Container, Iterable
from typing import Any, cast
from urllib.parse import parse_qs, quote, urlsplit

import bottle
import optuna
from a2wsgi.wsgi_typing import Environ, StartResponse, WSGIApp
from optuna.storages._cached_storage import _CachedStorage
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import auth, studies
from service.api.errors import public_message
from service.api.guards import replay
from service.db import translate_any
from service.errors import LstmHpoError, NotFound, Unauthorized

_NOT_HITL = (
    "lstm-hpo studies are not preferential (human-in-the-loop) studies: their trials are "
    "ranked by the metric the workers report"
)
_SUBMIT_HINT = "submit studies to lstm-hpo with POST /v1/studies (or `lstm-hpo submit SPEC`)"
_WORKERS_OWN_TRIALS = (
    "trial states and attributes are set by lstm-hpo's workers; cancel or delete the study "
    "instead (POST /v1/studies/{id}/cancel, DELETE /v1/studies/{id})"
)
_REFUSED: list[tuple[str, re.Pattern[str], str]] = [
    (
        "POST",
        re.compile(r"/api/studies/?"),
        f"lstm-hpo studies cannot be created here: {_SUBMIT_HINT}",
    ),
    (
        "POST",
        re.compile(r"/api/studies/\d+/rename"),
        "lstm-hpo studies cannot be renamed (a rename copies the study and deletes the "
        f"original, which would cut it off from its trial queue); {_SUBMIT_HINT}",
    ),
    ("POST", re.compile(r"/api/trials/\d+(?:/.*)?"), _WORKERS_OWN_TRIALS),
    ("POST", re.compile(r"/api/studies/\d+/\d+/skip"), _WORKERS_OWN_TRIALS),
    (
        "POST",
        re.compile(r"/incompatible-rdb-schema/?"),
        "the schema is upgraded by the lstm-hpo server at start (or `lstm-hpo migrate`)",
    ),
    *(
        (method, re.compile(r"/api/studies/\d+/preference(?:_feedback_component|/.*)?"), _NOT_HITL)
        for method in ("POST", "PUT", "DELETE")
    ),
]
#: The dashboard reads these routes' bodies as a JSON object and answers 500 to anything else.
_NOTE = re.compile(r"/api/studies/\d+(?:/\d+)?/note")
#: Optuna's ids are SQL INTEGERs (32 bits on PostgreSQL): a larger one in a path made the
#: database raise (HTTP 500) where no such study or trial exists (404).
_MAX_ID = 2**31 - 1
_NUMBER = re.compile(r"/(\d+)(?=/|$)")
_DELETE_STUDY = re.compile(r"/api/studies/(\d+)")
#: Routes that name an Optuna study by its id (group 1).
_STUDY_ROUTES = re.compile(
    r"/(?:api/studies|dashboard/studies|csv|artifacts|api/artifacts)/(\d+)(?:/.*)?"
)
#: Routes that name a trial (group 1) of the study the route names: a trial's note and
#: artifacts. The dashboard takes the trial id as it is: a note for a trial that does not
#: exist was stored, and one of another study was written through this study's route.
_TRIAL_ROUTES = re.compile(r"/(?:api/studies|api/artifacts|artifacts)/\d+/(\d+)(?:/.*)?")
_STUDY_LIST = "/api/studies"
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SIGNIN_PATH = "/signin"


class _Reconnecting:
    """The server's Optuna storage as the dashboard reaches it. A database restart leaves
    dropped connections in the pool, and the first use of each fails: a call that meets an
    outage is made once more (on a fresh connection), and if the database is still away it
    is bottle's ``HTTPError`` 503 with ``Retry-After: 1``, which the dashboard's JSON
    routes answer as ``{"reason": ...}`` (any other error is its bare 500). Every call the
    dashboard makes is a read or an idempotent write (a note, a preference: upserts)."""

    def __init__(self, storage: optuna.storages.RDBStorage) -> None:
        self._storage = storage

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._storage, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def once_more_on_outage(*args: Any, **kwargs: Any) -> Any:
            return _once_more_on_outage(attr, args, kwargs)

        return once_more_on_outage


def _once_more_on_outage(call: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    for attempt in (1, 2):
        try:
            return call(*args, **kwargs)
        except Exception as err:
            ours = translate_any(err)
            if ours is None or not ours.retryable:
                raise
            if attempt == 2:
                bottle.response.set_header("Retry-After", "1")
                raise bottle.HTTPError(503, public_message(ours)) from err
    raise AssertionError("not reached")


class LazyDashboard:
    """optuna-dashboard's WSGI app (``optuna_dashboard.wsgi(storage)``), built at its first
    request. Importing optuna-dashboard costs about 2 s of CPU (its importance view imports
    Optuna's fANOVA, which imports scikit-learn when it is installed): as much as the rest of
    the server's start, paid by every ``serve``, restart and test server, most of which
    never show the dashboard. Its presence is checked at start (:func:`find_spec`), so a
    missing package still stops the server then, not at the first page view."""

    def __init__(self, storage: optuna.storages.BaseStorage) -> None:
        if importlib.util.find_spec("optuna_dashboard") is None:
            raise ModuleNotFoundError(
                "optuna-dashboard is not installed: pip install optuna-dashboard"
            )
        self._storage = storage
        self._app: WSGIApp | None = None
        self._lock = threading.Lock()

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        app = self._app
        if app is None:
            with self._lock:  # a2wsgi calls from a thread pool: build it once
                if self._app is None:
                    import optuna_dashboard

                    self._app = optuna_dashboard.wsgi(self._storage)
                app = self._app
        return app(environ, start_response)


class DashboardStorage(_CachedStorage):
    """Optuna's storage as the mounted optuna-dashboard reads it: every trial list through
    Optuna's own cache of finished trials (``_CachedStorage``, what each ``optuna.Study``
    on an RDB storage reads through), everything else straight from the database.

    The dashboard rereads all of a study's trials whenever its copy is older than 10 s (a
    page load, and a poll of an open page). Through ``RDBStorage`` that built every trial
    again: ~9 s of the server's CPU per reread at 10,000 trials on the benchmark machine
    (BENCHMARKS.md, "Large studies"). Here it reads the trials that are new or were
    unfinished; Optuna never changes a finished trial.

    A study deleted (``DELETE /v1/studies/{id}``, another server) and another made later
    under the same id (SQLite reuses ids) must not show the old one's trials: each read
    checks the study's name, and a study whose name changed is read afresh. Writes never
    come through here (the guard refuses them) except what the dashboard keeps on a study
    (notes, preferences), which go straight to the database. Not being an ``RDBStorage``,
    it also spares each page load the dashboard's schema-version check (the server
    upgrades Optuna's schema at start; the dashboard's upgrade page is refused anyway).
    """

    def __init__(self, backend: optuna.storages.RDBStorage) -> None:
        super().__init__(cast(optuna.storages.RDBStorage, _Reconnecting(backend)))
        self._names: dict[int, str] = {}
        self._names_lock = threading.Lock()

    def get_all_trials(
        self,
        study_id: int,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
    ) -> list[FrozenTrial]:
        name = self._backend.get_study_name_from_id(study_id)  # KeyError when it is gone
        with self._names_lock:
            if self._names.get(study_id) != name:
                with self._lock:
                    self._studies.pop(study_id, None)  # Optuna's cache of that id: stale
                self._names[study_id] = name
        return super().get_all_trials(study_id, deepcopy=deepcopy, states=states)

    # Only the trial lists are cached: names, directions and single trials are read afresh
    # (the cache would keep a deleted study's).

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._backend.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._backend.get_study_directions(study_id)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._backend.get_trial(trial_id)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._backend.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        return self._backend.get_best_trial(study_id)

    def get_all_studies(self) -> list[FrozenStudy]:
        # By id, as optuna-dashboard lists an RDBStorage's (it sorts only for that class).
        return sorted(self._backend.get_all_studies(), key=lambda s: s._study_id)


class DashboardGuard:
    """ASGI middleware in front of the mounted dashboard (see the module docstring)."""

    def __init__(
        self, app: ASGIApp, backend: studies.Backend, cookies: auth.SessionCookies
    ) -> None:
        self.app = app
        self.backend = backend
        self.cookies = cookies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # optuna-dashboard (bottle) ignores repeated and trailing slashes: match the path it
        # will route, or "/api/studies/6/rename/" would pass a refusal meant for ".../rename".
        method, path = scope["method"], _routed_path(scope["path"])
        headers = Headers(scope=scope)
        try:
            principal, by_cookie = await run_in_threadpool(self._principal, headers)
        except Unauthorized as err:
            await _unauthenticated(path, scope, err)(scope, receive, send)
            return
        if by_cookie and method in _UNSAFE and not _same_origin(headers):
            await _reason(403, "cross-site request refused")(scope, receive, send)
            return
        if any(int(n) > _MAX_ID for n in _NUMBER.findall(path)):
            await _reason(404, "not found")(scope, receive, send)
            return
        after = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("after", [])
        if any(not a.isdigit() for a in after):  # the dashboard int()s it: a 500
            await _reason(400, "after must be a whole number (a trial number)")(
                scope, receive, send
            )
            return
        if method == "PUT" and _NOTE.fullmatch(path):
            body = await _read_body(receive)
            if not _is_note(headers, body):
                # optuna-dashboard stores any JSON body; one that is not text made the
                # study's page a 500 for everyone from then on.
                msg = 'the body must be a JSON object {"version": N, "body": "text"}'
                await _reason(400, msg)(scope, receive, send)
                return
            receive = replay([{"type": "http.request", "body": body}], receive)
        response = await run_in_threadpool(self._intercept, method, path, principal)
        if response is not None:
            await response(scope, receive, send)
        elif method in ("GET", "HEAD") and path == _STUDY_LIST and not principal.admin:
            await self._filtered_study_list(scope, receive, send, principal)
        else:
            await self.app(scope, receive, send)

    def _principal(self, headers: Headers) -> tuple[auth.Principal, bool]:
        """The caller and whether its session cookie (not a header) says so."""
        sessions = self.backend.sessions
        token = _token_from_authorization(headers.get("authorization"))
        if token is not None:
            return auth.authenticate(sessions, token), False
        cookie = _cookie(headers, auth.SESSION_COOKIE)
        if cookie is not None and auth.authentication_on(sessions):
            return self.cookies.principal(sessions, cookie), True
        return auth.authenticate(sessions, None), False  # open mode, or Unauthorized

    def _intercept(self, method: str, path: str, principal: auth.Principal) -> Response | None:
        """The guard's own answer to a request, or None to let the dashboard answer."""
        for refused_method, pattern, reason in _REFUSED:
            if method == refused_method and pattern.fullmatch(path):
                return _reason(403, reason)
        match = _STUDY_ROUTES.fullmatch(path)
        if match is None:
            return None
        study_id = int(match.group(1))
        try:
            if method == "DELETE" and _DELETE_STUDY.fullmatch(path):
                studies.delete_study_by_optuna_id(self.backend, study_id, principal=principal)
                return Response(status_code=204)
            job = studies.job_for_optuna_study(self.backend, study_id, principal=principal)
        except NotFound:
            return _reason(404, f"study_id={study_id} is not found")
        except LstmHpoError as err:
            if not err.retryable:
                return _reason(409, err.message)
            unavailable = _reason(503, public_message(err))
            unavailable.headers["Retry-After"] = "1"
            return unavailable
        if job is None and not principal.admin:  # a study lstm-hpo does not own
            return _reason(404, f"study_id={study_id} is not found")
        trial = _TRIAL_ROUTES.fullmatch(path)
        if trial is not None and not self._is_trial_of(int(trial.group(1)), study_id):
            return _reason(404, f"trial_id={trial.group(1)} is not found in study_id={study_id}")
        return None

    def _is_trial_of(self, trial_id: int, study_id: int) -> bool:
        storage = self.backend.storage
        try:
            number = storage.get_trial_number_from_id(trial_id)
            return storage.get_trial_id_from_study_id_trial_number(study_id, number) == trial_id
        except KeyError:  # no such trial
            return False

    async def _filtered_study_list(
        self, scope: Scope, receive: Receive, send: Send, principal: auth.Principal
    ) -> None:
        """The dashboard's study list with only the principal's studies."""
        start: Message = {}
        body = bytearray()

        async def collect(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                body.extend(message.get("body", b""))

        # HEAD too is answered from the filtered list (its Content-Length would tell the
        # size of every principal's); the server sends no body for HEAD.
        await self.app({**scope, "method": "GET"}, receive, collect)
        if start.get("status") != 200:  # passed on as it is, with its type (and Retry-After)
            kept = {b"content-type", b"retry-after"}
            headers = {
                k.decode("latin-1"): v.decode("latin-1")
                for k, v in start.get("headers", [])
                if k.lower() in kept
            }
            await Response(bytes(body), status_code=int(start.get("status", 500)), headers=headers)(
                scope, receive, send
            )
            return
        mine = await run_in_threadpool(self._visible_study_names, principal)
        listing: dict[str, Any] = json.loads(body)
        listing["study_summaries"] = [
            s for s in listing.get("study_summaries", []) if s.get("study_name") in mine
        ]
        await JSONResponse(listing)(scope, receive, send)

    def _visible_study_names(self, principal: auth.Principal) -> set[str]:
        return studies.optuna_study_names(self.backend, principal=principal)


async def _read_body(receive: Receive) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        body.extend(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return bytes(body)


def _is_note(headers: Headers, body: bytes) -> bool:
    """A note as optuna-dashboard's front end sends it (bottle's ``request.json``: a JSON
    media type): ``{"version": int, "body": str}``."""
    media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type not in ("application/json", "application/json-rpc"):
        return False
    try:
        note = json.loads(body)
    except (ValueError, RecursionError):
        return False
    if not isinstance(note, dict):
        return False
    version = note.get("version")
    return (
        isinstance(version, int)
        and not isinstance(version, bool)
        and isinstance(note.get("body"), str)
    )


def _routed_path(path: str) -> str:
    """``path`` with repeated slashes collapsed and the trailing one dropped."""
    return re.sub(r"/{2,}", "/", path).rstrip("/") or "/"


def _reason(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"reason": reason}, status_code=status)


def _unauthenticated(path: str, scope: Scope, err: Unauthorized) -> Response:
    """Pages redirect to the sign-in page (back here afterwards); the rest answer 401."""
    if scope["method"] == "GET" and (path == "/" or path.startswith("/dashboard")):
        query = scope.get("query_string", b"").decode("latin-1")
        back = path + (f"?{query}" if query else "")
        return RedirectResponse(f"{SIGNIN_PATH}?next={quote(back, safe='')}", status_code=303)
    response = _reason(401, err.message)
    response.headers["WWW-Authenticate"] = "Bearer"  # not Basic: no browser pop-up for XHR
    return response


def _token_from_authorization(value: str | None) -> str | None:
    """The token of ``Bearer <token>`` or of HTTP basic (any user name, the token as the
    password); None without a header. A malformed header is a token that fails."""
    if not value:
        return None
    scheme, _, credentials = value.partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        except ValueError:  # binascii.Error, UnicodeDecodeError, non-ASCII text
            return ""
        return decoded.partition(":")[2]
    return ""


def _cookie(headers: Headers, name: str) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name and value:
            return value
    return None


def _same_origin(headers: Headers) -> bool:
    """True when the request's ``Origin`` (or, lacking it, ``Referer``) is this server's own
    address as the browser reached it (``Host``)."""
    origin = headers.get("origin") or headers.get("referer")
    if not origin:
        return True  # not a browser's cross-site request (browsers send Origin on POST)
    return urlsplit(origin).netloc == headers.get("host", "")
