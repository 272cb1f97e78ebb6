"""The `train --out DIR` layout (service.training.run_dir): one run per directory, and
what replacing the earlier one may touch. Files only: no training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.cli import _run_inputs
from service.search_space import parse_config
from service.training.run_dir import MANIFEST, overwritten_input, replace_earlier_run


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_a_directory_without_a_manifest_loses_nothing(tmp_path: Path) -> None:
    """Files of the user's that share a run file's name are not a run's: kept."""
    (tmp_path / "selection").mkdir()
    for name in ("result.json", "config.yaml", "selection/result.json", "selection/best.ckpt"):
        (tmp_path / name).write_text("mine\n")

    removed = replace_earlier_run(tmp_path, selection=False)

    assert removed == []
    assert _files(tmp_path) == {
        MANIFEST,
        "result.json",
        "config.yaml",
        "selection",
        "selection/result.json",
        "selection/best.ckpt",
    }
    listed = json.loads((tmp_path / MANIFEST).read_text())["files"]
    assert "best.ckpt" in listed and not any(f.startswith("selection/") for f in listed)


def test_the_listed_files_go_and_a_hand_edited_manifest_removes_nothing_else(
    tmp_path: Path,
) -> None:
    (tmp_path / "selection").mkdir()
    for name in ("best.ckpt", "selection/best.ckpt", "notes.txt", "data.csv"):
        (tmp_path / name).write_text("x\n")
    files = ["best.ckpt", "selection/best.ckpt", "notes.txt", "../outside", "/etc/passwd"]
    (tmp_path / MANIFEST).write_text(json.dumps({"files": files}))

    removed = replace_earlier_run(tmp_path, selection=True, keep=[tmp_path / "data.csv"])

    assert {str(p.relative_to(tmp_path)) for p in removed} == {
        "best.ckpt",
        "selection/best.ckpt",
        "selection",
    }
    assert _files(tmp_path) == {MANIFEST, "notes.txt", "data.csv"}


@pytest.mark.parametrize("text", ["", "not json", "[1, 2]", '{"files": "best.ckpt"}'])
def test_an_unreadable_manifest_removes_nothing(tmp_path: Path, text: str) -> None:
    (tmp_path / "best.ckpt").write_text("x\n")
    (tmp_path / MANIFEST).write_text(text)

    assert replace_earlier_run(tmp_path, selection=False) == []
    assert (tmp_path / "best.ckpt").exists()


def test_inputs_the_run_would_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "run"
    config, data = out / "config.yaml", out / "selection" / "metrics.csv"

    assert overwritten_input(out, [config], selection=True) is None  # rewritten as itself
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
