"""Task data: loaders, splits, scaling, baselines, batch formats and error messages."""

from __future__ import annotations

import json
import math
import re
import sys
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, TensorDataset

from service.errors import DataError, MissingExtra, NotPositive
from service.search_space import (
    AddingTask,
    CharLMTask,
    ClassifyTask,
    ForecastTask,
    LSTMConfig,
    SyntheticTask,
)
from service.training.data import TaskData, build_task_data
from service.training.data.char_lm import UNK, stdlib_corpus

PARAMS = LSTMConfig(batch_size=4, bptt=9)
SPLITS = ("train", "val", "test")


def loader(td: TaskData, split: str) -> DataLoader[Any]:
    dl = getattr(td.datamodule, f"{split}_dataloader")()
    assert isinstance(dl, DataLoader)
    return dl


def split_tensors(td: TaskData, split: str) -> tuple[torch.Tensor, ...]:
    """A fixed-length split's tensors, in dataset order."""
    dataset = loader(td, split).dataset
    assert isinstance(dataset, TensorDataset)
    return tuple(dataset.tensors)


def all_batches(td: TaskData, split: str) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(b) for b in loader(td, split)]


def assert_same_data(a: TaskData, b: TaskData) -> None:
    assert a.problem == b.problem
    assert a.description == b.description
    assert dict(a.val_baselines) == dict(b.val_baselines)
    assert dict(a.test_baselines) == dict(b.test_baselines)
    for split in SPLITS:
        batches_a, batches_b = all_batches(a, split), all_batches(b, split)
        if split == "train":  # shuffled: compare the datasets instead
            ds_a, ds_b = loader(a, split).dataset, loader(b, split).dataset
            assert len(ds_a) == len(ds_b)  # type: ignore[arg-type]
            for i in range(len(ds_a)):  # type: ignore[arg-type]
                for ta, tb in zip(ds_a[i], ds_b[i], strict=True):
                    assert torch.equal(torch.as_tensor(ta), torch.as_tensor(tb))
            continue
        for ba, bb in zip(batches_a, batches_b, strict=True):
            for ta, tb in zip(ba, bb, strict=True):
                assert torch.equal(ta, tb)


def assert_loaders(td: TaskData) -> None:
    """Train shuffles, val and test do not; no worker processes."""
    for split in SPLITS:
        dl = loader(td, split)
        assert dl.num_workers == 0
        assert dl.batch_size == PARAMS.batch_size
        expected = RandomSampler if split == "train" else SequentialSampler
        assert isinstance(dl.sampler, expected)


# --------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------


def test_synthetic_tasks_have_no_data() -> None:
    with pytest.raises(DataError, match="synthetic tasks have no data"):
        build_task_data(SyntheticTask(kind="synthetic"), PARAMS)


# --------------------------------------------------------------------------------------
# char_lm
# --------------------------------------------------------------------------------------


def _char_task(path: Path, **kw: Any) -> CharLMTask:
    return CharLMTask(kind="char_lm", path=str(path), max_chars=1000, **kw)


def test_char_lm_windows_vocab_and_contiguous_splits(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("abcdefgh \n"), size=1000))
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    td = build_task_data(_char_task(path, val_fraction=0.1, test_fraction=0.1), PARAMS)

    vocab: list[str] = td.datamodule.vocab  # type: ignore[attr-defined]
    assert vocab == [UNK, *sorted(set(text[:800]))]
    assert td.problem.input_kind == "tokens" and td.problem.readout == "every_step"
    assert td.problem.loss == "cross_entropy" and td.problem.metric == "val_loss"
    assert td.problem.input_size == td.problem.output_size == len(vocab)
    assert td.description == (
        f"char_lm: corpus.txt, 1,000 chars (train 800 / val 100 / test 100), vocab {len(vocab)}"
    )
    x, y = next(iter(loader(td, "val")))
    assert x.dtype == y.dtype == torch.long
    assert x.shape == y.shape == (PARAMS.batch_size, PARAMS.bptt)

    def decode(ids: torch.Tensor) -> str:
        return "".join(vocab[i] for i in ids.reshape(-1).tolist())

    # Windows step by bptt, targets shifted by one; each split is its own contiguous part.
    for split, start, size in (("train", 0, 800), ("val", 800, 100), ("test", 900, 100)):
        xs, ys = split_tensors(td, split)
        n = (size - 1) // PARAMS.bptt
        assert xs.shape == (n, PARAMS.bptt)
        assert decode(xs) == text[start : start + n * PARAMS.bptt]
        assert decode(ys) == text[start + 1 : start + 1 + n * PARAMS.bptt]
    assert_loaders(td)


def test_char_lm_unigram_baseline_and_unknown_chars(tmp_path: Path) -> None:
    # train: 600 a + 200 b; val: 50 a + 50 c (c unseen); test: 100 b.
    path = tmp_path / "abc.txt"
    path.write_text("a" * 600 + "b" * 200 + "a" * 50 + "c" * 50 + "b" * 100, encoding="utf-8")
    td = build_task_data(_char_task(path, val_fraction=0.1, test_fraction=0.1), PARAMS)
    assert td.datamodule.vocab == [UNK, "a", "b"]  # type: ignore[attr-defined]
    # Add-one counts over {<unk>, a, b}: 1, 601, 201 (total 803).
    expected_val = -(50 * math.log(601 / 803) + 50 * math.log(1 / 803)) / 100
    assert td.val_baselines["unigram"] == pytest.approx(expected_val)
    assert td.test_baselines["unigram"] == pytest.approx(-math.log(201 / 803))
    assert td.primary_baseline == "unigram"
    xs, _ = split_tensors(td, "val")
    assert set(xs.reshape(-1).tolist()) == {0, 1}  # "c" is <unk>


def test_char_lm_relative_path_in_data_root_and_determinism(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "t.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    task = CharLMTask(kind="char_lm", path="t.txt", max_chars=1000)
    a = build_task_data(task, PARAMS, data_roots=(root,))
    b = build_task_data(task, PARAMS, data_roots=(root,))
    assert "1,000 chars" in a.description  # capped at max_chars
    assert_same_data(a, b)


def test_char_lm_stdlib_default_is_capped_and_deterministic() -> None:
    task = CharLMTask(kind="char_lm", max_chars=5000)
    td = build_task_data(task, PARAMS)
    assert td.description.startswith("char_lm: python_stdlib (Python ")
    assert "5,000 chars (train 4,500 / val 250 / test 250)" in td.description
    assert_same_data(td, build_task_data(task, PARAMS))

    # The text is the sorted .py files (no tests, no site-packages) concatenated, cut.
    text, n_files = stdlib_corpus(5000)
    assert len(text) == 5000
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if not {"site-packages", "dist-packages", "test", "tests", "idle_test"}.intersection(
            p.relative_to(root).parts[:-1]
        )
    )
    assert "".join((root / f).read_text(encoding="utf-8") for f in files[:n_files]).startswith(text)


def test_char_lm_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=f"{re.escape(str(missing))}: no such file"):
        build_task_data(_char_task(missing), PARAMS)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 ".encode("latin-1") * 300)
    with pytest.raises(DataError, match=f"{re.escape(str(latin1))}: not UTF-8"):
        build_task_data(_char_task(latin1), PARAMS)
    short = tmp_path / "short.txt"
    short.write_text("x" * 1000)
    with pytest.raises(DataError, match=r"val split has 50 chars, fewer than bptt \+ 1 = 101"):
        build_task_data(_char_task(short), LSTMConfig(bptt=100))


# --------------------------------------------------------------------------------------
# forecast
# --------------------------------------------------------------------------------------


def _write_csv(path: Path, values: list[str], column: str = "y") -> Path:
    lines = [f"t,{column}"] + [f"{i},{v}" for i, v in enumerate(values)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _forecast_task(path: Path, **kw: Any) -> ForecastTask:
    kw = {"lookback": 3, "horizon": 2, "val_fraction": 0.2, "test_fraction": 0.2} | kw
    return ForecastTask(kind="forecast", path=str(path), column="y", **kw)


def test_forecast_windows_scaling_and_baselines(tmp_path: Path) -> None:
    series = np.arange(20, dtype=np.float64)  # train 0..11, val 12..15, test 16..19
    path = _write_csv(tmp_path / "s.csv", [str(v) for v in series])
    td = build_task_data(_forecast_task(path, season=4, normalize="none"), PARAMS)

    mean, std = series[:12].mean(), series[:12].std()
    assert (mean, std) == (5.5, pytest.approx(math.sqrt(143 / 12)))
    assert td.problem.target_scale == pytest.approx(std)
    assert td.problem.input_size == 1 and td.problem.output_size == 2
    assert (td.problem.readout, td.problem.loss, td.problem.metric) == (
        "last_step",
        "mse",
        "val_rmse",
    )
    assert td.description == (
        "forecast: s.csv column 'y', 20 points (train 12 / val 4 / test 4), "
        "lookback 3, horizon 2: 8 / 3 / 3 windows"
    )
    first_targets = {"train": 3, "val": 12, "test": 16}
    for split, n in (("train", 8), ("val", 3), ("test", 3)):
        x, y = split_tensors(td, split)
        assert x.dtype == y.dtype == torch.float32
        assert x.shape == (n, 3, 1) and y.shape == (n, 2)
        t0 = first_targets[split]
        # Val/test inputs may reach back into the previous split; targets stay in their own.
        expected_x = (series[t0 - 3 : t0] - mean) / std
        np.testing.assert_allclose(x[0, :, 0].numpy(), expected_x, rtol=1e-6)
        np.testing.assert_allclose(y[-1].numpy() * std + mean, series[t0 + n - 1 : t0 + n + 1])
    x, y = next(iter(loader(td, "train")))
    assert x.shape == (4, 3, 1) and y.shape == (4, 2)

    # Naive: errors 1 and 2 at horizon steps 1 and 2; seasonal naive (4): always 4.
    for baselines in (td.val_baselines, td.test_baselines):
        assert baselines["naive"] == pytest.approx(math.sqrt(2.5))
        assert baselines["seasonal_naive"] == pytest.approx(4.0)
    assert td.primary_baseline == "naive"
    assert_loaders(td)


def test_forecast_last_value_windows_hold_changes_not_levels(tmp_path: Path) -> None:
    series = np.arange(20, dtype=np.float64) * 3.0  # a straight line: every change is 3
    path = _write_csv(tmp_path / "s.csv", [str(v) for v in series])
    td = build_task_data(_forecast_task(path), PARAMS)  # normalize: last_value (default)
    std = series[:12].std()
    for split in ("train", "val", "test"):
        x, y = split_tensors(td, split)
        # Each window ends at 0; inputs step by -3/std back in time, targets +3/std ahead.
        np.testing.assert_allclose(x[:, -1, 0].numpy(), 0.0, atol=1e-6)
        np.testing.assert_allclose(x[:, 0, 0].numpy() * std, -6.0, rtol=1e-5)
        np.testing.assert_allclose(y.numpy() * std, np.tile([3.0, 6.0], (len(y), 1)), rtol=1e-5)


@pytest.mark.parametrize("normalize", ["last_value", "none"])
def test_forecast_log_transform_recovers_the_original_values(
    tmp_path: Path, normalize: str
) -> None:
    """``transform: log``: the windows hold standardised logs (relative to each window's
    anchor, the batch's third tensor) and the problem maps them back to the series."""
    series = 100.0 * 1.1 ** np.arange(20)  # exponential growth: a straight line in logs
    path = _write_csv(tmp_path / "g.csv", [repr(float(v)) for v in series])
    td = build_task_data(_forecast_task(path, transform="log", normalize=normalize), PARAMS)

    logs = np.log(series[:12])
    assert td.problem.target_transform == "log"
    assert td.problem.target_offset == pytest.approx(logs.mean())
    assert td.problem.target_scale == pytest.approx(logs.std())
    assert "(train 12 / val 4 / test 4), log values, lookback 3" in td.description
    first_targets = {"train": 3, "val": 12, "test": 16}
    for split, t0 in first_targets.items():
        x, y, anchor = split_tensors(td, split)
        assert anchor.shape == (len(y), 1) and anchor.dtype == torch.float32
        expected = np.stack([series[t0 + i : t0 + i + 2] for i in range(len(y))])
        np.testing.assert_allclose(td.problem.to_original(y, anchor).numpy(), expected, rtol=1e-5)
        if normalize == "last_value":
            # Every step multiplies by 1.1: each target is a constant change of the log.
            np.testing.assert_allclose(
                y.numpy() * logs.std(), np.tile(np.log([1.1, 1.21]), (len(y), 1)), rtol=1e-4
            )
    x, y, anchor = next(iter(loader(td, "train")))
    assert x.shape == (4, 3, 1) and y.shape == (4, 2) and anchor.shape == (4, 1)
    # The baselines are the series' own, untouched by the transform.
    assert td.test_baselines["naive"] == pytest.approx(
        build_task_data(_forecast_task(path), PARAMS).test_baselines["naive"]
    )


@pytest.mark.parametrize("value", ["0", "-3.5"])
def test_forecast_log_of_a_value_that_is_not_positive_names_the_point(
    tmp_path: Path, value: str
) -> None:
    values = [str(v) for v in range(1, 21)]
    values[14] = value
    path = _write_csv(tmp_path / "z.csv", values)
    with pytest.raises(NotPositive, match=rf"z.csv line 16: column 'y' is '{value}': `transform"):
        build_task_data(_forecast_task(path, transform="log"), PARAMS)
    build_task_data(_forecast_task(path), PARAMS)  # without the transform it is data


def test_forecast_scaling_ignores_val_and_test(tmp_path: Path) -> None:
    base = [str(v) for v in range(12)]
    a = build_task_data(_forecast_task(_write_csv(tmp_path / "a.csv", base + ["0"] * 8)), PARAMS)
    b = build_task_data(_forecast_task(_write_csv(tmp_path / "b.csv", base + ["1e6"] * 8)), PARAMS)
    assert a.problem.target_scale == b.problem.target_scale
    assert torch.equal(split_tensors(a, "train")[0], split_tensors(b, "train")[0])
    assert "seasonal_naive" not in a.val_baselines  # no season for a CSV unless given


def test_forecast_missing_values_dropped_and_counted(tmp_path: Path) -> None:
    values = [str(v) for v in range(20)]
    values[3], values[7], values[11] = "", "NaN", "NA"
    td = build_task_data(_forecast_task(_write_csv(tmp_path / "m.csv", values)), PARAMS)
    assert "17 points, 3 rows with missing values dropped" in td.description
    x, _ = split_tensors(td, "train")
    assert not torch.isnan(x).any()


def test_forecast_errors(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "e.csv", [str(v) for v in range(20)])
    with pytest.raises(DataError, match=r"e\.csv: no column 'price' \(columns: 't', 'y'\)"):
        build_task_data(ForecastTask(kind="forecast", path=str(path), column="price"), PARAMS)
    bad = _write_csv(tmp_path / "bad.csv", ["1", "2", "oops", "4"])
    with pytest.raises(DataError, match=r"bad\.csv line 4: column 'y' is not numeric \('oops'\)"):
        build_task_data(_forecast_task(bad), PARAMS)
    missing = tmp_path / "missing.csv"
    with pytest.raises(DataError, match=f"{re.escape(str(missing))}: no such file"):
        build_task_data(_forecast_task(missing), PARAMS)
    too_long = r"lookback 20 \+ horizon 2 needs train >= 22.*what would fit: lookback <= 10 at"
    with pytest.raises(DataError, match=too_long):
        build_task_data(_forecast_task(path, lookback=20), PARAMS)
    with pytest.raises(DataError, match="what would fit: horizon <= 4"):
        build_task_data(_forecast_task(path, horizon=5), PARAMS)


def test_forecast_airline_bundled() -> None:
    pytest.importorskip("aeon")
    task = ForecastTask(kind="forecast", dataset="airline")
    td = build_task_data(task, PARAMS)
    assert td.description == (
        "forecast: airline (aeon), 144 points (train 102 / val 21 / test 21), "
        "lookback 24, horizon 1: 78 / 21 / 21 windows"
    )
    assert set(td.val_baselines) == set(td.test_baselines) == {"naive", "seasonal_naive"}
    assert_same_data(td, build_task_data(task, PARAMS))


def test_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes the import fail, as if aeon were not installed.
    monkeypatch.setitem(sys.modules, "aeon.datasets", None)
    with pytest.raises(MissingExtra, match=r'pip install "lstm-hpo\[datasets\]"'):
        build_task_data(ForecastTask(kind="forecast", dataset="airline"), PARAMS)
    with pytest.raises(MissingExtra, match=r'pip install "lstm-hpo\[datasets\]"'):
        build_task_data(ClassifyTask(kind="classify"), PARAMS)


# --------------------------------------------------------------------------------------
# classify
# --------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict[str, Any] | str]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _sequences(n: int, label: Any, offset: float, split: str | None, seed: int) -> list[Any]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        x = (rng.normal(size=(3 + i % 4, 2)) + offset).tolist()
        row: dict[str, Any] = {"x": x, "label": label}
        if split is not None:
            row["split"] = split
        rows.append(row)
    return rows


def test_classify_jsonl_batches_scaling_and_majority(tmp_path: Path) -> None:
    rows = (
        _sequences(15, "b", 0.0, "train", 1)
        + _sequences(5, "a", 0.0, "train", 2)
        # test: offset far away, so statistics fitted on all the data would show.
        + _sequences(3, "b", 100.0, "test", 3)
        + _sequences(1, "a", 100.0, "test", 4)
    )
    path = _write_jsonl(tmp_path / "seq.jsonl", rows)
    td = build_task_data(ClassifyTask(kind="classify", path=str(path)), PARAMS)
    assert td.datamodule.classes == ["a", "b"]  # type: ignore[attr-defined]
    assert td.problem.input_size == 2 and td.problem.output_size == 2
    assert (td.problem.readout, td.problem.loss, td.problem.metric) == (
        "last_step",
        "cross_entropy",
        "val_acc",
    )
    assert td.description == (
        "classify: seq.jsonl, 24 sequences, 2 features, 2 classes, length 3-6 "
        "(train 16 / val 4 / test 4)"
    )
    x, y, lengths = next(iter(loader(td, "test")))
    assert x.dtype == torch.float32 and y.dtype == lengths.dtype == torch.long
    assert x.shape == (4, int(lengths.max()), 2) and y.tolist() == [1, 1, 1, 0]
    assert lengths.tolist() == [3, 4, 5, 3]
    assert torch.all(x[0, 3:] == 0)  # right-padded with zeros

    train = torch.cat(
        [
            x[i, : lengths[i]]
            for x, _, lengths in all_batches(td, "train")
            for i in range(len(lengths))
        ]
    )
    np.testing.assert_allclose(train.mean(0).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(train.std(0, unbiased=False).numpy(), 1.0, atol=1e-5)
    assert float(x[0, :3].mean()) > 10  # the test part is scaled with train statistics

    # Val: 20% of each train class (3 b, 1 a); majority class b.
    val_y = torch.cat([b[1] for b in all_batches(td, "val")])
    assert sorted(val_y.tolist()) == [0, 1, 1, 1]
    assert td.val_baselines["majority"] == 0.75
    assert td.test_baselines["majority"] == 0.75
    # The class prior, add-one smoothed over train's 16 (12 b, 4 a): p(b) = 13/18.
    prior = -(3 * math.log(13 / 18) + math.log(5 / 18)) / 4
    assert td.val_baselines["prior"] == pytest.approx(prior)
    assert td.primary_baseline == "majority"  # ranked by accuracy unless metric: val_loss
    by_loss = ClassifyTask(kind="classify", path=str(path), metric="val_loss")
    assert build_task_data(by_loss, PARAMS).primary_baseline == "prior"
    assert_loaders(td)
    assert_same_data(td, build_task_data(ClassifyTask(kind="classify", path=str(path)), PARAMS))


def test_classify_without_split_is_stratified_and_deterministic(tmp_path: Path) -> None:
    rows = _sequences(20, 10, 0.0, None, 1) + _sequences(10, 2, 1.0, None, 2)
    path = _write_jsonl(tmp_path / "nosplit.jsonl", rows)
    task = ClassifyTask(kind="classify", path=str(path), test_fraction=0.2, val_fraction=0.25)
    td = build_task_data(task, PARAMS)
    assert td.datamodule.classes == [2, 10]  # type: ignore[attr-defined]  # numeric order
    labels = {s: sorted(torch.cat([b[1] for b in all_batches(td, s)]).tolist()) for s in SPLITS}
    assert labels["test"] == [0] * 2 + [1] * 4
    assert labels["val"] == [0] * 2 + [1] * 4
    assert labels["train"] == [0] * 6 + [1] * 12

    # Disjoint and complete: every sequence lands in exactly one split.
    def keys(split: str) -> list[tuple[float, ...]]:
        out = []
        for x, _, lengths in all_batches(td, split):
            out += [tuple(x[i, : lengths[i]].reshape(-1).tolist()) for i in range(len(x))]
        return out

    every = keys("train") + keys("val") + keys("test")
    assert len(every) == len(set(every)) == 30
    assert_same_data(td, build_task_data(task, LSTMConfig(batch_size=4, bptt=9, seed=7)))


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"x": [[1, 2]], "label": "a"}', "{nope"], "line 2: not valid JSON"),
        (['{"x": [[1, 2], [3]], "label": "a"}'], "line 1: `x` time step 1 has 1 features"),
        (['{"x": [[1, "2"]], "label": "a"}'], "line 1: `x` time step 0 has a value that is not a"),
        (['{"x": [], "label": "a"}'], "line 1: `x` must be a non-empty list"),
        (['{"x": [[1]], "label": 1.5}'], "line 1: `label` must be a string or an integer"),
        (['{"x": [[1]]}'], "line 1: `x` and `label` are required"),
        (['{"x": [[1]], "label": "a", "split": "dev"}'], 'line 1: `split` must be "train"'),
        (
            ['{"x": [[1, 2]], "label": "a"}', "", '{"x": [[1]], "label": "a"}'],
            "line 3: `x` has 1 features per time step, line 1 has 2",
        ),
        (
            ['{"x": [[1]], "label": "a"}', '{"x": [[1]], "label": 3}'],
            "line 2: `label` is an integer but on line 1 it is a string",
        ),
        (
            ['{"x": [[1]], "label": "a", "split": "train"}', '{"x": [[1]], "label": "a"}'],
            "line 2: `split` must be on every line or on none",
        ),
        (['{"x": [[1]], "label": "a", "split": "train"}'], 'no line has "split": "test"'),
        ([""], "no sequences"),
    ],
)
def test_classify_jsonl_errors_give_line_numbers(
    tmp_path: Path, lines: list[str], message: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"bad\.jsonl.*{re.escape(message)}"):
        build_task_data(ClassifyTask(kind="classify", path=str(path)), PARAMS)


def test_classify_japanese_vowels() -> None:
    pytest.importorskip("aeon")
    td = build_task_data(ClassifyTask(kind="classify"), PARAMS)
    assert td.description == (
        "classify: japanese_vowels (aeon), 640 sequences, 12 features, 9 classes, "
        "length 7-29 (train 216 / val 54 / test 370)"
    )
    assert td.problem.input_size == 12 and td.problem.output_size == 9
    assert td.val_baselines["majority"] == pytest.approx(1 / 9)


# --------------------------------------------------------------------------------------
# adding
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [2, 7, 50])
def test_adding_markers_and_targets(seq_len: int) -> None:
    task = AddingTask(kind="adding", seq_len=seq_len, n_train=200, n_val=50, n_test=50)
    td = build_task_data(task, PARAMS)
    assert (td.problem.input_kind, td.problem.input_size, td.problem.output_size) == (
        "features",
        2,
        1,
    )
    assert (td.problem.readout, td.problem.loss, td.problem.metric) == (
        "last_step",
        "mse",
        "val_mse",
    )
    half = seq_len // 2
    for split, n in (("train", 200), ("val", 50), ("test", 50)):
        x, y = split_tensors(td, split)
        assert x.dtype == y.dtype == torch.float32
        assert x.shape == (n, seq_len, 2) and y.shape == (n, 1)
        values, markers = x[..., 0], x[..., 1]
        assert torch.all((values >= 0) & (values < 1))
        assert set(markers.reshape(-1).tolist()) <= {0.0, 1.0}
        assert torch.all(markers[:, :half].sum(1) == 1)
        assert torch.all(markers[:, half:].sum(1) == 1)
        torch.testing.assert_close(y[:, 0], (values * markers).sum(1))
    x, y = next(iter(loader(td, "train")))
    assert x.shape == (4, seq_len, 2) and y.shape == (4, 1)
    assert_loaders(td)


def test_adding_streams_are_independent_and_seeded() -> None:
    small = AddingTask(kind="adding", n_train=100, n_val=20, n_test=20, seq_len=10)
    a, b = build_task_data(small, PARAMS), build_task_data(small, PARAMS)
    assert_same_data(a, b)
    more = build_task_data(small.model_copy(update={"n_train": 300}), PARAMS)
    for split in ("val", "test"):  # more training data leaves val and test as they were
        for ta, tb in zip(split_tensors(a, split), split_tensors(more, split), strict=True):
            assert torch.equal(ta, tb)
    other = build_task_data(small.model_copy(update={"data_seed": 1}), PARAMS)
    assert not torch.equal(split_tensors(a, "val")[0], split_tensors(other, "val")[0])


def test_adding_constant_baseline() -> None:
    td = build_task_data(AddingTask(kind="adding", n_train=4000, n_val=2000, seq_len=10), PARAMS)
    (_, y_train), (_, y_val), (_, y_test) = (split_tensors(td, s) for s in SPLITS)
    mean = y_train.double().mean()
    assert td.val_baselines["constant"] == pytest.approx(float(((y_val - mean) ** 2).mean()))
    assert td.test_baselines["constant"] == pytest.approx(float(((y_test - mean) ** 2).mean()))
    assert td.val_baselines["constant"] == pytest.approx(1 / 6, abs=0.02)  # Var(U+U) = 1/6
    assert td.primary_baseline == "constant"
    assert td.description == "adding: seq_len 10, 4,000 / 2,000 / 1,000 sequences (data_seed 1234)"
