"""Task data readers and the submit-time data check; pure Python and numpy, no torch.

The readers and the split arithmetic here are the ones training uses
(``service.training.data``), so a study whose data passes :func:`check_task_data` at submit
cannot fail on its data in a trial, and one that would is refused before any trial runs:
the API answers 422 naming the field (``task.path``, ``task.dataset``, ...) and the line or
byte of the problem.

Readers raise :class:`~service.errors.DataError` naming the file and, where there is one,
the line (text) or the byte offset (undecodable bytes).
"""

from __future__ import annotations

import codecs
import csv
import difflib
import importlib.util
import json
import math
import re
import stat
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice, pairwise
from pathlib import Path
from typing import Any

import numpy as np

from service.corpora import corpus_length_bound
from service.errors import DataError, FieldError, InvalidConfig, InvalidSpec, NotPositive
from service.search_space import (
    CategoricalDistribution,
    CharLMTask,
    ClassifyTask,
    ForecastTask,
    IntDistribution,
    LSTMConfig,
    StudySpec,
    largest_config,
    resolve_data_path,
)

__all__ = [
    "BUNDLED_PACKAGES",
    "CharSplits",
    "ClassifySplits",
    "Label",
    "LabelledSequences",
    "SplitBounds",
    "char_split_sizes",
    "check_char_splits",
    "check_series_fits",
    "check_stream_split",
    "check_task_data",
    "forecast_bounds",
    "in_user_terms",
    "log_series",
    "needs_datasets_extra",
    "read_csv_column",
    "read_jsonl",
    "read_text_file",
    "scale_series",
    "split_bounds",
    "split_classify",
    "split_text",
    "stratified_split",
    "test_size_error",
]

Label = str | int

#: The package each bundled data set is loaded from (the ``datasets`` extra).
BUNDLED_PACKAGES: Mapping[str, str] = {
    "airline": "aeon",
    "sunspots": "statsmodels",
    "japanese_vowels": "aeon",
}
#: Points in each bundled series (monthly airline passengers 1949-1960; yearly sunspots
#: 1700-2008), so that lookback + horizon is checked at submit without loading them.
BUNDLED_SERIES_LENGTHS: Mapping[str, int] = {"airline": 144, "sunspots": 309}
#: The first point (1-based, and its date) of each bundled series that is not > 0, which
#: ``transform: log`` cannot take, or None: checked at submit without loading the series.
BUNDLED_SERIES_FIRST_NONPOSITIVE: Mapping[str, tuple[int, str] | None] = {
    "airline": None,
    "sunspots": (12, "the year 1711"),
}

#: CSV cells that mean "no value" (the row is dropped and counted).
_MISSING = frozenset({"", "na", "nan", "null", "none", "n/a"})
#: Fixed seeds: the classify splits depend on the data only, never on the model's seed.
_TEST_SPLIT_SEED = 0
_VAL_SPLIT_SEED = 1
#: Problems reported from one JSON Lines file before giving up.
_MAX_REPORTED = 10
#: The largest finite float32: the model trains in float32, and a larger value (a corrupt
#: 1e308) overflows the standardisation or the cast, failing every trial with a NaN metric.
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: How much of a bad value an error message shows (an unclosed quote makes a cell run to
#: the end of the file).
_SHOWN_CHARS = 40
#: The largest standardised value (in training standard deviations from the training mean)
#: a trial can train on: a forecast's squared errors, summed over a batch, must stay
#: finite in float32 (sqrt(3.4e38) = 1.8e19, with room for 10^8 terms). No real series
#: holds a value 10^15 standard deviations out; a corrupt one does.
STANDARDISED_MAX = 1e15
#: Bytes read at a time when decoding.
_CHUNK = 1 << 20
_INTEGER = re.compile(r"[+-]?\d+")
_DIGITS = re.compile(r"\d+")


# --------------------------------------------------------------------------------------
# Reading files: one place that opens them and turns OS and decode errors into messages
# --------------------------------------------------------------------------------------


def _is_text_encoding(encoding: str) -> bool:
    """False for codecs that do not decode bytes to text (base64, hex, rot13 ...)."""
    try:
        b"\0".decode(encoding)  # not b"": decoding nothing never looks the codec up
    except ValueError:  # a text codec that refuses the byte (utf-16 wants two)
        return True
    except LookupError:
        return False
    return True


def _is_utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name == "utf-8"


def _shown_encoding(encoding: str) -> str:
    return "UTF-8" if _is_utf8(encoding) else encoding


def _decode_error_position(path: Path, encoding: str) -> tuple[int, int, str] | None:
    """(byte offset, line, reason) of the first bytes of ``path`` ``encoding`` cannot decode.

    Decodes incrementally from the start, so the offset counts from the start of the file
    (a text stream's own ``UnicodeDecodeError`` counts from the start of its chunk).
    """
    decoder = codecs.getincrementaldecoder(encoding)()
    consumed = 0
    newlines = 0
    with path.open("rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            final = not chunk
            pending = len(decoder.getstate()[0])  # undecoded bytes carried from the last chunk
            try:
                text = decoder.decode(chunk, final)
            except UnicodeDecodeError as err:
                try:
                    head = err.object[: err.start].decode(encoding, errors="replace")
                except UnicodeError:  # a codec without the "replace" handler (idna)
                    head = err.object[: err.start].decode("latin-1")
                return consumed - pending + err.start, newlines + head.count("\n") + 1, err.reason
            newlines += text.count("\n")
            consumed += len(chunk)
            if final:
                return None


def _undecodable(kind: str, path: Path, encoding: str, err: UnicodeDecodeError) -> DataError:
    where = _decode_error_position(path, encoding)
    offset, line, reason = where if where is not None else (err.start, 0, err.reason)
    at = f"at byte {offset}, line {line}" if line else f"at byte {offset}"
    hint = (
        "set task.encoding to the file's encoding (e.g. encoding: cp1252 for Windows text)"
        if _is_utf8(encoding)
        else "check task.encoding"
    )
    return DataError(
        f"{kind}: {path}: not {_shown_encoding(encoding)} text ({reason} {at}): {hint}"
    )


@contextmanager
def _reading(kind: str, path: Path, what: str, encoding: str) -> Iterator[None]:
    """Check that ``path`` is a regular file, and name the file in any error while reading it."""
    if not _is_text_encoding(encoding):
        raise DataError(f"{kind}: {path}: {encoding!r} is not a text encoding")
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError
        if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end
            raise DataError(f"{kind}: {path}: not a regular file (need {what})")
        yield
    except FileNotFoundError:
        raise DataError(f"{kind}: {path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{kind}: {path}: is a directory, not {what}") from None
    except UnicodeDecodeError as err:
        raise _undecodable(kind, path, encoding, err) from None
    except UnicodeError as err:  # e.g. utf-16 without a byte-order mark, idna
        raise DataError(
            f"{kind}: {path}: not {_shown_encoding(encoding)} text ({err}): check task.encoding"
        ) from None
    except OSError as err:
        raise DataError(f"{kind}: {path}: cannot read ({err.strerror})") from None


def _text_codec(encoding: str) -> str:
    """A UTF-8 file may start with a byte-order mark (Excel writes one): drop it."""
    return "utf-8-sig" if _is_utf8(encoding) else encoding


# --------------------------------------------------------------------------------------
# char_lm: a text file
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CharSplits:
    """A corpus split into contiguous train / val / test parts (train first)."""

    train: str
    val: str
    test: str

    @property
    def sizes(self) -> tuple[int, int, int]:
        return len(self.train), len(self.val), len(self.test)


def read_text_file(path: Path, max_chars: int, encoding: str = "utf-8") -> str:
    """The first ``max_chars`` characters of a text file in ``encoding`` (newlines kept as is).

    Only the bytes those characters need are decoded. Raises :class:`DataError` naming the
    file: missing, a directory, empty, or undecodable (with the byte offset and line).
    """
    parts: list[str] = []
    n = 0
    with _reading("char_lm", path, "a text file", encoding), path.open("rb") as f:
        decoder = codecs.getincrementaldecoder(encoding)()
        while n < max_chars:
            # A character takes at least one byte: never decode far past max_chars.
            chunk = f.read(min(max(max_chars - n, 4), _CHUNK))
            text = decoder.decode(chunk, final=not chunk)
            parts.append(text)
            n += len(text)
            if not chunk:
                break
    text = "".join(parts)[:max_chars]
    if not text:
        raise DataError(f"char_lm: {path}: the file is empty")
    return text


def char_split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) lengths of an ``n``-character corpus split by :func:`split_text`."""
    n_val, n_test = int(n * val_fraction), int(n * test_fraction)
    return n - n_val - n_test, n_val, n_test


def split_text(text: str, val_fraction: float, test_fraction: float) -> CharSplits:
    """Contiguous split: train, then val, then test (the last parts)."""
    n_train, n_val, _ = char_split_sizes(len(text), val_fraction, test_fraction)
    return CharSplits(text[:n_train], text[n_train : n_train + n_val], text[n_train + n_val :])


def check_char_splits(sizes: tuple[int, int, int], bptt: int, *, largest: bool = False) -> None:
    """:class:`DataError` unless each split (sizes train, val, test) holds ``bptt + 1`` chars.

    ``largest``: ``bptt`` is the largest the search space allows (said in the message).
    """
    for name, size in zip(("train", "val", "test"), sizes, strict=True):
        if size < bptt + 1:
            which = f" ({bptt} is the largest bptt the space allows)" if largest else ""
            raise DataError(
                f"char_lm: the {name} split has {size:,} chars, fewer than bptt + 1 = "
                f"{bptt + 1}{which}: lower bptt to at most {max(size - 1, 1)} or give more "
                f"text (max_chars, {name}_fraction)"
            )


def check_stream_split(size: int, streams: int, split: str) -> None:
    """:class:`DataError` unless a split of ``size`` characters cuts into ``streams`` rows of
    at least 2 characters (``stateful``: a batch is ``batch_size`` parallel streams)."""
    if size // streams < 2:
        raise DataError(
            f"char_lm stateful: the {split} split ({size:,} characters) cannot be cut into "
            f"batch_size {streams} streams of 2 or more characters; use batch_size <= "
            f"{max(1, size // 2)} or more data"
        )


def _stream_error(spec: StudySpec, sizes: tuple[int, int, int]) -> FieldError | None:
    """A ``stateful`` space whose largest batch cannot be cut from every split."""
    stateful = spec.space.get("stateful")
    if not (
        stateful is True
        or (isinstance(stateful, CategoricalDistribution) and True in stateful.choices)
    ):
        return None
    try:
        batch_size = largest_config(spec).params.batch_size
    except InvalidConfig:
        return None  # the space's top values do not combine: the trial says what is wrong
    for name, size in zip(("train", "val", "test"), sizes, strict=True):
        try:
            check_stream_split(size, batch_size, name)
        except DataError as err:
            return FieldError("space.batch_size", err.message)
    return None


# --------------------------------------------------------------------------------------
# forecast: one column of a CSV file
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitBounds:
    """Where the val and test parts of a series start (train is ``[0, val_start)``)."""

    val_start: int
    test_start: int
    n: int

    @property
    def sizes(self) -> tuple[int, int, int]:
        return self.val_start, self.test_start - self.val_start, self.n - self.test_start


def _extra_fields(row: list[str]) -> str:
    """Why a row may have more fields than the header: two integer fields side by side
    are most likely one number written with a decimal comma."""
    for left, right in pairwise(row):
        if _INTEGER.fullmatch(left.strip()) and _DIGITS.fullmatch(right.strip()):
            decimal = f"{left.strip()},{right.strip()}"
            return f"a decimal comma ({decimal})? quote the value or use '.' as the decimal mark"
    return "an unquoted ',' inside a value? quote the value"


def _clipped(text: str) -> str:
    """``text`` for an error message: quoted, at most :data:`_SHOWN_CHARS` characters."""
    return repr(text) if len(text) <= _SHOWN_CHARS else repr(text[:_SHOWN_CHARS]) + "..."


def _shown_json(value: Any) -> str:
    """``value`` as JSON for an error message, at most :data:`_SHOWN_CHARS` characters."""
    text = json.dumps(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


def _column_not_found(path: Path, column: str, names: list[str]) -> DataError:
    shown = ", ".join(_clipped(n) for n in names[:20])
    hint = ""
    if len(names) == 1 and any(sep in names[0] for sep in ";\t|"):
        hint = " - only ',' separates fields: is the file separated by ';', tabs or '|'?"
    return DataError(f"forecast: {path}: no column {column!r} (columns: {shown}){hint}")


def read_csv_column(
    path: Path, column: str, encoding: str = "utf-8", *, positive: bool = False
) -> tuple[np.ndarray, list[int]]:
    """The numbers in ``column`` (a header row is required) and the lines of the rows
    dropped for a missing value.

    Returns (float64[n], dropped line numbers, 1-based as an editor counts). Empty cells and
    NA/NaN/null are missing: the series is read without them (a gap closes up). Raises
    :class:`DataError` naming the file and line (a quoted field over several lines: the
    lines it spans) for: a row with more fields than the header (an unquoted ',' such as a
    decimal comma), a row too short to have ``column``, a value that is not a number
    (``1_000`` neither: Python's digit separator is no CSV's), not finite or beyond the
    float32 range (:data:`FLOAT32_MAX`); and naming the file for a missing, empty or
    undecodable file (with the byte offset), a missing column or one whose name two
    columns of the header share. ``positive`` (``transform: log``): a value <= 0 raises
    :class:`NotPositive` naming its line.
    """
    values: list[float] = []
    dropped: list[int] = []
    with (
        _reading("forecast", path, "a CSV file", encoding),
        path.open(encoding=_text_codec(encoding), newline="") as f,
    ):
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"forecast: {path}: the file is empty (a header row is needed)")
            names = [h.strip() for h in header]
            if column not in names:
                raise _column_not_found(path, column, names)
            if names.count(column) > 1:
                places = [str(i + 1) for i, name in enumerate(names) if name == column]
                raise DataError(
                    f"forecast: {path}: {len(places)} columns are named {column!r} (columns "
                    f"{', '.join(places)} of the header): rename all but the one to use"
                )
            col = names.index(column)
            end = reader.line_num
            for row in reader:
                start, end = end + 1, reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # a blank line
                spans = f"lines {start}-{end} (one quoted field: is a quote unclosed?)"
                where = f"forecast: {path} " + (f"line {end}" if start == end else spans)
                if len(row) > len(names):
                    raise DataError(
                        f"{where} has {len(row)} fields but the header has {len(names)}: "
                        + _extra_fields(row)
                    )
                if col >= len(row):
                    raise DataError(
                        f"{where} has {len(row)} fields but the header has {len(names)}: no "
                        f"value for column {column!r} (write an empty cell for a missing value)"
                    )
                cell = row[col].strip()
                if cell.lower() in _MISSING:
                    dropped.append(end)
                    continue
                try:
                    if "_" in cell:
                        raise ValueError(cell)
                    value = float(cell)
                except ValueError:
                    raise DataError(
                        f"{where}: column {column!r} is not numeric ({_clipped(cell)})"
                    ) from None
                if math.isnan(value):
                    dropped.append(end)
                    continue
                if math.isinf(value) and cell.lower().lstrip("+-") not in ("inf", "infinity"):
                    value = math.copysign(FLOAT32_MAX * 2, value)  # digits past float64
                if not math.isfinite(value):
                    raise DataError(f"{where}: column {column!r} is not finite ({cell!r})")
                if abs(value) > FLOAT32_MAX:
                    raise DataError(
                        f"{where}: column {column!r} is {_clipped(cell)}, beyond the float32 range "
                        f"(+-{FLOAT32_MAX:.3g}) the model trains in"
                    )
                if positive and not value > 0:
                    raise NotPositive(f"{where}: column {column!r} is {_clipped(cell)}: {_NO_LOG}")
                values.append(value)
        except csv.Error as err:
            raise DataError(
                f"forecast: {path} line {reader.line_num}: malformed CSV ({err})"
            ) from None
    return np.asarray(values, dtype=np.float64), dropped


def log_series(series: np.ndarray, source: str) -> np.ndarray:
    """``log(series)`` for ``task.transform: log`` (float64[n] -> float64[n]).

    Raises :class:`NotPositive` naming ``source`` and the first point that is not > 0 (the
    logarithm of 0 or of a negative number is no number: every trial would fail on it).
    """
    bad = np.flatnonzero(~(series > 0))
    if bad.size:
        first = int(bad[0])
        raise NotPositive(
            f"{source}: point {first + 1:,} of the series is {series[first]:g}: {_NO_LOG}"
        )
    logs: np.ndarray = np.log(series)
    return logs


_NO_LOG = "`transform: log` needs every value > 0 (use `transform: none`, or shift the series)"


#: The smallest scale a forecast series may have (its training sd, or geometric mean with
#: ``transform: log``): RMSEs are float32 multiples of it, and below ~1e-38 float32 has
#: only subnormals, then 0 (a series of 1e-46 reported every RMSE as 0.0).
SERIES_SCALE_MIN = 1e-30


def scale_series(
    series: np.ndarray, val_start: int, source: str, transform: str
) -> tuple[np.ndarray, float, float]:
    """What a forecast model sees of ``series``: its log with ``transform: log``
    (:func:`log_series`), standardised by the training part (:func:`standardise_series`):
    (float64[n], mean, sd). Raises :class:`DataError` naming ``source`` also when the
    series' scale is below :data:`SERIES_SCALE_MIN` (rescale the column)."""
    logged = transform == "log"
    modelled = log_series(series, source) if logged else series
    scaled, mean, sd = standardise_series(modelled, val_start, source)
    unit = math.exp(mean) if logged else sd  # Problem.metric_unit, without importing torch
    if unit < SERIES_SCALE_MIN:
        what = "geometric mean" if logged else "standard deviation"
        raise DataError(
            f"{source}: the training split's {what} is {unit:.3g}, below the "
            f"{SERIES_SCALE_MIN:g} the model's float32 metrics can report: rescale the series "
            "(e.g. to other units)"
        )
    return scaled, mean, sd


def standardise_series(
    series: np.ndarray, val_start: int, source: str
) -> tuple[np.ndarray, float, float]:
    """``series`` standardised by its training part ``series[:val_start]`` (mean 0, sd 1; a
    constant training part keeps its units): (float64[n], mean, sd).

    Raises :class:`DataError` naming ``source`` and the point when a standardised value
    lies beyond the float32 range (a spike of 1e30 after a training part of sd 1e-10):
    checked at submission, not left to fail every trial with a NaN metric.
    """
    train = series[:val_start]
    mean = float(train.mean())
    sd = float(train.std()) or 1.0
    scaled = (series - mean) / sd
    if (i := _first_far_out(scaled)) is not None:
        raise _far_out(f"{source}: point {i + 1} of the series")
    return scaled, mean, sd


def _first_far_out(scaled: np.ndarray) -> int | None:
    """The first row of ``scaled`` (of a 1-D array: element) holding a value beyond
    :data:`STANDARDISED_MAX`, or None."""
    fits = (np.abs(scaled) <= STANDARDISED_MAX).reshape(len(scaled), -1).all(axis=1)
    rows = np.flatnonzero(~fits)
    return int(rows[0]) if rows.size else None


def _far_out(where: str) -> DataError:
    return DataError(
        f"{where} lies more than {STANDARDISED_MAX:.0e} standard deviations of the training "
        "split from its mean (beyond what float32 training can square): a corrupt value?"
    )


def split_bounds(
    n: int, val_fraction: float, test_fraction: float, test_size: int | None = None
) -> SplitBounds:
    """Chronological split: train first, then val, then test (the last ``test_fraction``
    of the ``n`` points, or the last ``test_size`` when it is given)."""
    n_test = min(n, test_size) if test_size is not None else int(n * test_fraction)
    n_val = int(n * val_fraction)
    return SplitBounds(val_start=max(0, n - n_val - n_test), test_start=n - n_test, n=n)


def test_size_error(task: ForecastTask, n: int, series: str) -> FieldError | None:
    """``task.test_size`` that leaves no training data, or holds no whole forecast window."""
    size = task.test_size
    if size is None:
        return None
    if size >= n:
        return FieldError(
            "task.test_size", f"must be below the {n:,} points of {series} (it is {size:,})"
        )
    if size < task.horizon:
        return FieldError(
            "task.test_size",
            f"must be at least horizon ({task.horizon}): the test split needs one whole window",
        )
    return None


def forecast_bounds(task: ForecastTask, n: int) -> SplitBounds:
    """The train / val / test bounds of a forecast task's ``n``-point series."""
    return split_bounds(n, task.val_fraction, task.test_fraction, task.test_size)


def check_series_fits(bounds: SplitBounds, lookback: int, horizon: int) -> None:
    """:class:`DataError` saying what would fit unless every split holds at least one window.

    Train needs ``lookback + horizon`` points; val and test need ``horizon`` (their inputs
    may reach back into the previous split).
    """
    n_train, n_val, n_test = bounds.sizes
    if n_train >= lookback + horizon and min(n_val, n_test) >= horizon:
        return
    max_horizon = min(n_val, n_test, n_train - 1)
    if horizon <= max_horizon:
        fits = f"lookback <= {n_train - horizon} at horizon {horizon}"
    elif max_horizon >= 1:
        fits = f"horizon <= {max_horizon} (with lookback <= {n_train - max_horizon})"
    else:
        fits = "nothing: the series is too short to split; give more data or larger fractions"
    raise DataError(
        f"forecast: the series has {bounds.n:,} points (train {n_train:,} / val {n_val:,} / "
        f"test {n_test:,}): lookback {lookback} + horizon {horizon} needs train >= "
        f"{lookback + horizon} and val, test >= {horizon}; what would fit: {fits}"
    )


# --------------------------------------------------------------------------------------
# classify: a JSON Lines file of labelled sequences
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledSequences:
    """Time-major sequences ``(T_i, F)`` with their labels; ``splits`` is None without a split."""

    xs: list[np.ndarray]
    labels: list[Label]
    splits: list[str] | None


@dataclass(frozen=True)
class _Row:
    lineno: int
    x: np.ndarray
    label: Label
    split: str | None


def read_jsonl(path: Path, encoding: str = "utf-8") -> LabelledSequences:
    """Read ``{"x": [[f1, ...], ...], "label": ..., "split": "train" | "test"}`` per line.

    Every problem is reported with its line number (up to ten at once) in a
    :class:`DataError`; so are a missing, empty or undecodable file (with the byte offset).
    """
    errors: list[str] = []
    rows: list[_Row] = []
    with (
        _reading("classify", path, "a JSON Lines file", encoding),
        path.open(encoding=_text_codec(encoding)) as f,
    ):
        for lineno, line in enumerate(f, start=1):
            if len(errors) >= _MAX_REPORTED:
                break
            if not line.strip():
                continue
            row = _parse_line(line, lineno)
            problem = row if isinstance(row, str) else _mismatch(row, rows[0] if rows else None)
            if problem is not None:
                errors.append(f"line {lineno}: {problem}")
            elif isinstance(row, _Row):
                rows.append(row)
    if errors:
        more = " (stopped there)" if len(errors) >= _MAX_REPORTED else ""
        raise DataError(f"classify: {path}: " + "; ".join(errors) + more)
    if not rows:
        raise DataError(f"classify: {path}: no sequences (the file has no non-blank lines)")
    odd = next((r for r in rows if (r.split is None) != (rows[0].split is None)), None)
    if odd is not None:
        raise DataError(
            f"classify: {path} line {odd.lineno}: `split` must be on every line or on none"
        )
    xs, labels = [r.x for r in rows], [r.label for r in rows]
    if rows[0].split is None:
        return LabelledSequences(xs, labels, None)
    splits = [r.split for r in rows if r.split is not None]
    for needed in ("train", "test"):
        if needed not in splits:
            raise DataError(f'classify: {path}: no line has "split": "{needed}"')
    return LabelledSequences(xs, labels, splits)


def _parse_line(line: str, lineno: int) -> _Row | str:
    """One line's sequence, label and split; or what is wrong with it."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:  # its msg may end in "at" ("control character at")
        return f"not valid JSON ({err.msg.removesuffix(' at')} at column {err.colno})"
    except ValueError:  # Python's cap on an integer's digits (CVE-2020-10735)
        return f"not valid JSON (a number of more than {sys.get_int_max_str_digits()} digits)"
    except RecursionError:
        return "not valid JSON (nested too deeply)"
    if not isinstance(obj, dict):
        return "expected a JSON object with `x` and `label`"
    if "x" not in obj or "label" not in obj:
        return "`x` and `label` are required"
    x, label, split = obj["x"], obj["label"], obj.get("split")
    if not isinstance(x, list) or not x or not all(isinstance(step, list) and step for step in x):
        return "`x` must be a non-empty list of time steps, each a non-empty list of numbers"
    width = len(x[0])
    for t, step in enumerate(x):
        if len(step) != width:
            return f"`x` time step {t} has {len(step)} features, time step 0 has {width}"
        # numpy would silently turn "1.5" or true into numbers: check the JSON types here.
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in step):
            return f"`x` time step {t} has a value that is not a number"
        # abs() of an int never overflows, as math.isfinite(10**400) does.
        if not all(isinstance(v, int) or math.isfinite(v) for v in step):
            return f"`x` time step {t} has a value that is not finite"
        if not all(abs(v) <= FLOAT32_MAX for v in step):
            return f"`x` time step {t} has a value beyond the float32 range (+-{FLOAT32_MAX:.3g})"
    if not isinstance(label, str | int) or isinstance(label, bool):
        return f"`label` must be a string or an integer, not {_shown_json(label)}"
    if split is not None and split not in ("train", "test"):
        return f'`split` must be "train" or "test", not {_shown_json(split)}'
    return _Row(lineno, np.asarray(x, dtype=np.float64), label, split)


def _mismatch(row: _Row, first: _Row | None) -> str | None:
    """What makes ``row`` inconsistent with the file's first good line, if anything."""
    if first is None:
        return None
    if row.x.shape[1] != first.x.shape[1]:
        return (
            f"`x` has {row.x.shape[1]} features per time step, "
            f"line {first.lineno} has {first.x.shape[1]}"
        )
    if type(row.label) is not type(first.label):
        kinds = {str: "a string", int: "an integer"}
        return (
            f"`label` is {kinds[type(row.label)]} but on line {first.lineno} it is "
            f"{kinds[type(first.label)]}: use one type for all labels"
        )
    return None


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices, sorted: about ``fraction`` of each class held out, seeded."""
    rng = np.random.default_rng(seed)
    kept: list[np.ndarray] = []
    held: list[np.ndarray] = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_held = math.floor(len(idx) * fraction + 0.5)  # round half up
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


@dataclass(frozen=True)
class ClassifySplits:
    """Class ids and the indices of each split into a :class:`LabelledSequences`."""

    #: class id -> original label, sorted.
    classes: list[Label]
    #: Int64[N]: each sequence's class id.
    y: np.ndarray
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def untrained(self) -> dict[Label, tuple[int, int]]:
        """The classes no training sequence has (a label typo such as ``Cat`` beside
        ``cat``, or a class only the file's test split holds), each with its number of
        validation and test sequences: no trial can predict them."""
        trained = set(self.y[self.train].tolist())
        return {
            label: (int((self.y[self.val] == i).sum()), int((self.y[self.test] == i).sum()))
            for i, label in enumerate(self.classes)
            if i not in trained
        }


def untrained_classes_note(user_path: str, splits: ClassifySplits) -> str | None:
    """The study's note on :meth:`ClassifySplits.untrained` classes, or None when every
    class is trained. Not an error (an open-set test is legitimate), not silent either:
    every sequence of such a class is an error on the validation and test metrics."""
    untrained = splits.untrained()
    if not untrained:
        return None
    named = "; ".join(
        f"{label!r} ({n_val} validation, {n_test} test)"
        for label, (n_val, n_test) in list(untrained.items())[:5]
    )
    more = f" and {len(untrained) - 5:,} more" if len(untrained) > 5 else ""
    return (
        f"task.path: {user_path}: {len(untrained):,} of {len(splits.classes):,} classes have "
        f"no training sequence, so no trial can predict them: {named}{more}; is a label "
        "misspelt, or does the file's test split hold a class its train split lacks?"
    )


def feature_scaling(
    data: LabelledSequences, train: np.ndarray, source: str
) -> tuple[np.ndarray, np.ndarray]:
    """(mean, sd) of each feature over the time steps of the training sequences ``train``
    (a constant feature: sd 1), as two float64[F]; what classify trials standardise by.

    Raises :class:`DataError` naming ``source`` and the sequence when a standardised value
    lies beyond the float32 range.
    """
    stacked = np.concatenate([data.xs[i] for i in train])
    mean, sd = stacked.mean(axis=0), stacked.std(axis=0)
    sd[sd == 0.0] = 1.0  # a constant feature: centre it, do not blow it up
    for n, x in enumerate(data.xs):
        if _first_far_out((x - mean) / sd) is not None:
            raise _far_out(f"{source}: sequence {n + 1}")
    return mean, sd


def split_classify(
    data: LabelledSequences, val_fraction: float, test_fraction: float, source: str
) -> ClassifySplits:
    """Split labelled sequences: the file's ``split`` (or a stratified ``test_fraction``) for
    test, then a stratified ``val_fraction`` of the rest for validation.

    Raises :class:`DataError` naming ``source`` when the train split has fewer than two
    classes or any split is empty.
    """
    classes: list[Label] = sorted(set(data.labels))  # one label type per file (checked)
    class_id = {c: i for i, c in enumerate(classes)}
    y = np.array([class_id[label] for label in data.labels], dtype=np.int64)
    if data.splits is not None:
        is_test = np.array([s == "test" for s in data.splits])
        train_pool, test_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    else:
        train_pool, test_idx = stratified_split(y, test_fraction, _TEST_SPLIT_SEED)
    kept, held = stratified_split(y[train_pool], val_fraction, _VAL_SPLIT_SEED)
    train_idx, val_idx = train_pool[kept], train_pool[held]
    in_train = np.unique(y[train_idx])
    if len(in_train) == 1:
        only = classes[int(in_train[0])]
        elsewhere = [repr(c) for i, c in enumerate(classes) if i != in_train[0]]
        also = f" ({', '.join(elsewhere)} only in the test split)" if elsewhere else ""
        raise DataError(
            f"classify: {source}: the train split has only one class ({only!r}){also}; "
            "a classifier needs at least two"
        )
    for name, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
        if len(idx) == 0:
            raise DataError(
                f"classify: {source}: the {name} split is empty ({len(y)} sequences); "
                "give more sequences or larger fractions"
            )
    return ClassifySplits(classes, y, train_idx, val_idx, test_idx)


# --------------------------------------------------------------------------------------
# Bundled data sets
# --------------------------------------------------------------------------------------


def needs_datasets_extra(kind: str, dataset: str, package: str) -> str:
    """The message for a bundled data set whose package is not installed."""
    return (
        f"{kind}: the {dataset} data set needs the datasets extra ({package} is missing): "
        'pip install "lstm-hpo[datasets]"'
    )


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # ValueError: imported, but without a __spec__
        return package in sys.modules


# --------------------------------------------------------------------------------------
# The submit-time check
# --------------------------------------------------------------------------------------


def check_task_data(spec: StudySpec, data_roots: tuple[Path, ...] | None) -> list[str]:
    """Refuse a spec whose data a trial would fail on, before any trial runs; return what
    the user should know of data that is accepted (the study's notes: rows of a CSV series
    dropped for a missing value, with their lines; classes with no training sequence).

    Checks, from the data and the space alone, what the training builders would fail on:
    the file (exists, is a file, decodes in ``task.encoding``, parses) and whether its
    splits fit the task (char_lm: every split holds the largest ``bptt`` the space allows
    + 1 characters; forecast: lookback + horizon; classify: two classes in train, no empty
    split); a bundled data set needs its package installed. Reads each file once (char_lm:
    at most ``max_chars`` characters) and never imports torch.

    ``data_roots``: where relative paths are looked up (``service.search_space.
    resolve_data_path``). Raises :class:`~service.errors.InvalidSpec` with one
    :class:`~service.errors.FieldError` (``task.path``, ``task.dataset``, ``task.encoding``,
    ``task.max_chars`` or ``task.lookback``) whose message names the line or byte.
    """
    task = spec.task
    notes: list[str] = []
    if not isinstance(task, CharLMTask | ForecastTask | ClassifyTask):
        return notes  # adding and synthetic tasks generate their data
    if task.path is not None:
        error = _encoding_error(task.encoding) or _file_error(spec, task.path, data_roots, notes)
    elif isinstance(task, CharLMTask):
        error = _bundled_corpus_error(spec, task)
    else:
        error = _bundled_error(task)
    if error is not None:
        raise InvalidSpec([error])
    return notes


def _encoding_error(encoding: str) -> FieldError | None:
    if _is_text_encoding(encoding):
        return None
    return FieldError("task.encoding", f"{encoding!r} is not a text encoding")


def _file_error(
    spec: StudySpec, user_path: str, data_roots: tuple[Path, ...] | None, notes: list[str]
) -> FieldError | None:
    task = spec.task
    path = resolve_data_path(user_path, data_roots)
    try:
        if isinstance(task, CharLMTask):
            text = read_text_file(path, task.max_chars, task.encoding)
            sizes = char_split_sizes(len(text), task.val_fraction, task.test_fraction)
            bptt, searched = _largest_bptt(spec)
            check_char_splits(sizes, bptt, largest=searched)
            stream_error = _stream_error(spec, sizes)
            if stream_error is not None:
                return stream_error
        elif isinstance(task, ForecastTask):
            assert task.column is not None  # the spec guarantees it with a path
            try:
                series, dropped = read_csv_column(
                    path, task.column, task.encoding, positive=task.transform == "log"
                )
            except NotPositive as err:
                return FieldError(
                    "task.transform", in_user_terms(err.message, user_path, data_roots)
                )
            if dropped:
                notes.append(missing_values_note(user_path, task.column, dropped))
            size_error = test_size_error(task, len(series), f"column {task.column!r}")
            if size_error is not None:
                return size_error
            bounds = forecast_bounds(task, len(series))
            check_series_fits(bounds, task.lookback, task.horizon)
            scale_series(series, bounds.val_start, f"forecast: {path}", task.transform)
        elif isinstance(task, ClassifyTask):
            data = read_jsonl(path, task.encoding)
            splits = split_classify(data, task.val_fraction, task.test_fraction, path.name)
            feature_scaling(data, splits.train, f"classify: {path}")
            if (note := untrained_classes_note(user_path, splits)) is not None:
                notes.append(note)
    except DataError as err:
        message = in_user_terms(err.message, user_path, data_roots)
        if message.endswith(": no such file"):
            message += _similar_names(path)
        return FieldError("task.path", message)
    return None


def in_user_terms(message: str, user_path: str, data_roots: tuple[Path, ...] | None) -> str:
    """``message`` with the file ``user_path`` resolved to (:func:`resolve_data_path`)
    written as the user wrote it: the server's own directories stay private, at submit and
    in a trial's failure reason alike."""
    resolved = str(resolve_data_path(user_path, data_roots))
    return message.replace(resolved, user_path) if resolved != user_path else message


def missing_values_note(user_path: str, column: str, lines: Sequence[int]) -> str:
    """What reading a series without its missing values did, for the study's notes: not
    an error (a gap is common), not silent either (the steps around each gap become
    neighbours, which a seasonal series may not want)."""
    more = f" and {len(lines) - 5:,} more" if len(lines) > 5 else ""
    shown = ("line " if len(lines) == 1 else "lines ") + ", ".join(map(str, lines[:5])) + more
    rows = "1 row" if len(lines) == 1 else f"{len(lines):,} rows"
    return (
        f"task.path: {user_path}: {rows} with no value in column {column!r} dropped "
        f"({shown}): the series is read without them, so each gap closes up; fill them in "
        "the file (interpolate) if the time steps must stay evenly spaced"
    )


def _similar_names(path: Path) -> str:
    """`` (did you mean 'x.csv'?)`` when a file beside the missing one has a similar name."""
    try:
        names = [p.name for p in islice(path.parent.iterdir(), 10_000)]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=3)
    return f" (did you mean {' or '.join(repr(n) for n in close)}?)" if close else ""


def _largest_bptt(spec: StudySpec) -> tuple[int, bool]:
    """The largest ``bptt`` any trial of ``spec`` can sample, and whether it is searched."""
    dist = spec.space.get("bptt")
    searched = isinstance(dist, IntDistribution | CategoricalDistribution)
    try:
        top = largest_config(spec).params.bptt
    except InvalidConfig:  # the top values of other parameters do not combine
        top = _space_top_bptt(spec)
    if isinstance(dist, CategoricalDistribution):
        # largest_config takes a categorical's last choice; the largest need not be last.
        top = max(top, *(int(c) for c in dist.choices if isinstance(c, int | float | str)))
    return top, searched


def _space_top_bptt(spec: StudySpec) -> int:
    dist = spec.space.get("bptt")
    if isinstance(dist, IntDistribution):
        return dist.low + (dist.high - dist.low) // dist.step * dist.step
    if isinstance(dist, int | float | str) and not isinstance(dist, bool):
        return int(dist)
    return int(LSTMConfig.model_fields["bptt"].default)


def _bundled_corpus_error(spec: StudySpec, task: CharLMTask) -> FieldError | None:
    """A bundled corpus is large: only ``max_chars`` and the fractions can be too small."""
    assert task.corpus is not None  # no path
    length = corpus_length_bound(task.corpus, task.max_chars)
    sizes = char_split_sizes(length, task.val_fraction, task.test_fraction)
    bptt, searched = _largest_bptt(spec)
    try:
        check_char_splits(sizes, bptt, largest=searched)
    except DataError as err:
        return FieldError("task.max_chars", err.message)
    return _stream_error(spec, sizes)


def _bundled_error(task: ForecastTask | ClassifyTask) -> FieldError | None:
    assert task.dataset is not None  # no path: the spec guarantees a data set
    package = BUNDLED_PACKAGES[task.dataset]
    if not _installed(package):
        return FieldError("task.dataset", needs_datasets_extra(task.kind, task.dataset, package))
    if isinstance(task, ForecastTask):
        n = BUNDLED_SERIES_LENGTHS[task.dataset]
        size_error = test_size_error(task, n, f"the {task.dataset} series")
        if size_error is not None:
            return size_error
        try:
            check_series_fits(forecast_bounds(task, n), task.lookback, task.horizon)
        except DataError as err:
            message = err.message.replace("the series", f"the {task.dataset} series", 1)
            return FieldError("task.lookback", message)
        zero = BUNDLED_SERIES_FIRST_NONPOSITIVE[task.dataset]
        if task.transform == "log" and zero is not None:
            where = (
                f"forecast: the {task.dataset} series holds 0 (first: point {zero[0]}, {zero[1]})"
            )
            return FieldError("task.transform", f"{where}: {_NO_LOG}")
    return None
