"""Principals and tokens over a real server (uvicorn on loopback), SQLite and PostgreSQL:
401 without a token, another principal's study is 404 on every route of the OpenAPI schema
and of the dashboard, admins see all, open mode only on loopback, the dashboard's sign-in
cookie, and the token commands."""

from __future__ import annotations

import base64
import re
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from service import auth
from service.api.app import create_app
from service.config import Settings
from service.db import make_engine, make_session_factory, session_scope
from service.errors import OpenModeRefused, Unauthorized
from service.models import ApiToken
from tests.acceptance.conftest import CLI
from tests.servers import InProcessServer, serve_in_thread

SPEC = {
    "name": "mine",
    "task": {"kind": "synthetic"},
    "space": {"num_layers": {"type": "int", "low": 1, "high": 3}, "max_epochs": 1},
    "study": {"n_trials": 2, "sampler": "random", "pruner": "none"},
}


@pytest.fixture
def server(tmp_path: Path, db_url: str) -> Iterator[InProcessServer]:
    with serve_in_thread(Settings(data_dir=tmp_path / "data", database_url=db_url)) as s:
        yield s


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _tokens(server: InProcessServer) -> dict[str, str]:
    sessions = server.backend.sessions
    return {
        "alice": auth.create_token(sessions, "alice"),
        "bob": auth.create_token(sessions, "bob"),
        "root": auth.create_token(sessions, "root", admin=True),
    }


def _submit(server: InProcessServer, token: str) -> dict[str, Any]:
    response = server.http.post("/v1/studies", json=SPEC, headers=_bearer(token))
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def test_every_v1_route_but_health_needs_a_token(server: InProcessServer) -> None:
    open_mode = server.http.get("/v1/studies")
    assert open_mode.status_code == 200  # no token yet: open for the local user
    tokens = _tokens(server)
    schema = server.http.get("/openapi.json").json()
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    for path, operations in schema["paths"].items():
        for method in operations:
            url = path.replace("{study_id}", "0123456789abcdef0123456789abcdef")
            response = server.http.request(method.upper(), url, json=SPEC)
            if path == "/v1/health":
                assert response.status_code == 200
                continue
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["WWW-Authenticate"] == "Bearer"
            bad = server.http.request(method.upper(), url, headers=_bearer("lhpo_nope"))
            assert bad.status_code == 401, (method, path)
    assert server.http.get("/v1/studies", headers=_bearer(tokens["alice"])).status_code == 200
    auth.revoke_tokens(server.backend.sessions, "alice")
    revoked = server.http.get("/v1/studies", headers=_bearer(tokens["alice"]))
    assert revoked.status_code == 401 and "revoked" in revoked.json()["detail"]


def test_another_principals_study_is_404_on_every_route(server: InProcessServer) -> None:
    tokens = _tokens(server)
    alices = _submit(server, tokens["alice"])
    bobs = _submit(server, tokens["bob"])
    schema = server.http.get("/openapi.json").json()
    walked = 0
    for path, operations in schema["paths"].items():
        if "{study_id}" not in path:
            continue
        for method in operations:
            for study_id in (alices["id"], "no-such-study"):
                response = server.http.request(
                    method.upper(),
                    path.replace("{study_id}", study_id),
                    headers=_bearer(tokens["bob"]),
                )
                assert response.status_code == 404, (method, path, response.text)
                # Exactly as for an id that does not exist: nothing tells them apart.
                assert response.json()["detail"] == "No study with that id."
            walked += 1
    assert walked >= 5
    listed = server.http.get("/v1/studies", headers=_bearer(tokens["bob"])).json()
    assert [s["id"] for s in listed["items"]] == [bobs["id"]]
    # Alice's study is untouched, and the admin sees and acts on both.
    mine = server.http.get(f"/v1/studies/{alices['id']}", headers=_bearer(tokens["alice"]))
    assert mine.status_code == 200 and mine.json()["state"] == "queued"
    every = server.http.get("/v1/studies", headers=_bearer(tokens["root"])).json()
    assert {s["id"] for s in every["items"]} == {alices["id"], bobs["id"]}
    cancel = server.http.post(f"/v1/studies/{alices['id']}/cancel", headers=_bearer(tokens["root"]))
    assert cancel.status_code == 200 and cancel.json()["state"] == "cancelled"


def test_an_idempotency_key_is_per_principal(server: InProcessServer) -> None:
    tokens = _tokens(server)
    key = {"Idempotency-Key": "nightly-1"}
    first = server.http.post(
        "/v1/studies", json=SPEC, headers=_bearer(tokens["alice"]) | key
    ).json()
    other = server.http.post("/v1/studies", json=SPEC, headers=_bearer(tokens["bob"]) | key)
    assert other.status_code == 201 and other.json()["id"] != first["id"]


def test_open_mode_is_loopback_only(tmp_path: Path, sqlite_url: str) -> None:
    settings = Settings(data_dir=tmp_path / "data", database_url=sqlite_url, host="0.0.0.0")
    with pytest.raises(OpenModeRefused, match="token create"):
        create_app(settings)
    result = subprocess.run(
        [*CLI, "serve", "--host", "0.0.0.0", "--workers", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "LSTM_HPO_DATA_DIR": str(tmp_path / "data"),
            "LSTM_HPO_DATABASE_URL": sqlite_url,
        },
    )
    message = " ".join(result.stderr.split())
    assert result.returncode == 1 and "lstm-hpo token create" in message, result.stderr
    assert "Traceback" not in result.stderr
    # Once a token exists, any address is allowed (authentication is on).
    auth.create_token(make_session_factory(make_engine(sqlite_url)), "ops", admin=True)
    app = create_app(settings)
    assert app.state.open_mode is False
    app.state.backend.sessions.kw["bind"].dispose()


def test_token_commands(tmp_path: Path, sqlite_url: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LSTM_HPO_DATA_DIR": str(tmp_path)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, "token", *args, "--database-url", sqlite_url],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env=env,
        )

    created = cli("create", "carol", "--admin")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"lhpo_[A-Za-z0-9_-]{43}", token), created.stdout
    sessions = make_session_factory(make_engine(sqlite_url))
    assert auth.authenticate(sessions, token) == auth.Principal("carol", admin=True)
    listed = cli("list")
    assert listed.returncode == 0 and "carol" in listed.stdout and token not in listed.stdout
    with session_scope(sessions) as session:  # only a hash is stored
        assert session.scalars(select(ApiToken.token_hash)).all() == [auth.hash_token(token)]
    assert cli("create", "bad name!").returncode == 2
    assert cli("revoke", "carol").returncode == 0
    assert cli("revoke", "carol").returncode == 1  # nothing left to revoke
    with pytest.raises(Unauthorized, match="revoked"):
        auth.authenticate(sessions, token)


# ---------------------------------------------------------------------------------------
# The dashboard behind the same door


def _optuna_id(study: dict[str, Any]) -> int:
    return int(study["dashboard_url"].rsplit("/", 1)[1])


@contextmanager
def _signed_in(server: InProcessServer, token: str) -> Iterator[httpx.Client]:
    """A browser-like client signed in through the sign-in page (it keeps the cookie)."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.post(
            "/signin", data={"token": token, "next": "/dashboard"}, follow_redirects=False
        )
        assert response.status_code == 303 and response.headers["location"] == "/dashboard"
        cookie = response.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        yield client


def test_dashboard_needs_a_principal_and_shows_only_its_studies(
    server: InProcessServer,
) -> None:
    tokens = _tokens(server)
    alices, bobs = _submit(server, tokens["alice"]), _submit(server, tokens["bob"])
    anonymous = server.http
    page = anonymous.get("/dashboard/studies/1", follow_redirects=False)
    assert page.status_code == 303
    assert page.headers["location"] == "/signin?next=%2Fdashboard%2Fstudies%2F1"
    for path in ("/api/studies", "/api/meta", f"/api/studies/{_optuna_id(alices)}", "/csv/1"):
        assert anonymous.get(path).status_code == 401, path
    assert anonymous.get("/signin").status_code == 200
    wrong = anonymous.post("/signin", data={"token": "lhpo_wrong", "next": "/dashboard"})
    assert wrong.status_code == 401 and "Not signed in" in wrong.text

    with _signed_in(server, tokens["bob"]) as bob:
        listed = bob.get("/api/studies").json()["study_summaries"]
        assert [s["study_name"] for s in listed] == [bobs["optuna_study_name"]]
        assert bob.get(f"/api/studies/{_optuna_id(bobs)}").status_code == 200
        for path in (
            f"/api/studies/{_optuna_id(alices)}",
            f"/api/studies/{_optuna_id(alices)}/param_importances",
            f"/csv/{_optuna_id(alices)}",
            f"/dashboard/studies/{_optuna_id(alices)}",
        ):
            assert bob.get(path).status_code == 404, path
        gone = bob.delete(f"/api/studies/{_optuna_id(alices)}", headers={"Origin": server.url})
        assert gone.status_code == 404
        # A cross-site form posting with the cookie is refused before anything else.
        forged = bob.delete(
            f"/api/studies/{_optuna_id(bobs)}", headers={"Origin": "https://evil.example"}
        )
        assert forged.status_code == 403 and "cross-site" in forged.json()["reason"]
        assert bob.get(f"/v1/studies/{bobs['id']}").status_code == 401  # /v1 is Bearer only
    # Scripts: HTTP basic with the token as the password.
    basic = base64.b64encode(f"alice:{tokens['alice']}".encode()).decode()
    listed = anonymous.get("/api/studies", headers={"Authorization": f"Basic {basic}"})
    assert [s["study_name"] for s in listed.json()["study_summaries"]] == [
        alices["optuna_study_name"]
    ]
    with _signed_in(server, tokens["root"]) as root:
        names = {s["study_name"] for s in root.get("/api/studies").json()["study_summaries"]}
        assert names == {alices["optuna_study_name"], bobs["optuna_study_name"]}
    # HEAD is filtered too (its Content-Length would tell the size of everyone's list).
    with _signed_in(server, tokens["bob"]) as bob:
        head = bob.head("/api/studies")
        assert head.status_code == 200
        assert int(head.headers["content-length"]) == len(bob.get("/api/studies").content)


def test_slashes_do_not_get_past_the_dashboards_refusals(server: InProcessServer) -> None:
    """optuna-dashboard ignores repeated and trailing slashes; so does the guard."""
    tokens = _tokens(server)
    bearer = _bearer(tokens["bob"])
    study = _submit(server, tokens["bob"])
    oid = _optuna_id(study)
    for path in ("/api/studies//", "/api/studies/", f"/api/studies/{oid}/rename/"):
        response = server.http.post(path, json={"study_name": "x"}, headers=bearer)
        assert response.status_code == 403, (path, response.text)
    assert server.http.post("/incompatible-rdb-schema//", headers=bearer).status_code == 403
    gone = server.http.delete(f"/api/studies/{oid}//", headers=bearer)
    assert gone.status_code == 204
    # Through the service: both records are gone, not just Optuna's.
    assert server.http.get(f"/v1/studies/{study['id']}", headers=bearer).status_code == 404


def test_the_session_cookie_is_secure_behind_https(tmp_path: Path, sqlite_url: str) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=sqlite_url,
        public_url="https://hpo.example.com",
    )
    with serve_in_thread(settings) as server:
        token = auth.create_token(server.backend.sessions, "dana")
        response = server.http.post("/signin", data={"token": token}, follow_redirects=False)
        assert "secure" in response.headers["set-cookie"].lower()
        # `next` never leads off the server.
        evil = server.http.post(
            "/signin", data={"token": token, "next": "//evil.example/x"}, follow_redirects=False
        )
        assert evil.headers["location"] == "/dashboard"


def test_a_principal_over_its_active_studies_quota_gets_429(tmp_path: Path, db_url: str) -> None:
    settings = Settings(
        data_dir=tmp_path / "data", database_url=db_url, max_active_studies_per_principal=2
    )
    with serve_in_thread(settings) as server:
        tokens = _tokens(server)
        # Parallel submits cannot pass the quota (counted in the insert's transaction).
        with ThreadPoolExecutor(max_workers=6) as pool:
            racing = list(
                pool.map(
                    lambda _: (
                        server.http.post(
                            "/v1/studies", json=SPEC, headers=_bearer(tokens["root"])
                        ).status_code
                    ),
                    range(6),
                )
            )
        assert sorted(racing) == [201, 201, 429, 429, 429, 429], racing
        names = {
            s["study_name"]
            for s in server.http.get("/api/studies", headers=_bearer(tokens["root"])).json()[
                "study_summaries"
            ]
        }
        assert len(names) == 2  # a refused submit leaves no Optuna study behind
        first, _second = _submit(server, tokens["alice"]), _submit(server, tokens["alice"])
        over = server.http.post("/v1/studies", json=SPEC, headers=_bearer(tokens["alice"]))
        assert over.status_code == 429, over.text
        assert over.headers["Retry-After"] and "LSTM_HPO_MAX_ACTIVE_STUDIES" in over.text
        assert _submit(server, tokens["bob"])  # the quota is per principal
        cancel = server.http.post(
            f"/v1/studies/{first['id']}/cancel", headers=_bearer(tokens["alice"])
        )
        assert cancel.status_code == 200
        assert _submit(server, tokens["alice"])  # one ended: room again
        listed = server.http.get("/v1/studies", headers=_bearer(tokens["alice"])).json()
        assert listed["total"] == 3


def test_an_operator_supplied_admin_token_lets_a_server_bind_any_address(
    tmp_path: Path, sqlite_url: str
) -> None:
    """LSTM_HPO_ADMIN_TOKEN (docker-compose, a Kubernetes Secret): registered once at start."""
    supplied = "s" * 8 + "3cr3t-from-a-secret-store-0123456789"
    base = Settings(data_dir=tmp_path / "data", database_url=sqlite_url, host="0.0.0.0")
    with pytest.raises(Exception, match="at least 32 characters"):
        create_app(base.model_copy(update={"admin_token": SecretStr("short")}))
    for _ in range(2):  # a restart registers nothing twice
        app = create_app(base.model_copy(update={"admin_token": SecretStr(supplied)}))
        assert app.state.open_mode is False
        sessions = app.state.backend.sessions
        assert auth.authenticate(sessions, supplied) == auth.Principal("admin", admin=True)
        sessions.kw["bind"].dispose()
    assert [t.name for t in auth.list_tokens(sessions)] == ["admin"]
