"""The pipeline on the tiny lake, against its ground truth: placement, quarantine, bytes, experts."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.catalog import MODELS, Catalog


@pytest.fixture(scope="module")
def gt(tiny_home):
    s, _ = tiny_home
    return {r["repo_id"]: r for r in pq.read_table(s.lake / "_ground_truth.parquet").to_pylist()}


@pytest.fixture(scope="module")
def models(tiny_home):
    s, _ = tiny_home
    return {r["repo_id"]: r for r in Catalog(s.catalog).read(MODELS).to_pylist()}


def test_declared_lineage_lands_in_the_true_tree(gt, models):
    declared = [r for r, g in gt.items() if g["lineage_declared"] and g["root"]]
    assert declared
    assert all(models[r]["tree_id"] == gt[r]["root"] for r in declared)


def test_undeclared_models_routed_by_weights_and_outsiders_left_unassigned(gt, models):
    undeclared = [r for r, g in gt.items() if not g["lineage_declared"] and g["root"] and not g["corrupt"]]
    outsiders = [r for r, g in gt.items() if g["root"] is None]
    assert undeclared and outsiders
    for r in undeclared:
        assert models[r]["tree_id"] == gt[r]["root"], (r, models[r]["reason"])
        assert models[r]["lineage_source"] == "weights"
    for r in outsiders:
        assert models[r]["status"] == "unassigned" and models[r]["tree_id"] is None
        assert json.loads(models[r]["route_distances"])  # distances are recorded


def test_corrupt_files_and_only_they_are_quarantined(gt, models):
    corrupt = {r for r, g in gt.items() if g["corrupt"]}
    quarantined = {r for r, m in models.items() if m["status"] == "quarantined"}
    assert corrupt and quarantined == corrupt
    assert all(models[r]["reason"] for r in quarantined)


def test_extraction_reads_only_the_bytes_it_needs(tiny_home):
    _, steps = tiny_home
    ex = steps["extract"]
    files = ex["models"]
    assert ex["extracted"] > 0
    assert ex["bytes_read"] <= 1.1 * ex["bytes_needed"] + 64 * 1024 * files
    assert ex["bytes_read"] < ex["bytes_in_files"]


def test_every_tree_gets_an_expert_from_documented_models(tiny_home, gt):
    _, steps = tiny_home
    trees = steps["train"]["trees"]
    assert set(trees) == {g["root"] for g in gt.values() if g["root"]}  # the synthetic trees' too
    for tree_id, r in trees.items():
        assert r["skipped"] is None, (tree_id, r["skipped"])
        assert r["layer"] and r["promoted"] and r["n_train"] >= 4
    assert trees["sentence-transformers/all-MiniLM-L6-v2"]["task"] == "text"
    assert trees["efficientnet/efficientnet-lite0"]["task"] == "multilabel"


def test_embeddings_cover_every_extracted_model(tiny_home, models):
    s, steps = tiny_home
    emb = Catalog(s.catalog).read("embeddings").to_pylist()
    with_expert = set(steps["embed"]["trees"])
    assert with_expert == set(steps["train"]["trees"])
    ok = {r for r, m in models.items()
          if m["status"] == "ok" and m["tree_id"] in with_expert and r != m["tree_id"]}
    assert {e["repo_id"] for e in emb} == ok
    for e in emb:
        assert math.isclose(sum(v * v for v in e["vector"]), 1.0, rel_tol=1e-4)
        assert len(e["top_labels"]) == len(e["top_scores"]) > 0
    assert steps["embed"]["tag"].startswith("embed-")


def test_reembedding_with_unchanged_experts_writes_nothing(tiny_home, tmp_path):
    """Every model already has its row for the current expert: no new table version, no tag."""
    import shutil

    from tasks.embed import embed_trees

    s, steps = tiny_home
    shutil.copytree(s.catalog, tmp_path / "catalog")
    cat = Catalog(str(tmp_path / "catalog"))
    before = cat.table("embeddings").version
    again = embed_trees(cat, s.shards, str(s.experts)).to_dict()
    assert again["new"] == again["changed"] == 0 and again["tag"] is None
    assert {t: v["models"] for t, v in again["trees"].items()} == \
        {t: v["models"] for t, v in steps["embed"]["trees"].items()}
    assert cat.table("embeddings").version == before


def test_filter_columns_get_bitmap_indexes_replacing_an_old_btree(tiny_home, tmp_path):
    import shutil

    from lancedb.index import BTree

    from tasks.embed import FILTER_COLUMNS, ensure_indexes

    s, _ = tiny_home
    shutil.copytree(s.catalog, tmp_path / "catalog")
    table = Catalog(str(tmp_path / "catalog")).table("embeddings")
    for i in table.list_indices():
        if i.columns == ["tree_id"]:
            table.drop_index(i.name)
    table.create_index("tree_id", config=BTree(), name="tree_id_idx")  # what older catalogs have
    ensure_indexes(table)
    on = {}
    for i in table.list_indices():
        on.setdefault(i.columns[0], []).append(i.index_type)
    assert all(on[c] == ["Bitmap"] for c in FILTER_COLUMNS)


def test_vector_index_is_trained_again_once_the_table_outgrows_its_lists(tmp_path):
    """An index trained on a young catalog's few hundred rows has one IVF list; once the table
    holds TIER times the rows its lists were sized for, it is trained again, and search keeps
    finding a row's own vector first."""
    import numpy as np

    from storage.catalog import EMBEDDINGS, TIER
    from tasks.embed import embeddings_schema, ensure_indexes, vector_lists, vector_partitions

    cat = Catalog(str(tmp_path / "catalog"))
    rng = np.random.default_rng(0)
    schema = embeddings_schema(8)

    def rows(start, n):
        v = rng.standard_normal((n, 8)).astype(np.float32)
        return pa.table({"repo_id": [f"o/m{i}" for i in range(start, start + n)], "sha": ["a"] * n,
                         "expert_version": ["v1"] * n, "tree_id": ["o/root"] * n,
                         "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), 8)}).cast(
            pa.schema([schema.field(c) for c in ("repo_id", "sha", "expert_version", "tree_id", "vector")]))

    table = cat.db.create_table(EMBEDDINGS, rows(0, 300))
    assert ensure_indexes(table) and vector_lists(table, "vector_idx") == 1
    big = 4096 * TIER
    table.add(rows(300, big - 300))
    ensure_indexes(table)
    assert vector_lists(table, "vector_idx") == vector_partitions(big) == TIER
    stats = table.index_stats("vector_idx")
    assert stats.num_indexed_rows == big and stats.num_unindexed_rows == 0
    probe = table.search().where("repo_id = 'o/m5000'").limit(1).to_list()[0]["vector"]
    assert table.search(probe).distance_type("cosine").limit(1).to_list()[0]["repo_id"] == "o/m5000"


@pytest.mark.slow  # a full evaluation with baselines: the full suite runs it
def test_eval_json_has_the_shape_scheduled_jobs_read(tiny_home):
    """`probex eval --json`: per tree its task, layer, split sizes and, for ProbeX, Dense and StatNN,
    the task's metrics only (multi-label: accuracy + mAP; zero-shot: top-1 + zero-shot top-1/5 with
    the held-out class count), parameters and training seconds; then the cross-tree experiment."""
    from probex.cli import to_json
    from tasks.pipeline import eval_step

    def strict(token):
        raise AssertionError(f"{token} is not JSON")

    s, _ = tiny_home
    doc = json.loads(to_json(eval_step(s)), parse_constant=strict)  # exactly what --json prints
    per_task = {"multilabel": {"accuracy", "map"},
                "text": {"top1", "zeroshot_top1", "zeroshot_top5", "n_zeroshot_classes"}}
    assert set(doc["trees"]) == {"sentence-transformers/all-MiniLM-L6-v2", "efficientnet/efficientnet-lite0",
                                 "sentence-transformers/paraphrase-MiniLM-L3-v2",
                                 "probex-synthetic/qwen2.5-0.5b-2layers",
                                 "probex-synthetic/stable-diffusion-v1-5-unet-slice"}
    for tree_id, r in doc["trees"].items():
        assert r["task"] in per_task and r["layer"], tree_id
        assert r["n_train"] >= 4 and r["n_val"] >= 1 and r["n_test"] >= 1 and r["n_classes"] >= 2
        other = set().union(*per_task.values()) - per_task[r["task"]]
        for method in ("probex", "dense", "statnn"):
            m = r[method]
            assert per_task[r["task"]] | {"params", "train_seconds"} <= set(m), (tree_id, method)
            assert not other & set(m), (tree_id, method)  # keys of the other task are omitted
            # None: undefined on this split (mAP when no class is both present and absent in it)
            assert all(m[k] is None or 0.0 <= m[k] <= 1.0 for k in per_task[r["task"]]
                       if k != "n_zeroshot_classes"), (tree_id, method, m)
        assert r["probex"]["params"] * 10 <= r["dense"]["params"], tree_id
    zs = doc["trees"]["sentence-transformers/all-MiniLM-L6-v2"]["probex"]
    assert zs["n_zeroshot_classes"] >= 2
    for tree_id, c in doc["cross_tree"]["trees"].items():
        assert doc["trees"][tree_id]["task"] == "multilabel"
        assert {"accuracy", "map"} <= set(c["single"]) and {"accuracy", "map"} <= set(c["expert"])
