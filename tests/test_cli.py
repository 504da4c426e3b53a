"""The CLI as a user meets it: tables or one JSON document, and one-line errors for mistakes."""

import json

import pytest
from typer.testing import CliRunner

from probex.cli import app
from probex_core.heads import TEXT

runner = CliRunner()


def run(*args, home=None):
    argv = list(args) + (["--home", str(home)] if home is not None else [])
    return runner.invoke(app, argv)


def one_line_error(result, *words):
    assert result.exit_code == 1, result.output
    text = result.output.strip()
    assert "Traceback" not in text
    assert text.startswith("error:") and len(text.splitlines()) <= 3  # one sentence, maybe wrapped
    for w in words:
        assert w in text, text


@pytest.fixture(scope="module")
def home(tiny_home):
    return tiny_home[0].home


@pytest.fixture(scope="module")
def labels(tiny_home):
    from storage.query import CatalogQuery

    q = CatalogQuery.open(home=tiny_home[0].home)
    text = next(t for t in q.trees().values() if t.head is TEXT)
    return text.labels


def test_every_command_has_help():
    for cmd in ["zoo build", "crawl", "trees", "extract", "train", "eval", "embed", "search", "classify",
                "similar", "ingest", "demo", "maintain"]:
        r = runner.invoke(app, cmd.split() + ["--help"])
        assert r.exit_code == 0 and "--home" in r.output, cmd


def test_search_json_is_one_document_with_ranked_models(home, labels):
    r = run("search", labels[0], "-k", "3", "--json", home=home)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert 0 < len(doc["results"]) <= 3
    scores = [x["score"] for x in doc["results"]]
    assert scores == sorted(scores, reverse=True)
    assert {"repo_id", "tree_id", "score", "top_labels"} <= set(doc["results"][0])


def test_classify_and_similar(home, labels, tiny_home):
    s, _ = tiny_home
    from storage.catalog import Catalog

    rows = Catalog(s.catalog).read("embeddings").to_pylist()
    repo = next(r["repo_id"] for r in rows if r["task"] == TEXT.name)  # a text-head tree's model
    r = run("classify", repo, "--labels", ",".join(labels[:3]), "--json", home=home)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)["results"]
    assert [x["label"] for x in res if x["label"] in labels[:3]] and len(res) == 3
    assert abs(sum(x["score"] for x in res) - 1) < 1e-3  # a distribution over the given labels
    r = run("similar", repo, "-k", "2", "--json", home=home)
    assert r.exit_code == 0, r.output
    assert all(x["repo_id"] != repo for x in json.loads(r.stdout)["results"])


def test_trees_lists_counts(home):
    r = run("trees", "--json", home=home)
    doc = json.loads(r.stdout)
    assert len(doc["trees"]) == 5 and all(t["n_models"] > 0 and t["expert_version"] for t in doc["trees"])


def test_user_mistakes_are_one_line(home, labels, tmp_path):
    one_line_error(run("search", "  ", home=home), "empty")
    one_line_error(run("classify", "nobody/nothing", "--labels", "a,b", home=home), "not in the catalog")
    one_line_error(run("classify", "nobody/nothing", "--labels", "dog", home=home), "two")
    one_line_error(run("search", "dog", "--tree", "no/such-tree", home=home), "no tree")
    one_line_error(run("search", "dog", home=tmp_path / "empty"), "no catalog")
    one_line_error(run("zoo", "build", "--size", "huge", "--out", str(tmp_path / "x")), "size")
    one_line_error(run("zoo", "build", "--size", "tiny", "--out", "/proc/probex-lake"), "--out")
    one_line_error(run("crawl", "--source", str(tmp_path / "missing"), home=tmp_path), "does not exist")
    one_line_error(run("crawl", "--since", "yesterday-ish", home=home), "--since")
    one_line_error(run("extract", "--dask-address", "tcp://127.0.0.1:9", home=home), "PROBEX_DASK_ADDRESS")


def test_read_only_catalog_names_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("PROBEX_CATALOG", "/proc/probex-catalog")
    one_line_error(run("crawl", "--source", str(tmp_path), home=tmp_path), "PROBEX_CATALOG")


def test_tree_without_expert_is_a_typed_error(tiny_home, tmp_path):
    from storage.query import CatalogQuery, NoExpertError

    s, _ = tiny_home
    q = CatalogQuery(s.catalog, str(tmp_path / "no-experts"))
    with pytest.raises(NoExpertError):
        q.search("dog", tree="efficientnet/efficientnet-lite0")


@pytest.mark.slow  # starts servers or processes: the full suite runs it
def test_a_local_prefect_api_that_cannot_start_is_one_line(tmp_path):
    """No PREFECT_API_URL: the command starts a local server; when that fails (here its database
    cannot be created) the user gets one line naming the server log and the setting. Run as a
    process: Prefect binds its log handlers to the stderr of the process that first imports it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{tmp_path}/missing/dir/prefect.db"
    probex = str(Path(sys.executable).parent / "probex")
    done = subprocess.run([probex, "ingest", "--home", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 1, done.stderr[-2000:]
    last = [l for l in (done.stdout + done.stderr).strip().splitlines() if l.strip()][-1]
    assert last.startswith("error:") and "server.log" in last and "PREFECT_API_URL" in last, last


def test_user_text_is_never_read_as_markup(home):
    """Queries, labels and repo ids are data: rich markup in them is printed as typed."""
    r = run("search", "[/x] birds", "-k", "2", home=home)
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output and "[/x] birds" in r.output
    r = run("similar", "[bold]org/[/nope]", home=home)
    one_line_error(r, "[/nope]")


@pytest.mark.parametrize("name,value", [("PROBEX_DASK_WORKERS", "abc"), ("PROBEX_DASK_WORKERS", "0"),
                                        ("PROBEX_DEVICE", "gpu"), ("PROBEX_HTTP_READ_TIMEOUT", "soon")])
def test_a_bad_setting_is_one_line_naming_it(home, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    r = run("trees", home=home)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    text = r.output.strip()
    assert text.startswith("error:") and name in text and len(text.splitlines()) <= 2, text


def test_tables_stay_readable_in_an_80_column_log():
    """Long repo ids and labels fold onto more lines instead of being cut to `eff…`."""
    import io

    from rich.console import Console

    from probex.cli import table

    cells = ["efficientnet-lite0-fashion-mnist-sneaker-boot-0042", "multi-label", 0.91234, "yes",
             ["a-rather-long-label", "another-long-label"], 12345, "google/efficientnet-lite0"]
    buf = io.StringIO()
    Console(file=buf, width=80).print(table("a wide table", [f"column {i}" for i in range(7)], [cells]))
    text = buf.getvalue()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    body = text.splitlines()[text.splitlines().index(next(l for l in text.splitlines() if "───" in l)) + 1:]
    first_column = "".join(line.split()[0] for line in body if line.strip())
    assert first_column == cells[0]


def test_maintain_compacts_a_copy_of_the_catalog(tiny_home, tmp_path):
    import shutil

    shutil.copytree(tiny_home[0].catalog, tmp_path / "catalog")
    r = runner.invoke(app, ["maintain", "--keep-days", "0", "--json", "--home", str(tmp_path)])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert {"models", "trees", "embeddings"} <= set(doc["tables"])
    assert run("trees", home=tmp_path).exit_code == 0
