"""Extraction on a real Dask cluster: a model whose worker keeps dying is retried a bounded number
of times, then quarantined as `worker_failed`; every other model of the run lands."""

import logging
import os

import dask
import numpy as np
from safetensors.numpy import save_file

from storage.extract import ExtractJob, extract_model
from storage.sources import LocalOpener
from storage.shards import has_shard


def extract_or_die(job: ExtractJob):
    """What a worker does with a model that crashes it (a segfault in a reader, an OOM kill)."""
    if job.opener.repo_id.endswith("/dies"):
        with open(os.path.join(job.opener.folder, "attempts"), "a") as f:
            f.write("1")
        os._exit(1)
    return extract_model(job)


def _job(tmp_path, repo_id: str) -> ExtractJob:
    d = tmp_path / repo_id.replace("/", "--")
    d.mkdir()
    save_file({"layer.weight": np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)},
              str(d / "model.safetensors"))
    return ExtractJob(LocalOpener(repo_id, "0" * 40, str(d)), "org/root", ("model.safetensors",),
                      ("layer.weight",), str(tmp_path / "shards"))


def test_a_worker_that_dies_is_retried_then_quarantined(tmp_path):
    from distributed import Client, LocalCluster

    from tasks.extract import extract_on

    jobs = [_job(tmp_path, "org/a"), _job(tmp_path, "org/dies"), _job(tmp_path, "org/b")]
    # Dask bounds the deaths a task may cause (allowed-failures, default 3: four deaths; `retries`
    # only re-run tasks that raised). One allowed failure keeps the test short.
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                         silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        results = extract_on(client, jobs, extract=extract_or_die)
    by_repo = {r.repo_id: r for r in results}
    assert sorted(by_repo) == ["org/a", "org/b", "org/dies"] and len(results) == 3
    assert by_repo["org/dies"].status == "quarantined"
    assert by_repo["org/dies"].reason.startswith("worker_failed: KilledWorker")
    assert (tmp_path / "org--dies" / "attempts").read_text() == "11"  # 1 + allowed-failures: bounded
    # The others land ("skipped" when a rerun found the shard a dead worker had already written).
    for repo in ("org/a", "org/b"):
        assert by_repo[repo].status in ("ok", "skipped"), by_repo[repo]
        assert has_shard(tmp_path / "shards", "org/root", "layer.weight", repo, "0" * 40)
    assert not has_shard(tmp_path / "shards", "org/root", "layer.weight", "org/dies", "0" * 40)
