"""Build the bundled demo lake as a flow (resumable: a re-run finishes what a killed run left)."""

from __future__ import annotations

from prefect import flow

from flows.common import publish
from tasks.demo import build_lake_task


@flow(name="build-lake", log_prints=True)
def build_lake(size: str = "small", seed: int = 0, out: str | None = None, home: str | None = None) -> dict:
    summary = build_lake_task(home, size, seed, out)
    publish("lake-summary", f"lake {size} (seed {seed})", {
        t["root"]: {k: v for k, v in t.items() if k != "root"} for t in summary["trees"]})
    return summary
