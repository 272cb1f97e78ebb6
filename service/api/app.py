"""The application factory: REST API under /v1, OpenAPI at /docs, optuna-dashboard at the root."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version
from typing import Any

from a2wsgi import WSGIMiddleware
from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from sqlalchemy.engine import make_url

from service import auth, studies
from service.api.dashboard import DashboardGuard, DashboardStorage, LazyDashboard
from service.api.errors import install_error_handlers
from service.api.guards import BodyLimit, CanonicalPath, MethodGuard, OpenModeGuard
from service.api.routes import confirm as confirm_routes
from service.api.routes import health, signin, unmatched
from service.api.routes import metrics as metrics_routes
from service.api.routes import report as report_routes
from service.api.routes import studies as studies_routes
from service.artifacts import open_artifact_store
from service.auto_confirm import AutoConfirmer
from service.config import Settings
from service.metrics import app_collectors, build_registry, request_histogram
from service.migrate import current_revisions, optuna_tables_lock, upgrade_schema
from service.notify import Notifier
from service.reaper import Reaper
from service.search_space import SpecLimits, StudySpec


def create_app(settings: Settings | None = None, *, migrate: bool = True) -> FastAPI:
    """Build the server: migrate (the server owns the schema), connect, mount the dashboard.

    Raises ``OpenModeRefused`` when ``settings.host`` is not a loopback address and no API
    token exists yet (see :mod:`service.auth`); ``InvalidName`` for a too short
    ``LSTM_HPO_ADMIN_TOKEN``.
    """
    settings = settings or Settings()
    url = settings.resolved_database_url()
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    (settings.data_dir / "datasets").mkdir(parents=True, exist_ok=True)
    # Optuna's tables first (its storage creates them), then ours: workers wait for ours,
    # so by the time they connect neither needs DDL.
    with optuna_tables_lock(url):
        storage = studies.optuna_storage(url, pool_size=max(settings.pool_size, 2))
    if migrate:
        upgrade_schema(url)
    backend = studies.open_backend(
        url,
        limits=SpecLimits(
            max_trials=settings.max_trials,
            max_retries=settings.max_retries,
            max_timeout_s=settings.max_timeout_s,
            data_roots=settings.allowed_data_roots(),
            worker_memory_gb=settings.worker_memory_gb,
            webhook_allow=settings.webhook_allow,
        ),
        base_url=settings.base_url(),
        pool_size=settings.pool_size,
        storage=storage,
        max_active_studies=settings.max_active_studies_per_principal,
        checkpoints=open_artifact_store(settings.artifacts_url, settings.data_dir),
    )
    if settings.admin_token is not None:
        auth.ensure_admin_token(backend.sessions, settings.admin_token.get_secret_value())
    # No token yet: open for one local user on a loopback address, refused elsewhere.
    open_mode = auth.check_bind(backend.sessions, settings.host)
    reaper = Reaper(
        backend, grace_s=settings.heartbeat_grace_s, interval_s=settings.reaper_interval_s
    )
    # Webhooks are sent from the server (never a worker); none without an allow-list.
    notifier = (
        Notifier(backend, allow=settings.webhook_allow, interval_s=settings.notify_interval_s)
        if settings.webhook_allow
        else None
    )

    # study.confirm: confirmations are queued by the server, as webhooks are sent.
    confirmer = AutoConfirmer(backend, interval_s=settings.notify_interval_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reaper.start()
        confirmer.start()
        if notifier is not None:
            notifier.start()
        yield
        reaper.stop()
        confirmer.stop()
        if notifier is not None:
            notifier.stop()

    app = FastAPI(
        title="lstm-hpo",
        version=version("lstm-hpo"),
        description="Hyperparameter search for stacked LSTMs. REST API under /v1; "
        "optuna-dashboard at /dashboard.",
        lifespan=lifespan,
    )
    app.state.backend = backend
    app.state.open_mode = open_mode
    cookies = auth.SessionCookies(settings.session_secret())
    app.state.session_cookies = cookies
    app.state.secure_cookies = settings.base_url().startswith("https://")
    app.state.max_request_bytes = settings.max_request_bytes
    # /v1/health is public: it names the kind of database, never its address.
    app.state.database_kind = make_url(url).get_backend_name()
    revisions = current_revisions(backend.sessions.kw["bind"])
    app.state.schema_revision = next(iter(revisions), None)
    requests = request_histogram()
    app.state.metrics_mode = settings.metrics
    app.state.metrics_registry = build_registry(
        app_collectors(
            backend.sessions, live_within_s=settings.heartbeat_grace_s, requests=requests
        )
    )
    install_error_handlers(app)
    app.include_router(health.router, prefix="/v1")
    app.include_router(studies_routes.router, prefix="/v1")
    app.include_router(report_routes.router, prefix="/v1")  # report, trials.csv, progress
    app.include_router(confirm_routes.router, prefix="/v1")  # confirm, confirmation
    app.include_router(signin.router)
    app.include_router(unmatched.router, prefix="/v1")  # last of /v1: JSON 404 / 405
    app.include_router(metrics_routes.router)  # /metrics: before the dashboard's mount

    _document_spec_schema(app)
    # Added innermost first. From the outside: one spelling of each path, bodies bounded for
    # every route (the sign-in page and the dashboard's JSON routes too), then open mode's
    # host and origin checks.
    app.add_middleware(MethodGuard)
    app.add_middleware(OpenModeGuard, backend=backend)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    app.add_middleware(CanonicalPath)
    # Outermost: every answer is timed, a refused one too.
    app.add_middleware(metrics_routes.RequestLatency, histogram=requests)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/dashboard")

    # Last: the dashboard's front end hard-codes /dashboard, /api and /static, so it
    # cannot live under a prefix; everything the API did not match falls through to it,
    # behind the guard: sign-in, each principal's own studies, and nothing that splits a
    # study's two records (service.api.dashboard).
    dashboard = WSGIMiddleware(LazyDashboard(DashboardStorage(storage)))
    app.mount(
        "/",
        DashboardGuard(dashboard, backend, cookies),  # type: ignore[arg-type]
        name="dashboard",  # the route label of its requests in /metrics
    )
    return app


def _document_spec_schema(app: FastAPI) -> None:
    """Put the study spec's JSON Schema (pydantic's, of ``StudySpec``) into the OpenAPI
    components: ``POST /v1/studies`` reads its body itself (JSON or YAML), so FastAPI does
    not see the model. Cross-field rules (low <= high, per-task parameters, the data files)
    are beyond JSON Schema; they answer 422 naming the field."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            spec = StudySpec.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(spec.pop("$defs", {}))
            components["StudySpec"] = spec
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
