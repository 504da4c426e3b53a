"""HubSource through the real huggingface_hub client against the Hub-compatible test server."""

from __future__ import annotations

import gc
import json
import select
import signal
import subprocess
import sys
import time
import tracemalloc
import urllib.request
from dataclasses import replace
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path

import hubserver
import numpy as np
import pytest
from hubserver import HubServer
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import RevisionNotFoundError
from huggingface_hub.utils import get_session
from minilake import build_lake
from safetensors.numpy import load as load_safetensors

from storage.http import HttpClient
from storage.records import RepoFile
from storage.safetensors_reader import read_header, read_repo_tensors
from storage.sources import HubSource, LocalSource, RateLimited, RetryPolicy, SourceError, Status, parse

FAST = RetryPolicy(max_retries=3, base_wait_s=0.05, max_wait_s=5, jitter=0)  # exact waits to assert


def client(sleep=time.sleep) -> HttpClient:
    return HttpClient(connect_timeout_s=5, read_timeout_s=10, retry=FAST, sleep=sleep)


@pytest.fixture
def lake(tmp_path):
    return build_lake(tmp_path / "lake")


@pytest.fixture
def hub(lake):
    with HubServer(lake, page_size=4) as server:
        yield server


def source(hub, token=None, sleep=time.sleep, **kw) -> HubSource:
    return HubSource(endpoint=hub.url, token=token, http=client(sleep), **kw)


def unsized(records):
    """The records as the listing gives them: every file's size unknown (-1)."""
    return [replace(r, files=[RepoFile(f.path, -1) for f in r.files]) for r in records]


@pytest.mark.parametrize("file_sizes", [False, True])
def test_records_identical_to_local_source_across_pages(hub, lake, file_sizes):
    remote = list(source(hub, file_sizes=file_sizes).list_models())
    local = list(LocalSource(lake).list_models())
    assert len(local) == 15
    # every field, every status and reason, same order; sizes only from model info
    assert remote == (local if file_sizes else unsized(local))
    lists = hub.traffic.of("list")
    assert len(lists) == 4 and all(h.status == 200 for h in lists)  # 15 models, 4 a page: Link followed
    readable = [r for r in local if r.status != Status.BAD_REPO_ID]
    assert len(hub.traffic.of("info")) == (len(readable) if file_sizes else 0)  # the listing had the rest
    assert {r.status for r in remote} >= {Status.OK, Status.BAD_CARD, Status.NO_CONFIG, Status.BAD_REPO_ID}
    # Unparseable front matter is not in the API's cardData, so HubSource reads README.md itself.
    # One over the limit: refused unread when its size is known, else after at most limit + 1 bytes.
    cards = [h.path for h in hub.traffic.of("resolve") if h.path.endswith("/README.md")]
    fetched = {path.split("/resolve/")[0].lstrip("/") for path in cards}
    assert {"org/bad-yaml", "org/alias"} <= fetched and ("org/huge-card" in fetched) != file_sizes
    huge = hub.traffic.body_bytes.get(f"/org/huge-card/resolve/{local[2].sha}/README.md", 0)
    assert huge == 0 if file_sizes else 0 < huge <= parse.MAX_CARD_BYTES + 1


def test_listed_repos_are_read_concurrently_and_yielded_in_listing_order(hub):
    hub.faults.route, hub.faults.delay_s = "resolve", 0.2  # a distant Hub: each config GET 0.2 s
    t0 = time.monotonic()
    serial = list(source(hub, workers=1).list_models())
    serial_s, t0 = time.monotonic() - t0, time.monotonic()
    parallel = list(source(hub, workers=8).list_models())
    parallel_s = time.monotonic() - t0
    assert parallel == serial and len(serial) == 15
    assert serial_s > 2.0 and parallel_s < serial_s / 2, (serial_s, parallel_s)


def test_in_order_keeps_order_bounds_lookahead_and_raises_where_a_loop_would():
    import random
    import threading

    from storage.sources.hub import in_order

    pulled, started = [], []
    lock = threading.Lock()

    def items(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise SourceError(f"page {i} failed")
            pulled.append(i)
            yield i

    def work(i):
        with lock:
            started.append(i)
        time.sleep(random.random() / 200)
        if i == 13:
            raise ValueError("item 13")
        return i * 10

    it = in_order(work, items(40), workers=4)
    assert next(it) == 0 and len(pulled) <= 2 * 4 + 1  # taken ahead: at most 2 x workers
    got = [0]
    with pytest.raises(ValueError, match="item 13"):
        for value in it:
            got.append(value)
    assert got == [i * 10 for i in range(13)]  # every result before the failing item, in order
    pulled.clear()
    got = []
    with pytest.raises(SourceError, match="page 6"):
        for value in in_order(work, items(40, fail_at=6), workers=4):
            got.append(value)
    assert got == [i * 10 for i in range(6)]  # a failing listing: first the results before it
    started.clear()
    it = in_order(work, items(1000), workers=4)
    next(it)
    it.close()  # a consumer that stops: nothing more starts
    assert len(started) <= 2 * 4 + 1
    assert list(in_order(work, range(5), workers=1)) == [0, 10, 20, 30, 40]


def test_window_stops_paging_early(hub, lake):
    local = list(LocalSource(lake).list_models())
    since = local[2].last_modified
    got = list(source(hub).list_models(since=since))
    assert [r.repo_id for r in got] == [r.repo_id for r in local[:3]]
    assert len(hub.traffic.of("list")) == 1  # the 4th listed model is older: page 2 never asked
    got = list(source(hub).list_models(until=local[12].last_modified, limit=1))
    assert [r.repo_id for r in got] == [local[13].repo_id]  # until is exclusive


def test_listing_429_waits_retry_after_then_succeeds(hub, lake):
    hub.faults.route, hub.faults.rate_limited, hub.faults.retry_after = "list", 1, "0"
    waits: list[float] = []
    got = list(source(hub, sleep=waits.append).list_models(limit=2))
    assert [r.repo_id for r in got] == [r.repo_id for r in LocalSource(lake).list_models(limit=2)]
    first, second = hub.traffic.of("list")[:2]
    assert (first.status, second.status) == (429, 200)
    assert waits == [0.05]  # Retry-After: 0, floored at the policy's base wait


@pytest.mark.parametrize("route, file_sizes", [("resolve", False), ("info", True)])
def test_per_repo_429_honours_retry_after(hub, lake, route, file_sizes):
    hub.faults.route, hub.faults.rate_limited, hub.faults.retry_after = route, 2, "1"
    waits: list[float] = []
    # the newest has a bad id (nothing read): one repo read, its config GET (and model info)
    got = list(source(hub, sleep=waits.append, file_sizes=file_sizes).list_models(limit=2))
    local = list(LocalSource(lake).list_models(limit=2))
    assert got == (local if file_sizes else unsized(local))
    assert [h.status for h in hub.traffic.of(route)] == [429, 429, 206 if route == "resolve" else 200]  # ranged
    assert waits == [1.0, 1.0]


def test_ratelimit_header_reset_is_honoured(hub):
    hub.faults.route, hub.faults.rate_limited = "resolve", 1
    hub.faults.retry_after, hub.faults.ratelimit_reset = None, 1  # `RateLimit: "api";r=0;t=1`
    waits: list[float] = []
    list(source(hub, sleep=waits.append).list_models(limit=2))
    assert waits == [1.0]


def test_server_errors_back_off_exponentially(hub, lake):
    hub.faults.route, hub.faults.server_errors = "resolve", 2  # the config.json GET of org/nested
    waits: list[float] = []
    got = list(source(hub, sleep=waits.append).list_models(limit=2))
    assert got == unsized(LocalSource(lake).list_models(limit=2))
    assert waits == [0.05, 0.1]
    assert [h.status for h in hub.traffic.of("resolve")] == [503, 503, 206]  # a ranged GET, bounded


def test_retries_are_bounded(hub):
    hub.faults.route, hub.faults.rate_limited, hub.faults.retry_after = "resolve", 100, None
    waits: list[float] = []
    with pytest.raises(RateLimited, match="after 3 retries"):  # one reader: the first repo's tries, exactly
        list(source(hub, sleep=waits.append, workers=1).list_models(since=None, limit=3))
    assert len(hub.traffic.of("resolve")) == 4 and waits == [0.05, 0.1, 0.2]


def test_too_long_retry_after_stops_instead_of_sleeping(hub):
    hub.faults.route, hub.faults.rate_limited, hub.faults.retry_after = "resolve", 1, "3600"
    waits: list[float] = []
    with pytest.raises(RateLimited, match="wait 3600 s"):
        list(source(hub, sleep=waits.append, workers=1).list_models(limit=3))
    assert waits == [] and len(hub.traffic.of("resolve")) == 1


def test_404_marks_the_repo_not_the_run(hub, lake):
    hub.faults.not_found = {"org/child-ft"}
    recs = {r.repo_id: r for r in source(hub).list_models()}
    assert len(recs) == 15
    gone = recs["org/child-ft"]
    assert gone.status == Status.NOT_FOUND and "404" in gone.reason and gone.sha and gone.files == []
    local = {r.repo_id: r for r in unsized(LocalSource(lake).list_models())}
    assert all(recs[k] == local[k] for k in local if k != "org/child-ft")


def test_unreachable_endpoint_is_a_source_error():
    waits: list[float] = []
    with pytest.raises(SourceError, match=r"GET http://127.0.0.1:9/api/models: cannot reach .* after 4 tries"):
        list(HubSource(endpoint="http://127.0.0.1:9", http=client(waits.append)).list_models())
    assert waits == [0.05, 0.1, 0.2]


def test_env_endpoint_and_token(hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    src = HubSource(http=client())
    assert src.name == f"hub:{hub.url}" and src.auth_token == "hf_test_token"
    next(src.list_models())
    assert {h.authorization for h in hub.traffic.hits} == {"Bearer hf_test_token"}


def test_hf_hub_download_and_urls(hub, lake, tmp_path):
    src = source(hub)
    rec = next(r for r in src.list_models() if r.repo_id == "org/child-ft")
    url = src.opener(rec.repo_id, rec.sha).url("model.safetensors")
    assert url == f"{hub.url}/org/child-ft/resolve/{rec.sha}/model.safetensors"
    path = hf_hub_download(rec.repo_id, "model.safetensors", revision=rec.sha, endpoint=hub.url,
                           cache_dir=tmp_path / "cache")
    data = (lake / "org/child-ft/model.safetensors").read_bytes()
    assert open(path, "rb").read() == data
    assert f"/{rec.sha}/" in path  # cached under the commit the server reported (X-Repo-Commit)
    assert hub.traffic.body_bytes[f"/org/child-ft/resolve/{rec.sha}/model.safetensors"] == len(data)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(rec.repo_id, "config.json", revision="f" * 40, endpoint=hub.url, cache_dir=tmp_path / "c2")


def test_resolve_range_requests(hub, lake):
    rec = next(r for r in LocalSource(lake).list_models() if r.repo_id == "base/root-model")
    url = f"{hub.url}/base/root-model/resolve/{rec.sha}/model.safetensors"
    data = (lake / "base/root-model/model.safetensors").read_bytes()
    client = get_session()
    head = client.head(url)
    assert head.status_code == 200 and int(head.headers["Content-Length"]) == len(data)
    assert head.headers["X-Repo-Commit"] == rec.sha and head.headers["ETag"].startswith('"')
    part = client.get(url, headers={"Range": "bytes=8-19"})
    assert part.status_code == 206 and part.content == data[8:20]
    assert part.headers["Content-Range"] == f"bytes 8-19/{len(data)}"
    assert client.get(url, headers={"Range": "bytes=-4"}).content == data[-4:]
    path = f"/base/root-model/resolve/{rec.sha}/model.safetensors"
    assert hub.traffic.body_bytes[path] == 12 + 4  # only the bytes asked for; HEAD sends none
    bad = client.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert bad.status_code == 416 and bad.headers["Content-Range"] == f"bytes */{len(data)}"


def test_safetensors_reader_reads_header_through_server(hub, lake):
    src = source(hub)
    rec = next(r for r in src.list_models() if r.repo_id == "org/child-lora")
    header = read_header(src.opener(rec.repo_id, rec.sha).open("adapter_model.safetensors"))
    assert {"layer.weight", "layer.bias"} <= set(header.tensors)


def test_listing_params_and_model_info_shapes(hub, lake):
    api = HfApi(endpoint=hub.url)
    ids = [m.id for m in api.list_models(author="org", search="child")]
    assert sorted(ids) == ["org/child-ft", "org/child-lora", "org/grandchild"]
    info = api.model_info("org/child-ft", files_metadata=True)
    local = next(r for r in LocalSource(lake).list_models() if r.repo_id == "org/child-ft")
    assert (info.sha, info.last_modified, info.created_at) == (local.sha, local.last_modified, local.created_at)
    assert {s.rfilename: s.size for s in info.siblings} == {f.path: f.size for f in local.files}
    assert info.card_data.base_model == "base/root-model" and info.config["id2label"] == {"0": "cat", "1": "dog"}
    lean = api.model_info("org/child-ft", expand=["sha"])
    assert lean.sha == local.sha and lean.card_data is None and lean.siblings is None


def test_unexpected_http_error_stops_the_run_with_a_clear_error(hub):
    hub.faults.route, hub.faults.server_errors, hub.faults.server_error_status = "resolve", 1, 403
    with pytest.raises(SourceError, match="HTTP 403 for 'org/nested'.*HF_TOKEN"):  # one reader: the first repo
        list(source(hub, workers=1).list_models())


def test_model_info_rereads_one_repo_like_the_listing(hub, lake):
    import pickle

    src = source(hub, file_sizes=True)
    listed = {r.repo_id: r for r in src.list_models()}
    assert src.model_info("org/child-ft", listed["org/child-ft"].sha) == listed["org/child-ft"]
    assert src.model_info("org/child-ft") == listed["org/child-ft"]  # no sha: the current one
    assert unsized([src.model_info("org/child-ft")]) == [r for r in source(hub).list_models()
                                                         if r.repo_id == "org/child-ft"]
    hub.faults.not_found = {"org/child-ft"}
    assert src.model_info("org/child-ft").status == Status.NOT_FOUND
    opener = pickle.loads(pickle.dumps(src.opener("org/child-lora", listed["org/child-lora"].sha)))
    assert opener.http == src.http and "token" not in repr(opener)
    assert opener.open("adapter_model.safetensors").size() == (lake / "org/child-lora/adapter_model.safetensors").stat().st_size


# --- the simulated Hub at scale (issue 18, item 2) ---------------------------------------------------

MILLION = 1_000_000
LISTED = {"_id", "id", "sha", "lastModified", "createdAt"}  # a listing asked for these alone


class FakeClock:
    """The server's clock and the client's sleep at once: a wait the client sleeps moves the
    server's time, so rate-limit windows are tested exactly and instantly."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


@pytest.fixture
def sim():
    with HubServer(repos=MILLION, seed=7, tree_size=10, page_size=50) as server:
        yield server
    assert server.open_connections == 0 and not server._thread.is_alive()  # clean shutdown


def raw_get(url: str, **kw):
    return get_session().get(url, timeout=10, **kw)


def test_simulated_listing_pages_newest_first_with_hubsource(sim):
    src = source(sim)
    listed = list(islice(src._listing(), 150))  # 3 pages of 50, through Link: rel="next"
    assert [m.id for m in listed] == [sim.sim.repo_id(i) for i in range(MILLION - 1, MILLION - 151, -1)]
    times = [m.last_modified for m in listed]
    assert times == sorted(times, reverse=True) and len(set(times)) == 150  # strictly newest first
    assert all(m.created_at < m.last_modified and len(m.sha) == 40 for m in listed)
    assert sim.counts["list"] == {"served": 3, "refused": 0}
    # the Hub's shapes: the fields asked for (expand), and a Link carrying the query and a cursor
    page = raw_get(f"{sim.url}/api/models", params={"sort": "lastModified", "direction": "-1",
                                                   "expand": ["sha", "lastModified", "createdAt"]})
    assert page.status_code == 200 and len(page.json()) == 50
    assert {frozenset(item) for item in page.json()} == {frozenset(LISTED)}
    nxt = page.links["next"]["url"]
    assert "cursor=" in nxt and "expand=sha" in nxt and "sort=lastModified" in nxt
    default = raw_get(f"{sim.url}/api/models", params={"limit": 2}).json()
    assert len(default) == 2 and set(default[0]) == {"_id", *hubserver.LISTING_DEFAULT}
    assert default[0]["tags"] == ["simulated", default[0]["id"].split("/")[1].split("-")[0]]
    # records: the listing's siblings and cardData, config.json per repo; lineage from base_model
    sim.reset_counts()
    recs = list(src.list_models(limit=3))
    assert sim.counts["info"]["served"] == 0 and sim.counts["resolve"]["served"] == 3
    assert [r.repo_id for r in recs] == [m.id for m in listed[:3]]
    for r in recs:
        i = sim.sim.index(r.repo_id)
        assert r.status == Status.OK and r.sha == sim.sim.sha(i)
        assert r.base_model == [sim.sim.repo_id(sim.sim.parent(i))] and r.base_model_relation == "finetune"
        assert r.id2label == {str(k): v for k, v in enumerate(sim.sim.labels(i))}
        assert {f.path for f in r.files} == {"README.md", "config.json", "model.safetensors"}


def test_simulated_listing_stops_at_the_watermark(sim):
    newest = [sim.sim.last_modified_ms(i) for i in range(MILLION - 1, MILLION - 121, -1)]
    since = datetime.fromtimestamp(newest[-1] / 1000, timezone.utc)  # the 120th newest: inclusive
    got = list(source(sim).list_models(since=since))
    assert [r.repo_id for r in got] == [sim.sim.repo_id(i) for i in range(MILLION - 1, MILLION - 121, -1)]
    assert sim.counts["list"]["served"] == 3  # page 3 reaches past the watermark: no page 4


def test_new_repos_go_on_top_and_a_nightly_finds_only_them(sim):
    src = source(sim)
    first = raw_get(f"{sim.url}/api/models", params={"sort": "lastModified", "direction": "-1"})
    watermark = max(r.last_modified for r in islice(src._listing(), 1))  # the newest before the nightly
    added = sim.add_new(30)
    assert added == range(MILLION, MILLION + 30) and sim.sim.total == MILLION + 30
    # a listing already under way goes on where it was: new repos do not shift its pages
    cont = raw_get(first.links["next"]["url"]).json()
    assert cont[0]["id"] == sim.sim.repo_id(MILLION - 51)
    got = list(src.list_models(since=watermark))  # `since` is inclusive: the old newest comes again
    ids = [r.repo_id for r in got]
    assert ids == [sim.sim.repo_id(i) for i in range(MILLION + 29, MILLION - 2, -1)]
    assert all(r.last_modified > watermark for r in got[:30])
    assert all(sim.sim.index(r.base_model[0]) < MILLION for r in got[:30])  # they join existing trees


def test_deep_repo_has_a_card_and_a_readable_safetensors_file(sim):
    i = 765_432
    repo_id = sim.sim.repo_id(i)
    src = source(sim)
    rec = src.model_info(repo_id)
    assert rec.status == Status.OK and rec.sha == sim.sim.sha(i)
    assert rec.base_model == [sim.sim.repo_id(sim.sim.parent(i))]
    opener = src.opener(repo_id, rec.sha)
    readme = src.http.request("GET", opener.url("README.md")).content
    card, problem = parse.card_from_bytes(readme)
    info = raw_get(f"{sim.url}/api/models/{repo_id}/revision/{rec.sha}", params={"blobs": "true"}).json()
    assert problem is None and card.to_dict() == info["cardData"] == sim.sim.card(i)
    assert {s["rfilename"]: s["size"] for s in info["siblings"]} == {f.path: f.size for f in rec.files}
    header = read_header(opener.open("model.safetensors"))
    assert header.tensors["encoder.layer.0.attention.self.query.weight"].shape == (8, 8)
    assert header.tensors["classifier.weight"].shape == (len(sim.sim.labels(i)), 8)
    names = ["encoder.layer.0.attention.self.query.weight", "classifier.weight"]
    read = read_repo_tensors(opener.open, names, [f.path for f in rec.files])  # ranged reads, as the crawler
    expected = sim.sim.tensors(i)
    for name in names:
        np.testing.assert_array_equal(read.tensors[name], expected[name])
    whole = src.http.request("GET", opener.url("model.safetensors")).content
    assert set(load_safetensors(whole)) == set(expected)  # the reference reader agrees
    # deterministic from the seed: another server, same seed, same bytes; another seed differs
    with HubServer(repos=MILLION, seed=7) as again, HubServer(repos=MILLION, seed=8) as other:
        assert raw_get(f"{again.url}/{repo_id}/resolve/main/model.safetensors").content == whole
        assert other.sim.repo_id(i) != repo_id or other.sim.sha(i) != rec.sha
    # a repo the hub does not list is a 404, as on the Hub
    assert src.model_info(repo_id.rsplit("-", 1)[0] + f"-{i + 1}").status == Status.NOT_FOUND
    assert src.model_info(f"{repo_id.rsplit('-', 1)[0]}-{MILLION + 5}").status == Status.NOT_FOUND


def test_simulated_repos_form_trees_of_the_configured_size():
    with HubServer(repos=60, tree_size=6, seed=3) as hub:
        recs = {r.repo_id: r for r in source(hub).list_models()}
    assert len(recs) == 60 and all(r.status == Status.OK for r in recs.values())

    def root(repo_id: str) -> str:
        seen = []
        while recs[repo_id].base_model:
            seen.append(repo_id)
            repo_id = recs[repo_id].base_model[0]
            assert repo_id not in seen  # parents are always older: no cycles
        return repo_id

    trees: dict[str, int] = {}
    for repo_id in recs:
        trees[root(repo_id)] = trees.get(root(repo_id), 0) + 1
    assert sorted(trees.values()) == [6] * 10
    undeclared = hubserver.SimulatedHub(60, tree_size=6, seed=3, no_lineage=1.0)
    assert all(undeclared.parent(i) is None and "base_model" not in undeclared.card(i) for i in range(60))
    for r in recs.values():  # a parent is older than its child: lineage points back in time
        if r.base_model:
            assert recs[r.base_model[0]].last_modified < r.last_modified


def test_rate_limit_answers_429_and_the_client_waits_the_advised_reset():
    clock = FakeClock()
    policy = RetryPolicy(max_retries=3, base_wait_s=0.05, max_wait_s=60, jitter=0)
    with HubServer(repos=MILLION, page_size=10, rate_limit={"api": 3}, window_s=10, clock=clock) as hub:
        http = HttpClient(connect_timeout_s=5, read_timeout_s=10, retry=policy, sleep=clock.sleep)
        src = HubSource(endpoint=hub.url, token=False, http=http, file_sizes=True)
        got = list(src.list_models(limit=3))  # 1 page + 3 infos: the 3rd info is over the budget of 3
        assert [r.repo_id for r in got] == [hub.sim.repo_id(i) for i in (MILLION - 1, MILLION - 2, MILLION - 3)]
        assert clock.waits == [10.0]  # RateLimit reset (r=0;t=10) of a fresh 10 s window
        assert hub.counts["list"] == {"served": 1, "refused": 0}
        assert hub.counts["info"] == {"served": 3, "refused": 1}
        assert hub.counts["resolve"] == {"served": 3, "refused": 0}  # resolvers: no limit set
        # the headers, read raw: every answer of a limited bucket, and the refusal
        clock.now += 4  # 4 s into the second window, which has 2 of 3 left
        ok = raw_get(f"{hub.url}/api/models/{got[0].repo_id}")
        assert ok.status_code == 200 and ok.headers["RateLimit"] == '"api";r=1;t=6'
        assert ok.headers["RateLimit-Policy"] == '"fixed window";"api";q=3;w=10'
        assert raw_get(f"{hub.url}/api/models").status_code == 200
        refused = raw_get(f"{hub.url}/api/models")
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "6"
        assert refused.headers["RateLimit"] == '"api";r=0;t=6'
        assert refused.headers["RateLimit-Policy"] == '"fixed window";"api";q=3;w=10'
        assert "RateLimit" not in raw_get(f"{hub.url}/{got[0].repo_id}/resolve/main/config.json").headers
        assert hub.counts["list"] == {"served": 2, "refused": 1} and hub.counts["info"]["served"] == 4


def test_rate_limit_on_ranged_reads_and_per_client_budgets():
    clock = FakeClock()
    policy = RetryPolicy(max_retries=3, base_wait_s=0.05, max_wait_s=60, jitter=0)
    with HubServer(repos=MILLION, rate_limit={"resolvers": 2}, window_s=30, rate_scope="client",
                   clock=clock) as hub:
        http = HttpClient(connect_timeout_s=5, read_timeout_s=10, retry=policy, sleep=clock.sleep)
        repo_id = hub.sim.repo_id(123)
        for token in ("hf_worker_a", "hf_worker_b"):  # each client has its own budget
            src = HubSource(endpoint=hub.url, token=token, http=http)
            header = read_header(src.opener(repo_id, hub.sim.sha(123)).open("model.safetensors"))
            assert "classifier.weight" in header.tensors
        assert clock.waits == []  # a header read is 2 ranged GETs: within each client's 2
        src = HubSource(endpoint=hub.url, token="hf_worker_a", http=http)
        src.opener(repo_id, hub.sim.sha(123)).open("config.json").read(0, 4)
        assert clock.waits == [30.0] and hub.counts["resolve"] == {"served": 5, "refused": 1}
    with HubServer(repos=MILLION, rate_limit={"resolvers": 2}, window_s=30, clock=clock) as hub:  # global
        url = f"{hub.url}/{hub.sim.repo_id(5)}/resolve/main/config.json"
        statuses = [raw_get(url, headers={"Authorization": f"Bearer hf_{k}"}).status_code for k in "abc"]
        assert statuses == [200, 200, 429] and hub.counts["resolve"] == {"served": 2, "refused": 1}


def test_rate_limit_with_a_real_short_window():
    """Real time: every 429 is followed by a wait of the advised reset, then a success."""
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    policy = RetryPolicy(max_retries=4, base_wait_s=0.05, max_wait_s=5, jitter=0)
    with HubServer(repos=MILLION, page_size=5, rate_limit={"api": 1, "resolvers": 1}, window_s=1) as hub:
        http = HttpClient(connect_timeout_s=5, read_timeout_s=10, retry=policy, sleep=sleep)
        got = list(HubSource(endpoint=hub.url, token=False, http=http).list_models(limit=2))
        assert [r.status for r in got] == [Status.OK, Status.OK]
        served = sum(c["served"] for c in hub.counts.values())  # 1 page, 2 configs
        refused = sum(c["refused"] for c in hub.counts.values())
        assert served == 3 and refused == len(waits) > 0 and all(w == 1.0 for w in waits)


def test_counts_stats_and_new_repos_through_the_control_endpoints(sim):
    list(source(sim).list_models(limit=2))
    with urllib.request.urlopen(f"{sim.url}/_sim/stats", timeout=10) as resp:
        stats = json.load(resp)
    assert stats["counts"] == sim.counts == {
        "list": {"served": 1, "refused": 0}, "info": {"served": 0, "refused": 0},
        "resolve": {"served": 2, "refused": 0}, "other": {"served": 0, "refused": 0}}
    assert (stats["repos"], stats["new"], stats["total"], stats["trees"]) == (MILLION, 0, MILLION, MILLION // 10)
    req = urllib.request.Request(f"{sim.url}/_sim/new?count=1000", method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        added = json.load(resp)
    assert added["added"] == [MILLION, MILLION + 1000] and sim.sim.total == MILLION + 1000
    assert raw_get(f"{sim.url}/api/models", params={"limit": 1}).json()[0]["id"] == sim.sim.repo_id(MILLION + 999)
    with urllib.request.urlopen(urllib.request.Request(f"{sim.url}/_sim/reset", method="POST"), timeout=10):
        pass
    assert all(c == {"served": 0, "refused": 0} for c in sim.counts.values())  # control calls are not counted
    assert raw_get(f"{sim.url}/api/models", params={"search": "x"}).status_code == 400


def test_a_page_costs_a_page_anywhere_and_the_server_keeps_no_per_repo_state():
    with HubServer(repos=MILLION, page_size=1000) as hub:
        def fetch(after: int | None) -> list[dict]:
            params = {"sort": "lastModified", "direction": "-1", "expand": ["sha", "lastModified", "createdAt"]}
            if after is not None:
                params["cursor"] = hub.sim.cursor(after)
            resp = raw_get(f"{hub.url}/api/models", params=params)
            assert resp.status_code == 200
            return resp.json()

        deep = fetch(1500)  # far into the cursor space: the page below index 1500
        assert [m["id"] for m in deep] == [hub.sim.repo_id(i) for i in range(1499, 499, -1)]
        assert [m["id"] for m in fetch(500)] == [hub.sim.repo_id(i) for i in range(499, -1, -1)]  # the last
        raw = raw_get(f"{hub.url}/api/models", params={"cursor": hub.sim.cursor(500)})
        assert "Link" not in raw.headers  # the oldest repo ends the listing
        fetch(None)
        raw_get(f"{hub.url}/{hub.sim.repo_id(42)}/resolve/main/model.safetensors")  # warm every route
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            for k in range(20):  # 20,000 repos listed, from the top to the bottom of the index space
                fetch(None if k == 0 else MILLION - k * 49_999)
                raw_get(f"{hub.url}/api/models/{hub.sim.repo_id(k * 49_999)}", params={"blobs": "true"})
                raw_get(f"{hub.url}/{hub.sim.repo_id(k * 49_999)}/resolve/main/model.safetensors",
                        headers={"Range": "bytes=0-7"})
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        mine = [tracemalloc.Filter(True, hubserver.__file__)]
        grown = sum(d.size_diff for d in after.filter_traces(mine).compare_to(before.filter_traces(mine), "filename"))
        assert grown < 16 * 1024  # one object per listed repo kept would be > 20,000 objects
        assert hub.traffic.hits == [] and not hub.traffic.body_bytes  # no per-request log either
        assert sum(c["served"] for c in hub.counts.values()) == 65


def test_standalone_process_serves_several_clients():
    script = Path(hubserver.__file__)
    proc = subprocess.Popen([sys.executable, str(script), "--repos", str(MILLION), "--new", "10", "--port", "0",
                             "--rate-limit", "api=1000,resolvers=5000", "--page-size", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "the server printed nothing within 60 s"
        info = json.loads(proc.stdout.readline())
        assert info["total"] == MILLION + 10 and info["rate_limit"] == {"api": 1000, "resolvers": 5000}
        url = info["url"]
        ids = [[m.id for m in islice(HubSource(endpoint=url, token=t, http=client())._listing(), 25)]
               for t in ("hf_a", "hf_b")]
        assert ids[0] == ids[1] and len(ids[0]) == 25 and ids[0][0].endswith(f"-{MILLION + 9}")
        with urllib.request.urlopen(f"{url}/_sim/stats", timeout=10) as resp:
            assert json.load(resp)["counts"]["list"] == {"served": 4, "refused": 0}  # 2 clients x 2 pages
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            proc.stdout.close()
            proc.stderr.close()
    assert proc.returncode == 0


def test_lake_and_simulated_arguments_are_checked(lake):
    with pytest.raises(ValueError, match="not both or neither"):
        HubServer()
    with pytest.raises(ValueError, match="not both or neither"):
        HubServer(lake, repos=10)
    with pytest.raises(ValueError, match="rate_scope"):
        HubServer(repos=10, rate_limit={"api": 1}, rate_scope="per-ip")
    with pytest.raises(ValueError, match=r"\['pages'\], a bucket no route draws from"):
        HubServer(repos=10, rate_limit={"pages": 100})  # the Hub's "pages" are its web pages
    clock = FakeClock()
    with HubServer(repos=10, rate_limit={"pages": 1}, clock=clock,
                   buckets={"list": "pages", "info": "api", "resolve": "resolvers"}) as hub:
        assert [raw_get(f"{hub.url}/api/models").status_code for _ in range(2)] == [200, 429]
        assert raw_get(f"{hub.url}/api/models/{hub.sim.repo_id(1)}").status_code == 200
    assert hubserver.parse_limits("free") == hubserver.FREE_TOKEN
    assert hubserver.parse_limits("api=7, resolvers=9") == {"api": 7, "resolvers": 9}
    with pytest.raises(ValueError, match="BUCKET=N"):
        hubserver.parse_limits("api")


def test_a_lake_hub_can_be_rate_limited_too(lake):
    clock = FakeClock()
    policy = RetryPolicy(max_retries=3, base_wait_s=0.05, max_wait_s=60, jitter=0)
    with HubServer(lake, page_size=4, rate_limit={"api": 2}, window_s=5, clock=clock) as hub:
        http = HttpClient(connect_timeout_s=5, read_timeout_s=10, retry=policy, sleep=clock.sleep)
        got = list(HubSource(endpoint=hub.url, token=False, http=http, file_sizes=True).list_models(limit=3))
    assert got == list(LocalSource(lake).list_models(limit=3))  # 1 page + 2 infos: one over the 2
    assert clock.waits == [5.0] and hub.counts["info"]["refused"] == 1
