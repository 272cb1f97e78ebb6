"""Per-trial checkpoints in an Optuna artifact store (a directory, or S3-compatible storage).

A trial's checkpoints are keyed by its study's job id and its **original** trial number
(a retry's :data:`~service.states.ORIGINAL_TRIAL_ATTR`), so every retry of a trial finds
the checkpoint the trial before it wrote. Each trial has two:

- ``last``: the end of its latest epoch, what a retry resumes from;
- ``best``: the epoch with the best validation metric so far, what
  ``GET /v1/studies/{id}/best/checkpoint`` serves.

Both are Lightning checkpoints (``trainer.save_checkpoint``), written whole and then put
in place of the previous one: a crash mid-write leaves the previous checkpoint usable.
On a file system that is a temporary file and ``os.replace``
(:class:`AtomicFileSystemArtifactStore`); an S3 object is replaced only once its upload completes.

No torch here: the server deletes and serves checkpoints without loading it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal
from urllib.parse import urlparse

from optuna.artifacts import Boto3ArtifactStore, FileSystemArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound

from service.atomic_file import replace_atomically
from service.states import ORIGINAL_TRIAL_ATTR, RETRY_OF_ATTR

if TYPE_CHECKING:
    from optuna.artifacts._protocol import ArtifactStore

CheckpointKind = Literal["last", "best"]
CHECKPOINT_KINDS: tuple[CheckpointKind, ...] = ("last", "best")


class AtomicFileSystemArtifactStore(FileSystemArtifactStore):
    """Optuna's file-system store whose ``write`` replaces an artifact atomically.

    Optuna's own writes into the final file, so a crash mid-write leaves a torn file in
    place of a good one. This writes a temporary file beside it, ``fsync``s it and
    ``os.replace``s it over the artifact (atomic on POSIX and Windows, and on NFS within
    one directory); missing parent directories are created.
    """

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        path = Path(self._get_filepath(artifact_id))
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, lambda f: shutil.copyfileobj(content_body, f))

    def remove_tree(self, prefix: str) -> None:
        """Remove a whole directory of artifacts (temporary files a crash left included)."""
        shutil.rmtree(self._get_filepath(prefix), ignore_errors=True)


def open_artifact_store(url: str | None, data_dir: Path) -> CheckpointStore:
    """The checkpoint store ``LSTM_HPO_ARTIFACTS_URL`` names.

    None: a directory, ``<data_dir>/artifacts`` (put the data directory on a shared file
    system when workers run on several machines). ``s3://bucket[/prefix]``: Optuna's
    ``Boto3ArtifactStore`` (extra ``s3``); credentials and an S3-compatible endpoint come
    from boto3's own configuration (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...).
    ValueError for any other URL.
    """
    if url is None:
        return CheckpointStore(AtomicFileSystemArtifactStore(data_dir / "artifacts"))
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(
            f"LSTM_HPO_ARTIFACTS_URL {url!r}: write s3://bucket or s3://bucket/prefix "
            "(unset: checkpoints go to <data_dir>/artifacts)"
        )
    try:
        store = Boto3ArtifactStore(parsed.netloc)
    except ImportError as err:
        raise ValueError(
            "LSTM_HPO_ARTIFACTS_URL is an s3:// URL but boto3 is not installed: "
            "pip install 'lstm-hpo[s3]'"
        ) from err
    return CheckpointStore(store, prefix=parsed.path.strip("/"))


def original_trial_number(user_attrs: Mapping[str, Any], number: int) -> int:
    """The number of the first trial of a trial's retry chain (its own when it is not a
    retry): the key of the chain's checkpoints. ``user_attrs``: the trial's."""
    original = user_attrs.get(ORIGINAL_TRIAL_ATTR, user_attrs.get(RETRY_OF_ATTR, number))
    return int(original)


class CheckpointNotFound(LookupError):
    """No checkpoint is stored under that key."""


class CheckpointStore:
    """Trial checkpoints in an Optuna artifact store, by job id, original trial number and kind."""

    def __init__(self, store: ArtifactStore, *, prefix: str = "") -> None:
        self.store = store
        self.prefix = prefix

    def _study_prefix(self, job_id: str) -> str:
        if not job_id or not all(c.isalnum() or c in "-_" for c in job_id):
            raise ValueError(f"not a job id: {job_id!r}")  # never a path from anywhere else
        return "/".join(p for p in (self.prefix, "checkpoints", job_id) if p)

    def artifact_id(self, job_id: str, trial_number: int, kind: CheckpointKind) -> str:
        """``[prefix/]checkpoints/<job id>/trial-<n>.<kind>.ckpt``."""
        return f"{self._study_prefix(job_id)}/trial-{int(trial_number)}.{kind}.ckpt"

    def save(self, job_id: str, trial_number: int, kind: CheckpointKind, source: Path) -> None:
        """Store the file ``source`` as that checkpoint, replacing the previous one whole."""
        with source.open("rb") as f:
            self.store.write(self.artifact_id(job_id, trial_number, kind), f)

    def open(self, job_id: str, trial_number: int, kind: CheckpointKind) -> BinaryIO:
        """A reader of that checkpoint (close it); :class:`CheckpointNotFound` if there is none."""
        try:
            return self.store.open_reader(self.artifact_id(job_id, trial_number, kind))
        except ArtifactNotFound:
            raise CheckpointNotFound(f"trial {trial_number}: no {kind} checkpoint") from None

    def fetch(self, job_id: str, trial_number: int, kind: CheckpointKind, dest: Path) -> bool:
        """Copy that checkpoint to ``dest``; False when there is none."""
        try:
            reader = self.open(job_id, trial_number, kind)
        except CheckpointNotFound:
            return False
        with reader, dest.open("wb") as out:
            shutil.copyfileobj(reader, out)
        return True

    def exists(self, job_id: str, trial_number: int, kind: CheckpointKind) -> bool:
        """Whether that checkpoint is stored."""
        try:
            self.open(job_id, trial_number, kind).close()
        except CheckpointNotFound:
            return False
        return True

    def remove(
        self,
        job_id: str,
        trial_numbers: Iterable[int],
        kinds: Iterable[CheckpointKind] = CHECKPOINT_KINDS,
    ) -> int:
        """Remove those trials' checkpoints of those kinds; returns how many there were."""
        removed = 0
        kinds = tuple(kinds)
        for number in trial_numbers:
            for kind in kinds:
                try:
                    self.store.remove(self.artifact_id(job_id, number, kind))
                except ArtifactNotFound:
                    continue
                removed += 1
        return removed

    def remove_study(self, job_id: str, trial_numbers: Iterable[int]) -> int:
        """Remove every checkpoint of a study (and, on a file system, its directory)."""
        removed = self.remove(job_id, trial_numbers)
        if isinstance(self.store, AtomicFileSystemArtifactStore):
            self.store.remove_tree(self._study_prefix(job_id))
        return removed
