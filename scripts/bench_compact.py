"""The compaction benchmark (issue 18, item 4): one tree's layer as small files, then compacted.

N models of one small synthetic layer (a DxD float32 matrix each) are written as the small files
extraction leaves (`storage.shards.encode_table`, the bytes `write_rows` writes, at `shard_path`;
written directly because `write_rows` lists the layer folder on every write to clear a killed
writer's temporaries, which is quadratic for N files in one folder). Then: the file count, the
bytes on disk and a DuckDB scan of the layer (`count(*)`, `sum(len(X))` over read_parquet, no
project code) before and after `compact_layer`, the compaction's seconds, and a nightly's worth
of new models (NEW small files) folded into the compacted layer.

    .venv/bin/python scripts/benchmark.py compact     # 100k models (writes docs/bench/compact.json)
    .venv/bin/python scripts/bench_compact.py 20000   # another size; prints the JSON
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

TREE, LAYER = "bench/root", "encoder.layer.0.attention.self.query.weight"
MODELS = 100_000
SIDE = 16  # 1 KiB of float32 a model: the file count, not the bytes, is what compaction fixes
NEW = 1000  # a nightly's new models in one tree
REPEATS = 2  # DuckDB scans per state; the best is kept
BATCH = 10_000


def rows_table(start: int, n: int, side: int) -> pa.Table:
    """n models' rows of the layer (SHARD_SCHEMA), built column-wise: per-row LayerRow objects
    would cost as much as the writes."""
    from storage.shards import SHARD_SCHEMA

    size = side * side
    X = np.random.default_rng(start).standard_normal((n, size)).astype(np.float32)
    ids = range(start, start + n)
    cols = {
        "tree_id": pa.array([TREE] * n), "layer": pa.array([LAYER] * n),
        "repo_id": pa.array([f"bench/model-{i:07d}" for i in ids]), "sha": pa.array([f"{i:040x}" for i in ids]),
        "kind": pa.array(["dense"] * n), "shape": pa.array([[side, side]] * n, pa.list_(pa.int64())),
        "source_shape": pa.array([[side, side]] * n, pa.list_(pa.int64())), "dtype": pa.array(["F32"] * n),
        "rank": pa.nulls(n, pa.int64()), "scale": pa.nulls(n, pa.float64()),
        "X": pa.ListArray.from_arrays(pa.array(np.arange(n + 1) * size, pa.int32()), pa.array(X.ravel())),
        "A": pa.nulls(n, pa.list_(pa.float32())), "B": pa.nulls(n, pa.list_(pa.float32())),
        "bytes_read": pa.array([size * 4] * n, pa.int64()), "read_from": pa.array([[LAYER]] * n),
    }
    return pa.table(cols, schema=SHARD_SCHEMA)


def write_small(root: Path, start: int, n: int, side: int) -> float:
    from storage.shards import encode_table, shard_path

    t0 = time.perf_counter()
    for lo in range(start, start + n, BATCH):
        table = rows_table(lo, min(BATCH, start + n - lo), side)
        repo, sha = table.column("repo_id").to_pylist(), table.column("sha").to_pylist()
        for i in range(table.num_rows):
            path = Path(shard_path(root, TREE, LAYER, repo[i], sha[i]))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_table(table.slice(i, 1)))
    return time.perf_counter() - t0


def layer_state(root: Path, repeats: int) -> dict:
    """Files, bytes and the best DuckDB scan of the layer, as a notebook reads it."""
    import duckdb

    from storage.shards import layer_folder

    folder = Path(layer_folder(str(root), TREE, LAYER))
    files = [p for p in folder.rglob("*.parquet") if not p.name.startswith(".")]
    sql = (f"SELECT count(*), sum(len(X)) FROM read_parquet('{folder}/**/*.parquet', hive_partitioning=true)")
    scans, result = [], None
    for _ in range(repeats):
        con = duckdb.connect()  # a fresh connection: no metadata cached from the last scan
        t0 = time.perf_counter()
        result = con.sql(sql).fetchall()[0]
        scans.append(time.perf_counter() - t0)
        con.close()
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files), "scan_s": min(scans),
            "scans_s": scans, "rows": result[0], "values": result[1]}


def bench(work: Path, models: int = MODELS, side: int = SIDE, new: int = NEW, repeats: int = REPEATS,
          log=print) -> dict:
    from storage.compaction import MAX_PARTS, PART_BYTES, ROW_GROUP_BYTES, compact_layer

    root = work / "compact" / "shards"
    shutil.rmtree(root.parent, ignore_errors=True)
    log(f"[compact] writing {models:,} small files of a {side}x{side} layer")
    write_s = write_small(root, 0, models, side)
    log(f"[compact] written in {write_s:.0f} s; scanning")
    before = layer_state(root, repeats)
    log(f"[compact] {before['files']:,} files, scan {before['scan_s']:.2f} s; compacting")
    report = compact_layer(root, TREE, LAYER)
    after = layer_state(root, repeats)
    log(f"[compact] {after['files']} files after {report.seconds:.1f} s, scan {after['scan_s']:.3f} s")
    assert (after["rows"], after["values"]) == (before["rows"], before["values"]) == (models, models * side * side)
    nightly_write_s = write_small(root, models, new, side)
    nightly = compact_layer(root, TREE, LAYER)
    after_nightly = layer_state(root, repeats)
    assert after_nightly["rows"] == models + new
    log(f"[compact] a nightly's {new} new files folded in {nightly.seconds:.2f} s: {after_nightly['files']} files")
    return {
        "models": models, "side": side, "new": new, "repeats": repeats, "max_parts": MAX_PARTS,
        "part_bytes": PART_BYTES, "row_group_bytes": ROW_GROUP_BYTES,
        "write_s": write_s, "write_ms_per_file": write_s / models * 1e3, "nightly_write_s": nightly_write_s,
        "before": before, "after": after, "after_nightly": after_nightly,
        "compaction": report.to_dict(), "nightly_compaction": nightly.to_dict(),
        "scan_speedup": before["scan_s"] / after["scan_s"],
    }


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else MODELS
    work = Path(os.environ.get("PROBEX_BENCH_DIR", "/tmp/probex-bench"))
    print(json.dumps(bench(work, n, log=lambda m: print(m, file=sys.stderr)), indent=2))
