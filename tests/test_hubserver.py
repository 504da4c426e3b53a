"""HubSource through the real huggingface_hub client against the Hub-compatible test server."""

from __future__ import annotations

import time

import pytest
from hubserver import HubServer
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import RevisionNotFoundError
from huggingface_hub.utils import get_session
from minilake import build_lake

from storage.http import HttpClient
from storage.sources import HubSource, LocalSource, RateLimited, RetryPolicy, SourceError, Status

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


def source(hub, token=None, sleep=time.sleep) -> HubSource:
    return HubSource(endpoint=hub.url, token=token, http=client(sleep))


def test_records_identical_to_local_source_across_pages(hub, lake):
    remote = list(source(hub).list_models())
    local = list(LocalSource(lake).list_models())
    assert len(local) == 15
    assert remote == local  # every field, every status and reason, same order
    lists = hub.traffic.of("list")
    assert len(lists) == 4 and all(h.status == 200 for h in lists)  # 15 models, 4 a page: Link followed
    assert {r.status for r in remote} >= {Status.OK, Status.BAD_CARD, Status.NO_CONFIG, Status.BAD_REPO_ID}
    # Unparseable front matter is not in the API's cardData, so HubSource reads README.md itself,
    # except when its listed size is over the limit: then it is refused unread, as on disk.
    cards = [h.path for h in hub.traffic.of("resolve") if h.path.endswith("/README.md")]
    fetched = {path.split("/resolve/")[0].lstrip("/") for path in cards}
    assert {"org/bad-yaml", "org/alias"} <= fetched and "org/huge-card" not in fetched
    assert hub.traffic.body_bytes.get(f"/org/huge-card/resolve/{local[2].sha}/README.md", 0) == 0


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


def test_model_info_429_honours_retry_after(hub, lake):
    hub.faults.route, hub.faults.rate_limited, hub.faults.retry_after = "info", 2, "1"
    waits: list[float] = []
    got = list(source(hub, sleep=waits.append).list_models(limit=2))  # the newest has a bad id: no info
    assert got == list(LocalSource(lake).list_models(limit=2))
    assert [h.status for h in hub.traffic.of("info")] == [429, 429, 200]
    assert waits == [1.0, 1.0]


def test_ratelimit_header_reset_is_honoured(hub):
    hub.faults.route, hub.faults.rate_limited = "info", 1
    hub.faults.retry_after, hub.faults.ratelimit_reset = None, 1  # `RateLimit: "api";r=0;t=1`
    waits: list[float] = []
    list(source(hub, sleep=waits.append).list_models(limit=2))
    assert waits == [1.0]


def test_server_errors_back_off_exponentially(hub, lake):
    hub.faults.route, hub.faults.server_errors = "resolve", 2  # the config.json GET of org/nested
    waits: list[float] = []
    got = list(source(hub, sleep=waits.append).list_models(limit=2))
    assert got == list(LocalSource(lake).list_models(limit=2))
    assert waits == [0.05, 0.1]
    assert [h.status for h in hub.traffic.of("resolve")] == [503, 503, 200]


def test_retries_are_bounded(hub):
    hub.faults.route, hub.faults.rate_limited, hub.faults.retry_after = "info", 100, None
    waits: list[float] = []
    with pytest.raises(RateLimited, match="after 3 retries"):
        list(source(hub, sleep=waits.append).list_models(since=None, limit=3))
    assert len(hub.traffic.of("info")) == 4 and waits == [0.05, 0.1, 0.2]


def test_too_long_retry_after_stops_instead_of_sleeping(hub):
    hub.faults.route, hub.faults.rate_limited, hub.faults.retry_after = "info", 1, "3600"
    waits: list[float] = []
    with pytest.raises(RateLimited, match="wait 3600 s"):
        list(source(hub, sleep=waits.append).list_models(limit=3))
    assert waits == [] and len(hub.traffic.of("info")) == 1


def test_404_marks_the_repo_not_the_run(hub, lake):
    hub.faults.not_found = {"org/child-ft"}
    recs = {r.repo_id: r for r in source(hub).list_models()}
    assert len(recs) == 15
    gone = recs["org/child-ft"]
    assert gone.status == Status.NOT_FOUND and "404" in gone.reason and gone.sha and gone.files == []
    local = {r.repo_id: r for r in LocalSource(lake).list_models()}
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
    reader = pytest.importorskip("storage.safetensors_reader")
    src = source(hub)
    rec = next(r for r in src.list_models() if r.repo_id == "org/child-lora")
    header = reader.read_header(src.opener(rec.repo_id, rec.sha).open("adapter_model.safetensors"))
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
    hub.faults.route, hub.faults.server_errors, hub.faults.server_error_status = "info", 1, 403
    with pytest.raises(SourceError, match="HTTP 403 for 'org/nested'.*HF_TOKEN"):
        list(source(hub).list_models())


def test_model_info_rereads_one_repo_like_the_listing(hub, lake):
    import pickle

    src = source(hub)
    listed = {r.repo_id: r for r in src.list_models()}
    assert src.model_info("org/child-ft", listed["org/child-ft"].sha) == listed["org/child-ft"]
    assert src.model_info("org/child-ft") == listed["org/child-ft"]  # no sha: the current one
    hub.faults.not_found = {"org/child-ft"}
    assert src.model_info("org/child-ft").status == Status.NOT_FOUND
    opener = pickle.loads(pickle.dumps(src.opener("org/child-lora", listed["org/child-lora"].sha)))
    assert opener.http == src.http and "token" not in repr(opener)
    assert opener.open("adapter_model.safetensors").size() == (lake / "org/child-lora/adapter_model.safetensors").stat().st_size
