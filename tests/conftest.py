"""Shared fixtures: the tiny model (built once per session into a temp folder) and subject images."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PUBLIC_DATA = Path(__file__).resolve().parents[2] / "shared" / "public-data" / "dreamrelation-sample"

# The S3 server's credentials: canaries that no file, log or output may ever contain (tests/test_hostile_input.py).
CANARY_KEY_ID = "AKIACANARYKEY7QX2ZP"
CANARY_SECRET = "canary-secret-Vb8n3Lq0sRt5Wx"

# Fast, tiny generation settings shared by the tests.
FAST = dict(num_inference_steps=2, height=64, width=64, progress=False)


@pytest.fixture(scope="session", autouse=True)
def _model_home(tmp_path_factory) -> Path:
    """Keep every built model (the tiny preset's cache) inside the test session's temp folder."""
    home = tmp_path_factory.mktemp("dreamrelation-home")
    os.environ["DREAMRELATION_HOME"] = str(home)
    return home


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op torch thread avoids spinning threads (up to 10x faster
    here); restored after the module. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dir(_model_home) -> Path:
    from dreamrelation.model.presets import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def annotators_dir(_model_home) -> Path:
    """The tiny annotators (owlv2/ sam/ dinov2/ vitpose/ blip/), built once per session."""
    from dreamrelation.engine.annotate import tiny_annotator_dir

    return tiny_annotator_dir()


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    """A fresh tiny pipeline per test module (tests that load LoRAs unload them again)."""
    from dreamrelation.model.presets import load_pipeline

    return load_pipeline(str(tiny_dir))


def make_subject(seed: int, size: int = 64) -> Image.Image:
    """A smooth random-colour image: distinct per seed, deterministic."""
    rng = np.random.RandomState(seed)
    small = (rng.rand(4, 4, 3) * 255).astype("uint8")
    return Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR)


@pytest.fixture(scope="session")
def subjects() -> list[Image.Image]:
    return [make_subject(i) for i in range(4)]


@pytest.fixture(scope="module")
def runner():
    """typer's CliRunner for ``cli.app``."""
    from typer.testing import CliRunner

    return CliRunner()


def invoke(runner, *args):
    """Run ``dreamrelation ARGS`` in-process; re-raise anything but the CLI's own exit."""
    import cli

    result = runner.invoke(cli.app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def public_data() -> Path:
    if not PUBLIC_DATA.is_dir():
        pytest.skip(f"public sample data not found at {PUBLIC_DATA}")
    return PUBLIC_DATA


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1 for the whole session; yields its endpoint URL.

    Credentials and the endpoint go through the standard AWS environment variables, exactly as a user points the
    project at MinIO or AWS: s3fs, pyarrow and Ray workers all read them.
    """
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": CANARY_KEY_ID, "AWS_SECRET_ACCESS_KEY": CANARY_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket; yields ``s3://name``."""
    import uuid

    import s3fs

    name = f"dr-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir(name)
    fs.invalidate_cache()
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_temp() -> Path:
    """The local Ray's temp folder (its session logs: where tests look for leaked secrets)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit


@pytest.fixture(scope="session")
def ray_local(_model_home, s3_server, ray_temp):
    """A real local Ray cluster for the session (4 logical CPUs on any machine; actors take fractions).

    Started after the S3 server so that its workers inherit the endpoint and credentials.
    """
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # no runtime environment: its processes inherit the S3 settings and credentials (Ray would log a runtime env)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _temp_dir=str(ray_temp))
    yield ray
    ray.shutdown()


def _layer_free_keys(keys) -> set[str]:
    return {re.sub(r"\.layer\.\d+\.", ".layer.N.", key) for key in keys}


def assert_twin_layout(model_class, twin_dir, real_shapes: dict, hub_key: str) -> None:
    """The tiny twin has the real model's parameters (bar size and depth), loads with no missing / unexpected
    keys, and its file uses the hub checkpoints' key names (transformers converts them at load time)."""
    from safetensors import safe_open

    twin, info = model_class.from_pretrained(twin_dir, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert _layer_free_keys(twin.state_dict()) == _layer_free_keys(real_shapes)
    with safe_open(str(twin_dir / "model.safetensors"), "pt") as f:
        assert hub_key in set(f.keys())
