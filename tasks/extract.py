"""Extraction across Dask workers: one task per model; workers read and write, the client only
sends jobs (a repo opener and names) and collects small result records."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from itertools import zip_longest

from storage.extract import (
    ExtractJob,
    ExtractResult,
    candidate_layers,
    changed_layers,
    extract_model,
    header_shapes,
    model_layer_shapes,
    skipped,
)
from storage.http import HubRequests
from storage.records import is_adapter, repo_files
from storage.shards import LayerKeys, layer_keys
from storage.safetensors_reader import TensorReadError
from storage.sources import Source
from tasks.dask_cluster import dask_client

# A task that raises is re-run this often. A task whose worker dies is re-run by Dask up to
# `distributed.scheduler.allowed-failures` times (default 3) and then fails with KilledWorker;
# either way the model ends quarantined as `worker_failed` and is read again on the next run.
WORKER_RETRIES = 2


@dataclass
class ExtractSummary:
    models: int = 0
    extracted: int = 0
    skipped: int = 0
    tensors: int = 0
    bytes_read: int = 0
    bytes_needed: int = 0
    bytes_in_files: int = 0
    seconds: float = 0.0
    workers: int = 0
    quarantined: list[dict] = field(default_factory=list)  # {repo_id, sha, reason}
    hub: HubRequests = field(default_factory=HubRequests)  # the workers' Hub requests, from the results
    results: list[ExtractResult] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("results")
        d["models_per_s"] = self.extracted / self.seconds if self.seconds else 0.0
        d["mb_per_s"] = self.bytes_read / 2**20 / self.seconds if self.seconds else 0.0
        d["bytes_ratio"] = self.bytes_read / self.bytes_in_files if self.bytes_in_files else 0.0
        return d


def summarise(results: list[ExtractResult], seconds: float, workers: int) -> ExtractSummary:
    s = ExtractSummary(models=len(results), seconds=seconds, workers=workers, results=results)
    for r in results:
        s.hub.add(r.hub)
        if r.status == "skipped":
            s.skipped += 1
            continue
        s.bytes_read += r.bytes_read
        s.bytes_needed += r.bytes_needed
        s.bytes_in_files += r.bytes_in_files
        if r.status == "ok":
            s.extracted += 1
            s.tensors += r.tensors
        else:
            s.quarantined.append({"repo_id": r.repo_id, "sha": r.sha, "reason": r.reason})
    return s


def is_done(job: ExtractJob, stored: Callable[[str, str, str], LayerKeys] | None = None) -> bool:
    """Whether every layer of the job is stored (its own file or a compacted part). `stored`
    gives a layer's keys; split_done passes one that lists each layer once for all its jobs."""
    loc = job.opener
    stored = stored or layer_keys
    return bool(job.layers) and all((loc.repo_id, loc.sha) in stored(job.shards_root, job.tree_id, l)
                                    for l in job.layers)


def split_done(jobs: list[ExtractJob]) -> tuple[list[ExtractResult], list[ExtractJob]]:
    """(results for models whose shards are all there, the jobs still to run). Shard names are
    deterministic and compacted parts are read for their keys, so a model that is stored needs no
    worker; each (tree, layer) is listed once, never a request per model."""
    keys: dict[tuple[str, str, str], LayerKeys] = {}

    def stored(root: str, tree_id: str, layer: str) -> LayerKeys:
        if (root, tree_id, layer) not in keys:
            keys[root, tree_id, layer] = layer_keys(root, tree_id, layer)
        return keys[root, tree_id, layer]

    done = [is_done(j, stored) for j in jobs]
    return ([skipped(j) for j, d in zip(jobs, done) if d],
            [replace(j, planned_missing=True) for j, d in zip(jobs, done) if not d])


def run_extraction(jobs: list[ExtractJob], *, dask_address: str | None = None, n_workers: int = 2,
                   on_result: Callable[[ExtractResult], None] | None = None) -> ExtractSummary:
    """Run `extract_model` for every job on Dask and return the summary."""
    t0 = time.perf_counter()
    results, jobs = split_done(jobs)
    if not jobs:
        return summarise(results, time.perf_counter() - t0, 0)
    with dask_client(dask_address, n_workers) as client:
        workers = len(client.scheduler_info()["workers"])
        results += extract_on(client, jobs, on_result)
    return summarise(results, time.perf_counter() - t0, workers)


def extract_on(client, jobs: list[ExtractJob],
               on_result: Callable[[ExtractResult], None] | None = None,
               extract: Callable[[ExtractJob], ExtractResult] = extract_model) -> list[ExtractResult]:
    """One Dask task per model on `client` (plain Dask, no Prefect run per model: ~300 task runs
    cost minutes of API calls); a model whose worker keeps dying is quarantined, the rest land."""
    from distributed import as_completed

    # One batched `map` and results gathered with completion: the scheduler's per-task round trips
    # are serial work (~6 ms a task on 2 cores) that would cap the gain from a second worker.
    futures = client.map(extract, jobs, retries=WORKER_RETRIES, pure=False)
    job_of = {fut.key: job for fut, job in zip(futures, jobs)}
    results = []
    # as_completed runs on the *default* client's event loop unless told: with several clients in
    # one process (a notebook's, Prefect's, one closed since) that loop may be another's or dead,
    # and the iteration then waits forever (seen: every model extracted, the run never returned).
    for fut, res in as_completed(futures, loop=client.loop, with_results=True, raise_errors=False):
        if fut.status != "finished":  # the worker died (KilledWorker) or the task crashed: quarantine
            res = worker_failed(job_of[fut.key], fut.exception())
        results.append(res)
        if on_result:
            on_result(res)
    return results


def worker_failed(job: ExtractJob, error: BaseException) -> ExtractResult:
    loc = job.opener
    return ExtractResult(loc.repo_id, loc.sha, job.tree_id, "quarantined",
                         f"worker_failed: {type(error).__name__}: {error}")


# --- planning: which models, which layers ---------------------------------------------------

SAMPLE_CHILDREN = 3  # children whose headers decide a tree's candidate layers


# Statuses whose weights can be read: a missing or bad config or card loses only labels.
READABLE = ("ok", "no_config", "bad_config", "bad_card")


def tree_members(models: list[dict], tree_id: str) -> list[dict]:
    """Current, readable children of a tree (the root itself has no fine-tune to read)."""
    return [r for r in models
            if r.get("tree_id") == tree_id and r["repo_id"] != tree_id and r["files"]
            and (r["status"] in READABLE or retry_quarantined(r))]


def retry_quarantined(row: dict) -> bool:
    """A quarantined revision is read again only if a worker failed on it (maybe transient): a
    corrupt file stays corrupt until its content, and so its sha, changes."""
    return row["status"] == "quarantined" and (row.get("reason") or "").startswith("worker_failed")


def plan_candidate_layers(source: Source, models: list[dict], tree_id: str) -> dict[str, tuple[int, int]]:
    """The layers a tree offers, named by the root's tensors: shared by a sample of its children
    (same name and matrix shape; a full fine-tune offers its tensors, an adapter of any format the
    root tensors its modules change), heads excluded; when a full fine-tune is sampled, only those
    it changed relative to the root."""
    # any readable status: an adapter or pipeline without config.json is as readable as any
    members = [r for r in tree_members(models, tree_id) if r["status"] != "quarantined"]
    # adapters and full fine-tunes taken in turn: a mixed tree's sample holds both kinds, so its
    # candidates are layers both offer, not full-model layers no adapter changes
    kinds = [sorted((r for r in members if is_adapter(r) == a), key=lambda r: r["repo_id"]) for a in (False, True)]
    members = [r for pair in zip_longest(*kinds) for r in pair if r is not None]
    root = next((r for r in models if r["repo_id"] == tree_id), None)
    root_shapes = _root_shapes(source, root)
    samples, sample_rows, adapters = [], [], []
    for row in members:
        if len(samples) == SAMPLE_CHILDREN:
            break
        try:
            shapes, adapter = model_layer_shapes(source.opener(row["repo_id"], row["sha"]), repo_files(row), root_shapes)
        except (TensorReadError, OSError):
            continue
        samples.append(shapes)
        sample_rows.append(row)
        adapters.append(adapter)
    if not samples:
        return {}
    changed = None
    # what a full fine-tune changed: its values against the root's (an adapter changes only what it adapts)
    full = next((i for i, a in enumerate(adapters) if not a), None)
    if root is not None and full is not None and root["files"]:
        names = sorted(candidate_layers(samples, limit=10_000))
        try:
            changed = changed_layers(source.opener(tree_id, root["sha"]),
                                     source.opener(sample_rows[full]["repo_id"], sample_rows[full]["sha"]),
                                     repo_files(root), repo_files(sample_rows[full]), names)
        except (TensorReadError, OSError, KeyError):
            changed = None
    return candidate_layers(samples, changed)


def _root_shapes(source: Source, root: dict | None) -> dict[str, tuple[int, ...]] | None:
    """The root's tensor names and shapes, which name every child's layers (kohya keys and PEFT
    module paths are matched against them); None when the root is not readable here."""
    if root is None or not root.get("files"):
        return None
    try:
        shapes, _ = header_shapes(source.opener(root["repo_id"], root["sha"]), repo_files(root))
    except (TensorReadError, OSError):
        return None
    return shapes


def jobs_for_tree(source: Source, models: list[dict], tree_id: str, layers: dict[str, tuple[int, int] | None],
                  shards_root: str, root: dict | None = None) -> list[ExtractJob]:
    """One job per readable child; and one for `root` (the root's catalog row) when given."""
    return [
        ExtractJob(source.opener(r["repo_id"], r["sha"]), tree_id, repo_files(r), tuple(layers),
                   shards_root, tuple((l, tuple(s)) for l, s in layers.items() if s))
        for r in tree_members(models, tree_id) + ([root] if root else [])
    ]


def needs_root(members: list[dict]) -> bool:
    """Whether a tree's root layers must be extracted too: a tree whose children mix full
    fine-tunes and adapters is trained on each child's change from the root (W_child - W_root).
    Other trees never read the root (centred dense rows and LoRA rows give the same expert either
    way). A nightly plans only tonight's rows; the train flow's extraction plans whole trees, so a
    tree that became mixed tonight has its root read before its next training."""
    return len({is_adapter(r) for r in members}) == 2


def readable_root(root: dict | None) -> dict | None:
    return root if root is not None and root["files"] and root["status"] in READABLE else None
