"""Where flows report to: a standing Prefect API shared by the flow and every Dask worker.

Without PREFECT_API_URL, Prefect starts a temporary server per process, and with process-based Dask
workers that means one more server per worker (ENVIRONMENT.md: 17-20 s). Instead, when no API is
configured we start one local server (SQLite under PREFECT_HOME) before any worker exists and export
its URL, so the workers inherit it. With PREFECT_API_URL set (a real deployment) nothing is started.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def prefect_api() -> Iterator[str | None]:
    """Yield the API URL flows report to, starting a local server for the block if needed."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    from pathlib import Path

    from prefect.server.api.server import SubprocessASGIServer

    # The server keeps its SQLite database in PREFECT_HOME, which must exist before it starts.
    Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser().mkdir(parents=True, exist_ok=True)
    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        yield server.api_url
    finally:
        # Ship buffered run logs while the API still answers, then stop it.
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()
