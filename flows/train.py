"""Periodic expert (re)training: candidate layers where missing -> train each tree -> promote ->
re-embed the promoted trees."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.common import publish
from flows.ingest import run_extract
from tasks.pipeline import embed_task, list_trees_task, train_tree_task


@flow(name="train-experts", log_prints=True)
def train_experts(trees: list[str] | None = None, home: str | None = None) -> dict:
    """Train every tree (or `trees`); a new expert becomes current only if it validates at least as
    well as the current one; promoted trees are re-embedded."""
    log = get_run_logger()
    extract = run_extract(home, "candidates")
    log.info("extract: %s extracted, %s already there", extract.extracted, extract.skipped)
    reports = {t: train_tree_task(home, t) for t in list_trees_task(home, trees)}
    promoted = [t for t, r in reports.items() if r.promoted]
    embed = embed_task(home, promoted).to_dict() if promoted else {"trees": {}, "skipped": {}, "tag": None}
    publish("train-summary", "train experts", {
        t: {"task": r.task, "layer": r.layer, "val": r.val, "promoted": r.promoted,
            "params": r.params, "seconds": r.train_seconds, "skipped": r.skipped}
        for t, r in reports.items()
    })
    return {"extract": extract.to_dict(), "train": {"trees": {t: r.to_dict() for t, r in reports.items()}},
            "embed": embed}
