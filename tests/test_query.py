"""The query API's vector search: the tree filter runs before or after the search depending on the
tree's share of rows; both plans must return exactly the tree's nearest models."""

from __future__ import annotations

import numpy as np
import pytest

from probex_core.heads import TEXT
import storage.query as query_mod
from storage.query import CatalogQuery


@pytest.fixture
def q(tiny_home):
    s, _ = tiny_home
    return CatalogQuery(s.catalog, str(s.experts))


def exact_nearest(q: CatalogQuery, tree_id: str, version: str, vector: np.ndarray, k: int) -> list[str]:
    rows = [r for r in q.catalog.read("embeddings").to_pylist()
            if r["tree_id"] == tree_id and r["expert_version"] == version]
    E = np.stack([np.asarray(r["vector"], np.float32) for r in rows])
    cos = E @ vector / (np.linalg.norm(E, axis=1) * np.linalg.norm(vector))
    return [rows[i]["repo_id"] for i in np.argsort(-cos)[:k]]


@pytest.mark.parametrize("share", [0.0, 1.01])  # 0.0: always filter after; 1.01: always before
def test_both_filter_plans_return_the_trees_exact_nearest(q, monkeypatch, share):
    monkeypatch.setattr(query_mod, "POSTFILTER_SHARE", share)
    rng = np.random.default_rng(0)
    for t in q.trees().values():
        v = rng.standard_normal(t.expert.probex_config.r_T).astype(np.float32)
        found = q.nearest(v, t.tree_id, t.version, 3, ["repo_id"])
        assert found.column_names == ["repo_id", "_distance"]
        assert found["repo_id"].to_pylist() == exact_nearest(q, t.tree_id, t.version, v, 3), t.tree_id


def test_a_where_clause_narrows_the_search(q):
    t = next(iter(q.trees().values()))
    v = np.ones(t.expert.probex_config.r_T, np.float32)
    first = q.nearest(v, t.tree_id, t.version, 1, ["repo_id"])["repo_id"][0].as_py()
    again = q.nearest(v, t.tree_id, t.version, 1, ["repo_id"], where=f"repo_id != '{first}'")
    assert again["repo_id"][0].as_py() != first


def test_text_probe_trees_score_the_same_whole_or_from_vector_candidates(q, monkeypatch):
    """A text-probe tree smaller than SCAN_ROWS is re-ranked whole; a larger one re-ranks its vector
    candidates. When the candidates cover the tree (tiny lake: fewer models than the depth), both
    plans must give the same models with the same fused, calibrated scores."""
    t = next(t for t in q.trees().values() if t.head is TEXT)
    assert t.probe  # the tiny lake's L6 layers take text-encoder-sized inputs: the probe is on
    assert q._count(t.tree_id, t.version) <= query_mod.CANDIDATES_PER_TREE
    whole = q.search("a domestic animal", k=5, tree=t.tree_id)
    monkeypatch.setattr(query_mod, "SCAN_ROWS", 0)
    candidates = q.search("a domestic animal", k=5, tree=t.tree_id)
    assert whole["repo_id"].tolist() == candidates["repo_id"].tolist()
    assert np.allclose(whole["score"], candidates["score"], atol=1e-6)
    # every row carries its factor, and classify uses it: the scores are a distribution over labels
    rows = [r for r in q.catalog.read("embeddings").to_pylist() if r["tree_id"] == t.tree_id]
    cfg = t.expert.probex_config
    assert all(len(r["probe_factor"]) == cfg.probe_rank * cfg.d_W for r in rows)
    scores = q.classify(rows[0]["repo_id"], ["dog", "vehicle", "fruit"])["score"]
    assert abs(float(scores.sum()) - 1.0) < 1e-5
