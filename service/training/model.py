"""The stacked recurrent network every trial trains, and its weight-initialisation strategies.

One ``nn.LSTM`` (or ``nn.GRU``, or tanh ``nn.RNN``: ``params.cell``) per layer (rather than
``nn.LSTM(num_layers=N)``) so that layers can have
different widths (pyramid, per_layer) and so that dropout sits exactly where the search
space says: on the input, between consecutive layers (the non-recurrent connections of
Zaremba et al. 2014) and on the last layer's output, before the head.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, cast

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from service.search_space import CellKind, InitStrategy, LSTMConfig
from service.training.data.base import Problem

#: Gate blocks stacked in each cell's weights and biases (torch.nn.LSTM: i, f, g, o;
#: torch.nn.GRU: r, z, n; torch.nn.RNN: one).
GATES: dict[CellKind, int] = {"lstm": 4, "gru": 3, "rnn": 1}
_CELLS: dict[CellKind, Callable[..., nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class StackedLSTM(nn.Module):
    """Embedding or features -> N stacked recurrent layers (LSTM, GRU or RNN) -> linear head.

    Shapes (B batch, T time, V vocabulary, F features, O ``problem.output_size``):

    - ``input_kind="tokens"``: x Long[B, T] through ``nn.Embedding(V, embedding_dim)``, where
      ``embedding_dim`` defaults to the first layer's width; ``"features"``: x Float[B, T, F].
    - ``readout="every_step"``: logits Float[B, T, O]; ``"last_step"``: Float[B, O] from the
      last layer's final hidden state (both directions concatenated when bidirectional).
    """

    def __init__(self, problem: Problem, params: LSTMConfig) -> None:
        super().__init__()
        self.readout: Literal["every_step", "last_step"] = problem.readout
        self.bidirectional = params.bidirectional
        self.cell: CellKind = params.cell
        cell = _CELLS[params.cell]
        sizes = params.layer_sizes()
        directions = 2 if params.bidirectional else 1

        self.embedding: nn.Embedding | None
        if problem.input_kind == "tokens":
            embedding_dim = params.embedding_dim or sizes[0]
            self.embedding = nn.Embedding(problem.input_size, embedding_dim)
            layer_input = embedding_dim
        else:
            self.embedding = None
            layer_input = problem.input_size
        self.input_dropout = nn.Dropout(params.input_dropout)

        self.lstms = nn.ModuleList()
        for hidden in sizes:
            self.lstms.append(
                cell(layer_input, hidden, batch_first=True, bidirectional=params.bidirectional)
            )
            layer_input = directions * hidden
        #: ``layer_dropouts[i]`` sits between ``lstms[i]`` and ``lstms[i + 1]``.
        self.layer_dropouts = nn.ModuleList(
            nn.Dropout(params.dropout) for _ in range(len(sizes) - 1)
        )
        self.output_dropout = nn.Dropout(params.output_dropout)
        self.head = nn.Linear(layer_input, problem.output_size)

        self.init_weights(params.init, params.init_range, params.forget_bias)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Logits (or regression outputs) for a batch; ``lengths`` for right-padded batches.

        With ``lengths`` the sequences are packed, so the last-step readout is each
        sequence's true last state and padding never reaches the recurrence.
        """
        h = self.embedding(x) if self.embedding is not None else x
        h = self.input_dropout(h)
        if lengths is None:
            return self._forward_padded(h)
        return self._forward_packed(h, lengths)

    def _forward_padded(self, h: Tensor) -> Tensor:
        h_n = h  # rebound by the loop; the stack has at least one layer
        for i, lstm in enumerate(self._lstm_layers()):
            if i > 0:
                h = self.layer_dropouts[i - 1](h)
            h, state = lstm(h)
            h_n = _hidden_state(state)
        return self._read_out(h, h_n)

    def _forward_packed(self, h: Tensor, lengths: Tensor) -> Tensor:
        total_length = h.shape[1]
        packed = pack_padded_sequence(h, lengths.cpu(), batch_first=True, enforce_sorted=False)
        h_n = h
        for i, lstm in enumerate(self._lstm_layers()):
            if i > 0:
                dropped = self.layer_dropouts[i - 1](packed.data)
                packed = PackedSequence(
                    dropped, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices
                )
            # With enforce_sorted=False, the RNN modules return h_n in the caller's batch order.
            packed, state = lstm(packed)
            h_n = _hidden_state(state)
        if self.readout == "last_step":
            return self._read_out(h, h_n)
        out, _ = pad_packed_sequence(packed, batch_first=True, total_length=total_length)
        return self._read_out(out, h_n)

    def _read_out(self, out: Tensor, h_n: Tensor) -> Tensor:
        if self.readout == "last_step":
            # h_n: [directions, B, H]; the backward direction's final state is the one at t=0.
            out = torch.cat(list(h_n), dim=-1) if self.bidirectional else h_n[0]
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


def _hidden_state(state: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    """The final hidden state ``h_n``: nn.LSTM returns ``(h_n, c_n)``, nn.GRU / nn.RNN ``h_n``."""
    return state[0] if isinstance(state, tuple) else state


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
