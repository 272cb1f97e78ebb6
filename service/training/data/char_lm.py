"""Character language modelling: a text file or a bundled corpus (``service.corpora``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from service.corpora import load_corpus, stdlib_corpus
from service.data_checks import check_char_splits, check_stream_split, read_text_file, split_text
from service.search_space import CharLMTask, LSTMConfig, resolve_data_path
from service.training.data.base import InMemoryDataModule, Problem, TaskData

UNK = "<unk>"

__all__ = ["UNK", "CharLMDataModule", "StreamBatches", "build_char_lm", "stdlib_corpus"]


class CharLMDataModule(InMemoryDataModule):
    """Non-overlapping windows of ``bptt`` characters, targets shifted by one, held in memory.

    ``stateful``: each split is a :class:`StreamBatches` instead, read in order (never
    shuffled) so that batch ``i + 1`` continues batch ``i`` row by row.
    """

    def __init__(
        self,
        vocab: list[str],
        train: tuple[torch.Tensor, torch.Tensor] | StreamBatches,
        val: tuple[torch.Tensor, torch.Tensor] | StreamBatches,
        test: tuple[torch.Tensor, torch.Tensor] | StreamBatches,
        batch_size: int,
    ) -> None:
        super().__init__(train, val, test, batch_size)
        #: id -> character; id 0 is ``<unk>`` (a character the train split does not contain).
        self.vocab = vocab

    def train_dataloader(self) -> DataLoader[Any]:
        train, val = self._train, self._val
        if self.train_on_val and isinstance(train, StreamBatches):
            assert isinstance(val, StreamBatches)
            # One stream over train + validation (the text is split in that order), cut into
            # rows afresh: row r of a refit is one contiguous piece of text, as in a fit.
            return self._loader(train.followed_by(val), shuffle=False)
        return super().train_dataloader()

    def _loader(self, dataset: Dataset[Any], shuffle: bool) -> DataLoader[Any]:
        if isinstance(dataset, StreamBatches):
            # Each item is already a whole batch, and the order is the point.
            return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=0)
        return super()._loader(dataset, shuffle)


class StreamBatches(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A split cut into ``streams`` contiguous rows, served as consecutive ``bptt`` pieces.

    Item ``i`` is ``(x Long[streams, T], y Long[streams, T])`` with ``T = bptt`` (the last
    piece may be shorter) and ``y`` shifted by one: row ``r`` of item ``i + 1`` continues
    row ``r`` of item ``i``, so a hidden state carried between items has seen everything
    before (the "batchify" of Zaremba et al. 2014 and char-rnn). Every character of a row
    but its first is a target exactly once; the last ``len(ids) % streams`` characters are
    dropped.

    Raises :class:`DataError` when a row would hold fewer than 2 characters.
    """

    def __init__(self, ids: np.ndarray, streams: int, bptt: int, split: str = "split") -> None:
        check_stream_split(len(ids), streams, split)
        length = len(ids) // streams
        self.rows = torch.from_numpy(np.ascontiguousarray(ids[: length * streams])).view(
            streams, length
        )
        self.bptt = bptt

    def followed_by(self, other: StreamBatches) -> StreamBatches:
        """This split's text and then ``other``'s (each as its rows hold it: without the few
        characters each dropped), cut into this split's number of streams."""
        ids = torch.cat([self.rows.flatten(), other.rows.flatten()]).numpy()
        return StreamBatches(ids, self.rows.shape[0], self.bptt)

    def __len__(self) -> int:
        return math.ceil((self.rows.shape[1] - 1) / self.bptt)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        start = i * self.bptt
        stop = min(start + self.bptt, self.rows.shape[1] - 1)
        return self.rows[:, start:stop], self.rows[:, start + 1 : stop + 1]


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
    if task.corpus is not None:
        text, source = load_corpus(task.corpus, task.max_chars)
    else:
        assert task.path is not None  # no bundled corpus: a file
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
    ids = {"train": train_ids, "val": val_ids, "test": test_ids}
    parts: list[tuple[torch.Tensor, torch.Tensor] | StreamBatches]
    if params.stateful:
        parts = [StreamBatches(a, params.batch_size, bptt, split) for split, a in ids.items()]
    else:
        parts = [windows(a, bptt) for a in ids.values()]
    datamodule = CharLMDataModule(vocab, parts[0], parts[1], parts[2], params.batch_size)
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
