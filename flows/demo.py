"""The one-command demo: build the lake if absent -> ingest -> train experts -> evaluate -> search."""

from __future__ import annotations

import time

from prefect import flow

from flows.common import publish, settings
from flows.ingest import ingest
from flows.lake import build_lake
from flows.train import train_experts
from tasks.pipeline import eval_step

EXAMPLES_PER_TREE = 2


def example_queries(gt_path, per_tree: int = EXAMPLES_PER_TREE) -> list[tuple[str, str, str]]:
    """(query, tree, why) pairs: held-out classes first (zero-shot), then training classes."""
    import pyarrow.parquet as pq

    rows = pq.read_table(gt_path).to_pylist()
    out, seen = [], set()
    for split, why in (("holdout", "held-out class (zero-shot)"), ("test", "training class")):
        per = {}
        for r in sorted(rows, key=lambda r: r["repo_id"]):
            if r["split"] != split or not r["root"] or r["corrupt"] or len(r["classes"]) != 1 and split == "holdout":
                continue
            cls = r["classes"][0]
            if (cls, r["root"]) in seen or per.get(r["root"], 0) >= per_tree:
                continue
            seen.add((cls, r["root"]))
            per[r["root"]] = per.get(r["root"], 0) + 1
            out.append((cls, r["root"], why))
    return out


@flow(name="demo", log_prints=True)
def demo(size: str = "small", home: str | None = None) -> dict:
    from zoo.build import lake_is_complete  # here, as in flows.lake: the zoo imports torch

    s = settings(home)
    stages = {}
    t = time.perf_counter()
    lake = build_lake(size=size, seed=0, home=home) if not lake_is_complete(s.lake) else None
    stages["build lake"] = time.perf_counter() - t
    t = time.perf_counter()
    ingested = ingest(source=str(s.lake), home=home)
    stages["ingest (crawl, extract, embed)"] = time.perf_counter() - t
    t = time.perf_counter()
    trained = train_experts(home=home)
    stages["train experts (+ candidate layers, re-embed)"] = time.perf_counter() - t
    t = time.perf_counter()
    evaluated = eval_step(s, baselines=False, cross=False)
    stages["evaluate"] = time.perf_counter() - t
    t = time.perf_counter()
    searches = []
    from storage.query import CatalogQuery, QueryError

    q = CatalogQuery(s.catalog, str(s.experts), s.text_encoder)
    for text, tree, why in example_queries(s.lake / "_ground_truth.parquet"):
        try:
            df = q.search(text, k=5)
        except QueryError as e:
            searches.append({"query": text, "tree": tree, "why": why, "error": str(e)})
            continue
        import pyarrow.parquet as pq

        gt = {r["repo_id"]: r["classes"] for r in pq.read_table(s.lake / "_ground_truth.parquet").to_pylist()}
        hits = [{"repo_id": r.repo_id, "score": float(r.score), "truth": gt.get(r.repo_id)} for r in df.itertuples()]
        searches.append({"query": text, "tree": tree, "why": why, "hits": hits,
                         "hit@5": any(text in (h["truth"] or []) for h in hits)})
    stages["example searches"] = time.perf_counter() - t
    doc = {"stages": stages, "lake": lake, "ingest": ingested, "train": trained["train"],
           "eval": evaluated, "searches": searches}
    publish("demo-summary", "demo", {"stage seconds": {k: round(v, 1) for k, v in stages.items()}})
    return doc
