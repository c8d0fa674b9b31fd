"""Shared fixtures: the tiny model (built once per session into a temp folder) and subject images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PUBLIC_DATA = Path(__file__).resolve().parents[2] / "shared" / "public-data" / "dreamrelation-sample"

# Fast, tiny generation settings shared by the tests.
FAST = dict(num_inference_steps=2, height=64, width=64, progress=False)


@pytest.fixture(scope="session", autouse=True)
def _model_home(tmp_path_factory) -> Path:
    """Keep every built model (the tiny preset's cache) inside the test session's temp folder."""
    home = tmp_path_factory.mktemp("dreamrelation-home")
    os.environ["DREAMRELATION_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_dir(_model_home) -> Path:
    from dreamrelation.presets import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    """A fresh tiny pipeline per test module (tests that load LoRAs unload them again)."""
    from dreamrelation.presets import load_pipeline

    return load_pipeline(str(tiny_dir))


def make_subject(seed: int, size: int = 64) -> Image.Image:
    """A smooth random-colour image: distinct per seed, deterministic."""
    rng = np.random.RandomState(seed)
    small = (rng.rand(4, 4, 3) * 255).astype("uint8")
    return Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR)


@pytest.fixture(scope="session")
def subjects() -> list[Image.Image]:
    return [make_subject(i) for i in range(4)]


def public_data() -> Path:
    if not PUBLIC_DATA.is_dir():
        pytest.skip(f"public sample data not found at {PUBLIC_DATA}")
    return PUBLIC_DATA
