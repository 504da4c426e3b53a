"""One Hub request budget for the whole cluster, kept by Prefect (not by each process).

The Hub counts requests per token (or IP) in fixed 5-minute windows, per bucket: "api" (every
/api/ call: listing pages, model info) and "resolvers" (every /resolve/ URL: card and config GETs,
HEADs and ranged reads of weights). Every worker of a deployment spends the same budget, so a
per-process back-off only learns the budget is spent from 429s. Here each bucket is a Prefect
global concurrency limit used as a rate limit: `limit` slots (the burst) that free up at
`slot_decay_per_second` (the rate), one slot taken before each request (`HttpClient` calls
`acquire`), on the Prefect server that the flow and every Dask worker already report to.

Why it keeps the Hub's window: a bucket that starts full and refills at `rate` grants at most
`burst + rate * t` in any span `t`, whatever its alignment. A request reaches the Hub at most
`SKEW_S` after its grant, so a Hub window of `W` sees grants from a span of `W + SKEW_S`;
`plan_bucket` picks `rate = (budget - burst) / (W + SKEW_S)`, so that is at most the budget.
Prefect frees whole slots only (`floor(rate * elapsed)`), which can only grant less.

The limiter is a frozen dataclass: it pickles to a Dask worker with the API URL it was built with,
and each process opens its own Prefect client on first use. Prefect's `rate_limit()` does the same
increment; it is not used because it also emits an event per slot (one Prefect event per Hub
request) and costs about 3x as much per call here (58 ms vs 18 ms on 2 busy cores), and its wait
cannot be told apart from an unreachable API.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from probex_core.settings import (
    ENV_RATE_LIMIT,
    ENV_RATE_LIMITER,
    ENV_RATE_MAX_WAIT,
    ENV_RATE_WINDOW,
    HttpSettings,
)
from storage.http import SourceError

log = logging.getLogger(__name__)

SKEW_S = 1.0  # the longest from a slot's grant to the Hub receiving the request (connect + send)
BURST_FRACTION = 0.05  # of the budget usable at once: workers start without queueing, while the
# sustained rate, (budget - burst) per window, keeps 95% of the budget


class RateLimiterError(SourceError):
    """The shared budget cannot be used: Prefect unreachable, or no slot within the allowed wait."""


@dataclass(frozen=True)
class BucketPlan:
    """One Hub bucket as a Prefect rate limit: `burst` slots, refilled at `rate` per second."""

    bucket: str
    budget: int  # requests the Hub allows per window
    window_s: float
    burst: int  # the Prefect limit
    rate: float  # the Prefect slot_decay_per_second

    def most_granted(self, span_s: float) -> float:
        """The most requests a full bucket can grant in any span of `span_s` seconds."""
        return self.burst + self.rate * span_s


def plan_bucket(bucket: str, budget: int, window_s: float, *, burst_fraction: float = BURST_FRACTION,
                skew_s: float = SKEW_S) -> BucketPlan:
    """burst + rate * (window + skew) <= budget: no Hub window sees more than its budget."""
    if budget < 2 or window_s <= 0:
        raise ValueError(f"a budget of at least 2 requests per positive window is needed, not {budget}/{window_s}")
    burst = min(budget - 1, max(1, int(budget * burst_fraction)))
    rate = (budget - burst) / (window_s + skew_s) * (1 - 1e-9)  # never a rounding step over
    return BucketPlan(bucket, budget, window_s, burst, rate)


# --- per-process state: a Prefect client per API, limits known to exist ----------------------------

_lock = threading.Lock()
_clients: dict[tuple, object] = {}  # (pid, url, timeouts) -> SyncPrefectClient, never pickled
_ensured: set[tuple] = set()  # (pid, url, limit name, burst, rate) checked or created here


@dataclass(frozen=True)
class PrefectRateLimiter:
    """`acquire(bucket)` blocks until the bucket's Prefect rate limit grants one slot.

    Buckets without a plan (a URL that is neither /api/ nor /resolve/) are not limited.
    """

    api_url: str
    name: str  # limits are "<name>-<bucket>": one budget per name, shared by whoever uses it
    plans: tuple[BucketPlan, ...]
    max_wait_s: float = 300.0
    # Prefect's client retries a timed-out call 5 times with 2-32 s back-off: an API that never
    # answers stops a request after about 6 * read_timeout_s + 62 s, never hangs it
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 10.0  # a grant takes milliseconds
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)

    def limit_name(self, bucket: str) -> str:
        return f"{self.name}-{bucket}"

    def plan(self, bucket: str) -> BucketPlan | None:
        return next((p for p in self.plans if p.bucket == bucket), None)

    # -- Prefect -------------------------------------------------------------------------------
    def _client(self):
        key = (os.getpid(), self.api_url, self.connect_timeout_s, self.read_timeout_s)
        with _lock:
            client = _clients.get(key)
            if client is None:
                import httpx
                from prefect.client.orchestration import SyncPrefectClient
                from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY

                # Our URL (not this process's settings): a worker must use the flow's server, and
                # a process without PREFECT_API_URL would otherwise start a private one.
                client = SyncPrefectClient(
                    self.api_url, auth_string=PREFECT_API_AUTH_STRING.value(), api_key=PREFECT_API_KEY.value(),
                    httpx_settings={"timeout": httpx.Timeout(self.read_timeout_s, connect=self.connect_timeout_s)},
                )
                client.__enter__()
                _clients[key] = client
            return client

    def _unreachable(self, err: BaseException) -> RateLimiterError:
        what = " ".join(str(err).split())[:160] or type(err).__name__
        return RateLimiterError(
            f"the shared Hub rate limit cannot use the Prefect API at {self.api_url} ({what}); start it "
            f"or fix PREFECT_API_URL, or set {ENV_RATE_LIMITER}=off to rely on each process's 429 back-off"
        )

    def ensure(self) -> None:
        """Create each bucket's limit, or set an existing one to this plan (idempotent; cheap
        after the first call in a process). The flow calls it before requests start; `acquire`
        calls it too, so a worker or a plain crawl needs no set-up step."""
        import httpx
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
        from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

        client = self._client()
        for p in self.plans:
            key = (os.getpid(), self.api_url, self.limit_name(p.bucket), p.burst, p.rate)
            if key in _ensured:
                continue
            name = self.limit_name(p.bucket)
            try:
                try:
                    have = client.read_global_concurrency_limit_by_name(name)
                except ObjectNotFound:
                    try:
                        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(
                            name=name, limit=p.burst, slot_decay_per_second=p.rate))
                        log.info("created Prefect rate limit %s: %d slots, %.4g/s", name, p.burst, p.rate)
                        have = None
                    except ObjectAlreadyExists:  # another process created it a moment ago
                        have = client.read_global_concurrency_limit_by_name(name)
                if have is not None and (have.limit != p.burst or abs(have.slot_decay_per_second - p.rate) > 1e-9):
                    # The settings are the truth: a changed PROBEX_HUB_RATE_LIMIT takes effect
                    client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(
                        limit=p.burst, slot_decay_per_second=p.rate))
            except httpx.HTTPError as err:
                raise self._unreachable(err) from err
            _ensured.add(key)

    def acquire(self, bucket: str) -> float:
        """Take one slot of `bucket`'s limit, waiting as Prefect advises (423 + Retry-After);
        returns the seconds waited. Stops with `RateLimiterError` after `max_wait_s`."""
        import httpx

        plan = self.plan(bucket)
        if plan is None:
            return 0.0
        self.ensure()
        client, name = self._client(), self.limit_name(bucket)
        start = time.monotonic()
        deadline = start + self.max_wait_s
        while True:
            try:
                granted = client.increment_concurrency_slots([name], 1, "rate_limit").json()
                if granted:
                    return time.monotonic() - start
                # Empty: the limit is gone (deleted by hand?). Recreate it and ask again. (An
                # inactive one grants at once: switching it off in Prefect's UI is allowed.)
                with _lock:
                    _ensured.difference_update({k for k in _ensured if k[2] == name})
                self.ensure()
                wait = 0.1
            except httpx.HTTPStatusError as err:
                status = err.response.status_code
                if status == 423:  # no slot now; Prefect says when one is likely free
                    wait = _retry_after(err.response, 1.0 / plan.rate)
                elif status >= 500:  # a busy server (SQLite locked): try again within the wait
                    wait = 1.0
                else:
                    raise self._unreachable(err) from err
            except httpx.HTTPError as err:
                raise self._unreachable(err) from err
            left = deadline - time.monotonic()
            if left <= 0:
                raise RateLimiterError(
                    f"no slot of the shared Hub rate limit {name!r} ({plan.budget} per {plan.window_s:g} s, "
                    f"{ENV_RATE_LIMIT}, {ENV_RATE_WINDOW}) within {self.max_wait_s:g} s; too many workers "
                    f"share it, or raise {ENV_RATE_MAX_WAIT}"
                )
            self.sleep(min(wait, left))


def _retry_after(response, default: float) -> float:
    try:
        return max(0.0, float(response.headers.get("Retry-After", default)))
    except ValueError:
        return default


def limiter_from_settings(settings: HttpSettings) -> PrefectRateLimiter | None:
    """The shared limiter the settings ask for, or None (off, or auto without a Prefect API)."""
    r = settings.rate
    if r.mode == "off":
        return None
    url = os.environ.get("PREFECT_API_URL")
    if not url and r.mode == "auto":
        return None  # no standing server: each process backs off on its own 429s, as before
    if not url:
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value()  # a Prefect profile may set it
        if not url:
            raise RateLimiterError(
                f"{ENV_RATE_LIMITER}=on needs a Prefect API that every worker reaches: set PREFECT_API_URL "
                f"(e.g. to a `prefect server start`), or set {ENV_RATE_LIMITER}=auto or off"
            )
    plans = tuple(plan_bucket(bucket, budget, r.window_s) for bucket, budget in r.limits)
    return PrefectRateLimiter(url.rstrip("/"), r.name, plans, max_wait_s=r.max_wait_s,
                              connect_timeout_s=settings.connect_timeout_s,
                              read_timeout_s=min(settings.read_timeout_s, 10.0))
