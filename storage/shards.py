"""Parquet shards of extracted layers, partitioned by tree and layer.

    shards/tree=<tree slug>/layer=<layer name>/<repo slug>@<sha12>.parquet          one model
    shards/tree=<tree slug>/layer=<layer name>/parts/part-<seq>-<id>.parquet         many (compacted)

`shards/` is a folder or an object-store URI (s3://bucket/prefix, ...), reached through
storage/fs.py. Extraction writes one small file per (model, tree, layer), named deterministically,
so re-extracting a model overwrites its own file and can never duplicate rows; each file is
published atomically (storage/fs.py's `publish`: one PUT on an object store, a temporary
`.name.xxxx.tmp` then a rename on disk), and readers skip temporary names, so a killed worker
leaves no half shard that looks whole.

Compaction (storage/compaction.py) folds a layer's small files into large row-grouped parts of the
same schema under `parts/`, publishes each part whole, and only then removes the small files it
folded in. A model's row is then found in a part: `has_shard` and `layer_keys` see parts too
(reading only their repo_id/sha columns, cached: a part never changes). `read_layer` reads only
the listed files holding a row no newer part holds, and returns each (repo_id, sha) once, the
newest part's copy first: a reader that lists while a compaction runs (part published, small files
not yet removed) skips what is about to go and sees no duplicate, and one whose listed file
vanished (listed before the part was published) lists again.

Plain pyarrow, DuckDB (`read_parquet('shards/**/*.parquet', hive_partitioning=true)`; `**` reaches
`parts/`, which is no hive key) and polars read both kinds with no project code. Outside a
compaction each (tree, layer, repo_id, sha) is in exactly one file; a reader that may overlap a
compaction (or follow one that was killed before it removed its inputs) dedupes on those columns.

A row holds either a dense matrix `X` or LoRA factors (`A` r x d_W, `B` d_H x r, and `scale`, so
X = scale * B @ A), flattened into float32 lists with their shapes beside them. `layer` is the
root's tensor name, whatever the child's format; `kind` says how the row was obtained: "dense" (the
child's own tensor), "lora" (an adapter's factors, any format, kept unmultiplied) or "dequantized"
(a quantized copy's weight with its scales applied); `read_from` names the child's tensors read.
Shards written before `read_from` existed read back with it null.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from probex_core.names import slug
from probex_core.settings import ENV_SHARDS
from storage.fs import is_file, join, listdir, publish, resolve, translate

SHARD_SCHEMA = pa.schema(
    [
        ("tree_id", pa.string()),
        ("layer", pa.string()),
        ("repo_id", pa.string()),
        ("sha", pa.string()),
        ("kind", pa.string()),  # "dense" | "lora" | "dequantized": how the child's row was obtained
        ("shape", pa.list_(pa.int64())),  # the layer's matrix shape [d_H, d_W]
        ("source_shape", pa.list_(pa.int64())),  # as stored (e.g. a 4-D conv kernel)
        ("dtype", pa.string()),  # as stored: F32 | F16 | BF16
        ("rank", pa.int64()),  # LoRA rank; null for dense
        ("scale", pa.float64()),  # LoRA scale as PEFT applies it; null for dense
        ("X", pa.list_(pa.float32())),  # dense: d_H * d_W values, row-major
        ("A", pa.list_(pa.float32())),  # lora: r * d_W
        ("B", pa.list_(pa.float32())),  # lora: d_H * r
        ("bytes_read", pa.int64()),  # bytes this model's extraction read for this layer
        ("read_from", pa.list_(pa.string())),  # the child's tensors (factors, scales, weight) read
    ]
)


@dataclass
class LayerRow:
    tree_id: str
    layer: str
    repo_id: str
    sha: str
    kind: str
    shape: tuple[int, int]
    source_shape: tuple[int, ...]
    dtype: str
    bytes_read: int
    X: np.ndarray | None = None
    A: np.ndarray | None = None
    B: np.ndarray | None = None
    rank: int | None = None
    scale: float | None = None
    read_from: list[str] | None = None

    def to_table(self) -> pa.Table:
        """A one-row table; tensors go in as flat float32 lists without a Python-level copy."""
        def tensor(a):
            if a is None:
                return pa.nulls(1, pa.list_(pa.float32()))
            flat = pa.array(np.ascontiguousarray(a, np.float32).ravel())
            return pa.ListArray.from_arrays(pa.array([0, len(flat)], pa.int32()), flat)

        cols = {
            "tree_id": [self.tree_id], "layer": [self.layer], "repo_id": [self.repo_id],
            "sha": [self.sha], "kind": [self.kind], "shape": [list(self.shape)],
            "source_shape": [list(self.source_shape)], "dtype": [self.dtype], "rank": [self.rank],
            "scale": [self.scale], "X": tensor(self.X), "A": tensor(self.A), "B": tensor(self.B),
            "bytes_read": [self.bytes_read], "read_from": [self.read_from],
        }
        return pa.table({f.name: pa.array(cols[f.name], f.type) if not isinstance(cols[f.name], pa.Array)
                         else cols[f.name] for f in SHARD_SCHEMA}, schema=SHARD_SCHEMA)


def shard_path(root: str | os.PathLike, tree_id: str, layer: str, repo_id: str, sha: str) -> str:
    """The shard's path or URI under `root` (a model's own small file)."""
    return join(root, *_parts(tree_id, layer, repo_id, sha))


def _parts(tree_id: str, layer: str, repo_id: str, sha: str) -> tuple[str, str, str]:
    return f"tree={slug(tree_id)}", f"layer={layer}", small_name(repo_id, sha)


def small_name(repo_id: str, sha: str) -> str:
    """A model's own file name in its layer folder."""
    return f"{slug(repo_id)}@{sha[:12]}.parquet"


def layer_folder(base: str, tree_id: str, layer: str) -> str:
    return join(base, f"tree={slug(tree_id)}", f"layer={layer}")


def write_rows(root: str | os.PathLike, rows: list[LayerRow]) -> list[str]:
    """Write each row to its own shard file, atomically. Returns the final paths (or URIs)."""
    fs, base = resolve(root, ENV_SHARDS)
    paths = []
    with translate(root, ENV_SHARDS):
        for row in rows:
            tree, layer, name = _parts(row.tree_id, row.layer, row.repo_id, row.sha)
            folder = join(base, tree, layer)
            # One whole object (a shard is one layer of one model, MiBs): nothing is uploaded
            # under a name a reader lists until every byte is there. What a killed writer leaves
            # is a temporary name readers skip, cleared by the next compaction once it is stale
            # (clearing it here listed the whole folder on every write: quadratic in a backfill).
            publish(fs, join(folder, name), encode_table(row.to_table()))
            paths.append(join(root, tree, layer, name))
    return paths


def encode_table(table: pa.Table) -> bytes:
    """A small file's bytes for a one-row table of SHARD_SCHEMA (what write_rows writes)."""
    buf = pa.BufferOutputStream()
    # Weights barely compress and never repeat: dictionary encoding and statistics on float
    # lists cost write time for nothing; zstd level 1 keeps what compression there is.
    pq.write_table(table, buf, compression="zstd", compression_level=1, use_dictionary=False,
                   write_statistics=False)
    return buf.getvalue().to_pybytes()


# --- what a layer folder holds: small files and parts ---------------------------------------

PARTS = "parts"  # the subfolder of a layer's compacted files (not key=value: no hive column)
PART_PREFIX = "part-"


def part_name(seq: int, tag: str) -> str:
    """`part-<seq>-<tag>.parquet`: seq orders parts (higher is newer); the random tag keeps two
    compactions that picked the same seq from overwriting each other's part."""
    return f"{PART_PREFIX}{seq:08d}-{tag}.parquet"


def part_seq(name: str) -> int:
    return int(name[len(PART_PREFIX):].split("-", 1)[0])


def _is_part(name: str) -> bool:
    return name.startswith(PART_PREFIX) and name.endswith(".parquet") and name[len(PART_PREFIX):].split("-", 1)[0].isdigit()


@dataclass(frozen=True)
class LayerFiles:
    """One listing of a layer folder: its small files (sorted by name) and parts, newest first."""

    small: tuple[pafs.FileInfo, ...]
    parts: tuple[pafs.FileInfo, ...]

    @property
    def paths(self) -> tuple[str, ...]:
        """Every file, in the order a reader prefers their rows: newest part first, small files last."""
        return tuple(i.path for i in self.parts + self.small)


def list_layer(fs: pafs.FileSystem, folder: str) -> LayerFiles:
    """The small files are listed before the parts: a compaction publishes its part before it
    removes the small files, so a small file this listing misses is in a part the next one sees."""
    small = sorted((i for i in listdir(fs, folder) if i.type == pafs.FileType.File
                    and i.base_name.endswith(".parquet")), key=lambda i: i.base_name)
    return LayerFiles(tuple(small), list_parts(fs, folder))


def list_parts(fs: pafs.FileSystem, folder: str) -> tuple[pafs.FileInfo, ...]:
    """A layer folder's parts, newest first."""
    parts = (i for i in listdir(fs, join(folder, PARTS)) if i.type == pafs.FileType.File and _is_part(i.base_name))
    return tuple(sorted(parts, key=lambda i: (part_seq(i.base_name), i.base_name), reverse=True))


@dataclass(frozen=True)
class PartRows:
    """Which models a part holds: their (repo_id, sha), and the small-file names those have."""

    keys: frozenset[tuple[str, str]]
    names: frozenset[str]


# A part never changes once published (a new one gets a new name), so its keys are read once per
# process: a worker's has_shard and a planner's listing cost a listing, not a read per part.
_ROWS: OrderedDict[tuple[str, int], PartRows] = OrderedDict()
_ROWS_MAX = 256
_ROWS_LOCK = threading.Lock()  # readers and a compaction may share a process


def part_rows(fs: pafs.FileSystem, info: pafs.FileInfo) -> PartRows:
    """A part's keys, from two small columns, never the tensors."""
    key = (info.path, info.size)
    with _ROWS_LOCK:
        if key in _ROWS:
            _ROWS.move_to_end(key)
            return _ROWS[key]
    t = pq.read_table(info.path, columns=["repo_id", "sha"], filesystem=fs)
    keys = frozenset(zip(t.column("repo_id").to_pylist(), t.column("sha").to_pylist()))
    rows = PartRows(keys, frozenset(small_name(r, s) for r, s in keys))
    with _ROWS_LOCK:
        _ROWS[key] = rows
        while len(_ROWS) > _ROWS_MAX:
            _ROWS.popitem(last=False)
    return rows


def current(fs: pafs.FileSystem, files: LayerFiles) -> LayerFiles:
    """The listed files that hold a row no newer file holds. What a compaction removes once it has
    published (the small files it folded in, the parts it merged) is skipped, so a reader does not
    race a compaction's removals file by file."""
    held: set[tuple[str, str]] = set()
    parts, names = [], set()
    for p in files.parts:  # newest first
        rows = part_rows(fs, p)
        if not rows.keys <= held:
            parts.append(p)
        held |= rows.keys
        names |= rows.names
    return LayerFiles(tuple(i for i in files.small if i.base_name not in names), tuple(parts))


@dataclass(frozen=True)
class LayerKeys:
    """Which models a layer holds, from one listing: small files by name, parts by their keys.
    `(repo_id, sha) in keys` is what `has_shard` answers, without a request per model."""

    names: frozenset[str]
    rows: frozenset[tuple[str, str]]

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self.rows or small_name(*key) in self.names


def layer_keys(root: str | os.PathLike, tree_id: str, layer: str) -> LayerKeys:
    fs, base = resolve(root, ENV_SHARDS)
    with translate(root, ENV_SHARDS):
        files = list_layer(fs, layer_folder(base, tree_id, layer))
        rows = frozenset().union(*(part_rows(fs, p).keys for p in files.parts))
    return LayerKeys(frozenset(i.base_name for i in files.small), rows)


def has_shard(root: str | os.PathLike, tree_id: str, layer: str, repo_id: str, sha: str) -> bool:
    """Whether the model's row of this layer is stored: its own file (one request), else a part."""
    fs, base = resolve(root, ENV_SHARDS)
    folder = layer_folder(base, tree_id, layer)
    with translate(root, ENV_SHARDS):
        if is_file(fs, join(folder, small_name(repo_id, sha))):
            return True
        return any((repo_id, sha) in part_rows(fs, p).keys for p in list_parts(fs, folder))


def layers_of(root: str | os.PathLike, tree_id: str) -> list[str]:
    fs, base = resolve(root, ENV_SHARDS)
    with translate(root, ENV_SHARDS):
        infos = listdir(fs, join(base, f"tree={slug(tree_id)}"))
    return sorted(i.base_name.split("=", 1)[1] for i in infos
                  if i.type.name == "Directory" and i.base_name.startswith("layer="))


READ_TRIES = 5  # listings a reader tries while compactions keep removing what it listed


def read_layer(root: str | os.PathLike, tree_id: str, layer: str,
               repo_ids: set[str] | None = None) -> list[LayerRow]:
    """Every row of one tree's layer (optionally only some models), tensors reshaped; each
    (repo_id, sha) once, the newest part's copy first."""
    fs, base = resolve(root, ENV_SHARDS)
    with translate(root, ENV_SHARDS):
        table = read_files(fs, layer_folder(base, tree_id, layer), repo_ids)
    if table is None:
        return []
    meta = table.drop_columns(["X", "A", "B"]).to_pylist()  # small columns only: tensors stay numpy
    tensors = {c: table.column(c).combine_chunks() for c in ("X", "A", "B")}
    rows = []
    for i, r in enumerate(meta):
        d_h, d_w = r["shape"]
        rank = r["rank"]
        X, A, B = (_values(tensors[c], i) for c in ("X", "A", "B"))
        rows.append(
            LayerRow(
                tree_id=r["tree_id"], layer=r["layer"], repo_id=r["repo_id"], sha=r["sha"],
                kind=r["kind"], shape=(d_h, d_w), source_shape=tuple(r["source_shape"]),
                dtype=r["dtype"], bytes_read=r["bytes_read"], rank=rank, scale=r["scale"],
                read_from=r["read_from"],
                X=None if X is None else X.reshape(d_h, d_w),
                A=None if A is None else A.reshape(rank, d_w),
                B=None if B is None else B.reshape(d_h, rank),
            )
        )
    return rows


def read_files(fs: pafs.FileSystem, folder: str, repo_ids: set[str] | None = None) -> pa.Table | None:
    """The layer folder's rows as one table (SHARD_SCHEMA), each (repo_id, sha) once; None when
    empty. A file that vanished between the listing and the read (a compaction removed what it
    had folded into a part) means: list again and read again."""
    files = list_layer(fs, folder)
    for _ in range(READ_TRIES - 1):
        try:
            return _read_once(fs, files, repo_ids)
        except OSError:  # FileNotFoundError on a disk; an object store names the missing key
            again = list_layer(fs, folder)
            if again.paths == files.paths:
                raise  # the listing did not move: a real failure, not a compaction
            files = again
    return _read_once(fs, files, repo_ids)


def _read_once(fs: pafs.FileSystem, listed: LayerFiles, repo_ids: set[str] | None) -> pa.Table | None:
    files = current(fs, listed)
    if not files.paths:
        return None
    dataset = ds.dataset(list(files.paths), schema=SHARD_SCHEMA, format="parquet", filesystem=fs)
    # parts keep statistics on repo_id, so a read of a few models skips most row groups
    where = None if repo_ids is None else ds.field("repo_id").isin(sorted(repo_ids))
    table = dataset.to_table(columns=SHARD_SCHEMA.names + ["__filename"], filter=where)
    return first_copies(table, {p: i for i, p in enumerate(files.paths)}).drop_columns(["__filename"])


def first_copies(table: pa.Table, rank: dict[str, int]) -> pa.Table:
    """Each (repo_id, sha) once: the row from the file ranked first (`__filename` -> rank)."""
    best: dict[tuple[str, str], tuple[int, int]] = {}
    keys = zip(table.column("repo_id").to_pylist(), table.column("sha").to_pylist())
    for i, (path, key) in enumerate(zip(table.column("__filename").to_pylist(), keys)):
        if key not in best or rank[path] < best[key][0]:
            best[key] = (rank[path], i)
    if len(best) == table.num_rows:
        return table
    return table.take(pa.array(sorted(i for _, i in best.values()), pa.int64()))


def _values(column: pa.ListArray, i: int) -> np.ndarray | None:
    """Row i of a list<float32> column as a numpy view (no per-element Python objects)."""
    if column[i].values is None:
        return None
    start, end = column.offsets[i].as_py(), column.offsets[i + 1].as_py()
    # A writable copy: torch refuses to wrap Arrow's read-only buffers without a warning.
    return column.values.slice(start, end - start).to_numpy(zero_copy_only=False).copy()


def tree_bytes(root: str | os.PathLike, tree_id: str) -> int:
    """Bytes of a tree's shards, every layer (small files and parts): what training it reads."""
    fs, base = resolve(root, ENV_SHARDS)
    with translate(root, ENV_SHARDS):
        infos = listdir(fs, join(base, f"tree={slug(tree_id)}"), recursive=True)
    return sum(i.size or 0 for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))
