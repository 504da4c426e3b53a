"""What a nightly's crawl window touched: the models extraction and embedding must see.

One indexed query for the models modified since the watermark the crawl started from, and one for
the models an earlier run's crashed worker left to read again; grouped by tree. A nightly's cost
then follows its new uploads, whatever the catalog holds.
"""

from __future__ import annotations

from datetime import datetime, timezone

from storage.catalog import MODELS, Catalog


def changed_rows(catalog: Catalog, since: datetime, columns: list[str] | None = None) -> dict[str, list[dict]]:
    """tree id -> its current models modified from `since` on, or waiting for a retry."""
    since = since.replace(tzinfo=timezone.utc) if since.tzinfo is None else since
    stamp = since.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")
    found: dict[tuple[str, str], dict] = {}
    for where in (f"last_modified >= TIMESTAMP '{stamp}' AND status != 'superseded'",
                  "status = 'quarantined' AND reason LIKE 'worker_failed%'"):
        for r in catalog.read(MODELS, where=f"{where} AND tree_id IS NOT NULL", columns=columns).to_pylist():
            found[(r["repo_id"], r["sha"])] = r
    by_tree: dict[str, list[dict]] = {}
    for r in found.values():
        by_tree.setdefault(r["tree_id"], []).append(r)
    return by_tree
