"""The one-command demo: build the lake if absent -> ingest -> train experts -> evaluate -> search."""

from __future__ import annotations

import time

from prefect import flow

from flows.common import publish, settings
from flows.ingest import ingest
from flows.lake import build_lake
from flows.train import train_experts
from tasks.demo import example_searches_task
from tasks.pipeline import evaluate_task


@flow(name="demo", log_prints=True)
def demo(size: str = "small", home: str | None = None) -> dict:
    from zoo.build import lake_is_complete  # here, as in tasks.demo: the zoo imports torch

    s = settings(home)
    stages, doc = {}, {}
    steps = [
        ("build lake", "lake", lambda: None if lake_is_complete(s.lake) else build_lake(size=size, seed=0, home=home)),
        ("ingest (crawl, extract, embed)", "ingest", lambda: ingest(source=str(s.lake), home=home)),
        ("train experts (+ candidate layers, re-embed)", "train", lambda: train_experts(home=home)["train"]),
        ("evaluate", "eval", lambda: evaluate_task(home, baselines=False, cross=False)),
        ("example searches", "searches", lambda: example_searches_task(home)),
    ]
    for stage, key, run in steps:
        t = time.perf_counter()
        doc[key] = run()
        stages[stage] = time.perf_counter() - t
    publish("demo-summary", "demo", {"stage seconds": {k: round(v, 1) for k, v in stages.items()}})
    return {"stages": stages, **doc}
