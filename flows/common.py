"""What every flow shares: settings from flow parameters, a Dask task runner, run artifacts."""

from __future__ import annotations

from prefect.artifacts import create_markdown_artifact

from probex_core.settings import Settings, configure

settings = configure  # a flow's first line: settings from its `home` parameter, runtime env applied


def dask_runner(s: Settings):
    """prefect-dask's runner: the scheduler at PROBEX_DASK_ADDRESS, else a LocalCluster of
    single-threaded worker processes (they report to the API started by flows.runtime)."""
    import logging

    from prefect_dask import DaskTaskRunner
    from tasks.dask_cluster import HTTP_ADDRESS

    # Its "Creating a new Dask cluster" / dashboard lines are noise in a nightly log.
    logging.getLogger("prefect.task_runner").setLevel(logging.WARNING)
    if s.dask_address:
        return DaskTaskRunner(address=s.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": s.dask_workers, "threads_per_worker": 1,
                                         "processes": True, "dashboard_address": HTTP_ADDRESS})


def publish(key: str, title: str, sections: dict[str, dict | list | str]) -> None:
    """A markdown artifact with the run's summary (visible in the Prefect UI and API)."""
    lines = [f"# {title}", ""]
    for name, body in sections.items():
        lines.append(f"## {name}")
        if isinstance(body, dict):
            lines += ["| key | value |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in body.items() if not isinstance(v, (list, dict))]
        elif isinstance(body, list):
            lines += [f"- {x}" for x in body[:50]]
        else:
            lines.append(str(body))
        lines.append("")
    create_markdown_artifact(markdown="\n".join(lines), key=key, description=title)
