"""The stacked recurrent network every trial trains, and its weight-initialisation strategies.

Two forms of the same function (``params.cell``: ``nn.LSTM``, ``nn.GRU`` or tanh ``nn.RNN``):

- fused, when every layer has the same width (``hidden_mode="tied"``, or ``per_layer`` /
  ``pyramid`` sizes that happen to be equal): ONE module ``cell(num_layers=N,
  dropout=params.dropout)``. PyTorch applies that dropout to the output of every layer but
  the last -- exactly the between-layer dropout of Zaremba et al. (2014) -- and runs the
  whole stack in one call: cuDNN's fastest path on a GPU. On CPU (oneDNN, one layer at a
  time inside the call) a training step costs the same as the per-layer stack, within 3%
  (``bench/training_overhead.py --only fused``, BENCHMARKS.md).
- per-layer, when widths differ (pyramid, per_layer): one module per layer, with an
  ``nn.Dropout`` between consecutive layers (``layer_dropouts``).

Both forms draw the same initial weights from the same seed (the parameters are created
and initialised in the same order: layer 0 forward, layer 0 reverse, layer 1, ...) and
compute the same outputs and gradients for the same weights; their checkpoints load into
each other (:func:`_convert_recurrent_keys`). One difference: with ``dropout > 0`` in
training mode the dropout masks are drawn by the fused kernel; on CPU they come from the
same generator in the same order (tested: identical), cuDNN draws them from its own
dropout state, so on a GPU the masks differ (the distribution is the same).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal, TypeAlias, cast

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from service.search_space import CellKind, InitStrategy, LSTMConfig
from service.training.data.base import Problem

#: Gate blocks stacked in each cell's weights and biases (torch.nn.LSTM: i, f, g, o;
#: torch.nn.GRU: r, z, n; torch.nn.RNN: one).
GATES: dict[CellKind, int] = {"lstm": 4, "gru": 3, "rnn": 1}
_CELLS: dict[CellKind, Callable[..., nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}

#: The final state of one recurrent module: ``h_n`` (GRU, RNN) or ``(h_n, c_n)`` (LSTM),
#: each ``[layers_in_module, B, H]``.
ModuleState: TypeAlias = Tensor | tuple[Tensor, Tensor]
#: The recurrent state a :class:`StackedLSTM` carries between calls of
#: :meth:`StackedLSTM.forward_stateful`: one :data:`ModuleState` per module of ``lstms``.
#: Opaque to callers: pass back what the model returned (after :func:`detach_state`); a
#: state fits only models of the same form (fused or per-layer) and batch size.
RecurrentState: TypeAlias = tuple[ModuleState, ...]

_Sequence: TypeAlias = Tensor | PackedSequence


class StackedLSTM(nn.Module):
    """Embedding or features -> N stacked recurrent layers (LSTM, GRU or RNN) -> linear head.

    Shapes (B batch, T time, V vocabulary, F features, O ``problem.output_size``):

    - ``input_kind="tokens"``: x Long[B, T] through ``nn.Embedding(V, embedding_dim)``, where
      ``embedding_dim`` defaults to the first layer's width; ``"features"``: x Float[B, T, F].
    - ``readout="every_step"``: logits Float[B, T, O]; ``"last_step"``: Float[B, O] from the
      last layer's final hidden state (both directions concatenated when bidirectional).

    ``fused``: None (the default) fuses the stack into one module whenever every layer has
    the same width (module docstring); False forces one module per layer; True requires
    tied widths (ValueError otherwise). ``self.fused`` says which form was built.
    """

    def __init__(self, problem: Problem, params: LSTMConfig, *, fused: bool | None = None) -> None:
        super().__init__()
        self.readout: Literal["every_step", "last_step"] = problem.readout
        self.bidirectional = params.bidirectional
        self.cell: CellKind = params.cell
        cell = _CELLS[params.cell]
        sizes = params.layer_sizes()
        directions = 2 if params.bidirectional else 1
        tied = len(set(sizes)) == 1
        if fused and not tied:
            raise ValueError(f"a fused stack needs layers of one width (widths: {sizes})")
        self.fused = tied if fused is None else fused

        self.embedding: nn.Embedding | None
        if problem.input_kind == "tokens":
            embedding_dim = params.embedding_dim or sizes[0]
            self.embedding = nn.Embedding(problem.input_size, embedding_dim)
            layer_input = embedding_dim
        else:
            self.embedding = None
            layer_input = problem.input_size
        self.input_dropout = nn.Dropout(params.input_dropout)

        #: One module with ``num_layers=N`` when fused; else one module per layer.
        self.lstms = nn.ModuleList()
        if self.fused:
            self.lstms.append(
                cell(
                    layer_input,
                    sizes[0],
                    num_layers=len(sizes),
                    # nn.LSTM warns about a dropout it has nowhere to put (one layer).
                    dropout=params.dropout if len(sizes) > 1 else 0.0,
                    batch_first=True,
                    bidirectional=params.bidirectional,
                )
            )
            layer_input = directions * sizes[0]
        else:
            for hidden in sizes:
                self.lstms.append(
                    cell(layer_input, hidden, batch_first=True, bidirectional=params.bidirectional)
                )
                layer_input = directions * hidden
        #: ``layer_dropouts[i]`` sits between ``lstms[i]`` and ``lstms[i + 1]``; empty when
        #: fused (the fused module applies ``params.dropout`` between its layers itself).
        between = 0 if self.fused else len(sizes) - 1
        self.layer_dropouts = nn.ModuleList(nn.Dropout(params.dropout) for _ in range(between))
        self.output_dropout = nn.Dropout(params.output_dropout)
        self.head = nn.Linear(layer_input, problem.output_size)

        self.init_weights(params.init, params.init_range, params.forget_bias)
        # Checkpoints of either form load into either form (the same parameters, renamed).
        self.register_load_state_dict_pre_hook(_convert_recurrent_keys)  # type: ignore[no-untyped-call]

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Logits (or regression outputs) for a batch; ``lengths`` for right-padded batches.

        With ``lengths`` the sequences are packed, so the last-step readout is each
        sequence's true last state and padding never reaches the recurrence.
        """
        h = self._embed(x)
        if lengths is None:
            out, state = self._recur(h, None)
            return self._read_out(out, state)
        return self._forward_packed(h, lengths)

    def forward_stateful(
        self, x: Tensor, state: RecurrentState | None
    ) -> tuple[Tensor, RecurrentState]:
        """:meth:`forward` without lengths, starting from ``state`` (None: zeros), and the
        final state of every layer: ``(logits, state)``.

        For truncated backpropagation through time: feed consecutive chunks of the same
        streams, passing each call the state the previous one returned, detached
        (:func:`detach_state`) so that the gradient stops at the chunk boundary. Running
        a sequence in one call equals running its halves with the state carried.
        Unidirectional models only (ValueError otherwise: a state carried forward in time
        has no meaning for the backward direction).
        """
        if self.bidirectional:
            raise ValueError("forward_stateful needs a unidirectional model")
        if state is not None and len(state) != len(self.lstms):
            raise ValueError(
                f"the state has {len(state)} entries, this model {len(self.lstms)} "
                f"recurrent modules (fused: {self.fused}): a state of another model"
            )
        out, final = self._recur(self._embed(x), state)
        return self._read_out(out, final), final

    def _embed(self, x: Tensor) -> Tensor:
        h = self.embedding(x) if self.embedding is not None else x
        dropped: Tensor = self.input_dropout(h)
        return dropped

    def _recur(self, h: _Sequence, state: RecurrentState | None) -> tuple[Any, RecurrentState]:
        """The stack on a batch (a tensor or a PackedSequence): its output (of the same kind)
        and the final state of every module."""
        final: list[ModuleState] = []
        for i, lstm in enumerate(self.lstms):
            if i > 0:
                h = _apply(self.layer_dropouts[i - 1], h)
            # With enforce_sorted=False, the RNN modules return states in the caller's order.
            h, module_state = lstm(h, None if state is None else state[i])
            final.append(module_state)
        return h, tuple(final)

    def _forward_packed(self, h: Tensor, lengths: Tensor) -> Tensor:
        total_length = h.shape[1]
        packed = pack_padded_sequence(h, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, state = self._recur(packed, None)
        if self.readout == "last_step":
            return self._read_out(h, state)
        padded, _ = pad_packed_sequence(out, batch_first=True, total_length=total_length)
        return self._read_out(padded, state)

    def _read_out(self, out: Tensor, state: RecurrentState) -> Tensor:
        if self.readout == "last_step":
            # h_n: [layers * directions, B, H], the last layer's directions last (forward,
            # then reverse, whose final state is the one at t=0).
            h_n = _hidden_state(state[-1])
            out = torch.cat([h_n[-2], h_n[-1]], dim=-1) if self.bidirectional else h_n[-1]
        logits: Tensor = self.head(self.output_dropout(out))
        return logits

    def _lstm_layers(self) -> list[nn.RNNBase]:
        return [cast(nn.RNNBase, lstm) for lstm in self.lstms]

    def init_weights(
        self, strategy: InitStrategy, init_range: float = 0.05, forget_bias: float | None = None
    ) -> None:
        """Initialise the weights in place (called by ``__init__``).

        The recurrent weights stack ``G`` gate blocks (:data:`GATES`: LSTM 4 [i, f, g, o],
        GRU 3 [r, z, n], RNN 1), each ``H`` rows.

        - ``pytorch_default``: keep PyTorch's own initialisation (every cell: U(±1/sqrt(H))).
        - ``uniform``: every parameter of the model (embedding and head included) from
          U(-init_range, init_range), as Zaremba et al. (2014).
        - ``xavier_uniform``: each layer's ``weight_ih`` Xavier-uniform as a whole, each
          ``weight_hh`` (GH x H) orthogonal as a whole, the recurrent biases zero.
        - ``orthogonal``: each gate block of ``weight_hh`` an orthogonal H x H matrix, each
          gate block of ``weight_ih`` Xavier-uniform, the recurrent biases zero.

        Embedding and head keep PyTorch's initialisation except under ``uniform``. Then, if
        ``forget_bias`` is given (LSTM cells only), the effective forget-gate bias
        ``b_ih[H:2H] + b_hh[H:2H]`` of every layer and direction is set to exactly that value
        (Jozefowicz et al. 2015).

        Every layer and direction, in either form (its parameters ``weight_ih_l{k}``,
        ``weight_ih_l{k}_reverse``, ... in the same order), so both forms draw the same
        weights from the same seed.
        """
        with torch.no_grad():
            if strategy == "uniform":
                for param in self.parameters():
                    nn.init.uniform_(param, -init_range, init_range)
            elif strategy in ("xavier_uniform", "orthogonal"):
                per_gate = strategy == "orthogonal"
                for lstm in self._lstm_layers():
                    for name, param in lstm.named_parameters():
                        _init_recurrent_param(name, param, GATES[self.cell], per_gate=per_gate)
            elif strategy != "pytorch_default":
                raise ValueError(f"unknown init strategy {strategy!r}")
            if forget_bias is not None:
                if self.cell != "lstm":
                    raise ValueError(f"forget_bias exists only in LSTM cells (cell: {self.cell})")
                for lstm in self._lstm_layers():
                    hidden = lstm.hidden_size
                    for name, param in lstm.named_parameters():
                        if name.startswith("bias_ih"):
                            param[hidden : 2 * hidden].fill_(forget_bias)
                        elif name.startswith("bias_hh"):
                            param[hidden : 2 * hidden].zero_()


def detach_state(state: RecurrentState) -> RecurrentState:
    """``state`` with every tensor detached from the graph that computed it: the gradient of
    the next chunk stops at the chunk boundary (truncated BPTT; Zaremba et al. 2014)."""
    return tuple(
        (s[0].detach(), s[1].detach()) if isinstance(s, tuple) else s.detach() for s in state
    )


def _apply(module: nn.Module, h: _Sequence) -> _Sequence:
    """``module`` (an elementwise one: dropout) on a tensor or on a PackedSequence's data."""
    if isinstance(h, PackedSequence):
        return PackedSequence(module(h.data), h.batch_sizes, h.sorted_indices, h.unsorted_indices)
    out: Tensor = module(h)
    return out


def _hidden_state(state: ModuleState) -> Tensor:
    """The final hidden state ``h_n``: nn.LSTM returns ``(h_n, c_n)``, nn.GRU / nn.RNN ``h_n``."""
    return state[0] if isinstance(state, tuple) else state


#: A recurrent parameter's name in a state_dict: ``lstms.{module}.{kind}_l{layer}{_reverse}``.
_RECURRENT_KEY = re.compile(r"lstms\.(\d+)\.((?:weight|bias)_(?:ih|hh))_l(\d+)(_reverse)?")


def _convert_recurrent_keys(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any
) -> None:
    """Rename, in place, the recurrent parameters of a state_dict saved by the other form of
    :class:`StackedLSTM`: per-layer ``lstms.{k}.weight_ih_l0`` <-> fused
    ``lstms.0.weight_ih_l{k}`` (``_reverse`` kept). A load_state_dict pre-hook, so that
    checkpoints written before the fused form existed (and after) load into either form;
    mismatched shapes are still reported by ``load_state_dict``."""
    fused = cast(StackedLSTM, module).fused
    for key in [k for k in state_dict if k.startswith(prefix)]:
        match = _RECURRENT_KEY.fullmatch(key[len(prefix) :])
        if match is None:
            continue
        index, kind, layer, reverse = match.groups()
        if fused and layer == "0" and index != "0":
            new = f"lstms.0.{kind}_l{index}{reverse or ''}"
        elif not fused and index == "0" and layer != "0":
            new = f"lstms.{layer}.{kind}_l0{reverse or ''}"
        else:
            continue
        state_dict[prefix + new] = state_dict.pop(key)


def _init_recurrent_param(name: str, param: Tensor, gates: int, *, per_gate: bool) -> None:
    hidden = param.shape[0] // gates  # every parameter stacks the cell's gates (GATES)
    if name.startswith("bias"):
        nn.init.zeros_(param)
    elif not per_gate:
        if name.startswith("weight_ih"):
            nn.init.xavier_uniform_(param)
        else:
            nn.init.orthogonal_(param)
    else:
        # Gate blocks are rows [0:H], [H:2H], ... ; views, so the in-place init lands in param.
        for gate in range(gates):
            block = param[gate * hidden : (gate + 1) * hidden]
            if name.startswith("weight_ih"):
                nn.init.xavier_uniform_(block)
            else:
                nn.init.orthogonal_(block)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """How many scalar parameters ``module`` has (only those needing grad if ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
