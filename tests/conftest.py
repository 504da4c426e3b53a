"""Shared fixtures. `tiny_lake`: the bundled demo lake at size tiny, built once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_lake(tmp_path_factory):
    """Path of a tiny lake (docs/lake.md layout), seed 0, default mess."""
    from zoo.build import build_lake

    out = tmp_path_factory.mktemp("zoo") / "lake"
    build_lake(out, "tiny", seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_home(tiny_lake, tmp_path_factory):
    """A PROBEX_HOME whose catalog holds the tiny lake crawled, extracted (on a 2-worker Dask
    LocalCluster), trained and embedded: what the query, CLI and notebook tests read."""
    import shutil

    from probex.config import Settings, apply_runtime_env
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
