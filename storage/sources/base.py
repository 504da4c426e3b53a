"""The one interface every model source implements, and the registry that names them.

A source is named by a spec, `<scheme>:<where>` ("local:/abs/lake", "hub:https://huggingface.co").
Each subclass declares its `scheme` and is registered by defining it; `open_source(spec)` turns a
spec back into a source, so a new kind of source is one new module in this package.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import ClassVar

from storage.http import RateLimited, SourceError
from storage.records import ModelRecord
from storage.safetensors_reader import ByteSource

__all__ = ["RateLimited", "RepoOpener", "Source", "SourceError", "as_utc", "in_window", "open_source",
           "registered"]

_REGISTRY: dict[str, type[Source]] = {}
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")


def as_utc(moment: datetime | None) -> datetime | None:
    """Naive datetimes are taken as UTC, so `--since 2025-01-01` means what people expect."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class RepoOpener(ABC):
    """Opens the files of one repo at one revision: small, frozen and picklable, so a Dask job
    carries it to a worker, which opens only the files (and byte ranges) it needs."""

    repo_id: str
    sha: str

    @abstractmethod
    def open(self, filename: str) -> ByteSource:
        """Random access to one file of the repo (storage.safetensors_reader.LocalFile / HttpFile)."""


class Source(ABC):
    """Lists model repositories as `ModelRecord`s and opens their files.

    `spec` (and `name`, the same string, which watermarks and catalog rows store) is
    "<scheme>:<where>"; `open_source(source.spec)` gives an equivalent source back.
    """

    scheme: ClassVar[str]  # e.g. "hub"; a subclass that declares one is registered under it
    name: str

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        scheme = cls.__dict__.get("scheme")
        if scheme is None:
            return
        if not _SCHEME.fullmatch(scheme):
            raise TypeError(f"{cls.__qualname__}.scheme {scheme!r} must be lower-case letters, digits, '+-.'")
        old = _REGISTRY.get(scheme)
        # The same class defined again (a module reloaded) replaces itself; another class may not.
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"source scheme {scheme!r} is taken by {old.__module__}.{old.__qualname__}")
        _REGISTRY[scheme] = cls

    @classmethod
    @abstractmethod
    def from_spec(cls, where: str) -> Source:
        """The source a spec names; `where` is what follows "<scheme>:" ("" for the bare scheme)."""

    @property
    def spec(self) -> str:
        return self.name

    @abstractmethod
    def list_models(
        self, since: datetime | None = None, until: datetime | None = None, limit: int | None = None
    ) -> Iterator[ModelRecord]:
        """Records newest first by `last_modified`, within `since <= last_modified < until`
        (half-open, so consecutive backfill windows neither overlap nor leave gaps), at most
        `limit` of them. Lazy: stopping early stops the listing."""

    @abstractmethod
    def model_info(self, repo_id: str, sha: str | None = None) -> ModelRecord:
        """The record of one repo at `sha` (None: its current revision), read afresh. A repo that
        is not there is a record with status `not_found`, not an error."""

    @abstractmethod
    def opener(self, repo_id: str, sha: str) -> RepoOpener:
        """What a worker needs to open this repo's files at `sha`."""


def in_window(moment: datetime | None, since: datetime | None, until: datetime | None) -> tuple[bool, bool]:
    """(inside the window, past its old end) for a listing sorted newest first."""
    if moment is None:
        return since is None and until is None, False
    if until is not None and moment >= until:
        return False, False
    if since is not None and moment < since:
        return False, True
    return True, False


def registered() -> dict[str, type[Source]]:
    """scheme -> Source class, for every source module loaded."""
    return dict(_REGISTRY)


def open_source(spec: str) -> Source:
    """The source a spec names: "<scheme>:<where>" for any registered scheme ("hub:<URL>",
    "local:<folder>"), a bare scheme ("hub": HF_ENDPOINT or huggingface.co), or a folder path."""
    spec = str(spec)
    scheme, sep, where = spec.partition(":")
    if scheme in _REGISTRY:
        return _REGISTRY[scheme].from_spec(where)
    if sep and _SCHEME.fullmatch(scheme) and len(scheme) > 1 and not Path(spec).exists():
        raise SourceError(f"unknown source {spec!r}: no source is registered for {scheme!r}: "
                          f"use one of {', '.join(sorted(_REGISTRY))} (<scheme>:<where>), or a lake folder path")
    return _REGISTRY["local"].from_spec(spec)
