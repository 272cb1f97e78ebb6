"""The real app served by uvicorn in a thread on a free loopback port (no workers): for
tests that drive the HTTP API (and the mounted dashboard) without starting processes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import uvicorn

from service.api.app import create_app
from service.config import Settings
from service.studies import Backend
from tests.acceptance.conftest import free_port


@dataclass(frozen=True)
class InProcessServer:
    """A running server: its URL, an HTTP client on it, and the app's backend."""

    url: str
    http: httpx.Client
    backend: Backend


@contextmanager
def serve_in_thread(settings: Settings) -> Iterator[InProcessServer]:
    """``create_app(settings)`` on uvicorn (``settings.port`` is replaced by a free one);
    stopped, and its database connections closed, on exit."""
    port = free_port()
    settings = settings.model_copy(update={"host": "127.0.0.1", "port": port})
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    backend: Backend = app.state.backend
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            yield InProcessServer(url, http, backend)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "uvicorn did not stop"
        backend.sessions.kw["bind"].dispose()
        storage = backend.storage
        engine = getattr(storage, "engine", None)
        if engine is not None:
            engine.dispose()
