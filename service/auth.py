"""Principals and API tokens: who is calling, and what they may see.

A *principal* is the name of an API token; the studies it submits are its own. Admin
principals see and act on every study. Tokens are ``lhpo_`` + 43 URL-safe characters
(32 random bytes, :func:`secrets.token_urlsafe`); only their SHA-256 is stored, and a
presented token is compared with :func:`hmac.compare_digest`. A fast hash is right here:
a 256-bit random secret cannot be brute-forced, so a slow password hash would only make
every request slower (as GitHub and PyPI do for their API tokens).

*Open mode*: until the first token is created, a server bound to a loopback address serves
one local user without authentication (:data:`LOCAL`); a server on any other address
refuses to start (:func:`check_bind`). Once a token was ever created, authentication is on,
even after every token is revoked (revoked tokens keep their rows).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import weakref
from dataclasses import dataclass
from datetime import datetime, timedelta

from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from service import errors
from service.db import session_scope
from service.models import ApiToken, utcnow

TOKEN_PREFIX = "lhpo_"
#: How stale ``last_used_at`` may get before a request writes it again (one write per
#: token per minute, not one per request).
LAST_USED_RESOLUTION = timedelta(minutes=1)
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@")


@dataclass(frozen=True)
class Principal:
    """Who makes a request: the owner name of its studies, and whether it sees all."""

    name: str
    admin: bool = False

    @property
    def owner_filter(self) -> str | None:
        """The owner to filter studies by; None for an admin (every study)."""
        return None if self.admin else self.name


#: The one local user of a server in open mode (no token created yet); the owner of every
#: study submitted before authentication was turned on.
LOCAL = Principal("local", admin=True)


@dataclass(frozen=True)
class TokenInfo:
    """A token as ``lstm-hpo token list`` shows it (never the token itself)."""

    name: str
    admin: bool
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token, as stored."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_name(name: str) -> str:
    """A principal name: 1-100 letters, digits, ``._-@``; ``InvalidName`` otherwise."""
    if not 1 <= len(name) <= 100 or not set(name) <= _NAME_CHARS or name == LOCAL.name:
        raise errors.InvalidName(
            [
                errors.FieldError(
                    "name",
                    "must be 1-100 ASCII letters, digits, '.', '_', '-' or '@', and not 'local' "
                    "(the open-mode user)",
                )
            ]
        )
    return name


def create_token(sessions: sessionmaker[Session], name: str, *, admin: bool = False) -> str:
    """Create a token for principal ``name`` and return it; only its hash is stored.

    A principal may hold several tokens (rotate by creating a new one, then revoking).
    Raises ``InvalidName`` for a bad name.
    """
    check_name(name)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with session_scope(sessions) as session:
        session.add(ApiToken(name=name, token_hash=hash_token(token), admin=admin))
    return token


#: The shortest token an operator may supply (``LSTM_HPO_ADMIN_TOKEN``): 32 characters of
#: a random token carry well over 128 bits.
MIN_SUPPLIED_TOKEN_CHARS = 32
BOOTSTRAP_ADMIN = "admin"


def ensure_admin_token(sessions: sessionmaker[Session], token: str) -> bool:
    """Register an operator-supplied token (``LSTM_HPO_ADMIN_TOKEN``, e.g. from a
    Kubernetes Secret) as the admin principal ``admin``, unless it is already registered;
    True when it was added. A deployment can then start on a non-loopback address without
    a prior ``lstm-hpo token create``. Raises ``InvalidName`` for a token too short to be
    a secret. Revoking ``admin`` ends it for good (it is not registered again).
    """
    if len(token) < MIN_SUPPLIED_TOKEN_CHARS:
        raise errors.InvalidName(
            [
                errors.FieldError(
                    "LSTM_HPO_ADMIN_TOKEN",
                    f"must be at least {MIN_SUPPLIED_TOKEN_CHARS} characters of a random "
                    'secret (e.g. python3 -c "import secrets; print(secrets.token_urlsafe(32))")',
                )
            ]
        )
    digest = hash_token(token)
    with session_scope(sessions) as session:
        if session.scalars(select(ApiToken.id).where(ApiToken.token_hash == digest)).first():
            return False
        session.add(ApiToken(name=BOOTSTRAP_ADMIN, token_hash=digest, admin=True))
        return True


def list_tokens(sessions: sessionmaker[Session]) -> list[TokenInfo]:
    """Every token ever created, oldest first (hashes are never returned)."""
    with session_scope(sessions) as session:
        rows = session.scalars(select(ApiToken).order_by(ApiToken.id)).all()
        return [
            TokenInfo(row.name, row.admin, row.created_at, row.last_used_at, row.revoked_at)
            for row in rows
        ]


def revoke_tokens(sessions: sessionmaker[Session], name: str) -> int:
    """Revoke every live token of principal ``name``; returns how many were revoked."""
    with session_scope(sessions) as session:
        revoked = session.scalars(
            update(ApiToken)
            .where(ApiToken.name == name, ApiToken.revoked_at.is_(None))
            .values(revoked_at=utcnow())
            .returning(ApiToken.id)
            .execution_options(synchronize_session=False)
        ).all()
        return len(revoked)


#: Databases (by engine) known to have authentication on. "On" never becomes "off"
#: (token rows are never deleted), so it is read once per engine, not on every request.
_AUTHENTICATION_ON: weakref.WeakSet[Engine] = weakref.WeakSet()


def authentication_on(sessions: sessionmaker[Session]) -> bool:
    """True once any token was ever created (revoked ones count: see the module docstring)."""
    engine: Engine = sessions.kw["bind"]
    if engine in _AUTHENTICATION_ON:
        return True
    with session_scope(sessions) as session:
        on = bool(session.scalar(select(func.count()).select_from(ApiToken)))
    if on:
        _AUTHENTICATION_ON.add(engine)
    return on


def authenticate(sessions: sessionmaker[Session], token: str | None) -> Principal:
    """The principal a presented token belongs to.

    In open mode (no token ever created) anyone is :data:`LOCAL`. Raises ``Unauthorized``
    when authentication is on and the token is missing, unknown or revoked.
    """
    if not authentication_on(sessions):
        return LOCAL
    if not token:
        raise errors.Unauthorized()
    return _principal_of_hash(sessions, hash_token(token))


def _principal_of_hash(sessions: sessionmaker[Session], digest: str) -> Principal:
    now = utcnow()
    with session_scope(sessions) as session:
        row = session.scalars(select(ApiToken).where(ApiToken.token_hash == digest)).first()
        # The lookup is by hash of a 256-bit secret (its timing reveals nothing of a token);
        # the comparison itself is constant-time all the same.
        if row is None or not hmac.compare_digest(row.token_hash, digest):
            raise errors.Unauthorized()
        if row.revoked_at is not None:
            raise errors.Unauthorized("this token was revoked")
        if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
            row.last_used_at = now
        return Principal(row.name, admin=row.admin)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(sessions: sessionmaker[Session], host: str) -> bool:
    """Whether the server may start on ``host``; returns True when it runs in open mode.

    Raises ``OpenModeRefused`` for a non-loopback address while no token exists: anyone
    on the network could use (and delete) every study.
    """
    if authentication_on(sessions):
        return False
    if not is_loopback(host):
        raise errors.OpenModeRefused(
            f"refusing to serve on {host} without authentication: no API token exists. "
            "Create one first (lstm-hpo token create NAME --admin), or bind to 127.0.0.1."
        )
    return True


# --------------------------------------------------------------------------------------
# The dashboard's sign-in cookie

SESSION_COOKIE = "lstm_hpo_session"
#: How long a sign-in lasts (seconds): a working day.
SESSION_MAX_AGE_S = 12 * 3600


class SessionCookies:
    """Signed, timestamped session cookies (itsdangerous) holding a token's hash.

    The cookie never holds the token itself, and a revoked token ends its sessions at once
    (every request looks the hash up). Forging one needs both the server's secret key and
    a live token's hash.
    """

    def __init__(self, secret_key: str) -> None:
        self._serializer = URLSafeTimedSerializer(secret_key, salt="lstm-hpo-dashboard")

    def issue(self, sessions: sessionmaker[Session], token: str) -> tuple[Principal, str]:
        """Sign in with ``token``: its principal and the cookie value. ``Unauthorized`` if bad."""
        principal = authenticate(sessions, token)
        return principal, self._serializer.dumps(hash_token(token))

    def principal(self, sessions: sessionmaker[Session], cookie: str) -> Principal:
        """The principal of a session cookie; ``Unauthorized`` when it is forged, expired,
        or its token was revoked."""
        try:
            digest = self._serializer.loads(cookie, max_age=SESSION_MAX_AGE_S)
        except BadSignature:
            raise errors.Unauthorized(
                "sign in again (the session expired or is not valid)"
            ) from None
        if not isinstance(digest, str):
            raise errors.Unauthorized()
        return _principal_of_hash(sessions, digest)
