"""Webhook URLs: the spec's study.notify, the allow-list match (by parts, never by string
prefix) and LSTM_HPO_WEBHOOK_ALLOW's parsing."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from service.config import Settings
from service.errors import InvalidSpec
from service.search_space import STORED_SPEC_LIMITS, SpecLimits, parse_spec
from service.webhooks import check_webhook_url, parse_prefix, url_allowed

ALLOW = ("https://hooks.example.com/ci", "http://127.0.0.1:8080/")


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/ci",
        "https://hooks.example.com/ci/",
        "https://hooks.example.com/ci/build-7?token=x",
        "https://HOOKS.example.com:443/ci/a",
        "http://127.0.0.1:8080/anything",
        "http://127.0.0.1:8080",
    ],
)
def test_urls_under_a_prefix_are_allowed(url: str) -> None:
    assert url_allowed(url, ALLOW)


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/ci-admin",  # not a whole segment
        "https://hooks.example.com/c",
        "http://hooks.example.com/ci",  # other scheme
        "https://hooks.example.com:8443/ci",  # other port
        "https://hooks.example.com.evil.net/ci",
        "https://evil.net/hooks.example.com/ci",
        "https://hooks.example.com@10.0.0.1/ci",  # user info: the host is 10.0.0.1
        "https://hooks.example.com/ci/../admin",
        "https://hooks.example.com/ci/%2e%2e/admin",
        "http://127.0.0.1:8081/",
        "http://localhost:8080/",
    ],
)
def test_urls_outside_every_prefix_are_refused(url: str) -> None:
    assert not url_allowed(url, ALLOW)


def test_no_prefix_allows_nothing() -> None:
    assert not url_allowed("https://hooks.example.com/ci", ())


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://hooks.example.com/x", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("gopher://127.0.0.1:25/", "http:// or https://"),
        ("hooks.example.com/x", "http:// or https://"),
        ("https:///x", "host"),
        ("https://user:pw@hooks.example.com/", "user name or password"),
        ("https://hooks.example.com:99999/", "port"),
        ("https://hooks.example.com/a b", "spaces"),
        ("https://hooks.example.com/" + "a" * 2000, "at most"),
    ],
)
def test_bad_urls_say_why(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_webhook_url(url)


def test_prefixes_must_not_carry_a_query() -> None:
    with pytest.raises(ValueError, match="query"):
        parse_prefix("https://hooks.example.com/ci?x=1")


def _spec(**notify: Any) -> dict[str, Any]:
    return {
        "task": {"kind": "synthetic"},
        "space": {"lr": {"type": "float", "low": 1e-3, "high": 1e-1}},
        "study": {"n_trials": 2, "notify": notify},
    }


def _errors(spec: dict[str, Any], limits: SpecLimits) -> dict[str, str]:
    with pytest.raises(InvalidSpec) as info:
        parse_spec(spec, limits)
    return {e.loc: e.msg for e in info.value.errors}


def test_spec_notify_is_checked_against_the_allow_list_at_submit() -> None:
    limits = SpecLimits(webhook_allow=ALLOW)
    spec = parse_spec(_spec(url="https://hooks.example.com/ci/7", on=["new_best"]), limits)
    assert spec.study.notify is not None
    assert spec.study.notify.on == ("new_best",)
    default = parse_spec(_spec(url="https://hooks.example.com/ci"), limits).study.notify
    assert default is not None
    assert default.on == ("finished", "failed")
    outside = _errors(_spec(url="https://internal.local/admin"), limits)
    assert "LSTM_HPO_WEBHOOK_ALLOW" in outside["study.notify.url"]
    off = _errors(_spec(url="https://hooks.example.com/ci"), SpecLimits(webhook_allow=()))
    assert "webhooks are off" in off["study.notify.url"]
    scheme = _errors(_spec(url="file:///etc/passwd"), limits)
    assert "http:// or https://" in scheme["study.notify.url"]
    assert set(_errors(_spec(url="https://hooks.example.com/ci", on=[]), limits)) == {
        "study.notify.on"
    }
    unknown = _errors(_spec(url="https://hooks.example.com/ci", on=["sometimes"]), limits)
    assert "'new_best'" in unknown["study.notify.on.0"]
    assert set(_errors(_spec(url="https://hooks.example.com/ci", secret="x"), limits)) == {
        "study.notify.secret"
    }


def test_stored_specs_are_not_checked_against_an_allow_list() -> None:
    # A worker re-validates the stored spec: the server checked the URL at submit.
    spec = parse_spec(_spec(url="https://anywhere.example.org/"), STORED_SPEC_LIMITS)
    assert spec.study.notify is not None
    dumped = spec.model_dump(mode="json")
    assert parse_spec(dumped, STORED_SPEC_LIMITS) == spec


def test_settings_read_a_comma_separated_allow_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "LSTM_HPO_WEBHOOK_ALLOW", " https://hooks.example.com/ci , http://127.0.0.1:8080/ ,"
    )
    assert Settings().webhook_allow == ALLOW
    monkeypatch.setenv("LSTM_HPO_WEBHOOK_ALLOW", "")
    assert Settings().webhook_allow == ()
    monkeypatch.setenv("LSTM_HPO_WEBHOOK_ALLOW", "https://ok.example.com/,ftp://nope/")
    with pytest.raises(ValidationError, match="ftp://nope/"):
        Settings()
