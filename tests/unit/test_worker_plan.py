"""Device planning for ``lstm-hpo worker`` / ``serve``: which processes, which GPU, how many
threads; and the environment a worker process gives itself before torch could load."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from service.auth import LOCAL
from service.worker import (
    ProcessPlan,
    detect_gpus,
    parse_gpu_ids,
    plan_worker_processes,
    process_environment,
)


def _devices(plans: list[ProcessPlan]) -> list[str | None]:
    return [p.cuda_visible_devices for p in plans]


# --- GPUs ------------------------------------------------------------------------------


def test_one_process_per_listed_gpu_each_seeing_only_its_gpu() -> None:
    plans = plan_worker_processes("0,1,2,3", None, cores=16, threads=2)
    assert _devices(plans) == ["0", "1", "2", "3"]
    assert [p.slot for p in plans] == [0, 1, 2, 3]
    assert {p.accelerator for p in plans} == {"gpu"}  # fit uses devices=1: the visible one
    assert {p.torch_threads for p in plans} == {2}
    assert plans[2].device == "gpu 2"


def test_gpu_ids_may_be_uuids_and_are_kept_in_the_given_order() -> None:
    uuid = "GPU-8f2a3c1e-0b4d-4e5f-9a6b-7c8d9e0f1a2b"
    plans = plan_worker_processes(f"3, {uuid} ,MIG-abc/1/2", None, cores=4, threads=1)
    assert _devices(plans) == ["3", uuid, "MIG-abc/1/2"]


def test_more_processes_than_gpus_share_them_round_robin() -> None:
    plans = plan_worker_processes("0,1", 5, cores=16, threads=1)
    assert _devices(plans) == ["0", "1", "0", "1", "0"]


def test_gpu_processes_are_not_cut_to_the_cores() -> None:
    # Each GPU needs its process; the CLI warns instead.
    assert len(plan_worker_processes("0,1,2,3", None, cores=2, threads=1)) == 4


@pytest.mark.parametrize(
    ("devices", "message"),
    [
        ("", "empty GPU id"),
        ("0,,1", "empty GPU id"),
        ("0,", "empty GPU id"),
        ("gpu0", "'gpu0' is not a GPU id"),
        ("cuda:0", "'cuda:0' is not a GPU id"),
        ("-1", "'-1' is not a GPU id"),
        ("0;1", "'0;1' is not a GPU id"),
        ("1.5", "'1.5' is not a GPU id"),
        ("0,1,0", "0 listed twice"),
        ("cpu,0", "'cpu' is not a GPU id"),
    ],
)
def test_bad_device_strings_say_what_is_wrong(devices: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        plan_worker_processes(devices, None, cores=4, threads=1)
    assert "--devices" in str(info.value)


def test_parse_gpu_ids_accepts_spaces() -> None:
    assert parse_gpu_ids(" 0 , 1 ") == ["0", "1"]


def test_fewer_processes_than_listed_gpus_is_an_error() -> None:
    with pytest.raises(ValueError, match="fewer than the 4 GPUs"):
        plan_worker_processes("0,1,2,3", 2, cores=8, threads=1)


def test_gpus_contradict_a_cpu_accelerator() -> None:
    with pytest.raises(ValueError, match="contradict --accelerator cpu"):
        plan_worker_processes("0,1", None, cores=8, threads=1, accelerator="cpu")


# --- auto / all --------------------------------------------------------------------------


def test_auto_uses_every_detected_gpu() -> None:
    for devices in (None, "auto", "AUTO", "all"):
        plans = plan_worker_processes(devices, None, cores=8, threads=1, gpus=["0", "1"])
        assert _devices(plans) == ["0", "1"], devices
        assert {p.accelerator for p in plans} == {"gpu"}


def test_auto_with_fewer_processes_takes_the_first_gpus_and_all_refuses() -> None:
    plans = plan_worker_processes(None, 1, cores=8, threads=1, gpus=["0", "1", "2"])
    assert _devices(plans) == ["0"]  # `serve --workers 1` on a multi-GPU machine
    with pytest.raises(ValueError, match="fewer than the 3 GPUs of --devices all"):
        plan_worker_processes("all", 1, cores=8, threads=1, gpus=["0", "1", "2"])


def test_all_without_a_gpu_is_an_error() -> None:
    with pytest.raises(ValueError, match="no GPU found"):
        plan_worker_processes("all", None, cores=8, threads=1)


def test_auto_without_a_gpu_is_the_cpu_keeping_accelerator_and_environment() -> None:
    plans = plan_worker_processes(None, 3, cores=8, threads=2, accelerator="auto")
    assert len(plans) == 3
    assert {p.accelerator for p in plans} == {"auto"}
    assert _devices(plans) == [None, None, None]  # --processes N as it always was


def test_auto_with_a_cpu_accelerator_ignores_gpus() -> None:
    plans = plan_worker_processes(None, 2, cores=8, threads=1, accelerator="cpu", gpus=["0"])
    assert _devices(plans) == [None, None]
    assert {p.accelerator for p in plans} == {"cpu"}


# --- CPU ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cores", "threads", "expected"),
    [(16, 1, 16), (16, 4, 4), (16, 3, 5), (2, 1, 2), (1, 1, 1), (2, 4, 1)],
)
def test_cpu_default_fills_the_cores(cores: int, threads: int, expected: int) -> None:
    plans = plan_worker_processes("cpu", None, cores=cores, threads=threads)
    assert len(plans) == expected
    assert len(plans) * plans[0].torch_threads <= cores
    assert {p.accelerator for p in plans} == {"cpu"}
    assert set(_devices(plans)) == {""}  # GPUs hidden: nothing can grab one
    assert plans[0].device == "cpu"


def test_threads_are_cut_to_the_cores() -> None:
    plans = plan_worker_processes("cpu", None, cores=2, threads=8)
    assert [p.torch_threads for p in plans] == [2]


def test_cpu_processes_are_cut_to_fit_the_cores() -> None:
    assert len(plan_worker_processes("cpu", 32, cores=8, threads=2)) == 4
    assert len(plan_worker_processes("cpu", 3, cores=8, threads=2)) == 3
    assert len(plan_worker_processes(None, 32, cores=2, threads=1)) == 2  # --processes 32


def test_zero_processes_plan_nothing() -> None:
    assert plan_worker_processes(None, 0, cores=4, threads=1, gpus=["0"]) == []
    assert plan_worker_processes("cpu", 0, cores=4, threads=1) == []
    assert plan_worker_processes("0,1", 0, cores=4, threads=1) == []  # nothing idles: none run


def test_cpu_contradicts_a_gpu_accelerator() -> None:
    with pytest.raises(ValueError, match="--devices cpu contradicts --accelerator gpu"):
        plan_worker_processes("cpu", None, cores=4, threads=1, accelerator="gpu")


@pytest.mark.parametrize(("processes", "cores", "threads"), [(-1, 4, 1), (1, 0, 1), (1, 4, 0)])
def test_nonsense_counts_are_errors(processes: int, cores: int, threads: int) -> None:
    with pytest.raises(ValueError):
        plan_worker_processes("cpu", processes, cores=cores, threads=threads)


# --- GPU discovery and the process environment -------------------------------------------


def test_detect_gpus_reads_cuda_visible_devices_first() -> None:
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": "1,-1,2"}) == ["1"]  # CUDA stops there too


def test_detect_gpus_without_nvidia_smi_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert detect_gpus({}) == []


def test_process_environment() -> None:
    gpu = ProcessPlan(0, accelerator="gpu", torch_threads=3, cuda_visible_devices="1")
    assert process_environment(gpu, 3, 42) == {
        "OMP_NUM_THREADS": "3",
        "MKL_NUM_THREADS": "3",
        "PGAPPNAME": "lstm-hpo-worker:42",
        "CUDA_VISIBLE_DEVICES": "1",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    }
    cpu = ProcessPlan(0, accelerator="cpu", torch_threads=1, cuda_visible_devices="")
    assert process_environment(cpu, 1, 7)["CUDA_VISIBLE_DEVICES"] == ""
    inherit = ProcessPlan(0, accelerator="auto", torch_threads=1)
    assert "CUDA_VISIBLE_DEVICES" not in process_environment(inherit, 1, 7)


def test_configure_torch_threads_defaults_to_omp_num_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from service.training.fit import configure_torch_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        configure_torch_threads()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# A worker process (the spawn target, as run_worker_processes starts it) that runs only
# synthetic trials: it must never import torch, and its environment must be in place.
_SYNTHETIC_WORKER = textwrap.dedent(
    """
    import json, os, sys
    # Without the `postgres` extra: a SQLite worker must not need psycopg.
    sys.modules["psycopg"] = None
    from service.worker import ProcessPlan, WorkerOptions, _child

    options = WorkerOptions(database_url=sys.argv[1], poll_interval_s=0.05, idle_exit_s=1.0)
    _child(options, ProcessPlan(0, accelerator="gpu", torch_threads=2, cuda_visible_devices="7"))
    keys = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "PGAPPNAME")
    print(json.dumps({
        "torch": "torch" in sys.modules,
        "lightning": "lightning" in sys.modules,
        "env": {k: os.environ.get(k) for k in keys},
        "pid": os.getpid(),
    }))
    """
)


def test_a_synthetic_only_worker_never_imports_torch_nor_needs_psycopg_on_sqlite(
    tmp_path: Path,
) -> None:
    from service.migrate import upgrade_schema
    from service.search_space import DEFAULT_LIMITS, parse_spec
    from service.studies import get_study, open_backend, optuna_storage, submit_study

    url = f"sqlite:///{tmp_path / 'lstm-hpo.db'}"
    optuna_storage(url).engine.dispose()  # as the server does: Optuna's tables, then ours
    upgrade_schema(url)
    backend = open_backend(url, limits=DEFAULT_LIMITS, base_url="http://test")
    spec = {
        "task": {"kind": "synthetic", "sleep_s": 0},
        "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
        "study": {"n_trials": 3, "sampler": "random"},
    }
    study, _ = submit_study(backend, parse_spec(spec), principal=LOCAL)
    done = subprocess.run(
        [sys.executable, "-c", _SYNTHETIC_WORKER, url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert get_study(backend, study.id, principal=LOCAL).n_finished == 3  # it really ran the trials
    assert report["torch"] is False and report["lightning"] is False, report
    assert report["env"] == {
        "CUDA_VISIBLE_DEVICES": "7",
        "OMP_NUM_THREADS": "2",
        "MKL_NUM_THREADS": "2",
        "PGAPPNAME": f"lstm-hpo-worker:{report['pid']}",
    }
