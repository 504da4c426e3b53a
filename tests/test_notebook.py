"""The catalog notebook runs top to bottom on a catalog built from the tiny lake."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_catalog.ipynb"


@pytest.mark.slow  # starts a kernel: the full suite runs it
def test_explore_catalog_notebook_runs(tiny_home, monkeypatch):
    s, _ = tiny_home
    monkeypatch.setenv("PROBEX_HOME", str(s.home))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parents[1])}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert (s.home / "tree_embeddings.png").stat().st_size > 1000
