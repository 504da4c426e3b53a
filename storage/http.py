"""The one HTTP layer: every request to a Hub endpoint goes through `HttpClient.request`.

That is listing pages, model info, card and config GETs, and the HEAD and ranged GETs of weights
files, from the crawler (`HubSource`) and the reader (`HttpFile`) alike. Each request:
- has a connect and a read timeout (`probex_core.settings.HttpSettings`, PROBEX_HTTP_* variables):
  huggingface_hub's shared session has none, so a stalled server would otherwise hang us forever;
- is retried on 408/429/5xx and on transport errors (refused, reset, timed out), waiting what the
  server asks (`Retry-After` in seconds or as an HTTP date, or the Hub's `RateLimit` reset when the
  quota is spent), else a capped exponential back-off with jitter (workers sharing one quota must
  not retry in lockstep);
- stops with `RateLimited` rather than sleep longer than `max_wait_s`, and with `HttpError` /
  `HttpTimeout` after its last retry: one line naming the URL, what happened and what to do;
- first takes a slot of its Hub bucket ("api" for /api/, "resolvers" for /resolve/) from the
  client's `limiter`, retries included, when it has one: the whole cluster's budget, kept by
  Prefect (`storage.ratelimit`; PROBEX_HUB_RATE_* settings);
- is counted (`HubRequests`: sends by Hub bucket, retries, 429s, seconds waited on retries and on
  the limiter) in this process's totals (`http_counts()`) and in every `counting()` block around
  it, which is how a crawl or an extraction puts its own counts in its summary.
Other error statuses raise huggingface_hub's typed errors (`hf_raise_for_status`), so callers tell
a deleted repo (404) from a bad token (401) or a gated one.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timezone
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import httpx2
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status, parse_ratelimit_headers

from probex_core.errors import ProbexError
from probex_core.settings import ENV_CONNECT_TIMEOUT, ENV_MAX_WAIT, ENV_READ_TIMEOUT, HttpSettings
from storage.hubcounts import HubRequests, counting, http_counts
from storage.hubcounts import count as _count

__all__ = ["HttpClient", "HttpError", "HttpTimeout", "HubRequests", "Limiter", "RateLimited", "RetryPolicy",
           "SourceError", "counting", "http_counts", "hub_bucket", "server_wait"]

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})  # the set huggingface_hub retries too


class SourceError(ProbexError):
    """A model source as a whole cannot be read (a missing folder, an endpoint down after retries).

    Defined here, below the sources, because the HTTP layer raises it too. One bad repo never
    raises: it becomes a record with a status and a reason.
    """


class HttpError(SourceError):
    """An endpoint kept failing (refused, reset, 5xx) through every retry."""


class HttpTimeout(HttpError):
    """An endpoint did not connect or answer within the configured timeout, every try."""


class RateLimited(HttpError):
    """The endpoint keeps rate-limiting us, or asks for a longer wait than we allow."""


# --- how long to wait ---------------------------------------------------------------------------


def server_wait(response: httpx2.Response | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds the server asks us to wait: the `RateLimit` reset when the quota is spent, else
    `Retry-After` (delay-seconds or an HTTP date); None when it gives no hint."""
    if response is None:
        return None
    info = parse_ratelimit_headers(response.headers)
    if response.status_code == 429 and info is not None and info.remaining == 0:
        return float(info.reset_in_seconds)
    value = (response.headers.get("Retry-After") or "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a server that omits the zone means it too
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now())


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 5
    base_wait_s: float = 1.0  # first back-off without a server hint; doubles each retry; also the floor
    max_wait_s: float = 60.0  # caps the back-off; a server asking for longer makes us stop, not sleep
    jitter: float = 0.5  # a back-off is drawn from [(1 - jitter) * b, b]; 0 gives exactly b

    def backoff(self, retry: int) -> float:
        """The wait before retry number `retry` (0-based) when the server gave no hint."""
        b = min(self.base_wait_s * 2**retry, self.max_wait_s)
        return b * (1 - self.jitter * random.random())

    def wait(self, retry: int, response: httpx2.Response | None = None) -> float:
        hinted = server_wait(response)
        return self.backoff(retry) if hinted is None else max(hinted, self.base_wait_s)


# --- the shared budget ----------------------------------------------------------------------------


class Limiter(Protocol):
    """A budget shared by processes: `acquire` blocks until one request of `bucket` may be sent
    and returns the seconds it waited. Must pickle (a Dask worker gets a copy)."""

    def acquire(self, bucket: str) -> float: ...


def hub_bucket(url: str) -> str | None:
    """The Hub's rate-limit bucket of a URL: "api" for /api/..., "resolvers" for
    /{repo}/resolve/{rev}/{file} (ranged reads too); None for anything else (a CDN, a mirror's
    other pages). The leading /api/ wins, so a repo named "resolve/x" is still an API call."""
    path = urlsplit(str(url)).path
    if path.startswith("/api/"):
        return "api"
    if "/resolve/" in path:
        return "resolvers"
    return "api" if "/api/" in path else None  # an endpoint under a prefix (a mirror's /hf/api/)


# --- the client -----------------------------------------------------------------------------------


def _where(url: str) -> str:
    """The URL without its query: short enough for one line, and never a cursor or a token."""
    parts = urlsplit(str(url))
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


@dataclass(frozen=True)
class HttpClient:
    """Timeouts and retries for every request. Frozen and picklable: a Dask worker gets a copy.

    `sleep` is injectable so tests can record the waits instead of sleeping them. `limiter`: the
    shared budget (None: this process only backs off on the server's 429s).
    """

    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    retry: RetryPolicy = RetryPolicy()
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)
    limiter: Limiter | None = None

    @classmethod
    def from_settings(cls, settings: HttpSettings | None = None, **overrides: Any) -> HttpClient:
        """From `HttpSettings` (default: read from the PROBEX_HTTP_* and PROBEX_HUB_RATE_*
        environment variables now), the shared limiter included when they ask for one."""
        s = settings if settings is not None else HttpSettings.from_env()
        retry = RetryPolicy(max_retries=s.max_retries, max_wait_s=s.max_wait_s)
        if "limiter" not in overrides:
            from storage.ratelimit import limiter_from_settings  # lazy: it imports storage.http

            overrides["limiter"] = limiter_from_settings(s)
        return cls(**{"connect_timeout_s": s.connect_timeout_s, "read_timeout_s": s.read_timeout_s,
                      "retry": retry, **overrides})

    @property
    def timeout(self) -> httpx2.Timeout:
        # read: the longest silence between two bytes of an answer; write/pool: same bound
        return httpx2.Timeout(self.read_timeout_s, connect=self.connect_timeout_s)

    def request(
        self,
        method: str,
        url: str,
        *,
        token: str | bool | None = None,
        headers: Mapping[str, str] | None = None,
        params: Any = None,
        handle: Callable[[httpx2.Response], T] | None = None,
        session: httpx2.Client | None = None,
        on_send: Callable[[], None] | None = None,
    ) -> T | httpx2.Response:
        """Send with timeouts and retries. Returns `handle(response)`, run while the body streams
        (a ranged read may stop early), or, without `handle`, the response with its body read.

        `token`: as `build_hf_headers` takes it (None: HF_TOKEN or the saved login; False: none).
        A transport error inside `handle` (a body that stalls) is retried like one before it.
        """
        policy = self.retry
        hf_headers = build_hf_headers(token=token, headers=dict(headers or {}))
        bucket = hub_bucket(url)
        for attempt in range(policy.max_retries + 1):
            last = attempt == policy.max_retries
            response = None
            if self.limiter is not None and bucket is not None:  # every send, retries too: the Hub counts each
                waited = self.limiter.acquire(bucket)
                _count(limiter_acquired=1, limiter_wait_s=waited)
            _count(requests=1, retries=1 if attempt else 0, **({bucket: 1} if bucket else {}))
            try:
                if on_send is not None:
                    on_send()
                client = session if session is not None else get_session()
                # follow_redirects: LFS files redirect to a CDN; httpx drops the token on other hosts
                with client.stream(method, url, headers=hf_headers, params=params, timeout=self.timeout,
                                   follow_redirects=True) as resp:
                    if resp.status_code in RETRY_STATUS:
                        resp.read()  # small error bodies: the connection goes back to the pool
                        response = resp
                    else:
                        if resp.status_code >= 400:
                            resp.read()  # so the raised error carries the server's message
                            hf_raise_for_status(resp)
                        if handle is not None:
                            return handle(resp)
                        resp.read()
                        return resp
            except httpx2.TimeoutException as err:
                if last:
                    raise self._timed_out(method, url, err, attempt + 1) from err
                reason = type(err).__name__
            except httpx2.TransportError as err:
                if last:
                    raise HttpError(
                        f"{method} {_where(url)}: cannot reach the endpoint ({_one_line(err)}) after "
                        f"{attempt + 1} tries; check the network and the endpoint URL (HF_ENDPOINT), then rerun"
                    ) from err
                reason = type(err).__name__
            else:
                status = response.status_code
                if status == 429:
                    _count(rate_limited=1)
                if last:
                    kind = RateLimited if status == 429 else HttpError
                    raise kind(
                        f"{method} {_where(url)} still answers HTTP {status} after {policy.max_retries} retries; "
                        "rerun later" + (" or lower the crawl rate" if status == 429 else "")
                    )
                reason = f"HTTP {status}"
            wait = policy.wait(attempt, response)
            if wait > policy.max_wait_s:
                raise RateLimited(
                    f"{method} {_where(url)}: the endpoint asks us to wait {wait:.0f} s, over the "
                    f"{policy.max_wait_s:.0f} s limit ({ENV_MAX_WAIT}); rerun after that"
                )
            log.warning("%s %s: %s; retry %d in %.2f s", method, _where(url), reason, attempt + 1, wait)
            self.sleep(wait)
            _count(retry_wait_s=wait)
        raise AssertionError("unreachable")

    def get_json(self, url: str, **kw: Any) -> Any:
        """GET and decode a JSON answer (an undecodable one is the endpoint's fault: HttpError)."""
        resp = self.request("GET", url, **kw)
        try:
            return resp.json()
        except ValueError as err:
            raise HttpError(f"GET {_where(url)} answered with something that is not JSON ({_one_line(err)}); "
                            "is the endpoint URL a Hub-compatible API?") from err

    def _timed_out(self, method: str, url: str, err: httpx2.TimeoutException, tries: int) -> HttpTimeout:
        if isinstance(err, httpx2.ConnectTimeout):
            what, limit, env = "could not connect", self.connect_timeout_s, ENV_CONNECT_TIMEOUT
        else:
            what, limit, env = "did not answer", self.read_timeout_s, ENV_READ_TIMEOUT
        return HttpTimeout(
            f"{method} {_where(url)} {what} within {limit:g} s ({tries} tries); check that the endpoint "
            f"is up, or raise {env} for a slow link, then rerun"
        )
