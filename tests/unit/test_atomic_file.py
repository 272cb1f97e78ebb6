"""service.atomic_file: the mode a replaced file gets, and what a user's ``-o FILE`` does
with a link or a device (a tester's ``best -o /dev/full`` replaced the device with a file)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from service.atomic_file import replace_atomically, write_file


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_file_gets_the_umask_s_mode_and_a_replaced_one_keeps_its_own(
    tmp_path: Path,
) -> None:
    old = os.umask(0o027)
    try:
        new = tmp_path / "new"
        replace_atomically(new, lambda f: f.write(b"x"))
        assert _mode(new) == 0o640  # mkstemp's 0600 was every file's mode
        new.chmod(0o604)
        replace_atomically(new, lambda f: f.write(b"y"))
        assert (_mode(new), new.read_bytes()) == (0o604, b"y")
    finally:
        os.umask(old)


def test_write_file_writes_through_a_link_and_replaces_a_regular_file(tmp_path: Path) -> None:
    target = tmp_path / "target.yaml"
    target.write_text("old")
    link = tmp_path / "link.yaml"
    link.symlink_to(target)
    write_file(link, b"new")
    assert link.is_symlink() and target.read_text() == "new"  # as a shell's > does
    write_file(target, b"newer")
    assert target.read_text() == "newer" and sorted(p.name for p in tmp_path.iterdir()) == [
        "link.yaml",
        "target.yaml",
    ]  # no temporary file left


def test_write_file_into_a_device_writes_to_it(tmp_path: Path) -> None:
    link = tmp_path / "out"
    link.symlink_to("/dev/null")
    write_file(Path("/dev/null"), b"x")
    write_file(link, b"x")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)  # still the device
