"""Parquet shards of extracted layers, partitioned by tree and layer.

    shards/tree=<tree slug>/layer=<layer name>/<repo slug>@<sha12>.parquet

`shards/` is a folder or an object-store URI (s3://bucket/prefix, ...), reached through
storage/fs.py. One file per (model, tree, layer), named deterministically, so re-extracting a model
overwrites its own file and can never duplicate rows; each file is published atomically (a
temporary `.name.xxxx.tmp` first, then the final name), and readers skip temporary names, so a
killed worker leaves no half shard that looks whole. Plain pyarrow, DuckDB
(`read_parquet('shards/**/*.parquet', hive_partitioning=true)`) and polars read them, on disk or
on the object store.

A row holds either a dense matrix `X` or LoRA factors (`A` r x d_W, `B` d_H x r, and `scale`, so
X = scale * B @ A), flattened into float32 lists with their shapes beside them. `layer` is the
root's tensor name, whatever the child's format; `kind` says how the row was obtained: "dense" (the
child's own tensor), "lora" (an adapter's factors, any format, kept unmultiplied) or "dequantized"
(a quantized copy's weight with its scales applied); `read_from` names the child's tensors read.
Shards written before `read_from` existed read back with it null.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from probex_core.names import slug
from probex_core.settings import ENV_SHARDS
from storage.fs import is_file, join, listdir, publish, remove_stale_tmp, resolve, translate

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
    """The shard's path or URI under `root`."""
    return join(root, *_parts(tree_id, layer, repo_id, sha))


def _parts(tree_id: str, layer: str, repo_id: str, sha: str) -> tuple[str, str, str]:
    return f"tree={slug(tree_id)}", f"layer={layer}", f"{slug(repo_id)}@{sha[:12]}.parquet"


def write_rows(root: str | os.PathLike, rows: list[LayerRow]) -> list[str]:
    """Write each row to its own shard file, atomically. Returns the final paths (or URIs)."""
    fs, base = resolve(root, ENV_SHARDS)
    paths = []
    with translate(root, ENV_SHARDS):
        for row in rows:
            tree, layer, name = _parts(row.tree_id, row.layer, row.repo_id, row.sha)
            folder = join(base, tree, layer)
            remove_stale_tmp(fs, folder, name)  # left by a killed writer
            buf = pa.BufferOutputStream()
            # Weights barely compress and never repeat: dictionary encoding and statistics on float
            # lists cost write time for nothing; zstd level 1 keeps what compression there is.
            pq.write_table(row.to_table(), buf, compression="zstd", compression_level=1,
                           use_dictionary=False, write_statistics=False)
            # One whole object (a shard is one layer of one model, MiBs): nothing is uploaded
            # under a name a reader lists until every byte is there.
            publish(fs, join(folder, name), buf.getvalue().to_pybytes())
            paths.append(join(root, tree, layer, name))
    return paths


def has_shard(root: str | os.PathLike, tree_id: str, layer: str, repo_id: str, sha: str) -> bool:
    fs, base = resolve(root, ENV_SHARDS)
    with translate(root, ENV_SHARDS):
        return is_file(fs, join(base, *_parts(tree_id, layer, repo_id, sha)))


def layers_of(root: str | os.PathLike, tree_id: str) -> list[str]:
    fs, base = resolve(root, ENV_SHARDS)
    with translate(root, ENV_SHARDS):
        infos = listdir(fs, join(base, f"tree={slug(tree_id)}"))
    return sorted(i.base_name.split("=", 1)[1] for i in infos
                  if i.type.name == "Directory" and i.base_name.startswith("layer="))


def read_layer(root: str | os.PathLike, tree_id: str, layer: str,
               repo_ids: set[str] | None = None) -> list[LayerRow]:
    """Every row of one tree's layer (optionally only some models), tensors reshaped."""
    fs, base = resolve(root, ENV_SHARDS)
    with translate(root, ENV_SHARDS):
        infos = listdir(fs, join(base, f"tree={slug(tree_id)}", f"layer={layer}"))
        files = sorted(i.path for i in infos if i.type.name == "File" and i.base_name.endswith(".parquet"))
        if not files:
            return []
        table = ds.dataset(files, schema=SHARD_SCHEMA, format="parquet", filesystem=fs).to_table()
    meta = table.drop_columns(["X", "A", "B"]).to_pylist()  # small columns only: tensors stay numpy
    tensors = {c: table.column(c).combine_chunks() for c in ("X", "A", "B")}
    rows = []
    for i, r in enumerate(meta):
        if repo_ids is not None and r["repo_id"] not in repo_ids:
            continue
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


def _values(column: pa.ListArray, i: int) -> np.ndarray | None:
    """Row i of a list<float32> column as a numpy view (no per-element Python objects)."""
    if column[i].values is None:
        return None
    start, end = column.offsets[i].as_py(), column.offsets[i + 1].as_py()
    # A writable copy: torch refuses to wrap Arrow's read-only buffers without a warning.
    return column.values.slice(start, end - start).to_numpy(zero_copy_only=False).copy()
