"""Shared test helpers: location of the official reference fixtures (optional) and seeding."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("EO_DINOV3_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures" / "dinov3"))

requires_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"official DINOv3 fixtures not available at {FIXTURES}"
)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def tiles_dir():
    """The real sample tiles folder (fetched once; cached)."""
    from eo_dinov3.data.samples import fetch_samples, sample_path

    fetch_samples(progress=False)
    return sample_path("tiles").parent
