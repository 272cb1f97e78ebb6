"""A server thread's loop that looks at the database every few seconds (webhooks' events,
``study.confirm``): one bad look is logged and the next one comes, never the end."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from service.db import translate_any


def look_every(
    stop: threading.Event,
    interval_s: float,
    look: Callable[[], object],
    *,
    what: str,
    log: logging.Logger,
) -> None:
    """Call ``look`` now and then every ``interval_s`` seconds until ``stop`` is set. Our
    errors (the database away for a moment) are a warning line; anything else is logged
    with its traceback. ``what`` names the loop in those lines."""
    while not stop.is_set():
        try:
            look()
        except Exception as err:  # never let one bad look end the thread
            ours = translate_any(err)  # the database away: ours, or wrapped by Optuna
            if ours is not None:
                log.warning("%s: %s", what, ours.message)
            else:
                log.exception("%s: a look failed", what)
        stop.wait(interval_s)


def skip_unless_outage(err: Exception, skipped: str, *, log: logging.Logger) -> None:
    """In a look over many studies, ``err`` from one of them: re-raised, as ours, when it
    is a database outage (the whole look waits for the database; nothing is marked done),
    else logged as ``skipped`` (with the traceback when it is not one of our errors)."""
    ours = translate_any(err)  # Optuna's storage wraps an outage in its own error
    if ours is not None and ours.retryable:
        raise ours from err
    if ours is not None:
        log.error("%s: %s", skipped, ours.message)
    else:
        log.exception(skipped)
