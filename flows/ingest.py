"""Nightly ingest and backfills: crawl -> extract chosen/candidate layers on Dask -> embed.

The watermark moves only at the very end, after every row is committed: a failed run leaves it
where it was, and the catalog at its last good version.
"""

from __future__ import annotations

from datetime import datetime

from prefect import flow, get_run_logger, task

from flows.common import dask_runner, publish, settings
from storage.extract import ExtractJob, ExtractResult
from tasks.dask_cluster import quiet_cluster_config
from tasks.extract import extract_on, split_done, summarise, worker_failed
from tasks.pipeline import catalog_for, crawl_step, embed_step, plan_extraction, record_quarantine


@task(name="crawl", retries=1)
def crawl_task(home: str | None, source: str, since: datetime | None, until: datetime | None,
               limit: int | None) -> dict:
    return crawl_step(settings(home), source, since, until, limit, advance_watermark=False)


@task(name="plan-extraction")
def plan_task(home: str | None, mode: str) -> list[ExtractJob]:
    return plan_extraction(settings(home), mode=mode)[0]


@task(name="extract-tree", retries=1)
def extract_tree_task(tree_id: str, jobs: list[ExtractJob]) -> list[ExtractResult]:
    """One Prefect task per tree; inside, one plain Dask task per model on the same cluster."""
    from distributed import rejoin, secede
    from prefect_dask import get_dask_client

    with get_dask_client() as client:
        # Give this task's worker slot back while its models run, else tree tasks holding every
        # slot would wait forever on model tasks that have none.
        secede()
        try:
            return extract_on(client, jobs)
        finally:
            rejoin()


@flow(name="extract-layers")
def extract_layers(jobs: list[ExtractJob]) -> list[ExtractResult]:
    """The trees' extraction tasks run side by side on the Dask runner; a tree task that still fails
    after its retry quarantines its models as `worker_failed` (read again next run), others land."""
    by_tree: dict[str, list[ExtractJob]] = {}
    for job in jobs:
        by_tree.setdefault(job.tree_id, []).append(job)
    futures = {tree: extract_tree_task.submit(tree, tree_jobs) for tree, tree_jobs in by_tree.items()}
    out = []
    for tree, fut in futures.items():
        try:
            out += fut.result()
        except Exception as e:  # noqa: BLE001 - a crashed tree task is its models' quarantine
            out += [worker_failed(job, e) for job in by_tree[tree]]
    return out


def run_extract(home: str | None, mode: str) -> dict:
    import time

    s = settings(home)
    t0 = time.perf_counter()
    jobs = plan_task(home, mode)
    results, pending = split_done(jobs)  # already on disk: "skipped"
    if pending:
        with quiet_cluster_config():  # prefect-dask starts its LocalCluster inside
            results += extract_layers.with_options(task_runner=dask_runner(s))(pending)
    record_quarantine(catalog_for(s), results)
    return summarise(results, time.perf_counter() - t0, s.dask_workers if pending else 0).to_dict()


@flow(name="ingest", log_prints=True)
def ingest(source: str | None = None, since: datetime | None = None, until: datetime | None = None,
           limit: int | None = None, home: str | None = None) -> dict:
    """Crawl `source` (a lake folder, `hub`, or `hub:<endpoint>`; default the bundled lake) from
    `since` (default: the watermark) to `until`, extract the layers the trees need, re-embed."""
    log = get_run_logger()
    s = settings(home)
    source = source or str(s.lake)
    crawl = crawl_task(home, source, since, until, limit)
    log.info("crawl: %s seen, %s new, %s changed", crawl["seen"], crawl["new"], crawl["changed"])
    extract = run_extract(home, "auto")
    log.info("extract: %s extracted, %s quarantined", extract["extracted"], len(extract["quarantined"]))
    embed = embed_step(s)
    if crawl["next_watermark"]:
        from storage.sources import open_source

        catalog_for(s).set_watermark(open_source(source).name, datetime.fromisoformat(crawl["next_watermark"]))
    doc = {"crawl": crawl, "extract": extract, "embed": embed}
    publish("ingest-summary", f"ingest {source}", {
        "crawl": crawl, "extract": extract,
        "quarantined": [f"{q['repo_id']}: {q['reason']}" for q in extract["quarantined"]],
        "embed": {t: v["models"] for t, v in embed["trees"].items()},
    })
    return doc
