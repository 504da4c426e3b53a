"""Nightly ingest and backfills: crawl -> extract chosen/candidate layers on Dask -> embed.

The watermark moves only at the very end, after every row is committed: a failed run leaves it
where it was, and the catalog at its last good version.
"""

from __future__ import annotations

import time
from datetime import datetime

from prefect import flow, get_run_logger

from flows.common import dask_runner, publish, settings
from storage.extract import ExtractJob, ExtractResult
from tasks.dask_cluster import quiet_cluster_config
from tasks.extract import ExtractSummary, split_done, summarise, worker_failed
from tasks.pipeline import (
    crawl_task,
    embed_task,
    extract_tree_task,
    plan_task,
    record_quarantine_task,
    set_watermark_task,
)


@flow(name="extract-layers", validate_parameters=False)  # jobs are our own typed records
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


def run_extract(home: str | None, mode: str, since: datetime | None = None) -> ExtractSummary:
    """Plan, extract what is not on disk yet (on Dask), record quarantines: a step of two flows.
    `since`: only models modified from then on (and worker failures to retry)."""
    s = settings(home)
    t0 = time.perf_counter()
    results, pending = split_done(plan_task(home, mode, since))  # already on disk: "skipped"
    if pending:
        with quiet_cluster_config():  # prefect-dask starts its LocalCluster inside
            results += extract_layers.with_options(task_runner=dask_runner(s))(pending)
    record_quarantine_task(home, results)
    return summarise(results, time.perf_counter() - t0, s.dask_workers if pending else 0)


@flow(name="ingest", log_prints=True)
def ingest(source: str | None = None, since: datetime | None = None, until: datetime | None = None,
           limit: int | None = None, home: str | None = None) -> dict:
    """Crawl `source` (a lake folder, `hub`, or `hub:<endpoint>`; default the bundled lake) from
    `since` (default: the watermark) to `until`, extract the layers the trees need, re-embed."""
    log = get_run_logger()
    source = source or str(settings(home).lake)
    crawl = crawl_task(home, source, since, until, limit)
    log.info("crawl: %s seen, %s new, %s changed", crawl.seen, crawl.new, crawl.changed)
    # What this window listed: the watermark the crawl started from (it moves only at the end),
    # so a run that died after its crawl is finished by the next one. No window: everything.
    start = since or (datetime.fromisoformat(crawl.watermark) if crawl.watermark else None)
    extract = run_extract(home, "auto", start)
    log.info("extract: %s extracted, %s quarantined", extract.extracted, len(extract.quarantined))
    embed = embed_task(home, since=start)
    if crawl.next_watermark:
        set_watermark_task(home, source, datetime.fromisoformat(crawl.next_watermark))
    publish("ingest-summary", f"ingest {source}", {
        "crawl": crawl.to_dict(), "extract": extract.to_dict(),
        "quarantined": [f"{q['repo_id']}: {q['reason']}" for q in extract.quarantined],
        "embed": {t: v["models"] for t, v in embed.trees.items()},
    })
    return {"crawl": crawl.to_dict(), "extract": extract.to_dict(), "embed": embed.to_dict()}
