"""Shared test helpers: location of the official reference fixtures (optional) and seeding."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("EO_DINOV3_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures" / "dinov3"))

requires_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"official DINOv3 fixtures not available at {FIXTURES}"
)


_MAIN = sys.modules["__main__"]
_MAIN_FILE = getattr(_MAIN, "__file__", None)


@pytest.fixture(autouse=True)
def _seed_and_restore_main():
    """Seed torch; afterwards undo what streamlit's AppTest / runpy leave in ``__main__`` (a later
    ``multiprocessing`` spawn would otherwise re-run the Streamlit app script in its child processes)."""
    torch.manual_seed(0)
    yield
    sys.modules["__main__"] = _MAIN
    if _MAIN_FILE is None:
        if hasattr(_MAIN, "__file__"):
            del _MAIN.__file__
    else:
        _MAIN.__file__ = _MAIN_FILE


@pytest.fixture(scope="module")
def tiles_dir():
    """The real sample tiles folder (fetched once; cached)."""
    from eo_dinov3.data.samples import fetch_samples, sample_path

    fetch_samples(progress=False)
    return sample_path("tiles").parent
