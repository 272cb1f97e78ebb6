"""The model a Lightning checkpoint holds, and whether it fits a config.

For `lstm-hpo train --init-from` and `--evaluate`. The checkpoints are the ones
:func:`~service.training.fit.fit_config` writes (``train --out``'s ``best.ckpt``, a trial's
per-epoch ones that ``lstm-hpo best ID --checkpoint`` downloads): Lightning's format, with
:class:`~service.training.module.LSTMLightningModule`'s hyperparameters ``params``,
``problem`` and ``task`` (``task`` only in checkpoints written since it was recorded).

Read with ``torch.load(weights_only=True)``: tensors, plain data and the numpy arrays of
the RNG states, nothing else, so a checkpoint from elsewhere cannot run code when loaded.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from pydantic_core import to_jsonable_python
from torch import Tensor, nn

from service.errors import CheckpointMismatch, FieldError, InvalidCheckpoint
from service.search_space import TASK_MODELS, LSTMConfig
from service.training.data.base import Problem


def _numpy_reconstruct() -> Any:
    """numpy's array unpickler: numpy >= 2 pickles through numpy._core, numpy 1 numpy.core."""
    try:
        return importlib.import_module("numpy._core.multiarray")._reconstruct
    except ImportError:  # pragma: no cover - numpy 1
        return importlib.import_module("numpy.core.multiarray")._reconstruct


_reconstruct = _numpy_reconstruct()
#: What a checkpoint may hold besides tensors and plain data: numpy arrays (the RNG
#: states RngStates keeps) and their dtypes. ``weights_only`` refuses every other object.
_SAFE_GLOBALS: list[Any] = [
    np.ndarray,
    np.dtype,
    *(getattr(np.dtypes, name) for name in np.dtypes.__all__),
    _reconstruct,
    (_reconstruct, "numpy.core.multiarray._reconstruct"),
]
#: How torch's weights-only unpickler names the object it refused.
_REFUSED = re.compile(r"(?i)unsupported (?:global: )?GLOBAL ([\w.]+)|but got <class '([\w.]+)'>")


#: The checkpoint key a refit (``fit.refit_config``) records itself under.
REFIT_KEY = "lstm_hpo_refit"


@dataclass(frozen=True)
class SavedModel:
    """The model in a checkpoint file: its config, problem, task and weights."""

    path: Path
    params: LSTMConfig
    problem: Problem
    #: The resolved task spec it was trained on (a dict); None when the file predates it.
    task: Mapping[str, Any] | None
    #: The (0-based) epoch whose weights these are; None when the file does not say.
    epoch: int | None
    state_dict: Mapping[str, Tensor]
    #: A refit's record (``{"epochs": N, "splits": "train+val"}``: its validation split was
    #: trained on); None for a fit on the train split.
    refit: Mapping[str, Any] | None = None


def read_model_checkpoint(path: Path) -> SavedModel:
    """Read the model of an lstm-hpo Lightning checkpoint.

    Raises :class:`InvalidCheckpoint` naming the file when it cannot be read, is not a
    checkpoint, holds other Python objects than tensors and plain data, or is not one of
    an lstm-hpo model.
    """
    try:
        file = path.open("rb")
    except OSError as err:
        raise InvalidCheckpoint(f"cannot read {path}: {err.strerror or err}") from None
    try:
        with file, torch.serialization.safe_globals(_SAFE_GLOBALS):
            raw = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises anything from UnpicklingError to EOFError
        found = _REFUSED.search(str(err))
        if found:
            refused = next(name for name in found.groups() if name)
            raise InvalidCheckpoint(
                f"{path}: holds a Python object other than tensors and plain data "
                f"({refused}); not loaded, since loading it could run code"
            ) from None
        raise InvalidCheckpoint(
            f"{path} is not a PyTorch checkpoint, or it is damaged ({type(err).__name__})"
        ) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("state_dict"), Mapping):
        raise InvalidCheckpoint(f"{path} is not a Lightning checkpoint (no state_dict)")
    hparams = raw.get("hyper_parameters")
    if not isinstance(hparams, Mapping) or not {"params", "problem"} <= hparams.keys():
        raise InvalidCheckpoint(
            f"{path} is not a checkpoint of an lstm-hpo model (no params and problem in its "
            "hyper_parameters)"
        )
    try:
        params = LSTMConfig.model_validate(dict(hparams["params"]))
        problem = Problem(**hparams["problem"])
    except (ValidationError, TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:200]
        raise InvalidCheckpoint(
            f"{path}: its model hyperparameters are not valid ({first})"
        ) from None
    task = hparams.get("task")
    epoch = raw.get("epoch")
    return SavedModel(
        path=path,
        params=params,
        problem=problem,
        task=dict(task) if isinstance(task, Mapping) else None,
        epoch=int(epoch) if isinstance(epoch, int) else None,
        state_dict=raw["state_dict"],
        refit=dict(raw[REFIT_KEY]) if isinstance(raw.get(REFIT_KEY), Mapping) else None,
    )


#: The name of a problem's input and output size, by task kind: (field, what it is).
_INPUT_NAMES = {"char_lm": "vocabulary size", "classify": "features per time step"}
_OUTPUT_NAMES = {"forecast": "task.horizon", "classify": "number of classes"}


def architecture_differences(
    saved: SavedModel, params: LSTMConfig, problem: Problem, task_kind: str
) -> list[FieldError]:
    """Every way the checkpoint's network differs in shape from the one ``params`` builds
    for ``problem`` (a ``task_kind`` task), each naming the field; empty when it fits.

    Only what decides the weights' shapes and meaning counts: the task kind and the data's
    input and output sizes, the cell, the layers and their widths, the direction and the
    embedding. Dropout, initialisation and training settings may differ.
    """
    diffs: list[FieldError] = []
    saved_kind = saved.task.get("kind") if saved.task else None
    problem_kind = ("input_kind", "readout", "loss", "metric")
    if saved_kind is not None and saved_kind != task_kind:
        diffs.append(FieldError("task.kind", f"checkpoint {saved_kind}, config {task_kind}"))
    elif any(getattr(saved.problem, f) != getattr(problem, f) for f in problem_kind):
        diffs.append(
            FieldError(
                "task.kind",
                f"the checkpoint's model is for another kind of task ({saved.problem.metric}, "
                f"{saved.problem.readout}) than the config's {task_kind} "
                f"({problem.metric}, {problem.readout})",
            )
        )
    else:
        vocabulary = problem.input_kind == "tokens"
        if saved.problem.input_size != problem.input_size:
            what = _INPUT_NAMES.get(task_kind, "input size")
            diffs.append(
                FieldError(
                    "task",
                    f"{what}: checkpoint {saved.problem.input_size}, "
                    f"the config's data {problem.input_size}",
                )
            )
        # A language model's output size is its vocabulary again: said once above.
        vocabulary_said = vocabulary and bool(diffs)
        if saved.problem.output_size != problem.output_size and not vocabulary_said:
            loc = _OUTPUT_NAMES.get(task_kind, "output size")
            field, what = (loc, "") if loc.startswith("task.") else ("task", f"{loc}: ")
            diffs.append(
                FieldError(
                    field,
                    f"{what}checkpoint {saved.problem.output_size}, "
                    f"the config's data {problem.output_size}",
                )
            )
    old, new = saved.params, params
    if old.cell != new.cell:
        diffs.append(FieldError("params.cell", f"checkpoint {old.cell}, config {new.cell}"))
    if old.num_layers != new.num_layers:
        diffs.append(
            FieldError("params.num_layers", f"checkpoint {old.num_layers}, config {new.num_layers}")
        )
    elif old.layer_sizes() != new.layer_sizes():
        loc = "params.hidden_sizes" if new.hidden_mode == "per_layer" else "params.hidden_size"
        diffs.append(
            FieldError(
                loc,
                f"layer widths: checkpoint {list(old.layer_sizes())}, "
                f"config {list(new.layer_sizes())}",
            )
        )
    if old.bidirectional != new.bidirectional:
        diffs.append(
            FieldError(
                "params.bidirectional",
                f"checkpoint {old.bidirectional}, config {new.bidirectional}",
            )
        )
    if problem.input_kind == "tokens" and (old.embedding_dim or new.embedding_dim):
        old_dim = old.embedding_dim or old.layer_sizes()[0]
        new_dim = new.embedding_dim or new.layer_sizes()[0]
        if old_dim != new_dim:
            diffs.append(
                FieldError("params.embedding_dim", f"checkpoint {old_dim}, config {new_dim}")
            )
    return diffs


def task_differences(saved: SavedModel, task: Mapping[str, Any]) -> list[FieldError]:
    """The task fields (other than its kind) whose values differ between the task the
    checkpoint was trained on and ``task``: other data, which is allowed (fine-tuning, or
    scoring on other data); empty when the checkpoint does not record its task."""
    if saved.task is None or saved.task.get("kind") != task.get("kind"):
        return []
    # A field added since the checkpoint was written is absent from it: its default then.
    defaults = _task_defaults(str(task.get("kind")))
    old, new = defaults | dict(saved.task), defaults | dict(task)
    return [
        FieldError(f"task.{key}", f"checkpoint {old.get(key)}, config {new.get(key)}")
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]


def _task_defaults(kind: str) -> dict[str, Any]:
    """The default of every field of task ``kind`` that has one (JSON values), e.g.
    ``{"transform": "none", ...}`` for forecast; {} for an unknown kind."""
    model = TASK_MODELS.get(kind)
    if model is None:
        return {}
    return {
        name: to_jsonable_python(field.default)
        for name, field in model.model_fields.items()
        if not field.is_required() and field.default is not None
    }


def load_model_weights(
    module: nn.Module, saved: SavedModel, params: LSTMConfig, problem: Problem, task_kind: str
) -> None:
    """Put the checkpoint's weights into ``module`` (built from ``params`` for ``problem``).

    Raises :class:`CheckpointMismatch` naming every field that differs when the checkpoint's
    network is not the one ``params`` builds for ``problem``.
    """
    diffs = architecture_differences(saved, params, problem, task_kind)
    if diffs:
        raise CheckpointMismatch(str(saved.path), diffs)
    try:
        module.load_state_dict(saved.state_dict, strict=True)
    except RuntimeError as err:  # a shape the checks above do not know of
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise CheckpointMismatch(
            str(saved.path), [FieldError("", line[:300]) for line in lines[1:6] or lines[:1]]
        ) from None
