"""Optuna's RDB storage as a worker uses it: fewer statements per trial, same schema.

At 64 workers the service's own CPU per trial bounds throughput (BENCHMARKS.md, "Scaling"),
and most of it was Optuna's ~50 ORM statements per trial: a full trial load (5 queries) at
``ask``, two more at ``tell``, and a transaction of three statements for each parameter and
user attribute. :class:`WorkerStorage` keeps Optuna's tables and what every reader sees of
them (optuna-dashboard, ``optuna`` itself, the API), and changes only how the trials *this
process runs* are written and read back:

- **created attached to its lease** (:attr:`WorkerStorage.lease_id`) in one transaction:
  lock the study row, insert the trial numbered by a count in the same statement (as
  Optuna numbers it) only while the lease is running, and name the trial on the lease. On
  PostgreSQL with psycopg 3 the whole transaction is one pipelined round trip
  (:func:`_postgres_create_statements`);
- **set up at once**: its parameters and user and system attributes are held until
  :meth:`WorkerStorage.publish_setup` (the worker calls it through ``run_trial``'s
  ``on_configured``, once the config is sampled and recorded, before training starts: the
  dashboard and other workers' constant-liar sampling see a running trial's parameters
  from then on, as before), or until its first report or its end, whichever comes first;
- **every later write guarded**: the set-up, each report and the tell (values and state)
  are written all or nothing and only while the trial is RUNNING (the tell under its row
  lock); a trial the reaper finished meanwhile raises Optuna's
  ``UpdateFinishedTrialError``, as Optuna's own writes do. On PostgreSQL each such write is
  ONE autocommitted statement (:func:`_postgres_guarded_write`); on SQLite one
  ``BEGIN IMMEDIATE`` transaction;
- **read back from memory**: ``get_trial`` of such a trial answers the copy this process
  keeps of it (every write to it went through here) instead of five queries;
- **a database restart waited out while a trial trains** (:attr:`WorkerStorage.outage_retry`):
  its set-up, reports, attributes and its pruner's reads are retried (each is a read or an
  idempotent write: upserts, and parameters inserted ``ON CONFLICT DO NOTHING``), so a
  few seconds without the database never fail hours of training.

Anything else (enqueued and retry trials popped from WAITING, templates, other processes'
trials, every read of the study) is Optuna's code, unchanged. Written on SQLAlchemy Core
against Optuna's own table definitions (``optuna.storages._rdb.models``; Optuna is pinned to
5.x and tests/integration/test_worker_storage.py checks the rows equal Optuna's).
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import optuna
from optuna.distributions import (
    BaseDistribution,
    check_distribution_compatibility,
    distribution_to_json,
    json_to_distribution,
)
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import Connection, Executable, Table, TextClause, bindparam, func, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import sqlite

from service import errors, queue
from service.models import TrialLease
from service.states import LeaseState

_TRIALS: Table = models.TrialModel.__table__
_STUDIES: Table = models.StudyModel.__table__
_PARAMS: Table = models.TrialParamModel.__table__
_VALUES: Table = models.TrialValueModel.__table__
_USER_ATTRS: Table = models.TrialUserAttributeModel.__table__
_SYSTEM_ATTRS: Table = models.TrialSystemAttributeModel.__table__
_INTERMEDIATE: Table = models.TrialIntermediateValueModel.__table__
_LEASES = TrialLease.__tablename__

#: Finished trials kept after their tell (``Study.tell`` reads the trial back once).
_FINISHED_KEPT = 4

# Statements built once, with bound parameters: building a statement and computing its
# cache key cost more client CPU than running it (a profile of one worker).
_LOCK_STUDY = select(_STUDIES.c.study_id).where(_STUDIES.c.study_id == bindparam("study_id"))
_INSERT_TRIAL = (
    _TRIALS.insert()
    .values(
        # Optuna numbers a trial by counting the study's earlier trials.
        number=select(func.count())
        .select_from(_TRIALS)
        .where(_TRIALS.c.study_id == bindparam("of_study"))
        .scalar_subquery(),
        study_id=bindparam("of_study"),
        state=TrialState.RUNNING,
        datetime_start=bindparam("now"),
    )
    .returning(_TRIALS.c.trial_id, _TRIALS.c.number)
)
_STATE = select(_TRIALS.c.state).where(_TRIALS.c.trial_id == bindparam("trial_id"))
_SET_STATE = (
    _TRIALS.update()
    .where(_TRIALS.c.trial_id == bindparam("finished_id"))
    .values(state=bindparam("new_state"), datetime_complete=bindparam("completed"))
)
_INSERT_VALUES = _VALUES.insert()
_STORED_DISTRIBUTION = (
    select(_PARAMS.c.distribution_json)
    .join(_TRIALS, _TRIALS.c.trial_id == _PARAMS.c.trial_id)
    .where(_TRIALS.c.study_id == bindparam("study_id"), _PARAMS.c.param_name == bindparam("name"))
    .limit(1)
)


@functools.cache
def _postgres_create_statements(attach: bool) -> tuple[TextClause, TextClause]:
    """PostgreSQL: the two statements that create a fresh trial, run in one transaction.
    With psycopg 3 it is sent as one pipeline (BEGIN, these, COMMIT: one network round
    trip where the transaction took five; a worker's CPU per trial goes to round trips more
    than to rows, BENCHMARKS.md "Scaling"). First Optuna's lock on the study row (it yields
    the study, or nothing if there is none); then, in a statement of its own so that its
    snapshot sees every earlier lock holder's trial (PostgreSQL takes a statement's snapshot
    before the locks it waits for), the INSERT numbered by a count of the study's trials.
    With ``attach``: the lease row is locked while RUNNING, the trial is inserted only if it
    was, and the lease names it, in that one statement; it yields the trial's id and
    number, or nothing (the lease was lost: nothing was created)."""
    state_type = _TRIALS.c.state.type.name  # type: ignore[attr-defined]
    running = f"CAST('{TrialState.RUNNING.name}' AS {state_type})"
    study = f"CAST(:study_id AS {_STUDIES.c.study_id.type.compile()})"
    lock = f"SELECT study_id FROM {_STUDIES.name} WHERE study_id = {study} FOR UPDATE"
    insert = (
        f"INSERT INTO {_TRIALS.name} (number, study_id, state, datetime_start) "
        f"SELECT (SELECT count(*) FROM {_TRIALS.name} WHERE study_id = {study}), "
        f"s.study_id, {running}, :now FROM {_STUDIES.name} AS s"
    )
    if not attach:
        create = f"{insert} WHERE s.study_id = {study} RETURNING trial_id, number"
        return text(lock), text(create)
    create = (
        f"WITH lease AS (SELECT id FROM {_LEASES} WHERE id = :lease_id "
        f"AND state = '{LeaseState.RUNNING.value}' FOR UPDATE), "
        f"t AS ({insert}, lease WHERE s.study_id = {study} RETURNING trial_id, number), "
        f"attached AS (UPDATE {_LEASES} SET optuna_trial_id = t.trial_id, "
        f"trial_number = t.number FROM t WHERE {_LEASES}.id = :lease_id) "
        "SELECT trial_id, number FROM t"
    )
    return text(lock), text(create)


#: SQLite's upserts (inside a transaction that checked the trial is RUNNING).
_SQLITE_UPSERT_REPORT = (_report := sqlite.insert(_INTERMEDIATE)).on_conflict_do_update(
    index_elements=[_INTERMEDIATE.c.trial_id, _INTERMEDIATE.c.step],
    set_={
        "intermediate_value": _report.excluded.intermediate_value,
        "intermediate_value_type": _report.excluded.intermediate_value_type,
    },
)


def _sqlite_upsert_attrs(table: Table, rows: list[dict[str, Any]]) -> Executable:
    insert = sqlite.insert(table).values(rows)
    upsert: Executable = insert.on_conflict_do_update(
        index_elements=[table.c.trial_id, table.c.key],
        set_={"value_json": insert.excluded.value_json},
    )
    return upsert


@dataclass(frozen=True)
class _Write:
    """What a guarded write adds to the held set-up: one report (step, stored value, kind),
    the values (stored value, kind per objective), the new state and completion time."""

    report: tuple[int, float | None, Any] | None = None
    finish: tuple[TrialState, datetime | None] | None = None
    values: tuple[tuple[float | None, Any], ...] = ()


@dataclass(frozen=True)
class _Shape:
    """What one guarded write holds: row counts per table, a report, a new state."""

    params: int
    user_attrs: int
    system_attrs: int
    values: int
    report: bool
    finish: bool


@functools.lru_cache(maxsize=64)
def _postgres_guarded_write(shape: _Shape) -> TextClause:
    """PostgreSQL: a write of one trial as ONE statement, committed as it ends: a CTE ``t``
    yields the trial only while it is RUNNING (and, to finish it, sets its state: the
    check and the row lock in the UPDATE), and every insert takes its rows joined to ``t``,
    so nothing is written to a trial that is not running. One round trip instead of a
    transaction's four to six (BEGIN, the check, each insert, COMMIT): the database
    server's CPU per trial goes to messages more than to rows (pg_stat_statements: the
    statements themselves are ~1.5 of its ~6 ms per trial). Data-modifying CTEs:
    PostgreSQL's docs, "WITH Queries", 7.8.4. Parameters are named by table and row
    (``p0_name``, ``u0_key``, ...); enum and float columns are cast, as a parameter in a
    VALUES list has no type of its own."""

    def rows(prefix: str, n: int, columns: Sequence[str]) -> str:
        row = "(" + ", ".join(columns) + ")"
        return ", ".join(row.format(p=f"{prefix}{i}") for i in range(n))

    running = f"trial_id = :trial_id AND state = '{TrialState.RUNNING.name}'"
    if shape.finish:
        state_type = _TRIALS.c.state.type.name  # type: ignore[attr-defined]
        ctes = [
            f"t AS (UPDATE {_TRIALS.name} SET state = CAST(:state AS {state_type}), "
            f"datetime_complete = :completed WHERE {running} RETURNING trial_id)"
        ]
    else:
        ctes = [f"t AS (SELECT trial_id FROM {_TRIALS.name} WHERE {running})"]

    def insert(
        cte: str, table: Table, prefix: str, n: int, row: dict[str, str], *, tail: str = ""
    ) -> None:
        """``cte``: insert ``n`` rows of ``row`` (column -> SQL of a value) joined to ``t``."""
        columns = ", ".join(row)
        ctes.append(
            f"{cte} AS (INSERT INTO {table.name} (trial_id, {columns}) SELECT t.trial_id, v.* "
            f"FROM t, (VALUES {rows(prefix, n, list(row.values()))}) AS v ({columns}){tail})"
        )

    float_ = "CAST(:{p}_value AS DOUBLE PRECISION)"
    if shape.params:
        row = {"param_name": ":{p}_name", "param_value": float_, "distribution_json": ":{p}_dist"}
        # DO NOTHING: a write retried after a lost reply finds its parameters stored.
        insert("w_params", _PARAMS, "p", shape.params, row, tail=" ON CONFLICT DO NOTHING")
    upsert_json = " ON CONFLICT (trial_id, key) DO UPDATE SET value_json = excluded.value_json"
    for name, table, n in (
        ("u", _USER_ATTRS, shape.user_attrs),
        ("s", _SYSTEM_ATTRS, shape.system_attrs),
    ):
        if n:
            row = {"key": ":{p}_key", "value_json": ":{p}_json"}
            insert(f"w_{name}", table, name, n, row, tail=upsert_json)
    if shape.values:
        value_type = _VALUES.c.value_type.type.name  # type: ignore[attr-defined]
        row = {
            "objective": ":{p}_objective",
            "value": float_,
            "value_type": f"CAST(:{{p}}_type AS {value_type})",
        }
        insert("w_values", _VALUES, "v", shape.values, row)
    if shape.report:
        kind = _INTERMEDIATE.c.intermediate_value_type.type.name  # type: ignore[attr-defined]
        ctes.append(
            f"w_report AS (INSERT INTO {_INTERMEDIATE.name} (trial_id, step, intermediate_value, "
            f"intermediate_value_type) SELECT t.trial_id, :r_step, "
            f"CAST(:r_value AS DOUBLE PRECISION), CAST(:r_type AS {kind}) FROM t "
            "ON CONFLICT (trial_id, step) DO UPDATE SET "
            "intermediate_value = excluded.intermediate_value, "
            "intermediate_value_type = excluded.intermediate_value_type)"
        )
    return text("WITH " + ",\n".join(ctes) + "\nSELECT trial_id FROM t")


@dataclass
class _OwnTrial:
    """A trial this process created: its full state, and the writes not yet stored."""

    study_id: int
    frozen: FrozenTrial
    params: list[dict[str, Any]] = field(default_factory=list)
    user_attrs: dict[str, Any] = field(default_factory=dict)
    system_attrs: dict[str, Any] = field(default_factory=dict)
    #: False once its set-up was published: later writes go straight to the database.
    holding: bool = True

    @property
    def pending(self) -> bool:
        return bool(self.params or self.user_attrs or self.system_attrs)


_T = TypeVar("_T")
#: Runs one storage call, retrying it while the database is away (``Worker._db``).
OutageRetry = Callable[[str, Callable[[], Any]], Any]


def _outage_retried(what: str) -> Callable[[Callable[..., _T]], Callable[..., _T]]:
    """The method run through :attr:`WorkerStorage.outage_retry` when one is set (while a
    trial trains), named ``what`` in its log lines. Only for reads and idempotent writes: a
    retry after a lost reply must find the first attempt's rows harmless. The calls it
    makes are not retried again on their own (the whole call is the unit), so a long
    outage is waited for once."""

    def decorate(method: Callable[..., _T]) -> Callable[..., _T]:
        @functools.wraps(method)
        def retried(self: WorkerStorage, *args: Any, **kwargs: Any) -> _T:
            retry = self.outage_retry
            if retry is None:
                return method(self, *args, **kwargs)
            self.outage_retry = None
            try:
                result: _T = retry(what, lambda: method(self, *args, **kwargs))
                return result
            finally:
                self.outage_retry = retry

        return retried

    return decorate


class WorkerStorage(optuna.storages.RDBStorage):
    """``RDBStorage`` with the trials this process creates written in few transactions and
    read back from memory (see the module docstring). Single-threaded use per process, as a
    worker's trial loop is; the methods keep Optuna's signatures, return values and errors
    (``KeyError`` for an unknown study, ``UpdateFinishedTrialError`` for a finished trial).
    """

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._own: dict[int, _OwnTrial] = {}
        #: A study's distribution of each parameter name (Optuna refuses incompatible ones).
        self._distributions: dict[tuple[int, str], BaseDistribution] = {}
        self._postgres = self.engine.dialect.name == "postgresql"
        #: SQL text of the creating statements for psycopg's pipeline (``_psycopg_sql``).
        self._compiled: dict[TextClause, str] = {}
        #: The lease (``trial_leases.id``) the next fresh trial is created attached to, in
        #: the transaction that creates it, so that no trial a worker creates is ever
        #: RUNNING without a lease; a lease no longer running creates nothing and raises
        #: ``LeaseLost``. None: created unattached (as Optuna creates them).
        self.lease_id: int | None = None
        #: The id of the last trial created attached to :attr:`lease_id`.
        self.attached_trial_id: int | None = None
        #: Set by the worker while a trial trains: its reports, attributes and the
        #: pruner's reads wait out a database restart instead of failing the trial (the
        #: ask and the tell have their own checked retries). None: errors propagate.
        self.outage_retry: OutageRetry | None = None

    # --- creation -------------------------------------------------------------------------

    def _create_new_trial(
        self, study_id: int, template_trial: FrozenTrial | None = None
    ) -> FrozenTrial:
        if template_trial is not None:  # enqueue / retry copies: Optuna's own code
            created = super()._create_new_trial(study_id, template_trial)
            self._forget_reused(created._trial_id)
            return created
        now = datetime.now()  # naive local time, as Optuna stores it
        create = self._postgres_create if self._postgres else self._sqlite_create
        trial_id, number = create(study_id, now)
        if self.lease_id is not None:
            self.attached_trial_id = trial_id
        frozen = FrozenTrial(
            number=number,
            state=TrialState.RUNNING,
            value=None,
            values=None,
            datetime_start=now,
            datetime_complete=None,
            params={},
            distributions={},
            user_attrs={},
            system_attrs={},
            intermediate_values={},
            trial_id=trial_id,
        )
        self._forget_finished()
        self._own[trial_id] = _OwnTrial(study_id, frozen)
        return _copy_trial(frozen)

    def _sqlite_create(self, study_id: int, now: datetime) -> tuple[int, int]:
        """One transaction (``BEGIN IMMEDIATE``: the INSERT's count runs under the
        database's write lock): the study check, the INSERT, the attachment."""
        with self.engine.begin() as conn:
            if conn.execute(_LOCK_STUDY, {"study_id": study_id}).first() is None:
                raise _no_study(study_id)
            trial_id, number = conn.execute(_INSERT_TRIAL, {"of_study": study_id, "now": now}).one()
            if self.lease_id is not None:  # LeaseLost rolls the creation back
                queue.attach_trial_on(
                    conn, self.lease_id, optuna_trial_id=trial_id, trial_number=number
                )
        return trial_id, number

    def _postgres_create(self, study_id: int, now: datetime) -> tuple[int, int]:
        """:func:`_postgres_create_statements` in one transaction: pipelined with psycopg 3
        (the driver the ``postgres`` extra installs), else an ordinary one."""
        lock, create = _postgres_create_statements(self.lease_id is not None)
        bound = {"study_id": study_id, "now": now, "lease_id": self.lease_id}
        if self.engine.dialect.driver == "psycopg":
            found, row = self._pipelined(lock, create, bound)
        else:  # another DBAPI driver (psycopg2, pg8000): the same statements, more trips
            with self.engine.begin() as conn:
                found = conn.execute(lock, bound).first() is not None
                row = conn.execute(create, bound).first() if found else None
        if not found:
            raise _no_study(study_id)
        if row is None:  # the study exists, so the lease was not running: nothing created
            raise errors.LeaseLost()
        return int(row[0]), int(row[1])

    def _pipelined(
        self, lock: TextClause, create: TextClause, bound: dict[str, Any]
    ) -> tuple[bool, Any]:
        """BEGIN, ``lock``, ``create``, COMMIT as one psycopg pipeline on a pooled
        connection: the server runs them in order, the client waits once. Returns whether
        ``lock`` found a row, and ``create``'s row. Errors are SQLAlchemy's, as from any
        other statement; a failed transaction is rolled back, a broken connection dropped."""
        import psycopg  # the `postgres` extra: only a PostgreSQL worker gets here

        statements = [self._psycopg_sql(clause) for clause in (lock, create)]
        try:
            pooled = self.engine.raw_connection()
        except psycopg.Error as error:
            # The pool hands back the driver's own error (``Engine.connect`` would wrap it):
            # a refused connection must read as SQLAlchemy's OperationalError, which the
            # worker retries, not as a study that cannot run.
            raise sa_exc.DBAPIError.instance(
                None, None, error, psycopg.Error, connection_invalidated=True
            ) from error
        try:
            pg = pooled.driver_connection
            assert isinstance(pg, psycopg.Connection)
            pg.autocommit = True  # BEGIN and COMMIT are ours, inside the pipeline
            try:
                with pg.pipeline():
                    pg.execute("BEGIN")
                    locked, created = [pg.execute(sql, bound) for sql in statements]
                    pg.execute("COMMIT")
            except psycopg.Error as error:
                if isinstance(error, psycopg.OperationalError) or pg.closed:
                    pooled.invalidate(error)  # a connection that failed is not pooled again
                else:
                    try:
                        pg.execute("ROLLBACK")
                    except psycopg.Error:
                        pooled.invalidate(error)
                raise sa_exc.DBAPIError.instance(
                    statements[1],
                    bound,
                    error,
                    psycopg.Error,
                    connection_invalidated=pg.closed,
                ) from error
            finally:
                if not pg.closed:
                    pg.autocommit = False
            return locked.fetchone() is not None, created.fetchone()
        finally:
            pooled.close()

    def _psycopg_sql(self, clause: TextClause) -> str:
        """``clause`` compiled once for this engine's dialect (``%(name)s`` placeholders,
        its bind names the keys of the parameters): not again for every trial."""
        sql = self._compiled.get(clause)
        if sql is None:
            sql = self._compiled[clause] = str(clause.compile(dialect=self.engine.dialect))
        return sql

    def _forget_reused(self, trial_id: int) -> None:
        """Drop this process's finished copy of ``trial_id`` when that id now names
        another trial: SQLite gives a deleted trial's id to the next new one, and the copy
        would read back as finished (an enqueued trial's tell then failed)."""
        stale = self._own.get(trial_id)
        if stale is not None and stale.frozen.state.is_finished():
            del self._own[trial_id]

    def _forget_finished(self) -> None:
        finished = [tid for tid, own in self._own.items() if own.frozen.state.is_finished()]
        for trial_id in finished[:-_FINISHED_KEPT] if len(finished) > _FINISHED_KEPT else ():
            del self._own[trial_id]

    # --- reads ----------------------------------------------------------------------------

    # What a training trial reads through Optuna's code (its pruner's look at the study's
    # other trials): waited out as its reports are, see ``outage_retry``.
    _get_trials = _outage_retried("read the study's trials")(optuna.storages.RDBStorage._get_trials)
    _get_best_trial_id = _outage_retried("read the best trial")(
        optuna.storages.RDBStorage._get_best_trial_id
    )
    get_study_directions = _outage_retried("read the study")(
        optuna.storages.RDBStorage.get_study_directions
    )
    get_study_user_attrs = _outage_retried("read the study")(
        optuna.storages.RDBStorage.get_study_user_attrs
    )
    get_study_system_attrs = _outage_retried("read the study")(
        optuna.storages.RDBStorage.get_study_system_attrs
    )
    get_trial_id_from_study_id_trial_number = _outage_retried("read the study's trials")(
        optuna.storages.RDBStorage.get_trial_id_from_study_id_trial_number
    )

    @_outage_retried("read the trial")
    def get_trial(self, trial_id: int) -> FrozenTrial:
        own = self._own.get(trial_id)
        if own is not None:
            return _copy_trial(own.frozen)
        return super().get_trial(trial_id)

    # --- writes held until the set-up is published ------------------------------------------

    @_outage_retried("record a parameter")
    def _set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: BaseDistribution,
        previous_distribution: BaseDistribution | None,
    ) -> None:
        own = self._running(trial_id)
        if own is None or not own.holding:
            super()._set_trial_param(
                trial_id, param_name, param_value_internal, distribution, previous_distribution
            )
            if own is not None:
                own.frozen.params[param_name] = distribution.to_external_repr(param_value_internal)
                own.frozen.distributions[param_name] = distribution
            return
        key = (own.study_id, param_name)
        previous = previous_distribution or self._distributions.get(key)
        if previous is None:
            previous = self._stored_distribution(own.study_id, param_name)
        if previous is not None:
            check_distribution_compatibility(previous, distribution)
        self._distributions.setdefault(key, previous or distribution)
        own.params.append(
            {
                "trial_id": trial_id,
                "param_name": param_name,
                "param_value": param_value_internal,
                "distribution_json": distribution_to_json(distribution),
            }
        )
        own.frozen.params[param_name] = distribution.to_external_repr(param_value_internal)
        own.frozen.distributions[param_name] = distribution

    def _stored_distribution(self, study_id: int, param_name: str) -> BaseDistribution | None:
        """The distribution an earlier trial of the study stored for ``param_name`` (what
        Optuna checks a new one against), or None."""
        with self.engine.connect() as conn:
            found = conn.execute(
                _STORED_DISTRIBUTION, {"study_id": study_id, "name": param_name}
            ).scalar()
        return None if found is None else json_to_distribution(found)

    @_outage_retried("record an attribute")
    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._set_attr(trial_id, key, value, system=False)

    @_outage_retried("record an attribute")
    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._set_attr(trial_id, key, value, system=True)

    def _set_attr(self, trial_id: int, key: str, value: Any, *, system: bool) -> None:
        own = self._running(trial_id)
        if own is None or not own.holding:
            if system:
                super().set_trial_system_attr(trial_id, key, value)
            else:
                super().set_trial_user_attr(trial_id, key, value)
        else:
            json.dumps(value)  # fail here, as Optuna would, on what JSON cannot hold
            (own.system_attrs if system else own.user_attrs)[key] = value
        if own is not None:
            (own.frozen.system_attrs if system else own.frozen.user_attrs)[key] = value

    @_outage_retried("publish the set-up")
    def publish_setup(self, trial_id: int) -> None:
        """Store what was held for ``trial_id`` at once; later writes to it go straight to
        the database. A no-op for a trial this process does not hold.

        Raises ``UpdateFinishedTrialError`` when the trial was finished meanwhile (the
        reaper), as Optuna's own write would."""
        own = self._own.get(trial_id)
        if own is None or not own.holding:
            return
        if own.pending:
            self._guarded_write(own)
        own.holding = False

    # --- writes that publish first ----------------------------------------------------------

    @_outage_retried("report")
    def set_trial_intermediate_value(
        self, trial_id: int, step: int, intermediate_value: float
    ) -> None:
        own = self._running(trial_id)
        if own is None:
            super().set_trial_intermediate_value(trial_id, step, intermediate_value)
            return
        stored, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(
            intermediate_value
        )
        self._guarded_write(own, _Write(report=(step, stored, kind)))
        own.holding = False
        own.frozen.intermediate_values[step] = intermediate_value

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        if state == TrialState.RUNNING:  # a WAITING trial popped (Optuna's code)
            self._forget_reused(trial_id)
        own = self._own.get(trial_id)
        if own is None or own.frozen.state.is_finished() or state == TrialState.RUNNING:
            return super().set_trial_state_values(trial_id, state, values)
        now = datetime.now()
        stored = tuple(models.TrialValueModel.value_to_stored_repr(v) for v in values or ())
        completed = now if state.is_finished() else None
        self._guarded_write(own, _Write(finish=(state, completed), values=stored))
        own.holding = False
        own.frozen.state = state
        if values is not None:
            own.frozen.values = list(values)
        if state.is_finished():
            own.frozen.datetime_complete = now
        return True

    # --- the write ----------------------------------------------------------------------------

    def _guarded_write(self, own: _OwnTrial, write: _Write = _Write()) -> None:
        """Store what is held for ``own`` and ``write``, all or nothing, and only while the
        trial is RUNNING (with ``write.finish``: under its row lock). Otherwise nothing is
        written and ``_check_running`` raises (``KeyError``, or Optuna's
        ``UpdateFinishedTrialError``)."""
        store = self._postgres_write if self._postgres else self._sqlite_write
        if not store(own, write):
            with self.engine.connect() as conn:
                self._check_running(conn, own)
            raise _finished(own)  # not reached: it was not RUNNING, and never is again
        own.params, own.user_attrs, own.system_attrs = [], {}, {}

    def _postgres_write(self, own: _OwnTrial, write: _Write) -> bool:
        """One statement (:func:`_postgres_guarded_write`), autocommitted; True if the
        trial was RUNNING (and so everything was written)."""
        shape = _Shape(
            params=len(own.params),
            user_attrs=len(own.user_attrs),
            system_attrs=len(own.system_attrs),
            values=len(write.values),
            report=write.report is not None,
            finish=write.finish is not None,
        )
        bound: dict[str, Any] = {"trial_id": own.frozen._trial_id}
        for i, param in enumerate(own.params):
            bound[f"p{i}_name"] = param["param_name"]
            bound[f"p{i}_value"] = param["param_value"]
            bound[f"p{i}_dist"] = param["distribution_json"]
        for prefix, attrs in (("u", own.user_attrs), ("s", own.system_attrs)):
            for i, (key, value) in enumerate(attrs.items()):
                bound[f"{prefix}{i}_key"] = key
                bound[f"{prefix}{i}_json"] = json.dumps(value)
        for i, (value, kind) in enumerate(write.values):
            bound[f"v{i}_objective"] = i
            bound[f"v{i}_value"] = value
            bound[f"v{i}_type"] = kind.name
        if write.report is not None:
            bound["r_step"], bound["r_value"], kind = write.report
            bound["r_type"] = kind.name
        if write.finish is not None:
            bound["state"], bound["completed"] = write.finish[0].name, write.finish[1]
        autocommit = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        with autocommit as conn:
            return conn.execute(_postgres_guarded_write(shape), bound).first() is not None

    def _sqlite_write(self, own: _OwnTrial, write: _Write) -> bool:
        """One transaction (``BEGIN IMMEDIATE``: the database's write lock from the
        start): the state check, then each table's rows; True if the trial was RUNNING."""
        trial_id = own.frozen._trial_id
        with self.engine.begin() as conn:
            if conn.execute(_STATE, {"trial_id": trial_id}).scalar() != TrialState.RUNNING:
                return False
            if own.params:
                conn.execute(_PARAMS.insert().prefix_with("OR IGNORE").values(own.params))
            for table, attrs in ((_USER_ATTRS, own.user_attrs), (_SYSTEM_ATTRS, own.system_attrs)):
                if attrs:
                    rows = [
                        {"trial_id": trial_id, "key": k, "value_json": json.dumps(v)}
                        for k, v in attrs.items()
                    ]
                    conn.execute(_sqlite_upsert_attrs(table, rows))
            if write.report is not None:
                step, value, kind = write.report
                conn.execute(
                    _SQLITE_UPSERT_REPORT,
                    {
                        "trial_id": trial_id,
                        "step": step,
                        "intermediate_value": value,
                        "intermediate_value_type": kind,
                    },
                )
            if write.values:
                conn.execute(
                    _INSERT_VALUES,
                    [
                        {"trial_id": trial_id, "objective": i, "value": v, "value_type": kind}
                        for i, (v, kind) in enumerate(write.values)
                    ],
                )
            if write.finish is not None:
                state, completed = write.finish
                conn.execute(
                    _SET_STATE,
                    {"finished_id": trial_id, "new_state": state, "completed": completed},
                )
        return True

    # --- helpers ----------------------------------------------------------------------------

    def _running(self, trial_id: int) -> _OwnTrial | None:
        """The own trial ``trial_id`` if it is still running here; raises
        ``UpdateFinishedTrialError`` for one this process finished (Optuna's check)."""
        own = self._own.get(trial_id)
        if own is not None and own.frozen.state.is_finished():
            raise _finished(own)
        return own

    def _check_running(self, conn: Connection, own: _OwnTrial) -> None:
        """Check the trial is still RUNNING in the database, after a guarded write found it
        was not. A trial finished elsewhere (the reaper, the dashboard) is forgotten here,
        so that the caller's next read sees the stored trial, and Optuna's error (or
        ``KeyError`` for a deleted one) is raised."""
        trial_id = own.frozen._trial_id
        stored = conn.execute(_STATE, {"trial_id": trial_id}).scalar()
        if stored is None:
            self._own.pop(trial_id, None)
            raise KeyError(f"No trial with trial_id {trial_id} exists.")
        if stored != TrialState.RUNNING:
            self._own.pop(trial_id, None)
            raise _finished(own)


def _no_study(study_id: int) -> KeyError:
    return KeyError(f"No study with study_id {study_id} exists.")  # Optuna's error


def _finished(own: _OwnTrial) -> UpdateFinishedTrialError:
    # Optuna's message (BaseStorage.check_trial_is_updatable), built without reading the
    # trial: on SQLite a read here would wait for the write lock this transaction holds.
    return UpdateFinishedTrialError(
        f"Trial#{own.frozen.number} has already finished and can not be updated."
    )


def _copy_trial(trial: FrozenTrial) -> FrozenTrial:
    """A copy whose dicts the caller may change (``optuna.Trial`` adds to them as it
    writes); the values themselves are shared, as nothing changes them in place. A
    ``deepcopy`` of a trial holding its config cost ~0.3 ms, five times per trial."""
    copied = copy.copy(trial)
    copied.params = dict(trial.params)
    copied.distributions = dict(trial.distributions)
    copied.user_attrs = dict(trial.user_attrs)
    copied.system_attrs = dict(trial.system_attrs)
    copied.intermediate_values = dict(trial.intermediate_values)
    return copied
