"""The one Settings class. Read by entry points (cli, api app factory, worker) only;
deeper modules take plain values as arguments."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy import exc
from sqlalchemy.engine import URL, make_url

from service.search_space import MAX_TIMEOUT_S
from service.webhooks import parse_prefix


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "lstm-hpo"


_URL_FORMS = "sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE"


def check_database_url(text: str) -> URL:
    """``text`` as a URL lstm-hpo can run on: SQLite, or PostgreSQL through an installed
    driver. Raises ValueError saying what is wrong, without the text (it may hold a
    password): what SQLAlchemy would only say at the first connection, in a traceback."""
    try:
        url = make_url(text)
    except exc.ArgumentError:
        raise ValueError(f"not a database URL; write {_URL_FORMS}") from None
    backend = url.get_backend_name()
    if backend == "sqlite":
        _check_sqlite_file(url.database, url.query.get("mode"))
    elif backend != "postgresql":
        raise ValueError(f"{backend!r}: lstm-hpo runs on SQLite or PostgreSQL ({_URL_FORMS})")
    try:
        url.get_dialect().import_dbapi()
    except (exc.NoSuchModuleError, ImportError) as err:
        raise ValueError(
            f"driver {url.drivername!r} cannot be loaded ({err}); postgresql+psycopg "
            "comes with lstm-hpo's postgres extra: pip install 'lstm-hpo[postgres]'"
        ) from None
    repeated = sorted(key for key, value in url.query.items() if isinstance(value, tuple))
    if repeated:  # the driver would get a tuple (connect_timeout "('2', '3')")
        raise ValueError(f"its connection option {repeated[0]!r} is given more than once")
    try:  # what create_engine would refuse: ?port=abc
        url.get_dialect()().create_connect_args(url)
    except exc.ArgumentError as err:
        raise ValueError(f"its connection options: {err}") from None
    return url


def _check_sqlite_file(database: str | None, mode: object = None) -> None:
    """A SQLite URL's file: one every process opens (the server, each worker), never an
    in-memory database (one per process, empty in each) or a path sqlite reads otherwise
    than the user meant (``~`` is not expanded: it would be a folder named ``~``)."""
    if not database or database == ":memory:" or mode == "memory":
        raise ValueError(
            "an in-memory SQLite database is private to each process (the server and every "
            "worker would have their own, empty): name a file, sqlite:///PATH"
        )
    if database.startswith("~"):
        raise ValueError(f"{database!r}: ~ is not expanded in a database URL; write the full path")
    if Path(database).is_dir():
        raise ValueError(f"{database!r} is a directory: name the database file in it")


class Settings(BaseSettings):
    """All settings, from ``LSTM_HPO_*`` environment variables (or a ``.env`` file)."""

    # validate_by_name: a field with an env alias (worker_memory_gb) is also set by its name.
    model_config = SettingsConfigDict(
        env_prefix="LSTM_HPO_", env_file=".env", extra="ignore", validate_by_name=True
    )

    env: Literal["development", "production"] = "development"
    #: Where the default SQLite database, uploaded data and run outputs live.
    data_dir: Path = Field(default_factory=_default_data_dir)
    #: Our tables and Optuna's. Default: ``sqlite:///<data_dir>/lstm-hpo.db``.
    database_url: str | None = None
    #: Extra directories a spec's ``task.path`` may point into (besides ``<data_dir>/datasets``).
    data_roots: list[Path] = Field(default_factory=list)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    #: Public base URL used in links (dashboard_url); default http://host:port. An https
    #: URL also marks the dashboard's session cookie ``Secure``.
    public_url: str | None = None
    #: Signs the dashboard's session cookies. Default: a random key kept in
    #: ``<data_dir>/secret_key`` (give every server behind one address the same key).
    secret_key: SecretStr | None = None
    #: An operator-supplied admin token (e.g. from a Kubernetes Secret), registered at
    #: start as the principal ``admin``: the server may then bind a non-loopback address
    #: without a prior ``lstm-hpo token create``.
    admin_token: SecretStr | None = None

    max_trials: int = Field(default=10_000, ge=1)
    #: Upper bound for a spec's study.max_retries.
    max_retries: int = Field(default=10, ge=0)
    #: Upper bound for a spec's study.timeout_s, in seconds (default: 30 days).
    max_timeout_s: float = Field(default=30 * 24 * 3600, gt=0, le=MAX_TIMEOUT_S)
    #: Largest accepted request body (a spec), in bytes.
    max_request_bytes: int = Field(default=1_000_000, ge=1_000)
    #: A worker's memory for one trial, in GB (10^9 bytes): the server refuses a space whose
    #: most expensive config needs more for one training step (``study.on_too_large:
    #: prune`` accepts it), a worker prunes such a trial untrained. None: no check.
    worker_memory_gb: float | None = Field(
        default=None, gt=0, validation_alias="LSTM_HPO_WORKER_MEMORY_GB"
    )
    #: Per principal: most queued + running studies; a submit past it answers 429 with
    #: ``Retry-After``. None: no quota.
    max_active_studies_per_principal: int | None = Field(
        default=None, ge=1, validation_alias="LSTM_HPO_MAX_ACTIVE_STUDIES"
    )
    #: Per principal: most running trials; a worker's claim skips a principal at it (its
    #: trials wait, others' are served). Read by the workers. None: no quota.
    max_running_trials_per_principal: int | None = Field(
        default=None, ge=1, validation_alias="LSTM_HPO_MAX_RUNNING_TRIALS"
    )

    #: Where trials keep their per-epoch checkpoints: ``s3://bucket[/prefix]`` (extra
    #: ``s3``; boto3's own credentials and ``AWS_ENDPOINT_URL``). None: ``<data_dir>/artifacts``.
    artifacts_url: str | None = None

    #: Worker heartbeat period; a trial whose worker is silent for ``grace`` is reaped.
    heartbeat_interval_s: float = Field(default=10.0, gt=0)
    heartbeat_grace_s: float = Field(default=60.0, gt=0)
    reaper_interval_s: float = Field(default=15.0, gt=0)
    #: After SIGTERM / SIGUSR1 (preemption), how long a worker's trial may go on towards
    #: its epoch's end (whose checkpoint its retry resumes from) before it stops at the
    #: next batch. A supervisor should allow this plus ~15 s before it kills the worker
    #: (Kubernetes ``terminationGracePeriodSeconds``, Slurm ``--signal=USR1@120``).
    preempt_grace_s: float = Field(default=20.0, ge=0, le=3600)
    #: How long after ``study.trial_timeout_s`` a trial hung inside a step (no step boundary
    #: reached) is killed with its worker process by the worker's supervisor.
    trial_kill_grace_s: float = Field(default=60.0, gt=0, le=86400)
    #: How often an idle worker looks for work when nothing wakes it (PostgreSQL: a
    #: submit or a queued retry wakes idle workers at once, via LISTEN / NOTIFY).
    poll_interval_s: float = Field(default=1.0, gt=0)
    #: torch threads per worker process.
    torch_threads: int = Field(default=1, ge=1)
    #: The server's PostgreSQL pool (ours and Optuna's each). Workers always use one
    #: connection for our tables and one for Optuna's.
    pool_size: int = Field(default=5, ge=2)

    #: The server's and workers' log lines: ``text``, or ``json`` (one object per line,
    #: with the study id, trial number and worker id where known; ``service.logs``).
    log_format: Literal["text", "json"] = "text"
    #: ``GET /metrics`` (Prometheus): ``admin`` needs an admin API token (none in open
    #: mode, like every route), ``public`` needs none (a scraper on a private network),
    #: ``off`` answers 404.
    metrics: Literal["admin", "public", "off"] = "admin"
    #: URL prefixes a study's webhook (``study.notify.url``) must lie under, comma-separated
    #: (matched by scheme, host, port and whole path segments; ``service.webhooks``).
    #: Empty: a spec with a webhook is refused, and the server sends none.
    webhook_allow: Annotated[tuple[str, ...], NoDecode] = ()
    #: How often the server looks for study events to send to webhooks, and for succeeded
    #: studies with study.confirm to confirm, in seconds.
    notify_interval_s: float = Field(default=5.0, gt=0)

    @field_validator("webhook_allow", mode="before")
    @classmethod
    def _split_prefixes(cls, value: Any) -> Any:
        if isinstance(value, str):  # the environment's comma-separated list
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("webhook_allow")
    @classmethod
    def _prefixes_are_urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for prefix in value:
            parse_prefix(prefix)  # ValueError naming the bad entry
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url_is_usable(cls, value: str | None) -> str | None:
        if value:
            check_database_url(value)
        return value

    @model_validator(mode="after")
    def _secure_outside_development(self) -> Settings:
        if self.env == "production" and self.resolved_database_url().startswith("sqlite"):
            raise ValueError(
                "LSTM_HPO_ENV=production needs a PostgreSQL LSTM_HPO_DATABASE_URL; "
                "SQLite is for one machine"
            )
        return self

    @model_validator(mode="after")
    def _artifacts_url_is_s3(self) -> Settings:
        if self.artifacts_url is not None and not self.artifacts_url.startswith("s3://"):
            raise ValueError(
                f"LSTM_HPO_ARTIFACTS_URL {self.artifacts_url!r}: write s3://bucket or "
                "s3://bucket/prefix (unset: checkpoints go to <data_dir>/artifacts)"
            )
        return self

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'lstm-hpo.db'}"

    def safe_database_url(self) -> str:
        """The database URL with any password masked, for printing."""
        return make_url(self.resolved_database_url()).render_as_string(hide_password=True)

    def allowed_data_roots(self) -> tuple[Path, ...]:
        return (self.data_dir / "datasets", *self.data_roots)

    def session_secret(self) -> str:
        """The cookie-signing key: ``secret_key``, else one made once and kept (mode 600)
        in ``<data_dir>/secret_key``, so sign-ins survive a restart."""
        if self.secret_key is not None:
            return self.secret_key.get_secret_value()
        path = self.data_dir / "secret_key"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
        return path.read_text().strip()

    def base_url(self) -> str:
        """``public_url``, else ``http://host:port`` (an IPv6 host in brackets, RFC 3986)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return self.public_url or f"http://{host}:{self.port}"
