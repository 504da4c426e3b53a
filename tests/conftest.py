"""Shared fixtures. `tiny_lake`: the bundled demo lake at size tiny, built once per test session."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Tests never write to ./.probex or ~/.prefect, and send no telemetry."""
    state = tempfile.mkdtemp(prefix="probex-tests-")
    os.environ.setdefault("PROBEX_HOME", os.path.join(state, "home"))
    os.environ["PREFECT_HOME"] = os.path.join(state, "prefect")
    os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)
    for key, value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                       "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
        os.environ.setdefault(key, value)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small tensors: one torch thread is fastest (and immune to a busy shared machine)."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _lake_cache() -> Path:
    """Where the tiny lake is kept between runs: keyed by the builder's source, so a change to
    the zoo builds a new one, and an unchanged builder costs nothing on the next run."""
    digest = hashlib.sha1()
    for path in sorted((REPO / "zoo").glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    root = Path(os.environ.get("PROBEX_TEST_CACHE") or REPO / ".pytest_cache" / "probex")
    return root / f"tiny-lake-seed0-{digest.hexdigest()[:12]}"


@pytest.fixture(scope="session")
def tiny_lake():
    """Path of a tiny lake (docs/lake.md layout), seed 0, default mess. Read-only for tests: a
    test that changes a lake copies it first. Built once, then reused across sessions (the
    builder is deterministic and resumes a lake a killed run left half-built)."""
    from zoo.build import build_lake, lake_is_complete

    out = _lake_cache()
    if not lake_is_complete(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        build_lake(out, "tiny", seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_home(tiny_lake, tmp_path_factory):
    """A PROBEX_HOME whose catalog holds the tiny lake crawled, extracted (on a 2-worker Dask
    LocalCluster), trained and embedded: what the query, CLI and notebook tests read."""
    import shutil

    from probex_core.settings import Settings, apply_runtime_env
    from tasks.pipeline import crawl_step, embed_step, extract_step, train_step

    home = tmp_path_factory.mktemp("home")
    shutil.copytree(tiny_lake, home / "lake")
    s = Settings.load(home)
    apply_runtime_env(s)
    steps = {
        "crawl": crawl_step(s, str(s.lake)),
        "extract": extract_step(s, mode="candidates"),
        "train": train_step(s),
    }
    steps["embed"] = embed_step(s)
    return s, steps


class S3Server:
    """A running S3-compatible server (moto's standalone mode) with one bucket."""

    def __init__(self, url: str, bucket: str, log: Path):
        self.url, self.bucket, self.log = url, bucket, log

    def uri(self, name: str) -> str:
        """A fresh prefix in the bucket: tests never see each other's objects."""
        import uuid

        return f"s3://{self.bucket}/{name}-{uuid.uuid4().hex[:8]}"

    def filesystem(self):
        """A plain pyarrow client for checking what is stored (not the code under test)."""
        from pyarrow import fs

        return fs.S3FileSystem(endpoint_override=self.url.split("://", 1)[1], scheme="http",
                               region="us-east-1", connect_timeout=5, request_timeout=10)

    def keys(self, uri: str) -> list[str]:
        """Every object key under an s3:// prefix, relative to it."""
        from pyarrow import fs

        prefix = uri.split("://", 1)[1].rstrip("/")
        infos = self.filesystem().get_file_info(fs.FileSelector(prefix, recursive=True, allow_not_found=True))
        return sorted(i.path[len(prefix) + 1:] for i in infos if i.type == fs.FileType.File)

    def _auth(self, count: str) -> None:
        import httpx

        r = httpx.post(f"{self.url}/moto-api/reset-auth", content=count.encode(),
                       headers={"Content-Type": "text/plain"}, timeout=5)
        r.raise_for_status()

    @contextlib.contextmanager
    def checking_credentials(self):
        """Inside the block the server checks every request's signature against its (empty) IAM
        users, so any key is refused, as a real store refuses a wrong one; outside it accepts any."""
        self._auth("0")
        try:
            yield
        finally:
            self._auth("inf")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server on loopback for the session (`moto_server`, from the `dev` extra), a bucket
    in it, and the standard AWS_* variables pointing at it (as a user sets them: no project
    setting names the endpoint or the keys); the variables are restored and the server stopped
    at the end. Dask workers started meanwhile inherit the variables."""
    import subprocess
    import sys
    import time

    import httpx

    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():
        pytest.fail("moto_server is missing: install the test extra (pip install -e '.[dev]')")
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    proc = url = None
    for _ in range(3):  # a free port can be taken between the probe and the server's bind
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        with open(log, "ab") as out:
            proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120  # imports of flask + moto on 2 busy cores
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/moto-api/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            proc.kill()
            proc.wait()
            continue
        break
    else:
        pytest.fail(f"moto_server did not start; its log: {log.read_text()[-2000:]}")
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "probex-test-key",
           "AWS_SECRET_ACCESS_KEY": "probex-test-secret", "AWS_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}  # the SDK never probes an instance-metadata address
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            for key in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION"):
                mp.delenv(key, raising=False)
            server = S3Server(url, "probex-test", log)
            from pyarrow import fs

            fs.S3FileSystem(endpoint_override=url.split("://", 1)[1], scheme="http", region="us-east-1",
                            allow_bucket_creation=True, connect_timeout=5,
                            request_timeout=10).create_dir(server.bucket)
            yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
