"""The catalog notebook runs top to bottom on a catalog built from the tiny lake."""

import shutil
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


@pytest.mark.slow  # starts a kernel and an S3 server: the full suite runs it
def test_the_notebook_reads_a_catalog_on_an_object_store(tiny_home, s3_server, monkeypatch, tmp_path):
    """The same notebook, its catalog on S3 (PROBEX_CATALOG, the AWS_* variables): a team's shared
    bucket read from a laptop. The tiny home's catalog is copied object by object to the bucket (a
    LanceDB database is plain files), so the notebook sees exactly what the local one holds."""
    import pyarrow.fs as pafs

    s, _ = tiny_home
    uri = s3_server.uri("catalog")
    pafs.copy_files(str(s.catalog), uri.split("://", 1)[1], source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3_server.filesystem())
    home = tmp_path / "home"  # the home keeps the experts and shards; the catalog is on the bucket
    shutil.copytree(s.home, home, ignore=shutil.ignore_patterns("catalog"))
    monkeypatch.setenv("PROBEX_HOME", str(home))
    monkeypatch.setenv("PROBEX_CATALOG", uri)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parents[1])}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors[0].get("evalue")
    assert not (home / "catalog").exists()  # nothing fell back to a local catalog
    tables = nb.cells[1].outputs[0]["data"]["text/plain"]
    assert "models" in tables and "embeddings" in tables
    assert (home / "tree_embeddings.png").stat().st_size > 1000
