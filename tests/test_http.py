"""The one HTTP layer: timeouts on every request, one retry policy, one-line errors."""

from __future__ import annotations

import time
from email.utils import formatdate

import httpx2
import pytest
from minilake import build_lake
from silent_server import silent_server

from storage.http import HttpClient, HttpError, HttpTimeout, RateLimited, RetryPolicy, server_wait
from storage.safetensors_reader import HttpFile
from storage.sources import HubSource, SourceError

QUICK = HttpClient(connect_timeout_s=0.5, read_timeout_s=0.5, retry=RetryPolicy(max_retries=1, base_wait_s=0.01))


@pytest.fixture
def silent():
    """A loopback server that accepts connections and never answers: a hung server or proxy."""
    with silent_server() as (host, port):
        yield f"http://{host}:{port}"


def one_line(err: BaseException, *words: str) -> None:
    text = str(err)
    assert "\n" not in text and isinstance(err, SourceError), text
    for w in words:
        assert w in text, text


def test_ranged_read_from_a_silent_server_times_out(silent):
    start = time.monotonic()
    with pytest.raises(HttpTimeout) as info:
        HttpFile(f"{silent}/org/m/resolve/abc/model.safetensors", token=False, http=QUICK).read(0, 8)
    assert time.monotonic() - start < 20
    one_line(info.value, f"GET {silent}/org/m/resolve/abc/model.safetensors", "did not answer within 0.5 s",
             "2 tries", "PROBEX_HTTP_READ_TIMEOUT")


def test_hub_listing_from_a_silent_server_times_out(silent):
    start = time.monotonic()
    with pytest.raises(HttpTimeout) as info:
        next(HubSource(endpoint=silent, token=False, http=QUICK).list_models())
    assert time.monotonic() - start < 20
    one_line(info.value, f"GET {silent}/api/models did not answer within 0.5 s")


def test_hub_model_info_from_a_silent_server_times_out(silent):
    start = time.monotonic()
    with pytest.raises(HttpTimeout) as info:
        HubSource(endpoint=silent, token=False, http=QUICK).model_info("org/m", "abc")
    assert time.monotonic() - start < 20
    one_line(info.value, f"{silent}/api/models/org/m/revision/abc", "did not answer within 0.5 s")


# --- the retry policy --------------------------------------------------------------------------


def response(status: int, **headers: str) -> httpx2.Response:
    return httpx2.Response(status, headers=headers)


def test_server_hints():
    assert server_wait(response(503, **{"Retry-After": "7"})) == 7.0
    assert server_wait(response(429, **{"Retry-After": "2.5"})) == 2.5
    now = 1_800_000_000.0
    date = formatdate(now + 30, usegmt=True)
    assert server_wait(response(503, **{"Retry-After": date}), now=lambda: now) == pytest.approx(30, abs=1)
    assert server_wait(response(503, **{"Retry-After": formatdate(now - 60, usegmt=True)}), now=lambda: now) == 0
    spent = {"RateLimit": '"api";r=0;t=42', "RateLimit-Policy": '"fixed window";"api";q=500;w=300'}
    assert server_wait(response(429, **spent)) == 42.0
    left = {"RateLimit": '"api";r=7;t=42', "RateLimit-Policy": '"fixed window";"api";q=500;w=300'}
    assert server_wait(response(429, **left)) is None  # quota not spent: no hint
    assert server_wait(response(503)) is None and server_wait(response(503, **{"Retry-After": "soon"})) is None


def test_backoff_doubles_up_to_the_cap_with_jitter():
    exact = RetryPolicy(base_wait_s=1, max_wait_s=8, jitter=0)
    assert [exact.backoff(k) for k in range(6)] == [1, 2, 4, 8, 8, 8]
    jittered = RetryPolicy(base_wait_s=1, max_wait_s=100, jitter=0.5)
    draws = [jittered.backoff(3) for _ in range(300)]
    assert all(4 <= d <= 8 for d in draws) and len(set(draws)) > 100  # spread, never past the cap
    assert all(50 <= jittered.backoff(10) <= 100 for _ in range(50))  # capped first, then jittered


def scripted(*answers: httpx2.Response):
    """A session whose requests get `answers` in turn; `sent` counts them."""
    queue = list(answers)
    sent = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        sent.append(request)
        return queue.pop(0)

    return httpx2.Client(transport=httpx2.MockTransport(handler)), sent


def client(waits: list[float], **retry) -> HttpClient:
    return HttpClient(connect_timeout_s=1, read_timeout_s=1, retry=RetryPolicy(**retry), sleep=waits.append)


def test_retry_after_seconds_and_http_date_are_waited():
    waits: list[float] = []
    date = formatdate(time.time() + 20, usegmt=True)
    session, sent = scripted(response(429, **{"Retry-After": "3"}), response(503, **{"Retry-After": date}),
                             httpx2.Response(200, content=b"ok"))
    got = client(waits).request("GET", "http://hub.test/x", token=False, session=session)
    assert got.content == b"ok" and len(sent) == 3
    assert waits[0] == 3.0 and 18 <= waits[1] <= 20


def test_no_hint_backs_off_with_jitter_and_retries_are_bounded():
    waits: list[float] = []
    session, sent = scripted(*[response(502) for _ in range(4)])
    with pytest.raises(HttpError, match=r"GET http://hub.test/x still answers HTTP 502 after 3 retries") as info:
        client(waits, max_retries=3, base_wait_s=1, jitter=0.5).request("GET", "http://hub.test/x?cursor=s3cret",
                                                                       token=False, session=session)
    assert len(sent) == 4 and "s3cret" not in str(info.value)  # the query stays out of messages
    assert [lo <= w <= hi for w, (lo, hi) in zip(waits, [(0.5, 1), (1, 2), (2, 4)])] == [True] * 3


def test_an_hour_long_retry_after_is_refused_not_slept():
    waits: list[float] = []
    session, sent = scripted(response(429, **{"Retry-After": "3600"}))
    with pytest.raises(RateLimited, match="wait 3600 s, over the 60 s limit") as info:
        client(waits, max_wait_s=60).request("GET", "http://hub.test/x", token=False, session=session)
    assert waits == [] and len(sent) == 1
    one_line(info.value, "PROBEX_HTTP_MAX_WAIT")


def test_not_retryable_statuses_raise_huggingface_hub_errors():
    from huggingface_hub.errors import HfHubHTTPError

    waits: list[float] = []
    session, sent = scripted(httpx2.Response(401, json={"error": "bad token"}))
    with pytest.raises(HfHubHTTPError):
        client(waits).request("GET", "http://hub.test/x", token=False, session=session)
    assert waits == [] and len(sent) == 1


def test_settings_reach_the_client(monkeypatch):
    monkeypatch.setenv("PROBEX_HTTP_READ_TIMEOUT", "2.5")
    monkeypatch.setenv("PROBEX_HTTP_MAX_RETRIES", "0")
    http = HttpClient.from_settings()
    assert http.read_timeout_s == 2.5 and http.retry.max_retries == 0
    assert HubSource(endpoint="http://hub.test").opener("org/m", "abc").open("x").http == http


# --- a crawl whose weights reads stall -----------------------------------------------------------


def test_crawl_with_stalled_safetensors_reads_ends_with_a_clear_error(tmp_path, monkeypatch):
    from hubserver import HubServer
    from typer.testing import CliRunner

    from probex.cli import app
    from storage.catalog import Catalog

    lake = build_lake(tmp_path / "lake")
    # 2 s: short for a stall, long enough that the listing's 8 readers never time out on 2 busy cores
    for key, value in {"PROBEX_HTTP_READ_TIMEOUT": "2", "PROBEX_HTTP_CONNECT_TIMEOUT": "2",
                       "PROBEX_HTTP_MAX_RETRIES": "1"}.items():
        monkeypatch.setenv(key, value)
    home = tmp_path / "home"
    with HubServer(lake, page_size=4) as hub:
        hub.faults.stall_suffix = ".safetensors"
        start = time.monotonic()
        result = CliRunner().invoke(app, ["crawl", "--source", f"hub:{hub.url}", "--home", str(home)])
        assert time.monotonic() - start < 60
        configs = [h for h in hub.traffic.of("resolve") if h.path.endswith("/config.json")]
        assert configs and {h.status for h in configs} == {206}  # the listing and the configs were served
        assert hub.traffic.of("stalled")
    text = result.output.strip()
    assert result.exit_code == 1 and "Traceback" not in text, text
    error = text[text.index("error:"):]  # after the retry warnings the log printed
    assert "did not answer within 2 s" in error and ".safetensors" in error and len(error.splitlines()) <= 3
    assert Catalog(str(home / "catalog")).watermark(f"hub:{hub.url}") is None
