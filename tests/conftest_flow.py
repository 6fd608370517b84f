"""Session fixtures of the tiny flow-matching pipelines (tests/tiny_flow.py), imported by conftest.py.

Each folder is built once per test session and loaded back with ``from_pretrained`` as a user's folder is."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def sd3_folder(tmp_path_factory) -> Path:
    """SD3-Medium's layout: two CLIP encoders with projection, T5, shift 3.0."""
    from tiny_flow import build_sd3

    return build_sd3(tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="session")
def sd35_folder(tmp_path_factory) -> Path:
    """SD3.5-Medium's layout: a dual-attention layer and RMS QK-norm."""
    from tiny_flow import build_sd3

    return build_sd3(tmp_path_factory.mktemp("sd35"), sd35=True, seed=1)


@pytest.fixture(scope="session")
def sd3_no_t5_folder(tmp_path_factory) -> Path:
    """SD3 saved without T5 (``text_encoder_3``/``tokenizer_3`` listed as ``[null, null]``)."""
    from tiny_flow import build_sd3

    return build_sd3(tmp_path_factory.mktemp("sd3_no_t5"), t5=False, seed=2)


@pytest.fixture(scope="session")
def flux_dev_folder(tmp_path_factory) -> Path:
    """FLUX.1-dev's layout: guidance embedding, dynamic shift."""
    from tiny_flow import build_flux

    return build_flux(tmp_path_factory.mktemp("flux_dev"))


@pytest.fixture(scope="session")
def flux_schnell_folder(tmp_path_factory) -> Path:
    """FLUX.1-schnell's layout: no guidance embedding, no shift."""
    from tiny_flow import build_flux

    return build_flux(tmp_path_factory.mktemp("flux_schnell"), dev=False, seed=1)


@pytest.fixture(scope="session")
def sd3_pipe(sd3_folder):
    from tiny_flow import load

    return load(sd3_folder)


@pytest.fixture(scope="session")
def flux_dev_pipe(flux_dev_folder):
    from tiny_flow import load

    return load(flux_dev_folder)
