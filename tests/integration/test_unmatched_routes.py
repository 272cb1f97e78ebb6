"""A ``/v1`` path no route has gets the API's JSON error, never the dashboard's HTML page."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings


def test_unknown_v1_paths_are_json_404_and_wrong_methods_json_405(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path))
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        missing = client.post("/v1/estimate", json={})
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/json"
        assert missing.json() == {
            "detail": "no such endpoint: POST /v1/estimate (see /docs)",
            "error": "NotFound",
        }
        wrong = client.put("/v1/studies")
        assert wrong.status_code == 405
        assert set(wrong.headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}
        assert wrong.json()["error"] == "MethodNotAllowed"
        nested = client.put("/v1/studies/some-id/best")  # a path parameter is one segment
        assert (nested.status_code, nested.headers["allow"]) == (405, "GET, HEAD")
        assert client.get("/v1/studies/some-id/best/extra/parts").status_code == 404
        # A path of its own is not a study id (was 404 "no study with that id").
        for method in ("GET", "DELETE", "PUT"):
            estimate = client.request(method, "/v1/studies/estimate")
            assert estimate.status_code == 405, (method, estimate.text)
            assert estimate.headers["allow"] == "POST"
            assert estimate.json()["error"] == "MethodNotAllowed"
        assert client.post("/v1/studies/estimate", json={}).status_code == 422  # the route
        assert client.get("/v1/studies/0123abcd").status_code == 404  # and the study's
        root = client.get("/v1")  # was the dashboard's HTML 404 page
        assert (root.status_code, root.headers["content-type"]) == (404, "application/json")
        trace = client.request("TRACE", "/v1/studies")
        assert (trace.status_code, trace.json()["error"]) == (405, "MethodNotAllowed")
        # HEAD answers as GET does, without the body (was 405 on every GET route).
        get, head = client.get("/v1/health"), client.head("/v1/health")
        assert (head.status_code, head.content) == (200, b""), head.text
        assert head.headers["content-length"] == get.headers["content-length"]
        assert client.head("/v1/no-such-thing").status_code == 404
        for odd in ("PROPFIND", "FOO"):  # fell through to the dashboard's HTML page
            answer = client.request(odd, "/v1/studies")
            assert (answer.status_code, answer.json()["error"]) == (405, "MethodNotAllowed")
            # With Allow, as any 405 must (RFC 9110 15.5.6): it had none.
            assert set(answer.headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}
            study = client.request(odd, "/v1/studies/some-id/best")
            assert (study.status_code, study.headers["allow"]) == (405, "GET, HEAD")
            nowhere = client.request(odd, "/v1/no-such-thing")  # as for any other method
            assert (nowhere.status_code, nowhere.json()["error"]) == (404, "NotFound")
        metrics_head = client.head("/metrics")  # HEAD on a route outside /v1 too
        assert metrics_head.status_code == client.get("/metrics").status_code != 404
        # The routes themselves and the dashboard are unchanged.
        assert client.get("/v1/health").status_code == 200
        assert client.get("/dashboard").status_code == 200


def test_one_spelling_of_each_path_reaches_the_routes(tmp_path: Path) -> None:
    """Doubled and trailing slashes reach the route the path names; ``/V1`` is the API's
    JSON 404 naming ``/v1``. All three were the dashboard's HTML 404 page."""
    app = create_app(Settings(data_dir=tmp_path))
    base = "http://127.0.0.1:8000"
    with TestClient(app, base_url=base) as client:
        health = client.get("/v1/health").json()
        for spelling in ("//v1/health", "/v1//health", "///v1///health/", "/v1/health/"):
            answer = client.get(base + spelling)
            assert answer.status_code == 200, (spelling, answer.text)
            assert answer.json() == health
        listed = client.get(base + "//v1/studies/")
        assert (listed.status_code, listed.json()) == (200, client.get("/v1/studies").json())
        bad = client.post(
            base + "//v1/studies", content=b"{}", headers={"content-type": "application/json"}
        )
        assert bad.status_code == 422, bad.text  # the route's own validation, not a 404
        missing = client.get(base + "//v1/no-such-thing/")
        assert (missing.status_code, missing.json()["detail"]) == (
            404,
            "no such endpoint: GET /v1/no-such-thing (see /docs)",
        )
        for upper in ("/V1/health", "/V1/studies/abc"):
            answer = client.get(base + upper)
            assert answer.status_code == 404
            assert answer.headers["content-type"] == "application/json"
            assert "the API is under /v1" in answer.json()["detail"], answer.text
        for encoded in ("/v1/studies/abc%2Fbest", "/v1%2Fhealth", "/v1/studies%2fabc"):
            answer = client.get(base + encoded)  # were /best, /health and the study
            assert answer.status_code == 404, (encoded, answer.text)
            assert "an encoded slash (%2F)" in answer.json()["detail"], answer.text
        assert client.get(base + "//dashboard").status_code == 200
        assert client.get(base + "/v1vx").status_code == 404  # not an API path
