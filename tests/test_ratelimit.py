"""One Hub budget for the whole cluster (storage/ratelimit.py): the crawler and every Dask worker
take a slot of a Prefect rate limit before each Hub request, so the Hub never refuses one."""

from __future__ import annotations

import os
import pickle
import random
import socket

import httpx2
import pytest
from hubserver import HubServer
from silent_server import silent_server

from probex_core.settings import HttpSettings, HubRateSettings, SettingsError
from storage.http import HttpClient, RetryPolicy, http_counts, hub_bucket
from storage.ratelimit import SKEW_S, PrefectRateLimiter, RateLimiterError, limiter_from_settings, plan_bucket
from storage.safetensors_reader import read_header
from storage.sources import HubSource

BUDGET = {"api": 20, "resolvers": 60}  # per WINDOW_S: small, so a test's load spends several windows
WINDOW_S = 4.0
RETRY = RetryPolicy(max_retries=8, base_wait_s=0.05, max_wait_s=10)  # 429s wait out a 4 s window


# --- the plan: burst + rate * window never over the budget ----------------------------------------


def _greedy_arrivals(burst: int, rate: float, seconds: float, rng: random.Random) -> list[float]:
    """When a client that asks for a slot whenever one is free reaches the Hub: a bucket of
    `burst` slots, full at 0, refilled continuously at `rate`; each request lands up to SKEW_S
    after its grant."""
    out, tokens, t = [], float(burst), 0.0
    while t < seconds:
        if tokens >= 1:
            tokens -= 1
            out.append(t + rng.uniform(0, SKEW_S))
            continue
        dt = (1 - tokens) / rate
        t, tokens = t + dt, min(float(burst), tokens + rate * dt)
    return out


@pytest.mark.parametrize("budget,window", [(20, 4.0), (2, 1.0), (500, 300.0), (1000, 300.0), (5000, 300.0),
                                           (12000, 300.0), (7, 0.5)])
def test_a_plan_never_fills_a_hub_window_past_its_budget(budget, window):
    p = plan_bucket("api", budget, window)
    assert p.burst >= 1 and p.rate > 0 and p.burst < budget
    assert p.most_granted(window + SKEW_S) <= budget  # grants that can land in one Hub window
    if window >= 60:  # at the Hub's 5-minute window the sustained rate keeps 90% of the budget
        assert p.rate * window >= 0.9 * budget
    rng = random.Random(budget)
    arrivals = _greedy_arrivals(p.burst, p.rate, 6 * window, rng)
    for _ in range(50):  # the Hub's fixed windows, at any alignment to ours
        offset = rng.uniform(0, window)
        per_window: dict[int, int] = {}
        for a in arrivals:
            k = int((a + offset) // window)
            per_window[k] = per_window.get(k, 0) + 1
        assert max(per_window.values()) <= budget


def test_a_budget_too_small_to_split_is_refused():
    with pytest.raises(ValueError):
        plan_bucket("api", 1, 300)


# --- settings ------------------------------------------------------------------------------------


def test_settings_presets_and_one_line_errors():
    assert dict(HubRateSettings().limits) == {"api": 1000, "resolvers": 5000}  # the free token's quotas
    s = HubRateSettings.from_env({"PROBEX_HUB_RATE_LIMIT": "api=20, resolvers=60", "PROBEX_HUB_RATE_WINDOW": "4",
                                  "PROBEX_HUB_RATE_LIMITER": "ON"})
    assert dict(s.limits) == BUDGET and s.window_s == 4 and s.mode == "on"
    assert dict(HubRateSettings.from_env({"PROBEX_HUB_RATE_LIMIT": "pro"}).limits) == {"api": 2500, "resolvers": 12000}
    for env, name in [({"PROBEX_HUB_RATE_LIMIT": "api=lots"}, "PROBEX_HUB_RATE_LIMIT"),
                      ({"PROBEX_HUB_RATE_LIMIT": "pages=100"}, "PROBEX_HUB_RATE_LIMIT"),
                      ({"PROBEX_HUB_RATE_LIMITER": "maybe"}, "PROBEX_HUB_RATE_LIMITER"),
                      ({"PROBEX_HUB_RATE_WINDOW": "0"}, "PROBEX_HUB_RATE_WINDOW"),
                      ({"PROBEX_HUB_RATE_NAME": "a/b"}, "PROBEX_HUB_RATE_NAME")]:
        with pytest.raises(SettingsError) as info:
            HubRateSettings.from_env(env)
        assert name in str(info.value) and "\n" not in str(info.value)


def test_without_a_prefect_api_each_process_keeps_its_own_backoff(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert limiter_from_settings(HttpSettings()) is None  # auto: as before, no Prefect needed
    assert HttpClient.from_settings().limiter is None
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setenv("PROBEX_HUB_RATE_LIMITER", "off")
    assert HttpClient.from_settings().limiter is None
    monkeypatch.setenv("PROBEX_HUB_RATE_LIMITER", "auto")
    http = HttpClient.from_settings()
    assert isinstance(http.limiter, PrefectRateLimiter) and http.limiter.api_url == "http://127.0.0.1:9/api"
    # A worker gets a copy that talks to the same API, whatever its own environment says
    opener = HubSource(endpoint="http://hub.test", token=False).opener("org/m", "abc")
    assert pickle.loads(pickle.dumps(opener)).http.limiter == http.limiter


def test_on_without_any_prefect_api_is_one_line(monkeypatch, tmp_path):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PROBEX_HUB_RATE_LIMITER", "on")
    import prefect.settings

    with prefect.settings.temporary_settings(restore_defaults={prefect.settings.PREFECT_API_URL}):
        with pytest.raises(RateLimiterError) as info:
            HttpClient.from_settings()
    text = str(info.value)
    assert "PROBEX_HUB_RATE_LIMITER=on" in text and "PREFECT_API_URL" in text and "\n" not in text


def test_an_unreachable_prefect_api_is_one_line_naming_the_settings():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    limiter = PrefectRateLimiter(f"http://127.0.0.1:{port}/api", "probex-test", (plan_bucket("api", 20, 4),),
                                 connect_timeout_s=1, read_timeout_s=1)
    with pytest.raises(RateLimiterError) as info:
        limiter.acquire("api")
    text = str(info.value)
    assert f"127.0.0.1:{port}" in text and "PREFECT_API_URL" in text and "PROBEX_HUB_RATE_LIMITER=off" in text
    assert "\n" not in text
    assert limiter.acquire("pages") == 0.0  # a bucket without a plan never asks Prefect


def test_a_prefect_api_that_never_answers_is_one_line_not_a_hang():
    import prefect.settings

    with silent_server(8) as (host, port):  # accepts connections, never answers: a hung server or proxy
        url = f"http://{host}:{port}/api"
        limiter = PrefectRateLimiter(url, "probex-test", (plan_bucket("api", 20, 4),), connect_timeout_s=0.5,
                                     read_timeout_s=0.5)
        # Prefect's client retries a read timeout (5 times by default, with 2-32 s back-off: bounded,
        # but a minute); one retry here keeps the test short and still goes through that path.
        with prefect.settings.temporary_settings({prefect.settings.PREFECT_CLIENT_MAX_RETRIES: 1}):
            with pytest.raises(RateLimiterError) as info:
                limiter.acquire("api")
    text = str(info.value)
    assert url in text and "PREFECT_API_URL" in text and "\n" not in text


# --- the hook: one slot per send, retries included; 429s counted ----------------------------------


def test_bucket_of_a_url():
    assert hub_bucket("https://huggingface.co/api/models?limit=5") == "api"
    assert hub_bucket("https://huggingface.co/api/models/resolve/x/revision/abc") == "api"  # a repo "resolve/x"
    assert hub_bucket("https://huggingface.co/org/api/resolve/abc/model.safetensors") == "resolvers"
    assert hub_bucket("https://mirror.example/hf/api/models") == "api"
    assert hub_bucket("https://cdn-lfs.hf.co/repos/ab/cd/xyz") is None


class RecordingLimiter:
    """Records what HttpClient asks of a limiter (the Prefect one is exercised below); says it
    waited `wait` seconds for each slot."""

    def __init__(self, wait: float = 0.0):
        self.asked: list[str] = []
        self.wait = wait

    def acquire(self, bucket: str) -> float:
        self.asked.append(bucket)
        return self.wait


def test_a_429_with_retry_after_is_retried_after_the_wait_and_counted():
    with HubServer(repos=50, page_size=5) as hub:
        hub.faults.rate_limited, hub.faults.retry_after, hub.faults.route = 1, "3", "info"
        waits: list[float] = []
        limiter = RecordingLimiter()
        http = HttpClient(connect_timeout_s=5, read_timeout_s=10, retry=RETRY, sleep=waits.append, limiter=limiter)
        before = http_counts()
        record = HubSource(endpoint=hub.url, token=False, http=http).model_info(hub.sim.repo_id(7))
        after = http_counts()
        counts = hub.counts
    assert record.status == "ok" and waits == [3.0]
    assert counts["info"] == {"served": 1, "refused": 1}
    assert after["rate_limited"] - before["rate_limited"] == 1
    assert after["retries"] - before["retries"] == 1
    sent = after["requests"] - before["requests"]
    assert sent == counts["info"]["served"] + counts["info"]["refused"] + counts["resolve"]["served"]
    assert limiter.asked == ["api", "api"] + ["resolvers"] * counts["resolve"]["served"]  # the retry took a slot too


def test_the_last_429_is_counted_and_raised():
    from storage.http import RateLimited

    session = httpx2.Client(transport=httpx2.MockTransport(lambda r: httpx2.Response(429, headers={"Retry-After": "1"})))
    http = HttpClient(retry=RetryPolicy(max_retries=2), sleep=lambda s: None)
    before = http_counts()["rate_limited"]
    with pytest.raises(RateLimited):
        http.request("GET", "http://hub.test/api/models", token=False, session=session)
    assert http_counts()["rate_limited"] - before == 3


def test_crawl_and_extraction_summaries_count_requests_429s_and_waits_as_the_hub_counts(tmp_path):
    """What `probex crawl` / `ingest` print about rate-limit pressure: the crawl's requests (its
    reader threads' included) and each extracted model's, against the server's own counters."""
    from storage.catalog import Catalog
    from storage.extract import ExtractJob, extract_model
    from storage.http import HubRequests
    from tasks.crawl import crawl_source

    waits: list[float] = []
    limiter = RecordingLimiter(wait=0.25)
    http = HttpClient(connect_timeout_s=5, read_timeout_s=10, retry=RETRY, sleep=waits.append, limiter=limiter)
    with HubServer(repos=30, page_size=10) as hub:
        src = HubSource(endpoint=hub.url, token=False, http=http)
        hub.faults.rate_limited, hub.faults.retry_after, hub.faults.route = 3, "2", "resolve"
        crawl = crawl_source(src, Catalog(str(tmp_path / "catalog"))).hub
        crawled = hub.counts
        hub.reset_counts()
        hub.faults.rate_limited = 2
        sim, layer = hub.sim, "encoder.layer.0.attention.self.query.weight"
        jobs = [ExtractJob(src.opener(sim.repo_id(i), sim.sha(i)), sim.repo_id(sim.tree(i)), sim.FILES, (layer,),
                           str(tmp_path / "shards")) for i in range(20, 25)]
        results = [extract_model(job) for job in jobs]  # what a worker returns, its counts inside
        extracted = hub.counts
    assert crawl.requests == sum(c["served"] + c["refused"] for c in crawled.values()) == 3 + 30 + 3
    assert (crawl.api, crawl.resolvers) == (3, 33)  # 3 listing pages; 30 configs and 3 refused tries
    assert crawl.rate_limited == crawl.retries == sum(c["refused"] for c in crawled.values()) == 3
    assert crawl.retry_wait_s == 6.0 and crawl.limiter_acquired == crawl.requests
    assert crawl.limiter_wait_s == pytest.approx(0.25 * crawl.requests)
    assert all(r.status == "ok" for r in results)
    total = HubRequests()
    for r in results:
        total.add(r.hub)
    assert total.requests == total.resolvers == sum(c["served"] + c["refused"] for c in extracted.values())
    assert total.rate_limited == extracted["resolve"]["refused"] == 2 and total.retry_wait_s == 4.0
    assert waits == [2.0] * 5


# --- the shared budget, with a Prefect server, a crawler and two worker processes -------------------


@pytest.fixture(scope="module")
def api():
    from flows.runtime import prefect_api

    from probex_core.settings import Settings, apply_runtime_env

    apply_runtime_env(Settings.load())
    with prefect_api():
        yield os.environ["PREFECT_API_URL"]


def _limiter(api_url: str, name: str) -> PrefectRateLimiter:
    plans = tuple(plan_bucket(b, n, WINDOW_S) for b, n in BUDGET.items())
    return PrefectRateLimiter(api_url, name, plans, max_wait_s=120, connect_timeout_s=5, read_timeout_s=10)


def worker_load(endpoint: str, http: HttpClient, repo_ids: list[str]) -> dict:
    """What an extraction worker asks of the Hub: model info (api), config (resolvers) and the
    weights' header by two ranged reads (resolvers), per repo. Runs in a Dask worker process."""
    before = http_counts()
    source = HubSource(endpoint=endpoint, token=False, http=http)
    for repo_id in repo_ids:
        record = source.model_info(repo_id)
        assert record.status == "ok", record
        read_header(source.opener(repo_id, record.sha).open("model.safetensors"))
    after = http_counts()
    return {k: after[k] - before[k] for k in after}


def _run_load(api_url: str | None, name: str) -> tuple[dict, list[dict]]:
    """The crawler (this process) lists and reads the 48 newest repos while two Dask worker
    processes read 12 of the oldest each, all through HttpClient against one rate-limited hub;
    returns the hub's counts and each process's http_counts() difference. The crawler (reading
    model info per repo, for sizes) alone sends 54 API calls in well under a second when nothing
    holds it back: more than two windows' budget,
    so without the shared limiter some are refused whatever the windows' alignment."""
    from distributed import Client, LocalCluster

    limiter = _limiter(api_url, name) if api_url else None
    http = HttpClient(connect_timeout_s=5, read_timeout_s=10, retry=RETRY, limiter=limiter)
    with HubServer(repos=500, page_size=8, rate_limit=BUDGET, window_s=WINDOW_S, rate_scope="global") as hub:
        ids = [hub.sim.repo_id(i) for i in range(24)]  # the oldest: not among the newest listed
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0") as cluster, \
                Client(cluster) as client:
            client.wait_for_workers(2, timeout=120)
            workers = list(client.scheduler_info()["workers"])
            futures = [client.submit(worker_load, hub.url, http, ids[k::2], workers=[w], pure=False)
                       for k, w in enumerate(workers)]
            before = http_counts()
            crawler = HubSource(endpoint=hub.url, token=False, http=http, file_sizes=True)  # model info per repo
            records = list(crawler.list_models(limit=48))
            after = http_counts()
            per_process = [{k: after[k] - before[k] for k in after}] + client.gather(futures, errors="raise")
        counts = hub.counts
    assert len(records) == 48 and all(r.status == "ok" for r in records)
    return counts, per_process


@pytest.mark.slow  # starts a Prefect server and two Dask worker processes
def test_the_crawler_and_two_workers_share_one_budget_and_the_hub_refuses_nothing(api):
    name = f"probex-test-{random.getrandbits(32):08x}"
    unlimited, unlimited_procs = _run_load(None, name)
    limited, procs = _run_load(api, name)
    refused = sum(c["refused"] for c in limited.values())
    served = sum(c["served"] for c in limited.values())
    # The same load: 6 listing pages + 72 infos (api), 72 configs + 24 headers x 2 ranged reads (resolvers)
    assert served == sum(c["served"] for c in unlimited.values()) == 6 + 72 + 72 + 48
    assert limited["list"]["served"] + limited["info"]["served"] == 78
    assert refused == 0, limited
    assert all(p["limiter_acquired"] == p["requests"] and p["rate_limited"] == 0 for p in procs), procs
    assert all(p["requests"] > 0 for p in procs)  # the crawler and both workers made Hub requests
    # Without the shared limiter, the same load is refused (and still finishes: 429s are retried),
    # and every refusal the hub counted was counted by the process that got it.
    unlimited_refused = sum(c["refused"] for c in unlimited.values())
    assert unlimited_refused > 0, unlimited
    assert sum(p["rate_limited"] for p in unlimited_procs) == unlimited_refused
    print(f"\nwith the limiter: served {served}, refused {refused}; without: served {served}, "
          f"refused {unlimited_refused}; limiter waits {[round(p['limiter_wait_s'], 1) for p in procs]} s")


@pytest.mark.slow  # starts a Prefect server
def test_limits_are_created_once_and_follow_the_settings(api):
    from prefect.client.orchestration import SyncPrefectClient

    name = f"probex-test-{random.getrandbits(32):08x}"
    limiter = _limiter(api, name)
    limiter.ensure()
    limiter.ensure()  # idempotent
    assert limiter.acquire("api") >= 0
    smaller = PrefectRateLimiter(api, name, (plan_bucket("api", 10, WINDOW_S),), connect_timeout_s=5, read_timeout_s=10)
    smaller.ensure()
    with SyncPrefectClient(api) as client:
        got = client.read_global_concurrency_limit_by_name(f"{name}-api")
        resolvers = client.read_global_concurrency_limit_by_name(f"{name}-resolvers")
    want = plan_bucket("api", 10, WINDOW_S)
    assert got.limit == want.burst and got.slot_decay_per_second == pytest.approx(want.rate)
    assert resolvers.limit == plan_bucket("resolvers", 60, WINDOW_S).burst
