"""Execute the notebooks in ``notebooks/`` with nbclient so that they never rot.

Each notebook runs in a fresh IPython kernel of *this* interpreter (a temporary kernelspec that
points at ``sys.executable``, found through ``JUPYTER_PATH``), with small settings passed through
environment variables that the notebooks read (``APTS_NB_SAMPLES``, ``APTS_NB_STEPS``,
``APTS_NB_ITERS``; ``APTS_PAPER_RESULTS`` / ``APTS_PAPER_QUICK_ARGS`` for the paper figures) and a
per-cell timeout. A failing cell fails the test with the cell's traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "apts-jax-test"
CELL_TIMEOUT = 300
QUICK_RESULTS = ROOT / "benchmarks" / "results" / "paper-quick"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory):
    """A kernelspec running ``sys.executable -m ipykernel_launcher``, and small settings."""
    jupyter = tmp_path_factory.mktemp("jupyter")
    spec = jupyter / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "apts_jax tests", "language": "python",
    }))
    mp = pytest.MonkeyPatch()
    mp.setenv("JUPYTER_PATH", str(jupyter))
    mp.setenv("JAX_PLATFORMS", "cpu")
    mp.delenv("XLA_FLAGS", raising=False)
    mp.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows the figures
    mp.setenv("APTS_NB_SAMPLES", "1024")
    mp.setenv("APTS_NB_STEPS", "15")
    mp.setenv("APTS_NB_ITERS", "8")
    if QUICK_RESULTS.is_dir() and any(QUICK_RESULTS.glob("*/*.json")):
        mp.setenv("APTS_PAPER_RESULTS", str(QUICK_RESULTS))
    else:  # no committed quick results: the notebook runs a very small quick protocol itself
        mp.delenv("APTS_PAPER_RESULTS", raising=False)
        mp.setenv("APTS_PAPER_QUICK_ARGS",
                  "--epochs 1 --datasets fashion_mnist --only (apts-N2-fo|adam-b128)")
    try:
        yield KERNEL
    finally:
        mp.undo()


def execute(name: str, kernel_name: str) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT, startup_timeout=120, kernel_name=kernel_name,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()
    return nb


def outputs_text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "text" in out:
                parts.append(out["text"])
            elif "data" in out and "text/plain" in out["data"]:
                parts.append(out["data"]["text/plain"])
            if "data" in out and "text/markdown" in out["data"]:
                parts.append(out["data"]["text/markdown"])
    return "\n".join(parts)


def images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells
               for out in cell.get("outputs", []))


def test_notebooks_are_clean_and_configure_devices_first():
    """Committed without outputs; jax_num_cpu_devices is set in the first code cell."""
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.get("outputs") for c in code), f"{path.name} has outputs"
        first = code[0].source
        assert "jax_num_cpu_devices" in first, path.name
        assert first.index("jax_num_cpu_devices") < first.index("import apts_jax") \
            if "import apts_jax" in first else True


def test_quickstart(kernel):
    nb = execute("quickstart.ipynb", kernel)
    text = outputs_text(nb)
    assert "minibatch TR" in text and "full-batch TR" in text and "adam" in text
    assert images(nb) >= 1


@pytest.mark.slow  # heavy; run with pytest -m slow (CI time, issue 9)
def test_apts_devices(kernel):
    nb = execute("apts_devices.ipynb", kernel)
    text = outputs_text(nb)
    assert "N= 8 on D=8" in text and "N=16 on D=8" in text
    assert "gradient-sized all-reduce" in text and "full-data loss" in text
    assert images(nb) >= 1


def test_paper_figures(kernel):
    nb = execute("paper_figures.ipynb", kernel)
    text = outputs_text(nb)
    assert "fashion_mnist" in text
    assert images(nb) >= 2
