"""Small facts about a catalogued repo that several steps need: where its files are, what kind."""

from __future__ import annotations

from storage.extract import ADAPTER_WEIGHTS, RepoLocation
from storage.sources import HubSource, LocalSource, Source


def location(source: Source, repo_id: str, sha: str) -> RepoLocation:
    """Where a worker finds this repo's files: the lake folder, or the Hub endpoint by HTTP Range."""
    if isinstance(source, LocalSource):
        return RepoLocation(repo_id, sha, local_dir=str(source.root / repo_id))
    if isinstance(source, HubSource):
        return RepoLocation(repo_id, sha, endpoint=source.endpoint, token=source.auth_token)
    raise TypeError(f"unknown source type {type(source).__name__}")


def repo_files(row: dict) -> tuple[str, ...]:
    """File names of a `models` catalog row."""
    return tuple(f["path"] for f in row.get("files") or [])


def is_adapter(row: dict) -> bool:
    """A PEFT adapter repo (adapter weights, no full weights)."""
    files = repo_files(row)
    return ADAPTER_WEIGHTS in files and "model.safetensors" not in files


def source_from_name(name: str) -> Source:
    """Reopen the source a catalog row came from ("local:/abs/path" or "hub:<endpoint>")."""
    kind, _, where = name.partition(":")
    if kind == "local":
        return LocalSource(where)
    if kind == "hub":
        return HubSource(endpoint=where)
    raise ValueError(f"unknown source name {name!r}")
