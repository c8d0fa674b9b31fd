"""``dreamrelation cluster submit|status|logs|stop`` against a real Ray cluster: a head (``ray start --head`` on
127.0.0.1, with the dashboard's Jobs API) and a worker node, started for this module and torn down after it.

The cluster is this module's own: its own temp dir and ports, processes started in new sessions and tagged with an
environment variable, and a teardown that kills exactly those processes. ``ray stop`` is never called: it kills
every Ray on the machine, the session's in-process ``ray_local`` cluster included.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import invoke  # noqa: F401  (the `runner` fixture comes from conftest)

from cluster import submit
from manifests.io import read_manifest, write_manifest
from manifests.ledger import ledger_records

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_REL = "manifests/examples/example.parquet"  # relative: the job finds it in the project it was shipped
MARKER = "DR_TEST_RAY_CLUSTER"  # set in the env of every process of the test cluster (inherited by workers)
ID_RE = re.compile(r"^dreamrelation-batch-[0-9a-f]{8}-[0-9a-f]{6}$")


# ---- the cluster -----------------------------------------------------------------------------------------------------
@dataclass
class LocalCluster:
    address: str  # the Jobs API (dashboard)
    gcs: str
    temp: str
    sessions: list[int]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    """Ports of one node's agents, picked free: two raylets on one machine (and the session's in-process Ray)
    would otherwise share the defaults; worker ports 0 = random, never the default 10002-19999 range."""
    return ["--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
            "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
            "--min-worker-port", "0", "--max-worker-port", "0"]


def cluster_pids(cluster: LocalCluster) -> list[int]:
    """Live (non-zombie) processes of this cluster: in the sessions `ray start` began, or carrying its marker
    (job drivers run in sessions of their own)."""
    tag = f"{MARKER}={cluster.temp}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
            if fields[0] == "Z":
                continue
            mine = int(fields[3]) in cluster.sessions
            if not mine:
                mine = tag in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if mine:
            pids.append(int(entry))
    return pids


def _kill_cluster(cluster: LocalCluster) -> None:
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        for pid in cluster_pids(cluster):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while cluster_pids(cluster) and time.time() < deadline:
            time.sleep(0.2)
        if not cluster_pids(cluster):
            return


def _ray_start(args: list[str], env: dict, cluster: LocalCluster) -> None:
    ray = Path(sys.executable).with_name("ray")
    proc = subprocess.Popen([str(ray) if ray.exists() else "ray", "start", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    cluster.sessions.append(proc.pid)  # the processes it leaves behind keep its session id
    out, _ = proc.communicate(timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"ray start {' '.join(args)} failed:\n{out[-3000:]}")


@pytest.fixture(scope="module")
def ray_cluster(tiny_dir) -> LocalCluster:
    """A head and a worker node (2 CPUs each) on 127.0.0.1; the tiny model is prebuilt in DREAMRELATION_HOME."""
    temp = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs_port, dash_port = _free_port(), _free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", **{MARKER: temp},
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")  # `python` of the job
    env.pop("RAY_ADDRESS", None)
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--temp-dir", temp,
              "--object-store-memory", str(256 * 2**20), "--disable-usage-stats"]
    cluster = LocalCluster(address=f"http://127.0.0.1:{dash_port}", gcs=f"127.0.0.1:{gcs_port}", temp=temp,
                           sessions=[])
    try:
        _ray_start(["--head", "--port", str(gcs_port), "--dashboard-host", "127.0.0.1", "--dashboard-port",
                    str(dash_port), "--include-dashboard", "true", "--ray-client-server-port", str(_free_port()),
                    *common, *_node_ports()], env, cluster)
        _ray_start(["--address", cluster.gcs, *common, *_node_ports()], env, cluster)
        _wait_for_jobs_api(cluster.address)
        yield cluster
    finally:
        _kill_cluster(cluster)
        left = cluster_pids(cluster)
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"processes of the test cluster survived its teardown: {left}"


def _wait_for_jobs_api(address: str, nodes: int = 2, timeout: float = 60) -> None:
    """Until the Jobs API answers and the state API lists ``nodes`` alive nodes (the worker joined)."""
    import requests

    deadline = time.time() + timeout
    alive = None
    while True:
        try:
            if requests.get(f"{address}/api/jobs/", timeout=5).status_code == 200:
                listed = requests.get(f"{address}/api/v0/nodes", timeout=5).json()["data"]["result"]["result"]
                alive = sum(n["state"] == "ALIVE" for n in listed)
                if alive == nodes:
                    return
        except (requests.RequestException, KeyError, TypeError, ValueError):
            pass
        if time.time() > deadline:
            raise RuntimeError(f"the cluster at {address} did not come up within {timeout} s ({alive} nodes alive)")
        time.sleep(0.5)


# ---- without a cluster: the job command, the runtime environment, errors -------------------------------------------
def test_job_command_joins_the_cluster_and_runs_the_shipped_cli():
    assert submit.job_command(["batch", "submit", "m.parquet"]) == ["batch", "submit", "m.parquet", "--address",
                                                                     "auto"]
    assert submit.job_command(["train", "relations", "d", "--relations", "hugging", "--address", "x:1"])[-1] == "x:1"
    assert submit.job_command(["manifest", "validate", "m.parquet"]) == ["manifest", "validate", "m.parquet"]
    assert submit.entrypoint(["batch", "submit", "s3://b/my m.parquet"]) == \
        "python -m cli batch submit 's3://b/my m.parquet' --address auto"
    a, b = submit.make_submission_id(["batch", "submit", "m"]), submit.make_submission_id(["batch", "submit", "m"])
    assert ID_RE.match(a) and a != b and a.rsplit("-", 1)[0] == b.rsplit("-", 1)[0]
    with pytest.raises(ValueError, match="submission_id"):
        submit.check_submission_id("no spaces/or slashes")


def test_runtime_env_ships_the_project_and_forwards_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_CA_BUNDLE", "/only/here.pem")
    monkeypatch.setenv("HF_TOKEN", "t")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("UNRELATED", "x")
    rt = submit.make_runtime_env(env={"EXTRA": "1"})
    assert rt["working_dir"] == str(ROOT)
    assert {"/.venv", "/.git", "/tests", "/outputs"} <= set(rt["excludes"])
    env = rt["env_vars"]
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000" and env["EXTRA"] == "1"
    assert env["DREAMRELATION_HOME"] == os.environ["DREAMRELATION_HOME"]
    assert not {"AWS_CA_BUNDLE", "UNRELATED", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"} & set(env)
    with pytest.raises(ValueError, match="secrets never travel.*AWS_SESSION_TOKEN"):
        submit.make_runtime_env(env={"AWS_SESSION_TOKEN": "x"})
    # the package Ray uploads (built here by Ray's own packager, pinned Ray) holds the code and the example
    # manifest with its LoRAs, and no venv, git history or tests
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    package = tmp_path / "pkg.zip"
    create_package(rt["working_dir"], package, include_gitignore=True, excludes=rt["excludes"])
    with zipfile.ZipFile(package) as z:
        names = {i.filename for i in z.infolist() if not i.is_dir()}
    assert {"cli.py", "commands/batch.py", "commands/train.py", "cluster/submit.py", "batch/job.py",
            EXAMPLE_REL} <= names
    assert any(n.startswith("manifests/examples/loras/") for n in names)
    assert not any(n.startswith((".venv/", ".git/", "tests/")) or "__pycache__" in n for n in names)
    assert package.stat().st_size < 20 * 2**20


def test_bad_arguments_fail_before_anything_is_submitted(runner, tmp_path):
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens: a submission would fail with exit 1
    r = invoke(runner, "cluster", "submit", "batch", EXAMPLE_REL, "--ouput", tmp_path, "--address", dead)
    assert r.exit_code == 2 and "--ouput" in r.output and "batch submit" in r.output
    r = invoke(runner, "cluster", "submit", "train", "--relations", "hugging", "--address", dead)
    assert r.exit_code == 2 and "Missing argument" in r.output
    r = invoke(runner, "cluster", "submit", "batch", "not-shipped.parquet", "--output", tmp_path, "--address", dead)
    assert r.exit_code == 2 and "'not-shipped.parquet' is a relative path" in r.output
    r = invoke(runner, "cluster", "submit", "batch", EXAMPLE_REL, "--job-id", "a b", "--address", dead)
    assert r.exit_code == 2 and "--job-id" in r.output
    r = invoke(runner, "cluster", "submit", "batch", EXAMPLE_REL, "--env", "NOEQUALS", "--address", dead)
    assert r.exit_code == 2 and "--env must be KEY=VALUE" in r.output


def test_an_unreachable_cluster_is_named(runner, tmp_path):
    dead = f"http://127.0.0.1:{_free_port()}"
    for args in (["status", "some-job"], ["logs", "some-job"], ["stop", "some-job"],
                 ["submit", "batch", EXAMPLE_REL, "--output", tmp_path]):
        r = invoke(runner, "cluster", *args, "--address", dead)
        assert r.exit_code == 1, (args, r.output)
        assert f"cannot reach the Ray Jobs API at '{dead}'" in r.output


# ---- on the cluster ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.ray
def test_batch_job_runs_on_the_cluster_to_completion(ray_cluster, runner, tmp_path):
    out = tmp_path / "out"
    r = invoke(runner, "cluster", "submit", "batch", EXAMPLE_REL, "--preset", "tiny", "--actors", "2",
               "--output", out, "--no-metrics", "--address", ray_cluster.address, "--wait", "--timeout", 300)
    assert r.exit_code == 0, r.output
    job = r.stdout.splitlines()[0]
    assert ID_RE.match(job), r.stdout
    assert "read 18  rejected 0  skipped 0  generated 18 rows (ok 18, error 0)  images 24" in r.stdout  # the logs
    assert f"job {job}: SUCCEEDED" in r.stdout

    run = json.loads((out / "run.json").read_text())
    assert run["rows"] == {"read": 18, "ok": 18, "error": 0, "rejected": 0, "pending": 0} and run["images"] == 24
    assert run["execution"]["address"] == "auto"  # joined the cluster it was submitted to
    results = ledger_records(str(out))
    expected = sorted(row.row_id for row in read_manifest(str(ROOT / EXAMPLE_REL))[0])
    assert sorted(x["row_id"] for x in results) == expected
    assert all(x["status"] == "ok" and all(Path(u).is_file() for u in x["images"]) for x in results)
    assert (out / "report.html").is_file()

    r = invoke(runner, "cluster", "status", job, "--address", ray_cluster.address)
    assert r.exit_code == 0, r.output
    st = json.loads(r.stdout)
    assert st["status"] == "SUCCEEDED" and st["driver_exit_code"] == 0 and st["seconds"] > 0
    assert st["entrypoint"].startswith("python -m cli batch submit manifests/examples/example.parquet")
    assert st["entrypoint"].endswith("--address auto")
    r = invoke(runner, "cluster", "logs", job, "--address", ray_cluster.address)
    assert r.exit_code == 0 and "ok 18, error 0" in r.stdout and "report: " in r.stdout


@pytest.mark.slow
@pytest.mark.ray
def test_a_failing_job_reports_its_failure_and_logs(ray_cluster, runner, tmp_path):
    missing = tmp_path / "absent.parquet"
    r = invoke(runner, "cluster", "submit", "batch", missing, "--output", tmp_path / "out", "--job-id",
               "dr-test-missing-manifest", "--address", ray_cluster.address)
    assert r.exit_code == 0, r.output
    job = r.stdout.strip()
    assert job == "dr-test-missing-manifest"
    assert submit.wait(ray_cluster.address, job, timeout=120, poll=0.5) == "FAILED"

    r = invoke(runner, "cluster", "status", job, "--address", ray_cluster.address)
    assert r.exit_code == 1
    st = json.loads(r.stdout)
    assert st["status"] == "FAILED" and st["driver_exit_code"] == 2, st
    r = invoke(runner, "cluster", "logs", job, "--address", ray_cluster.address)
    assert r.exit_code == 0
    assert f"error: manifest {missing}: not found" in r.stdout

    # the same id again is refused; an unknown id is bad input
    r = invoke(runner, "cluster", "submit", "batch", missing, "--output", tmp_path / "out", "--job-id", job,
               "--address", ray_cluster.address)
    assert r.exit_code == 1 and job in r.output
    r = invoke(runner, "cluster", "status", "dr-no-such-job", "--address", ray_cluster.address)
    assert r.exit_code == 2 and "no job 'dr-no-such-job'" in r.output


@pytest.mark.slow
@pytest.mark.ray
def test_stop_ends_a_long_job(ray_cluster, runner, tmp_path):
    base, _ = read_manifest(str(ROOT / EXAMPLE_REL))
    rows = [base[i % len(base)].model_copy(update={"row_id": f"long-{i:03d}", "steps": 50, "seed": 7000 + i})
            for i in range(200)]
    manifest = tmp_path / "long.parquet"
    write_manifest(rows, str(manifest))
    r = invoke(runner, "cluster", "submit", "batch", manifest, "--output", tmp_path / "out", "--no-metrics",
               "--loras", ROOT / "manifests" / "examples" / "loras", "--address", ray_cluster.address)
    assert r.exit_code == 0, r.output
    job = r.stdout.strip()
    deadline = time.time() + 120
    while submit.job_status(ray_cluster.address, job)["status"] == "PENDING" and time.time() < deadline:
        time.sleep(0.5)
    assert submit.job_status(ray_cluster.address, job)["status"] == "RUNNING"
    time.sleep(3)  # let the driver start Ray Data

    r = invoke(runner, "cluster", "stop", job, "--address", ray_cluster.address)
    assert r.exit_code == 0 and "stop requested" in r.stdout, r.output
    assert submit.wait(ray_cluster.address, job, timeout=60, poll=0.5) == "STOPPED"
    r = invoke(runner, "cluster", "status", job, "--address", ray_cluster.address)
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "STOPPED"
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["status"] in ("interrupted", "running") and run["rows"].get("pending", 1) > 0  # not to its end
    r = invoke(runner, "cluster", "stop", job, "--address", ray_cluster.address)
    assert r.exit_code == 0 and "was not running (STOPPED)" in r.stdout
