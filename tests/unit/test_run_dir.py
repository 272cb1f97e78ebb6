"""The `train --out DIR` layout (service.training.run_dir): one run per directory, and
what replacing the earlier one may touch. Files only: no training."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from service.cli import _run_inputs
from service.search_space import parse_config
from service.training.run_dir import (
    MANIFEST,
    overwritten_input,
    record_run,
    replace_earlier_run,
)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _write(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"{name}\n")


def test_a_directory_without_a_manifest_loses_nothing(tmp_path: Path) -> None:
    """Files of the user's that share a run file's name are not a run's: kept."""
    _write(tmp_path, "result.json", "config.yaml", "selection/result.json", "selection/best.ckpt")

    start = replace_earlier_run(tmp_path)

    assert start.removed == [] and start.carried == []
    assert _files(tmp_path) == {
        "result.json",
        "config.yaml",
        "selection",
        "selection/result.json",
        "selection/best.ckpt",
    }


def test_the_manifest_lists_only_what_the_run_wrote(tmp_path: Path) -> None:
    """A user's file with a run file's name that the run did not write is not listed, so
    the next run does not remove it."""
    _write(tmp_path, "refit.ckpt", "notes.txt")  # the user's, before the run
    start = replace_earlier_run(tmp_path)
    _write(tmp_path, "best.ckpt", "config.yaml", "metrics.csv")  # what the run writes

    record_run(tmp_path, start, selection=True)

    listed = json.loads((tmp_path / MANIFEST).read_text())["files"]
    assert sorted(listed) == ["best.ckpt", "config.yaml", "metrics.csv"]
    again = replace_earlier_run(tmp_path)
    assert {p.name for p in again.removed} == {"best.ckpt", "config.yaml", "metrics.csv"}
    assert _files(tmp_path) == {"refit.ckpt", "notes.txt"}


def test_the_listed_files_go_and_a_hand_edited_manifest_removes_nothing_else(
    tmp_path: Path,
) -> None:
    _write(tmp_path, "best.ckpt", "selection/best.ckpt", "notes.txt", "data.csv")
    files = ["best.ckpt", "selection/best.ckpt", "notes.txt", "../outside", "/etc/passwd"]
    (tmp_path / MANIFEST).write_text(json.dumps({"files": files}))

    start = replace_earlier_run(tmp_path, keep=[tmp_path / "data.csv"])

    assert {str(p.relative_to(tmp_path)) for p in start.removed} == {
        "best.ckpt",
        "selection/best.ckpt",
        "selection",
    }
    assert _files(tmp_path) == {"notes.txt", "data.csv"}


def test_a_symlinked_selection_is_not_followed(tmp_path: Path) -> None:
    """Files reached through a link out of DIR are never the run's to remove."""
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    _write(elsewhere, "result.json", "metrics.csv")
    out.mkdir()
    (out / "selection").symlink_to(elsewhere)
    files = ["selection/result.json", "selection/metrics.csv"]
    (out / MANIFEST).write_text(json.dumps({"files": files}))

    assert replace_earlier_run(out).removed == []
    assert _files(elsewhere) == {"result.json", "metrics.csv"}


def test_a_file_that_cannot_be_removed_leaves_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked before anything is removed. The directory is read-only as os.access says
    (a read-only mount, or permissions: root passes every permission check, so the
    answer is set here rather than made with chmod)."""
    _write(tmp_path, "best.ckpt", "selection/result.json")
    (tmp_path / MANIFEST).write_text(json.dumps({"files": ["best.ckpt", "selection/result.json"]}))
    read_only = tmp_path / "selection"
    real_access = os.access
    monkeypatch.setattr(
        "service.training.run_dir.os.access",
        lambda path, mode: Path(path) != read_only and real_access(path, mode),
    )

    with pytest.raises(OSError, match="selection is read-only"):
        replace_earlier_run(tmp_path)

    assert _files(tmp_path) == {MANIFEST, "best.ckpt", "selection", "selection/result.json"}


def test_a_kept_input_is_carried_to_the_next_run(tmp_path: Path) -> None:
    _write(tmp_path, "selection/best.ckpt", "refit.ckpt")
    (tmp_path / MANIFEST).write_text(json.dumps({"files": ["selection/best.ckpt", "refit.ckpt"]}))

    start = replace_earlier_run(tmp_path, keep=[tmp_path / "selection" / "best.ckpt"])
    record_run(tmp_path, start, selection=False)

    assert [p.name for p in start.removed] == ["refit.ckpt"]
    assert json.loads((tmp_path / MANIFEST).read_text())["files"] == ["selection/best.ckpt"]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "Expecting value"),
        ("not json", "Expecting value"),
        ("[1, 2]", '"files" list'),
        ('{"files": "best.ckpt"}', '"files" list'),
        ('{"written_by": "lstm-hpo train"}', '"files" list'),
    ],
)
def test_an_unreadable_manifest_removes_nothing_and_says_why(
    tmp_path: Path, text: str, why: str
) -> None:
    _write(tmp_path, "best.ckpt")
    (tmp_path / MANIFEST).write_text(text)

    start = replace_earlier_run(tmp_path)

    assert start.removed == []
    assert start.unreadable is not None and why in start.unreadable
    assert (tmp_path / "best.ckpt").exists()


@pytest.mark.parametrize("target", ["elsewhere.json", "missing.json", MANIFEST])
def test_a_linked_manifest_is_not_read_and_is_replaced_not_written_through(
    tmp_path: Path, target: str
) -> None:
    """A link there (to a file of the user's, dangling, or to itself) is not a run's list:
    nothing is removed, and the run's manifest replaces the link, outside untouched."""
    out = tmp_path / "run"
    _write(out, "best.ckpt")
    (tmp_path / "elsewhere.json").write_text('{"files": ["best.ckpt"]}')
    (out / MANIFEST).symlink_to(tmp_path / target if target != MANIFEST else MANIFEST)

    start = replace_earlier_run(out)
    assert start.removed == [] and start.unreadable == "a symbolic link, not a run's list"
    assert overwritten_input(out, [out / MANIFEST], selection=False) == out / MANIFEST
    _write(out, "best.ckpt")  # the new run's
    record_run(out, start, selection=False)

    assert not (out / MANIFEST).is_symlink()
    assert json.loads((out / MANIFEST).read_text())["files"] == ["best.ckpt"]
    assert (tmp_path / "elsewhere.json").read_text() == '{"files": ["best.ckpt"]}'
    assert not (tmp_path / "missing.json").exists()
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "best.ckpt"]


def test_a_manifest_that_is_no_regular_file_is_not_read(tmp_path: Path) -> None:
    """A named pipe would block the read forever."""
    os.mkfifo(tmp_path / MANIFEST)

    assert replace_earlier_run(tmp_path).unreadable == "not a regular file"


def test_no_manifest_and_an_empty_one_are_no_problem(tmp_path: Path) -> None:
    assert replace_earlier_run(tmp_path).unreadable is None
    (tmp_path / MANIFEST).write_text('{"files": []}')
    assert replace_earlier_run(tmp_path).unreadable is None


def test_inputs_the_run_would_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "run"
    config, data = out / "config.yaml", out / "selection" / "metrics.csv"

    # The config there is rewritten as itself; data named config.yaml would be lost.
    assert overwritten_input(out, [config], selection=True, config=config) is None
    assert overwritten_input(out, [config], selection=True) == config
    assert overwritten_input(out, [out / "hparams.yaml"], selection=False) == out / "hparams.yaml"
    assert overwritten_input(out, [data], selection=False) is None
    assert overwritten_input(out, [data], selection=True) == data


def test_a_task_path_with_a_tilde_is_an_input_where_the_loader_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    task = {"kind": "forecast", "path": "~/fx/series.csv", "column": "y"}
    config = parse_config({"task": task, "params": {"max_epochs": 1}})

    inputs = _run_inputs(config, (Path("c.yaml"), None), (Path("/data"),))

    assert inputs == [Path("c.yaml"), tmp_path / "fx" / "series.csv"]
