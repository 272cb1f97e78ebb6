"""Classical baselines (bench/baselines.py): the models are right, and on the service's splits."""

from __future__ import annotations

import math
import warnings
from collections import Counter

import numpy as np
import pytest

from bench.baselines import (
    PUBLISHED_REFERENCES,
    BaselineScore,
    KneserNeyCharModel,
    _fit_sarima,
    _rolling,
    baselines_for,
    char_lm_baselines,
    compute_baselines,
    forecast_baselines,
    load_forecast_series,
    one_blas_thread,
)
from service.data_checks import forecast_bounds
from service.search_space import (
    AddingTask,
    CharLMTask,
    ClassifyTask,
    ForecastTask,
    LSTMConfig,
    SyntheticTask,
)
from service.training.data import build_task_data
from service.training.data.char_lm import build_vocab, encode

PARAMS = LSTMConfig(batch_size=4, bptt=9)
TEXT = (
    "the cat sat on the mat. the dog sat on the log. a cat and a dog met on a mat; "
    "the cat ran, the dog sat. then the cat sat on the dog's log and the dog ran off.\n"
) * 3 + "zebra quartz jinx!"
HELD_OUT = "the dog sat on the cat's mat. a zebra ran? the log sat on a dog.\n"


def ids_of(text: str, vocab: list[str]) -> np.ndarray:
    return encode(text, vocab)


# --------------------------------------------------------------------------------------
# char_lm: Kneser-Ney
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("discount", [None, 0.75])
@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_kneser_ney_distribution_sums_to_one(order: int, discount: float | None) -> None:
    vocab = build_vocab(TEXT)
    model = KneserNeyCharModel(ids_of(TEXT, vocab), len(vocab), order, discount)
    contexts = [
        "",  # no context at all
        "t",  # shorter than n - 1
        "the c",  # seen
        "qqqqq",  # characters seen, contexts never
        "\x00\x01",  # <unk> (id 0) in the context
        HELD_OUT[:20],
    ]
    for context in contexts:
        p = model.distribution(ids_of(context, vocab))
        assert p.shape == (len(vocab),)
        assert np.all(p > 0)
        assert p.sum() == pytest.approx(1.0, abs=1e-12)


class ReferenceKneserNey:
    """Interpolated (modified) Kneser-Ney one n-gram at a time, straight from Chen & Goodman
    1998 (dicts and loops): what the numpy model must reproduce."""

    def __init__(self, train: list[int], vocab_size: int, order: int, discount: float | None):
        self.vocab_size = vocab_size
        grams = [
            Counter(tuple(train[i - k + 1 : i + 1]) for i in range(k - 1, len(train)))
            for k in range(1, order + 1)
        ]
        #: counts[k - 1]: raw counts at the top order, continuation counts N1+(. g) below.
        self.counts = [
            dict(grams[k - 1]) if k == order else dict(Counter(g[1:] for g in grams[k]))
            for k in range(1, order + 1)
        ]
        self.discounts = [self._discounts(c, discount) for c in self.counts]

    @staticmethod
    def _discounts(counts: dict[tuple[int, ...], int], discount: float | None) -> list[float]:
        if discount is not None:
            return [0.0, discount, discount, discount]
        n = [sum(1 for v in counts.values() if v == j) for j in (1, 2, 3, 4)]
        if 0 in n:
            return [0.0, 0.75, 0.75, 0.75]
        y = n[0] / (n[0] + 2 * n[1])
        return [0.0, *(j - (j + 1) * y * n[j] / n[j - 1] for j in (1, 2, 3))]

    def prob(self, context: tuple[int, ...], w: int, k: int) -> float:
        """P_k(w | the last k - 1 ids of context)."""
        if k == 0:
            return 1.0 / self.vocab_size
        lower = self.prob(context, w, k - 1)
        if len(context) < k - 1:
            return lower
        h = context[len(context) - (k - 1) :]
        d = self.discounts[k - 1]
        following = {g: c for g, c in self.counts[k - 1].items() if g[:-1] == h and c > 0}
        total = sum(following.values())
        if total == 0:
            return lower
        gamma = sum(d[min(c, 3)] for c in following.values())
        c = following.get((*h, w), 0)
        return (max(c - d[min(c, 3)], 0.0) + gamma * lower) / total


@pytest.mark.parametrize("discount", [None, 0.75])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_kneser_ney_matches_a_reference_implementation(order: int, discount: float | None) -> None:
    vocab = build_vocab(TEXT)
    train = ids_of(TEXT, vocab)
    model = KneserNeyCharModel(train, len(vocab), order, discount)
    reference = ReferenceKneserNey(train.tolist(), len(vocab), order, discount)
    held = ids_of(HELD_OUT, vocab).tolist()
    got = np.exp(model.log_probs(np.asarray(held)))
    want = [
        reference.prob(tuple(held[max(0, i - order + 1) : i]), w, order) for i, w in enumerate(held)
    ]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_kneser_ney_context_before_a_split_is_used() -> None:
    vocab = build_vocab(TEXT)
    model = KneserNeyCharModel(ids_of(TEXT, vocab), len(vocab), 3)
    held = ids_of(HELD_OUT, vocab)
    context = ids_of("xx on t", vocab)
    with_context = model.cross_entropy(held, context=context)
    by_hand = -model.log_probs(np.concatenate([context[-2:], held]), start=2).mean()
    assert with_context == pytest.approx(by_hand, rel=1e-12)
    assert with_context != pytest.approx(model.cross_entropy(held), rel=1e-6)


def test_cross_entropy_falls_with_the_order_on_repetitive_text() -> None:
    vocab = build_vocab(TEXT)
    held = ids_of(HELD_OUT, vocab)
    ce = [
        KneserNeyCharModel(ids_of(TEXT, vocab), len(vocab), n).cross_entropy(held)
        for n in (1, 2, 3)
    ]
    assert ce[0] > ce[1] > ce[2]


def test_char_lm_baselines_on_the_service_split() -> None:
    task = CharLMTask(kind="char_lm", dataset="moby_dick", max_chars=100_000)
    got = char_lm_baselines(task, max_order=3)
    assert list(got) == ["kn_1gram", "kn_2gram", "kn_3gram"]
    service = build_task_data(task, PARAMS)
    # The KN unigram is the add-one unigram the service reports, up to smoothing.
    assert got["kn_1gram"].test == pytest.approx(service.test_baselines["unigram"], abs=0.01)
    assert got["kn_1gram"].val == pytest.approx(service.val_baselines["unigram"], abs=0.01)
    assert got["kn_1gram"].test > got["kn_2gram"].test > got["kn_3gram"].test
    assert "vocab" in got["kn_3gram"].note


# --------------------------------------------------------------------------------------
# forecast
# --------------------------------------------------------------------------------------

AIRLINE_1960 = ForecastTask(kind="forecast", dataset="airline", test_size=12)


@pytest.fixture(scope="module")
def airline_1960() -> dict[str, BaselineScore]:
    return forecast_baselines(AIRLINE_1960)


def test_airline_1960_hold_out_reproduces_the_published_figures(
    airline_1960: dict[str, BaselineScore],
) -> None:
    got = airline_1960
    # Measured: seasonal naive 50.708, SARIMA 18.594 (PUBLISHED_REFERENCES: 50.7 and 18.6).
    published = PUBLISHED_REFERENCES["airline_seasonal_naive"].value
    assert got["seasonal_naive_multistep"].test == pytest.approx(published, abs=0.05)
    assert got["sarima_multistep"].test == pytest.approx(
        PUBLISHED_REFERENCES["airline_sarima"].value, abs=0.5
    )
    # With a 12-month test split every seasonal-naive forecast looks back exactly one year.
    assert got["seasonal_naive"].test == pytest.approx(got["seasonal_naive_multistep"].test)
    assert got["naive_multistep"].test > got["naive"].test
    # Filtering through the test year: measured 18.88 (fitted on train+val), 18.94 (train).
    assert got["sarima"].test < 0.5 * got["seasonal_naive"].test
    assert got["sarima_train_only"].test < 0.5 * got["seasonal_naive"].test
    assert got["sarima_train_only"].val is not None


@pytest.mark.parametrize(
    "task",
    [
        ForecastTask(kind="forecast", dataset="airline"),
        AIRLINE_1960,
        ForecastTask(kind="forecast", dataset="airline", test_size=12, horizon=3, lookback=12),
        ForecastTask(kind="forecast", dataset="sunspots"),
    ],
    ids=["airline", "airline-1960", "airline-horizon-3", "sunspots"],
)
def test_forecast_naive_baselines_equal_the_services(task: ForecastTask) -> None:
    got = forecast_baselines(task, sarima=False)
    service = build_task_data(task, PARAMS)
    for name in ("naive", "seasonal_naive"):
        assert got[name].test == service.test_baselines[name]
        assert got[name].val == service.val_baselines[name]
    assert "sarima" not in got
    assert all(math.isfinite(s.test) for s in got.values())


def test_sarima_rolling_forecasts_are_forecasts_from_each_origin() -> None:
    series, season = load_forecast_series(AIRLINE_1960)
    bounds = forecast_bounds(AIRLINE_1960, len(series))
    z = np.log(series)
    starts = np.arange(bounds.test_start, bounds.n - 2)
    with one_blas_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = _fit_sarima(z[: bounds.test_start], season)
        whole = fitted.append(z[bounds.test_start :], refit=False)
        got = _rolling(whole, starts, 3)
        want = [np.asarray(fitted.apply(z[:t], refit=False).forecast(3)) for t in starts]
    np.testing.assert_allclose(got, want, rtol=1e-10)
    np.testing.assert_allclose(_rolling(whole, starts, 1)[:, 0], np.array(want)[:, 0], rtol=1e-10)


# --------------------------------------------------------------------------------------
# classify and adding
# --------------------------------------------------------------------------------------


def test_japanese_vowels_majority_and_1nn_dtw() -> None:
    task = ClassifyTask(kind="classify", dataset="japanese_vowels")
    got = baselines_for(task)
    service = build_task_data(task, PARAMS)
    assert got["majority"].test == service.test_baselines["majority"]
    assert got["majority"].val == service.val_baselines["majority"]
    # Measured: 0.9514 fitted on train (216), 0.9595 on train+val (the 270 UEA train
    # series); the published 1-NN DTW_D figure is 0.949.
    assert got["1nn_dtw"].test > 0.94
    assert got["1nn_dtw_train_val"].test > 0.94
    assert got["1nn_dtw"].val is not None and got["1nn_dtw"].val > 0.9


def test_adding_mean_predictor() -> None:
    task = AddingTask(kind="adding", seq_len=200)
    got = baselines_for(task)
    service = build_task_data(task, PARAMS)
    assert got["train_mean"].test == pytest.approx(service.test_baselines["constant"], rel=1e-12)
    assert got["train_mean"].val == pytest.approx(service.val_baselines["constant"], rel=1e-12)
    assert got["train_mean"].test == pytest.approx(1 / 6, abs=0.02)
    assert got["constant_1"].test == pytest.approx(1 / 6, abs=0.02)


def test_compute_baselines_gives_the_test_scores() -> None:
    task = AddingTask(kind="adding", seq_len=20, n_train=100, n_val=50, n_test=50)
    scores = compute_baselines(task)
    assert scores == {name: s.test for name, s in baselines_for(task).items()}
    with pytest.raises(ValueError, match="synthetic"):
        compute_baselines(SyntheticTask(kind="synthetic"))


def test_published_references_name_their_source() -> None:
    for ref in PUBLISHED_REFERENCES.values():
        assert ref.source and ref.metric and ref.value > 0
