"""Flows: ingest is idempotent and resumable, leaves the watermark alone on failure; the
deployments in prefect.yaml deploy to a standing local server and a worker runs one."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from probex_core.settings import Settings, apply_runtime_env
from storage.catalog import EMBEDDINGS, MODELS, Catalog

REPO = Path(__file__).resolve().parents[1]
PROBEX = str(Path(sys.executable).parent / "probex")


@pytest.fixture
def home(tiny_lake, tmp_path):
    shutil.copytree(tiny_lake, tmp_path / "lake")
    return tmp_path


@pytest.fixture(scope="module")
def api():
    from flows.runtime import prefect_api

    apply_runtime_env(Settings.load())
    with prefect_api() as url:
        yield url


def _keys(catalog, table):
    rows = catalog.read(table).to_pylist()
    keys = [(r["repo_id"], r["sha"]) + ((r["expert_version"],) if table == EMBEDDINGS else ()) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate rows"
    return rows


def test_ingest_twice_does_no_new_work(home, api):
    from flows.ingest import ingest

    first = ingest(home=str(home))
    assert first["crawl"]["new"] > 0 and first["extract"]["extracted"] > 0
    cat = Catalog(str(home / "catalog"))
    wm = cat.watermark(f"local:{(home / 'lake').resolve()}")
    assert wm is not None
    second = ingest(home=str(home))
    assert second["crawl"]["new"] == second["crawl"]["changed"] == 0
    assert second["extract"]["extracted"] == 0
    assert second["embed"]["new"] == second["embed"]["changed"] == 0
    _keys(cat, MODELS)


def test_a_nightly_extracts_only_what_its_window_listed(home, api):
    """After the first ingest, new uploads cost what they are: the second plans extraction for the
    models its crawl window listed (the new ones, and any at the old watermark's instant)."""
    from flows.ingest import ingest

    first = ingest(home=str(home))
    lake = home / "lake"
    cat = Catalog(str(home / "catalog"))
    wm = cat.watermark(f"local:{lake.resolve()}")
    child = next(r for r in cat.read(MODELS).to_pylist()
                 if r["status"] == "ok" and r["tree_id"] and r["repo_id"] != r["tree_id"] and r["files"])
    for i in range(3):
        dst = lake / "nightly" / f"upload-{i}"
        shutil.copytree(lake / child["repo_id"], dst)
        later = wm.timestamp() + 3600 + i
        for f in dst.rglob("*"):
            os.utime(f, (later, later))
    at_watermark = sum(r["last_modified"] == wm and r["tree_id"] is not None and r["repo_id"] != r["tree_id"]
                       for r in cat.read(MODELS).to_pylist())
    second = ingest(home=str(home))
    assert second["crawl"]["new"] == 3
    assert second["extract"]["extracted"] == 3
    assert second["extract"]["models"] <= 3 + at_watermark < first["extract"]["models"]
    rows = {r["repo_id"]: r for r in _keys(cat, MODELS)}
    assert all(rows[f"nightly/upload-{i}"]["tree_id"] == child["tree_id"] for i in range(3))


def test_failed_ingest_leaves_the_watermark(home, api, monkeypatch):
    import flows.ingest as ingest_mod

    def broken(*a, **k):
        raise RuntimeError("embedding store unavailable")

    monkeypatch.setattr(ingest_mod, "embed_task", broken)
    with pytest.raises(RuntimeError):
        ingest_mod.ingest(home=str(home))
    cat = Catalog(str(home / "catalog"))
    assert cat.watermark(f"local:{(home / 'lake').resolve()}") is None


@pytest.mark.slow  # starts servers or processes: the full suite runs it
def test_killed_ingest_resumes_without_duplicates_or_losses(home, monkeypatch):
    env = {**os.environ, "PROBEX_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([PROBEX, "ingest", "--json"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    shards = home / "shards"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if shards.exists() and any(shards.rglob("*.parquet")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "ingest finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run([PROBEX, "ingest", "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    cat = Catalog(str(home / "catalog"))
    models = _keys(cat, MODELS)
    ok = {(r["repo_id"], r["sha"]) for r in models if r["status"] == "ok" and r["tree_id"] and r["repo_id"] != r["tree_id"]}
    from storage.shards import layers_of, read_layer

    for tree in {r["tree_id"] for r in models if r["tree_id"]}:
        for layer in layers_of(home / "shards", tree):
            have = {(r.repo_id, r.sha) for r in read_layer(home / "shards", tree, layer)}
            assert {k for k in ok if any(m["repo_id"] == k[0] and m["tree_id"] == tree for m in models)} <= have
    # a write the kill cut short left at most a temporary name, never read; compaction clears it
    import storage.compaction as compaction

    monkeypatch.setattr(compaction, "STALE_TMP_S", 0)
    compaction.compact_all(home / "shards")
    assert not list((home / "shards").rglob("*.tmp"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # starts servers or processes: the full suite runs it
def test_deployments_deploy_and_a_worker_runs_backfill(home, tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": url,
           "PROBEX_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    prefect = str(Path(sys.executable).parent / "prefect")
    server = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        run = lambda *args, **kw: subprocess.run([prefect, *args], env=env, cwd=REPO, capture_output=True,
                                                text=True, timeout=kw.get("timeout", 300))
        r = run("work-pool", "create", "probex-process", "--type", "process")
        assert r.returncode == 0, r.stdout + r.stderr
        r = run("--no-prompt", "deploy", "--all")
        assert r.returncode == 0, r.stdout + r.stderr
        for name in ("nightly-ingest", "backfill", "train-experts"):
            assert name in r.stdout
        r = run("deployment", "run", "ingest/backfill", "--param", f"home={home}",
                "--param", "since=2000-01-01", "--param", "until=2100-01-01")
        assert r.returncode == 0, r.stdout + r.stderr
        run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", r.stdout).group(1)
        r = run("worker", "start", "--pool", "probex-process", "--run-once", timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        state = httpx.get(f"{url}/flow_runs/{run_id}", timeout=10).json()["state"]["type"]
        assert state == "COMPLETED", r.stdout[-3000:] + r.stderr[-3000:]
        assert Catalog(str(home / "catalog")).read(MODELS).num_rows > 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
