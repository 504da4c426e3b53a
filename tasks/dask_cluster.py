"""One way to get a Dask client: an existing scheduler by address, else a LocalCluster."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from probex_core.errors import ProbexError


class DaskUnavailableError(ProbexError):
    pass


@contextlib.contextmanager
def dask_client(address: str | None, n_workers: int = 2) -> Iterator["distributed.Client"]:
    """A `distributed.Client`: to `address` when given (PROBEX_DASK_ADDRESS / --dask-address),
    else to a LocalCluster of `n_workers` single-threaded processes, closed on exit."""
    from distributed import Client

    logging.getLogger("distributed").setLevel(logging.WARNING)
    if address:
        try:
            client = Client(address, timeout="10s")
        except (OSError, TimeoutError) as e:
            raise DaskUnavailableError(
                f"the Dask scheduler at {address} does not answer ({type(e).__name__}); "
                "fix PROBEX_DASK_ADDRESS (or --dask-address) or unset it to use a local cluster"
            ) from None
        try:
            yield client
        finally:
            client.close()
        return
    with local_cluster(n_workers) as cluster:
        with Client(cluster) as client:
            yield client


# Background work a LocalCluster does not need for short I/O-bound tasks: the statistical profiler
# and work stealing (the scheduler already hands tasks out evenly). docs/benchmarks.md has what
# this and batched gathering changed on 2 cores.
QUIET_CLUSTER = {
    "distributed.worker.profile.enabled": False,
    "distributed.scheduler.work-stealing": False,
    "distributed.admin.system-monitor.interval": "2s",
}


def quiet_cluster_config():
    """Set around the start of a LocalCluster (here or prefect-dask's): its workers are spawned
    with the config in force then."""
    import dask
    import distributed  # noqa: F401 - its defaults must be in the config before `set` records it,
    # else leaving the block deletes the whole `distributed` section and the next cluster fails

    return dask.config.set(QUIET_CLUSTER)


# The scheduler's HTTP server: with no address it still tries port 8787 and warns when another
# cluster holds it; any free loopback port never warns and is never reachable from outside.
HTTP_ADDRESS = "127.0.0.1:0"


def local_cluster(n_workers: int = 2) -> "distributed.LocalCluster":
    """`n_workers` single-threaded worker processes (numpy/torch work does not share a GIL)."""
    from distributed import LocalCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)
    with quiet_cluster_config():
        return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                            dashboard_address=HTTP_ADDRESS, silence_logs=logging.WARNING)


def check_scheduler(address: str) -> None:
    """Fail fast, naming the setting, when a configured scheduler does not answer."""
    with dask_client(address):
        pass


# -- placing work on the cluster's workers ----------------------------------------------------------
GPU = "GPU"  # the resource GPU workers advertise: `dask worker --resources GPU=1` (one per device)


def advertised(client, resource: str = GPU) -> float:
    """Units of `resource` the scheduler's workers advertise together (0 when none do)."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return float(sum(w.get("resources", {}).get(resource, 0) for w in workers))


def cluster_gpus(address: str | None) -> float:
    """GPUs the scheduler at `address` advertises; 0 without one (a LocalCluster's workers
    advertise no resources)."""
    return cluster_capacity(address, 1)[0]


def cluster_capacity(address: str | None, local_workers: int) -> tuple[float, int]:
    """(GPUs advertised, `training_slots`) of the scheduler at `address`, from one connection; or
    of the LocalCluster of `local_workers` a runner would start without one (no GPUs)."""
    if not address:
        return 0.0, max(1, local_workers)
    with dask_client(address) as client:
        gpus = advertised(client)
        return gpus, training_slots(client, gpus)


def gpu_resources(gpus: float) -> dict[str, float] | None:
    """The resources a training or embedding task asks for: one GPU when the cluster advertises
    any (so each runs on a GPU worker, one per device at a time), else none (any worker)."""
    return {GPU: 1} if gpus > 0 else None


def on_gpus(gpus: float):
    """Around `.submit` calls (Prefect's Dask runner or a Client): the GPU annotation when the
    cluster advertises GPUs. It is a scheduling label only: the device is chosen on the worker."""
    import dask

    resources = gpu_resources(gpus)
    return dask.annotate(resources=resources) if resources else contextlib.nullcontext()


def use_worker_threads() -> int | None:
    """On a Dask worker, torch's default thread count becomes the worker's own (`--nthreads`): its
    share of the machine, so two workers on one host do not each take every core. Returns the
    count, or None outside a worker (nothing changes)."""
    from probex_core.device import set_default_threads

    try:
        from distributed import get_worker

        n = get_worker().state.nthreads
    except (ImportError, ValueError):  # not running on a worker
        return None
    set_default_threads(n)
    return n


def training_slots(client, gpus: float) -> int:
    """How many trees train at once: one per GPU the cluster advertises, else one per worker (a
    training task takes every thread of its worker, so a second one there would only halve both)."""
    if gpus > 0:
        return max(1, int(gpus))
    return max(1, len(client.scheduler_info(n_workers=-1)["workers"]))


def submit_bounded(items: list, submit, slots: int, first_done) -> dict:
    """Submit `items` in their order with at most `slots` in flight, the next one as soon as one
    finishes; returns {item: future}. `first_done(pending)` blocks until one of `pending` is done
    and returns it (the caller's futures may be Dask's or Prefect's).

    Handed a few tasks at once, the scheduler places each on submission without knowing how long
    it takes, so a second tree can wait behind the first on one worker while another worker
    idles. Items in decreasing cost make this the longest-first rule."""
    futures, pending = {}, []
    queue = list(items)
    while queue or pending:
        while queue and len(pending) < slots:
            item = queue.pop(0)
            futures[item] = submit(item)
            pending.append(futures[item])
        pending.remove(first_done(pending))
    return futures
