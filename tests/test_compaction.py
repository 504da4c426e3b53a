"""Shard compaction (issue 18, item 4): small per-model files fold into parts, file counts stay
bounded over many runs, no row is lost or doubled (byte for byte), readers during a compaction
neither fail nor see duplicates, extraction planning sees compacted rows, a killed compaction
leaves a readable layer, and DuckDB, pyarrow and S3 read the result with no project code."""

import json
import os
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.dataset as ds
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

import storage.compaction as compaction
import storage.shards as shards
from probex.cli import app
from storage.compaction import compact_all, compact_layer
from storage.extract import ExtractJob, extract_model
from storage.shards import LayerRow, has_shard, layer_keys, read_layer, write_rows
from storage.sources import LocalOpener
from tasks.compact import compact_step  # noqa: F401 - Prefect's logging set up on the real stdout, not a CliRunner's
from tasks.extract import run_extraction, split_done

TREE, LAYER = "org/root", "blocks.0.q.weight"


def rows(start: int, n: int, tree: str = TREE, layer: str = LAYER) -> list[LayerRow]:
    """Dense and LoRA rows of a few shapes, values fixed by each model's number."""
    out = []
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        sha = f"{i:040x}"
        if i % 3 == 2:
            out.append(LayerRow(tree, layer, f"org/lora-{i}", sha, "lora", (6, 5), (6, 5), "F16", 80,
                                A=rng.standard_normal((2, 5)).astype(np.float32),
                                B=rng.standard_normal((6, 2)).astype(np.float32), rank=2, scale=0.25,
                                read_from=["a.lora_A.weight", "a.lora_B.weight"]))
        else:
            out.append(LayerRow(tree, layer, f"org/full-{i}", sha, "dense", (6, 5), (6, 5), "F32", 120,
                                X=rng.standard_normal((6, 5)).astype(np.float32), read_from=["a.weight"]))
    return out


def fingerprint(row: LayerRow) -> tuple:
    """Everything a row holds, tensors as their bytes."""
    tensors = tuple(None if t is None else (t.dtype.str, t.shape, t.tobytes()) for t in (row.X, row.A, row.B))
    return (row.tree_id, row.layer, row.repo_id, row.sha, row.kind, tuple(row.shape), tuple(row.source_shape),
            row.dtype, row.bytes_read, row.rank, row.scale, tuple(row.read_from or ())) + tensors


def stored(root, tree=TREE, layer=LAYER) -> dict[tuple[str, str], tuple]:
    got = read_layer(root, tree, layer)
    keys = [(r.repo_id, r.sha) for r in got]
    assert len(keys) == len(set(keys)), "a reader saw a row twice"
    return {(r.repo_id, r.sha): fingerprint(r) for r in got}


def folder(root: Path, tree=TREE, layer=LAYER) -> Path:
    return root / "tree=org--root" / f"layer={layer}"


def files(root: Path) -> tuple[list[str], list[str]]:
    """(small files, parts) of the layer, as a reader lists them."""
    f = folder(root)
    small = sorted(p.name for p in f.glob("*.parquet"))
    parts = sorted(p.name for p in (f / "parts").glob("*.parquet")) if (f / "parts").exists() else []
    return small, parts


def duck(root: Path) -> tuple[int, int]:
    """(rows, distinct models) as a notebook reads them: plain DuckDB over every shard."""
    return duckdb.sql(f"SELECT count(*), count(DISTINCT (repo_id, sha)) FROM read_parquet("
                      f"'{root}/**/*.parquet', hive_partitioning=true)").fetchall()[0]


def test_file_counts_stay_bounded_over_many_runs(tmp_path):
    root = tmp_path / "shards"
    parts_after, want = [], {}
    for run in range(12):  # a nightly's new models, then maintenance
        new = rows(run * 7, 7)
        write_rows(root, new)
        want |= {(r.repo_id, r.sha): fingerprint(r) for r in new}
        report = compact_layer(root, TREE, LAYER)
        assert report.folded == 7 and report.parts_written == 1
        small, parts = files(root)
        assert small == []
        parts_after.append(len(parts))
        # the bound: <= one file per run's worth of new rows, plus one per compaction
        assert len(parts) <= 2 * (run + 1)
    # one new part per compaction; past MAX_PARTS (8) open parts they merge into one
    assert parts_after == [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4]
    assert stored(root) == want
    assert duck(root) == (84, 84)
    assert compact_layer(root, TREE, LAYER).parts_written == 0  # nothing new: nothing rewritten


def test_a_full_part_is_never_rewritten_and_parts_close_at_their_size(tmp_path):
    root = tmp_path / "shards"
    write_rows(root, rows(0, 40))
    # tiny sizes so a handful of rows fill a part
    first = compact_layer(root, TREE, LAYER, part_bytes=6000, row_group_bytes=1500)
    assert first.parts_written > 1 and first.rows_written == 40
    sizes = {p.name: p.stat().st_size for p in (folder(root) / "parts").iterdir()}
    full = {n for n, s in sizes.items() if s >= 3000}
    assert full
    for run in range(4):
        write_rows(root, rows(100 + run * 5, 5))
        compact_layer(root, TREE, LAYER, part_bytes=6000, row_group_bytes=1500, max_parts=2)
        assert full <= set(files(root)[1])  # merges leave full parts alone
    assert len(stored(root)) == 60 and duck(root) == (60, 60)


def test_compaction_loses_and_doubles_nothing_byte_for_byte(tmp_path):
    root = tmp_path / "shards"
    write_rows(root, rows(0, 30))
    before = stored(root)
    compact_layer(root, TREE, LAYER)
    assert stored(root) == before
    write_rows(root, rows(30, 10))
    before = stored(root)
    assert len(before) == 40
    compact_layer(root, TREE, LAYER, max_parts=1)  # fold and merge in one go
    assert files(root)[0] == [] and len(files(root)[1]) == 1
    assert stored(root) == before
    # pyarrow with no project code: the same rows, once each
    table = ds.dataset(str(root), format="parquet", partitioning="hive").to_table(columns=["repo_id", "sha", "X"])
    keys = list(zip(table.column("repo_id").to_pylist(), table.column("sha").to_pylist()))
    assert sorted(keys) == sorted(before) and len(keys) == len(set(keys))
    # a read of some models only (the training's) finds them in the part
    few = read_layer(root, TREE, LAYER, {"org/full-3", "org/lora-35"})
    assert sorted(r.repo_id for r in few) == ["org/full-3", "org/lora-35"]


def test_duckdb_reads_compacted_shards_with_hive_columns(tmp_path):
    root = tmp_path / "shards"
    write_rows(root, rows(0, 12) + rows(0, 5, layer="blocks.1.q.weight") + rows(0, 3, tree="org/other"))
    assert [(r.tree, r.layer) for r in compact_all(root)] == [
        ("org--other", LAYER), ("org--root", LAYER), ("org--root", "blocks.1.q.weight")]
    assert files(root)[0] == []
    got = duckdb.sql(f"SELECT layer, count(*), sum(len(X)), sum(len(A)) FROM read_parquet('{root}/**/*.parquet', "
                     "hive_partitioning=true) WHERE tree = 'org--root' GROUP BY layer ORDER BY layer").fetchall()
    assert got == [("blocks.0.q.weight", 12, 8 * 30, 4 * 10), ("blocks.1.q.weight", 5, 4 * 30, 10)]


def test_readers_during_compaction_never_fail_or_see_duplicates(tmp_path, monkeypatch):
    root = tmp_path / "shards"
    write_rows(root, rows(0, 20))
    committed = set(stored(root))  # rows every later read must hold
    lock, errors, reads = threading.Lock(), [], []
    seen = {"window": 0, "vanished": 0}  # reads that met a compaction half-way, of each kind
    stop = threading.Event()

    # widen the compaction's window (its part published, its inputs going one by one) and the
    # reader's gap between its listing and its read, so that on two busy cores the reader meets both
    real_remove, real_inputs, real_list, real_once, real_current = (
        compaction._remove, compaction._remove_inputs, shards.list_layer, shards._read_once, shards.current)
    monkeypatch.setattr(compaction, "_remove_inputs", lambda fs, todo: time.sleep(0.03) or real_inputs(fs, todo))
    monkeypatch.setattr(compaction, "_remove", lambda fs, p: time.sleep(0.005) or real_remove(fs, p))
    monkeypatch.setattr(shards, "list_layer", lambda fs, f: (real_list(fs, f), time.sleep(0.05))[0])

    def read_once(*a):
        try:
            return real_once(*a)
        except OSError:
            seen["vanished"] += 1  # listed, then removed before the read: listed again
            raise

    def current(fs, listed):
        out = real_current(fs, listed)
        seen["window"] += len(out.paths) < len(listed.paths)  # inputs still there, skipped
        return out

    monkeypatch.setattr(shards, "_read_once", read_once)
    monkeypatch.setattr(shards, "current", current)

    def reader():
        while not stop.is_set():
            with lock:
                must = set(committed)
            try:
                got = read_layer(root, TREE, LAYER)
            except Exception as e:  # noqa: BLE001 - what the test is about
                errors.append(repr(e))
                return
            keys = [(r.repo_id, r.sha) for r in got]
            if len(keys) != len(set(keys)) or not must <= set(keys):
                errors.append(f"{len(keys)} rows, {len(set(keys))} distinct, missing {len(must - set(keys))}")
            reads.append(len(keys))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for run in range(40):
            new = rows(20 + run * 10, 10)
            write_rows(root, new)
            with lock:
                committed |= {(r.repo_id, r.sha) for r in new}
            compact_layer(root, TREE, LAYER, max_parts=2)  # merges often
            if run >= 8 and min(seen.values()) > 0:
                break
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[:3]
    assert min(seen.values()) > 0, seen  # the reader did meet compactions half-way
    assert len(reads) > 3 and len(stored(root)) == len(committed)


def test_a_reader_in_the_compaction_window_sees_each_row_once(tmp_path, monkeypatch):
    """Between the part's publish and the removal of what it folded in, both hold every row."""
    root = tmp_path / "shards"
    write_rows(root, rows(0, 10))
    before, seen = stored(root), {}
    real = compaction._remove_inputs

    def read_then_remove(fs, todo):
        seen["files"] = files(root)
        seen["rows"] = stored(root)
        seen["duck"] = duck(root)
        real(fs, todo)

    monkeypatch.setattr(compaction, "_remove_inputs", read_then_remove)
    compact_layer(root, TREE, LAYER)
    assert len(seen["files"][0]) == 10 and len(seen["files"][1]) == 1  # both there
    assert seen["rows"] == before
    assert seen["duck"] == (20, 10)  # plain DuckDB in the window: dedupe on (repo_id, sha)
    assert duck(root) == (10, 10)


def test_a_file_that_vanishes_mid_read_makes_the_reader_list_again(tmp_path, monkeypatch):
    root = tmp_path / "shards"
    write_rows(root, rows(0, 10))
    before = stored(root)
    real, calls = shards._read_once, []

    def compaction_between_list_and_read(fs, listed, repo_ids):
        calls.append(len(listed.paths))
        if len(calls) == 1:  # the reader listed 10 small files; a compaction now removes them
            compact_layer(root, TREE, LAYER)
        return real(fs, listed, repo_ids)

    monkeypatch.setattr(shards, "_read_once", compaction_between_list_and_read)
    assert stored(root) == before
    assert calls == [10, 1]  # the second try read the part


def test_a_compaction_killed_before_its_publish_leaves_the_layer_as_it_was(tmp_path, monkeypatch):
    root = tmp_path / "shards"
    write_rows(root, rows(0, 10))
    before = stored(root)
    parts = folder(root) / "parts"
    parts.mkdir(parents=True)
    # what a SIGKILL mid-upload leaves: a temporary name (a raise lets publish clean its own up)
    left = parts / ".part-00000001-dead0000.parquet.0badc0de.tmp"
    left.write_bytes(b"PAR1 half a part")

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(compaction, "publish", killed)
    with pytest.raises(KeyboardInterrupt):
        compact_layer(root, TREE, LAYER)
    monkeypatch.undo()
    assert len(files(root)[0]) == 10 and files(root)[1] == []
    assert stored(root) == before and duck(root) == (10, 10)
    old = time.time() - 2 * compaction.STALE_TMP_S
    os.utime(left, (old, old))
    report = compact_layer(root, TREE, LAYER)
    assert report.stale_tmp_removed == 1 and not left.exists()
    assert stored(root) == before and duck(root) == (10, 10)


def test_a_compaction_killed_after_its_publish_is_finished_by_the_next(tmp_path, monkeypatch):
    root = tmp_path / "shards"
    write_rows(root, rows(0, 10))
    compact_layer(root, TREE, LAYER)
    write_rows(root, rows(10, 10))
    before = stored(root)

    def killed(fs, todo):
        raise KeyboardInterrupt

    monkeypatch.setattr(compaction, "_remove_inputs", killed)
    with pytest.raises(KeyboardInterrupt):
        compact_layer(root, TREE, LAYER, max_parts=1)  # a merge: part 1 and the small files -> part 2
    monkeypatch.undo()
    assert len(files(root)[0]) == 10 and len(files(root)[1]) == 2
    assert stored(root) == before  # every row once through the project's reader
    assert duck(root) == (40, 20)  # raw readers see the doubled rows until the next compaction
    report = compact_layer(root, TREE, LAYER)
    assert report.redundant == 10 and report.rewritten == 1 and report.rows_written == 0
    assert files(root)[0] == [] and len(files(root)[1]) == 1
    assert stored(root) == before and duck(root) == (20, 20)


def _job(tmp_path: Path, i: int) -> ExtractJob:
    d = tmp_path / "lake" / f"m{i}"
    d.mkdir(parents=True)
    save_file({"layer.weight": np.random.default_rng(i).standard_normal((8, 6)).astype(np.float32)},
              str(d / "model.safetensors"))
    return ExtractJob(LocalOpener(f"org/m{i}", f"{i:040x}", str(d)), TREE, ("model.safetensors",),
                      ("layer.weight",), str(tmp_path / "shards"))


def test_extraction_after_compaction_extracts_nothing_new(tmp_path, monkeypatch):
    jobs = [_job(tmp_path, i) for i in range(6)]
    assert all(extract_model(j).status == "ok" for j in jobs[:4])
    compact_layer(tmp_path / "shards", TREE, "layer.weight")
    assert not list(folder(tmp_path / "shards", layer="layer.weight").glob("*.parquet"))
    # planning lists the layer once for all models, never a request per model
    calls = []
    real = shards.list_layer
    monkeypatch.setattr(shards, "list_layer", lambda *a: calls.append(1) or real(*a))
    done, pending = split_done(jobs)
    assert len(calls) == 1
    assert [r.repo_id for r in done] == [f"org/m{i}" for i in range(4)] and {r.status for r in done} == {"skipped"}
    assert [j.opener.repo_id for j in pending] == ["org/m4", "org/m5"]
    assert all(j.planned_missing for j in pending)  # their workers do not ask the store again
    assert ("org/m2", f"{2:040x}") in layer_keys(tmp_path / "shards", TREE, "layer.weight")
    # a worker's own check (a job planned before the compaction) finds the part's row too
    assert has_shard(tmp_path / "shards", TREE, "layer.weight", "org/m1", f"{1:040x}")
    assert extract_model(jobs[1]).status == "skipped"
    summary = run_extraction(jobs[:4])  # everything stored: no cluster is started
    assert summary.extracted == 0 and summary.skipped == 4 and summary.workers == 0
    assert len(read_layer(tmp_path / "shards", TREE, "layer.weight")) == 4


def test_compaction_on_s3(s3_server, monkeypatch):
    root = s3_server.uri("compact")
    write_rows(root, rows(0, 12))
    before = stored(root)
    real, calls = shards._read_once, []

    def compaction_between_list_and_read(fs, listed, repo_ids):
        calls.append(len(listed.paths))
        if len(calls) == 1:  # the objects a reader listed are deleted before it opens them
            reports.extend(compact_all(root))
        return real(fs, listed, repo_ids)

    reports = []
    monkeypatch.setattr(shards, "_read_once", compaction_between_list_and_read)
    assert stored(root) == before and calls == [12, 1]
    monkeypatch.undo()
    (report,) = reports
    assert report.folded == 12 and report.parts_written == 1
    keys = s3_server.keys(root)
    assert len(keys) == 1 and keys[0].startswith(f"tree=org--root/layer={LAYER}/parts/part-00000001-")
    assert stored(root) == before
    assert has_shard(root, TREE, LAYER, "org/full-3", f"{3:040x}")
    assert not has_shard(root, TREE, LAYER, "org/full-3", f"{4:040x}")
    write_rows(root, rows(12, 3))
    compact_layer(root, TREE, LAYER, max_parts=1)
    assert len(s3_server.keys(root)) == 1 and len(stored(root)) == 15
    table = ds.dataset(root.split("://", 1)[1], filesystem=s3_server.filesystem(), format="parquet",
                       partitioning="hive").to_table(columns=["repo_id", "tree"])
    assert table.num_rows == 15 and set(table.column("tree").to_pylist()) == {"org--root"}


def test_cli_compact_prints_one_json_document_and_one_line_errors(tmp_path):
    runner = CliRunner()
    write_rows(tmp_path / "shards", rows(0, 5))
    r = runner.invoke(app, ["compact", "--json", "--home", str(tmp_path)])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["files_before"] == 5 and doc["files_after"] == 1
    assert [(d["tree"], d["layer"], d["folded"]) for d in doc["layers"]] == [("org--root", LAYER, 5)]
    r = runner.invoke(app, ["compact", "--home", str(tmp_path)])
    assert r.exit_code == 0 and "shard compaction" in r.stdout
    r = runner.invoke(app, ["compact", "--tree", "org/none", "--home", str(tmp_path)])
    assert r.exit_code == 1 and "no shards of tree org/none" in r.output and "Traceback" not in r.output


@pytest.mark.slow  # starts a Prefect server: the full suite runs it
def test_the_maintenance_flow_compacts_every_layer_before_the_catalog(tmp_path):
    from flows.maintain import maintain_catalog
    from flows.runtime import prefect_api
    from probex_core.settings import Settings, apply_runtime_env
    from storage.catalog import Catalog

    Catalog(str(tmp_path / "catalog"))
    write_rows(tmp_path / "shards", rows(0, 6) + rows(0, 3, layer="blocks.1.q.weight"))
    apply_runtime_env(Settings.load(tmp_path))
    with prefect_api():
        doc = maintain_catalog(keep_days=0, keep_tags=0, home=str(tmp_path))
    assert doc["shards"]["files_before"] == 9 and doc["shards"]["files_after"] == 2
    assert sorted(d["layer"] for d in doc["shards"]["layers"]) == ["blocks.0.q.weight", "blocks.1.q.weight"]
    assert "tables" in doc
