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
