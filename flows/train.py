"""Periodic expert (re)training: candidate layers where missing -> train -> promote -> re-embed."""

from __future__ import annotations

from prefect import flow, get_run_logger, task

from flows.common import publish, settings
from flows.ingest import run_extract
from tasks.pipeline import embed_step, train_step


@task(name="train-trees")
def train_task(home: str | None, trees: list[str] | None) -> dict:
    return train_step(settings(home), trees)


@flow(name="train-experts", log_prints=True)
def train_experts(trees: list[str] | None = None, home: str | None = None) -> dict:
    """Train every tree (or `trees`); a new expert becomes current only if it validates at least as
    well as the current one; promoted trees are re-embedded."""
    log = get_run_logger()
    s = settings(home)
    extract = run_extract(home, "candidates")
    log.info("extract: %s extracted, %s already there", extract["extracted"], extract["skipped"])
    trained = train_task(home, trees)
    promoted = [t for t, r in trained["trees"].items() if r["promoted"]]
    embed = embed_step(s, promoted) if promoted else {"trees": {}, "skipped": {}, "tag": None}
    publish("train-summary", "train experts", {
        t: {"task": r["task"], "layer": r["layer"], "val": r["val"], "promoted": r["promoted"],
            "params": r["params"], "seconds": r["train_seconds"], "skipped": r["skipped"]}
        for t, r in trained["trees"].items()
    })
    return {"extract": extract, "train": trained, "embed": embed}
