"""A server thread's loop that looks at the database every few seconds (webhooks' events,
``study.confirm``): one bad look is logged and the next one comes, never the end."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from service.errors import LstmHpoError


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
        except LstmHpoError as err:
            log.warning("%s: %s", what, err.message)
        except Exception:  # never let one bad look end the thread
            log.exception("%s: a look failed", what)
        stop.wait(interval_s)
