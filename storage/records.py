"""Typed records shared by every model source (Hub, local lake folder), and small facts about
the catalog rows made from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class RepoFile:
    path: str  # relative to the repo root, e.g. "model.safetensors"
    size: int  # bytes


@dataclass
class ModelRecord:
    """One model repository at one revision, as any source reports it.

    `sha` is the Hub commit sha, or for a local folder a content hash of its files.
    `status`/`reason` say whether the record itself could be read (`ok`, `bad_card`, ...);
    a source never raises for one bad repo, it returns a record that says what was wrong.
    """

    repo_id: str
    sha: str
    created_at: datetime | None = None
    last_modified: datetime | None = None
    base_model: list[str] = field(default_factory=list)  # [] when undeclared; >1 for merges
    base_model_relation: str | None = None  # "finetune" | "adapter" | "quantized" | "merge" | None
    license: str | None = None
    datasets: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    pipeline_tag: str | None = None
    library_name: str | None = None
    id2label: dict[str, str] | None = None
    files: list[RepoFile] = field(default_factory=list)
    status: str = "ok"
    reason: str | None = None


# --- facts about a `models` catalog row that several steps need ---------------------------------

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def repo_files(row: dict) -> tuple[str, ...]:
    """File names of a `models` catalog row."""
    return tuple(f["path"] for f in row.get("files") or [])


def is_adapter(row: dict) -> bool:
    """A PEFT adapter repo (adapter weights, no full weights)."""
    files = repo_files(row)
    return ADAPTER_WEIGHTS in files and "model.safetensors" not in files
