"""The checkpoint store (``service.artifacts``): keys by job id, original trial number and
kind; an atomic replace on a file system; the S3 setting refused cleanly. No torch."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.artifacts import (
    AtomicFileSystemArtifactStore,
    CheckpointNotFound,
    CheckpointStore,
    open_artifact_store,
)
from service.config import Settings

JOB = "0123456789abcdef0123456789abcdef"


class _Torn(io.BytesIO):
    """A source that fails half-way, as a crash mid-copy would."""

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() > 0:
            raise OSError("disk went away mid-write")
        return super().read(4)


def test_default_store_is_a_directory_under_the_data_dir(tmp_path: Path) -> None:
    store = open_artifact_store(None, tmp_path)
    source = tmp_path / "x.ckpt"
    source.write_bytes(b"epoch 1")
    store.save(JOB, 3, "last", source)
    stored = tmp_path / "artifacts" / "checkpoints" / JOB / "trial-3.last.ckpt"
    assert stored.read_bytes() == b"epoch 1"
    assert store.artifact_id(JOB, 3, "best") == f"checkpoints/{JOB}/trial-3.best.ckpt"
    assert store.exists(JOB, 3, "last") and not store.exists(JOB, 3, "best")
    with store.open(JOB, 3, "last") as reader:
        assert reader.read() == b"epoch 1"
    with pytest.raises(CheckpointNotFound):
        store.open(JOB, 4, "last")
    assert not store.fetch(JOB, 4, "last", tmp_path / "none.ckpt")


def test_a_write_that_fails_midway_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    """Write, then replace: the reader sees the old file or the new one, never a torn one,
    and no temporary file is left behind."""
    fs = AtomicFileSystemArtifactStore(tmp_path)
    fs.write("checkpoints/j/trial-0.last.ckpt", io.BytesIO(b"epoch 2, whole"))
    with pytest.raises(OSError, match="mid-write"):
        fs.write("checkpoints/j/trial-0.last.ckpt", _Torn(b"epoch 3, torn......."))
    with fs.open_reader("checkpoints/j/trial-0.last.ckpt") as reader:
        assert reader.read() == b"epoch 2, whole"
    assert [p.name for p in (tmp_path / "checkpoints" / "j").iterdir()] == ["trial-0.last.ckpt"]
    fs.write("checkpoints/j/trial-0.last.ckpt", io.BytesIO(b"epoch 3"))
    with fs.open_reader("checkpoints/j/trial-0.last.ckpt") as reader:
        assert reader.read() == b"epoch 3"


def test_remove_and_remove_study(tmp_path: Path) -> None:
    store = CheckpointStore(AtomicFileSystemArtifactStore(tmp_path))
    source = tmp_path / "x.ckpt"
    source.write_bytes(b"x")
    for number in (0, 1, 2):
        store.save(JOB, number, "last", source)
        store.save(JOB, number, "best", source)
    assert store.remove(JOB, [0, 1, 7], kinds=("last",)) == 2
    assert store.exists(JOB, 0, "best") and not store.exists(JOB, 0, "last")
    (tmp_path / "checkpoints" / JOB / ".trial-2.last.ckpt.tmp").write_bytes(b"crash leftover")
    assert store.remove_study(JOB, [0, 1, 2]) == 4
    assert not (tmp_path / "checkpoints" / JOB).exists()


@pytest.mark.parametrize("job_id", ["../etc", "a/b", "", "x y"])
def test_keys_are_built_from_job_ids_only(tmp_path: Path, job_id: str) -> None:
    store = open_artifact_store(None, tmp_path)
    with pytest.raises(ValueError, match="not a job id"):
        store.artifact_id(job_id, 0, "last")


def test_s3_url_needs_boto3_and_other_urls_are_refused(tmp_path: Path) -> None:
    if importlib.util.find_spec("boto3") is None:  # the optional extra s3: not installed here
        with pytest.raises(ValueError, match=r"lstm-hpo\[s3\]"):
            open_artifact_store("s3://bucket/prefix", tmp_path)
    with pytest.raises(ValueError, match="LSTM_HPO_ARTIFACTS_URL"):
        open_artifact_store("file:///tmp/x", tmp_path)


def test_settings_refuse_a_non_s3_artifacts_url() -> None:
    with pytest.raises(ValidationError, match="LSTM_HPO_ARTIFACTS_URL"):
        Settings(artifacts_url="/var/lib/ckpt")
    assert Settings(artifacts_url="s3://bucket/p").artifacts_url == "s3://bucket/p"
