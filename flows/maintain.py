"""Catalog upkeep on a schedule: disk stays bounded however many nightly runs write to it."""

from __future__ import annotations

from prefect import flow

from flows.common import publish
from tasks.pipeline import maintain_task


@flow(name="maintain-catalog", log_prints=True)
def maintain_catalog(keep_days: float = 14, keep_tags: int = 14, home: str | None = None) -> dict:
    doc = maintain_task(home, keep_days, keep_tags)
    publish("maintain-summary", "maintain catalog", {t: r for t, r in doc["tables"].items()})
    return doc
