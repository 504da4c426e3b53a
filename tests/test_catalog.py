"""The catalog's writes cost what they change, and maintenance bounds its history."""

import pyarrow as pa

from storage.catalog import MAX_INDEX_DELTAS, MODELS, ROW_HASH, Catalog


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


def test_maintain_merges_index_deltas_so_disk_stays_bounded(tmp_path):
    """Each update of a vector index adds a delta with its own codebook; maintenance merges them
    once there are more than MAX_INDEX_DELTAS."""
    import numpy as np
    from lancedb.index import IvfPq

    cat = Catalog(str(tmp_path / "cat"))
    rng = np.random.default_rng(0)

    def batch(n, start):
        v = rng.standard_normal((n, 16)).astype(np.float32)
        return pa.table({"id": np.arange(start, start + n), "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), 16)})

    tbl = cat.db.create_table("vectors", batch(600, 0))
    tbl.create_index("vector", config=IvfPq(distance_type="cosine", num_partitions=2, num_sub_vectors=4))
    nights = MAX_INDEX_DELTAS + 1
    for night in range(nights):
        tbl.add(batch(20, 600 + 20 * night))
        cat.maintain(keep_days=0, keep_tags=0)
        stats = cat.db.open_table("vectors").index_stats("vector_idx")
        assert stats.num_indices <= MAX_INDEX_DELTAS and stats.num_unindexed_rows == 0
    assert stats.num_indices == 1 and stats.num_indexed_rows == 600 + 20 * nights
