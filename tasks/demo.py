"""The demo's own steps: build the bundled lake, and ask the catalog the lake's example questions."""

from __future__ import annotations

from prefect import task

from probex_core.settings import configure

EXAMPLES_PER_TREE = 2


@task(name="build-lake")
def build_lake_task(home: str | None, size: str, seed: int, out: str | None = None) -> dict:
    """Resumable: a re-run finishes what a killed run left."""
    from zoo.build import build_lake  # torch, transformers: only when a lake is built

    s = configure(home)
    return build_lake(out or s.lake, size=size, seed=seed, progress=True).to_dict()


def example_queries(gt_path, per_tree: int = EXAMPLES_PER_TREE) -> list[tuple[str, str, str]]:
    """(query, tree, why) pairs: held-out classes first (zero-shot), then training classes; none from
    the synthetic trees (generated weights: they claim no accuracy)."""
    import pyarrow.parquet as pq

    rows = sorted(pq.read_table(gt_path).to_pylist(), key=lambda r: r["repo_id"])
    out, seen = [], set()
    for split, why in (("holdout", "held-out class (zero-shot)"), ("test", "training class")):
        per: dict[str, int] = {}
        for r in rows:
            if r["split"] != split or not r["root"] or r["corrupt"] or r.get("synthetic"):
                continue
            if split == "holdout" and len(r["classes"]) != 1:
                continue
            cls = r["classes"][0]
            if (cls, r["root"]) in seen or per.get(r["root"], 0) >= per_tree:
                continue
            seen.add((cls, r["root"]))
            per[r["root"]] = per.get(r["root"], 0) + 1
            out.append((cls, r["root"], why))
    return out


def example_searches(home: str | None, k: int = 5) -> list[dict]:
    """Each example query's top `k`, with the lake's ground truth beside each hit."""
    import pyarrow.parquet as pq

    from storage.query import CatalogQuery, QueryError

    s = configure(home)
    gt_path = s.lake / "_ground_truth.parquet"
    truth = {r["repo_id"]: r["classes"] for r in pq.read_table(gt_path, columns=["repo_id", "classes"]).to_pylist()}
    q = CatalogQuery(s.catalog, str(s.experts), s.text_encoder)
    out = []
    for text, tree, why in example_queries(gt_path):
        try:
            df = q.search(text, k=k)
        except QueryError as e:
            out.append({"query": text, "tree": tree, "why": why, "error": str(e)})
            continue
        hits = [{"repo_id": r.repo_id, "score": float(r.score), "truth": truth.get(r.repo_id)}
                for r in df.itertuples()]
        out.append({"query": text, "tree": tree, "why": why, "hits": hits,
                    "hit@5": any(text in (h["truth"] or []) for h in hits)})
    return out


example_searches_task = task(name="example-searches")(example_searches)
