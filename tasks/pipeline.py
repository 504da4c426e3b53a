"""The pipeline's steps, each twice: a plain function of Settings (what the CLI, scripts and tests
call; it returns the JSON-able summary the CLI prints) and, beside it, the Prefect `@task` a flow
runs (it takes the home folder, so that its arguments stay small and serialisable, and returns the
typed record). Retries are set per task: only failures that a second try can fix are retried.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime

from prefect import task

from probex_core.settings import Settings, apply_runtime_env, configure
from probex_core.errors import ProbexError
from storage.catalog import MODELS, Catalog, sql_in, sql_literal
from storage.extract import ExtractJob, ExtractResult
from storage.shards import tree_bytes
from storage.sources import SourceError, open_source
from tasks.crawl import CrawlSummary, crawl_source
from tasks.dask_cluster import (advertised, check_scheduler, dask_client, gpu_resources, submit_bounded,
                                training_slots, use_worker_threads)
from tasks.embed import embed_trees
from tasks.extract import (extract_on, jobs_for_tree, needs_root, plan_candidate_layers, readable_root,
                           run_extraction, tree_members)
from tasks.window import changed_rows


def catalog_for(settings: Settings, create: bool = True) -> Catalog:
    return Catalog(settings.catalog, create=create)


_ENCODERS: dict[tuple[str, str], object] = {}


def text_encoder(settings: Settings):
    """The text encoder, loaded once per process (each tree's training task asks for it)."""
    from probex_core.text_encoder import TextEncoder

    key = (settings.text_encoder, str(settings.home))
    if key not in _ENCODERS:
        _ENCODERS[key] = TextEncoder(settings.text_encoder, cache_dir=str(settings.home / "text-cache"))
    return _ENCODERS[key]


def crawl_step(settings: Settings, source: str, since: datetime | None = None,
               until: datetime | None = None, limit: int | None = None, incremental: bool = True,
               advance_watermark: bool = True) -> dict:
    return crawl_source(open_source(source), catalog_for(settings), since=since, until=until,
                        limit=limit, incremental=incremental,
                        advance_watermark=advance_watermark).to_dict()


def tree_ids(catalog: Catalog, trees: list[str] | None = None) -> list[str]:
    known = sorted(t["tree_id"] for t in catalog.read("trees", columns=["tree_id"]).to_pylist())
    if trees:
        missing = [t for t in trees if t not in known]
        if missing:
            raise ProbexError(f"no tree {missing[0]} in the catalog; `probex trees` lists them")
        return list(trees)
    return known


def extract_step(settings: Settings, trees: list[str] | None = None, layers: list[str] | None = None,
                 mode: str = "auto", on_result=None, since: datetime | None = None) -> dict:
    if settings.dask_address:
        check_scheduler(settings.dask_address)
    jobs, plans = plan_extraction(settings, trees, layers, mode, since)
    summary = run_extraction(jobs, dask_address=settings.dask_address, n_workers=settings.dask_workers,
                             on_result=on_result)
    record_quarantine(catalog_for(settings), summary.results)
    doc = summary.to_dict()
    doc["layers"] = plans
    return doc


def plan_extraction(settings: Settings, trees: list[str] | None = None, layers: list[str] | None = None,
                    mode: str = "auto", since: datetime | None = None
                    ) -> tuple[list[ExtractJob], dict[str, list[str]]]:
    """One job per model of each tree, for: `layers` when given; else the tree expert's layer when
    it has one (mode "auto"), else every candidate layer (mode "candidates", or no expert yet).
    `since`: only models modified from then on (a nightly's), and worker failures to retry.
    Each tree's rows are read on their own (filtered in LanceDB), never the whole table."""
    catalog = catalog_for(settings)
    touched = changed_rows(catalog, since) if since is not None else None
    jobs, plans = [], {}
    for tree_id in tree_ids(catalog, trees) if touched is None else sorted(set(touched) & set(trees or touched)):
        models = touched[tree_id] if touched is not None else catalog.read(
            MODELS, where=f"tree_id = {sql_literal(tree_id)} AND status != 'superseded'").to_pylist()
        members = tree_members(models, tree_id)
        if not members:
            continue
        source = open_source(members[0]["source"])
        row = catalog.tree(tree_id) or {"tree_id": tree_id, "root": tree_id}
        shapes = candidate_shapes(catalog, source, models, row)
        if layers:
            wanted = list(layers)
        elif mode == "auto" and row.get("layer"):
            wanted = [row["layer"]]
        else:
            wanted = sorted(shapes)
        unknown = [l for l in wanted if l not in shapes]
        if unknown and shapes:
            raise ProbexError(f"tree {tree_id} has no layer {unknown[0]!r}; its layers: "
                              f"{', '.join(sorted(shapes)[:6])}{' ...' if len(shapes) > 6 else ''}")
        plans[tree_id] = wanted
        root = None
        if needs_root(members):
            root = next((r for r in models if r["repo_id"] == tree_id), None) or catalog.model(tree_id)
        jobs += jobs_for_tree(source, models, tree_id, {l: shapes.get(l) for l in wanted}, settings.shards,
                              readable_root(root))
    return jobs, plans


def candidate_shapes(catalog: Catalog, source, models: list[dict], row: dict) -> dict[str, tuple[int, int]]:
    """A tree's candidate layers and shapes: planned once from a sample, then kept in `trees`."""
    if row.get("layer_shapes"):
        return {k: tuple(v) for k, v in json.loads(row["layer_shapes"]).items()}
    if not any(r["repo_id"] == row["tree_id"] for r in models):  # the root: what fine-tuning changed
        models = models + catalog.read(MODELS, where=f"repo_id = {sql_literal(row['tree_id'])} AND "
                                                     "status != 'superseded'").to_pylist()
    shapes = plan_candidate_layers(source, models, row["tree_id"])
    if shapes:
        catalog.upsert_trees([{**row, "candidate_layers": sorted(shapes),
                               "layer_shapes": json.dumps({k: list(v) for k, v in shapes.items()})}])
    return shapes


def record_quarantine(catalog: Catalog, results) -> None:
    """Quarantined models get status + reason; a model that now extracts cleanly is ok again."""
    current = {}
    for clause in sql_in("repo_id", sorted({res.repo_id for res in results})):
        current.update({(r["repo_id"], r["sha"]): r for r in catalog.read(MODELS, where=clause).to_pylist()})
    updates = []
    for res in results:
        row = current.get((res.repo_id, res.sha))
        if row is None:
            continue
        if res.status == "quarantined":
            updates.append({**row, "status": "quarantined", "reason": res.reason})
        elif row["status"] == "quarantined":
            updates.append({**row, "status": "ok", "reason": None})
    catalog.upsert_models(updates)


def train_step(settings: Settings, trees: list[str] | None = None, layers: list[str] | None = None,
               strategies=("fast",)) -> dict:
    """Every tree's expert: one after another in this process, or, with a cluster configured
    (PROBEX_DASK_ADDRESS), each tree as its own task on it, trees in parallel."""
    ids = tree_ids(catalog_for(settings), trees)
    if settings.dask_address:
        return {"trees": train_on_cluster(settings, ids, layers, strategies)}
    from tasks.train import train_tree  # torch and sklearn: only for the steps that train

    catalog = catalog_for(settings)
    encoder = text_encoder(settings)
    out = {}
    for tree_id in ids:
        out[tree_id] = train_tree(catalog, settings.shards, str(settings.experts), tree_id, encoder=encoder,
                                  layers=layers, strategies=strategies, device=settings.device).to_dict()
    return {"trees": out}


# A bound on waiting for a cluster's training tasks: a tree's runs stop at their time limit, so only
# a cluster that lost every worker able to run them (e.g. every GPU worker) waits this long.
CLUSTER_TRAIN_TIMEOUT_S = 3600


def train_on_cluster(settings: Settings, ids: list[str], layers: list[str] | None = None,
                     strategies=("fast",)) -> dict[str, dict]:
    """One Dask task per tree on the scheduler at PROBEX_DASK_ADDRESS, on a GPU worker when the
    cluster advertises GPUs. A task whose worker dies is run again by Dask elsewhere (a new expert
    version is only made current once it is completely written)."""
    import uuid

    from distributed import wait

    with dask_client(settings.dask_address) as client:
        gpus = advertised(client)
        resources = gpu_resources(gpus)

        def submit(tree_id):
            return client.submit(train_tree_on_worker, settings, tree_id, layers, tuple(strategies),
                                 resources=resources, pure=False, key=f"train-tree-{uuid.uuid4().hex[:12]}")

        def first_done(pending):
            done = wait(pending, timeout=CLUSTER_TRAIN_TIMEOUT_S, return_when="FIRST_COMPLETED").done
            return next(iter(done))

        try:
            futures = submit_bounded(largest_first(settings, ids), submit, training_slots(client, gpus), first_done)
        except TimeoutError:
            raise ProbexError(f"a tree's training did not finish within {CLUSTER_TRAIN_TIMEOUT_S} s on "
                              f"{settings.dask_address}; are workers{' with GPU' if resources else ''} still up?") from None
        return {t: futures[t].result() for t in ids}


def largest_first(settings: Settings, ids: list[str]) -> list[str]:
    """Trees in decreasing order of their shards' bytes: training time grows with the data it
    reads (a tree of dense matrices costs more than a larger one of LoRA factors)."""
    return sorted(ids, key=lambda t: -tree_bytes(settings.shards, t))


def train_tree_on_worker(settings: Settings, tree_id: str, layers: list[str] | None, strategies) -> dict:
    """Runs on a Dask worker: the device is chosen here (CUDA when this worker has one), with the
    worker's own thread count; the expert's config records where it trained."""
    from tasks.train import train_tree

    apply_runtime_env(settings)
    use_worker_threads()
    # The stores are the caller's; local caches (the text encoder's) live under this worker's own
    # PROBEX_HOME: the caller's home folder need not exist on a worker's machine.
    local = replace(settings, home=Settings.load().home)
    return train_tree(catalog_for(settings), settings.shards, str(settings.experts), tree_id,
                      encoder=text_encoder(local), layers=layers, strategies=strategies,
                      device=settings.device).to_dict()


def embed_step(settings: Settings, trees: list[str] | None = None, since: datetime | None = None) -> dict:
    return embed_trees(catalog_for(settings), settings.shards, str(settings.experts), trees, since).to_dict()


def eval_step(settings: Settings, trees: list[str] | None = None, lake: str | None = None,
              baselines: bool = True, cross: bool = True) -> dict:
    from tasks.evaluate import cross_tree, evaluate_tree, load_ground_truth, tree_splits

    catalog = catalog_for(settings, create=False)
    gt = load_ground_truth(lake or settings.lake)
    encoder = text_encoder(settings)
    splits = {t: tree_splits(catalog, settings.shards, str(settings.experts), t, gt)
              for t in tree_ids(catalog, trees)}
    doc = {"trees": {t: evaluate_tree(sp, encoder, baselines=baselines, device=settings.device)
                     for t, sp in splits.items()}}
    if cross:
        doc["cross_tree"] = cross_tree(splits)
    return doc


# -- Prefect tasks ----------------------------------------------------------------------------------
def transient(task, task_run, state) -> bool:
    """Retry condition: a user error (bad input, a missing tree) fails at once; anything else,
    e.g. an endpoint that rate-limits or drops the connection, gets the task's retries."""
    try:
        state.result()
    except ProbexError as e:
        return isinstance(e, SourceError)
    except BaseException:  # noqa: BLE001 - any other failure may pass on a second try
        return True
    return False


@task(name="crawl", retries=2, retry_delay_seconds=[30, 120], retry_condition_fn=transient)
def crawl_task(home: str | None, source: str, since: datetime | None, until: datetime | None,
               limit: int | None) -> CrawlSummary:
    """The watermark is not moved here: the ingest flow moves it once everything downstream landed."""
    return crawl_source(open_source(source), catalog_for(configure(home)), since=since, until=until,
                        limit=limit, advance_watermark=False)


@task(name="plan-extraction")
def plan_task(home: str | None, mode: str, since: datetime | None = None) -> list[ExtractJob]:
    return plan_extraction(configure(home), mode=mode, since=since)[0]


@task(name="extract-tree", retries=1, retry_delay_seconds=10)
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


@task(name="record-quarantine")
def record_quarantine_task(home: str | None, results: list[ExtractResult]) -> None:
    record_quarantine(catalog_for(configure(home)), results)


@task(name="train-tree")
def train_tree_task(home: str | None, tree_id: str):
    """One tree's expert; returns its `TreeTrainReport` (promoted or not, and why). On a Dask
    worker (the train flow's runner) the device is chosen there, with the worker's thread count."""
    from tasks.train import train_tree

    s = configure(home)
    use_worker_threads()
    return train_tree(catalog_for(s), s.shards, str(s.experts), tree_id, encoder=text_encoder(s),
                      device=s.device)


@task(name="embed", retries=1, retry_delay_seconds=10)
def embed_task(home: str | None, trees: list[str] | None = None, since: datetime | None = None):
    """Apply the current experts to their trees' models (`since`: only models modified from then
    on); returns the `EmbedReport`."""
    s = configure(home)
    return embed_trees(catalog_for(s), s.shards, str(s.experts), trees, since)


@task(name="set-watermark")
def set_watermark_task(home: str | None, source: str, moment: datetime) -> None:
    catalog_for(configure(home)).set_watermark(open_source(source).name, moment)


@task(name="list-trees")
def list_trees_task(home: str | None, trees: list[str] | None = None) -> list[str]:
    return tree_ids(catalog_for(configure(home)), trees)


@task(name="evaluate")
def evaluate_task(home: str | None, trees: list[str] | None = None, baselines: bool = True,
                  cross: bool = True) -> dict:
    return eval_step(configure(home), trees, baselines=baselines, cross=cross)


def maintain_step(settings: Settings, keep_days: float = 14, keep_tags: int = 14) -> dict:
    """Compaction, index updates and version clean-up of every catalog table."""
    if keep_days < 0 or keep_tags < 0:
        raise ProbexError("keep_days and keep_tags must be >= 0")
    return {"tables": catalog_for(settings, create=False).maintain(keep_days=keep_days, keep_tags=keep_tags),
            "keep_days": keep_days, "keep_tags": keep_tags}


@task(name="maintain-catalog", retries=1, retry_delay_seconds=60, retry_condition_fn=transient)
def maintain_task(home: str | None, keep_days: float = 14, keep_tags: int = 14) -> dict:
    return maintain_step(configure(home), keep_days, keep_tags)
