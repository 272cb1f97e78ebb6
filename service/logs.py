"""Log set-up for the server and the workers: the plain text lines (the default), or JSON
lines (``LSTM_HPO_LOG_FORMAT=json``) that carry the study id, trial number and worker id
of what they are about, for a log pipeline (Loki, Elasticsearch, CloudWatch) to index.

The fields come from :func:`log_context`, a context manager over a ``ContextVar``: every
record logged inside it, by any logger (ours, Optuna's, Lightning's), carries them. A
thread starts with no fields (Python does not copy a context into a new thread);
``contextvars.copy_context().run`` carries them over when that is wanted. Text lines do
not show the fields: their format stays what it always was.

One JSON line per record, keys in this order::

    {"time": "2025-01-31T12:00:00.123Z", "level": "INFO", "logger": "lstm_hpo.worker",
     "message": "trial 3 of adding-1a2b3c4d: start", "process": "worker-0", "pid": 4242,
     "study_id": "1a2b...", "trial_number": 3, "worker_id": "host:4242:9f8e7d",
     "exception": "Traceback ..."}

(``exception`` only with a traceback; context fields only where known.)
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import IO, Any, Final

__all__ = [
    "LOG_FORMATS",
    "ContextFilter",
    "JsonFormatter",
    "add_log_fields",
    "configure_logging",
    "current_log_fields",
    "log_context",
]

#: The values of ``LSTM_HPO_LOG_FORMAT``.
LOG_FORMATS: Final = ("text", "json")
#: The server's text lines (what ``lstm-hpo serve`` always printed).
DEFAULT_TEXT_FORMAT: Final = "%(asctime)s %(name)s: %(message)s"
#: Record attribute that holds the context fields (set by :class:`ContextFilter`).
FIELDS_ATTR: Final = "lstm_hpo_fields"

_fields: ContextVar[Mapping[str, Any]] = ContextVar(
    "lstm_hpo_log_fields", default=MappingProxyType({})
)


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add ``fields`` (JSON values: ``study_id="..."``, ``trial_number=3``) to every record
    logged inside the block, on top of the enclosing context's; a ``None`` value removes a
    field. Everything set inside, :func:`add_log_fields` included, is undone on exit."""
    token = _fields.set(_merged(fields))
    try:
        yield
    finally:
        _fields.reset(token)


def add_log_fields(**fields: Any) -> None:
    """Add ``fields`` to the current context until the enclosing :func:`log_context` ends
    (e.g. the trial number, once it is known inside a study's block). Outside any
    :func:`log_context` they stay for the rest of this thread (or task)."""
    _fields.set(_merged(fields))


def current_log_fields() -> dict[str, Any]:
    """The fields records logged here would carry now (a copy)."""
    return dict(_fields.get())


def _merged(fields: Mapping[str, Any]) -> dict[str, Any]:
    merged = {**_fields.get(), **fields}
    return {key: value for key, value in merged.items() if value is not None}


class ContextFilter(logging.Filter):
    """Puts the current context's fields on each record (``record.lstm_hpo_fields``).

    Sits on a handler, not a logger: a logger's filters do not see records that
    propagate from its children. Never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, FIELDS_ATTR):  # the first handler's view wins
            setattr(record, FIELDS_ATTR, current_log_fields())
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring); never raises on a value that
    JSON cannot hold (it is written as its ``str``)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.processName,
            "pid": record.process,
        }
        fields = getattr(record, FIELDS_ATTR, None)
        if fields is None:  # formatted without the filter: read the context now
            fields = current_log_fields()
        for key, value in fields.items():
            line.setdefault(key, value)  # a field never hides the record's own keys
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class _JsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`configure_logging` installs for JSON (a marker class, so calling
    it again replaces it instead of adding a second one)."""


def configure_logging(
    fmt: str,
    *,
    level: int = logging.INFO,
    text_format: str = DEFAULT_TEXT_FORMAT,
    stream: IO[str] | None = None,
) -> None:
    """Set up the root logger of a server or worker process.

    ``fmt``: ``"text"`` (``logging.basicConfig`` with ``text_format``, as before: a no-op
    when the root logger already has handlers) or ``"json"`` (one JSON line per record
    on ``stream``, default stderr, with the :func:`log_context` fields; replaces an
    earlier call's JSON handler, leaves other handlers alone; Optuna's records, which it
    writes with a text handler of its own, come through it instead). Raises
    ``ValueError`` for any other ``fmt``.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r}: must be one of {', '.join(LOG_FORMATS)}")
    root = logging.getLogger()
    if fmt == "text":
        logging.basicConfig(level=level, format=text_format, stream=stream)
        return
    for old in [h for h in root.handlers if isinstance(h, _JsonHandler)]:
        root.removeHandler(old)
        old.close()
    handler = _JsonHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    root.addHandler(handler)
    root.setLevel(level)
    # Optuna writes text lines through a handler of its own: send its records to ours.
    import optuna

    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
