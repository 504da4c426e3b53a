"""Where flows report to: a standing Prefect API shared by the flow and every Dask worker.

Without PREFECT_API_URL, Prefect starts a temporary server per process, and with process-based Dask
workers that means one more slow-starting server per worker. Instead, when no API is
configured we start one local `prefect server start` (SQLite under PREFECT_HOME) before any worker
exists and export its URL, so the workers inherit it. With PREFECT_API_URL set (a real deployment)
nothing is started.

The server is launched as a plain subprocess, without importing Prefect's (heavy) server modules
here, so that the caller can import its flows while the server boots.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from probex_core.errors import ProbexError

START_TIMEOUT_S = 180  # the first start migrates a fresh SQLite database: slow on 2 busy cores
START_ATTEMPTS = 3  # a port taken between choosing and binding it: try another


class PrefectApiError(ProbexError):
    pass


@contextlib.contextmanager
def prefect_api(prepare: Callable[[], object] | None = None) -> Iterator[object]:
    """Make sure flows have an API for the block, starting a local server if none is configured.

    `prepare` (e.g. importing the flow modules) runs while the server starts, and its result is
    yielded once the API answers and PREFECT_API_URL points at it.
    """
    if os.environ.get("PREFECT_API_URL"):
        yield prepare() if prepare else None
        return
    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser()
    home.mkdir(parents=True, exist_ok=True)  # the server's SQLite database lives here
    server = LocalServer(home / "server.log")
    try:
        server.launch()
        prepared = prepare() if prepare else None
        server.wait_ready()
        os.environ["PREFECT_API_URL"] = server.api_url  # for Dask workers, started later
        from prefect.settings import PREFECT_API_URL, temporary_settings

        # Prefect read its settings when first imported (maybe during `prepare`): update them too.
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield prepared
    finally:
        if os.environ.get("PREFECT_API_URL") == server.api_url:
            # Ship buffered run logs while the API still answers.
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)
            os.environ.pop("PREFECT_API_URL", None)
        server.stop()


class LocalServer:
    """`prefect server start` on a free loopback port, its output in `log_path`."""

    def __init__(self, log_path: Path):
        self.log_path = log_path
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.attempts = 0

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def launch(self) -> None:
        self.attempts += 1
        self.port = free_port()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                 "--port", str(self.port), "--no-ui", "--log-level", "WARNING"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
            )

    def wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if self.attempts < START_ATTEMPTS:
                    self.launch()
                    continue
                raise PrefectApiError(
                    f"the local Prefect server exited with code {self.proc.returncode}; its log is "
                    f"{self.log_path}. Set PREFECT_API_URL to a running server to skip starting one"
                )
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise PrefectApiError(f"the local Prefect server did not answer within {START_TIMEOUT_S} s; "
                              f"its log is {self.log_path}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
