"""The wheel: every module of the package, and the migrations, so that a non-editable
install can create the schema (the server migrates at start-up)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_ships_every_module_and_migrates_from_site_packages(tmp_path: Path) -> None:
    # Built from a copy of what the wheel is made of: setuptools writes build/ where it runs.
    source = tmp_path / "source"
    for folder in ("service", "migrations"):
        skip = shutil.ignore_patterns("__pycache__")
        shutil.copytree(ROOT / folder, source / folder, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    build = subprocess.run(
        [*pip_wheel, "-q", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("lstm_hpo-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        site = tmp_path / "site"
        archive.extractall(site)

    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "service").rglob("*.py")}
    assert modules - names == set(), "modules missing from the wheel (pyproject packages)"
    migrations = {
        "service/" + p.relative_to(ROOT).as_posix()
        for p in (ROOT / "migrations").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert migrations, "no migrations found in the checkout"
    assert migrations - names == set(), "migrations missing from the wheel"

    # The unpacked wheel first on the path, run from elsewhere: it must migrate a fresh
    # SQLite file with the migrations it carries, not the checkout's.
    script = (
        "import sys\n"
        "from service.db import make_engine\n"
        "from service.migrate import MIGRATIONS_DIR, schema_is_current, upgrade_schema\n"
        f"assert str(MIGRATIONS_DIR).startswith({str(site)!r}), MIGRATIONS_DIR\n"
        "url = sys.argv[1]\n"
        "upgrade_schema(url)\n"
        "assert schema_is_current(make_engine(url))\n"
        "print(MIGRATIONS_DIR)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, f"sqlite:///{tmp_path / 'fresh.db'}"],
        cwd=tmp_path,
        env=os.environ | {"PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(site / "service" / "migrations")
