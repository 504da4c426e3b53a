"""Periodic expert (re)training: candidate layers where missing -> train each tree -> promote ->
re-embed the promoted trees.

Training and embedding run on the Dask runner (the scheduler at PROBEX_DASK_ADDRESS, else a
LocalCluster): each tree's expert is its own task, trees in parallel, then the promoted trees are
embedded on the same workers. When the cluster's workers advertise GPUs (`dask worker --resources
GPU=1`) both ask for one; the device itself is chosen on the worker that runs them.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.futures import as_completed

from flows.common import dask_runner, publish, settings
from flows.ingest import run_extract
from tasks.dask_cluster import cluster_capacity, on_gpus, quiet_cluster_config, submit_bounded
from tasks.pipeline import CLUSTER_TRAIN_TIMEOUT_S, embed_task, largest_first, list_trees_task, train_tree_task


@flow(name="train-trees", validate_parameters=False)  # the reports are our own typed records
def train_trees(home: str | None, trees: list[str], gpus: float = 0, slots: int = 1) -> tuple[dict, object | None]:
    """One training task per tree on the Dask runner, `slots` side by side (largest tree first, the
    next as one finishes), then one embedding task for the promoted trees (each tree's models in
    one batch) on the same workers. `gpus`: what the cluster advertises (0: any worker)."""
    with on_gpus(gpus):
        futures = submit_bounded(trees, lambda t: train_tree_task.submit(home, t), slots,
                                 lambda pending: next(as_completed(pending, timeout=CLUSTER_TRAIN_TIMEOUT_S)))
        reports = {t: futures[t].result(timeout=CLUSTER_TRAIN_TIMEOUT_S) for t in trees}
        promoted = [t for t, r in reports.items() if r.promoted]
        # One task, not one per tree: embedding writes one LanceDB table, and parallel writers
        # of one table would conflict on its commits.
        embed = embed_task.submit(home, promoted).result(timeout=CLUSTER_TRAIN_TIMEOUT_S) if promoted else None
    return reports, embed


@flow(name="train-experts", log_prints=True)
def train_experts(trees: list[str] | None = None, home: str | None = None) -> dict:
    """Train every tree (or `trees`); a new expert becomes current only if it validates at least as
    well as the current one; promoted trees are re-embedded."""
    log = get_run_logger()
    s = settings(home)
    extract = run_extract(home, "candidates")
    log.info("extract: %s extracted, %s already there", extract.extracted, extract.skipped)
    names = list_trees_task(home, trees)
    gpus, slots = cluster_capacity(s.dask_address, s.dask_workers)
    reports, embed = {}, None
    if names:
        with quiet_cluster_config():  # prefect-dask starts its LocalCluster inside
            reports, embed = train_trees.with_options(task_runner=dask_runner(s))(
                home, largest_first(s, names), gpus, slots)
    embed = embed.to_dict() if embed is not None else {"trees": {}, "skipped": {}, "tag": None}
    publish("train-summary", "train experts", {
        t: {"task": r.task, "layer": r.layer, "val": r.val, "promoted": r.promoted,
            "params": r.params, "seconds": r.train_seconds, "skipped": r.skipped}
        for t, r in reports.items()
    })
    return {"extract": extract.to_dict(), "train": {"trees": {t: r.to_dict() for t, r in reports.items()}},
            "gpus": gpus, "embed": embed}
