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


@pytest.mark.parametrize("order", ["oldest_first", "newest_first", "shuffled"])
def test_crawling_one_repo_at_a_time_places_like_one_crawl(lake, tmp_path, order):
    """A crawl reads only the rows it can change (the listed repos, their ancestors, descendants
    of repos whose lineage moved): placed one repo per crawl, in any arrival order (children
    before their parents, a root after its tree), every model with declared lineage lands where
    one crawl of everything puts it, and the trees' counts match their models."""
    import random
    from datetime import timedelta

    ref = Catalog(str(tmp_path / "ref"))
    crawl_source(LocalSource(lake), ref)
    want = rows(ref)
    times = sorted({r["last_modified"] for r in want.values()})
    if order == "newest_first":
        times.reverse()
    elif order == "shuffled":
        random.Random(3).shuffle(times)
    cat = Catalog(str(tmp_path / "cat"))
    for t in times:
        crawl_source(LocalSource(lake), cat, since=t, until=t + timedelta(milliseconds=1))
    got = rows(cat)
    assert set(got) == set(want)
    declared = [r for r, w in want.items() if w["lineage_source"] == "card"]
    assert len(declared) >= 7  # a root, a chain of three, a merge, an adapter, an orphan
    for r in declared:
        keep = ("tree_id", "parent", "flags", "status")
        assert {k: got[r][k] for k in keep} == {k: want[r][k] for k in keep}, (order, r)
    current = [r for r in cat.read(MODELS).to_pylist() if r["status"] != "superseded" and r["tree_id"]]
    for t in cat.read("trees").to_pylist():
        assert t["n_models"] == sum(r["tree_id"] == t["tree_id"] for r in current), (order, t["tree_id"])

    # a new revision of the root: its tree (outside this crawl's reach) keeps it as the root
    cfg = lake / "base" / "root-model" / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    os.utime(cfg, (T0 + 100_000, T0 + 100_000))
    s = crawl_source(LocalSource(lake), cat, since=max(times) + timedelta(seconds=1))
    assert s.seen == s.changed == 1
    after = rows(cat)
    root = after["base/root-model"]
    assert (root["tree_id"], root["status"], root["lineage_source"]) == ("base/root-model", "ok", "card")
    assert after["org/grandchild"]["tree_id"] == "base/root-model"
