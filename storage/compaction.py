"""Compaction of a layer's small shard files into large row-grouped parts (issue 18, item 4).

Extraction writes one small file per (model, tree, layer) (storage/shards.py): at Hub scale that
is millions of files, and every reader pays a request per file. `compact_layer` folds a layer's
small files into parts (`layer=<name>/parts/part-<seq>-<tag>.parquet`, SHARD_SCHEMA), LSM-like so
that the file count stays bounded:

- the small files one compaction finds fold into one new part (a second only past PART_BYTES);
- a part under half of PART_BYTES is *open*; when more than MAX_PARTS open parts would exist,
  they merge with the new rows into one. A layer then holds its full parts plus at most MAX_PARTS
  open ones, and a merge never rewrites a full part, so a row is rewritten a bounded number of
  times however many nights follow.

Every new part is published whole (storage/fs.py's `publish`), and only then are its inputs
removed. A compaction killed before a publish leaves a temporary name, which readers skip and a
later compaction clears; one killed after it leaves rows both in a part and in their inputs:
`read_layer` returns one copy (the newest part's), and the next compaction removes the small files
whose row a part holds and rewrites a part that shares a row with a newer one (without it). So
outside a compaction every (repo_id, sha) is in one file. One compaction per layer at a time: the
maintenance flow runs them one after another.
"""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from probex_core.names import slug
from probex_core.settings import ENV_SHARDS
from storage.fs import TMP_SUFFIX, join, listdir, publish, resolve, translate
from storage.shards import (
    PARTS,
    SHARD_SCHEMA,
    LayerFiles,
    PartRows,
    layer_folder,
    list_layer,
    part_name,
    part_rows,
    part_seq,
)

MAX_PARTS = 8  # open parts per layer before they merge into one
PART_BYTES = 256 * 2**20  # a part closes at this size; the compaction holds one part in memory
ROW_GROUP_BYTES = 32 * 2**20  # a reader of a few models reads whole row groups: tens of MiB, not GiB
READ_BATCH = 512  # small files read per dataset scan
STALE_TMP_S = 3600  # a temporary object this old belongs to a killed writer, not a running one
_SMALL_COLUMNS = ["tree_id", "layer", "repo_id", "sha", "kind", "dtype"]


@dataclass
class CompactionReport:
    tree: str  # the tree's folder name (its id's slug)
    layer: str
    small_files: int = 0  # small files found
    parts_before: int = 0
    folded: int = 0  # small files whose rows went into new parts
    redundant: int = 0  # small files removed because a part already held their row
    rewritten: int = 0  # parts merged (or rewritten without rows a newer part holds)
    parts_written: int = 0
    rows_written: int = 0
    bytes_written: int = 0
    parts_after: int = 0
    stale_tmp_removed: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    fresh: tuple[pafs.FileInfo, ...]  # small files to fold in
    redundant: tuple[pafs.FileInfo, ...]  # small files whose row a part holds: removed, not read
    rewrite: tuple[pafs.FileInfo, ...]  # parts to read and write again, newest first
    kept: frozenset[tuple[str, str]]  # rows of the parts that stay: never written a second time

    @property
    def empty(self) -> bool:
        return not (self.fresh or self.redundant or self.rewrite)


def plan(files: LayerFiles, rows: dict[str, PartRows], *, max_parts: int = MAX_PARTS,
         part_bytes: int = PART_BYTES) -> Plan:
    """What one compaction of a listed layer does (no I/O: `rows` holds each part's keys)."""
    keys = {path: r.keys for path, r in rows.items()}
    held_names = frozenset().union(*(r.names for r in rows.values()))
    fresh = tuple(i for i in files.small if i.base_name not in held_names)
    redundant = tuple(i for i in files.small if i.base_name in held_names)
    # a part sharing a row with a newer part (a compaction killed before it removed its inputs,
    # or two at once) is rewritten without that row
    dirty, newer = set(), set()
    for p in files.parts:  # newest first
        if keys[p.path] & newer:
            dirty.add(p.path)
        newer |= keys[p.path]
    open_ = [p for p in files.parts if p.size < part_bytes // 2 and p.path not in dirty]
    merge = {p.path for p in open_} if len(open_) + bool(fresh) > max_parts else set()
    rewrite = tuple(p for p in files.parts if p.path in dirty | merge)
    kept = frozenset().union(*(keys[p.path] for p in files.parts if p.path not in dirty | merge))
    return Plan(fresh, redundant, rewrite, kept)


def compact_layer(root: str | os.PathLike, tree_id: str, layer: str, *, max_parts: int = MAX_PARTS,
                  part_bytes: int = PART_BYTES, row_group_bytes: int = ROW_GROUP_BYTES) -> CompactionReport:
    """Fold one tree's layer's small files into parts (and merge parts past `max_parts`)."""
    fs, base = resolve(root, ENV_SHARDS)
    with translate(root, ENV_SHARDS):
        return compact_folder(fs, layer_folder(base, tree_id, layer), max_parts=max_parts,
                              part_bytes=part_bytes, row_group_bytes=row_group_bytes)


def compact_all(root: str | os.PathLike, trees: list[str] | None = None, *, max_parts: int = MAX_PARTS,
                part_bytes: int = PART_BYTES) -> list[CompactionReport]:
    """Every layer of every tree under `root` (or of `trees`, by id), one after another; the
    reports of layers where there was something to do."""
    fs, base = resolve(root, ENV_SHARDS)
    out = []
    with translate(root, ENV_SHARDS):
        wanted = None if trees is None else {f"tree={slug(t)}" for t in trees}
        for tree in sorted(_dirs(fs, base, "tree="), key=lambda i: i.base_name):
            if wanted is not None and tree.base_name not in wanted:
                continue
            for folder in sorted(_dirs(fs, tree.path, "layer="), key=lambda i: i.base_name):
                report = compact_folder(fs, folder.path, max_parts=max_parts, part_bytes=part_bytes)
                if report.parts_written or report.folded or report.redundant or report.rewritten:
                    out.append(report)
    return out


def _dirs(fs: pafs.FileSystem, path: str, prefix: str) -> list[pafs.FileInfo]:
    return [i for i in listdir(fs, path) if i.type == pafs.FileType.Directory and i.base_name.startswith(prefix)]


def compact_folder(fs: pafs.FileSystem, folder: str, *, max_parts: int = MAX_PARTS, part_bytes: int = PART_BYTES,
                   row_group_bytes: int = ROW_GROUP_BYTES) -> CompactionReport:
    t0 = time.perf_counter()
    tree, layer = (p.split("=", 1)[1] for p in folder.rstrip("/").split("/")[-2:])
    report = CompactionReport(tree, layer)
    report.stale_tmp_removed = _remove_stale_tmp(fs, folder) + _remove_stale_tmp(fs, join(folder, PARTS))
    files = list_layer(fs, folder)
    rows = {p.path: part_rows(fs, p) for p in files.parts}
    todo = plan(files, rows, max_parts=max_parts, part_bytes=part_bytes)
    report.small_files, report.parts_before = len(files.small), len(files.parts)
    if not todo.empty:
        seq = max((part_seq(p.base_name) for p in files.parts), default=0) + 1
        writer = _PartWriter(fs, join(folder, PARTS), seq, part_bytes, row_group_bytes)
        seen = set(todo.kept)
        for table in _inputs(fs, todo):
            writer.add(_new_rows(table, seen))
        written = writer.close()
        # only now, with every new part published, do the inputs go
        _remove_inputs(fs, todo)
        report.folded, report.redundant, report.rewritten = len(todo.fresh), len(todo.redundant), len(todo.rewrite)
        report.parts_written, report.rows_written = len(written), writer.rows
        report.bytes_written = writer.bytes
    report.parts_after = report.parts_before - report.rewritten + report.parts_written
    report.seconds = time.perf_counter() - t0
    return report


def _inputs(fs: pafs.FileSystem, todo: Plan):
    """Tables to write, in the order whose first copy of a row wins: newest part first, then the
    small files (whose rows no part holds), a batch at a time."""
    for p in todo.rewrite:
        yield pq.read_table(p.path, schema=SHARD_SCHEMA, filesystem=fs)
    paths = [i.path for i in todo.fresh]
    for start in range(0, len(paths), READ_BATCH):
        yield ds.dataset(paths[start:start + READ_BATCH], schema=SHARD_SCHEMA, format="parquet",
                         filesystem=fs).to_table()


def _new_rows(table: pa.Table, seen: set[tuple[str, str]]) -> pa.Table:
    """The rows whose (repo_id, sha) is not written or kept yet; `seen` gains them."""
    keep = []
    for i, key in enumerate(zip(table.column("repo_id").to_pylist(), table.column("sha").to_pylist())):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return table if len(keep) == table.num_rows else table.take(pa.array(keep, pa.int64()))


class _PartWriter:
    """Rows in, parts out: row groups of about `row_group_bytes` (sorted by repo_id, with
    statistics on repo_id and sha so a read of a few models skips the rest), a part closed and
    published once it reaches `part_bytes`."""

    def __init__(self, fs: pafs.FileSystem, folder: str, seq: int, part_bytes: int, row_group_bytes: int):
        self.fs, self.folder, self.seq = fs, folder, seq
        self.part_bytes, self.row_group_bytes = part_bytes, row_group_bytes
        self.pending: list[pa.Table] = []
        self.pending_bytes = 0
        self.sink: pa.BufferOutputStream | None = None
        self.writer: pq.ParquetWriter | None = None
        self.published: list[str] = []
        self.rows = self.bytes = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.pending.append(table)
            self.pending_bytes += table.nbytes
        if self.pending_bytes >= self.row_group_bytes:
            self._flush(final=False)

    def close(self) -> list[str]:
        """Write what is pending and publish the last part; the paths of every part published."""
        self._flush(final=True)
        if self.writer is not None:
            self._publish()
        return self.published

    def _flush(self, final: bool) -> None:
        if not self.pending:
            return
        rows = pa.concat_tables(self.pending).sort_by([("repo_id", "ascending"), ("sha", "ascending")])
        per_group = max(1, self.row_group_bytes * rows.num_rows // max(rows.nbytes, 1))
        start = 0
        while rows.num_rows - start >= per_group or (final and start < rows.num_rows):
            self._write(rows.slice(start, per_group))
            start += per_group
        rest = rows.slice(start)  # less than a row group: waits for more rows
        self.pending, self.pending_bytes = ([rest], rest.nbytes) if rest.num_rows else ([], 0)

    def _write(self, group: pa.Table) -> None:
        if self.writer is None:
            self.sink = pa.BufferOutputStream()
            # weights barely compress (zstd level 1 keeps what there is); the repeated small
            # strings take a dictionary; statistics only where a filter can use them
            self.writer = pq.ParquetWriter(self.sink, SHARD_SCHEMA, compression="zstd", compression_level=1,
                                           use_dictionary=_SMALL_COLUMNS, write_statistics=["repo_id", "sha"])
        self.writer.write_table(group, row_group_size=group.num_rows)
        self.rows += group.num_rows
        if self.sink.tell() >= self.part_bytes:
            self._publish()

    def _publish(self) -> None:
        self.writer.close()
        data = self.sink.getvalue()
        path = join(self.folder, part_name(self.seq, uuid.uuid4().hex[:8]))
        publish(self.fs, path, data)  # a pyarrow Buffer: no second copy of the part's bytes
        self.published.append(path)
        self.bytes += data.size
        self.seq += 1
        self.writer = self.sink = None


def _remove_inputs(fs: pafs.FileSystem, todo: Plan) -> None:
    _remove_all(fs, [i.path for i in todo.fresh + todo.redundant + todo.rewrite])


def _remove_all(fs: pafs.FileSystem, paths: list[str]) -> None:
    # an object store deletes one key per request: a few at once
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: _remove(fs, p), paths))


def _remove(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except FileNotFoundError:  # removed already (by a compaction killed after its removals)
        pass


def _remove_stale_tmp(fs: pafs.FileSystem, folder: str) -> int:
    """Temporary objects that killed writers (workers, compactions) left, older than STALE_TMP_S."""
    cut = time.time() - STALE_TMP_S
    stale = [i.path for i in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
             if i.type == pafs.FileType.File and i.base_name.startswith(".") and i.base_name.endswith(TMP_SUFFIX)
             and i.mtime is not None and i.mtime.timestamp() < cut]
    _remove_all(fs, stale)
    return len(stale)
