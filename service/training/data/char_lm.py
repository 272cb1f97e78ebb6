"""Character language modelling: a text file, or the Python standard library's own source."""

from __future__ import annotations

import math
import sys
import sysconfig
from pathlib import Path

import numpy as np
import torch

from service.data_checks import check_char_splits, read_text_file, split_text
from service.errors import DataError
from service.search_space import CharLMTask, LSTMConfig, resolve_data_path
from service.training.data.base import InMemoryDataModule, Problem, TaskData

UNK = "<unk>"
#: Directories of the standard library that are not "the library's own source".
_SKIPPED_STDLIB_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


class CharLMDataModule(InMemoryDataModule):
    """Non-overlapping windows of ``bptt`` characters, targets shifted by one, held in memory."""

    def __init__(
        self,
        vocab: list[str],
        train: tuple[torch.Tensor, torch.Tensor],
        val: tuple[torch.Tensor, torch.Tensor],
        test: tuple[torch.Tensor, torch.Tensor],
        batch_size: int,
    ) -> None:
        super().__init__(train, val, test, batch_size)
        #: id -> character; id 0 is ``<unk>`` (a character the train split does not contain).
        self.vocab = vocab


def stdlib_corpus(max_chars: int) -> tuple[str, int]:
    """The first ``max_chars`` characters of the standard library's ``.py`` files.

    Files are taken in order of their path relative to the library root, skipping
    site-packages, test directories and files that are not UTF-8. Returns the text and
    the number of files it was drawn from.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (p.relative_to(root).as_posix(), p)
        for p in root.rglob("*.py")
        if not _SKIPPED_STDLIB_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    parts: list[str] = []
    total = 0
    used = 0
    for _, path in files:
        if total >= max_chars:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        total += len(text)
        used += 1
    if not parts:
        raise DataError(f"char_lm: no readable .py files under the standard library at {root}")
    return "".join(parts)[:max_chars], used


def build_vocab(train: str) -> list[str]:
    """id -> character: ``<unk>`` at 0, then the train split's characters in sorted order."""
    return [UNK, *sorted(set(train))]


def encode(text: str, vocab: list[str]) -> np.ndarray:
    """Character ids (int64); characters not in ``vocab`` map to ``<unk>`` (0)."""
    codes = _code_points(text)
    known = np.array([ord(c) for c in vocab[1:]], dtype=np.int64)  # sorted, like the vocab
    pos = np.searchsorted(known, codes)
    found = (pos < len(known)) & (known[np.minimum(pos, len(known) - 1)] == codes)
    return np.where(found, pos + 1, 0).astype(np.int64)


def windows(ids: np.ndarray, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``ids[i*bptt : (i+1)*bptt]`` and targets shifted by one, for every whole window.

    Each window spans ``bptt + 1`` characters and windows step by ``bptt``, so every
    character after the first is a target exactly once (the trailing partial window is dropped).
    """
    n = (len(ids) - 1) // bptt
    # Both are views of ``ids``: no copy of what can be a few hundred MB.
    x = ids[: n * bptt].reshape(n, bptt)
    y = ids[1 : n * bptt + 1].reshape(n, bptt)
    return torch.from_numpy(x), torch.from_numpy(y)


def unigram_cross_entropy(train_ids: np.ndarray, eval_ids: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/char) on ``eval_ids`` of the train split's add-one unigram model."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts) - math.log(counts.sum())
    return float(-log_p[eval_ids].mean())


def build_char_lm(
    task: CharLMTask, params: LSTMConfig, data_roots: tuple[Path, ...] | None = None
) -> TaskData:
    """Load, split, encode and window a character corpus; baseline: the train unigram model."""
    if task.path is None:
        text, n_files = stdlib_corpus(task.max_chars)
        source = f"stdlib corpus (Python {sys.version_info.major}.{sys.version_info.minor}, "
        source += f"{n_files:,} files)"
    else:
        path = resolve_data_path(task.path, data_roots)
        text = read_text_file(path, task.max_chars, task.encoding)
        source = path.name
    splits = split_text(text, task.val_fraction, task.test_fraction)
    bptt = params.bptt
    check_char_splits(splits.sizes, bptt)
    vocab = build_vocab(splits.train)
    train_ids, val_ids, test_ids = (
        encode(s, vocab) for s in (splits.train, splits.val, splits.test)
    )
    datamodule = CharLMDataModule(
        vocab,
        windows(train_ids, bptt),
        windows(val_ids, bptt),
        windows(test_ids, bptt),
        batch_size=params.batch_size,
    )
    v = len(vocab)
    return TaskData(
        problem=Problem(
            input_kind="tokens",
            input_size=v,
            output_size=v,
            readout="every_step",
            loss="cross_entropy",
            metric="val_loss",
        ),
        datamodule=datamodule,
        val_baselines={"unigram": unigram_cross_entropy(train_ids, val_ids, v)},
        test_baselines={"unigram": unigram_cross_entropy(train_ids, test_ids, v)},
        primary_baseline="unigram",
        description=(
            f"char_lm: {source}, {len(text):,} chars (train {len(splits.train):,} / "
            f"val {len(splits.val):,} / test {len(splits.test):,}), vocab {v}"
        ),
    )


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
