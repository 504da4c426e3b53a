"""A small Hub-compatible HTTP server over a lake folder, for tests and the crawl benchmark.

Serves what huggingface_hub 2.4 calls, in the Hub's documented JSON shapes:
- `GET /api/models`: search, author, sort (+ direction, default -1), limit, expand / full /
  cardData / config; `Link: <...>; rel="next"` pagination with an opaque keyset cursor
- `GET /api/models/{repo_id}` and `/api/models/{repo_id}/revision/{rev}`: model info; `blobs=1`
  (files_metadata=True) adds sibling sizes; `expand` narrows the fields
- `HEAD`/`GET /{repo_id}/resolve/{rev}/{filename}`: with HTTP Range (206 + Content-Range) and the
  headers `hf_hub_download` requires (X-Repo-Commit, ETag; Content-Length, Accept-Ranges)
Errors carry `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound) as the Hub does, so
huggingface_hub raises its typed errors.

sha, lastModified, createdAt and file sizes come from `LocalSource`'s own computation, so the
server and `LocalSource` describe the same lake identically. A folder has no history: only its
current sha (or "main") resolves.

`traffic` counts requests and body bytes per path; `faults` injects 429s (with Retry-After or
RateLimit headers), 5xx, per-repo 404s, and stalls (a request read but never answered).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from storage.sources import parse
from storage.sources.local import LocalSource, RepoSnapshot, read_card

LISTING_DEFAULT = ["id", "likes", "downloads", "tags", "pipeline_tag", "library_name", "createdAt", "private"]
FULL_EXTRA = ["sha", "lastModified", "siblings", "author", "gated", "disabled"]
INFO_DEFAULT = LISTING_DEFAULT + FULL_EXTRA + ["cardData", "config", "spaces", "usedStorage"]


def iso(moment: datetime) -> str:
    """The Hub's timestamp format: UTC, milliseconds, 'Z'."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass
class Faults:
    """Failures to inject. Counters go down as responses are sent."""

    rate_limited: int = 0  # how many next matching requests get 429
    retry_after: str | None = "1"  # Retry-After value sent with each 429 (None: no header)
    ratelimit_reset: int | None = None  # also send `RateLimit: "api";r=0;t=<reset>` with 429s
    server_errors: int = 0  # how many next matching requests get `server_error_status`
    server_error_status: int = 503
    route: str = "any"  # which requests the counters apply to: "list", "info", "resolve", "any"
    not_found: set[str] = field(default_factory=set)  # repos whose info/files answer 404 (still listed)
    stall_suffix: str | None = None  # requests whose path ends with this are never answered


@dataclass
class Hit:
    method: str
    path: str
    status: int
    at: float  # time.monotonic()
    route: str
    authorization: str | None = None


@dataclass
class Traffic:
    hits: list[Hit] = field(default_factory=list)
    body_bytes: Counter = field(default_factory=Counter)  # path -> bytes of bodies sent

    @property
    def total_bytes(self) -> int:
        return sum(self.body_bytes.values())

    def of(self, route: str) -> list[Hit]:
        return [h for h in self.hits if h.route == route]


class HubServer:
    """`with HubServer(lake) as hub: HubSource(endpoint=hub.url)`; port 0 picks a free port."""

    def __init__(self, lake: str | Path, *, page_size: int = 100, host: str = "127.0.0.1", port: int = 0):
        self.source = LocalSource(lake)
        self.page_size = page_size
        self.faults = Faults()
        self.traffic = Traffic()
        self._lock = threading.Lock()
        self.stopping = threading.Event()  # releases stalled handlers at stop
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hubserver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- bookkeeping used by the handler ---------------------------------------------------
    def take_fault(self, route: str) -> tuple[int, dict[str, str]] | None:
        """The injected failure for this request, if any (status, headers)."""
        with self._lock:
            f = self.faults
            if f.route not in ("any", route):
                return None
            if f.rate_limited > 0:
                f.rate_limited -= 1
                headers = {"Retry-After": f.retry_after} if f.retry_after is not None else {}
                if f.ratelimit_reset is not None:
                    headers["RateLimit"] = f'"api";r=0;t={f.ratelimit_reset}'
                    headers["RateLimit-Policy"] = '"fixed window";"api";q=500;w=300'
                return 429, headers
            if f.server_errors > 0:
                f.server_errors -= 1
                return f.server_error_status, {}
        return None

    def record(self, hit: Hit, body_bytes: int) -> None:
        with self._lock:
            self.traffic.hits.append(hit)
            self.traffic.body_bytes[hit.path] += body_bytes

    # -- JSON shapes -----------------------------------------------------------------------
    def model_json(self, snap: RepoSnapshot, fields: list[str], blobs: bool) -> dict:
        out: dict = {"_id": snap.sha[:24], "id": snap.repo_id}
        card = None
        if {"cardData", "tags", "pipeline_tag", "library_name"} & set(fields):
            data, problem = read_card(snap)
            # The Hub drops front matter it cannot parse; clients then see no cardData.
            card = None if problem else data.to_dict()
        for key in fields:
            if key == "sha":
                out["sha"] = snap.sha
            elif key == "lastModified":
                out["lastModified"] = iso(snap.last_modified)
            elif key == "createdAt":
                out["createdAt"] = iso(snap.created_at)
            elif key == "author":
                out["author"] = snap.repo_id.split("/")[0]
            elif key in ("likes", "downloads"):
                out[key] = 0
            elif key in ("private", "gated", "disabled"):
                out[key] = False
            elif key == "spaces":
                out["spaces"] = []
            elif key == "usedStorage":
                out["usedStorage"] = sum(f.size for f in snap.files)
            elif key == "tags":  # the Hub adds derived tags; the card's own are enough here
                out["tags"] = parse.str_list((card or {}).get("tags"))
            elif key in ("pipeline_tag", "library_name"):
                value = (card or {}).get(key)
                if isinstance(value, str):
                    out[key] = value
            elif key == "cardData" and card:
                out["cardData"] = card
            elif key == "config":
                config = self._config(snap)
                if config is not None:
                    out["config"] = config
            elif key == "siblings":
                out["siblings"] = [
                    {"rfilename": f.path, **({"size": f.size, "blobId": _blob_id(snap, f.path)} if blobs else {})}
                    for f in snap.files
                ]
        return out

    @staticmethod
    def _config(snap: RepoSnapshot) -> dict | None:
        f = snap.file(parse.CONFIG_FILE)
        if f is None or f.size > parse.MAX_CONFIG_BYTES:
            return None
        try:
            config = json.loads((snap.folder / f.path).read_bytes())
        except ValueError:
            return None
        return config if isinstance(config, dict) else None


def _blob_id(snap: RepoSnapshot, path: str) -> str:
    # A stable stand-in for the git blob id: changes whenever the file does.
    f = snap.file(path)
    return hashlib.sha1(f"{snap.repo_id}\0{path}\0{f.size}\0{f.mtime_ns}".encode()).hexdigest()


def _cursor(key: tuple) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode()


def _uncursor(token: str) -> tuple:
    return tuple(json.loads(base64.urlsafe_b64decode(token.encode())))


def _sort_key(sort: str | None):
    if sort in ("lastModified", "last_modified"):
        return lambda s: (s.last_modified.timestamp(), s.repo_id)
    if sort in ("createdAt", "created_at"):
        return lambda s: (s.created_at.timestamp(), s.repo_id)
    return lambda s: (0, s.repo_id)  # downloads, likes, trending: all 0 here; id breaks ties


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's pooled client expects
    server_version = "probex-hubserver/1"
    # Headers and body in one segment, no Nagle: otherwise each keep-alive request waits ~40 ms
    # for a delayed ACK. handle_one_request() flushes the buffer after every response.
    disable_nagle_algorithm = True
    wbufsize = 1 << 16

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, *args) -> None:  # quiet: tests read `traffic` instead
        pass

    # -- plumbing --------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              route: str = "other", content_type: str = "application/json") -> None:
        """Send a response; a HEAD passes the GET's Content-Length in `headers` and no body."""
        headers = {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        sent = 0
        if self.command != "HEAD" and body:
            self.wfile.write(body)
            sent = len(body)
        hit = Hit(self.command, urlsplit(self.path).path, status, time.monotonic(), route,
                  self.headers.get("Authorization"))
        self.hub.record(hit, sent)

    def _json(self, status: int, obj, headers: dict[str, str] | None = None, route: str = "other") -> None:
        self._send(status, json.dumps(obj, default=str).encode(), headers, route)

    def _error(self, status: int, code: str | None, message: str, route: str, extra: dict | None = None) -> None:
        headers = {"X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers, route)

    def _fault(self, route: str) -> bool:
        fault = self.hub.take_fault(route)
        if fault is None:
            return False
        status, headers = fault
        self._error(status, None, "injected fault", route, headers)
        return True

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if (suffix := self.hub.faults.stall_suffix) and url.path.endswith(suffix):
            self.hub.record(Hit(self.command, url.path, 0, time.monotonic(), "stalled"), 0)
            self.hub.stopping.wait()  # read, never answered: what a hung server or proxy does
            self.close_connection = True
            return
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = parse_qs(url.query)
        if parts[:2] == ["api", "models"] and len(parts) == 2:
            self._list(query)
        elif parts[:2] == ["api", "models"] and len(parts) > 2:
            self._info(parts[2:], query)
        elif "resolve" in parts[1:3]:
            i = parts.index("resolve", 1)
            self._resolve("/".join(parts[:i]), parts[i + 1] if len(parts) > i + 1 else "", "/".join(parts[i + 2 :]))
        else:
            self._error(404, None, f"no route for {url.path}", "other")

    # -- routes ----------------------------------------------------------------------------
    def _list(self, query: dict[str, list[str]]) -> None:
        if self._fault("list"):
            return
        one = lambda k: (query.get(k) or [None])[0]  # noqa: E731
        snaps = self.hub.source.snapshots()
        if search := one("search"):
            snaps = [s for s in snaps if search.lower() in s.repo_id.lower()]
        if author := one("author"):
            snaps = [s for s in snaps if s.repo_id.split("/")[0] == author]
        key = _sort_key(one("sort"))
        descending = one("sort") is not None and one("direction") != "1"
        snaps.sort(key=key, reverse=descending)
        if cursor := one("cursor"):
            after = _uncursor(cursor)
            snaps = [s for s in snaps if (tuple(key(s)) < after if descending else tuple(key(s)) > after)]
        size = min(int(one("limit") or self.hub.page_size), self.hub.page_size)
        page, more = snaps[:size], len(snaps) > size
        fields = self._fields(query, LISTING_DEFAULT)
        body = [self.hub.model_json(s, fields, blobs=False) for s in page]
        headers = {}
        if more:
            rest = {k: v for k, v in query.items() if k != "cursor"}
            rest["cursor"] = [_cursor(key(page[-1]))]
            host = self.headers.get("Host") or urlsplit(self.hub.url).netloc
            headers["Link"] = f'<http://{host}/api/models?{urlencode(rest, doseq=True)}>; rel="next"'
        self._json(200, body, headers, "list")

    @staticmethod
    def _fields(query: dict[str, list[str]], default: list[str]) -> list[str]:
        expand = query.get("expand") or query.get("expand[]")
        if expand:
            return expand
        fields = list(default)
        if (query.get("full") or [""])[0].lower() in ("1", "true"):
            fields += FULL_EXTRA
        if (query.get("cardData") or [""])[0].lower() in ("1", "true"):
            fields.append("cardData")
        if (query.get("config") or [""])[0].lower() in ("1", "true"):
            fields.append("config")
        return fields

    def _repo(self, repo_id: str, route: str) -> RepoSnapshot | None:
        snap = None if repo_id in self.hub.faults.not_found else self.hub.source.snapshot(repo_id)
        if snap is None:
            self._error(404, "RepoNotFound", "Repository not found", route)
        return snap

    def _info(self, rest: list[str], query: dict[str, list[str]]) -> None:
        if self._fault("info"):
            return
        if len(rest) >= 4 and rest[2] == "revision":
            repo_id, rev = "/".join(rest[:2]), "/".join(rest[3:])
        else:
            repo_id, rev = "/".join(rest), None
        snap = self._repo(repo_id, "info")
        if snap is None:
            return
        if rev not in (None, "main", snap.sha):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", "info")
        blobs = (query.get("blobs") or [""])[0].lower() in ("1", "true")
        self._json(200, self.hub.model_json(snap, self._fields(query, INFO_DEFAULT), blobs), route="info")

    def _resolve(self, repo_id: str, rev: str, filename: str) -> None:
        if self._fault("resolve"):
            return
        snap = self._repo(repo_id, "resolve")
        if snap is None:
            return
        if rev not in ("main", snap.sha):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", "resolve")
        f = snap.file(filename)  # only listed files: no path is built from the request
        if f is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist", "resolve",
                               {"X-Repo-Commit": snap.sha})
        headers = {
            "X-Repo-Commit": snap.sha,
            "ETag": f'"{_blob_id(snap, f.path)}"',
            "Accept-Ranges": "bytes",
            "Last-Modified": formatdate(f.mtime_ns / 1e9, usegmt=True),
        }
        start, end = 0, f.size - 1
        status = 200
        if (rng := self.headers.get("Range")) is not None:
            parsed = _parse_range(rng, f.size)
            if parsed is None:
                headers["Content-Range"] = f"bytes */{f.size}"
                return self._error(416, None, f"unsatisfiable range {rng!r}", "resolve", headers)
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        length = max(0, end - start + 1)
        if self.command == "HEAD":
            headers["Content-Length"] = str(length)
            return self._send(status, b"", headers, "resolve", "application/octet-stream")
        with open(snap.folder / f.path, "rb") as fh:
            fh.seek(start)
            body = fh.read(length)
        self._send(status, body, headers, "resolve", "application/octet-stream")


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """One `bytes=a-b`, `bytes=a-` or `bytes=-n` range, clamped; None when unsatisfiable."""
    unit, _, spec = value.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                return None
            return max(0, size - n), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


def serve(lake: str, port: int = 0, page_size: int = 100) -> None:  # pragma: no cover - manual use
    """`python -m tests.hubserver LAKE [PORT]`: serve a lake until Ctrl-C."""
    with HubServer(lake, page_size=page_size, port=port) as hub:
        print(f"serving {lake} at {hub.url} (HF_ENDPOINT={hub.url})", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":  # pragma: no cover
    import sys

    serve(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
