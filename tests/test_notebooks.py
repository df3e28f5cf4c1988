"""The notebooks in notebooks/ run top to bottom without errors, and are stored without outputs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds per cell
# One torch thread in the kernel: on a shared 2-core CPU, two threads next to another busy process run
# SmolLM2 generation ~30x slower (threads wait on each other); one thread is ~1.5x slower than two at best.
KERNEL_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_internals.ipynb", "02_steering.ipynb", "03_probe_to_weights.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    for key, value in KERNEL_ENV.items():  # the kernel inherits this process's environment
        monkeypatch.setenv(key, value)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the cell and traceback) on any error
    print(f"{path.name}: {time.perf_counter() - start:.0f}s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
