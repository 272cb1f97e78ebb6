"""deploy/: the Kubernetes manifests (a kustomize base and the overlays cpu and gpu) are
valid against the Kubernetes 1.30 schemas (kubernetes-validate, offline), keep the security
and preemption settings the service relies on, and pass checkov with the Dockerfile except
for the findings deploy/checkov-accepted.yaml lists with their reasons; the Slurm job array
script refuses what it must and starts the worker as a job step.

Rendering uses ``kubectl kustomize`` (or a ``kustomize`` binary): no Python package
implements kustomize. Without either, the base files are still validated one by one and every
overlay patch is checked to target a base resource. checkov lives in its own virtual
environment (it pins old networkx and packaging): ``.venv/checkov`` as ``.ci/run`` makes it,
or ``LSTM_HPO_CHECKOV``. In CI a missing tool fails instead of skipping.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

from service.errors import SingleHostOnly

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
BASE = KUBE / "base"
OVERLAYS = {name: KUBE / "overlays" / name for name in ("cpu", "gpu")}
S3_COMPONENT = KUBE / "components" / "s3-artifacts"
ACCEPTED = DEPLOY / "checkov-accepted.yaml"
SBATCH = DEPLOY / "slurm" / "worker-array.sbatch"
SECRET_EXAMPLE = BASE / "secret.example.yaml"
#: The schemas checked against: an older release than clusters run today, so that the
#: manifests use no field a current cluster lacks.
KUBERNETES_VERSION = "1.30.0"
#: kubelet SIGKILL must come after the worker supervisor's last escalation (grace + 16 s).
TERMINATION_MARGIN_S = 20
IMAGE = "lstm-hpo"
CHECKOV_TIMEOUT_S = 300
DOCKERFILE = "Dockerfile"

Doc = dict[str, Any]


def _missing(what: str) -> NoReturn:
    """Skip for lack of a tool, except in CI, where a skipped check would hide a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must run this check)")
    pytest.skip(what)


def _validator() -> Any:
    module = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    return module


def _load(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _kustomization(directory: Path) -> Doc:
    (doc,) = _load(directory / "kustomization.yaml")
    return doc


def _validate(doc: Doc, where: str) -> None:
    kv = _validator()
    try:
        kv.validate(doc, KUBERNETES_VERSION, strict=True)
    except kv.ValidationError as err:
        path = "/".join(str(p) for p in err.absolute_path)
        pytest.fail(f"{where}: {doc['kind']}/{doc['metadata']['name']} at {path}: {err.message}")


def _key(doc: Doc) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


@functools.cache
def _kustomize_command() -> tuple[str, ...] | None:
    if shutil.which("kubectl"):
        return ("kubectl", "kustomize")
    if shutil.which("kustomize"):
        return ("kustomize", "build")
    return None


def _render(directory: Path) -> list[Doc]:
    command = _kustomize_command()
    if command is None:
        _missing("kubectl or kustomize is not installed: cannot render the overlays")
    return copy.deepcopy(_render_with(command, str(directory)))  # tests may not share edits


@functools.cache
def _render_with(command: tuple[str, ...], directory: str) -> list[Doc]:
    done = subprocess.run(
        [*command, directory], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"{' '.join(command)} {directory}:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _render_with_s3(tmp_path: Path) -> list[Doc]:
    """The gpu overlay with the s3-artifacts component, as a user's overlay would add it."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    # kustomize refuses absolute paths to bases and components.
    rel = functools.partial(os.path.relpath, start=overlay)
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [rel(OVERLAYS["gpu"])],
                "components": [rel(S3_COMPONENT)],
            }
        )
    )
    return _render(overlay)


def _one(docs: list[Doc], kind: str, name: str) -> Doc:
    (found,) = [d for d in docs if _key(d) == (kind, name)]
    return found


def _pod_specs(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def _container(docs: list[Doc], kind: str, name: str) -> Doc:
    containers: list[Doc] = _one(docs, kind, name)["spec"]["template"]["spec"]["containers"]
    (container,) = containers
    return container


def _dockerfile_uid() -> int:
    match = re.search(r"useradd\b[^\n]*--uid\s+(\d+)", (ROOT / DOCKERFILE).read_text())
    assert match, "the Dockerfile creates no user with a fixed --uid"
    return int(match.group(1))


def _cpu(quantity: str | int) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


# --- kubernetes-validate: every manifest, offline ------------------------------------------


def _base_files() -> list[Path]:
    return sorted(p for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", _base_files(), ids=lambda p: p.name)
def test_base_file_is_valid_against_the_kubernetes_schema(path: Path) -> None:
    docs = _load(path)
    assert docs, f"{path.name} holds no object"
    for doc in docs:
        _validate(doc, path.name)


@pytest.mark.parametrize("target", ["base", "cpu", "gpu", "gpu+s3"])
def test_rendered_manifests_are_valid_against_the_kubernetes_schema(
    target: str, tmp_path: Path
) -> None:
    if target == "gpu+s3":
        docs = _render_with_s3(tmp_path)
    else:
        docs = _render(BASE if target == "base" else OVERLAYS[target])
    assert len(docs) >= 14
    for doc in docs:
        _validate(doc, target)
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "lstm-hpo", _key(doc)


def test_strict_validation_catches_a_misspelled_field() -> None:
    """The check above is not vacuous: a typo in a security setting is an error."""
    kv = _validator()
    (deployment,) = _load(BASE / "worker-deployment.yaml")
    context = deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    context["readOnlyRootFileSystem"] = context.pop("readOnlyRootFilesystem")
    with pytest.raises(kv.ValidationError, match="readOnlyRootFileSystem"):
        kv.validate(deployment, KUBERNETES_VERSION, strict=True)


# --- the kustomize structure, without kustomize --------------------------------------------


def _base_objects() -> dict[tuple[str, str], Doc]:
    resources = _kustomization(BASE)["resources"]
    return {_key(doc): doc for name in resources for doc in _load(BASE / name)}


def test_base_lists_every_manifest_but_the_secret_example() -> None:
    listed = set(_kustomization(BASE)["resources"])
    on_disk = {p.name for p in _base_files()}
    assert listed == on_disk - {SECRET_EXAMPLE.name}, "a base file is missing from resources"


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_every_overlay_patch_targets_a_base_resource(overlay: str) -> None:
    directory = OVERLAYS[overlay]
    kustomization = _kustomization(directory)
    assert kustomization["resources"] == ["../../base"]
    base = _base_objects()
    used = {"kustomization.yaml"}
    for patch in kustomization.get("patches", []):
        used.add(patch["path"])
        for doc in _load(directory / patch["path"]):
            assert _key(doc) in base, f"{overlay}/{patch['path']} patches no base object"
            assert doc["apiVersion"] == base[_key(doc)]["apiVersion"]
    base_images = {image["name"] for image in _kustomization(BASE)["images"]}
    assert {image["name"] for image in kustomization.get("images", [])} <= base_images
    assert {p.name for p in directory.iterdir()} == used, "a file no kustomization uses"


def test_the_s3_component_patches_base_resources() -> None:
    base = _base_objects()
    for patch in _kustomization(S3_COMPONENT)["patches"]:
        target = patch["target"]
        names = [n for k, n in base if k == target["kind"] and re.fullmatch(target["name"], n)]
        assert names, f"the s3-artifacts component targets no {target}"


# --- what the service relies on, in the rendered overlays -----------------------------------


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_pods_run_non_root_read_only_and_bounded(overlay: str) -> None:
    docs = _render(OVERLAYS[overlay])
    uid = _dockerfile_uid()
    for name, pod in _pod_specs(docs):
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True, name
        assert security["runAsUser"] > 10000, name
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["serviceAccountName"] == "lstm-hpo", name
        for container in pod["containers"]:
            image = container["image"]
            repository, _, tag = image.rpartition(":")
            assert repository and tag and tag != "latest", f"{name}: image {image} not pinned"
            if repository == IMAGE:
                assert security["runAsUser"] == uid, f"{name}: not the Dockerfile's user {uid}"
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind]), f"{name}: {kind}"
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/tmp" in mounts, f"{name}: no writable /tmp"
            if repository == IMAGE:
                assert "/data" in mounts, f"{name}: no data directory"
    assert not [d for d in docs if d["kind"] == "Secret"], "no Secret is ever applied"


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_workers_get_time_to_checkpoint_before_the_kill(overlay: str) -> None:
    deployment = _one(_render(OVERLAYS[overlay]), "Deployment", "lstm-hpo-worker")
    pod = deployment["spec"]["template"]["spec"]
    (worker,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert "LSTM_HPO_PREEMPT_GRACE_S" in env, "set the grace explicitly beside the pod's"
    grace = float(env["LSTM_HPO_PREEMPT_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] >= grace + TERMINATION_MARGIN_S


def test_gpu_workers_are_one_pod_per_gpu() -> None:
    docs = _render(OVERLAYS["gpu"])
    worker = _container(docs, "Deployment", "lstm-hpo-worker")
    assert worker["args"][:3] == ["worker", "--devices", "0"]
    assert _flag(worker["args"], "--processes") in (None, "1")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["image"].endswith("-cuda"), "GPU workers need the CUDA image"
    server = _container(docs, "Deployment", "lstm-hpo-server")
    assert "nvidia.com/gpu" not in server["resources"]["limits"]


def test_cpu_workers_fit_their_cpu_limit() -> None:
    worker = _container(_render(OVERLAYS["cpu"]), "Deployment", "lstm-hpo-worker")
    args = worker["args"]
    assert args[:3] == ["worker", "--devices", "cpu"]
    assert "nvidia.com/gpu" not in worker["resources"]["limits"]
    # The worker sizes itself to its cpuset, which a CPU limit does not shrink: say it.
    processes, threads = _flag(args, "--processes"), _flag(args, "--threads")
    assert processes is not None and threads is not None
    assert int(processes) * int(threads) <= _cpu(worker["resources"]["limits"]["cpu"])


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_the_server_runs_no_trials_and_is_probed_on_health(overlay: str) -> None:
    docs = _render(OVERLAYS[overlay])
    server = _container(docs, "Deployment", "lstm-hpo-server")
    assert server["args"][0] == "serve" and _flag(server["args"], "--workers") == "0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"] == {"path": "/v1/health", "port": "http"}, probe
    deployment = _one(docs, "Deployment", "lstm-hpo-server")
    pdb = _one(docs, "PodDisruptionBudget", "lstm-hpo-server")
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    assert deployment["spec"]["replicas"] > pdb["spec"]["minAvailable"], "a drain could stall"
    service = _one(docs, "Service", "lstm-hpo-server")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_settings_come_from_the_configmap_and_secrets_from_secrets(overlay: str) -> None:
    docs = _render(OVERLAYS[overlay])
    config = _one(docs, "ConfigMap", "lstm-hpo-config")["data"]
    assert config["LSTM_HPO_ENV"] == "production"
    assert config["LSTM_HPO_DATA_DIR"] == "/data"
    secret_words = ("DATABASE_URL", "TOKEN", "SECRET", "PASSWORD")
    assert not [k for k in config if any(w in k for w in secret_words)], "secrets in a ConfigMap"
    examples = {_key(d)[1]: d["stringData"] for d in _load(SECRET_EXAMPLE)}
    for values in examples.values():
        for key, value in values.items():
            assert "${REPLACE_ME" in value or "${PASSWORD}" in value, f"{key}: not a placeholder"
    referenced = set()
    for name, pod in _pod_specs(docs):
        for container in pod["containers"]:
            if container["image"].startswith(f"{IMAGE}:"):
                config_ref = {"configMapRef": {"name": "lstm-hpo-config"}}
                assert config_ref in container["envFrom"], name
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    referenced.add((ref["name"], ref["key"]))
                plain = "value" in env and not env["name"].endswith("_FILE")
                assert not (plain and any(w in env["name"] for w in secret_words)), (
                    f"{name}: {env['name']} in plain text"
                )
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                for item in volume["secret"]["items"]:
                    referenced.add((volume["secret"]["secretName"], item["key"]))
    assert referenced == {(n, k) for n, values in examples.items() for k in values}


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_checkpoints_share_one_read_write_many_volume(overlay: str) -> None:
    docs = _render(OVERLAYS[overlay])
    pvc = _one(docs, "PersistentVolumeClaim", "lstm-hpo-data")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in ("lstm-hpo-server", "lstm-hpo-worker"):
        pod = _one(docs, "Deployment", name)["spec"]["template"]["spec"]
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        ]
        assert claims == ["lstm-hpo-data"], name


def _component(labels: dict[str, str]) -> str | None:
    return labels.get("app.kubernetes.io/component")


def _policies(docs: list[Doc]) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}


def _selected(spec: Doc, component: str) -> bool:
    wanted = spec["podSelector"].get("matchLabels", {})
    return all(
        {"app.kubernetes.io/name": "lstm-hpo", "app.kubernetes.io/component": component}.get(k) == v
        for k, v in wanted.items()
    )


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_network_policies_let_only_server_and_workers_reach_postgres(overlay: str) -> None:
    docs = _render(OVERLAYS[overlay])
    policies = _policies(docs)
    deny = policies["lstm-hpo-default-deny"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    # Every pod is selected by a policy of its own besides the default deny.
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            component = _component(doc["spec"]["template"]["metadata"]["labels"])
            assert component is not None, _key(doc)
            own = [n for n, p in policies.items() if p["podSelector"] and _selected(p, component)]
            assert own, f"{_key(doc)}: no NetworkPolicy of its own"

    (db,) = [p for p in policies.values() if p["podSelector"] and _selected(p, "database")]
    sources = {
        _component(peer["podSelector"]["matchLabels"])
        for rule in db["ingress"]
        for peer in rule["from"]
    }
    assert sources == {"server", "worker"}
    peers = [peer for rule in db["ingress"] for peer in rule["from"]]
    assert all(set(peer) == {"podSelector"} for peer in peers), "only pods of this namespace"
    assert db["egress"] == []

    (worker,) = [p for p in policies.values() if p["podSelector"] and _selected(p, "worker")]
    assert worker["ingress"] == [], "workers accept no connection"
    for rule in worker["egress"]:
        ports = {(p["protocol"], p["port"]) for p in rule["ports"]}
        (peer,) = rule["to"]
        if "namespaceSelector" in peer:  # DNS
            assert peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
            assert ports == {("UDP", 53), ("TCP", 53)}
        else:
            assert _component(peer["podSelector"]["matchLabels"]) == "database"
            assert ports == {("TCP", 5432)}


def test_s3_component_points_checkpoints_at_s3_and_opens_only_https(tmp_path: Path) -> None:
    docs = _render_with_s3(tmp_path)
    config = _one(docs, "ConfigMap", "lstm-hpo-config")["data"]
    assert config["LSTM_HPO_ARTIFACTS_URL"].startswith("s3://")
    for name in ("lstm-hpo-server", "lstm-hpo-worker"):
        container = _container(docs, "Deployment", name)
        assert {"secretRef": {"name": "lstm-hpo-s3", "optional": True}} in container["envFrom"]
        egress = _policies(docs)[name]["egress"]
        https = [r for r in egress if any(p["port"] == 443 for p in r["ports"])]
        assert len(https) == 1 and {(p["protocol"], p["port"]) for p in https[0]["ports"]} == {
            ("TCP", 443)
        }


# --- checkov ---------------------------------------------------------------------------------


def _checkov() -> str:
    found = os.environ.get("LSTM_HPO_CHECKOV")
    if found is not None:
        assert Path(found).is_file(), f"LSTM_HPO_CHECKOV={found}: no such file"
    else:
        # .ci/run installs checkov in the background: wait while its marker is there.
        installing = ROOT / ".venv" / "checkov.installing"
        deadline = time.monotonic() + 900
        while installing.exists() and time.monotonic() < deadline:
            time.sleep(1)
        local = ROOT / ".venv" / "checkov" / "bin" / "checkov"
        found = str(local) if local.exists() else shutil.which("checkov")
    if found is None:
        _missing(
            "checkov is not installed: python3 -m venv .venv/checkov && "
            ".venv/checkov/bin/pip install checkov (see .ci/run)"
        )
    return found


def _accepted() -> dict[str, Doc]:
    accepted: dict[str, Doc] = yaml.safe_load(ACCEPTED.read_text())["accepted"]
    return accepted


def _finding_resource(check_type: str, finding: Doc) -> str:
    """A kustomize finding's ``overlay:overlays/cpu:Deployment.lstm-hpo.x`` (or ``base:...``)
    -> ``Deployment/x``; others as checkov names them (the Dockerfile's ``Dockerfile.FROM``)."""
    resource = str(finding["resource"])
    if check_type != "kustomize":
        return Path(resource).name
    kind, _namespace, name = resource.rsplit(":", 1)[-1].split(".", 2)
    return f"{kind}/{name}"


def test_accepted_findings_each_have_a_one_line_reason() -> None:
    for check, entry in _accepted().items():
        assert re.fullmatch(r"CKV2?_[A-Z0-9]+_\d+", check), check
        reason = entry["reason"]
        assert isinstance(reason, str) and len(reason) > 20 and "\n" not in reason.strip(), check
        assert entry["resources"], check


def test_checkov_reports_no_finding_that_is_not_accepted() -> None:
    """checkov's kustomize framework renders the base and each overlay itself (with kubectl);
    the secrets framework scans every file. Run offline (--skip-download)."""
    checkov = _checkov()
    if _kustomize_command() is None:
        _missing("kubectl or kustomize is not installed: checkov cannot render the overlays")
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "LOG_LEVEL": "WARNING"}
    common = ["-o", "json", "--compact", "--skip-download"]
    kube = str(KUBE.relative_to(ROOT))
    runs = {
        "kubernetes": [checkov, "-d", kube, "--framework", "kustomize", "secrets", *common],
        "dockerfile": [checkov, "-f", DOCKERFILE, "--framework", "dockerfile", "secrets", *common],
    }
    # Concurrently: each is mostly checkov's import time.
    started = {
        name: subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, command in runs.items()
    }
    reports: list[Doc] = []
    for name, process in started.items():
        out, err = process.communicate(timeout=CHECKOV_TIMEOUT_S)
        assert process.returncode in (0, 1), f"checkov ({name}) failed:\n{err[-3000:]}"
        parsed = json.loads(out)
        reports += parsed if isinstance(parsed, list) else [parsed]

    by_type = {report["check_type"]: report for report in reports}
    assert {"kustomize", "dockerfile"} <= set(by_type), f"checkov scanned only {set(by_type)}"
    # "base:Deployment.lstm-hpo.x" / "overlay:overlays/cpu:Deployment.lstm-hpo.x"
    scanned = {
        check["resource"].rsplit(":", 1)[0]
        for check in by_type["kustomize"]["results"]["passed_checks"]
    }
    assert {"base", "overlay:overlays/cpu", "overlay:overlays/gpu"} <= scanned, scanned

    accepted = _accepted()
    unaccepted: list[str] = []
    matched: set[tuple[str, str]] = set()
    for report in reports:
        for finding in report["results"]["failed_checks"]:
            check = finding["check_id"]
            resource = _finding_resource(report["check_type"], finding)
            if resource in accepted.get(check, {}).get("resources", []):
                matched.add((check, resource))
            else:
                unaccepted.append(
                    f"{check} {finding['check_name']}: {finding['resource']} "
                    f"({finding['file_path']})"
                )
    assert not unaccepted, (
        "checkov findings to fix, or to list with a reason in deploy/checkov-accepted.yaml:\n"
        + "\n".join(sorted(set(unaccepted)))
    )
    stale = {(c, r) for c, entry in accepted.items() for r in entry["resources"]} - matched
    assert not stale, f"accepted but no longer found, remove them: {sorted(stale)}"


# --- Slurm --------------------------------------------------------------------------------


def _directives() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in SBATCH.read_text().splitlines():
        if line.startswith("#SBATCH "):
            option, _, value = line.removeprefix("#SBATCH ").strip().partition("=")
            found[option] = value
    return found


def test_slurm_script_is_valid_bash_with_the_key_directives() -> None:
    done = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    directives = _directives()
    assert "--array" in directives
    assert directives["--gres"] == "gpu:1"
    assert directives["--signal"] == "USR1@120"  # without B: the job steps, i.e. srun's task
    assert "--requeue" in directives
    assert directives["--open-mode"] == "append"  # a requeued task appends to its log
    assert SBATCH.read_text().startswith("#!/bin/bash\n")


@pytest.fixture
def slurm_stubs(tmp_path: Path) -> Path:
    """``srun`` and ``lstm-hpo`` stubs on a PATH of their own: each logs its argv and the
    environment the worker would see."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        '#!/bin/bash\necho "srun $*" >> "$STUB_LOG"\n'
        'while [[ "$1" == --* ]]; do shift; done\nexec "$@"\n'
    )
    (bin_dir / "lstm-hpo").write_text(
        '#!/bin/bash\necho "lstm-hpo $*|$LSTM_HPO_DATABASE_URL|$LSTM_HPO_PREEMPT_GRACE_S'
        '|$CUDA_VISIBLE_DEVICES|$LSTM_HPO_ENV" >> "$STUB_LOG"\n'
    )
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    (tmp_path / "home").mkdir()
    return tmp_path


def _run_sbatch(stubs: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    log = stubs / "calls.log"
    base = {
        "PATH": f"{stubs / 'bin'}:/usr/bin:/bin",
        "HOME": str(stubs / "home"),
        "STUB_LOG": str(log),
        "CUDA_VISIBLE_DEVICES": "3",
        "SLURM_CPUS_PER_TASK": "4",
    }
    done = subprocess.run(
        ["bash", str(SBATCH)],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    calls = log.read_text().splitlines() if log.exists() else []
    return done, calls


def _url_file(stubs: Path, url: str, mode: int) -> Path:
    path = stubs / "home" / ".config" / "lstm-hpo" / "database-url"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(url + "\n")
    path.chmod(mode)
    return path


def test_slurm_script_starts_one_worker_step_on_the_allocated_gpu(slurm_stubs: Path) -> None:
    url = "postgresql+psycopg://lstm:pw@db.internal:5432/lstm_hpo"
    _url_file(slurm_stubs, url, 0o600)
    done, calls = _run_sbatch(slurm_stubs)
    assert done.returncode == 0, done.stderr
    assert calls[0] == "srun --ntasks=1 --cpus-per-task=4 lstm-hpo worker --devices all --threads 4"
    # --devices all: the GPU Slurm named in CUDA_VISIBLE_DEVICES, whatever its index.
    assert calls[1] == f"lstm-hpo worker --devices all --threads 4|{url}|60|3|production"


def test_slurm_script_takes_the_url_from_the_environment_first(slurm_stubs: Path) -> None:
    url = "postgresql+psycopg://lstm:pw@other/lstm_hpo"
    done, calls = _run_sbatch(slurm_stubs, LSTM_HPO_DATABASE_URL=url, LSTM_HPO_PREEMPT_GRACE_S="30")
    assert done.returncode == 0, done.stderr
    assert calls[-1].endswith(f"|{url}|30|3|production")


@pytest.mark.parametrize(
    ("env", "file_mode", "message"),
    [
        ({"LSTM_HPO_DATABASE_URL": "sqlite:////scratch/lstm-hpo.db"}, None, "SQLite"),
        ({"LSTM_HPO_DATABASE_URL": "mysql://u:p@h/db"}, None, "must be a PostgreSQL URL"),
        ({}, None, "LSTM_HPO_DATABASE_URL is not set"),
        ({}, 0o644, "readable by others (mode 644): chmod 600"),
        ({"CUDA_VISIBLE_DEVICES": ""}, 0o600, "no GPU allocated"),
        ({"LSTM_HPO_PREEMPT_GRACE_S": "110"}, 0o600, "grace + 16 s must end before"),
        ({"LSTM_HPO_PREEMPT_GRACE_S": "1m"}, 0o600, "not a number of seconds"),
    ],
    ids=["sqlite", "not-postgres", "no-url", "url-file-readable", "no-gpu", "grace", "grace-unit"],
)
def test_slurm_script_refuses_early(
    slurm_stubs: Path, env: dict[str, str], file_mode: int | None, message: str
) -> None:
    if file_mode is not None:
        _url_file(slurm_stubs, "postgresql+psycopg://lstm:pw@db/lstm_hpo", file_mode)
    done, calls = _run_sbatch(slurm_stubs, **env)
    assert done.returncode == 2
    assert message in done.stderr
    assert calls == [], "nothing may start"


def test_slurm_sqlite_refusal_is_the_services_own_message(slurm_stubs: Path) -> None:
    done, _ = _run_sbatch(slurm_stubs, LSTM_HPO_DATABASE_URL="sqlite:///x.db")
    expected = SingleHostOnly.default_message()
    assert expected and expected in " ".join(done.stderr.split())
