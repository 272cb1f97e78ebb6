"""/v1/studies: submit, list, get, trials, best, cancel, extend, delete. Thin: parse, one
call, return."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from functools import partial
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from service import confirm, studies
from service.api.charset import as_utf8
from service.api.deps import BackendDep, PrincipalDep
from service.api.errors import ERROR_RESPONSES
from service.api.guards import API_METHODS
from service.api.routes import unmatched
from service.api.routes.report import CSV_CONTENT, trials_csv_response
from service.errors import FieldError, InvalidSpec, PayloadTooLarge, UnsupportedMediaType
from service.estimate import estimate_document
from service.schemas import (
    ID_PREFIX_PATTERN,
    BestPublic,
    EstimatePublic,
    Page,
    StudyPublic,
    TrialPublic,
)
from service.search_space import MAX_TRIALS, dump_yaml, parse_spec
from service.states import JobState, TrialState

#: Largest page offset: past it no page exists, and a database cannot take a larger integer.
MAX_OFFSET = 1_000_000_000
router = APIRouter(prefix="/studies", tags=["studies"], responses=ERROR_RESPONSES)

_YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
_SPEC_EXAMPLE = {
    "task": {"kind": "adding", "seq_len": 50},
    "space": {"num_layers": {"type": "int", "low": 1, "high": 3}, "max_epochs": 3},
    "study": {"n_trials": 10},
}


async def _spec_document(request: Request) -> Any:
    """The request body as a document: JSON by default, YAML with a YAML content type.

    Raises :class:`PayloadTooLarge` (413) for a body over the size limit, before reading
    more of it than the limit; :class:`InvalidSpec` for JSON that is not valid (duplicate
    keys, NaN or Infinity included); parse_spec reports bad YAML.
    """
    body = await _bounded_body(request, request.app.state.max_request_bytes)
    content_type = media_type(request)
    if content_type in _SIMPLE_FORM_TYPES:
        # What a cross-site form or a no-cors fetch can send without a CORS preflight.
        raise UnsupportedMediaType(
            f"a spec is JSON (Content-Type: application/json) or YAML (application/yaml), "
            f"not {content_type}"
        )
    if content_type in _YAML_TYPES:
        return body  # parse_spec decodes it, naming the byte that is not UTF-8
    return _json_document(body)


def media_type(request: Request) -> str:
    """The body's media type, lower case (RFC 9110: it is case-insensitive); JSON when the
    request names none."""
    content_type = request.headers.get("content-type", "application/json")
    return content_type.partition(";")[0].strip().lower()


async def _bounded_body(request: Request, limit: int) -> bytes:
    """The body, read only up to ``limit`` bytes (a declared or streamed larger one is
    refused before it fills the server's memory).

    A body in the ``charset`` its Content-Type names (``application/yaml;
    charset=latin-1``) is returned as UTF-8, the encoding the parsers read.

    Raises :class:`UnsupportedMediaType` (415, RFC 7694) for a compressed body (read as it
    is, gzip would be "not UTF-8 text") or a charset Python does not know;
    :class:`InvalidSpec` for a body that is not text in its declared charset."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding} is not supported: send the body uncompressed"
        )
    too_large = PayloadTooLarge(f"the request body is larger than {limit:,} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise too_large
    content_type = request.headers.get("content-type", "")
    return await run_in_threadpool(as_utf8, bytes(body), content_type)


_SIMPLE_FORM_TYPES = frozenset(
    {"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"}
)
_SEND_YAML = " (send YAML with Content-Type: application/yaml)"


def _json_document(body: bytes, *, spec: bool = True) -> Any:
    """Parse a JSON body strictly: no repeated key in an object, no NaN or Infinity.
    ``spec``: the body is a spec, which may also be sent as YAML (its error says so)."""
    try:
        document = json.loads(
            body,
            object_pairs_hook=_json_object,
            parse_constant=_json_constant,
            parse_float=_json_float,
            parse_int=_json_int,
        )
    except json.JSONDecodeError as err:
        msg = f"not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        raise InvalidSpec([FieldError("body", msg + (_SEND_YAML if spec else ""))]) from None
    except UnicodeDecodeError as err:
        raise InvalidSpec([FieldError("body", f"not UTF-8 text (byte {err.start})")]) from None
    except RecursionError:
        raise InvalidSpec([FieldError("body", "not valid JSON: nested too deeply")]) from None
    if errors := _duplicate_keys(document):
        raise InvalidSpec(errors)
    return document


class _RepeatedKeys(dict[str, Any]):
    """A JSON object that gave a key more than once (``json`` would keep the last silently)."""

    def __init__(self, pairs: list[tuple[str, Any]], repeated: list[str]) -> None:
        super().__init__(pairs)
        self.repeated = repeated


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen: set[str] = set()
    repeated: list[str] = []
    for key, _ in pairs:
        if key in seen and key not in repeated:
            repeated.append(key)
        seen.add(key)
    return _RepeatedKeys(pairs, repeated)


def _duplicate_keys(document: Any) -> list[FieldError]:
    """Every repeated key in a parsed JSON document, by its dotted path."""
    errors: list[FieldError] = []
    stack: list[tuple[tuple[str, ...], Any]] = [((), document)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, _RepeatedKeys):
            for key in value.repeated:
                # Keys are the user's text: a lone surrogate cannot go into a UTF-8 answer.
                loc, name = (
                    t.encode("utf-8", "backslashreplace").decode() for t in (".".join(path), key)
                )
                errors.append(
                    FieldError(f"{loc}.{name}" if loc else name, f"duplicate key `{name}`")
                )
        if isinstance(value, dict):
            stack.extend(((*path, k), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend(((*path, str(i)), v) for i, v in enumerate(value))
    return errors


def _json_constant(name: str) -> Any:
    msg = f"not valid JSON: {name} is not a number JSON has (use a finite number)"
    raise InvalidSpec([FieldError("body", msg)])


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        msg = f"not valid JSON: the number {text[:40]} is too large for a 64-bit float"
        raise InvalidSpec([FieldError("body", msg)])
    return value


def _json_int(text: str) -> int:
    # Python refuses to read integers of more than 4300 digits (a ValueError); no spec
    # field takes more than 64 bits, so a long one is refused before it is read.
    if len(text) > 40:
        msg = f"not valid JSON: an integer of {len(text)} digits is too large"
        raise InvalidSpec([FieldError("body", msg)])
    return int(text)


@router.post(
    "",
    status_code=201,
    responses={
        200: {
            "model": StudyPublic,
            "description": "The study an earlier request with the same Idempotency-Key made",
        }
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/StudySpec"},
                    "example": _SPEC_EXAMPLE,
                },
                "application/yaml": {"schema": {"type": "string"}},
            },
        }
    },
)
async def submit(
    request: Request,
    response: Response,
    backend: BackendDep,
    principal: PrincipalDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> StudyPublic:
    """Queue a study from a spec (JSON, or YAML with ``Content-Type: application/yaml``).

    Retrying with the same ``Idempotency-Key`` header returns the same study (200).
    """
    document = await _spec_document(request)
    # Parsing may read the task's data file (the cost estimate): off the event loop too.
    spec = await run_in_threadpool(parse_spec, document, backend.limits)
    confirm.refuse_confirm_marker(spec)
    # Reads the task's data and writes two databases: off the event loop.
    study, created = await run_in_threadpool(
        partial(studies.submit_study, principal=principal, idempotency_key=idempotency_key),
        backend,
        spec,
    )
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/v1/studies/{study.id}"
    return study


@router.post(
    "/estimate",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"type": "object"}, "example": _SPEC_EXAMPLE},
                "application/yaml": {"schema": {"type": "string"}},
            },
        }
    },
)
async def estimate(
    request: Request, backend: BackendDep, principal: PrincipalDep
) -> EstimatePublic:
    """The cost of the most expensive config a spec allows, without submitting it: its
    parameters and the memory of one training step, and whether that fits a worker
    (``LSTM_HPO_WORKER_MEMORY_GB``; ``fits`` is null when it is not set). The body is a
    spec, as for ``POST /v1/studies``."""
    document = await _spec_document(request)
    # May read the task's data file: off the event loop.
    worst = await run_in_threadpool(estimate_document, document, backend.limits)
    cost = worst.cost
    return EstimatePublic(
        params=cost.params,
        activation_bytes=cost.activation_bytes,
        total_bytes=cost.total_bytes,
        weight_bytes=cost.weight_bytes,
        gradient_bytes=cost.gradient_bytes,
        optimizer_bytes=cost.optimizer_bytes,
        config=worst.config.model_dump(mode="json", exclude_none=True),
        fits=worst.fits,
        limit_bytes=worst.limit_bytes,
        shape=cost.shape.source if cost.shape is not None else None,
    )


# Before the ``/{study_id}`` routes, which would take ``estimate`` for a study id: ``GET``
# or ``DELETE /v1/studies/estimate`` is a 405 naming POST, not "no study with that id".
router.add_api_route(
    "/estimate",
    unmatched.unmatched,
    methods=sorted(API_METHODS - {"POST"}),
    include_in_schema=False,
)


@router.get("")
def list_(
    backend: BackendDep,
    principal: PrincipalDep,
    *,
    state: JobState | None = None,
    id_prefix: Annotated[
        str | None,
        Query(
            pattern=ID_PREFIX_PATTERN,
            description="Only studies whose id starts with this (1-32 lowercase hex "
            "digits): what the CLI resolves a short id with.",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Page[StudyPublic]:
    """Studies, newest first."""
    return studies.list_studies(
        backend, principal=principal, state=state, id_prefix=id_prefix, limit=limit, offset=offset
    )


@router.get("/{study_id}")
def get(study_id: str, backend: BackendDep, principal: PrincipalDep) -> StudyPublic:
    """State, trial counts, best value and elapsed time."""
    return studies.get_study(backend, study_id, principal=principal)


@router.get(
    "/{study_id}/trials",
    response_model=Page[TrialPublic],
    responses={200: {"content": CSV_CONTENT}},
)
def trials(
    study_id: str,
    *,
    backend: BackendDep,
    principal: PrincipalDep,
    state: TrialState | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    format: Annotated[Literal["json", "csv"], Query()] = "json",
) -> Page[TrialPublic] | Response:
    """Trials in number order: params, value, duration, intermediate values, failure reason.

    ``?format=csv``: the same page as CSV (``X-Total-Count``: every matching trial; all
    of them at once: ``GET /v1/studies/{id}/trials.csv``).
    """
    page = studies.study_trials(
        backend, study_id, principal=principal, state=state, limit=limit, offset=offset
    )
    if format == "csv":
        return trials_csv_response(page.items, study_id, total=page.total)
    return page


@router.get("/{study_id}/best", response_model=None)
def best(
    study_id: str,
    backend: BackendDep,
    principal: PrincipalDep,
    *,
    k: Annotated[int | None, Query(ge=1, le=100)] = None,
    format: Annotated[Literal["json", "yaml"], Query()] = "json",
    confirmed: Annotated[
        bool,
        Query(
            description="The config the study's confirmation ranks first (the best mean "
            "over new seeds) instead of the search's best run (with k: a list of it)."
        ),
    ] = False,
) -> BestPublic | list[BestPublic] | PlainTextResponse:
    """The best config (``?k=N``: the top N). ``?format=yaml``: a file `lstm-hpo train` takes.

    A multi-objective study answers its Pareto front (a list, at most N with ``?k=N``),
    each with its ``values``; as YAML, one document per config, each headed by a comment
    with its trial and values. 409 while no trial has completed. ``?confirmed=true``: the
    config its newest confirmation ranks first; 404 when it was never confirmed, 409 while
    that confirmation has not succeeded.
    """
    if confirmed:  # one winner: with ?k=N, a list of it
        top = confirm.confirmed_best(backend, study_id, principal=principal)
        if format == "yaml":
            return PlainTextResponse(dump_yaml(top[0].config), media_type="application/yaml")
        return top if k is not None else top[0]
    top = studies.best_configs(backend, study_id, k=k, principal=principal)
    front = top[0].values is not None
    if format == "yaml":
        # Quoted where a YAML 1.2 reader (`lstm-hpo train`) would take text for a number.
        text = "---\n".join(_front_comment(b) + dump_yaml(b.config) for b in top)
        return PlainTextResponse(text, media_type="application/yaml")
    top = confirm.with_confirmation(backend, study_id, top, principal=principal)
    return top if k is not None or front else top[0]


def _front_comment(best: BestPublic) -> str:
    if best.values is None:
        return ""
    values = ", ".join(f"{name}={value:.6g}" for name, value in best.values.items())
    return f"# trial {best.trial_number}: {values}\n"


@router.get(
    "/{study_id}/best/checkpoint",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def best_checkpoint(study_id: str, backend: BackendDep, principal: PrincipalDep) -> Response:
    """The best trial's best-epoch Lightning checkpoint, a file `lstm-hpo train --init-from`
    takes. 409 while no trial has completed; 404 when the best trial has no checkpoint."""
    reader, number = studies.best_checkpoint(backend, study_id, principal=principal)

    def chunks() -> Iterator[bytes]:
        with reader:
            while chunk := reader.read(1 << 20):
                yield chunk

    filename = f"{study_id}-trial-{number}.ckpt"
    return StreamingResponse(
        chunks(),
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.post("/{study_id}/cancel")
def cancel(study_id: str, backend: BackendDep, principal: PrincipalDep) -> StudyPublic:
    """Stop claiming new trials. Trials already running finish and are recorded."""
    return studies.cancel_study(backend, study_id, principal=principal)


@router.post(
    "/{study_id}/extend",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "n_trials": {"type": "integer", "minimum": 1, "maximum": MAX_TRIALS}
                        },
                        "required": ["n_trials"],
                        "additionalProperties": False,
                    },
                    "example": {"n_trials": 20},
                }
            },
        }
    },
)
async def extend(
    study_id: str, request: Request, backend: BackendDep, principal: PrincipalDep
) -> StudyPublic:
    """Add ``n_trials`` trials to a queued, running or ended study: the same Optuna study
    goes on (the sampler keeps its history) until it has that many more finished trials;
    with ``study.timeout_s``, the deadline counts from now. 409 for a study that failed
    (its spec or data), 422 naming ``n_trials`` past ``LSTM_HPO_MAX_TRIALS``; 404 for
    another principal's study, whatever the body (it must not learn that the id exists)."""
    await run_in_threadpool(partial(studies.get_study, principal=principal), backend, study_id)
    body = await _bounded_body(request, request.app.state.max_request_bytes)
    content_type = media_type(request)
    if content_type != "application/json":
        raise UnsupportedMediaType(
            f'send {{"n_trials": N}} as JSON (Content-Type: application/json), not {content_type}'
        )
    n_trials = studies.extend_request(_json_document(body, spec=False))
    # Writes the database: off the event loop.
    return await run_in_threadpool(
        partial(studies.extend_study, principal=principal), backend, study_id, n_trials
    )


@router.delete("/{study_id}", status_code=204)
def delete(study_id: str, backend: BackendDep, principal: PrincipalDep) -> Response:
    """Delete a study: cancel it if it runs, then remove its trials (Optuna's study) and
    its record. A trial still training has its result rejected. 404 for an unknown id."""
    studies.delete_study(backend, study_id, principal=principal)
    return Response(status_code=204)
