"""Issue 19's figures on the `small` lake: ingest with shards and catalog on a loopback S3 server
(moto) against local disk, and every tree's expert trained as parallel tasks on a 2-worker Dask
cluster against one after another in one process. Run by `scripts/benchmark.py cluster`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

BUCKET = "probex-bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server(log_dir: Path):
    """moto's standalone S3 server on loopback with one bucket, and the AWS_* variables a user
    sets for it (restored after)."""
    import httpx
    from pyarrow import fs

    exe = Path(sys.executable).parent / "moto_server"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "moto.log", "ab") as out:
        proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/moto-api/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        os.environ.update(env)
        fs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                        allow_bucket_creation=True, connect_timeout=5, request_timeout=10).create_dir(BUCKET)
        yield f"s3://{BUCKET}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _ingest(s) -> dict:
    """The ingest flow's steps (crawl, extract, embed) on settings `s`, timed."""
    from tasks.pipeline import crawl_step, embed_step, extract_step

    t0 = time.perf_counter()
    crawl = crawl_step(s, str(s.lake))
    t1 = time.perf_counter()
    extract = extract_step(s)
    t2 = time.perf_counter()
    embed_step(s)
    t3 = time.perf_counter()
    return {"seconds": t3 - t0, "crawl_s": t1 - t0, "extract_s": t2 - t1, "embed_s": t3 - t2,
            "models": crawl["seen"], "extracted": extract["extracted"]}


def object_store(bench_dir: Path, lake: Path, log=print) -> dict:
    """Local disk first, then S3, each on a fresh home over the same lake."""
    from probex_core.settings import Settings

    out = {}
    home = bench_dir / "store-local"
    shutil.rmtree(home, ignore_errors=True)
    out["local"] = _ingest(Settings.load(home, lake=str(lake)))
    log(f"[bench] cluster: local ingest {out['local']['seconds']:.1f} s")
    with s3_server(bench_dir / "store-s3") as bucket:
        home = bench_dir / "store-s3"
        s = Settings.load(home, lake=str(lake), shards=f"{bucket}/shards", catalog=f"{bucket}/catalog",
                          experts=f"{bucket}/experts")
        out["s3"] = _ingest(s)
    log(f"[bench] cluster: S3 ingest {out['s3']['seconds']:.1f} s")
    out["ratio"] = out["s3"]["seconds"] / out["local"]["seconds"]
    return out


def _train(s) -> tuple[float, dict]:
    from tasks.pipeline import train_step

    t0 = time.perf_counter()
    doc = train_step(s)
    return time.perf_counter() - t0, {t: {"layer": r.get("layer"), "val": r.get("val"), "seconds": r.get("train_seconds")}
                                      for t, r in doc["trees"].items()}


def parallel_training(bench_dir: Path, log=print) -> dict:
    """Every tree of the extracted local home trained twice from the same shards: one after another
    in this process, then as parallel tasks on a standing 2-worker cluster (PROBEX_DASK_ADDRESS)."""
    from probex_core.settings import Settings
    from tasks.dask_cluster import local_cluster

    src = bench_dir / "store-local"
    runs = {}
    for mode in ("sequential", "cluster"):
        home = bench_dir / f"train-{mode}"
        shutil.rmtree(home, ignore_errors=True)
        shutil.copytree(src, home)
        shutil.rmtree(home / "experts", ignore_errors=True)
        s = Settings.load(home)
        if mode == "cluster":
            with local_cluster(2) as cluster:
                seconds, trees = _train(replace(s, dask_address=cluster.scheduler_address))
        else:
            seconds, trees = _train(s)
        runs[mode] = {"seconds": seconds, "trees": trees}
        log(f"[bench] cluster: {mode} training {seconds:.1f} s")
    runs["speedup"] = runs["sequential"]["seconds"] / runs["cluster"]["seconds"]
    return runs
