"""The LanceDB catalog: `models`, `trees`, `embeddings` and `watermarks` tables.

Column names are a contract (ARCHITECTURE.md): notebooks and scheduled jobs read them with plain
LanceDB, pandas, polars or DuckDB. Add columns freely; rename or drop only with a migration.

Writes are upserts (`merge_insert`) keyed on the table's natural key, and only rows that are new or
differ from what is stored are sent, so a re-run adds and changes nothing (and makes no new table
version).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import lancedb
import pyarrow as pa

from probex_core.errors import ProbexError
from probex_core.settings import ENV_CATALOG
from storage.fs import StorageError, exists, is_local, lance_storage_options, local_path, resolve, translate

MODELS = "models"
TREES = "trees"
EMBEDDINGS = "embeddings"
WATERMARKS = "watermarks"

MODEL_KEY = ["repo_id", "sha"]
TREE_KEY = ["tree_id"]
EMBEDDING_KEY = ["repo_id", "sha", "expert_version"]
WATERMARK_KEY = ["source"]
ROW_HASH = "row_hash"  # content digest of the other columns: what an upsert compares
# A table whose key spans several columns is merged on their join, one indexed column: a merge on
# several columns joins by scanning every stored key, so its memory and time follow the table.
ROW_KEY = "row_key"
KEY_SEPARATOR = "\x1f"
# Filtered columns per table: BTREE for keys of many values, BITMAP for a handful (status).
SCALAR_INDEXES = {
    # last_modified: a nightly's window; parent: a crawl's descendants of a repo whose lineage moved
    MODELS: {ROW_KEY: "btree", "repo_id": "btree", "tree_id": "btree", "status": "bitmap",
             "last_modified": "btree", "parent": "btree"},
    EMBEDDINGS: {ROW_KEY: "btree"},
    TREES: {"tree_id": "btree"},
}
# Maintenance rewrites what is new and leaves what has settled (LSM-like tiers), for files and
# index deltas alike: a fragment or delta holding TIER times the rows of all newer ones together
# stays as written. Rewriting settled data every night would cost what the catalog holds, and
# every version a tag keeps would pin its own copy of it.
TIER = 4
DELETED_SHARE = 0.1  # a settled fragment with this share of its rows deleted is rewritten anyway
LOOKUP_CHUNK = 500  # values per IN (...) filter (an upsert's stored hashes, a crawl's lookups)
_ABSENT = object()

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
        # full | sharded | peft | lora | single | none (storage.records.weights_kind): a single
        # safetensors file of no telling name as its header showed it (lora or full; "single" when
        # unread); null in rows written before the column (then told from the file names)
        ("weights_kind", pa.string()),
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


CONTRACTS = {MODELS: MODELS_SCHEMA, TREES: TREES_SCHEMA, WATERMARKS: WATERMARKS_SCHEMA}


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
    """A LanceDB database in a folder (the default) or on an object store (s3://bucket/prefix, ...)."""

    def __init__(self, uri: str, *, create: bool = True):
        self.uri = str(uri)
        if is_local(self.uri):
            path = Path(local_path(self.uri))
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
            self.db = lancedb.connect(str(path))
            return
        # An object store: check the bucket, endpoint and credentials through storage/fs.py first
        # (one line naming the setting, bounded by our timeouts), then let LanceDB open it with the
        # same endpoint and timeouts; its own store reads the credentials from the environment.
        try:
            fs, path = resolve(self.uri, ENV_CATALOG)
            with translate(self.uri, ENV_CATALOG):
                found = exists(fs, path)
        except StorageError as e:
            raise CatalogError(str(e)) from None
        if not found and not create:
            raise CatalogMissingError(
                f"no catalog at {self.uri}; run `probex ingest` (or `probex demo`) first, "
                "or point PROBEX_CATALOG at an existing one"
            )
        self.db = lancedb.connect(self.uri, storage_options=lance_storage_options(self.uri))

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
        """A whole table (or a filtered part) as Arrow; an empty table when it does not exist.
        A projected column the table lacks (added to the contract after the table was made) reads
        as nulls of its contract type, as its stored rows get it once a write adds the column."""
        if not self.has(name):
            return pa.table({})
        tbl = self.db.open_table(name)
        if where is None and columns is None:
            return tbl.to_arrow()
        q = tbl.search()
        if where:
            q = q.where(where)
        missing = [c for c in columns or () if c not in tbl.schema.names]
        if columns:
            q = q.select([c for c in columns if c not in missing])
        out = q.limit(None).to_arrow()
        contract = CONTRACTS.get(name)
        for c in missing:
            kind = contract.field(c).type if contract is not None and c in contract.names else pa.string()
            out = out.append_column(pa.field(c, kind), pa.nulls(len(out), kind))
        return out.select(columns) if missing else out

    def upsert(self, name: str, rows: list[dict], key: list[str], schema: pa.Schema) -> UpsertResult:
        """Insert new rows, update rows whose content changed, leave identical rows alone.

        Cost follows the rows given, not the table: the stored content hashes of just their keys
        are read (a filtered, projected query), and only new or changed rows are merged."""
        if not rows:
            return UpsertResult(0, 0, 0)
        schema = with_hash(schema)
        incoming = pa.Table.from_pylist(rows, schema=schema.remove(schema.get_field_index(ROW_HASH)))
        records = incoming.to_pylist()  # Arrow's canonical values: the hash of a row read back is the same
        hashes = [row_hash(r) for r in records]
        stored = self._stored_hashes(name, key, records)
        new, changed, send = 0, 0, []
        for r, h in zip(records, hashes):
            old = stored.get(tuple(r[c] for c in key), _ABSENT)
            if old is _ABSENT:
                new += 1
            elif old != h:
                changed += 1
            else:
                continue
            send.append({**r, ROW_HASH: h})
        if send:
            payload = pa.Table.from_pylist(send, schema=schema)
            on = key[0]
            if len(key) > 1:
                on = ROW_KEY
                payload = payload.append_column(ROW_KEY, joined_key(payload, key))
            tbl = self._table_for_write(name, payload.schema)
            fresh_table = tbl.count_rows() == 0
            # Columns added to the contract after the table was made: add them before the write
            # (the joined key computed from the stored key columns, so stored rows still match).
            if on == ROW_KEY and ROW_KEY not in tbl.schema.names:
                tbl.add_columns({ROW_KEY: _joined_key_sql(key)})
                self.ensure_scalar_indexes(name)
            missing = [f for f in payload.schema if f.name not in tbl.schema.names]
            if missing:
                tbl.add_columns(pa.schema(missing))
            (
                tbl.merge_insert(on)
                # a concurrent writer may have stored the same content since we looked
                .when_matched_update_all(where=f"target.{ROW_HASH} IS NULL OR target.{ROW_HASH} != source.{ROW_HASH}")
                .when_not_matched_insert_all()
                .execute(payload)
            )
            if fresh_table:
                self.ensure_scalar_indexes(name)
        return UpsertResult(new, changed, len(records) - new - changed)

    def ensure_scalar_indexes(self, name: str) -> list[str]:
        """Indexes on the columns steps filter by (SCALAR_INDEXES); rows written after an index
        was built are still found (scanned) until `maintain` folds them in. Returns those made."""
        if not self.has(name):
            return []
        tbl = self.db.open_table(name)
        have = {tuple(i.columns) for i in tbl.list_indices()}
        made = []
        for column, kind in SCALAR_INDEXES.get(name, {}).items():
            if (column,) not in have and column in tbl.schema.names:
                from lancedb.index import Bitmap, BTree

                tbl.create_index(column, config=BTree() if kind == "btree" else Bitmap(), name=f"{column}_idx")
                made.append(column)
        return made

    def maintain(self, keep_days: float = 14, keep_tags: int = 7) -> dict[str, dict]:
        """Compact every table, fold new rows into its indexes, drop versions older than
        `keep_days` and all but the newest `keep_tags` tags (a tag pins its version's files).
        Readers are unaffected: they see the last committed version throughout."""
        report = {}
        for name in self.db.list_tables().tables:
            tbl = self.db.open_table(name)
            tags = sorted(tbl.tags.list().items(), key=lambda kv: kv[1]["version"])
            dropped = [name for name, _ in tags[:max(0, len(tags) - keep_tags)]]
            for tag in dropped:
                tbl.tags.delete(tag)
            self.ensure_scalar_indexes(name)
            before = tbl.version
            rewritten = optimize_table(tbl)
            # Tagged versions older than the cut stay (their tag pins them); the rest go.
            stats = tbl.to_lance().cleanup_old_versions(older_than=timedelta(days=keep_days),
                                                        error_if_tagged_old_versions=False)
            report[name] = {"version_before": before, "version": tbl.version,
                            "tags_dropped": len(dropped), "tags_kept": len(tags) - len(dropped),
                            "versions_removed": stats.old_versions, "bytes_removed": stats.bytes_removed,
                            **rewritten}
        return report

    def _stored_hashes(self, name: str, key: list[str], records: list[dict]) -> dict[tuple, str | None]:
        """{key: stored content hash (None for a row written before hashes)} for these records'
        keys only, filtered on the first key column in LanceDB."""
        if not self.has(name):
            return {}
        tbl = self.db.open_table(name)
        has_hash = ROW_HASH in tbl.schema.names
        first = sorted({r[key[0]] for r in records})
        out: dict[tuple, str | None] = {}
        for i in range(0, len(first), LOOKUP_CHUNK):
            chunk = ", ".join(sql_literal(v) for v in first[i:i + LOOKUP_CHUNK])
            q = tbl.search().where(f"{key[0]} IN ({chunk})").select(key + ([ROW_HASH] if has_hash else []))
            for r in q.limit(None).to_arrow().to_pylist():
                out[tuple(r[c] for c in key)] = r.get(ROW_HASH)
        return out

    # -- models and trees ---------------------------------------------------------------------
    def upsert_models(self, rows: list[dict]) -> UpsertResult:
        return self.upsert(MODELS, rows, MODEL_KEY, MODELS_SCHEMA)

    def tree_children(self, tree_id: str, models: list[dict] | None = None,
                      columns: list[str] | None = None) -> list[dict]:
        """The tree's current, readable fine-tunes (not the root, not superseded or quarantined):
        what experts train on and embed. `models` reuses rows already read; else only this
        tree's rows (and `columns`) are read, filtered in LanceDB."""
        if models is None:
            where = f"tree_id = {sql_literal(tree_id)} AND status = 'ok' AND repo_id != {sql_literal(tree_id)}"
            return self.read(MODELS, where=where, columns=columns).to_pylist()
        return [r for r in models if r["tree_id"] == tree_id and r["status"] == "ok" and r["repo_id"] != tree_id]

    def model(self, repo_id: str, columns: list[str] | None = None) -> dict | None:
        """The repo's current row (its newest sha that is not superseded), or None."""
        where = f"repo_id = {sql_literal(repo_id)} AND status != 'superseded'"
        rows = self.read(MODELS, where=where, columns=columns).to_pylist()
        return rows[0] if rows else None

    def tree(self, tree_id: str) -> dict | None:
        """The tree's row, or None when the catalog has no such tree."""
        rows = self.read(TREES, where=f"tree_id = {sql_literal(tree_id)}").to_pylist()
        return rows[0] if rows else None

    def upsert_trees(self, rows: list[dict]) -> UpsertResult:
        return self.upsert(TREES, rows, TREE_KEY, TREES_SCHEMA)

    # -- watermarks ---------------------------------------------------------------------------
    def watermark(self, source: str) -> datetime | None:
        rows = self.read(WATERMARKS, where=f"source = {sql_literal(source)}", columns=["watermark"]).to_pylist()
        return rows[0]["watermark"] if rows else None

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


def settled(rows: list[int], tier: int = TIER) -> int:
    """For pieces oldest first (fragments, index deltas) with these row counts: how many of the
    oldest stay as written, each holding at least `tier` times the rows of all newer pieces
    together. The rest merge into one (a contiguous run: LanceDB merges neighbours only)."""
    newer = [0] * len(rows)
    for i in range(len(rows) - 2, -1, -1):
        newer[i] = newer[i + 1] + rows[i + 1]
    return next((i for i, (n, after) in enumerate(zip(rows, newer)) if n <= 0 or n < tier * after), len(rows))


def optimize_table(tbl) -> dict[str, int]:
    """Compact a table's unsettled newest fragments and fold its unindexed rows into each index,
    merging only its unsettled newest deltas (`settled`): cost follows the rows written since the
    last time, not the table. Returns the fragments rewritten and the index deltas merged."""
    ds = tbl.to_lance()
    frags = ds.get_fragments()
    live = [f.count_rows() for f in frags]
    stay = settled(live)
    # a settled fragment with many rows deleted is rewritten alone (its deletions dropped)
    excluded = [f.fragment_id for f, n in zip(frags[:stay], live) if n >= (1 - DELETED_SHARE) * f.metadata.physical_rows]
    merged = 0
    for index in ds.describe_indices():
        stats = ds.stats.index_stats(index.name)
        deltas = stats.get("num_indexed_rows_per_delta") or []
        unindexed = stats.get("num_unindexed_rows") or 0
        merge = len(deltas) - min(len(deltas), settled(deltas + [unindexed]))
        if merge or unindexed:  # the unsettled deltas and the unindexed rows become one delta
            ds.optimize.optimize_indices(index_names=[index.name], num_indices_to_merge=merge)
            merged += merge
    metrics = ds.optimize.compact_files(excluded_fragment_ids=excluded)
    tbl.checkout_latest()
    return {"fragments_compacted": metrics.fragments_removed, "index_deltas_merged": merged}


def joined_key(table: pa.Table, key: list[str]) -> pa.Array:
    """The key columns of each row joined into one string (ROW_KEY)."""
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(*[pc.cast(table[c], pa.string()) for c in key], KEY_SEPARATOR)


def key_string(values) -> str:
    """One row's ROW_KEY from its key values, as `joined_key` joins them."""
    return KEY_SEPARATOR.join(str(v) for v in values)


def _joined_key_sql(key: list[str]) -> str:
    """ROW_KEY as a SQL expression over the stored key columns (the same join)."""
    sep = "'" + KEY_SEPARATOR + "'"
    return "concat(" + f", {sep}, ".join(f"CAST({c} AS STRING)" for c in key) + ")"


def with_hash(schema: pa.Schema) -> pa.Schema:
    return schema if ROW_HASH in schema.names else schema.append(pa.field(ROW_HASH, pa.string()))


def row_hash(row: dict) -> str:
    """A stable digest of a row's content (its values as Arrow gives them back)."""
    body = json.dumps({k: v for k, v in row.items() if k != ROW_HASH}, sort_keys=True, default=str)
    return hashlib.blake2b(body.encode(), digest_size=16).hexdigest()


def sql_in(column: str, values) -> list[str]:
    """`column IN (...)` filters covering `values`, LOOKUP_CHUNK at a time (none for no values)."""
    values = list(values)
    return [f"{column} IN ({', '.join(sql_literal(v) for v in values[i:i + LOOKUP_CHUNK])})"
            for i in range(0, len(values), LOOKUP_CHUNK)]


def sql_literal(value) -> str:
    """A SQL literal for a LanceDB filter."""
    if value is None:
        return "NULL"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"

