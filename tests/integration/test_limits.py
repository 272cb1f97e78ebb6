"""Resource limits at the door, over a real server: oversized bodies are 413 before they are
read, YAML alias bombs and deep nesting are 422s (OWASP API4, unrestricted resource
consumption)."""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.config import Settings
from tests.servers import InProcessServer, serve_in_thread

YAML = {"Content-Type": "application/yaml"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    data_dir: Path = tmp_path_factory.mktemp("data")
    with serve_in_thread(Settings(data_dir=data_dir)) as s:
        yield s


def test_a_body_over_the_limit_is_413_declared_or_streamed(server: InProcessServer) -> None:
    big = b"#" * 1_000_001
    declared = server.http.post("/v1/studies", content=big, headers=YAML)
    assert declared.status_code == 413, declared.text
    assert "larger than 1,000,000 bytes" in declared.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        for _ in range(20):
            yield b"#" * 100_000

    streamed = server.http.post("/v1/studies", content=chunks(), headers=YAML)
    assert streamed.status_code == 413, streamed.text
    assert server.http.get("/v1/studies").json()["total"] == 0


def test_a_yaml_alias_bomb_is_refused_quickly(server: InProcessServer) -> None:
    """A ~1 KB "billion laughs" document (10 levels of 10 aliases: 10^10 nodes expanded)."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, 10):
        refs = ",".join([f"*a{level - 1}"] * 10)
        lines.append(f"a{level}: &a{level} [{refs}]")
    bomb = "\n".join(["task: {kind: synthetic}", "space:", "  fail_when:", *lines]) + "\n"
    assert len(bomb) < 1500
    started = time.monotonic()
    response = server.http.post("/v1/studies", content=bomb, headers=YAML)
    took = time.monotonic() - started
    print(f"alias bomb refused in {took:.3f}s")
    assert response.status_code == 422, response.text
    assert took < 30  # a hang guard, not a benchmark: it is refused in milliseconds


def test_deeply_nested_json_is_422(server: InProcessServer) -> None:
    body = '{"task": {"kind": "synthetic"}, "name": ' + "[" * 100_000 + "]" * 100_000 + "}"
    response = server.http.post(
        "/v1/studies", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text


def test_every_route_bounds_its_body_the_sign_in_page_too(server: InProcessServer) -> None:
    for path in ("/signin", "/api/studies/1/note", "/v1/studies/estimate"):
        response = server.http.post(path, content=b"x" * 2_000_000)
        assert response.status_code == 413, (path, response.status_code)


def test_deep_yaml_is_refused_before_parsing(server: InProcessServer) -> None:
    body = "task: {kind: synthetic}\nname: " + "[" * 200_000 + "\n"
    response = server.http.post("/v1/studies", content=body, headers=YAML)
    assert response.status_code == 422 and "nested more than" in response.text


def test_open_mode_refuses_other_hosts_and_sites(server: InProcessServer) -> None:
    """No token yet: DNS rebinding (a foreign Host) and a web page driving the browser (a
    foreign Origin, or a body type a form or no-cors fetch can send) are refused."""
    spec = '{"task": {"kind": "synthetic"}, "space": {"max_epochs": 1}, "study": {"n_trials": 1}}'
    rebound = server.http.get("/v1/studies", headers={"Host": "evil.example:8000"})
    assert rebound.status_code == 403 and "open mode" in rebound.text
    assert server.http.get("/dashboard", headers={"Host": "evil.example"}).status_code == 403
    cross = server.http.post(
        "/v1/studies",
        content=spec,
        headers={"Content-Type": "application/json", "Origin": "http://localhost:9999"},
    )
    assert cross.status_code == 403, cross.text
    for simple in ("text/plain", "application/x-www-form-urlencoded"):
        form = server.http.post("/v1/studies", content=spec, headers={"Content-Type": simple})
        assert form.status_code == 415 and "application/json" in form.text, form.text
    before = server.http.get("/v1/studies").json()["total"]
    ok = server.http.post("/v1/studies", content=spec, headers={"Content-Type": "application/json"})
    assert ok.status_code == 201 and server.http.get("/v1/studies").json()["total"] == before + 1


def test_media_types_are_case_insensitive_and_compressed_bodies_are_415(
    server: InProcessServer,
) -> None:
    spec = "task: {kind: synthetic}\nspace: {max_epochs: 1}\nstudy: {n_trials: 1}\n"
    upper = server.http.post(
        "/v1/studies", content=spec, headers={"Content-Type": "Application/YAML"}
    )
    assert upper.status_code == 201, upper.text  # RFC 9110: media types ignore case
    zipped = server.http.post(
        "/v1/studies",
        content=gzip.compress(spec.encode()),
        headers={"Content-Type": "application/yaml", "Content-Encoding": "gzip"},
    )
    assert zipped.status_code == 415 and "Content-Encoding gzip" in zipped.text, zipped.text


def test_a_body_is_read_in_the_charset_its_content_type_names(server: InProcessServer) -> None:
    """``charset=latin-1`` was ignored: the body had to be UTF-8 whatever the header said."""
    spec = "# Café crème\ntask: {kind: synthetic}\nspace: {max_epochs: 1}\nstudy: {n_trials: 1}\n"
    before = server.http.get("/v1/studies").json()["total"]

    def post(body: bytes, content_type: str) -> httpx.Response:
        return server.http.post("/v1/studies", content=body, headers={"Content-Type": content_type})

    for charset in ("latin-1", '"ISO-8859-1"', "cp1252", "utf-16"):
        done = post(spec.encode(charset.strip('"')), f"application/yaml; charset={charset}")
        assert done.status_code == 201, (charset, done.text)
    as_json = json.dumps({"task": {"kind": "char_lm", "path": "é.txt"}}, ensure_ascii=False)
    # Read as latin-1: the error names the file é.txt (read as UTF-8: "not UTF-8 text").
    in_json = post(as_json.encode("latin-1"), "application/json; charset=latin-1")
    assert in_json.status_code == 422, in_json.text
    assert in_json.json()["errors"][0]["msg"] == "char_lm: é.txt: no such file"
    unknown = post(spec.encode(), "application/yaml; charset=klingon")
    assert unknown.status_code == 415 and "charset 'klingon'" in unknown.text, unknown.text
    not_text = post(spec.encode(), "application/yaml; charset=base64")
    assert not_text.status_code == 415, not_text.text
    wrong = post(spec.encode("latin-1"), "application/yaml; charset=utf-8")  # é is 0xE9
    assert wrong.status_code == 422 and "not UTF-8 text" in wrong.text, wrong.text
    undecodable = post(b"name: \x81\n", "application/yaml; charset=cp1252")
    assert undecodable.status_code == 422, undecodable.text
    assert undecodable.json()["errors"][0]["loc"] == "body"
    assert "not cp1252 text (byte 6)" in undecodable.text
    assert server.http.get("/v1/studies").json()["total"] == before + 4


def test_health_is_public_and_names_only_the_kind_of_database(server: InProcessServer) -> None:
    health = server.http.get("/v1/health").json()
    assert health["status"] == "ok" and health["database"] == "sqlite"
    assert "/" not in health["database"]  # no path, host or user


def test_an_ipv6_host_is_bracketed_in_links() -> None:
    assert Settings(host="::1", port=8000).base_url() == "http://[::1]:8000"
    assert Settings(host="127.0.0.1", port=8000).base_url() == "http://127.0.0.1:8000"
