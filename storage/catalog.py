"""The LanceDB catalog: `models`, `trees`, `embeddings` and `watermarks` tables.

Column names are a contract (ARCHITECTURE.md): notebooks and scheduled jobs read them with plain
LanceDB, pandas, polars or DuckDB. Add columns freely; rename or drop only with a migration.

Writes are upserts (`merge_insert`) keyed on the table's natural key, and only rows that are new or
differ from what is stored are sent, so a re-run adds and changes nothing (and makes no new table
version).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import lancedb
import pyarrow as pa

from probex_core.errors import ProbexError

MODELS = "models"
TREES = "trees"
EMBEDDINGS = "embeddings"
WATERMARKS = "watermarks"

MODEL_KEY = ["repo_id", "sha"]
TREE_KEY = ["tree_id"]
EMBEDDING_KEY = ["repo_id", "sha", "expert_version"]
WATERMARK_KEY = ["source"]

_TS = pa.timestamp("us", tz="UTC")

MODELS_SCHEMA = pa.schema(
    [
        ("repo_id", pa.string()),
        ("sha", pa.string()),
        ("tree_id", pa.string()),  # the root's repo id; null when unassigned
        ("parent", pa.string()),
        ("parents", pa.list_(pa.string())),  # every declared parent (merges have several)
        ("relation", pa.string()),
        ("lineage_source", pa.string()),  # "card" | "weights" | null
        ("status", pa.string()),  # ok | unassigned | quarantined | bad_card | ...
        ("reason", pa.string()),
        ("flags", pa.list_(pa.string())),  # merge, cycle, missing_parent, ...
        ("license", pa.string()),
        ("tags", pa.list_(pa.string())),
        ("datasets", pa.list_(pa.string())),
        ("pipeline_tag", pa.string()),
        ("library_name", pa.string()),
        ("labels", pa.list_(pa.string())),  # as declared (id2label order); null if none
        ("files", pa.list_(pa.struct([("path", pa.string()), ("size", pa.int64())]))),
        ("created_at", _TS),
        ("last_modified", _TS),
        ("route_distances", pa.string()),  # JSON {tree_id: distance} for weight-routed models
        ("adapter_modules", pa.list_(pa.string())),  # LoRA "module|in|out" signature, from the header
        ("source", pa.string()),
    ]
)

TREES_SCHEMA = pa.schema(
    [
        ("tree_id", pa.string()),
        ("root", pa.string()),
        ("n_models", pa.int64()),
        ("n_finetune", pa.int64()),
        ("n_adapter", pa.int64()),
        ("n_other", pa.int64()),
        ("layer", pa.string()),  # the expert's chosen layer; null before training
        ("expert_version", pa.string()),
        ("task", pa.string()),  # multilabel | zeroshot; null before training
        ("candidate_layers", pa.list_(pa.string())),  # layers extraction offers the layer sweep
        ("layer_shapes", pa.string()),  # JSON {layer: [d_H, d_W]} of the candidates
    ]
)

WATERMARKS_SCHEMA = pa.schema(
    [("source", pa.string()), ("watermark", _TS), ("updated_at", _TS)]
)


class CatalogError(ProbexError):
    """The catalog cannot be opened or written; the message names the setting to fix."""


class CatalogMissingError(CatalogError):
    pass


@dataclass
class UpsertResult:
    new: int
    changed: int
    unchanged: int


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Catalog:
    """A LanceDB database at any URI (a local folder by default)."""

    def __init__(self, uri: str, *, create: bool = True):
        self.uri = str(uri)
        local = "://" not in self.uri
        if local:
            path = Path(self.uri)
            if not path.exists() and not create:
                raise CatalogMissingError(
                    f"no catalog at {self.uri}; run `probex ingest` (or `probex demo`) first, "
                    "or point PROBEX_CATALOG / --home at an existing one"
                )
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CatalogError(f"cannot create the catalog folder {self.uri} ({e.strerror}); "
                                   "set PROBEX_CATALOG or --home to a writable place") from None
            if create and not os.access(path, os.W_OK):
                raise CatalogError(f"the catalog folder {self.uri} is read-only; "
                                   "set PROBEX_CATALOG or --home to a writable place")
        self.db = lancedb.connect(self.uri)

    # -- tables -------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.db.list_tables().tables

    def table(self, name: str):
        if not self.has(name):
            raise CatalogMissingError(
                f"the catalog at {self.uri} has no `{name}` table yet; run `probex ingest` first"
            )
        return self.db.open_table(name)

    def _table_for_write(self, name: str, schema: pa.Schema):
        if self.has(name):
            return self.db.open_table(name)
        return self.db.create_table(name, schema=schema)

    def read(self, name: str, where: str | None = None, columns: list[str] | None = None) -> pa.Table:
        """A whole table (or a filtered part) as Arrow; an empty table when it does not exist."""
        if not self.has(name):
            return pa.table({})
        tbl = self.db.open_table(name)
        if where is None and columns is None:
            return tbl.to_arrow()
        q = tbl.search()
        if where:
            q = q.where(where)
        if columns:
            q = q.select(columns)
        return q.limit(None).to_arrow()

    def upsert(self, name: str, rows: list[dict], key: list[str], schema: pa.Schema) -> UpsertResult:
        """Insert new rows, update rows whose content changed, leave identical rows alone."""
        if not rows:
            return UpsertResult(0, 0, 0)
        incoming = pa.Table.from_pylist(rows, schema=schema)
        existing = {}
        if self.has(name):
            for r in self.db.open_table(name).to_arrow().to_pylist():
                existing[tuple(r[k] for k in key)] = r
        new, changed, unchanged, send = 0, 0, 0, []
        for r in incoming.to_pylist():
            k = tuple(r[c] for c in key)
            old = existing.get(k)
            if old is None:
                new += 1
                send.append(r)
            elif _differs(old, r, schema):
                changed += 1
                send.append(r)
            else:
                unchanged += 1
        if send:
            tbl = self._table_for_write(name, schema)
            batch = pa.Table.from_pylist(send, schema=schema)
            # Columns added to the contract after the table was made: add them before the write.
            missing = [f for f in schema if f.name not in tbl.schema.names]
            if missing:
                tbl.add_columns(pa.schema(missing))
            (
                tbl.merge_insert(key)
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .execute(batch)
            )
        return UpsertResult(new, changed, unchanged)

    # -- models and trees ---------------------------------------------------------------------
    def upsert_models(self, rows: list[dict]) -> UpsertResult:
        return self.upsert(MODELS, rows, MODEL_KEY, MODELS_SCHEMA)

    def tree_children(self, tree_id: str, models: list[dict] | None = None) -> list[dict]:
        """The tree's current, readable fine-tunes (not the root, not superseded or quarantined):
        what experts train on and embed. `models` reuses rows already read."""
        rows = self.read(MODELS).to_pylist() if models is None else models
        return [r for r in rows if r["tree_id"] == tree_id and r["status"] == "ok" and r["repo_id"] != tree_id]

    def upsert_trees(self, rows: list[dict]) -> UpsertResult:
        return self.upsert(TREES, rows, TREE_KEY, TREES_SCHEMA)

    # -- watermarks ---------------------------------------------------------------------------
    def watermark(self, source: str) -> datetime | None:
        rows = self.read(WATERMARKS).to_pylist()
        for r in rows:
            if r["source"] == source:
                return r["watermark"]
        return None

    def set_watermark(self, source: str, value: datetime) -> None:
        """Call only after the rows up to `value` are committed (the watermark never runs ahead)."""
        self.upsert(
            WATERMARKS,
            [{"source": source, "watermark": value, "updated_at": _now()}],
            WATERMARK_KEY,
            WATERMARKS_SCHEMA,
        )

    def versions(self, name: str) -> int:
        return self.table(name).version


def _differs(old: dict, new: dict, schema: pa.Schema) -> bool:
    for f in schema:
        a, b = old.get(f.name), new.get(f.name)
        if a != b:
            return True
    return False

