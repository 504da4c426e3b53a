"""The pipeline's steps as plain functions of Settings: what the CLI calls directly and what the
Prefect flows wrap as tasks. Each returns a JSON-able summary."""

from __future__ import annotations

import json
from datetime import datetime

from probex_core.settings import Settings
from probex_core.errors import ProbexError
from storage.catalog import MODELS, Catalog
from storage.extract import ExtractJob
from storage.repos import source_from_name
from storage.sources import open_source
from tasks.crawl import crawl_source
from tasks.dask_cluster import check_scheduler
from tasks.embed import embed_trees
from tasks.extract import jobs_for_tree, plan_candidate_layers, run_extraction, tree_members


def catalog_for(settings: Settings, create: bool = True) -> Catalog:
    return Catalog(settings.catalog, create=create)


def crawl_step(settings: Settings, source: str, since: datetime | None = None,
               until: datetime | None = None, limit: int | None = None, incremental: bool = True,
               advance_watermark: bool = True) -> dict:
    return crawl_source(open_source(source), catalog_for(settings), since=since, until=until,
                        limit=limit, incremental=incremental,
                        advance_watermark=advance_watermark).to_dict()


def tree_ids(catalog: Catalog, trees: list[str] | None = None) -> list[str]:
    known = sorted(t["tree_id"] for t in catalog.read("trees").to_pylist())
    if trees:
        missing = [t for t in trees if t not in known]
        if missing:
            raise ProbexError(f"no tree {missing[0]} in the catalog; `probex trees` lists them")
        return list(trees)
    return known


def extract_step(settings: Settings, trees: list[str] | None = None, layers: list[str] | None = None,
                 mode: str = "auto", on_result=None) -> dict:
    if settings.dask_address:
        check_scheduler(settings.dask_address)
    jobs, plans = plan_extraction(settings, trees, layers, mode)
    summary = run_extraction(jobs, dask_address=settings.dask_address, n_workers=settings.dask_workers,
                             on_result=on_result)
    record_quarantine(catalog_for(settings), summary.results)
    doc = summary.to_dict()
    doc["layers"] = plans
    return doc


def plan_extraction(settings: Settings, trees: list[str] | None = None, layers: list[str] | None = None,
                    mode: str = "auto") -> tuple[list[ExtractJob], dict[str, list[str]]]:
    """One job per model of each tree, for: `layers` when given; else the tree expert's layer when
    it has one (mode "auto"), else every candidate layer (mode "candidates", or no expert yet)."""
    catalog = catalog_for(settings)
    models = [r for r in catalog.read(MODELS).to_pylist() if r["status"] != "superseded"]
    tree_rows = {t["tree_id"]: t for t in catalog.read("trees").to_pylist()}
    jobs, plans = [], {}
    for tree_id in tree_ids(catalog, trees):
        members = tree_members(models, tree_id)
        if not members:
            continue
        source = source_from_name(members[0]["source"])
        row = tree_rows.get(tree_id) or {"tree_id": tree_id, "root": tree_id}
        shapes = _candidate_shapes(catalog, source, models, row)
        if layers:
            wanted = list(layers)
        elif mode == "auto" and row.get("layer"):
            wanted = [row["layer"]]
        else:
            wanted = sorted(shapes)
        unknown = [l for l in wanted if l not in shapes]
        if unknown and shapes:
            raise ProbexError(f"tree {tree_id} has no layer {unknown[0]!r}; its layers: "
                              f"{', '.join(sorted(shapes)[:6])}{' ...' if len(shapes) > 6 else ''}")
        plans[tree_id] = wanted
        jobs += jobs_for_tree(source, models, tree_id, {l: shapes.get(l) for l in wanted}, settings.shards)
    return jobs, plans


def _candidate_shapes(catalog: Catalog, source, models: list[dict], row: dict) -> dict[str, tuple[int, int]]:
    """A tree's candidate layers and shapes: planned once from a sample, then kept in `trees`."""
    if row.get("layer_shapes"):
        return {k: tuple(v) for k, v in json.loads(row["layer_shapes"]).items()}
    shapes = plan_candidate_layers(source, models, row["tree_id"])
    if shapes:
        catalog.upsert_trees([{**row, "candidate_layers": sorted(shapes),
                               "layer_shapes": json.dumps({k: list(v) for k, v in shapes.items()})}])
    return shapes


def record_quarantine(catalog: Catalog, results) -> None:
    """Quarantined models get status + reason; a model that now extracts cleanly is ok again."""
    current = {(r["repo_id"], r["sha"]): r for r in catalog.read(MODELS).to_pylist()}
    updates = []
    for res in results:
        row = current.get((res.repo_id, res.sha))
        if row is None:
            continue
        if res.status == "quarantined":
            updates.append({**row, "status": "quarantined", "reason": res.reason})
        elif row["status"] == "quarantined":
            updates.append({**row, "status": "ok", "reason": None})
    catalog.upsert_models(updates)


def train_step(settings: Settings, trees: list[str] | None = None, layers: list[str] | None = None,
               strategies=("fast",)) -> dict:
    from probex_core.text_encoder import TextEncoder
    from tasks.train import train_tree  # torch and sklearn: only for the steps that train

    catalog = catalog_for(settings)
    encoder = TextEncoder(settings.text_encoder, cache_dir=str(settings.home / "text-cache"))
    out = {}
    for tree_id in tree_ids(catalog, trees):
        out[tree_id] = train_tree(catalog, settings.shards, str(settings.experts), tree_id, encoder=encoder,
                                  layers=layers, strategies=strategies, device=settings.device).to_dict()
    return {"trees": out}


def embed_step(settings: Settings, trees: list[str] | None = None) -> dict:
    return embed_trees(catalog_for(settings), settings.shards, str(settings.experts), trees).to_dict()


def eval_step(settings: Settings, trees: list[str] | None = None, lake: str | None = None,
              baselines: bool = True, cross: bool = True) -> dict:
    from probex_core.text_encoder import TextEncoder
    from tasks.evaluate import cross_tree, evaluate_tree, load_ground_truth, tree_splits

    catalog = catalog_for(settings, create=False)
    gt = load_ground_truth(lake or settings.lake)
    encoder = TextEncoder(settings.text_encoder, cache_dir=str(settings.home / "text-cache"))
    splits = {t: tree_splits(catalog, settings.shards, str(settings.experts), t, gt)
              for t in tree_ids(catalog, trees)}
    doc = {"trees": {t: evaluate_tree(sp, encoder, baselines=baselines, device=settings.device)
                     for t, sp in splits.items()}}
    if cross:
        doc["cross_tree"] = cross_tree(splits)
    return doc
