"""Shard compaction as a pipeline step: every (tree, layer) whose small files (or too many open
parts) call for it is compacted (storage/compaction.py), one layer after another."""

from __future__ import annotations

from prefect import task

from probex_core.errors import ProbexError
from probex_core.settings import Settings, configure
from storage.compaction import MAX_PARTS, compact_all
from storage.shards import layers_of
from tasks.pipeline import transient


def compact_step(settings: Settings, trees: list[str] | None = None, max_parts: int | None = None) -> dict:
    """Compact the shards of `trees` (default: every tree with shards); the JSON-able summary."""
    max_parts = MAX_PARTS if max_parts is None else max_parts
    if max_parts < 1:
        raise ProbexError("max_parts must be >= 1")
    for tree in trees or []:
        if not layers_of(settings.shards, tree):
            raise ProbexError(f"no shards of tree {tree} under {settings.shards}; `probex trees` lists the trees")
    reports = compact_all(settings.shards, trees, max_parts=max_parts)
    return {"layers": [r.to_dict() for r in reports], "max_parts": max_parts,
            "files_before": sum(r.small_files + r.parts_before for r in reports),
            "files_after": sum(r.parts_after for r in reports),
            "seconds": sum(r.seconds for r in reports)}


@task(name="compact-shards", retries=1, retry_delay_seconds=60, retry_condition_fn=transient)
def compact_task(home: str | None, trees: list[str] | None = None, max_parts: int = MAX_PARTS) -> dict:
    """A compaction killed or failed half-way is safe to run again (the layer stays readable)."""
    return compact_step(configure(home), trees, max_parts)
