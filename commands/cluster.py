"""`dreamrelation cluster`: run `batch submit` and `train relations` as jobs of a Ray cluster (Ray Jobs API)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from commands.common import fail

cluster_app = typer.Typer(help="Run batch and training jobs on a running Ray cluster (the Ray Jobs API).",
                          no_args_is_help=True)
cluster_submit_app = typer.Typer(help="Submit `batch submit` or `train relations` as a job of a Ray cluster.",
                                 no_args_is_help=True)
cluster_app.add_typer(cluster_submit_app, name="submit")

# every option the `cluster submit` commands do not know goes, in order, to the command run in the job
_FORWARD_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}
JOBS_API = "http://127.0.0.1:8265"  # the dashboard of a Ray started on this machine
ClusterAddress = Annotated[str, typer.Option(
    envvar="RAY_ADDRESS", help="The cluster's Jobs API: the head node's dashboard, http://HEAD:8265.")]
JobId = Annotated[str, typer.Argument(help="Submission id, as printed by `cluster submit`.")]


def _check_job_args(root: typer.core.TyperGroup, command: tuple[str, str], args: list[str]) -> dict:
    """Parse the forwarded arguments as ``dreamrelation <command>`` would, before anything is submitted: a typo
    fails here (exit 2), not minutes later on the cluster. ROOT is the whole CLI (the running context's root
    command). Returns the parsed values."""
    try:  # typer >= 0.2x carries its own copy of click
        from typer._click.exceptions import ClickException
    except ImportError:
        from click.exceptions import ClickException

    cmd = root.commands[command[0]].commands[command[1]]  # type: ignore[attr-defined]
    try:
        with cmd.make_context(f"dreamrelation {' '.join(command)}", list(args)) as ctx:
            return dict(ctx.params)
    except ClickException as exc:
        fail(f"arguments for `dreamrelation {' '.join(command)}` in the job: {exc.format_message()} "
             f"(got {args})")


def _check_job_paths(params: dict, paths: dict[str, tuple[str, str]]) -> None:
    """The job resolves paths on the cluster, inside its copy of the project: a relative input that does not ship
    with the project cannot be found there (exit 2); a relative output would be lost with that copy (a warning)."""
    from cluster.submit import project_root

    root = project_root()
    for key, (option, kind) in paths.items():
        value = params.get(key)
        if not value or "://" in str(value) or Path(str(value)).is_absolute():
            continue
        if kind == "input" and root is not None:
            if not (root / str(value)).exists():
                fail(f"{option} {str(value)!r} is a relative path that does not ship with the project, so the job "
                     "cannot find it on the cluster; give s3://... or an absolute path that every node shares")
            continue  # shipped with the project (e.g. manifests/examples/example.parquet)
        typer.secho(f"warning: {option} {str(value)!r} is a relative path: the job writes it on the cluster, inside "
                    "its copy of the project, which Ray deletes; use s3://... or an absolute path the nodes share",
                    fg=typer.colors.YELLOW, err=True)


def _submit_cluster_job(root: typer.core.TyperGroup, command: tuple[str, str], args: list[str],
                        paths: dict[str, tuple[str, str]], address: str, job_id: Optional[str], wait: bool,
                        timeout: Optional[float], env: Optional[list[str]], python: str) -> None:
    from cluster.submit import ClusterError, check_submission_id, submit_job

    if job_id is not None:
        try:
            check_submission_id(job_id)
        except ValueError as exc:
            fail(f"--job-id: {exc}")
    extra: dict[str, str] = {}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            fail(f"--env must be KEY=VALUE, got {key!r}=... " if sep else f"--env must be KEY=VALUE, got {item!r}")
        from manifests.runtime import is_secret

        if is_secret(key):  # the value is never echoed
            fail(f"--env {key}: secrets never travel in a job's runtime environment (Ray logs it); give the "
                 "cluster's nodes their own credentials (docs/cluster.md)")
        extra[key] = value
    params = _check_job_args(root, command, args)
    if params.get("address") is not None:
        fail(f"--address {params['address']!r} was forwarded to the job; the job always joins the cluster it runs "
             "on (--address auto), and --address of `cluster submit` names that cluster's Jobs API")
    _check_job_paths(params, paths)
    try:
        sid = submit_job(address, [*command, *args], submission_id=job_id, env=extra, python=python)
    except ClusterError as exc:
        fail(str(exc), code=1)
    typer.echo(sid)
    if not wait:
        typer.echo(f"follow it: dreamrelation cluster logs {sid} --follow --address {address}", err=True)
        return
    _follow(address, sid, timeout)


def _follow(address: str, job_id: str, timeout: Optional[float]) -> None:
    """Print the job's logs as they come until it ends; exit 0 when it SUCCEEDED, else 1."""
    from cluster.submit import ClusterError, JobNotFoundError, wait

    try:
        status = wait(address, job_id, timeout=timeout, on_logs=lambda text: typer.echo(text, nl=False))
    except JobNotFoundError as exc:
        fail(str(exc))
    except (ClusterError, TimeoutError) as exc:
        fail(f"{exc} (the job goes on: `dreamrelation cluster stop {job_id}` stops it)", code=1)
    except KeyboardInterrupt:
        typer.echo(f"\nstopped following; the job goes on: dreamrelation cluster stop {job_id} --address {address}",
                   err=True)
        raise typer.Exit(code=130)
    typer.echo(f"job {job_id}: {status}")
    if status != "SUCCEEDED":
        raise typer.Exit(code=1)


def _add_cluster_submit(name: str, command: tuple[str, str], usage: str,
                        paths: dict[str, tuple[str, str]]) -> None:
    """Register `cluster submit NAME`: the job options below, every other argument forwarded to COMMAND (whose
    USAGE starts its arguments; PATHS are its path parameters: name -> (option, "input" | "output"))."""

    def cluster_submit(
        ctx: typer.Context,
        address: ClusterAddress = JOBS_API,
        job_id: Annotated[Optional[str], typer.Option(help="Submission id (default: dreamrelation-<command>-<hash "
                                                           "of the arguments>-<random>).")] = None,
        wait: Annotated[bool, typer.Option(help="Follow the job's logs until it ends; exit 1 unless it "
                                                "SUCCEEDED.")] = False,
        timeout: Annotated[Optional[float], typer.Option(help="With --wait: give up following after this many "
                                                              "seconds (the job goes on).")] = None,
        env: Annotated[Optional[list[str]], typer.Option(help="KEY=VALUE set in the job (repeat); AWS_*, HF_* and "
                                                              "DREAMRELATION_* set here travel anyway.")] = None,
        python: Annotated[str, typer.Option(help="Python on the cluster's nodes that runs the job.")] = "python",
    ) -> None:
        _submit_cluster_job(ctx.find_root().command, command, list(ctx.args), paths, address, job_id, wait, timeout,
                            env, python)

    full = " ".join(command)
    options = [option for option, _ in paths.values()]
    doc = (f"Run `dreamrelation {full} {usage} ...` as a job of the Ray cluster at --address.\n\n"
           f"Every argument not listed below goes verbatim to `{full}` in the job, which joins the cluster.\n\n"
           "The job runs the project shipped from here, and resolves paths on the cluster.\n\n"
           f"Give {', '.join(options[:-1])} and {options[-1]} as s3://... or as absolute paths every node shares.")
    cluster_submit_app.command(name, help=doc, context_settings=_FORWARD_ARGS,
                               options_metavar=f"{usage} [{full.upper()} OPTIONS] [OPTIONS]")(cluster_submit)


_add_cluster_submit("batch", ("batch", "submit"), "MANIFEST", {
    "manifest": ("MANIFEST", "input"), "output": ("--output", "output"), "loras": ("--loras", "input")})
_add_cluster_submit("train", ("train", "relations"), "DATA --relations IDS", {
    "data": ("DATA", "input"), "output": ("--output", "output"), "loras": ("--loras", "output")})


@cluster_app.command("status")
def cluster_status(job: JobId, address: ClusterAddress = JOBS_API) -> None:
    """Print the job's status as JSON (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED); exit 1 when it FAILED."""
    from cluster.submit import ClusterError, JobNotFoundError, job_status

    try:
        st = job_status(address, job)
    except JobNotFoundError as exc:
        fail(str(exc))
    except ClusterError as exc:
        fail(str(exc), code=1)
    typer.echo(json.dumps(st, indent=2))
    if st["status"] == "FAILED":
        raise typer.Exit(code=1)


@cluster_app.command("logs")
def cluster_logs(
    job: JobId,
    address: ClusterAddress = JOBS_API,
    follow: Annotated[bool, typer.Option(help="Keep printing until the job ends; exit 1 unless it "
                                              "SUCCEEDED.")] = False,
) -> None:
    """Print what the job's command printed (stdout and stderr)."""
    if follow:
        _follow(address, job, None)
        return
    from cluster.submit import ClusterError, JobNotFoundError, job_logs

    try:
        typer.echo(job_logs(address, job), nl=False)
    except JobNotFoundError as exc:
        fail(str(exc))
    except ClusterError as exc:
        fail(str(exc), code=1)


@cluster_app.command("stop")
def cluster_stop(job: JobId, address: ClusterAddress = JOBS_API) -> None:
    """Stop the job (SIGTERM, then SIGKILL); a batch job resumes where it stopped when submitted again."""
    from cluster.submit import ClusterError, JobNotFoundError, job_status, stop_job

    try:
        stopped = stop_job(address, job)
        status = job_status(address, job)["status"]
    except JobNotFoundError as exc:
        fail(str(exc))
    except ClusterError as exc:
        fail(str(exc), code=1)
    typer.echo(f"job {job}: stop requested ({status})" if stopped else f"job {job} was not running ({status})")
