"""Counts of Hub requests: this process's totals, and per piece of work for its summary.

Apart from `storage.http` (which counts every send) so that a step can take its counts without
loading the HTTP stack: a worker that extracts from local files never imports httpx.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, fields


@dataclass
class HubRequests:
    """What one piece of work (a crawl, one model's extraction) asked of the Hub: what its summary
    shows an operator, so rate-limit pressure is seen before it stops a run. Every send counts,
    retries included: the Hub counts each one."""

    requests: int = 0  # sends
    api: int = 0  # of which to /api/ (listing pages, model info): the Hub's "api" bucket
    resolvers: int = 0  # of which to /resolve/ (cards, configs, ranged reads): "resolvers"
    retries: int = 0  # sends after a request's first
    rate_limited: int = 0  # 429 answers: each retried after the advised wait, or raised on the last try
    retry_wait_s: float = 0.0  # slept before retries (the server's advice, else the back-off)
    limiter_acquired: int = 0  # slots taken from the shared limiter (one per send when it is on)
    limiter_wait_s: float = 0.0  # waited for those slots

    def add(self, other: HubRequests) -> HubRequests:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def to_dict(self) -> dict:
        return asdict(self)


_counts_lock = threading.Lock()
_totals = HubRequests()  # this process's, since it started
# The counting() blocks around the current code: a thread started with a copy of the context
# (the listing's readers) counts into its starter's blocks.
_scopes: ContextVar[tuple[HubRequests, ...]] = ContextVar("probex_hub_requests", default=())


def count(**add: float) -> None:
    with _counts_lock:
        for counts in (_totals, *_scopes.get()):
            for key, value in add.items():
                setattr(counts, key, getattr(counts, key) + value)


@contextmanager
def counting() -> Iterator[HubRequests]:
    """`with counting() as hub:` counts the requests sent inside the block (blocks nest)."""
    counts = HubRequests()
    token = _scopes.set((*_scopes.get(), counts))
    try:
        yield counts
    finally:
        _scopes.reset(token)


def http_counts() -> dict[str, float]:
    """This process's totals since it started (`HubRequests` as a dict). Per process: a worker
    reports its own through the result it returns."""
    with _counts_lock:
        return _totals.to_dict()
