from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from tiny import build_sd, build_sd15_layout, build_sdxl, build_sdxl_layout  # noqa: E402


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory) -> Path:
    return build_sd(tmp_path_factory.mktemp("sd1"))


@pytest.fixture(scope="session")
def sd_v_folder(tmp_path_factory) -> Path:
    return build_sd(tmp_path_factory.mktemp("sd2v"), prediction_type="v_prediction", seed=1)


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory) -> Path:
    return build_sdxl(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="session")
def sd15_layout_folder(tmp_path_factory) -> Path:
    """SD 1.5's block layout, tokenizer and 512 px default at tiny widths (tests/tiny.py)."""
    return build_sd15_layout(tmp_path_factory.mktemp("sd15_layout"))


@pytest.fixture(scope="session")
def sdxl_layout_folder(tmp_path_factory) -> Path:
    """SDXL's block layout, two tokenizers and 1024 px default at tiny widths (tests/tiny.py)."""
    return build_sdxl_layout(tmp_path_factory.mktemp("sdxl_layout"))


@pytest.fixture(scope="session")
def sd_model(sd_folder):
    from npinv import load_model

    return load_model(str(sd_folder), device="cpu")


@pytest.fixture
def image_file(tmp_path) -> Path:
    """A 32x32 picture of a red circle on blue, as a PNG."""
    from npinv.scenes import Scene

    path = tmp_path / "input.png"
    Scene("circle", "red", "blue", 0.5).render(32).save(path)
    return path
from conftest_flow import *  # noqa: E402,F401,F403  (the tiny flow pipelines: SD3, SD3.5, FLUX.1)
