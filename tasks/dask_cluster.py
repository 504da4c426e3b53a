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
    from distributed import Client, LocalCluster

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
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=logging.WARNING) as cluster:
        with Client(cluster) as client:
            yield client


def check_scheduler(address: str) -> None:
    """Fail fast, naming the setting, when a configured scheduler does not answer."""
    with dask_client(address):
        pass
