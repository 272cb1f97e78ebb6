"""What one config costs to train, computed without torch: parameters and memory per step.

:func:`estimate` counts the trainable parameters of the model a trial builds
(``service.training.model.StackedLSTM``) exactly, and the memory of one training step
(forward, backward and optimizer step) in bytes, for float32 training. :func:`estimate_space`
does it for the most expensive config a study's space allows. At submit a space whose
worst case exceeds the deployment's ``LSTM_HPO_WORKER_MEMORY_GB`` is refused
(``search_space.parse_spec``); a worker with that limit prunes a trial whose config exceeds
it before training (``training.objective.run_trial``).

The task's shape (input width, output width, time steps) comes from the spec and, for a
user's file, from the torch-free readers of :mod:`service.data_checks`: one function per
task kind below (:data:`SHAPES`).

Parameters (exact; checked against ``sum(p.numel() for p in model.parameters())``):

- embedding (char_lm): ``V * E`` (``torch.nn.Embedding``: one ``E``-vector per token).
- each recurrent layer and direction, input width ``I``, hidden width ``H``, ``G`` gate
  blocks (``cell``: lstm 4, gru 3, rnn 1): ``G*H*(I + H) + 2*G*H`` -- ``weight_ih``
  (GH x I), ``weight_hh`` (GH x H), ``bias_ih`` and ``bias_hh`` (GH each), the gates
  stacked (LSTM i, f, g, o; GRU r, z, n; the ``torch.nn.LSTM`` / ``GRU`` / ``RNN`` docs,
  "Variables"). A layer's input is the previous layer's output: ``D * H_prev`` wide with
  ``D = 2`` directions when bidirectional.
- head: ``(D * H_last) * O + O`` (``torch.nn.Linear``: weight and bias).

Memory of one step, float32 (4 bytes), ``P`` parameters:

- weights ``4P`` and their gradients ``4P`` (autograd fills one ``.grad`` per parameter).
- optimizer state: Adam/AdamW keep two moments per parameter (``exp_avg``,
  ``exp_avg_sq``: ``8P``); RMSprop one (``square_avg``) plus a momentum buffer when
  ``momentum > 0``; SGD a momentum buffer when ``momentum > 0`` (``torch.optim`` source,
  each optimizer's ``_init_group``).
- two parameter-sized working copies, ``8P``: while the activations are alive, the LSTM
  kernel's copy of its weights and of their gradients in its own layout (oneDNN reorders
  both: the measured backward peak of a weight-dominated model is 6.0x its weights with
  Adam); once they are freed, the optimizer step's ``foreach`` temporaries (the same 6.0x).
- activations (:func:`activation_bytes`), for a batch of ``B`` sequences of ``T`` steps
  (char_lm: ``bptt``; forecast: ``lookback``; adding: ``seq_len``; classify: the longest
  sequence, as batches are padded to it), in two parts.

  Kept from the forward pass for the backward pass, summed over the whole network:

  - per LSTM layer and direction (input width ``I``, ``W = max(I, H)``), per sequence:
    ``T * (4H + H) + (T + 1) * (6W + 4H)`` floats -- the four gate activations and the
    hidden output of each step, and, for ``T + 1`` steps (the initial state too), the
    hidden state, the gradient buffers the backward pass writes into (across layers and
    across time) and the cell state with its gradient, each in two rows (the layer's
    input and output). This is oneDNN's LSTM training workspace, which PyTorch uses on
    CPU (``src/cpu/rnn/rnn_utils``: ``ws_gates``, ``ws_ht``, ``ws_states_layer``,
    ``ws_diff_states_{layer,iter,iter_c}``, ``ws_states_iter_c``, each
    ``(n_layer + 1) * n_dir * (n_iter + 1) * mb * ld`` or ``n_layer * n_dir * n_iter * mb
    * ld``, called per layer and direction), with its row padding (``get_good_ld``:
    rounded up to 64 bytes, 64 bytes more for a multiple of 256 floats). It bounds what
    the other implementations keep: autograd's per-op LSTM cell saves the gates, ``c_t``,
    ``tanh(c_t)`` and ``h_t`` of each step, and cuDNN keeps the gates and states of each
    step in its "reserve space" (``cudnnGetRNNTempSpaceSizes``), its gradient buffers in
    a transient workspace.
  - each layer's input (``I`` per step: the weight gradient ``dW_ih`` needs it) and the
    last layer's output (``D * H``: the head's input); with two directions each direction's
    output is a tensor of its own before they are concatenated (``D * H`` more per layer).
  - a dropout with ``p > 0``: its output (4 bytes) and its mask (1 byte) per element.
  - the head's outputs and, for cross-entropy, the log-probabilities ``log_softmax`` saves
    (``O`` each per prediction: ``B * T`` predictions for char_lm, ``B`` otherwise).
  - the batch (token ids and class targets are int64).

  Plus the backward pass's own buffers, one layer at a time (the largest counts): the
  layer's gate gradients (``4H`` per step, one direction at a time), the gradient of its
  output twice (materialised, and the kernel's copy) and that of its input; or the
  head's two gradients (of the logits and of the log-probabilities).

GRU and RNN cells: the parameters (and so weights, gradients, optimizer state and working
copies) are exact for them too, but the activations are the LSTM figure for the same
widths, an upper bound: a GRU or RNN cell has fewer gate blocks and no cell state, and
keeps less per step than an LSTM. Measured the same way (PyTorch runs them per op on CPU),
the peak is 43-52% of the estimate for GRU and 14-28% for RNN when activations dominate,
97-99% when the weights do.

``total = weights + gradients + optimizer state + working copies + activations``.
Measured against torch on CPU (``tests/unit/test_estimate.py``, torch 2.13, x86-64): with
oneDNN the peak of a training step is 78-101% of the estimate; with PyTorch's per-op LSTM
(oneDNN off) 32-61% when activations dominate (100% when the weights do). An upper bound,
about 2x high on the lean path; cuDNN (GPU) was not measured. Not counted: the
framework itself (CUDA context, libraries, allocator caching and fragmentation),
validation batches (no gradients: smaller) and the data set held in memory. GB here is
10^9 bytes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

from service.corpora import MOBY_DICK_VOCAB_BOUND
from service.data_checks import read_jsonl, read_text_file
from service.errors import DataError, FieldError, InvalidConfig, InvalidSpec
from service.search_space import (
    AddingTask,
    CharLMTask,
    ClassifyTask,
    ForecastTask,
    LSTMConfig,
    ResolvedConfig,
    SpecLimits,
    StudySpec,
    TaskSpec,
    grid_steps,
    largest_config,
    parse_spec,
    resolve_data_path,
    sample_config,
)

__all__ = [
    "GB",
    "STDLIB_VOCAB_BOUND",
    "CostEstimate",
    "ProblemShape",
    "SpaceEstimate",
    "activation_bytes",
    "costliest_config",
    "estimate",
    "estimate_config",
    "estimate_document",
    "estimate_space",
    "parameter_count",
    "problem_shape",
    "space_too_large",
    "too_large_reason",
]

#: ``LSTM_HPO_WORKER_MEMORY_GB`` counts decimal gigabytes (a little under a GiB each).
GB = 10**9
_FLOAT = 4  # float32
_INDEX = 8  # int64 token ids and class targets
_MASK = 1  # a dropout mask (bool)

#: The default char_lm corpus is the standard library's source, which is not read before
#: a trial: its vocabulary is taken as this bound (CPython 3.11's whole standard library
#: has 222 distinct characters; the bound leaves room for other versions).
STDLIB_VOCAB_BOUND = 512
#: The UEA JapaneseVowels data set (bundled classify task): 12 cepstrum coefficients,
#: sequences of 7 to 29 frames, 9 speakers.
JAPANESE_VOWELS = (12, 29, 9)


@dataclass(frozen=True)
class ProblemShape:
    """What the model and one batch look like, as the task's data decides (no torch)."""

    input_kind: Literal["tokens", "features"]
    #: Vocabulary size (tokens) or features per time step.
    input_size: int
    #: Vocabulary size, forecast horizon, number of classes, or 1.
    output_size: int
    #: Time steps of one training sequence (the longest, for variable-length data).
    seq_len: int
    readout: Literal["every_step", "last_step"]
    loss: Literal["cross_entropy", "mse"]
    #: How the shape was found, for people: "vocabulary 97 (read from corpus.txt)".
    source: str


@dataclass(frozen=True)
class CostEstimate:
    """Parameters and bytes of one training step of one config (see the module docstring)."""

    params: int
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    total_bytes: int
    #: None for a task that trains no model (synthetic).
    shape: ProblemShape | None

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GB


# --------------------------------------------------------------------------------------
# The task's shape: one function per task kind
# --------------------------------------------------------------------------------------


def adding_shape(
    task: AddingTask, params: LSTMConfig, data_roots: tuple[Path, ...] | None
) -> ProblemShape:
    """Two features per step (value, marker), ``seq_len`` steps, one output (the sum)."""
    return ProblemShape(
        "features", 2, 1, task.seq_len, "last_step", "mse", f"seq_len {task.seq_len}"
    )


def forecast_shape(
    task: ForecastTask, params: LSTMConfig, data_roots: tuple[Path, ...] | None
) -> ProblemShape:
    """One feature, ``lookback`` steps in, ``horizon`` values out (the series' length does
    not change the model or a batch)."""
    source = f"lookback {task.lookback}, horizon {task.horizon}"
    return ProblemShape("features", 1, task.horizon, task.lookback, "last_step", "mse", source)


def classify_shape(
    task: ClassifyTask, params: LSTMConfig, data_roots: tuple[Path, ...] | None
) -> ProblemShape:
    """Features and classes of the data; time steps: the longest sequence (batches are
    padded to their longest). A user's JSON Lines file is read (once per file version)."""
    if task.path is None:
        features, longest, classes = JAPANESE_VOWELS
        source = "japanese_vowels: 12 features, up to 29 steps, 9 classes"
    else:
        path = resolve_data_path(task.path, data_roots)
        features, longest, classes = _read_data(task.path, path, _jsonl_shape, task.encoding)
        source = f"{task.path}: {features} features, up to {longest} steps, {classes} classes"
    return ProblemShape(
        "features", features, classes, longest, "last_step", "cross_entropy", source
    )


def char_lm_shape(
    task: CharLMTask, params: LSTMConfig, data_roots: tuple[Path, ...] | None
) -> ProblemShape:
    """Vocabulary in and out, ``bptt`` steps, a prediction at every step.

    A user's text file is read (its first ``max_chars`` characters, once per file version):
    its distinct characters plus ``<unk>`` bound the training vocabulary from above (which
    holds the training split's characters only). A bundled corpus is not read: its
    vocabulary bound is a constant (:data:`STDLIB_VOCAB_BOUND`, ``MOBY_DICK_VOCAB_BOUND``).
    """
    if task.corpus is not None:
        bound = MOBY_DICK_VOCAB_BOUND if task.corpus == "moby_dick" else STDLIB_VOCAB_BOUND
        vocab = min(bound, task.max_chars + 1)
        source = f"vocabulary at most {vocab} (the bundled {task.corpus} corpus, not read)"
    else:
        assert task.path is not None  # no bundled corpus: a file
        path = resolve_data_path(task.path, data_roots)
        distinct = _read_data(task.path, path, _distinct_chars, task.encoding, task.max_chars)
        vocab = distinct + 1
        source = f"vocabulary at most {vocab} (read from {task.path})"
    return ProblemShape("tokens", vocab, vocab, params.bptt, "every_step", "cross_entropy", source)


Shape: TypeAlias = Callable[[Any, LSTMConfig, "tuple[Path, ...] | None"], ProblemShape]

#: task kind -> the function that gives its shape (synthetic tasks train no model).
SHAPES: Mapping[str, Shape] = {
    "adding": adding_shape,
    "forecast": forecast_shape,
    "classify": classify_shape,
    "char_lm": char_lm_shape,
}


def problem_shape(
    task: TaskSpec, params: LSTMConfig, data_roots: tuple[Path, ...] | None = None
) -> ProblemShape | None:
    """The shape of ``task`` for ``params``; None when the task trains no model.

    Raises :class:`InvalidSpec` (``task.path``) when a user's file cannot be read; the
    message names the path as the user wrote it.
    """
    shape = SHAPES.get(task.kind)
    return shape(task, params, data_roots) if shape is not None else None


def _read_data(user_path: str, path: Path, reader: Callable[..., Any], *args: Any) -> Any:
    """``reader(path, mtime, size, *args)``, cached per file version; a DataError becomes an
    InvalidSpec naming the path as the user wrote it (the server's directories stay private)."""
    try:
        info = os.stat(path)
        return reader(str(path), info.st_mtime_ns, info.st_size, *args)
    except OSError as err:
        raise InvalidSpec(
            [FieldError("task.path", f"{user_path}: {err.strerror or 'cannot read it'}")]
        ) from None
    except DataError as err:
        message = err.message.replace(str(path), user_path)
        raise InvalidSpec([FieldError("task.path", message)]) from None


# A worker estimates every trial: it reads a file once per version (path, mtime, size).
@functools.lru_cache(maxsize=16)
def _distinct_chars(path: str, mtime_ns: int, size: int, encoding: str, max_chars: int) -> int:
    return len(set(read_text_file(Path(path), max_chars, encoding)))


@functools.lru_cache(maxsize=16)
def _jsonl_shape(path: str, mtime_ns: int, size: int, encoding: str) -> tuple[int, int, int]:
    data = read_jsonl(Path(path), encoding)
    features = int(data.xs[0].shape[1])
    longest = max(len(x) for x in data.xs)
    return features, longest, len(set(data.labels))


# --------------------------------------------------------------------------------------
# The formula
# --------------------------------------------------------------------------------------


def _embedding_dim(params: LSTMConfig) -> int:
    return params.embedding_dim or params.layer_sizes()[0]


def _layer_inputs(params: LSTMConfig, shape: ProblemShape) -> list[tuple[int, int]]:
    """(input width, hidden width) of each stacked layer, bottom first."""
    directions = 2 if params.bidirectional else 1
    width = _embedding_dim(params) if shape.input_kind == "tokens" else shape.input_size
    layers = []
    for hidden in params.layer_sizes():
        layers.append((width, hidden))
        width = directions * hidden
    return layers


#: Gate blocks stacked in each cell's weights (the same as ``training.model.GATES``, which
#: this module cannot import: it stays torch-free).
_GATES: Mapping[str, int] = {"lstm": 4, "gru": 3, "rnn": 1}


def parameter_count(params: LSTMConfig, shape: ProblemShape) -> int:
    """The trainable parameters of ``StackedLSTM(problem, params)``, exactly (any cell)."""
    directions = 2 if params.bidirectional else 1
    gates = _GATES[params.cell]
    count = shape.input_size * _embedding_dim(params) if shape.input_kind == "tokens" else 0
    for inputs, hidden in _layer_inputs(params, shape):
        count += directions * (gates * hidden * (inputs + hidden) + 2 * gates * hidden)
    head_in = directions * params.layer_sizes()[-1]
    return count + head_in * shape.output_size + shape.output_size


def _optimizer_slots(params: LSTMConfig) -> int:
    """Optimizer state tensors per parameter (torch.optim: each ``_init_group``)."""
    momentum = 1 if params.momentum > 0 else 0
    return {"adam": 2, "adamw": 2, "rmsprop": 1 + momentum, "sgd": momentum}[params.optimizer]


def _dropout(p: float, elements: int) -> int:
    """Bytes a dropout keeps for backward: its output and its mask (none when p == 0)."""
    return elements * (_FLOAT + _MASK) if p > 0 else 0


def _row(width: int) -> int:
    """A row of ``width`` floats as oneDNN lays it out (``rnn_utils::get_good_ld``): rounded
    up to 64 bytes, plus 64 bytes when a multiple of 256 floats (to avoid 4K aliasing)."""
    ld = -(-width // 16) * 16
    return ld + 16 if ld % 256 == 0 else ld


def lstm_workspace(batch: int, steps: int, inputs: int, hidden: int) -> int:
    """Floats one LSTM layer and direction keeps for its backward pass (module docstring):
    per sequence, the gates and hidden output of each step, and (T + 1) steps of the input
    and output rows' hidden state, cell state and their gradient buffers."""
    row, h = _row(max(inputs, hidden)), _row(hidden)
    return batch * (steps * (_row(4 * hidden) + h) + (steps + 1) * (6 * row + 4 * h))


def activation_bytes(params: LSTMConfig, shape: ProblemShape) -> int:
    """Bytes of activations of one training step: what the forward pass keeps for the
    backward pass, plus the largest set of the backward pass's own buffers (module docstring).

    Always the LSTM figure: an upper bound for GRU and RNN cells (fewer gates, no cell state).
    """
    b, t = params.batch_size, shape.seq_len
    steps = b * t
    directions = 2 if params.bidirectional else 1
    layers = _layer_inputs(params, shape)
    last = directions * layers[-1][1]
    predictions = steps if shape.readout == "every_step" else b

    # The batch: token ids (int64) or features (the first layer's input, counted there),
    # and the targets.
    kept = steps * _INDEX if shape.input_kind == "tokens" else 0
    if shape.loss == "cross_entropy":
        kept += predictions * _INDEX
    else:
        kept += predictions * shape.output_size * _FLOAT
    kept += _dropout(params.input_dropout, steps * layers[0][0])
    backward = 0
    for i, (inputs, hidden) in enumerate(layers):
        if i > 0:
            kept += _dropout(params.dropout, steps * inputs)
        # Two directions: each direction's output is a tensor of its own before the concat.
        outputs = steps * directions * hidden if directions > 1 else 0
        workspace = directions * lstm_workspace(b, t, inputs, hidden)
        kept += (steps * inputs + outputs + workspace) * _FLOAT
        # Its backward: gate gradients (one direction at a time), the gradient of its
        # output and the gradient of its input.
        gradients = steps * (_row(4 * hidden) + 2 * directions * hidden + inputs)
        backward = max(backward, gradients * _FLOAT)
    head_in = steps * last if shape.readout == "every_step" else b * last
    kept += head_in * _FLOAT + _dropout(params.output_dropout, head_in)
    outputs = 2 if shape.loss == "cross_entropy" else 1  # logits (+ log-probabilities)
    kept += outputs * predictions * shape.output_size * _FLOAT
    backward = max(backward, 2 * predictions * shape.output_size * _FLOAT)
    return kept + backward


def estimate(config: ResolvedConfig, shape: ProblemShape | None) -> CostEstimate:
    """Parameters and memory of one training step of ``config`` (module docstring)."""
    if shape is None:
        return CostEstimate(0, 0, 0, 0, 0, 0, None)
    params = config.params
    count = parameter_count(params, shape)
    weights = count * _FLOAT
    optimizer = _optimizer_slots(params) * weights
    activations = activation_bytes(params, shape)
    # Two parameter-sized working copies: the LSTM kernel's copy of its weights and of their
    # gradients in its own layout (oneDNN reorders them) while the activations are alive,
    # or the optimizer step's foreach temporaries once they are freed.
    total = 2 * weights + optimizer + 2 * weights + activations
    return CostEstimate(count, weights, weights, optimizer, activations, total, shape)


def estimate_config(
    config: ResolvedConfig, data_roots: tuple[Path, ...] | None = None
) -> CostEstimate:
    """:func:`estimate` of ``config`` with its task's shape (a user's file read if needed)."""
    return estimate(config, problem_shape(config.task, config.params, data_roots))


# --------------------------------------------------------------------------------------
# The most expensive config of a space
# --------------------------------------------------------------------------------------

#: Categorical choices that change the cost, ranked (a higher rank costs at least as much).
_CHOICE_RANK: Mapping[str, Mapping[Any, float]] = {
    # tied and per_layer both give every layer the top width; pyramid halves it per layer.
    "hidden_mode": {"pyramid": 0, "per_layer": 1, "tied": 1},
    "optimizer": {"sgd": 0, "rmsprop": 1, "adam": 2, "adamw": 2},
    "bidirectional": {False: 0, True: 1},
    # Gate blocks: 1, 3, 4 (the activations are the LSTM figure for all three).
    "cell": {"rnn": 0, "gru": 1, "lstm": 2},
}
_NUMERIC_COST = ("num_layers", "hidden_size", "batch_size", "bptt", "embedding_dim")


class _CostliestTrial:
    """A stand-in trial that picks each range's top and each categorical's costliest choice
    (``largest_config`` takes a categorical's last choice, which need not be the largest)."""

    def __init__(self) -> None:
        self.first_width: int | None = None

    def suggest_int(
        self, name: str, low: int, high: int, *, step: int = 1, log: bool = False
    ) -> int:
        value = low + (high - low) // step * step
        self._seen(name, value)
        return value

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float:
        return high if step is None else min(high, low + grid_steps(low, high, step) * step)

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        if name in _CHOICE_RANK:
            ranks = _CHOICE_RANK[name]
            value = max(reversed(choices), key=lambda c: ranks.get(c, -1))
        elif name in _NUMERIC_COST or name.startswith("hidden_size_l"):
            value = max(reversed(choices), key=self._numeric_rank)
        else:
            value = choices[-1]
        self._seen(name, value)
        return value

    def _numeric_rank(self, choice: Any) -> float:
        if choice is None:  # embedding_dim None: the first layer's width
            return float(self.first_width or 0)
        return float(choice) if isinstance(choice, int | float) else float("-inf")

    def _seen(self, name: str, value: Any) -> None:
        if name in ("hidden_size", "hidden_size_l0") and isinstance(value, int):
            self.first_width = value


def costliest_config(spec: StudySpec) -> ResolvedConfig:
    """The most expensive config ``spec`` allows: every range at its top end, every
    categorical that changes the cost (width, depth, batch, bptt, directions, embedding,
    hidden_mode, optimizer, cell) at its costliest choice. Falls back to
    ``search_space.largest_config`` when those choices do not combine into a valid config."""
    try:
        return sample_config(_CostliestTrial(), spec)
    except InvalidConfig:
        return largest_config(spec)


@dataclass(frozen=True)
class SpaceEstimate:
    """The estimate of the most expensive config of a space, and the worker's limit."""

    cost: CostEstimate
    config: ResolvedConfig
    #: A worker's memory (``LSTM_HPO_WORKER_MEMORY_GB``) in bytes; None: no limit set.
    limit_bytes: int | None

    @property
    def fits(self) -> bool | None:
        """Whether the config fits a worker; None when no limit is set."""
        return None if self.limit_bytes is None else self.cost.total_bytes <= self.limit_bytes


def estimate_space(
    spec: StudySpec,
    data_roots: tuple[Path, ...] | None = None,
    worker_memory_gb: float | None = None,
) -> SpaceEstimate:
    """The estimate of the most expensive config ``spec`` allows (:func:`costliest_config`).

    Raises :class:`InvalidSpec` (``task.path``) when a user's file cannot be read.
    """
    config = costliest_config(spec)
    limit = None if worker_memory_gb is None else int(worker_memory_gb * GB)
    return SpaceEstimate(estimate_config(config, data_roots), config, limit)


def estimate_document(data: Any, limits: SpecLimits) -> SpaceEstimate:
    """Validate a spec document (as ``parse_spec``) and estimate its most expensive config.

    A space too large for a worker is not an error here: the answer says whether it fits.
    Raises :class:`InvalidSpec` for an invalid spec or a data file that cannot be read.
    """
    spec = parse_spec(data, limits.model_copy(update={"worker_memory_gb": None}))
    return estimate_space(spec, limits.data_roots, limits.worker_memory_gb)


def _gb(n: float) -> str:
    return f"{n / GB:.3g} GB"


def too_large_reason(cost: CostEstimate, limit_gb: float) -> str | None:
    """``"too large for a worker: 12.3 GB > 8 GB"`` when ``cost`` exceeds the limit."""
    if cost.total_bytes <= int(limit_gb * GB):
        return None
    return f"too large for a worker: {_gb(cost.total_bytes)} > {_gb(limit_gb * GB)}"


#: The fields whose top values drive the cost, in the order they are named.
_COST_FIELDS = ("hidden_size", "num_layers", "batch_size", "bptt", "embedding_dim")
_TASK_LENGTH = {"adding": "seq_len", "forecast": "lookback"}


def space_too_large(
    spec: StudySpec, limit_gb: float, data_roots: tuple[Path, ...] | None = None
) -> list[FieldError]:
    """A :class:`FieldError` (``space``) when the worst case of ``spec`` exceeds ``limit_gb``,
    giving the estimate and naming the fields to shrink; empty when it fits.

    Raises :class:`InvalidSpec` (``task.path``) when a user's file cannot be read.
    """
    worst = estimate_space(spec, data_roots, limit_gb)
    if worst.fits:
        return []
    cost, params = worst.cost, worst.config.params
    shrink = [
        f"space.{name} ({getattr(params, name)})"
        for name in _COST_FIELDS
        if name not in ("bptt", "embedding_dim") or spec.task.kind == "char_lm"
        if getattr(params, name) is not None
    ]
    if params.bidirectional:
        shrink.append("space.bidirectional (true)")
    if spec.task.kind in _TASK_LENGTH:
        name = _TASK_LENGTH[spec.task.kind]
        shrink.append(f"task.{name} ({getattr(spec.task, name)})")
    msg = (
        f"the largest config this space allows needs about {_gb(cost.total_bytes)} for one "
        f"training step ({cost.params:,} parameters; activations {_gb(cost.activation_bytes)})"
        f", more than a worker's {_gb(limit_gb * GB)} (LSTM_HPO_WORKER_MEMORY_GB): shrink "
        f"{', '.join(shrink)}, or set study.on_too_large: prune to skip such configs"
    )
    return [FieldError("space", msg)]
