"""Shared fixtures. `tiny_lake`: the bundled demo lake at size tiny, built once per test session."""

from __future__ import annotations

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
