"""Upkeep on a schedule: disk and file counts stay bounded however many nightly runs write.

The shards' small files are compacted into parts first (each nightly adds one small file per new
model and layer), then the catalog's tables are compacted, re-indexed and cleaned of old versions.
"""

from __future__ import annotations

from prefect import flow

from flows.common import publish
from storage.compaction import MAX_PARTS
from tasks.compact import compact_task
from tasks.pipeline import maintain_task


@flow(name="maintain-catalog", log_prints=True)
def maintain_catalog(keep_days: float = 14, keep_tags: int = 14, home: str | None = None,
                     compact_shards: bool = True, max_parts: int = MAX_PARTS) -> dict:
    shards = compact_task(home, None, max_parts) if compact_shards else None
    doc = maintain_task(home, keep_days, keep_tags)
    sections = {t: r for t, r in doc["tables"].items()}
    if shards is not None:
        doc["shards"] = shards
        sections["shards"] = {"layers compacted": len(shards["layers"]), "files before": shards["files_before"],
                              "files after": shards["files_after"], "seconds": shards["seconds"]}
    publish("maintain-summary", "maintain catalog", sections)
    return doc
