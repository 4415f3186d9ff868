"""The example notebooks in ``notebooks/`` are stored without outputs and execute without errors.

Each notebook runs in a fresh ``python3`` Jupyter kernel (``nbclient``) with the repository root as working
directory, exactly as a user opening it from the repository would; any cell error fails the test. The notebooks use
the sample data (``eo-dinov3 samples fetch``) and tiny models; each takes well under a minute on a 2-core CPU.
"""

from __future__ import annotations

import subprocess
import sys

import nbformat
import pytest

from tests.conftest import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
EXPECTED = ["01_features", "02_canopy_height", "03_pretrain_small", "04_geobench"]
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
TIMEOUT_S = 300  # per cell


def _ensure_python3_kernel() -> None:
    """Register the ``python3`` kernel spec for this interpreter if Jupyter cannot find one."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user", "--name", "python3"], check=True)


def test_the_example_notebooks_are_there():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cells"
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} hold outputs; store notebooks stripped (CI executes them)"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, monkeypatch):
    from nbclient import NotebookClient

    # importing streamlit (the app tests) sets MPLBACKEND=Agg for the whole process; the kernel would inherit it
    # and show no inline pictures
    monkeypatch.delenv("MPLBACKEND", raising=False)
    _ensure_python3_kernel()
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO_ROOT)}})  # fmt: skip
    client.execute()  # raises CellExecutionError (with the cell's traceback) on any error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type in ("display_data", "execute_result") and "image/png" in o.data]
    assert images, f"{path.name} showed no picture (matplotlib backend switched away from inline?)"
