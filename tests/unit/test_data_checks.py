"""The submit-time data check: every data problem a trial would fail on is an InvalidSpec
naming the field and the line or byte, read from real files, without importing torch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.data_checks import check_task_data, read_csv_column, read_text_file
from service.errors import DataError, FieldError, InvalidSpec
from service.search_space import CharLMTask, SpecLimits, StudySpec, parse_spec

# --------------------------------------------------------------------------------------
# The shared failing inputs (rewritten from the case files; the integration test reuses them)
# --------------------------------------------------------------------------------------

_CAFE = (
    "The café on the corner opens at seven, and it\u2019s busy by eight. Nobody\u2019s sure why "
    "the queue forms so early, but the bread is good. "
)
_WAVE = [
    50.0, 51.636, 53.092, 54.207, 54.86, 54.977, 54.546, 53.615, 52.286, 50.706,
    49.047, 47.494, 46.216, 45.355, 45.005, 45.205, 45.933, 47.109, 48.603, 50.251,
]  # fmt: skip


def _decimal_comma_csv() -> bytes:
    rows = ["month,passengers"]
    for i in range(40):
        whole, cents = 112 + i * 3 % 50, (i * 43) % 100
        rows.append(f"{1949 + i // 12}-{i % 12 + 1:02d},{whole},{cents:02d}")
    return ("\n".join(rows) + "\n").encode()


def _one_class_jsonl(
    labels: tuple[str, ...] = ("walk",), test_labels: tuple[str, ...] = ()
) -> bytes:
    lines = []
    for i in range(12):
        split = "test" if i % 4 == 3 else "train"
        pool = test_labels if split == "test" and test_labels else labels
        pick = i // 4 if split == "test" else i
        x = [[round(math.sin(i + t), 3), round(math.cos(i + t), 3)] for t in range(3 + i % 3)]
        lines.append(json.dumps({"x": x, "label": pool[pick % len(pool)], "split": split}))
    return ("\n".join(lines) + "\n").encode()


def _forecast_space(**space: Any) -> dict[str, Any]:
    return {"num_layers": 1, "hidden_size": 8, "batch_size": 4, "max_epochs": 2, **space}


_STUDY = {"n_trials": 3, "sampler": "random", "pruner": "none", "seed": 0}


@dataclass(frozen=True)
class Case:
    """A shared failing input: its spec, its data file (None: no file) and what to expect."""

    spec: dict[str, Any]
    data_name: str | None
    data: bytes | None
    loc: str
    #: Fragments the error message must contain (the line or byte among them).
    says: tuple[str, ...]


CASES: dict[str, Case] = {
    "missing-file": Case(
        spec={
            "name": "missing-file",
            "task": {
                "kind": "forecast",
                "path": "does-not-exist.csv",
                "column": "value",
                "lookback": 6,
                "horizon": 1,
            },
            "space": _forecast_space(num_layers={"type": "int", "low": 1, "high": 2}),
            "study": {**_STUDY, "n_trials": 10},
        },
        data_name=None,
        data=None,
        loc="task.path",
        says=("forecast: does-not-exist.csv: no such file",),
    ),
    "cp1252": Case(
        spec={
            "name": "cp1252-text",
            "task": {"kind": "char_lm", "path": "cp1252.txt", "max_chars": 1000},
            "space": {"num_layers": 1, "hidden_size": 16, "bptt": 20, "batch_size": 8},
            "study": _STUDY,
        },
        data_name="cp1252.txt",
        data=(_CAFE * 30).encode("cp1252"),
        loc="task.path",
        says=("cp1252.txt: not UTF-8 text", "at byte 7, line 1", "task.encoding", "cp1252"),
    ),
    "decimal-comma": Case(
        spec={
            "name": "decimal-comma",
            "task": {
                "kind": "forecast",
                "path": "decimal-comma.csv",
                "column": "passengers",
                "lookback": 6,
                "horizon": 1,
            },
            "space": _forecast_space(hidden_size={"type": "int", "low": 8, "high": 16}),
            "study": _STUDY,
        },
        data_name="decimal-comma.csv",
        data=_decimal_comma_csv(),
        loc="task.path",
        says=(
            "decimal-comma.csv line 2 has 3 fields but the header has 2: a decimal comma "
            "(112,00)? quote the value or use '.' as the decimal mark",
        ),
    ),
    "one-class": Case(
        spec={
            "name": "one-class",
            "task": {"kind": "classify", "path": "one-class.jsonl"},
            "space": {"num_layers": {"type": "int", "low": 1, "high": 2}, "batch_size": 4},
            "study": _STUDY,
        },
        data_name="one-class.jsonl",
        data=_one_class_jsonl(),
        loc="task.path",
        says=(
            "one-class.jsonl: the train split has only one class ('walk'); "
            "a classifier needs at least two",
        ),
    ),
    "short-series": Case(
        spec={
            "name": "short-series",
            "task": {
                "kind": "forecast",
                "path": "short-series.csv",
                "column": "load",
                "lookback": 4,
                "horizon": 4,
            },
            "space": _forecast_space(),
            "study": _STUDY,
        },
        data_name="short-series.csv",
        data=("day,load\n" + "".join(f"{i + 1},{v:.3f}\n" for i, v in enumerate(_WAVE))).encode(),
        loc="task.path",
        says=(
            "the series has 20 points (train 14 / val 3 / test 3): lookback 4 + horizon 4 "
            "needs train >= 8 and val, test >= 4; what would fit: horizon <= 3",
        ),
    ),
}


def write_case_data(case: Case, datasets: Path) -> None:
    """Put the case's data file (if it has one) into ``datasets``."""
    if case.data_name is not None and case.data is not None:
        datasets.mkdir(parents=True, exist_ok=True)
        (datasets / case.data_name).write_bytes(case.data)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _spec(root: Path, task: dict[str, Any], space: dict[str, Any] | None = None) -> StudySpec:
    doc = {"task": task, "space": space or {}, "study": {"n_trials": 2}}
    return parse_spec(doc, SpecLimits(data_roots=(root,)))


def refused(root: Path, task: dict[str, Any], space: dict[str, Any] | None = None) -> FieldError:
    """The one error ``check_task_data`` raises for this task in data root ``root``."""
    with pytest.raises(InvalidSpec) as info:
        check_task_data(_spec(root, task, space), (root,))
    assert len(info.value.errors) == 1, info.value.errors
    return info.value.errors[0]


def accepted(root: Path, task: dict[str, Any], space: dict[str, Any] | None = None) -> None:
    check_task_data(_spec(root, task, space), (root,))


def _csv_task(name: str = "s.csv", **kw: Any) -> dict[str, Any]:
    return {"kind": "forecast", "path": name, "column": "y", "lookback": 3, "horizon": 1, **kw}


def _write(root: Path, name: str, text: str | bytes) -> Path:
    path = root / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def _series_csv(n: int) -> str:
    return "t,y\n" + "".join(f"{i},{math.sin(i):.4f}\n" for i in range(n))


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _seq(label: str | int, split: str | None = None, width: int = 2) -> dict[str, Any]:
    row: dict[str, Any] = {"x": [[0.5] * width, [1.0] * width], "label": label}
    if split is not None:
        row["split"] = split
    return row


# --------------------------------------------------------------------------------------
# The shared cases
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_shared_case_is_refused_naming_the_field_and_where(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    write_case_data(case, tmp_path)
    spec = parse_spec(case.spec, SpecLimits(data_roots=(tmp_path,)))
    with pytest.raises(InvalidSpec) as info:
        check_task_data(spec, (tmp_path,))
    [error] = info.value.errors
    assert error.loc == case.loc
    for fragment in case.says:
        assert fragment in error.msg, error.msg
    assert str(tmp_path) not in error.msg  # the server's directories are not shown


def test_cp1252_text_passes_with_its_encoding(tmp_path: Path) -> None:
    case = CASES["cp1252"]
    write_case_data(case, tmp_path)
    accepted(tmp_path, {**case.spec["task"], "encoding": "cp1252"}, {"bptt": 20})
    text = read_text_file(tmp_path / "cp1252.txt", 1000, "cp1252")
    assert text.startswith("The café") and "it\u2019s" in text and len(text) == 1000


def test_missing_file_suggests_a_similar_name(tmp_path: Path) -> None:
    _write(tmp_path, "passengers.csv", _series_csv(50))
    error = refused(tmp_path, _csv_task("pasengers.csv"))
    assert error.loc == "task.path"
    assert error.msg == "forecast: pasengers.csv: no such file (did you mean 'passengers.csv'?)"


# --------------------------------------------------------------------------------------
# Files: missing, directories, empty, undecodable
# --------------------------------------------------------------------------------------

_KINDS = {
    "char_lm": ({"kind": "char_lm", "path": "data"}, "a text file", "the file is empty"),
    "forecast": (_csv_task("data"), "a CSV file", "the file is empty (a header row is needed)"),
    "classify": (
        {"kind": "classify", "path": "data"},
        "a JSON Lines file",
        "no sequences (the file has no non-blank lines)",
    ),
}


@pytest.mark.parametrize("kind", list(_KINDS))
def test_a_directory_or_an_empty_file_is_refused(tmp_path: Path, kind: str) -> None:
    task, what, empty = _KINDS[kind]
    (tmp_path / "data").mkdir()
    assert refused(tmp_path, task) == FieldError(
        "task.path", f"{kind}: data: is a directory, not {what}"
    )
    (tmp_path / "data").rmdir()
    _write(tmp_path, "data", b"")
    assert refused(tmp_path, task) == FieldError("task.path", f"{kind}: data: {empty}")


@pytest.mark.parametrize("kind", list(_KINDS))
def test_a_decode_error_names_the_byte_from_the_start_of_the_file(
    tmp_path: Path, kind: str
) -> None:
    task, _, _ = _KINDS[kind]
    # Far past the first read chunk, on line 50,001: the offset counts from the file's start.
    good = {
        "char_lm": "abcdefghijklmnopqrstuvwxy\n" * 50_000,
        "forecast": "t,y\n" + "".join(f"{i:07d},1.00000000000000000\n" for i in range(1, 50_000)),
        "classify": _jsonl([_seq("a", "train")]) * 25_000 + _jsonl([_seq("b", "test")]) * 25_000,
    }[kind]
    head = good.encode()
    _write(tmp_path, "data", head + "caf\xe9\n".encode("cp1252"))
    task = {**task, "max_chars": 2_000_000} if kind == "char_lm" else task
    error = refused(tmp_path, task)
    assert error.loc == "task.path"
    offset = len(head) + 3
    assert f"data: not UTF-8 text (invalid continuation byte at byte {offset}, line 50001)" in (
        error.msg
    )
    assert "set task.encoding" in error.msg


def test_a_decode_error_past_max_chars_does_not_matter(tmp_path: Path) -> None:
    _write(tmp_path, "t.txt", b"x" * 5_000 + b"\xff")
    accepted(tmp_path, {"kind": "char_lm", "path": "t.txt", "max_chars": 5_000}, {"bptt": 50})


def test_an_encoding_that_does_not_make_text_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "t.txt", "hello\n" * 1000)
    with pytest.raises(DataError, match=r"t\.txt: 'base64' is not a text encoding"):
        read_text_file(path, 1000, "base64")
    with pytest.raises(DataError, match=r"t\.txt: 'hex' is not a text encoding"):
        read_csv_column(path, "y", "hex")


def test_valid_files_pass(tmp_path: Path) -> None:
    _write(tmp_path, "t.txt", "hello world\n" * 1000)
    accepted(tmp_path, {"kind": "char_lm", "path": "t.txt"}, {"bptt": 100})
    _write(tmp_path, "s.csv", _series_csv(40))
    accepted(tmp_path, _csv_task(lookback=12, horizon=2))
    rows = [_seq(c, "train") for c in "ab" * 5] + [_seq(c, "test") for c in "ab"]
    _write(tmp_path, "c.jsonl", _jsonl(rows))
    accepted(tmp_path, {"kind": "classify", "path": "c.jsonl"})
    # Excel's UTF-8 byte-order mark before the header is not part of the first column's name.
    _write(tmp_path, "bom.csv", b"\xef\xbb\xbf" + _series_csv(40).encode())
    accepted(tmp_path, _csv_task("bom.csv"))
    _write(tmp_path, "bom.jsonl", b"\xef\xbb\xbf" + _jsonl(rows).encode())
    accepted(tmp_path, {"kind": "classify", "path": "bom.jsonl"})


def test_generated_tasks_have_nothing_to_check(tmp_path: Path) -> None:
    accepted(tmp_path, {"kind": "adding"})
    accepted(tmp_path, {"kind": "synthetic"})


# --------------------------------------------------------------------------------------
# forecast: the CSV rule and the split
# --------------------------------------------------------------------------------------


def test_a_row_with_more_fields_than_the_header_names_its_line(tmp_path: Path) -> None:
    _write(tmp_path, "s.csv", "t,y\n1,2.5\n2,3.5\n3,a,b\n4,5\n")
    assert refused(tmp_path, _csv_task()) == FieldError(
        "task.path",
        "forecast: s.csv line 4 has 3 fields but the header has 2: an unquoted ',' inside a "
        "value? quote the value",
    )
    # Quoted, a decimal comma is one (non-numeric) field: the message says which line.
    _write(tmp_path, "s.csv", 't,y\n1,2.5\n2,"3,5"\n')
    error = refused(tmp_path, _csv_task())
    assert error.msg == "forecast: s.csv line 3: column 'y' is not numeric ('3,5')"


def test_a_row_too_short_to_have_the_column_names_its_line(tmp_path: Path) -> None:
    _write(tmp_path, "s.csv", _series_csv(20) + "20\n" + _series_csv(20)[4:])
    assert refused(tmp_path, _csv_task()) == FieldError(
        "task.path",
        "forecast: s.csv line 22 has 1 fields but the header has 2: no value for column 'y' "
        "(write an empty cell for a missing value)",
    )
    # An empty cell is a missing value: dropped, not an error, and not silent either: the
    # study's notes say which lines (the series closes up around them).
    _write(tmp_path, "s.csv", _series_csv(30) + "30,\n31,NA\n")
    assert check_task_data(_spec(tmp_path, _csv_task()), (tmp_path,)) == [
        "task.path: s.csv: 2 rows with no value in column 'y' dropped (lines 32, 33): the "
        "series is read without them, so each gap closes up; fill them in the file "
        "(interpolate) if the time steps must stay evenly spaced"
    ]
    values, dropped = read_csv_column(tmp_path / "s.csv", "y")
    assert (len(values), dropped) == (30, [32, 33])
    # Many: the first five lines and a count.
    gappy = "t,y\n" + "".join(f"{i},{'' if i % 7 == 3 else i}\n" for i in range(70))
    _write(tmp_path, "s.csv", gappy)
    [note] = check_task_data(_spec(tmp_path, _csv_task()), (tmp_path,))
    assert (
        "10 rows with no value in column 'y' dropped (lines 5, 12, 19, 26, 33 and 5 more)" in note
    )
    _write(tmp_path, "s.csv", _series_csv(40))
    assert check_task_data(_spec(tmp_path, _csv_task()), (tmp_path,)) == []
    # A short row that still has the column is fine (the column comes first).
    _write(tmp_path, "y.csv", "y,note\n" + "".join(f"{i}\n" for i in range(30)))
    assert read_csv_column(tmp_path / "y.csv", "y")[0].tolist() == list(range(30))


def test_values_must_be_numbers_and_finite(tmp_path: Path) -> None:
    _write(tmp_path, "s.csv", _series_csv(30) + "30,inf\n")
    assert refused(tmp_path, _csv_task()).msg == (
        "forecast: s.csv line 32: column 'y' is not finite ('inf')"
    )
    _write(tmp_path, "s.csv", _series_csv(30) + "30,12 kg\n")
    assert refused(tmp_path, _csv_task()).msg == (
        "forecast: s.csv line 32: column 'y' is not numeric ('12 kg')"
    )


def test_values_beyond_float32_or_with_digit_separators_are_refused(tmp_path: Path) -> None:
    """A corrupt 1e308 used to pass and fail every trial with a NaN metric; ``1_000`` was
    read as 1000 by Python's float()."""
    _write(tmp_path, "s.csv", _series_csv(30) + "30,1e308\n")
    assert refused(tmp_path, _csv_task()).msg == (
        "forecast: s.csv line 32: column 'y' is '1e308', beyond the float32 range "
        "(+-3.4e+38) the model trains in"
    )
    _write(tmp_path, "s.csv", _series_csv(30) + "30,-3e38\n")  # a float32 is read
    assert read_csv_column(tmp_path / "s.csv", "y")[0][-1] == -3e38
    _write(tmp_path, "s.csv", _series_csv(30) + "30," + "9" * 400 + "\n")  # past float64
    assert f"is '{'9' * 40}'..., beyond the float32" in refused(tmp_path, _csv_task()).msg
    _write(tmp_path, "s.csv", _series_csv(30) + "30,1_000\n")
    assert refused(tmp_path, _csv_task()).msg == (
        "forecast: s.csv line 32: column 'y' is not numeric ('1_000')"
    )


def test_a_column_name_two_columns_share_is_refused(tmp_path: Path) -> None:
    # Silently the first column was used, whichever the user meant.
    _write(tmp_path, "s.csv", "t,y,y\n" + "".join(f"{i},{i},{-i}\n" for i in range(30)))
    assert refused(tmp_path, _csv_task()).msg == (
        "forecast: s.csv: 2 columns are named 'y' (columns 2, 3 of the header): "
        "rename all but the one to use"
    )
    accepted(tmp_path, _csv_task(column="t"))  # another column's twin does not matter


def test_an_unclosed_quote_names_the_lines_it_spans_and_shows_little(tmp_path: Path) -> None:
    _write(tmp_path, "s.csv", 't,y\n1,"100\n' + "".join(f"{i},{i}.5\n" for i in range(2, 60)))
    error = refused(tmp_path, _csv_task())
    assert error.msg.startswith(
        "forecast: s.csv lines 2-60 (one quoted field: is a quote unclosed?): "
        "column 'y' is not numeric ('100\\n2,2.5\\n3,3.5\\n"
    ), error.msg
    assert len(error.msg) < 200, error.msg


def test_a_codec_without_the_replace_handler_still_names_the_byte(tmp_path: Path) -> None:
    # idna cannot decode with errors="replace": locating the bad byte raised a 500.
    _write(tmp_path, "t.txt", "Caf\u00e9 na\u00efve\n".encode() * 400)
    error = refused(tmp_path, {"kind": "char_lm", "path": "t.txt", "encoding": "idna"})
    assert error.loc == "task.path" and "t.txt" in error.msg, error


def test_a_missing_column_lists_the_columns_and_spots_another_separator(tmp_path: Path) -> None:
    _write(tmp_path, "s.csv", _series_csv(30))
    assert refused(tmp_path, _csv_task(column="price")).msg == (
        "forecast: s.csv: no column 'price' (columns: 't', 'y')"
    )
    _write(tmp_path, "semi.csv", "t;y\n" + "".join(f"{i};{i},5\n" for i in range(30)))
    error = refused(tmp_path, _csv_task("semi.csv"))
    assert error.msg.startswith("forecast: semi.csv: no column 'y' (columns: 't;y')")
    assert "separated by ';'" in error.msg


def test_a_series_too_short_for_lookback_and_horizon_says_what_fits(tmp_path: Path) -> None:
    _write(tmp_path, "s.csv", _series_csv(20))
    error = refused(
        tmp_path, _csv_task(lookback=20, horizon=2, val_fraction=0.2, test_fraction=0.2)
    )
    assert error.loc == "task.path"
    assert "lookback 20 + horizon 2 needs train >= 22" in error.msg
    assert error.msg.endswith("what would fit: lookback <= 10 at horizon 2")
    # A header and no values at all.
    _write(tmp_path, "s.csv", "t,y\n")
    assert "the series has 0 points" in refused(tmp_path, _csv_task()).msg


# --------------------------------------------------------------------------------------
# classify
# --------------------------------------------------------------------------------------


def test_jsonl_problems_name_their_lines(tmp_path: Path) -> None:
    _write(tmp_path, "c.jsonl", _jsonl([_seq("a", "train")]) + '{"x": [], "label": "b"}\n')
    error = refused(tmp_path, {"kind": "classify", "path": "c.jsonl"})
    assert error.loc == "task.path"
    assert error.msg.startswith("classify: c.jsonl: line 2: `x` must be a non-empty list")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1" + "0" * 400, "line 2: `x` time step 0 has a value beyond the float32 range"),
        ("1e39", "line 2: `x` time step 0 has a value beyond the float32 range"),
        ("1" * 5001, "line 2: not valid JSON (a number of more than 4300 digits)"),
        ("[" * 100_000 + "]" * 100_000, "line 2: not valid JSON (nested too deeply)"),
    ],
)
def test_jsonl_numbers_too_large_are_refused_naming_the_line(
    tmp_path: Path, value: str, expected: str
) -> None:
    """An integer too large for a float made the check raise OverflowError (HTTP 500), one
    past Python's 4300 digits a ValueError."""
    rows = [_seq(c, "train") for c in "ab" * 5] + [_seq(c, "test") for c in "ab"]
    lines = _jsonl(rows).splitlines(keepends=True)
    lines.insert(1, '{"x": [[' + value + ', 0.5]], "label": "a", "split": "train"}\n')
    _write(tmp_path, "c.jsonl", "".join(lines))
    error = refused(tmp_path, {"kind": "classify", "path": "c.jsonl"})
    assert error.msg.startswith(f"classify: c.jsonl: {expected}"), error.msg


def test_jsonl_decode_errors_read_as_sentences(tmp_path: Path) -> None:
    _write(tmp_path, "c.jsonl", '{"x": [[1]], "label": "a\tb"}\n')
    error = refused(tmp_path, {"kind": "classify", "path": "c.jsonl"})
    assert "not valid JSON (Invalid control character at column" in error.msg, error.msg


def test_one_class_in_train_is_refused_even_when_test_has_two(tmp_path: Path) -> None:
    _write(tmp_path, "c.jsonl", _one_class_jsonl(("walk",), ("walk", "run")))
    assert refused(tmp_path, {"kind": "classify", "path": "c.jsonl"}) == FieldError(
        "task.path",
        "classify: c.jsonl: the train split has only one class ('walk') ('run' only in the "
        "test split); a classifier needs at least two",
    )
    # Without a split column the test part is held out per class: still one class in train.
    rows = [_seq(7) for _ in range(10)]
    _write(tmp_path, "n.jsonl", _jsonl(rows))
    assert "only one class (7)" in refused(tmp_path, {"kind": "classify", "path": "n.jsonl"}).msg


def test_a_class_no_training_sequence_has_is_a_note(tmp_path: Path) -> None:
    """A class only the file's test split holds (or a misspelt label) cannot be learnt: the
    study is accepted (an open-set test is legitimate) but its notes say so."""
    rows = [_seq(c, "train") for c in "ab" * 10] + [_seq("a", "test"), _seq("b", "test")]
    task = {"kind": "classify", "path": "d.jsonl"}
    _write(tmp_path, "d.jsonl", _jsonl(rows))
    assert check_task_data(_spec(tmp_path, task), (tmp_path,)) == []
    _write(tmp_path, "d.jsonl", _jsonl([*rows, _seq("B", "test"), _seq("B", "test")]))
    assert check_task_data(_spec(tmp_path, task), (tmp_path,)) == [
        "task.path: d.jsonl: 1 of 3 classes have no training sequence, so no trial can "
        "predict them: 'B' (0 validation, 2 test); is a label misspelt, or does the file's "
        "test split hold a class its train split lacks?"
    ]


def test_empty_val_or_test_split_is_refused(tmp_path: Path) -> None:
    # Two sequences per class in train: 20 % of 2 rounds to 0 held out for validation.
    rows = [_seq(c, "train") for c in "aabb"] + [_seq("a", "test")]
    _write(tmp_path, "v.jsonl", _jsonl(rows))
    assert refused(tmp_path, {"kind": "classify", "path": "v.jsonl"}).msg == (
        "classify: v.jsonl: the val split is empty (5 sequences); "
        "give more sequences or larger fractions"
    )
    accepted(tmp_path, {"kind": "classify", "path": "v.jsonl", "val_fraction": 0.3})
    # No split column, one sequence of one class: 20 % of 1 rounds to 0 held out for test.
    rows = [_seq("a") for _ in range(10)] + [_seq("b") for _ in range(5)] + [_seq("c")]
    _write(tmp_path, "t.jsonl", _jsonl(rows))
    accepted(tmp_path, {"kind": "classify", "path": "t.jsonl"})
    _write(tmp_path, "t.jsonl", _jsonl([_seq("a"), _seq("b")] * 2))
    error = refused(tmp_path, {"kind": "classify", "path": "t.jsonl", "val_fraction": 0.3})
    assert error.msg.startswith("classify: t.jsonl: the test split is empty (4 sequences)")


# --------------------------------------------------------------------------------------
# char_lm: the largest bptt the space allows
# --------------------------------------------------------------------------------------


def test_char_lm_needs_the_largest_bptt_the_space_allows(tmp_path: Path) -> None:
    _write(tmp_path, "t.txt", "abcdefghij" * 200)  # 2,000 chars: val and test 100 each
    task = {"kind": "char_lm", "path": "t.txt"}
    accepted(tmp_path, task, {"bptt": 99})
    accepted(tmp_path, task, {"bptt": {"type": "int", "low": 10, "high": 99}})
    assert refused(tmp_path, task, {"bptt": {"type": "int", "low": 10, "high": 200}}) == (
        FieldError(
            "task.path",
            "char_lm: the val split has 100 chars, fewer than bptt + 1 = 201 (200 is the "
            "largest bptt the space allows): lower bptt to at most 99 or give more text "
            "(max_chars, val_fraction)",
        )
    )
    # The largest choice counts, wherever it stands in the list.
    error = refused(tmp_path, task, {"bptt": {"type": "categorical", "choices": [300, 50]}})
    assert "bptt + 1 = 301 (300 is the largest" in error.msg
    # Only max_chars characters are read.
    error = refused(tmp_path, {**task, "max_chars": 1000}, {"bptt": 60})
    assert error.msg.startswith("char_lm: the val split has 50 chars, fewer than bptt + 1 = 61:")


def test_default_corpus_checks_max_chars_against_bptt(tmp_path: Path) -> None:
    error = refused(tmp_path, {"kind": "char_lm", "max_chars": 1000})  # bptt 100 by default
    assert error.loc == "task.max_chars"
    assert error.msg.startswith("char_lm: the val split has 50 chars, fewer than bptt + 1 = 101")
    accepted(tmp_path, {"kind": "char_lm", "max_chars": 1000}, {"bptt": 40})
    accepted(tmp_path, {"kind": "char_lm"}, {"bptt": {"type": "categorical", "choices": [50, 200]}})


# --------------------------------------------------------------------------------------
# Bundled data sets
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "package"),
    [
        ({"kind": "forecast", "dataset": "airline"}, "aeon"),
        ({"kind": "forecast", "dataset": "sunspots"}, "statsmodels"),
        ({"kind": "classify", "dataset": "japanese_vowels"}, "aeon"),
        ({"kind": "classify"}, "aeon"),  # japanese_vowels by default
    ],
)
def test_a_bundled_data_set_without_the_extra_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task: dict[str, Any], package: str
) -> None:
    # A None entry in sys.modules is how Python spells "not installed" to find_spec.
    monkeypatch.setitem(sys.modules, package, None)
    error = refused(tmp_path, task)
    assert error.loc == "task.dataset"
    assert f"needs the datasets extra ({package} is missing)" in error.msg
    assert 'pip install "lstm-hpo[datasets]"' in error.msg


def test_a_bundled_series_too_short_for_lookback_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("aeon")
    accepted(tmp_path, {"kind": "forecast", "dataset": "airline", "lookback": 24})
    error = refused(tmp_path, {"kind": "forecast", "dataset": "airline", "lookback": 120})
    assert error.loc == "task.lookback"
    assert error.msg.startswith("forecast: the airline series has 144 points (train 102 /")


def test_bundled_series_lengths_are_the_real_ones() -> None:
    from service.data_checks import BUNDLED_SERIES_FIRST_NONPOSITIVE, BUNDLED_SERIES_LENGTHS
    from service.training.data.forecast import load_bundled_series

    assert BUNDLED_SERIES_FIRST_NONPOSITIVE.keys() == BUNDLED_SERIES_LENGTHS.keys()
    for name, n in BUNDLED_SERIES_LENGTHS.items():
        pytest.importorskip({"airline": "aeon", "sunspots": "statsmodels"}[name])
        series = load_bundled_series(name)
        assert len(series) == n
        bad = np.flatnonzero(series <= 0)
        first = BUNDLED_SERIES_FIRST_NONPOSITIVE[name]
        assert (first[0] if first else None) == (int(bad[0]) + 1 if bad.size else None)


@pytest.mark.parametrize("transform", ["none", "log"])
def test_a_series_too_small_for_float32_metrics_is_refused(tmp_path: Path, transform: str) -> None:
    """A series of 1e-46 trained as zeros and reported every RMSE as 0.0: refused, naming
    the file; the same series in other units (x 1e40) is accepted."""
    values = [1e-46 * (2 + math.sin(i)) for i in range(40)]
    _write(tmp_path, "s.csv", "t,y\n" + "".join(f"{i},{v!r}\n" for i, v in enumerate(values)))
    error = refused(tmp_path, _csv_task(transform=transform))
    what = "geometric mean" if transform == "log" else "standard deviation"
    assert error.loc == "task.path"
    assert error.msg.startswith(f"forecast: s.csv: the training split's {what} is "), error
    assert "below the 1e-30 the model's float32 metrics can report: rescale" in error.msg
    big = "".join(f"{i},{v * 1e40!r}\n" for i, v in enumerate(values))
    _write(tmp_path, "s.csv", "t,y\n" + big)
    accepted(tmp_path, _csv_task(transform=transform))


def test_log_transform_of_a_series_with_zeros_is_refused_at_submit(tmp_path: Path) -> None:
    """Every trial would fail on log(0): the spec is refused naming task.transform."""
    pytest.importorskip("aeon")
    pytest.importorskip("statsmodels")
    accepted(tmp_path, {"kind": "forecast", "dataset": "airline", "transform": "log"})
    error = refused(tmp_path, {"kind": "forecast", "dataset": "sunspots", "transform": "log"})
    assert error == FieldError(
        "task.transform",
        "forecast: the sunspots series holds 0 (first: point 12, the year 1711): `transform: "
        "log` needs every value > 0 (use `transform: none`, or shift the series)",
    )
    accepted(tmp_path, {"kind": "forecast", "dataset": "sunspots"})

    # A CSV: the file and line as an editor counts them, missing rows and all.
    rows = "".join(f"{i},{'NA' if i == 3 else i - 5}\n" for i in range(30))
    _write(tmp_path, "s.csv", "t,y\n" + rows)
    error = refused(tmp_path, _csv_task(transform="log"))
    assert error == FieldError(
        "task.transform",
        "forecast: s.csv line 2: column 'y' is '-5': `transform: log` needs every value > 0 "
        "(use `transform: none`, or shift the series)",
    )
    _write(tmp_path, "s.csv", "t,y\n" + rows.replace(",-", ",", 5))
    error = refused(tmp_path, _csv_task(transform="log"))
    assert error.msg.startswith("forecast: s.csv line 7: column 'y' is '0': "), error
    accepted(tmp_path, _csv_task())
    _write(tmp_path, "s.csv", "t,y\n" + "".join(f"{i},{i + 0.5}\n" for i in range(30)))
    accepted(tmp_path, _csv_task(transform="log"))


# --------------------------------------------------------------------------------------
# One reader for training and the check; no torch at submit
# --------------------------------------------------------------------------------------


def test_training_uses_the_same_readers_and_refuses_the_same_data(tmp_path: Path) -> None:
    from service import data_checks
    from service.search_space import ClassifyTask, ForecastTask, LSTMConfig
    from service.training.data import build_task_data, char_lm, classify, forecast

    assert vars(char_lm)["read_text_file"] is data_checks.read_text_file
    assert vars(forecast)["read_csv_column"] is data_checks.read_csv_column
    assert vars(classify)["read_jsonl"] is data_checks.read_jsonl

    write_case_data(CASES["decimal-comma"], tmp_path)
    task = ForecastTask(kind="forecast", path="decimal-comma.csv", column="passengers")
    with pytest.raises(DataError, match=r"line 2 has 3 fields but the header has 2"):
        build_task_data(task, LSTMConfig(), (tmp_path,))
    write_case_data(CASES["one-class"], tmp_path)
    one_class = ClassifyTask(kind="classify", path="one-class.jsonl")
    with pytest.raises(DataError, match=r"only one class \('walk'\)"):
        build_task_data(one_class, LSTMConfig(), (tmp_path,))
    write_case_data(CASES["cp1252"], tmp_path)
    cp1252 = CharLMTask(kind="char_lm", path="cp1252.txt", max_chars=1000, encoding="cp1252")
    text = build_task_data(cp1252, LSTMConfig(bptt=20), (tmp_path,))
    assert "cp1252.txt, 1,000 chars" in text.description


def test_values_beyond_float32_once_standardised_are_refused_at_submission_and_in_training(
    tmp_path: Path,
) -> None:
    """Each value fits a float32, but standardised by a training split of tiny spread a
    later spike does not: every trial would fail with a NaN metric, blaming the model."""
    from service.search_space import ClassifyTask, ForecastTask, LSTMConfig
    from service.training.data import build_task_data

    values = [1e-10 * (i % 3) for i in range(39)] + [1e30]
    _write(tmp_path, "s.csv", "t,y\n" + "".join(f"{i},{v!r}\n" for i, v in enumerate(values)))
    expected = "forecast: s.csv: point 40 of the series lies more than 1e+15 standard dev"
    assert refused(tmp_path, _csv_task()).msg.startswith(expected)
    task = ForecastTask(kind="forecast", path="s.csv", column="y", lookback=3, horizon=1)
    with pytest.raises(DataError, match=r"point 40 of the series lies more than 1e\+15"):
        build_task_data(task, LSTMConfig(), (tmp_path,))
    # A float32 value whose squared error would not be one (a tester's 1e20 in validation).
    values = [100 + 10 * math.sin(i / 3) for i in range(60)]
    values[45] = 1e20
    _write(tmp_path, "s.csv", "t,y\n" + "".join(f"{i},{v!r}\n" for i, v in enumerate(values)))
    assert "point 46 of the series lies more than" in refused(tmp_path, _csv_task()).msg

    rows = [_seq(c, "train") for c in "ab" * 5] + [_seq(c, "test") for c in "ab"]
    for row in rows[:-1]:
        row["x"] = [[1.0, 1e-20 * (n % 2)] for n in range(2)]
    rows[-1]["x"] = [[1.0, 1e30], [1.0, 0.0]]
    _write(tmp_path, "c.jsonl", _jsonl(rows))
    assert refused(tmp_path, {"kind": "classify", "path": "c.jsonl"}).msg.startswith(
        "classify: c.jsonl: sequence 12 lies more than 1e+15 standard deviations"
    )
    with pytest.raises(DataError, match=r"sequence 12 lies more than 1e\+15"):
        build_task_data(ClassifyTask(kind="classify", path="c.jsonl"), LSTMConfig(), (tmp_path,))


def test_the_check_imports_neither_torch_nor_training() -> None:
    code = (
        "import sys, service.data_checks; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'lightning'} "
        "or m.startswith('service.training')); print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
