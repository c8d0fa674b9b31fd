"""Submit batch and training jobs to a running Ray cluster through the Ray Jobs API (the dashboard, port 8265).

A job is a shell command that Ray runs on the cluster: here always the project's own command line,
``python -m cli batch submit ...`` or ``python -m cli train relations ...``, with ``--address auto`` appended so the
command joins the cluster it runs on instead of starting a Ray of its own. ``python -m cli`` rather than the
``dreamrelation`` console script, because the script exists only where the project is pip-installed.

The runtime environment ships this checkout of the project as the job's ``working_dir`` (without .venv, .git,
outputs, tests and caches: under 1 MB), so the job, its Ray Data actors and its Tune trials run the submitter's code
even when the cluster's image holds another version. It does not install dependencies: the cluster's Python must
already hold torch, diffusers and ray (the images and setup commands in ``cluster/configs/`` do).

The ``AWS_*``, ``DREAMRELATION_*`` and ``HF_*`` settings set where you submit travel with the job
(``runtime_env["env_vars"]``), so S3 endpoints and regions reach every worker; never a secret (access keys, session
tokens, ``HF_TOKEN``: ``manifests.runtime.is_secret``), since Ray writes runtime environments into its logs and
shows them in its dashboard: the nodes bring their own credentials (instance roles, IRSA, a mounted credentials
file; docs/cluster.md). Not those that name local files either (``AWS_CA_BUNDLE``, ...); ``DREAMRELATION_HOME``
travels as is, so point it where the nodes can write.

Paths in the job's arguments are resolved on the cluster: a relative path lands in the job's copy of the project
(which Ray deletes), so outputs belong on shared storage (``s3://...``) or an absolute path every node sees.

Plain functions over :class:`ray.job_submission.JobSubmissionClient`; the job command is only text, so this module
never imports ``batch`` (ARCHITECTURE.md, layering).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from manifests.runtime import forwarded_env, is_secret

logger = logging.getLogger(__name__)

# forwarded variables that name files on the submitting machine: the cluster's nodes do not have them (pass them with env=)
LOCAL_FILE_VARS = frozenset({"AWS_CA_BUNDLE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
                             "AWS_WEB_IDENTITY_TOKEN_FILE"})
# gitignore-style patterns of what the job does not need (Ray also honours the project's .gitignore); a leading
# "/" anchors at the project root, and no trailing "/" so that a whole folder is skipped without being walked
SHIP_EXCLUDES = ("/.venv", "/.ci-venv", "/.git", "/.whl", "/outputs", "/models", "/tests", "/.pytest_cache",
                 "/.ruff_cache", "/.ci-home", "/.ci-out", "/build", "/dist", "*.egg-info", "__pycache__", "*.pyc")
# commands that run on Ray and take --address: inside a job they join the cluster with "auto"
CLUSTER_COMMANDS = {("batch", "submit"), ("train", "relations")}
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ClusterError(RuntimeError):
    """The cluster could not be reached or refused a request; the message names the address."""


class JobNotFoundError(ClusterError):
    """No job with that submission id on the cluster."""


def project_root() -> Path | None:
    """The source checkout this module runs from (it holds cli.py and pyproject.toml), or None when the project
    is installed as a package: then nothing is shipped and the cluster must have the project installed."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "cli.py").is_file() and (root / "pyproject.toml").is_file() else None


def job_command(command_args: Sequence[str]) -> list[str]:
    """``dreamrelation`` arguments -> the argv the job runs: ``--address auto`` added to the Ray commands."""
    args = [str(a) for a in command_args]
    if not args:
        raise ValueError("command_args must name a dreamrelation command, e.g. ['batch', 'submit', 'm.parquet']")
    if tuple(args[:2]) in CLUSTER_COMMANDS and not any(a == "--address" or a.startswith("--address=")
                                                       for a in args[2:]):
        args += ["--address", "auto"]
    return args


def entrypoint(command_args: Sequence[str], python: str = "python") -> str:
    """The shell command of the job: the project's CLI as a module of the shipped working_dir."""
    return shlex.join([python, "-m", "cli", *job_command(command_args)])


def make_submission_id(command_args: Sequence[str]) -> str:
    """``dreamrelation-<command>-<hash of the arguments>-<random>``: the same arguments share the middle part, so
    the dashboard groups reruns of one job; the random tail keeps every submission unique (Ray requires it)."""
    args = [str(a) for a in command_args]
    digest = hashlib.sha1(json.dumps(args).encode()).hexdigest()[:8]
    kind = re.sub(r"[^a-z0-9]", "", args[0].lower()) if args else "job"
    return f"dreamrelation-{kind or 'job'}-{digest}-{secrets.token_hex(3)}"


def make_runtime_env(runtime_env: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                     ship_project: bool = True) -> dict[str, Any]:
    """The job's runtime environment: the project as ``working_dir`` (unless the caller set one), and the
    forwarded variables of this process, then ``runtime_env["env_vars"]``, then ``env`` (later ones win)."""
    rt: dict[str, Any] = dict(runtime_env or {})
    root = project_root()
    if ship_project and root is not None and "working_dir" not in rt:
        rt["working_dir"] = str(root)
        rt["excludes"] = [*SHIP_EXCLUDES, *rt.get("excludes", [])]
    env_vars = {k: v for k, v in forwarded_env().items() if k not in LOCAL_FILE_VARS}
    env_vars.update(rt.get("env_vars") or {})
    env_vars.update(env or {})
    secret = sorted(k for k in env_vars if is_secret(k))
    if secret:
        raise ValueError(f"secrets never travel in a job's runtime environment (Ray logs it): {', '.join(secret)}; "
                         f"give the cluster's nodes their own credentials (docs/cluster.md)")
    rt["env_vars"] = {str(k): str(v) for k, v in env_vars.items()}
    return rt


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(f"cannot reach the Ray Jobs API at {address!r} (the head node's dashboard, port 8265 "
                           f"by default; is the cluster up and the port forwarded?): {exc}") from exc


def _call(address: str, job_id: str | None, fn: Callable[[], Any]) -> Any:
    """Run one request; Ray's bare RuntimeError / ConnectionError become errors that name the address and job."""
    try:
        return fn()
    except ConnectionError as exc:
        raise ClusterError(f"lost the Ray Jobs API at {address!r}: {exc}") from exc
    except RuntimeError as exc:
        if job_id is not None and ("404" in str(exc) or "does not exist" in str(exc)):
            raise JobNotFoundError(f"no job {job_id!r} on the Ray cluster at {address!r}") from exc
        raise ClusterError(f"the Ray cluster at {address!r} refused the request"
                           f"{f' for job {job_id!r}' if job_id else ''}: {exc}") from exc


def check_submission_id(submission_id: str) -> str:
    """A submission id travels in URLs of the Jobs API: letters, digits, ``_``, ``.`` and ``-`` only."""
    if not _JOB_ID.match(submission_id):
        raise ValueError(f"submission_id must be 1-128 letters, digits, '_', '.' or '-' (starting with a letter or "
                         f"digit), got {submission_id!r}")
    return submission_id


def submit_job(address: str, command_args: Sequence[str], runtime_env: Mapping[str, Any] | None = None,
               submission_id: str | None = None, env: Mapping[str, str] | None = None,
               python: str = "python") -> str:
    """Submit ``dreamrelation <command_args>`` as a job of the cluster at ``address``; returns the submission id.

    ``command_args`` are the CLI arguments after ``dreamrelation`` (e.g. ``["batch", "submit", "s3://b/m.parquet",
    "--output", "s3://b/run1"]``); paths in them are resolved on the cluster.
    """
    args = [str(a) for a in command_args]
    job_id = make_submission_id(args) if submission_id is None else check_submission_id(submission_id)
    rt = make_runtime_env(runtime_env, env)
    client = _client(address)
    command = entrypoint(args, python=python)
    logger.info("submitting %s to %s: %s", job_id, address, command)
    metadata = {"project": "dreamrelation", "command": " ".join(args[:2])}
    return _call(address, None, lambda: client.submit_job(entrypoint=command, submission_id=job_id,
                                                          runtime_env=rt, metadata=metadata))


def _iso(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds")


def job_status(address: str, job_id: str) -> dict[str, Any]:
    """The job's status (PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED), message, times and entrypoint."""
    client = _client(address)
    info = _call(address, job_id, lambda: client.get_job_info(job_id))
    start, end = info.start_time, info.end_time
    return {
        "submission_id": info.submission_id or job_id,
        "status": str(info.status.value if hasattr(info.status, "value") else info.status),
        "message": info.message,
        "error_type": info.error_type,
        "driver_exit_code": info.driver_exit_code,
        "start_time": _iso(start),
        "end_time": _iso(end),
        "seconds": round((end - start) / 1000, 3) if start and end else None,
        "entrypoint": info.entrypoint,
        "address": address,
    }


def job_logs(address: str, job_id: str) -> str:
    """Everything the job's command printed so far (stdout and stderr)."""
    client = _client(address)
    return _call(address, job_id, lambda: client.get_job_logs(job_id))


def stop_job(address: str, job_id: str) -> bool:
    """Ask the cluster to stop the job (SIGTERM, then SIGKILL); True when it was still running."""
    client = _client(address)
    return bool(_call(address, job_id, lambda: client.stop_job(job_id)))


def wait(address: str, job_id: str, timeout: float | None = None, poll: float = 2.0,
         on_logs: Callable[[str], None] | None = None) -> str:
    """Poll until the job ends; returns its final status. ``on_logs`` receives each new piece of the logs as it
    appears (follow mode). Raises :class:`TimeoutError` after ``timeout`` seconds; the job goes on."""
    client = _client(address)
    deadline = None if timeout is None else time.monotonic() + timeout
    seen = 0
    while True:
        status = str(_call(address, job_id, lambda: client.get_job_status(job_id)).value)
        if on_logs is not None:
            logs = _call(address, job_id, lambda: client.get_job_logs(job_id))
            if len(logs) > seen:
                on_logs(logs[seen:])
                seen = len(logs)
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id!r} on {address!r} is still {status} after {timeout} s")
        time.sleep(poll)
