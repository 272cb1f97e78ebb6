"""docker-compose.yml matches the image it builds (issue 13): every service built from this
repository runs one of the image's entry points (``lstm-hpo serve``, ``lstm-hpo worker``)
with options the CLI accepts, sets only environment variables that ``Settings`` (or the CLI)
reads, and yields a configuration ``Settings`` accepts; the server's health check asks
``/v1/health`` on the port it listens on, and the workers, which listen on none, do not
inherit the image's.

No container runtime needed. ``deploy/check-image.sh`` runs this file as a script with the
built image's own Python (``python3 test_compose.py COMPOSE DOCKERFILE``), so the same
checks hold against the packages installed in the image.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
import yaml
from pydantic import ValidationError

from service.cli import app
from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
#: The image's entry point (the Dockerfile's ENTRYPOINT) and the commands run with it.
ENTRYPOINT = ["lstm-hpo"]
ENTRY_COMMANDS = ("serve", "worker")
HEALTH_PATH = "/v1/health"
#: Variables read by libraries the image runs rather than by lstm-hpo itself.
THIRD_PARTY_PREFIXES = ("AWS_", "NVIDIA_", "CUDA_", "PYTORCH_", "OMP_", "PG")

Doc = dict[str, Any]


def known_environment() -> set[str]:
    """Every variable lstm-hpo reads: each ``Settings`` field as ``LSTM_HPO_<NAME>`` (also
    for a field with an alias: ``validate_by_name``) and its alias, and the CLI's envvars."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        names.add(f"{prefix}{name}".upper())
        if isinstance(field.validation_alias, str):
            names.add(field.validation_alias.upper())

    # Typed loosely: some typer releases vendor click (typer._click), others use click.
    def walk(command: Any) -> Iterator[str]:
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            if isinstance(envvar, str):
                yield envvar
            elif envvar:
                yield from envvar
        for sub in getattr(command, "commands", {}).values():
            yield from walk(sub)

    names.update(walk(typer.main.get_command(app)))
    return names


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    found: list[tuple[str, str]] = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, rest = line.strip().partition(" ")
            found.append((instruction.upper(), rest.strip()))
    return found


def runtime_stage(text: str) -> list[tuple[str, str]]:
    """The last stage's instructions: what the image is."""
    instructions = dockerfile_instructions(text)
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


def dockerfile_environment(text: str) -> dict[str, str]:
    """The runtime stage's ``ENV`` (``K=V`` pairs; values unquoted by shlex)."""
    env: dict[str, str] = {}
    for name, rest in runtime_stage(text):
        if name == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def dockerfile_healthcheck(text: str) -> str | None:
    checks = [rest for name, rest in runtime_stage(text) if name == "HEALTHCHECK"]
    return checks[-1] if checks else None


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` -> default; ``${VAR}`` and ``${VAR:?message}`` -> a
    placeholder long enough for a token."""

    def one(match: re.Match[str]) -> str:
        if match.group(2) in (":-", "-"):
            return match.group(3)
        return "placeholder-" + "x" * 40

    return re.sub(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}", one, value)


def service_environment(service: Doc) -> dict[str, str | None]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        pairs = [str(item).partition("=") for item in environment]
        return {key: (value if sep else None) for key, sep, value in pairs}
    return {str(k): (None if v is None else str(v)) for k, v in environment.items()}


def as_list(command: Any) -> list[str]:
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def our_services(compose: Doc) -> dict[str, Doc]:
    """Services built from this repository (``build:``) or running an lstm-hpo image."""
    services: dict[str, Doc] = compose.get("services") or {}
    return {
        name: service
        for name, service in services.items()
        if "build" in service or "lstm-hpo" in str(service.get("image", ""))
    }


def _flag(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _health_test(healthcheck: Any) -> str | None:
    """The command of a compose healthcheck, or None when it is disabled."""
    if healthcheck.get("disable"):
        return None
    test = healthcheck.get("test")
    if isinstance(test, list):
        if test and test[0] == "NONE":
            return None
        return " ".join(str(t) for t in test[1:] if t not in ("CMD", "CMD-SHELL"))
    return str(test)


@contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.startswith("LSTM_HPO_")]:
            del os.environ[key]
        os.environ.update(values)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def compose_problems(compose: Doc, dockerfile: str) -> list[str]:
    """What is wrong with the compose file against the image; empty when nothing is."""
    problems: list[str] = []
    known = known_environment()
    image_env = dockerfile_environment(dockerfile)
    image_health = dockerfile_healthcheck(dockerfile)
    cli: Any = typer.main.get_command(app)

    for key in image_env:
        if key.startswith("LSTM_HPO_") and key not in known:
            problems.append(f"Dockerfile: ENV {key} is read by nothing (not a Settings field)")
    if image_health is None or HEALTH_PATH not in image_health:
        problems.append(f"Dockerfile: HEALTHCHECK does not ask {HEALTH_PATH}")

    services = our_services(compose)
    if not services:
        problems.append("no service is built from this repository (build: .)")
    commands = set()
    for name, service in services.items():
        where = f"services.{name}"
        entrypoint = as_list(service.get("entrypoint"))
        if entrypoint and entrypoint != ENTRYPOINT:
            problems.append(f"{where}.entrypoint: {entrypoint}, not the image's {ENTRYPOINT}")
        args = as_list(service.get("command"))
        if not args or args[0] not in ENTRY_COMMANDS:
            problems.append(
                f"{where}.command: {args}, not one of the image's entry points "
                + ", ".join(f"`lstm-hpo {c}`" for c in ENTRY_COMMANDS)
            )
            continue
        command = args[0]
        commands.add(command)
        try:
            cli.commands[command].make_context(command, list(args[1:]))
        except Exception as err:  # click's UsageError (vendored by some typer releases)
            message = err.format_message() if hasattr(err, "format_message") else str(err)
            problems.append(f"{where}.command: `lstm-hpo {' '.join(args)}`: {message}")

        environment = service_environment(service)
        for key in environment:
            if key in known:
                continue
            if key.startswith("LSTM_HPO_") or not key.startswith(THIRD_PARTY_PREFIXES):
                problems.append(f"{where}.environment: {key} is not a setting lstm-hpo reads")
        values = {
            **{k: v for k, v in image_env.items() if k.startswith("LSTM_HPO_")},
            **{k: interpolate(v) for k, v in environment.items() if v is not None and k in known},
        }
        with _environment(values):
            try:
                settings = Settings(_env_file=None)
            except ValidationError as err:
                problems.append(f"{where}.environment: Settings refuses it: {err}")
                continue

        healthcheck = service.get("healthcheck")
        test = image_health if healthcheck is None else _health_test(healthcheck)
        if command == "serve":
            port = int(_flag(args, "--port") or settings.port)
            if test is None or f":{port}{HEALTH_PATH}" not in test:
                problems.append(
                    f"{where}.healthcheck: {test!r} does not ask {HEALTH_PATH} on port {port}"
                )
            for mapping in service.get("ports") or []:
                container_port = str(mapping).rsplit(":", 1)[-1].split("/")[0]
                if container_port != str(port):
                    problems.append(f"{where}.ports: {mapping} is not the server's port {port}")
        elif test is not None:
            problems.append(
                f"{where}.healthcheck: a worker listens on no port, so {test!r} would mark it "
                "unhealthy; set `healthcheck: {disable: true}`"
            )
    for command in ENTRY_COMMANDS:
        if services and command not in commands:
            problems.append(f"no service runs `lstm-hpo {command}`")
    return problems


def _load(path: Path) -> Doc:
    loaded: Doc = yaml.safe_load(path.read_text())
    return loaded


# --- the tests -------------------------------------------------------------------------------


def test_compose_file_matches_the_image() -> None:
    problems = compose_problems(
        _load(ROOT / "docker-compose.yml"), (ROOT / "Dockerfile").read_text()
    )
    assert not problems, "\n".join(problems)


def test_known_environment_covers_settings_aliases_and_the_cli() -> None:
    known = known_environment()
    assert {"LSTM_HPO_DATABASE_URL", "LSTM_HPO_ADMIN_TOKEN", "LSTM_HPO_ENV"} <= known
    assert {"LSTM_HPO_WORKER_MEMORY_GB", "LSTM_HPO_MAX_RUNNING_TRIALS"} <= known  # aliases
    assert {"LSTM_HPO_TOKEN", "LSTM_HPO_SERVER"} <= known  # the CLI's
    assert "LSTM_HPO_DATABSE_URL" not in known


def test_a_broken_compose_file_is_caught_naming_each_mistake() -> None:
    compose = _load(ROOT / "docker-compose.yml")
    dockerfile = (ROOT / "Dockerfile").read_text()
    server, worker = compose["services"]["server"], compose["services"]["worker"]
    server["command"] = ["serve", "--hots", "0.0.0.0"]
    server["environment"]["LSTM_HPO_DATABSE_URL"] = "postgresql+psycopg://x@db/y"
    server["healthcheck"] = {"test": ["CMD", "curl", "-f", "http://127.0.0.1:8000/health"]}
    worker["command"] = ["python", "-m", "service.worker"]
    problems = "\n".join(compose_problems(compose, dockerfile))
    assert "services.server.command" in problems and "--hots" in problems
    assert "LSTM_HPO_DATABSE_URL is not a setting" in problems
    assert "services.server.healthcheck" in problems
    assert "services.worker.command" in problems
    assert "no service runs `lstm-hpo worker`" in problems


def test_a_worker_inheriting_the_servers_healthcheck_is_caught() -> None:
    compose = _load(ROOT / "docker-compose.yml")
    compose["services"]["worker"].pop("healthcheck", None)
    problems = compose_problems(compose, (ROOT / "Dockerfile").read_text())
    assert any("services.worker.healthcheck" in p for p in problems), problems


def test_production_with_sqlite_is_refused_by_settings() -> None:
    compose = _load(ROOT / "docker-compose.yml")
    compose["services"]["server"]["environment"]["LSTM_HPO_DATABASE_URL"] = "sqlite:////data/x.db"
    problems = compose_problems(compose, (ROOT / "Dockerfile").read_text())
    assert any("Settings refuses it" in p and "PostgreSQL" in p for p in problems), problems


def test_interpolation_takes_defaults_and_fills_required_values() -> None:
    assert interpolate("${A:-http://localhost:8000}/x") == "http://localhost:8000/x"
    assert interpolate("${A:?set A}").startswith("placeholder-")
    assert len(interpolate("${LSTM_HPO_ADMIN_TOKEN}")) >= 32


def test_the_release_check_script_parses_and_explains_itself() -> None:
    """deploy/check-image.sh runs before a release only (root, podman, minutes): here at
    least it parses, and --help answers without root or podman."""
    script = ROOT / "deploy" / "check-image.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    shown = subprocess.run(
        ["bash", str(script), "--help"], check=True, capture_output=True, text=True
    ).stdout
    assert "--keep" in shown and "podman build" in shown


def main(argv: list[str]) -> int:
    """``python3 test_compose.py [COMPOSE [DOCKERFILE]]``: print the problems, exit 1 if any,
    and print the entry-point commands of the compose services as JSON."""
    compose_path = Path(argv[0]) if argv else ROOT / "docker-compose.yml"
    dockerfile_path = Path(argv[1]) if len(argv) > 1 else ROOT / "Dockerfile"
    compose = _load(compose_path)
    problems = compose_problems(compose, dockerfile_path.read_text())
    for problem in problems:
        print(f"compose: {problem}")
    commands = {name: as_list(s.get("command")) for name, s in our_services(compose).items()}
    print("commands " + json.dumps(commands))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
