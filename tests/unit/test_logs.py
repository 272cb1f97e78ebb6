"""service.logs: JSON lines carry the log_context fields where they are set and nowhere
else; text stays the default format."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import optuna
import pytest

from service.logs import (
    JsonFormatter,
    add_log_fields,
    configure_logging,
    current_log_fields,
    log_context,
)


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """configure_logging("json") on a buffer; the root logger restored after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    buffer = io.StringIO()
    configure_logging("json", stream=buffer)
    try:
        yield buffer
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
        optuna.logging.disable_propagation()  # JSON mode sent Optuna's records to root
        optuna.logging.enable_default_handler()


def _lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_json_lines_carry_the_context_where_it_is_set(json_lines: io.StringIO) -> None:
    log = logging.getLogger("lstm_hpo.worker")
    log.info("idle")
    with log_context(study_id="abc", worker_id="host:1:ff"):
        add_log_fields(trial_number=3)
        log.info("trial %d: start", 3)
        with log_context(trial_number=None, stage="fit"):  # None removes a field
            logging.getLogger("lightning").warning("inner")
        log.info("after inner")
    log.info("done")

    idle, start, inner, after, done = _lines(json_lines)
    assert set(idle) == {"time", "level", "logger", "message", "process", "pid"}
    assert idle["time"].endswith("Z")
    assert start["message"] == "trial 3: start"
    assert start["level"] == "INFO"
    assert start["logger"] == "lstm_hpo.worker"
    assert (start["study_id"], start["trial_number"], start["worker_id"]) == ("abc", 3, "host:1:ff")
    assert inner["stage"] == "fit"
    assert "trial_number" not in inner
    assert inner["study_id"] == "abc"
    assert after["trial_number"] == 3
    assert "stage" not in after
    # add_log_fields inside a block ends with the block.
    assert "study_id" not in done and "trial_number" not in done
    assert current_log_fields() == {}


def test_a_new_thread_starts_without_the_fields(json_lines: io.StringIO) -> None:
    log = logging.getLogger("lstm_hpo.reaper")
    with log_context(study_id="abc"):
        thread = threading.Thread(target=lambda: log.warning("from a thread"))
        thread.start()
        thread.join()
    (line,) = _lines(json_lines)
    assert line["message"] == "from a thread"
    assert "study_id" not in line


def test_exceptions_and_odd_values_stay_one_json_line(json_lines: io.StringIO) -> None:
    log = logging.getLogger("lstm_hpo.worker")
    with log_context(study_id="abc", extra={"path": object()}):
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            log.exception("trial failed")
        log.info("message", stack_info=True)
    text = json_lines.getvalue()
    assert len(text.splitlines()) == 2  # newlines inside are escaped
    failed, stacked = _lines(json_lines)
    assert "ValueError: boom" in failed["exception"]
    assert failed["level"] == "ERROR"
    assert failed["study_id"] == "abc"
    assert isinstance(failed["extra"]["path"], str)  # str() of what JSON cannot hold
    assert "stack" in stacked


def test_configure_logging_twice_keeps_one_json_handler(json_lines: io.StringIO) -> None:
    second = io.StringIO()
    configure_logging("json", stream=second)
    logging.getLogger("x").warning("once")
    optuna.logging.get_logger("optuna.storages").warning("optuna's own")
    assert json_lines.getvalue() == ""
    first, optunas = (json.loads(line) for line in second.getvalue().splitlines())
    assert first["message"] == "once"
    assert (optunas["logger"], optunas["message"]) == ("optuna.storages", "optuna's own")


def test_a_field_never_hides_the_records_own_keys() -> None:
    record = logging.LogRecord("n", logging.INFO, __file__, 1, "real", None, None)
    with log_context(message="fake", level="fake", study_id="s"):
        line = json.loads(JsonFormatter().format(record))
    assert (line["message"], line["level"], line["study_id"]) == ("real", "INFO", "s")


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="text, json"):
        configure_logging("yaml")


def test_text_is_the_default_settings_format(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.config import Settings

    monkeypatch.delenv("LSTM_HPO_LOG_FORMAT", raising=False)
    assert Settings().log_format == "text"
    monkeypatch.setenv("LSTM_HPO_LOG_FORMAT", "json")
    assert Settings().log_format == "json"
