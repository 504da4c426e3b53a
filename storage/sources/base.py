"""The one interface every model source implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from datetime import datetime, timezone

from probex_core.errors import ProbexError
from storage.records import ModelRecord


class SourceError(ProbexError):
    """The source as a whole cannot be read (missing folder, endpoint down after retries).

    One bad repo never raises: it becomes a record with a status and a reason.
    """


class RateLimited(SourceError):
    """The endpoint keeps rate-limiting us, or asks for a longer wait than we allow."""


def as_utc(moment: datetime | None) -> datetime | None:
    """Naive datetimes are taken as UTC, so `--since 2025-01-01` means what people expect."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=timezone.utc)


class Source(ABC):
    """Lists model repositories as `ModelRecord`s and tells where their files are.

    `name` is a stable id for watermarks ("local:/abs/path", "hub:https://huggingface.co").
    `auth_token` is what a reader passes with a URL from `file_url_or_path` (None: no auth).
    """

    name: str
    auth_token: str | None = None

    @abstractmethod
    def list_models(
        self, since: datetime | None = None, until: datetime | None = None, limit: int | None = None
    ) -> Iterator[ModelRecord]:
        """Records newest first by `last_modified`, within `since <= last_modified < until`
        (half-open, so consecutive backfill windows neither overlap nor leave gaps), at most
        `limit` of them. Lazy: stopping early stops the listing."""

    @abstractmethod
    def file_url_or_path(self, repo_id: str, sha: str, filename: str) -> str:
        """A local path or an http(s) URL for one file of one repo at `sha`; the caller opens it
        (storage.safetensors_reader.LocalFile / HttpFile)."""


def in_window(moment: datetime | None, since: datetime | None, until: datetime | None) -> tuple[bool, bool]:
    """(inside the window, past its old end) for a listing sorted newest first."""
    if moment is None:
        return since is None and until is None, False
    if until is not None and moment >= until:
        return False, False
    if since is not None and moment < since:
        return False, True
    return True, False
