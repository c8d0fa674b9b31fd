"""The cluster configs (``cluster/configs``) and docs/cluster.md: every YAML parses, GPUs are asked for where the
work runs and not on the head, the pinned torch and the project are installed, and every ``dreamrelation`` command in
them is one the CLI accepts.

Commands are checked without running anything: each is split like a shell would split it, walked down the real
click command tree (``typer.main.get_command(cli.app)``) and parsed with ``make_context``, which raises a
``UsageError`` for an unknown command or option, a missing argument or a value of the wrong type (``NoSuchOption``,
``MissingParameter`` and ``BadParameter`` are UsageErrors). Recent typer vendors click as ``typer._click``, whose
exception classes are not ``click``'s: they are taken from whichever click typer uses.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest
import typer.main
import yaml

import cli

try:  # typer >= 0.2x: its own copy of click
    from typer._click import exceptions as click
except ImportError:  # older typer: click itself
    from click import exceptions as click

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "cluster" / "configs"
AWS = CONFIGS / "aws-gpu.yaml"
KUBERAY = CONFIGS / "kuberay"
DOCKERFILE = CONFIGS / "Dockerfile"
DOCS = ROOT / "docs" / "cluster.md"

# The fields of the KubeRay ray.io/v1 types that these manifests may use (a typo is otherwise silently ignored
# by nothing but the API server). From ray-operator/apis/ray/v1/{rayjob,raycluster}_types.go.
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
               "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
               "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend"}
RAYCLUSTER_SPEC = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
                   "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions", "authOptions"}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "numOfHosts",
                "rayStartParams", "template", "scaleStrategy", "suspend"}
AUTOSCALER_OPTIONS = {"resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts", "securityContext",
                      "idleTimeoutSeconds", "upscalingMode", "version"}


# --- reading the configs --------------------------------------------------------------------------------------------

def yaml_files() -> list[Path]:
    return sorted(p for p in CONFIGS.rglob("*") if p.suffix in (".yaml", ".yml"))


def documents(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kuberay_objects(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p in yaml_files() if KUBERAY in p.parents for d in documents(p) if d.get("kind") == kind]


def strings(node: Any) -> Iterator[str]:
    """Every string value in a parsed YAML document (keys excluded)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayClusterSpec) of the RayCluster and of every RayJob that brings its own cluster."""
    specs = [(f"RayCluster {d['metadata']['name']}", d["spec"]) for _, d in kuberay_objects("RayCluster")]
    specs += [(f"RayJob {d['metadata']['name']}", d["spec"]["rayClusterSpec"])
              for _, d in kuberay_objects("RayJob") if "rayClusterSpec" in d["spec"]]
    return specs


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def gpus(container: dict, part: str = "limits") -> int:
    return int(container.get("resources", {}).get(part, {}).get("nvidia.com/gpu", 0))


# --- finding commands in shell text ---------------------------------------------------------------------------------

_OPERATOR = re.compile(r"^[();<>|&]+$")


def _words(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def dreamrelation_commands(text: str) -> list[list[str]]:
    """The ``dreamrelation ...`` commands in shell text, each as its argv (starting with ``dreamrelation``).

    Backslash-newlines join lines; each line is split at ``&& || ; |`` into simple commands. A simple command counts
    when its first word is ``dreamrelation`` or when ``dreamrelation`` follows ``--`` (``ray job submit ... --
    dreamrelation ...``); a quoted argument that is itself such a command (``ray exec CFG 'dreamrelation ...'``)
    counts too. ``pip install dreamrelation`` does not.
    """
    found: list[list[str]] = []
    for line in text.replace("\\\n", " ").splitlines():
        try:
            words = _words(line)
        except ValueError:  # not shell (prose with an apostrophe): no command here
            continue
        simple: list[list[str]] = [[]]
        for word in words:
            if _OPERATOR.match(word):
                simple.append([])
            else:
                simple[-1].append(word)
        for argv in simple:
            for i, word in enumerate(argv):
                # a lone `dreamrelation` is a name (metadata.name, serviceAccountName), not a command
                if word == "dreamrelation" and (i == 0 or argv[i - 1] == "--") and len(argv) > i + 1:
                    found.append(argv[i:])
                    break
                if word.startswith("dreamrelation ") and i > 0:
                    found.extend(dreamrelation_commands(word))
    return found


def check_command(argv: list[str]):
    """Parse ``argv`` with the real CLI without running it: the command's click context, or ``click.UsageError``
    (any of its subclasses) where the CLI would refuse it."""
    assert argv[0] == "dreamrelation", argv
    command = typer.main.get_command(cli.app)
    path, args = ["dreamrelation"], list(argv[1:])
    while hasattr(command, "get_command"):  # a group: walk to the named subcommand
        if not args or args[0].startswith("-"):
            raise click.UsageError(f"{' '.join(path)} needs a command, got {args}")
        name, args = args[0], args[1:]
        sub = command.get_command(command.context_class(command, info_name=path[-1]), name)
        if sub is None:
            raise click.UsageError(f"no such command: {' '.join(path + [name])}")
        command, path = sub, path + [name]
    return command.make_context(" ".join(path), args, resilient_parsing=False)


def config_commands() -> list[tuple[str, list[str]]]:
    """(file, argv) of every dreamrelation command in the YAMLs: RayJob entrypoints, setup and start commands."""
    return [(str(p.relative_to(ROOT)), argv) for p in yaml_files() for d in documents(p)
            for s in strings(d) for argv in dreamrelation_commands(s)]


def docs_commands() -> list[list[str]]:
    """Every dreamrelation command in the fenced code blocks of docs/cluster.md, docs/scaling.md and README.md."""
    out = []
    for doc in (DOCS, ROOT / "docs" / "scaling.md", ROOT / "README.md"):
        blocks = re.findall(r"^```[a-z]*\n(.*?)^```", doc.read_text(), flags=re.S | re.M)
        out += [argv for block in blocks for argv in dreamrelation_commands(block)]
    return out


def entrypoints() -> dict:
    """RayJob name -> the parsed context of its entrypoint."""
    out = {}
    for _, job in kuberay_objects("RayJob"):
        (argv,) = dreamrelation_commands(job["spec"]["entrypoint"])
        out[job["metadata"]["name"]] = check_command(argv)
    return out


def _id(item: tuple[str, list[str]]) -> str:
    return f"{item[0]}:{' '.join(item[1][:3])}"


# --- every file parses ----------------------------------------------------------------------------------------------

def test_the_configs_exist():
    names = {str(p.relative_to(CONFIGS)) for p in yaml_files()}
    assert {"aws-gpu.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob-batch.yaml", "kuberay/rayjob-train.yaml",
            "kuberay/serviceaccount.yaml"} <= names
    assert DOCKERFILE.is_file() and DOCS.is_file()


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_yaml_parses(path: Path):
    docs = documents(path)
    assert docs, f"{path} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is a {type(doc).__name__}, not a mapping"
        if KUBERAY in path.parents:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path}: not a Kubernetes object"


def test_aws_config_passes_rays_own_validation():
    """The schema check `ray up` runs (ray.autoscaler's, so it follows the pinned Ray)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(documents(AWS)[0])))


def test_kuberay_manifests_use_only_known_fields():
    for path, job in kuberay_objects("RayJob"):
        assert job["apiVersion"] == "ray.io/v1"
        assert set(job["spec"]) <= RAYJOB_SPEC, f"{path}: unknown RayJob fields {set(job['spec']) - RAYJOB_SPEC}"
        assert ("rayClusterSpec" in job["spec"]) != ("clusterSelector" in job["spec"]), \
            f"{path}: a RayJob needs exactly one of rayClusterSpec and clusterSelector"
    for _, cluster in kuberay_objects("RayCluster"):
        assert cluster["apiVersion"] == "ray.io/v1"
    for where, spec in cluster_specs():
        assert set(spec) <= RAYCLUSTER_SPEC, f"{where}: unknown fields {set(spec) - RAYCLUSTER_SPEC}"
        assert set(spec["headGroupSpec"]) <= HEAD_GROUP, where
        assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS, where
        for group in spec["workerGroupSpecs"]:
            assert set(group) <= WORKER_GROUP, f"{where}: unknown worker group fields {set(group) - WORKER_GROUP}"


# --- GPUs where the work runs, none on the head ---------------------------------------------------------------------

def test_aws_gpu_workers_ask_for_gpus_and_the_head_for_nothing():
    config = documents(AWS)[0]
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU"), \
        "the head must advertise no CPU (and no GPU) so that no generation is scheduled there"
    assert any("--num-cpus=0" in c for c in config["head_start_ray_commands"])
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers
    for name, node_type in workers.items():
        assert node_type["resources"].get("GPU", 0) >= 1, f"{name} asks for no GPU"
        assert node_type["min_workers"] == 0 < node_type["max_workers"] <= config["max_workers"], name
    for node_type in types.values():  # S3 access by instance profile, never by keys in the file
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")


def test_kuberay_worker_groups_ask_for_gpus_and_the_heads_for_none():
    specs = cluster_specs()
    assert {w.split()[0] for w, _ in specs} == {"RayCluster", "RayJob"}
    for where, spec in specs:
        head = spec["headGroupSpec"]
        assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: the head must advertise no CPU"
        assert all(gpus(c) == gpus(c, "requests") == 0 for c in containers(head)), where
        assert spec["enableInTreeAutoscaling"] is True, where
        assert spec["workerGroupSpecs"], where
        for group in spec["workerGroupSpecs"]:
            assert all(gpus(c) >= 1 for c in containers(group)), f"{where} {group['groupName']}: no GPU limit"
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], where
            assert group["maxReplicas"] >= 1, where


def test_every_pod_uses_the_s3_service_account_and_no_key_is_written_down():
    (account,) = [d for _, d in kuberay_objects("ServiceAccount")]
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    images = set()
    for where, spec in cluster_specs():
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            assert group["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"], where
            images.update(c["image"] for c in containers(group))
    assert len(images) == 1, f"one image everywhere, got {images}"
    for path in yaml_files():
        text = path.read_text()
        assert not re.search(r"AWS_SECRET_ACCESS_KEY\s*[:=]\s*\S|aws_secret_access_key|AKIA[0-9A-Z]{16}", text), \
            f"{path} holds an S3 key"


# --- the pinned torch (CUDA build) first, then the project ----------------------------------------------------------

def torch_pin() -> str:
    """The torch version the README and CI pin (``pip install torch==X``)."""
    pins = set(re.findall(r"torch==([0-9][0-9A-Za-z.+]*)", (ROOT / "README.md").read_text()))
    ci = ROOT / ".ci" / "run"
    if ci.is_file():
        pins |= set(re.findall(r"torch==([0-9][0-9A-Za-z.+]*)", ci.read_text()))
    assert len(pins) == 1, f"README and .ci/run pin torch once, got {pins}"
    return pins.pop()


def _install_order(lines: list[str], where: str) -> None:
    """torch==PIN from a CUDA index, then the project, in that order (the project's torch>=2.4 takes what is there)."""
    pin = torch_pin()
    torch_at = [i for i, c in enumerate(lines) if re.search(rf"pip install .*torch=={re.escape(pin)}(\s|$)", c)]
    assert torch_at, f"{where}: no `pip install torch=={pin}`"
    assert re.search(r"download\.pytorch\.org/whl/cu\d+", "\n".join(lines)), f"{where}: torch is not a CUDA build"
    project_at = [i for i, c in enumerate(lines)
                  if re.search(r"pip install (-\S+ )*(-e )?(/home/ubuntu/dreamrelation|\.)(\s|$)", c)]
    assert project_at, f"{where}: the project is not installed"
    assert torch_at[0] < project_at[0], f"{where}: torch must be installed before the project"


def test_aws_setup_installs_the_pinned_cuda_torch_then_the_synced_project():
    config = documents(AWS)[0]
    # the checkout is synced to the folder it is installed from
    assert config["file_mounts"] == {"/home/ubuntu/dreamrelation": "."}
    _install_order(config["setup_commands"], "setup_commands")
    assert any("torch.cuda.is_available()" in c for c in config["worker_setup_commands"])
    assert any("boto3" in c for c in config["head_setup_commands"]), "the autoscaler on the head needs boto3"


def test_dockerfile_installs_the_pinned_cuda_torch_then_the_project_on_the_pinned_ray():
    text = DOCKERFILE.read_text()
    runs = [line for line in text.replace("\\\n", " ").splitlines() if line.startswith(("RUN", "ARG"))]
    _install_order(runs, "Dockerfile")
    (ray,) = re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", text)
    low, high = re.search(r'"ray\[[^\]]*\]>=([\d.]+),<([\d.]+)"', (ROOT / "pyproject.toml").read_text()).groups()
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(low) <= as_tuple(ray) < as_tuple(high), f"base image Ray {ray} outside the pin >={low},<{high}"
    for where, spec in cluster_specs():
        assert spec["rayVersion"] == ray, f"{where}: rayVersion {spec['rayVersion']} != the image's Ray {ray}"


# --- the commands: the real CLI accepts them ------------------------------------------------------------------------

def test_the_configs_run_batch_submit_and_train_relations():
    commands = [argv[1:3] for _, argv in config_commands()]
    assert ["batch", "submit"] in commands and ["train", "relations"] in commands, commands


@pytest.mark.parametrize("item", config_commands(), ids=_id)
def test_every_command_in_the_configs_is_accepted_by_the_cli(item):
    path, argv = item
    try:
        check_command(argv)
    except click.UsageError as exc:  # BadParameter, MissingParameter and NoSuchOption are UsageErrors
        pytest.fail(f"{path}: the CLI refuses {shlex.join(argv)!r}: {exc.format_message()}")


@pytest.mark.parametrize("argv", docs_commands(), ids=lambda a: " ".join(a[:3]))
def test_every_command_in_docs_cluster_md_is_accepted_by_the_cli(argv):
    try:
        check_command(argv)
    except click.UsageError as exc:
        pytest.fail(f"docs: the CLI refuses {shlex.join(argv)!r}: {exc.format_message()}")


def test_the_rayjobs_run_on_the_cluster_against_s3_with_one_shared_lora_registry():
    contexts = entrypoints()
    by_command = {ctx.command.name: (name, ctx.params) for name, ctx in contexts.items()}
    assert set(by_command) == {"submit", "relations"}, by_command
    for name, params in by_command.values():
        assert params["address"] == "auto", f"{name}: runs on a local Ray instead of the cluster"
        assert params["preset"] == "sdxl", name
        assert params["output"].startswith("s3://") and params["loras"].startswith("s3://"), name
    (_, batch), (_, train) = by_command["submit"], by_command["relations"]
    assert batch["manifest"].startswith("s3://") and train["data"].startswith("s3://")
    # the registry that training writes is the one generation reads, and the one the long-lived cluster names
    registry = {batch["loras"], train["loras"]}
    for _, cluster in kuberay_objects("RayCluster"):
        head = containers(cluster["spec"]["headGroupSpec"])
        env = {e["name"]: e.get("value") for c in head for e in c.get("env", [])}
        registry.add(env["DREAMRELATION_LORAS"])
    assert len(registry) == 1, f"one LoRA registry, got {registry}"


def test_the_rayjobs_get_their_gpus():
    jobs = {d["metadata"]["name"]: d["spec"] for _, d in kuberay_objects("RayJob")}
    for name, ctx in entrypoints().items():
        groups = jobs[name].get("rayClusterSpec", {}).get("workerGroupSpecs", [])
        most = sum(g["maxReplicas"] * max(gpus(c) for c in containers(g)) for g in groups)
        if ctx.command.name == "submit":
            # the workers scale from zero: the default (GPUs only if the cluster has some at start) would give 0
            assert ctx.params["gpus_per_actor"] == 1, f"{name}: pass --gpus-per-actor 1"
            assert ctx.params["actors"] <= most or not groups, f"{name}: {ctx.params['actors']} actors, {most} GPUs"
        else:
            # the workers scale from zero: each trial must ask for its GPU, and the group must hold every relation
            assert ctx.params["gpus_per_trial"] == 1, f"{name}: pass --gpus-per-trial 1"
            relations = [r for r in ctx.params["relations"].split(",") if r.strip()]
            assert not groups or len(relations) <= most, f"{name}: {len(relations)} relations, {most} GPUs"


# --- the checks can fail ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, error", [
    ("dreamrelation batch submit m.parquet --no-such-option 1", click.NoSuchOption),
    ("dreamrelation batch submit --actors 2", click.MissingParameter),
    ("dreamrelation batch submit m.parquet --actors eight", click.BadParameter),
    ("dreamrelation batch sumbit m.parquet", click.UsageError),
    ("dreamrelation batch", click.UsageError),
    ("dreamrelation train relations s3://b/triplets --output s3://b/train", click.MissingParameter),
    ("dreamrelation train relations s3://b/t --relations hugging --gpus-per-trail 1", click.NoSuchOption),
])
def test_check_command_rejects_what_the_cli_rejects(argv, error):
    with pytest.raises(error):
        check_command(shlex.split(argv))


def test_check_command_accepts_and_parses_a_good_command():
    ctx = check_command(shlex.split("dreamrelation batch submit s3://b/m.parquet --actors 8 --gpus-per-actor 1"))
    assert ctx.params["manifest"] == "s3://b/m.parquet" and ctx.params["actors"] == 8
    assert ctx.params["gpus_per_actor"] == 1.0 and ctx.params["resume"] is True


@pytest.mark.parametrize("text, expected", [
    ("dreamrelation batch status out", [["dreamrelation", "batch", "status", "out"]]),
    ("cd x && dreamrelation batch report out  # a comment", [["dreamrelation", "batch", "report", "out"]]),
    ("ray job submit --address http://127.0.0.1:8265 -- \\\n  dreamrelation batch status s3://b/r",
     [["dreamrelation", "batch", "status", "s3://b/r"]]),
    ("ray exec c.yaml 'dreamrelation batch status a' ; ray exec c.yaml \"dreamrelation batch report b\"",
     [["dreamrelation", "batch", "status", "a"], ["dreamrelation", "batch", "report", "b"]]),
    ("pip install dreamrelation && pip install -e /home/ubuntu/dreamrelation", []),
    ("the head's drivers run dreamrelation here", []),
])
def test_commands_are_found_in_shell_text(text, expected):
    assert dreamrelation_commands(text) == expected


def test_a_config_with_a_bad_command_would_fail():
    """Negative control of the whole path: a RayJob whose entrypoint has an unknown option is refused."""
    job = yaml.safe_load((KUBERAY / "rayjob-batch.yaml").read_text())
    job["spec"]["entrypoint"] += " --num-gpus 8"
    (argv,) = [a for s in strings(job) for a in dreamrelation_commands(s)]
    with pytest.raises(click.NoSuchOption):
        check_command(argv)
