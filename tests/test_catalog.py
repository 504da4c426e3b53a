"""The catalog's writes cost what they change, and maintenance bounds its history."""

import pyarrow as pa

from storage.catalog import MODELS, ROW_HASH, TIER, Catalog, settled


def rows(n, status="ok"):
    return [{"repo_id": f"org/m{i}", "sha": "a" * 40, "status": status, "tree_id": "org/root"} for i in range(n)]


def test_upsert_counts_and_writes_only_what_changed(tmp_path):
    cat = Catalog(str(tmp_path))
    assert (r := cat.upsert_models(rows(4))).new == 4 and r.changed == 0
    version = cat.versions(MODELS)
    again = cat.upsert_models(rows(4))
    assert (again.new, again.changed, again.unchanged) == (0, 0, 4)
    assert cat.versions(MODELS) == version  # nothing changed: no write, no new version
    one = cat.upsert_models([{**rows(1)[0], "status": "quarantined", "reason": "bad"}] + rows(6)[4:])
    assert (one.new, one.changed, one.unchanged) == (2, 1, 0)
    got = {r["repo_id"]: r for r in cat.read(MODELS).to_pylist()}
    assert len(got) == 6 and got["org/m0"]["status"] == "quarantined"
    assert all(r[ROW_HASH] for r in got.values())


def test_rows_from_before_hashes_are_rewritten_once(tmp_path):
    cat = Catalog(str(tmp_path))
    cat.upsert_models(rows(2))
    cat.table(MODELS).update(values={ROW_HASH: None})  # a catalog written before the hash column
    assert cat.upsert_models(rows(2)).changed == 2
    assert cat.upsert_models(rows(2)).unchanged == 2


def test_filters_run_in_lancedb_on_indexed_columns(tmp_path):
    cat = Catalog(str(tmp_path))
    cat.upsert_models(rows(3) + [{"repo_id": "org/root", "sha": "b" * 40, "status": "ok", "tree_id": "org/root"},
                                 {"repo_id": "o'brien/x", "sha": "c" * 40, "status": "ok", "tree_id": "o'brien/x"}])
    indexed = {tuple(i.columns) for i in cat.table(MODELS).list_indices()}
    assert {("repo_id",), ("tree_id",), ("status",)} <= indexed
    assert sorted(r["repo_id"] for r in cat.tree_children("org/root", columns=["repo_id"])) == \
        ["org/m0", "org/m1", "org/m2"]
    assert cat.tree_children("o'brien/x") == []  # quotes in ids are escaped, not SQL


def test_maintain_bounds_versions_and_keeps_the_newest_tags(tmp_path):
    cat = Catalog(str(tmp_path))
    for i in range(12):
        cat.upsert_models(rows(i + 1))
        if i % 3 == 0:
            t = cat.table(MODELS)
            t.tags.create(f"run-{i}", t.version)
    before = len(cat.table(MODELS).list_versions())
    report = cat.maintain(keep_days=0, keep_tags=2)
    t = cat.table(MODELS)
    assert sorted(t.tags.list()) == ["run-6", "run-9"] and report[MODELS]["tags_dropped"] == 2
    assert len(t.list_versions()) < before
    assert len(cat.read(MODELS)) == 12
    t.checkout("run-6")  # a kept tag still reads its rows
    assert t.count_rows() == 7


def test_settled_pieces_hold_tier_times_the_rows_after_them():
    assert settled([10_000, 10]) == 2  # the newest piece has nothing after it
    assert settled([10_000, 10, 10]) == 1  # the two small ones merge
    assert settled([10_000, 100, 10, 10]) == 2
    assert settled([10_000, 10, 160, 20]) == 1  # a run from the oldest unsettled on
    assert settled([100, 30, 10]) == 0
    assert settled([4 * 50, 50]) == 2 and settled([4 * 50 - 1, 50]) == 0
    assert settled([0, 5]) == 0  # an empty piece is merged away
    assert settled([]) == 0


def test_maintenance_rewrites_new_rows_only_and_tags_keep_their_rows(tmp_path):
    """A nightly's rows fold into index deltas and small fragments; the settled base (fragment
    and index) stays as written, so a version a tag pins shares its files instead of holding a
    copy of the table (disk stays bounded over many nights)."""
    import lance
    import numpy as np
    from lancedb.index import BTree, IvfPq

    cat = Catalog(str(tmp_path / "cat"))
    rng = np.random.default_rng(0)

    def batch(n, start):
        v = rng.standard_normal((n, 16)).astype(np.float32)
        return pa.table({"id": np.arange(start, start + n), "key": [f"k{i}" for i in range(start, start + n)],
                         "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), 16)})

    tbl = cat.db.create_table("vectors", batch(2000, 0))
    tbl.create_index("vector", config=IvfPq(distance_type="cosine", num_partitions=2, num_sub_vectors=4))
    tbl.create_index("key", config=BTree())
    path = str(tmp_path / "cat" / "vectors.lance")

    def base_files():
        ds = lance.dataset(path)
        first = ds.get_fragments()[0]
        return [f.path for f in first.metadata.files], {(i.name, s.uuid) for i in ds.describe_indices()
                                                        for s in i.segments if set(s.fragment_ids) == {0}}

    before = base_files()
    nights = 12
    for night in range(nights):
        tbl.add(batch(20, 2000 + 20 * night))
        tbl.tags.create(f"night-{night}", tbl.version)
        report = cat.maintain(keep_days=0, keep_tags=3)["vectors"]
        for name in ("vector_idx", "key_idx"):
            stats = cat.db.open_table("vectors").index_stats(name)
            assert stats.num_unindexed_rows == 0 and stats.num_indexed_rows == 2020 + 20 * night
            assert stats.num_indices <= 4  # a few deltas of geometric sizes, not one per night
        ds = lance.dataset(path)
        assert len(ds.get_fragments()) <= 4
    assert base_files() == before  # the 2,000 base rows were never rewritten
    assert report["fragments_compacted"] >= 0 and report["tags_kept"] == 3
    t = cat.db.open_table("vectors")
    assert t.count_rows() == 2000 + 20 * nights
    t.checkout(f"night-{nights - 3}")  # a kept tag still reads its rows
    assert t.count_rows() == 2000 + 20 * (nights - 2)
    assert TIER >= 2
