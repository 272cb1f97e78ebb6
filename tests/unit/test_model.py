"""StackedLSTM and LSTMLightningModule on real tensors: init, dropout, shapes, training."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L
import pytest
import torch
from pydantic import ValidationError
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from service.errors import InvalidConfig
from service.search_space import LSTMConfig, parse_config
from service.training.data.base import Problem
from service.training.fit import fit_config
from service.training.model import StackedLSTM, count_parameters
from service.training.module import DivergedError, LSTMLightningModule

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings(
        "ignore:You defined a `validation_step` but have no `val_dataloader`"
    ),
]

CHAR = Problem("tokens", 11, 11, "every_step", "cross_entropy", "val_loss")
CLASSIFY = Problem("features", 3, 4, "last_step", "cross_entropy", "val_acc")
FORECAST = Problem("features", 1, 2, "last_step", "mse", "val_rmse", target_scale=2.5)
ADDING = Problem("features", 2, 1, "last_step", "mse", "val_mse")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _lstm_params(model: StackedLSTM) -> Iterator[tuple[str, int, Tensor]]:
    """(name, hidden size, tensor) of every parameter of every LSTM layer and direction."""
    for i, lstm in enumerate(model.lstms):
        assert isinstance(lstm, nn.LSTM)
        for name, param in lstm.named_parameters():
            yield f"lstms.{i}.{name}", lstm.hidden_size, param.detach()


def _trainer(**kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


# --------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True])
def test_uniform_init_bounds_every_parameter_of_the_model(fused: bool) -> None:
    params = LSTMConfig(num_layers=2, hidden_size=32, init="uniform", init_range=0.04)
    model = StackedLSTM(CHAR, params, fused=fused)

    names = {name for name, _ in model.named_parameters()}
    second_layer = "lstms.0.bias_hh_l1" if fused else "lstms.1.bias_hh_l0"
    assert {"embedding.weight", "head.weight", "head.bias", second_layer} <= names
    for name, param in model.named_parameters():
        assert param.abs().max() <= 0.04, name
    everything = torch.cat([p.detach().flatten() for p in model.parameters()])
    # Really drawn from the whole interval (the embedding's default would be N(0, 1)).
    assert everything.min() < -0.039
    assert everything.max() > 0.039
    assert everything.std() == pytest.approx(0.04 / math.sqrt(3), rel=0.05)


def test_xavier_uniform_init() -> None:
    params = LSTMConfig(num_layers=2, hidden_size=24, bidirectional=True, init="xavier_uniform")
    model = StackedLSTM(CLASSIFY, params)

    seen = 0
    for name, hidden, param in _lstm_params(model):
        if "weight_ih" in name:
            bound = math.sqrt(6.0 / (param.shape[1] + 4 * hidden))
            assert param.abs().max() <= bound, name
            assert param.abs().max() > 0.9 * bound, name
        elif "weight_hh" in name:
            # Orthogonal as a whole (4H x H): orthonormal columns.
            assert param.shape == (4 * hidden, hidden)
            torch.testing.assert_close(param.T @ param, torch.eye(hidden), atol=1e-5, rtol=0)
        else:
            assert torch.all(param == 0), name
        seen += 1
    assert seen == 2 * 2 * 4  # layers x directions x (w_ih, w_hh, b_ih, b_hh)


def test_orthogonal_init_each_gate_block() -> None:
    params = LSTMConfig(
        num_layers=2,
        hidden_mode="per_layer",
        hidden_sizes=(16, 8),
        bidirectional=True,
        init="orthogonal",
    )
    model = StackedLSTM(CLASSIFY, params)

    for name, hidden, param in _lstm_params(model):
        blocks = [param[g * hidden : (g + 1) * hidden] for g in range(4)]
        assert len(blocks) == 4
        for gate, block in enumerate(blocks):
            where = f"{name} gate {gate}"
            if "weight_hh" in name:
                eye = torch.eye(hidden)
                torch.testing.assert_close(block @ block.T, eye, atol=1e-5, rtol=0, msg=where)
            elif "weight_ih" in name:
                fan_in = block.shape[1]
                bound = math.sqrt(6.0 / (fan_in + hidden))
                assert block.abs().max() <= bound, where
            else:
                assert torch.all(block == 0), where
        if "weight_ih" in name:
            # Block-wise Xavier (fan_out H) draws beyond the whole-matrix bound (fan_out 4H).
            whole_bound = math.sqrt(6.0 / (param.shape[1] + 4 * hidden))
            assert param.abs().max() > whole_bound, name


@pytest.mark.parametrize("value", [1.0, 0.0])
@pytest.mark.parametrize("init", ["pytorch_default", "uniform", "xavier_uniform", "orthogonal"])
def test_forget_bias_sets_the_effective_bias_exactly(value: float, init: str) -> None:
    base = {"num_layers": 3, "hidden_size": 8, "bidirectional": True, "init": init}
    torch.manual_seed(1)
    reference = StackedLSTM(CLASSIFY, LSTMConfig(**base))
    torch.manual_seed(1)
    model = StackedLSTM(CLASSIFY, LSTMConfig(**base, forget_bias=value))

    ref = {name: p for name, _, p in _lstm_params(reference)}
    biases = {name: (h, p) for name, h, p in _lstm_params(model) if "bias" in name}
    assert len(biases) == 3 * 2 * 2
    for name, (h, b_ih) in biases.items():
        if "bias_hh" in name:
            continue
        b_hh = biases[name.replace("bias_ih", "bias_hh")][1]
        forget = slice(h, 2 * h)
        assert torch.all(b_ih[forget] + b_hh[forget] == value), name
        assert torch.all(b_ih[forget] == value) and torch.all(b_hh[forget] == 0), name
        if init == "pytorch_default":
            # Only the forget slice changed: input, cell and output gates keep PyTorch's init.
            hh_name = name.replace("bias_ih", "bias_hh")
            for other in (slice(0, h), slice(2 * h, 4 * h)):
                assert torch.equal(b_ih[other], ref[name][other]), name
                assert torch.equal(b_hh[other], ref[hh_name][other]), hh_name
            assert not torch.equal(b_ih[forget], ref[name][forget])


def test_pytorch_default_keeps_pytorchs_init() -> None:
    torch.manual_seed(3)
    model = StackedLSTM(ADDING, LSTMConfig(num_layers=1, hidden_size=16))
    torch.manual_seed(3)
    plain = nn.LSTM(2, 16, batch_first=True)
    lstm = model.lstms[0]
    assert isinstance(lstm, nn.LSTM)
    for (name, mine), (_, theirs) in zip(
        lstm.named_parameters(), plain.named_parameters(), strict=True
    ):
        assert torch.equal(mine, theirs), name


# --------------------------------------------------------------------------------------
# Dropout placement
# --------------------------------------------------------------------------------------


def _call_order(model: StackedLSTM, x: Tensor, lengths: Tensor | None = None) -> list[str]:
    """Names of the model's direct computational children, in the order forward calls them."""
    order: list[str] = []
    handles = [
        module.register_forward_hook(lambda *_, name=name: order.append(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.Dropout | nn.LSTM | nn.Linear | nn.Embedding)
    ]
    model(x, lengths)
    for handle in handles:
        handle.remove()
    return order


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_dropout_sits_between_layers_only(num_layers: int) -> None:
    params = LSTMConfig(
        num_layers=num_layers, hidden_size=8, dropout=0.3, input_dropout=0.1, output_dropout=0.2
    )
    model = StackedLSTM(CLASSIFY, params, fused=False)

    between = [m for m in model.layer_dropouts if isinstance(m, nn.Dropout)]
    assert len(between) == num_layers - 1
    assert all(m.p == 0.3 for m in between)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == num_layers - 1 + 2
    assert model.input_dropout.p == 0.1 and model.output_dropout.p == 0.2

    expected = ["input_dropout"]
    for i in range(num_layers):
        if i > 0:
            expected.append(f"layer_dropouts.{i - 1}")
        expected.append(f"lstms.{i}")
    expected += ["output_dropout", "head"]
    x = torch.randn(3, 5, 3)
    assert _call_order(model, x) == expected
    assert _call_order(model, x, torch.tensor([5, 2, 4])) == expected


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_the_fused_stack_puts_its_dropout_between_layers(num_layers: int) -> None:
    params = LSTMConfig(
        num_layers=num_layers, hidden_size=8, dropout=0.3, input_dropout=0.1, output_dropout=0.2
    )
    model = StackedLSTM(CLASSIFY, params)

    assert model.fused
    (lstm,) = model.lstms
    assert isinstance(lstm, nn.LSTM) and lstm.num_layers == num_layers
    # nn.LSTM's dropout acts on the output of every layer but the last.
    assert lstm.dropout == (0.3 if num_layers > 1 else 0.0)
    assert len(model.layer_dropouts) == 0
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts == [model.input_dropout, model.output_dropout]
    expected = ["input_dropout", "lstms.0", "output_dropout", "head"]
    x = torch.randn(3, 5, 3)
    assert _call_order(model, x) == expected
    assert _call_order(model, x, torch.tensor([5, 2, 4])) == expected


@pytest.mark.parametrize("fused", [False, True])
def test_embedding_comes_before_input_dropout(fused: bool) -> None:
    model = StackedLSTM(CHAR, LSTMConfig(num_layers=2, hidden_size=8, dropout=0.5), fused=fused)
    order = _call_order(model, torch.randint(0, 11, (2, 6)))
    stack = ["lstms.0"] if fused else ["lstms.0", "layer_dropouts.0", "lstms.1"]
    assert order == ["embedding", "input_dropout", *stack, "output_dropout", "head"]


def test_dropout_is_active_in_train_mode_only() -> None:
    # Only the between-layer dropout is on: it alone must make training forwards random.
    model = StackedLSTM(CLASSIFY, LSTMConfig(num_layers=2, hidden_size=16, dropout=0.5))
    x = torch.randn(4, 6, 3)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))

    single = StackedLSTM(CLASSIFY, LSTMConfig(num_layers=1, hidden_size=16, dropout=0.5))
    single.train()
    assert torch.equal(single(x), single(x))  # depth 1: nowhere to put inter-layer dropout


# --------------------------------------------------------------------------------------
# Shapes and variable-length batches
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hidden",
    [{}, {"hidden_mode": "pyramid"}, {"hidden_mode": "per_layer", "hidden_sizes": (5, 9, 3)}],
)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("problem", [CHAR, CLASSIFY, FORECAST])
def test_output_shapes(problem: Problem, bidirectional: bool, hidden: dict[str, Any]) -> None:
    params = LSTMConfig(num_layers=3, hidden_size=32, bidirectional=bidirectional, **hidden)
    model = StackedLSTM(problem, params)
    sizes = params.layer_sizes()
    directions = 2 if bidirectional else 1

    if problem.input_kind == "tokens":
        assert model.embedding is not None
        assert model.embedding.embedding_dim == sizes[0]
        x = torch.randint(0, problem.input_size, (4, 7))
    else:
        assert model.embedding is None
        x = torch.randn(4, 7, problem.input_size)
    first_input = sizes[0] if problem.input_kind == "tokens" else problem.input_size
    # Fused exactly when every layer has the same width (tied; per_layer / pyramid differ).
    assert model.fused == (hidden == {})
    if model.fused:
        (lstm,) = model.lstms
        assert isinstance(lstm, nn.LSTM)
        assert lstm.bidirectional == bidirectional and lstm.num_layers == 3
        assert lstm.input_size == first_input and (lstm.hidden_size,) * 3 == sizes
    else:
        widths = []
        for i, lstm in enumerate(model.lstms):
            assert isinstance(lstm, nn.LSTM)
            assert lstm.bidirectional == bidirectional and lstm.num_layers == 1
            assert lstm.input_size == (directions * sizes[i - 1] if i else first_input)
            widths.append(lstm.hidden_size)
        assert tuple(widths) == sizes
    assert model.head.in_features == directions * sizes[-1]

    out = model(x)
    if problem.readout == "every_step":
        assert out.shape == (4, 7, problem.output_size)
    else:
        assert out.shape == (4, problem.output_size)
        assert model(x, torch.tensor([7, 1, 3, 6])).shape == (4, problem.output_size)


def test_embedding_dim_and_parameter_count() -> None:
    model = StackedLSTM(CHAR, LSTMConfig(num_layers=1, hidden_size=6, embedding_dim=4))
    assert model.embedding is not None and model.embedding.embedding_dim == 4
    lstm = 4 * 6 * (4 + 6) + 2 * 4 * 6
    assert count_parameters(model) == 11 * 4 + lstm + 6 * 11 + 11
    model.head.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 11 * 4 + lstm


@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_batch_equals_each_sequence_alone(bidirectional: bool) -> None:
    params = LSTMConfig(
        num_layers=2, hidden_size=12, bidirectional=bidirectional, init="orthogonal"
    )
    model = StackedLSTM(CLASSIFY, params).eval()
    every = StackedLSTM(dataclasses.replace(CLASSIFY, readout="every_step"), params).eval()
    every.load_state_dict(model.state_dict())
    lengths = torch.tensor([5, 2, 7, 1])
    # Padding is garbage, not zeros: it must not reach the recurrence at all.
    x = torch.randn(4, 7, 3) * 10
    for i, n in enumerate(lengths.tolist()):
        x[i, :n] = torch.randn(n, 3)

    batched = model(x, lengths)
    per_step = every(x, lengths)
    for i, n in enumerate(lengths.tolist()):
        alone = x[i : i + 1, :n]
        torch.testing.assert_close(batched[i], model(alone)[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(per_step[i, :n], every(alone)[0], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(batched, model(x))  # without lengths the padding leaks in


# --------------------------------------------------------------------------------------
# LightningModule
# --------------------------------------------------------------------------------------


def _cycle_data(n: int = 32, length: int = 12, vocab: int = 5) -> TensorDataset:
    """Tokens counting up modulo ``vocab`` from random offsets; the target is the next token."""
    offsets = torch.randint(0, vocab, (n, 1))
    seq = (offsets + torch.arange(length + 1)) % vocab
    return TensorDataset(seq[:, :-1], seq[:, 1:])


class _LearningRates(L.Callback):
    def __init__(self) -> None:
        self.per_epoch: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.per_epoch.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_fit_lowers_the_loss_and_logs_epoch_metrics() -> None:
    problem = Problem("tokens", 5, 5, "every_step", "cross_entropy", "val_loss")
    params = LSTMConfig(
        num_layers=2,
        hidden_size=16,
        dropout=0.1,
        lr=0.03,
        lr_schedule="step",
        lr_decay=0.5,
        lr_decay_start=4,
        max_epochs=6,
    )
    module = LSTMLightningModule.from_config(problem, params)
    data = _cycle_data()
    train = DataLoader(data, batch_size=8, shuffle=True)
    val = DataLoader(data, batch_size=8)
    lrs = _LearningRates()
    trainer = _trainer(max_epochs=6, gradient_clip_val=params.grad_clip, callbacks=[lrs])

    before = trainer.validate(module, val, verbose=False)[0]["val_loss"]
    assert before == pytest.approx(math.log(5), abs=0.2)
    trainer.fit(module, train, val)

    metrics = trainer.callback_metrics
    after = float(metrics["val_loss"])
    assert after < 0.3 * before
    assert float(metrics["val_bpc"]) == pytest.approx(after / math.log(2))
    assert {"train_loss", "train_loss_step", "train_loss_epoch", "train_bpc"} <= set(metrics)
    train_loss = float(metrics["train_loss_epoch"])
    assert float(metrics["train_bpc"]) == pytest.approx(train_loss / math.log(2), rel=1e-5)
    assert lrs.per_epoch == pytest.approx([0.03] * 4 + [0.015, 0.0075])


class _Batches(Dataset[tuple[Tensor, ...]]):
    """Ready-made batches of chosen (unequal) sizes, for ``DataLoader(batch_size=None)``."""

    def __init__(self, batches: list[tuple[Tensor, ...]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        return self.batches[index]


def _validate(
    module: LSTMLightningModule, batches: list[tuple[Tensor, ...]]
) -> Mapping[str, float]:
    loader = DataLoader(_Batches(batches), batch_size=None)
    return _trainer().validate(module, loader, verbose=False)[0]


def test_rmse_is_the_exact_epoch_rmse_on_the_original_scale() -> None:
    module = LSTMLightningModule.from_config(FORECAST, LSTMConfig(num_layers=1, hidden_size=8))
    x, y = torch.randn(7, 6, 1), torch.randn(7, 2)
    # Unequal batches: the mean of per-batch RMSEs would differ from the epoch RMSE.
    result = _validate(module, [(x[:6], y[:6]), (x[6:], y[6:] + 5.0)])

    y[6:] += 5.0
    with torch.no_grad():
        squared = (module.eval()(x) - y) ** 2
    assert result["val_rmse"] == pytest.approx(2.5 * squared.mean().sqrt().item(), rel=1e-5)
    assert result["val_loss"] == pytest.approx(squared.mean().item(), rel=1e-5)


def test_log_forecast_rmse_is_on_the_original_scale_not_the_log() -> None:
    """``task.transform: log``: the model works on standardised logs relative to each
    window's anchor; the logged RMSE is that of exp() of both, i.e. in the series' units."""
    torch.manual_seed(0)
    problem = dataclasses.replace(FORECAST, target_transform="log", target_offset=4.0)
    module = LSTMLightningModule.from_config(problem, LSTMConfig(num_layers=1, hidden_size=8))
    x, y = torch.randn(7, 6, 1), torch.randn(7, 2) * 0.1
    anchor = torch.linspace(-1.0, 1.0, 7).unsqueeze(-1)
    result = _validate(module, [(x[:6], y[:6], anchor[:6]), (x[6:], y[6:], anchor[6:])])

    with torch.no_grad():
        out = module.eval()(x)

    def level(v: Tensor) -> Tensor:  # the inverse, by hand
        return torch.exp((v + anchor) * 2.5 + 4.0)

    expected = ((level(out) - level(y)) ** 2).mean().sqrt().item()
    assert result["val_rmse"] == pytest.approx(expected, rel=1e-5)
    # The loss stays the standardised-log MSE the model is trained on.
    assert result["val_loss"] == pytest.approx(((out - y) ** 2).mean().item(), rel=1e-5)
    assert expected > 10 * ((out - y) ** 2).mean().sqrt().item() * 2.5  # not the log's RMSE


@pytest.mark.parametrize("transform", ["none", "log"])
def test_rmse_of_a_series_of_1e21_does_not_overflow_float32(
    transform: Literal["none", "log"],
) -> None:
    """Errors of 1e20 square to 1e40, beyond float32: the RMSE is accumulated in units of
    the training split's sd (none) or geometric mean (log) and multiplied back once."""
    torch.manual_seed(0)
    problem = dataclasses.replace(
        FORECAST,
        target_scale=1e21 if transform == "none" else 0.5,
        target_transform=transform,
        target_offset=0.0 if transform == "none" else math.log(1e21),
    )
    module = LSTMLightningModule.from_config(problem, LSTMConfig(num_layers=1, hidden_size=8))
    x, y, anchor = torch.randn(7, 6, 1), torch.randn(7, 2), torch.zeros(7, 1)
    batch = (x, y, anchor) if transform == "log" else (x, y)
    result = _validate(module, [batch])

    with torch.no_grad():
        out = module.eval()(x)
    original = (problem.to_original(t.double(), anchor.double()) for t in (out, y))
    expected = ((next(original) - next(original)) ** 2).mean().sqrt().item()
    assert math.isfinite(result["val_rmse"]) and expected > 1e19
    assert result["val_rmse"] == pytest.approx(expected, rel=1e-4)


def test_log_forecast_without_its_anchor_is_refused() -> None:
    problem = dataclasses.replace(FORECAST, target_transform="log")
    with pytest.raises(ValueError, match="anchor"):
        problem.to_original(torch.zeros(2, 2), None)


def test_training_metrics_are_exact_epoch_values() -> None:
    # A vanishing learning rate keeps the weights fixed, so the epoch's values are known.
    params = LSTMConfig(num_layers=1, hidden_size=8, optimizer="sgd", lr=1e-12)
    module = LSTMLightningModule.from_config(FORECAST, params)
    x, y = torch.randn(7, 6, 1), torch.randn(7, 2)
    y[6:] += 5.0
    loader = DataLoader(_Batches([(x[:6], y[:6]), (x[6:], y[6:])]), batch_size=None)
    trainer = _trainer(max_epochs=1)
    trainer.fit(module, loader)

    with torch.no_grad():
        squared = (module.eval()(x) - y) ** 2
    metrics = trainer.callback_metrics
    assert float(metrics["train_rmse"]) == pytest.approx(
        2.5 * squared.mean().sqrt().item(), rel=1e-5
    )
    assert float(metrics["train_loss_epoch"]) == pytest.approx(squared.mean().item(), rel=1e-5)


def test_mse_metric() -> None:
    module = LSTMLightningModule.from_config(ADDING, LSTMConfig(num_layers=2, hidden_size=8))
    x, y = torch.randn(5, 4, 2), torch.randn(5, 1)
    result = _validate(module, [(x[:4], y[:4]), (x[4:], y[4:])])
    with torch.no_grad():
        expected = ((module.eval()(x) - y) ** 2).mean().item()
    assert result["val_mse"] == pytest.approx(expected, rel=1e-5)
    assert result["val_loss"] == pytest.approx(expected, rel=1e-5)


def test_accuracy_is_exact_on_variable_length_batches() -> None:
    module = LSTMLightningModule.from_config(CLASSIFY, LSTMConfig(num_layers=2, hidden_size=8))
    x, y = torch.randn(9, 6, 3), torch.randint(0, 4, (9,))
    lengths = torch.tensor([6, 3, 2, 5, 1, 6, 4, 4, 2])
    result = _validate(module, [(x[:8], y[:8], lengths[:8]), (x[8:], y[8:], lengths[8:])])
    with torch.no_grad():
        predicted = module.eval()(x, lengths).argmax(dim=-1)
    assert result["val_acc"] == pytest.approx((predicted == y).float().mean().item())


def test_checkpoint_reloads_the_same_model(tmp_path: Path) -> None:
    params = LSTMConfig(
        num_layers=2, hidden_mode="per_layer", hidden_sizes=(6, 4), bidirectional=True
    )
    module = LSTMLightningModule.from_config(CLASSIFY, params)
    trainer = _trainer(max_epochs=1)
    data = TensorDataset(torch.randn(8, 5, 3), torch.randint(0, 4, (8,)))
    trainer.fit(module, DataLoader(data, batch_size=4))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    loaded = LSTMLightningModule.load_from_checkpoint(path)
    assert loaded.config == params
    assert loaded.problem == CLASSIFY
    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(loaded.eval()(x), module.eval()(x))


def test_a_diverged_loss_raises() -> None:
    module = LSTMLightningModule.from_config(ADDING, LSTMConfig(num_layers=1, hidden_size=4))
    x = torch.randn(8, 5, 2)
    x[6, 2, 0] = float("nan")  # in the second batch
    loader = DataLoader(TensorDataset(x, torch.randn(8, 1)), batch_size=4)
    with pytest.raises(DivergedError, match="global step 1") as err:
        _trainer(max_epochs=1).fit(module, loader)
    assert err.value.step == 1 and math.isnan(err.value.loss)


@pytest.mark.parametrize(
    ("name", "cls", "extra"),
    [
        ("adam", torch.optim.Adam, {}),
        ("adamw", torch.optim.AdamW, {}),
        ("sgd", torch.optim.SGD, {"momentum": 0.9}),
        ("rmsprop", torch.optim.RMSprop, {"momentum": 0.9}),
    ],
)
def test_configure_optimizers(
    name: str, cls: type[torch.optim.Optimizer], extra: dict[str, float]
) -> None:
    params = LSTMConfig(optimizer=name, lr=0.2, weight_decay=1e-4, momentum=0.9, hidden_size=4)
    module = LSTMLightningModule.from_config(CHAR, params)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, cls) and type(optimizer) is cls
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.2 and group["weight_decay"] == 1e-4
    for key, value in extra.items():
        assert group[key] == value
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(module.parameters()))


def _scheduler(
    problem: Problem, **params: Any
) -> tuple[torch.optim.Optimizer, Any, dict[str, Any]]:
    module = LSTMLightningModule.from_config(problem, LSTMConfig(hidden_size=4, lr=1.0, **params))
    config: Any = module.configure_optimizers()
    assert isinstance(config, dict)
    return config["optimizer"], config["lr_scheduler"]["scheduler"], config["lr_scheduler"]


def test_step_schedule_decays_every_epoch_from_the_start_epoch() -> None:
    optimizer, scheduler, config = _scheduler(
        CHAR, lr_schedule="step", lr_decay=0.5, lr_decay_start=2
    )
    assert config["interval"] == "epoch"
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1.0, 1.0, 0.5, 0.25, 0.125])

    optimizer, _, _ = _scheduler(CHAR, lr_schedule="step", lr_decay=0.5, lr_decay_start=0)
    assert optimizer.param_groups[0]["lr"] == 0.5  # epoch 0 is already decayed


def test_cosine_and_plateau_schedules() -> None:
    optimizer, scheduler, _ = _scheduler(CHAR, lr_schedule="cosine", max_epochs=4)
    assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)

    _, scheduler, config = _scheduler(CLASSIFY, lr_schedule="plateau", lr_decay=0.3)
    assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert (scheduler.mode, scheduler.factor, scheduler.patience) == ("max", 0.3, 1)
    assert config["monitor"] == "val_acc"
    _, scheduler, config = _scheduler(FORECAST, lr_schedule="plateau")
    assert scheduler.mode == "min" and config["monitor"] == "val_rmse"

    module = LSTMLightningModule.from_config(CHAR, LSTMConfig(lr_schedule="plateau", lr_decay=1.0))
    assert isinstance(module.configure_optimizers(), torch.optim.Adam)


# --------------------------------------------------------------------------------------
# Cells: lstm, gru, rnn
# --------------------------------------------------------------------------------------

_CELL_MODULES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
_GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _cell_params(model: StackedLSTM, cell: str) -> Iterator[tuple[str, int, Tensor]]:
    """(name, hidden size, tensor) of every parameter of every layer and direction."""
    for i, layer in enumerate(model.lstms):
        assert type(layer) is _CELL_MODULES[cell] and isinstance(layer, nn.RNNBase)
        for name, param in layer.named_parameters():
            yield f"lstms.{i}.{name}", layer.hidden_size, param.detach()


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("problem", [CHAR, CLASSIFY, FORECAST, ADDING])
@pytest.mark.parametrize("cell", ["gru", "rnn", "lstm"])
def test_every_cell_gives_every_task_kinds_shapes(
    cell: str, problem: Problem, bidirectional: bool
) -> None:
    params = LSTMConfig(
        cell=cell, num_layers=2, hidden_mode="per_layer", hidden_sizes=(6, 5),
        bidirectional=bidirectional,
    )  # fmt: skip
    model = StackedLSTM(problem, params)
    directions = 2 if bidirectional else 1
    for layer in model.lstms:
        assert type(layer) is _CELL_MODULES[cell]
        assert layer.bidirectional == bidirectional and layer.num_layers == 1
    if cell == "rnn":
        assert all(layer.nonlinearity == "tanh" for layer in model.lstms)
    assert model.head.in_features == directions * 5
    if problem.input_kind == "tokens":
        x = torch.randint(0, problem.input_size, (4, 7))
    else:
        x = torch.randn(4, 7, problem.input_size)
    if problem.readout == "every_step":
        assert model(x).shape == (4, 7, problem.output_size)
    else:
        assert model(x).shape == (4, problem.output_size)
        assert model(x, torch.tensor([7, 1, 3, 6])).shape == (4, problem.output_size)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_packed_batch_equals_each_sequence_alone_for_every_cell(
    cell: str, bidirectional: bool
) -> None:
    params = LSTMConfig(
        cell=cell, num_layers=2, hidden_size=12, bidirectional=bidirectional, init="orthogonal"
    )
    model = StackedLSTM(CLASSIFY, params).eval()
    lengths = torch.tensor([5, 2, 7, 1])
    x = torch.randn(4, 7, 3) * 10
    for i, n in enumerate(lengths.tolist()):
        x[i, :n] = torch.randn(n, 3)
    batched = model(x, lengths)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(batched[i], model(x[i : i + 1, :n])[0], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(batched, model(x))


@pytest.mark.parametrize("init", ["pytorch_default", "uniform", "xavier_uniform", "orthogonal"])
@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_every_init_strategy_applies_to_each_cells_gate_blocks(cell: str, init: str) -> None:
    params = LSTMConfig(
        cell=cell, num_layers=2, hidden_mode="per_layer", hidden_sizes=(16, 8),
        bidirectional=True, init=init, init_range=0.04,
    )  # fmt: skip
    model = StackedLSTM(CLASSIFY, params)
    gates = _GATES[cell]
    seen = 0
    for name, hidden, param in _cell_params(model, cell):
        seen += 1
        assert param.shape[0] == gates * hidden, name
        if init == "uniform":
            assert param.abs().max() <= 0.04, name
        elif init == "xavier_uniform":
            if "weight_hh" in name:
                torch.testing.assert_close(param.T @ param, torch.eye(hidden), atol=1e-5, rtol=0)
            elif "weight_ih" in name:
                bound = math.sqrt(6.0 / (param.shape[1] + gates * hidden))
                assert param.abs().max() <= bound, name
            else:
                assert torch.all(param == 0), name
        elif init == "orthogonal":
            for gate in range(gates):
                block = param[gate * hidden : (gate + 1) * hidden]
                where = f"{name} gate {gate}"
                if "weight_hh" in name:
                    eye = torch.eye(hidden)
                    torch.testing.assert_close(block @ block.T, eye, atol=1e-5, rtol=0, msg=where)
                elif "weight_ih" in name:
                    bound = math.sqrt(6.0 / (block.shape[1] + hidden))
                    assert block.abs().max() <= bound, where
                else:
                    assert torch.all(block == 0), where
        else:
            bound = 1 / math.sqrt(hidden)
            assert param.abs().max() <= bound, name
    assert seen == 2 * 2 * 4  # layers x directions x (w_ih, w_hh, b_ih, b_hh)


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_forget_bias_is_refused_for_gru_and_rnn(cell: str) -> None:
    with pytest.raises(ValidationError) as err:
        LSTMConfig(cell=cell, forget_bias=1.0)
    (error,) = err.value.errors()
    assert error["loc"] == ("forget_bias",)
    assert "only in LSTM cells" in error["msg"]
    assert LSTMConfig(cell=cell, forget_bias=None).forget_bias is None
    assert LSTMConfig(cell="lstm", forget_bias=1.0).forget_bias == 1.0
    with pytest.raises(InvalidConfig) as refused:
        parse_config({"task": {"kind": "adding"}, "params": {"cell": cell, "forget_bias": 1.0}})
    assert [e.loc for e in refused.value.errors] == ["params.forget_bias"]


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_fit_config_trains_gru_and_rnn_cells(cell: str) -> None:
    task = {"kind": "adding", "seq_len": 10, "n_train": 64, "n_val": 32, "n_test": 32}
    params = {"cell": cell, "num_layers": 2, "hidden_size": 8, "batch_size": 32,
              "max_epochs": 1, "init": "orthogonal"}  # fmt: skip
    result = fit_config(parse_config({"task": task, "params": params}), accelerator="cpu")
    assert result.value is not None and math.isfinite(result.value)
