"""Short study ids, over a real server (uvicorn on loopback, SQLite), no worker:

- ``GET /v1/studies?id_prefix=``: only the principal's studies whose id starts so; 422
  naming ``id_prefix`` for what cannot start an id;
- ``Client.resolve`` / ``AsyncClient.resolve``: a unique start -> the whole id; none or
  several -> an error that says which;
- every study command of the CLI takes the 12 digits its tables show, and those tables fit
  an 80-column terminal without cutting an id (they once cut every id to 5 digits).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from typer.testing import CliRunner

from service import auth
from service.cli import app as cli_app
from service.client import AsyncClient, Client
from service.config import Settings
from service.errors import AmbiguousStudyId, StudyNotFound
from tests.servers import InProcessServer, serve_in_thread

#: 17 studies: two of them share a first hex digit, whatever ids they drew (pigeonhole).
N_STUDIES = 17
SPEC: dict[str, Any] = {
    "task": {"kind": "synthetic"},
    "space": {"num_layers": 1, "max_epochs": 1},
    "study": {"n_trials": 1, "sampler": "random", "pruner": "none"},
}


@dataclass(frozen=True)
class Setup:
    server: InProcessServer
    alice: str
    ids: list[str]  # alice's
    bobs: str  # bob's one study

    def cli(self, *args: str, columns: int = 250) -> Any:
        return CliRunner().invoke(
            cli_app,
            [*args, "--server", self.server.url, "--token", self.alice],
            env={"COLUMNS": str(columns)},
        )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("short-ids")
    url = f"sqlite:///{tmp / 'lstm-hpo.db'}"
    with serve_in_thread(Settings(data_dir=tmp / "data", database_url=url)) as server:
        alice = auth.create_token(server.backend.sessions, "alice")
        bob = auth.create_token(server.backend.sessions, "bob")
        with Client(server.url, token=alice) as client:
            names = ("a-study-name-long-enough-to-be-folded-in-a-narrow-terminal", "s")
            ids = [
                client.submit(SPEC | {"name": f"{names[i % 2]}-{i}"}).id for i in range(N_STUDIES)
            ]
        with Client(server.url, token=bob) as client:
            bobs = client.submit(SPEC | {"name": "bobs"}).id
        yield Setup(server, alice, ids, bobs)


def _shared_digit(ids: list[str]) -> tuple[str, int]:
    digit, count = Counter(i[0] for i in ids).most_common(1)[0]
    assert count >= 2
    return digit, count


def test_list_filters_by_id_prefix_within_the_principals_studies(setup: Setup) -> None:
    digit, count = _shared_digit(setup.ids)
    http, headers = setup.server.http, {"Authorization": f"Bearer {setup.alice}"}

    shared = http.get("/v1/studies", params={"id_prefix": digit}, headers=headers).json()
    whole = http.get("/v1/studies", params={"id_prefix": setup.ids[3]}, headers=headers).json()
    bobs = http.get("/v1/studies", params={"id_prefix": setup.bobs}, headers=headers).json()

    assert shared["total"] == count and {s["id"][0] for s in shared["items"]} == {digit}
    assert [s["id"] for s in whole["items"]] == [setup.ids[3]]
    assert bobs["total"] == 0  # another principal's study is not found, not even by prefix


@pytest.mark.parametrize("prefix", ["XYZ", "g", "0" * 33, "", "a%", "a_"])
def test_what_cannot_start_an_id_is_422_naming_id_prefix(setup: Setup, prefix: str) -> None:
    got = setup.server.http.get(
        "/v1/studies",
        params={"id_prefix": prefix},
        headers={"Authorization": f"Bearer {setup.alice}"},
    )

    assert got.status_code == 422, got.text
    assert "id_prefix" in got.text


def test_resolve_a_short_id_sync_and_async(setup: Setup) -> None:
    digit, _ = _shared_digit(setup.ids)
    target = setup.ids[5]
    with Client(setup.server.url, token=setup.alice) as client:
        assert client.resolve(target[:12]) == target
        assert client.resolve(target[:12].upper()) == target
        assert client.resolve(target) == target  # whole: no request needed
        assert client.resolve(f" {target.upper()}\n") == target
        with pytest.raises(StudyNotFound, match="empty"):
            client.resolve("  ")
        with pytest.raises(AmbiguousStudyId, match=f"{digit} starts .* give more of the id"):
            client.resolve(digit)
        with pytest.raises(StudyNotFound, match="no study's id starts with"):
            client.resolve(setup.bobs[:12])  # bob's: alice cannot see it

    async def resolve() -> str:
        async with AsyncClient(setup.server.url, token=setup.alice) as client:
            return await client.resolve(target[:8])

    assert asyncio.run(resolve()) == target


def test_every_study_command_takes_the_short_id(setup: Setup) -> None:
    target, other = setup.ids[0], setup.ids[1]

    shown = setup.cli("status", target[:12], "--no-watch")
    cancelled = setup.cli("cancel", target[:12].upper())
    extended = setup.cli("extend", other[:12], "--n-trials", "2")
    deleted = setup.cli("delete", other[:12], "--yes")

    assert shown.exit_code == 0, shown.output
    assert target in shown.output  # the single study's view shows the whole id
    assert cancelled.exit_code == 0 and f"{target}: cancelled" in cancelled.output
    assert extended.exit_code == 0 and f"{other}: queued, 0/3 trials" in extended.output
    assert deleted.exit_code == 0 and f"{other}: deleted" in deleted.output
    setup.ids.remove(other)


def test_an_ambiguous_or_unknown_short_id_is_one_error_line(setup: Setup) -> None:
    digit, count = _shared_digit(setup.ids)

    ambiguous = setup.cli("status", digit, "--no-watch")
    unknown = setup.cli("best", setup.bobs[:12])

    assert ambiguous.exit_code == 1
    assert f"{digit} starts {count} studies' ids" in ambiguous.output
    assert unknown.exit_code == 1 and "no study's id starts with" in unknown.output
    assert "Traceback" not in ambiguous.output + unknown.output


@pytest.mark.parametrize("command", [("status",), ("watch", "--once")])
def test_study_tables_fit_80_columns_and_never_cut_an_id(
    setup: Setup, command: tuple[str, ...]
) -> None:
    shown = setup.cli(*command, columns=80)

    assert shown.exit_code == 0, shown.output
    assert max(len(line) for line in shown.output.splitlines()) <= 80
    for study_id in setup.ids:
        assert study_id[:12] in shown.output
    assert "…" not in shown.output  # nothing cut short
