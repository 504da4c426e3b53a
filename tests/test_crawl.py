"""Crawl into the catalog: placement, bad records kept with reasons, idempotency, watermark."""

import os
import shutil

import pytest
from minilake import T0, build_lake

from storage.catalog import MODELS, Catalog
from storage.sources import HubSource, LocalSource
from tasks.crawl import crawl_source


@pytest.fixture
def lake(tmp_path):
    return build_lake(tmp_path / "lake")


def rows(cat):
    return {r["repo_id"]: r for r in cat.read(MODELS).to_pylist()}


def test_crawl_places_by_lineage_and_keeps_bad_records(lake, tmp_path):
    cat = Catalog(str(tmp_path / "cat"))
    s = crawl_source(LocalSource(lake), cat)
    assert s.seen == s.new == 15
    got = rows(cat)
    assert got["org/grandchild"]["tree_id"] == "base/root-model"
    assert got["org/merge"]["tree_id"] == "base/root-model" and "merge" in got["org/merge"]["flags"]
    assert got["org/orphan"]["tree_id"] == "gone/missing-root"
    assert got["org/bad-yaml"]["status"] == "bad_card" and got["org/bad-yaml"]["reason"]
    # A model with weights unlike any tree's root is not forced into one.
    assert got["org/undeclared"]["status"] == "unassigned"
    assert got["org/undeclared"]["route_distances"]
    assert {e["repo_id"] for e in s.errors} >= {"org/bad-yaml", "org/alias", "org/huge-card"}
    trees = {t["tree_id"]: t for t in cat.read("trees").to_pylist()}
    assert trees["base/root-model"]["n_models"] == 6


def test_second_crawl_adds_nothing_and_new_repos_are_picked_up_exactly(lake, tmp_path):
    cat = Catalog(str(tmp_path / "cat"))
    src = LocalSource(lake)
    first = crawl_source(src, cat)
    version = cat.versions(MODELS)
    again = crawl_source(src, cat, incremental=False)
    assert (again.new, again.changed, again.replaced) == (0, 0, 0)
    assert cat.versions(MODELS) == version  # no write at all

    for i in range(10):
        dst = lake / "new" / f"copy-{i}"
        shutil.copytree(lake / "org" / "child-ft", dst)
        for f in dst.iterdir():
            os.utime(f, (T0 + 10_000 + i, T0 + 10_000 + i))
    third = crawl_source(src, cat)  # incremental: from the watermark
    assert third.new == 10 and third.changed == 0
    assert {r for r in rows(cat) if r.startswith("new/")} == {f"new/copy-{i}" for i in range(10)}
    assert len(rows(cat)) == first.seen + 10


def test_changed_file_supersedes_the_old_revision(lake, tmp_path):
    cat = Catalog(str(tmp_path / "cat"))
    src = LocalSource(lake)
    crawl_source(src, cat)
    old_sha = rows(cat)["org/child-ft"]["sha"]
    cfg = lake / "org" / "child-ft" / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    s = crawl_source(src, cat)
    assert s.changed == 1 and s.new == 0
    all_rows = cat.read(MODELS).to_pylist()
    statuses = {r["sha"]: r["status"] for r in all_rows if r["repo_id"] == "org/child-ft"}
    assert statuses[old_sha] == "superseded" and len(statuses) == 2


def test_limit_does_not_advance_the_watermark(lake, tmp_path):
    cat = Catalog(str(tmp_path / "cat"))
    src = LocalSource(lake)
    crawl_source(src, cat, limit=3)
    assert cat.watermark(src.name) is None
    crawl_source(src, cat)
    assert cat.watermark(src.name) is not None


def test_hub_and_local_crawls_agree(lake, tmp_path):
    from hubserver import HubServer

    local = Catalog(str(tmp_path / "local"))
    crawl_source(LocalSource(lake), local)
    with HubServer(lake, page_size=4) as hub:
        remote = Catalog(str(tmp_path / "remote"))
        crawl_source(HubSource(endpoint=hub.url, token=None), remote)
    keep = ["repo_id", "sha", "tree_id", "status", "flags", "labels", "files", "last_modified"]
    a = sorted((tuple(str(r[k]) for k in keep) for r in local.read(MODELS).to_pylist()))
    b = sorted((tuple(str(r[k]) for k in keep) for r in remote.read(MODELS).to_pylist()))
    assert a == b
