"""StackedLSTM's two forms (fused multi-layer module, per-layer stack) and its stateful API."""

from __future__ import annotations

import copy
import io
import itertools
import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from service.search_space import LSTMConfig
from service.training.data.base import Problem
from service.training.model import (
    RecurrentState,
    StackedLSTM,
    count_parameters,
    detach_state,
)
from service.training.module import LSTMLightningModule

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)"),
    pytest.mark.filterwarnings(
        "ignore:You defined a `validation_step` but have no `val_dataloader`"
    ),
]

CHAR = Problem("tokens", 11, 11, "every_step", "cross_entropy", "val_loss")
CLASSIFY = Problem("features", 3, 4, "last_step", "cross_entropy", "val_acc")
TAGGER = Problem("features", 3, 5, "every_step", "cross_entropy", "val_loss")
ADDING = Problem("features", 2, 1, "last_step", "mse", "val_mse")

CELLS = ["lstm", "gru", "rnn"]
INITS = ["pytorch_default", "uniform", "xavier_uniform", "orthogonal"]


def _pair(problem: Problem, seed: int = 0, **params: Any) -> tuple[StackedLSTM, StackedLSTM]:
    """The per-layer and the fused form of one config, each built from ``seed``."""
    config = LSTMConfig(**params)
    torch.manual_seed(seed)
    per_layer = StackedLSTM(problem, config, fused=False)
    torch.manual_seed(seed)
    fused = StackedLSTM(problem, config, fused=True)
    assert not per_layer.fused and fused.fused
    return per_layer, fused


def _fused_name(per_layer_name: str) -> str:
    """The fused form's name of a per-layer parameter (written out here, independently of
    the model's own mapping): ``lstms.{k}.weight_ih_l0[_reverse]`` -> ``lstms.0.weight_ih_l{k}``."""
    match = re.fullmatch(r"lstms\.(\d+)\.(\w+)_l0(_reverse)?", per_layer_name)
    if match is None:
        return per_layer_name
    layer, kind, reverse = match.groups()
    return f"lstms.0.{kind}_l{layer}{reverse or ''}"


def _input(problem: Problem, batch: int = 4, steps: int = 7) -> Tensor:
    if problem.input_kind == "tokens":
        return torch.randint(0, problem.input_size, (batch, steps))
    return torch.randn(batch, steps, problem.input_size)


# --------------------------------------------------------------------------------------
# Which form is built
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hidden", "fused"),
    [
        ({"hidden_size": 16}, True),
        ({"hidden_mode": "pyramid", "hidden_size": 16}, False),
        ({"hidden_mode": "pyramid", "hidden_size": 4}, True),  # the floor: 4, 4, 4
        ({"hidden_mode": "per_layer", "hidden_sizes": (6, 6, 6)}, True),
        ({"hidden_mode": "per_layer", "hidden_sizes": (6, 5, 6)}, False),
    ],
)
def test_the_stack_is_fused_exactly_when_every_layer_has_one_width(
    hidden: dict[str, Any], fused: bool
) -> None:
    config = LSTMConfig(num_layers=3, **hidden)
    model = StackedLSTM(CLASSIFY, config)
    assert model.fused == fused
    assert len(model.lstms) == (1 if fused else 3)
    assert StackedLSTM(CLASSIFY, config, fused=False).fused is False
    if not fused:
        with pytest.raises(ValueError, match="one width"):
            StackedLSTM(CLASSIFY, config, fused=True)


# --------------------------------------------------------------------------------------
# Same initial weights from the same seed
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize(
    ("cell", "init", "forget_bias"),
    [(c, i, None) for c in CELLS for i in INITS] + [("lstm", i, 1.0) for i in INITS],
)
def test_both_forms_draw_the_same_initial_weights(
    cell: str, init: str, forget_bias: float | None, num_layers: int, bidirectional: bool
) -> None:
    per_layer, fused = _pair(
        CHAR,
        seed=7,
        cell=cell,
        init=init,
        forget_bias=forget_bias,
        num_layers=num_layers,
        hidden_size=6,
        embedding_dim=5,
        bidirectional=bidirectional,
        init_range=0.1,
    )
    mine = dict(per_layer.named_parameters())
    theirs = dict(fused.named_parameters())
    assert {_fused_name(name) for name in mine} == set(theirs)
    for name, param in mine.items():
        assert torch.equal(param, theirs[_fused_name(name)]), name
    # The same order too (the optimizer's parameter groups and state line up).
    names = [_fused_name(name) for name, _ in per_layer.named_parameters()]
    assert names == [name for name, _ in fused.named_parameters()]
    assert count_parameters(per_layer) == count_parameters(fused)
    # And the RNG is left in the same place (what is drawn after the model is the same).
    torch.manual_seed(7)
    StackedLSTM(CHAR, LSTMConfig(cell=cell, num_layers=num_layers, hidden_size=6), fused=False)
    after_per_layer = torch.rand(3)
    torch.manual_seed(7)
    StackedLSTM(CHAR, LSTMConfig(cell=cell, num_layers=num_layers, hidden_size=6), fused=True)
    assert torch.equal(torch.rand(3), after_per_layer)


# --------------------------------------------------------------------------------------
# Same outputs and gradients for the same weights
# --------------------------------------------------------------------------------------


def _outputs_and_gradients(
    model: StackedLSTM, x: Tensor, lengths: Tensor | None, seed: int
) -> tuple[Tensor, dict[str, Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x, lengths)
    torch.autograd.backward((out * torch.linspace(-1, 1, out.shape[-1])).sum())
    grads = {}
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        grads[name] = param.grad
    return out.detach(), grads


@pytest.mark.parametrize(
    ("problem", "packed"), [(CHAR, False), (CLASSIFY, False), (CLASSIFY, True), (TAGGER, True)]
)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("mode", ["train, dropout 0", "eval, dropout 0.4"])
def test_both_forms_compute_the_same_outputs_and_gradients(
    cell: str, bidirectional: bool, problem: Problem, packed: bool, mode: str
) -> None:
    train = mode.startswith("train")
    per_layer, fused = _pair(
        problem, cell=cell, num_layers=3, hidden_size=8, bidirectional=bidirectional,
        dropout=0.0 if train else 0.4, input_dropout=0.2, output_dropout=0.3, init="orthogonal",
    )  # fmt: skip
    per_layer.train(train)
    fused.train(train)
    x = _input(problem, steps=9)
    lengths = torch.tensor([9, 2, 5, 1]) if packed else None
    out, grads = _outputs_and_gradients(per_layer, x, lengths, seed=3)
    fused_out, fused_grads = _outputs_and_gradients(fused, x, lengths, seed=3)

    torch.testing.assert_close(fused_out, out, atol=1e-6, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[_fused_name(name)], grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_dropout_in_training_draws_the_same_masks_on_cpu(packed: bool) -> None:
    """Documented, not promised: on CPU the fused kernel draws its between-layer dropout
    masks from the same generator, in the same order, as the per-layer stack's nn.Dropout
    (cuDNN has its own dropout state: on a GPU the masks differ)."""
    per_layer, fused = _pair(CLASSIFY, num_layers=3, hidden_size=8, dropout=0.5)
    x = torch.randn(4, 6, 3)
    lengths = torch.tensor([6, 3, 1, 5]) if packed else None
    out, grads = _outputs_and_gradients(per_layer.train(), x, lengths, seed=11)
    fused_out, fused_grads = _outputs_and_gradients(fused.train(), x, lengths, seed=11)
    torch.testing.assert_close(fused_out, out, atol=1e-6, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[_fused_name(name)], grad, atol=1e-6, rtol=1e-5)
    # And the dropout is really on: another seed, other masks.
    other, _ = _outputs_and_gradients(fused, x, lengths, seed=12)
    assert not torch.allclose(other, fused_out)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_the_last_step_readout_is_the_last_layers_final_state(bidirectional: bool) -> None:
    model = StackedLSTM(
        CLASSIFY, LSTMConfig(num_layers=3, hidden_size=5, bidirectional=bidirectional)
    ).eval()
    assert model.fused
    (lstm,) = model.lstms
    x = torch.randn(2, 4, 3)
    out, (h_n, _) = lstm(x)
    assert h_n.shape == (3 * (2 if bidirectional else 1), 2, 5)
    # Forward direction: its last step; reverse direction: its state at t=0.
    last = torch.cat([out[:, -1, :5], out[:, 0, 5:]], dim=-1)
    expected = last if bidirectional else out[:, -1]
    torch.testing.assert_close(model(x), model.head(expected))


# --------------------------------------------------------------------------------------
# Checkpoints load into either form
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("cell", CELLS)
def test_a_state_dict_of_either_form_loads_into_the_other(cell: str, bidirectional: bool) -> None:
    params = {"cell": cell, "num_layers": 3, "hidden_size": 6, "bidirectional": bidirectional}
    source_per_layer, source_fused = _pair(CHAR, seed=1, **params)
    target_per_layer, target_fused = _pair(CHAR, seed=2, **params)
    x = _input(CHAR)
    for source, target in [(source_per_layer, target_fused), (source_fused, target_per_layer)]:
        state = source.state_dict()
        before = dict(state)
        assert not torch.allclose(target.eval()(x), source.eval()(x))
        result = target.load_state_dict(state)  # strict
        assert result.missing_keys == [] and result.unexpected_keys == []
        assert state.keys() == before.keys()  # the caller's dict is left alone
        torch.testing.assert_close(target.eval()(x), source.eval()(x))


def test_a_state_dict_of_another_config_is_still_refused() -> None:
    three, _ = _pair(CLASSIFY, num_layers=3, hidden_size=6)
    _, two = _pair(CLASSIFY, num_layers=2, hidden_size=6)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*lstms\.0\.weight_ih_l2"):
        two.load_state_dict(three.state_dict())
    wider, _ = _pair(CLASSIFY, num_layers=2, hidden_size=8)
    with pytest.raises(RuntimeError, match="size mismatch"):
        two.load_state_dict(wider.state_dict())


def test_copies_and_pickles_keep_loading_either_form() -> None:
    per_layer, fused = _pair(CLASSIFY, seed=4, num_layers=2, hidden_size=6)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(fused), torch.load(buffer, weights_only=False)):
        for param in clone.parameters():
            nn.init.zeros_(param)
        clone.load_state_dict(per_layer.state_dict())
        x = torch.randn(2, 5, 3)
        torch.testing.assert_close(clone.eval()(x), per_layer.eval()(x))


def _trainer() -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_a_checkpoint_written_by_the_per_layer_stack_loads(tmp_path: Path) -> None:
    """A Lightning checkpoint from before the fused form (keys ``model.lstms.{k}.*_l0``)."""
    params = LSTMConfig(num_layers=3, hidden_size=6, dropout=0.1)
    module = LSTMLightningModule.from_config(CLASSIFY, params)
    assert module.model.fused
    data = TensorDataset(torch.randn(8, 5, 3), torch.randint(0, 4, (8,)))
    trainer = _trainer()
    trainer.fit(module, DataLoader(data, batch_size=4))
    path = tmp_path / "new.ckpt"
    trainer.save_checkpoint(path)

    # Rewrite it as the per-layer stack wrote it (optimizer state and all else unchanged).
    checkpoint = torch.load(path, weights_only=False)
    fused_names = {_fused_name(f"lstms.{k}.{kind}_l0"): f"lstms.{k}.{kind}_l0"
                   for k, kind in itertools.product(range(3), ["weight_ih", "weight_hh",
                                                              "bias_ih", "bias_hh"])}  # fmt: skip
    old_state = {}
    for key, value in checkpoint["state_dict"].items():
        name = key.removeprefix("model.")
        old_state["model." + fused_names.get(name, name)] = value
    assert "model.lstms.2.weight_hh_l0" in old_state
    assert not any(key.startswith("model.lstms.0.") and "_l0" not in key for key in old_state)
    checkpoint["state_dict"] = old_state
    old_path = tmp_path / "old.ckpt"
    torch.save(checkpoint, old_path)

    loaded = LSTMLightningModule.load_from_checkpoint(old_path)
    assert loaded.model.fused
    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(loaded.eval()(x), module.eval()(x))
    # And into a per-layer model (as an older build of the code would).
    per_layer = StackedLSTM(CLASSIFY, params, fused=False)
    per_layer.load_state_dict({k.removeprefix("model."): v for k, v in old_state.items()})
    torch.testing.assert_close(per_layer.eval()(x), module.model.eval()(x))


# --------------------------------------------------------------------------------------
# forward_stateful and detach_state
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("problem", [CHAR, ADDING, TAGGER])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("cell", CELLS)
def test_two_halves_with_the_state_carried_equal_one_call(
    cell: str, num_layers: int, fused: bool, problem: Problem
) -> None:
    config = LSTMConfig(cell=cell, num_layers=num_layers, hidden_size=7, dropout=0.3)
    model = StackedLSTM(problem, config, fused=fused).eval()
    assert model.fused == fused
    x = _input(problem, batch=3, steps=10)

    whole, whole_state = model.forward_stateful(x, None)
    first, state = model.forward_stateful(x[:, :5], None)
    second, final = model.forward_stateful(x[:, 5:], state)
    assert len(final) == len(whole_state) == (1 if fused else num_layers)
    if problem.readout == "every_step":
        assert whole.shape[:2] == (3, 10)
        torch.testing.assert_close(torch.cat([first, second], dim=1), whole)
    else:
        torch.testing.assert_close(second, whole)
    for mine, theirs in zip(final, whole_state, strict=True):
        torch.testing.assert_close(mine, theirs)
    # Without a state it is forward.
    torch.testing.assert_close(whole, model(x))


@pytest.mark.parametrize("cell", CELLS)
def test_the_final_state_is_every_layers(cell: str) -> None:
    """Both forms return the same final state of every layer, in their own layout."""
    per_layer, fused = _pair(CHAR, cell=cell, num_layers=3, hidden_size=5)
    x = _input(CHAR, batch=2, steps=6)
    out, state = per_layer.forward_stateful(x, None)
    fused_out, (fused_state,) = fused.forward_stateful(x, None)
    torch.testing.assert_close(fused_out, out)

    def stacked(part: int) -> Tensor:
        return torch.cat([s[part] if isinstance(s, tuple) else s for s in state])

    if cell == "lstm":
        assert isinstance(fused_state, tuple)
        for part in (0, 1):  # h, c: [layers, B, H]
            assert fused_state[part].shape == (3, 2, 5)
            torch.testing.assert_close(fused_state[part], stacked(part))
    else:
        assert isinstance(fused_state, Tensor)
        torch.testing.assert_close(fused_state, stacked(0))


@pytest.mark.parametrize("cell", CELLS)
def test_a_carried_state_changes_the_output(cell: str) -> None:
    model = StackedLSTM(CHAR, LSTMConfig(cell=cell, num_layers=2, hidden_size=6)).eval()
    x = _input(CHAR, batch=2, steps=5)
    _, state = model.forward_stateful(x, None)
    fresh, _ = model.forward_stateful(x, None)
    carried, _ = model.forward_stateful(x, state)
    assert not torch.allclose(fresh, carried)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("cell", CELLS)
def test_detach_state_cuts_the_graph_at_the_boundary(cell: str, fused: bool) -> None:
    config = LSTMConfig(cell=cell, num_layers=2, hidden_size=6)
    model = StackedLSTM(CHAR, config, fused=fused)
    # The first chunk uses tokens 0-4 only, the second 5-10.
    first_chunk = torch.randint(0, 5, (2, 4))
    second_chunk = torch.randint(5, 11, (2, 4))
    _, state = model.forward_stateful(first_chunk, None)
    assert all(t.requires_grad and t.grad_fn is not None for t in _tensors(state))

    detached = detach_state(state)
    assert type(detached) is tuple
    assert [type(s) for s in detached] == [type(s) for s in state]
    for before, after in zip(_tensors(state), _tensors(detached), strict=True):
        assert not after.requires_grad and after.grad_fn is None
        assert torch.equal(before, after)

    # Truncated BPTT: the second chunk's loss no longer reaches the first chunk's tokens.
    assert model.embedding is not None
    for carried, reaches_first in [(state, True), (detached, False)]:
        model.zero_grad(set_to_none=True)
        out, _ = model.forward_stateful(second_chunk, carried)
        torch.autograd.backward(out.sum(), retain_graph=True)
        grad = model.embedding.weight.grad
        assert grad is not None
        assert bool(torch.any(grad[:5] != 0)) == reaches_first
        assert torch.any(grad[5:] != 0)


def _tensors(state: RecurrentState) -> list[Tensor]:
    return [t for s in state for t in (s if isinstance(s, tuple) else (s,))]


def test_forward_stateful_refuses_bidirectional_and_foreign_states() -> None:
    model = StackedLSTM(CHAR, LSTMConfig(num_layers=2, hidden_size=6, bidirectional=True))
    with pytest.raises(ValueError, match="unidirectional"):
        model.forward_stateful(_input(CHAR), None)

    per_layer, fused = _pair(CHAR, num_layers=2, hidden_size=6)
    _, state = per_layer.forward_stateful(_input(CHAR), None)
    with pytest.raises(ValueError, match="another model"):
        fused.forward_stateful(_input(CHAR), state)
