"""A Hub-compatible HTTP server for tests and benchmarks: over a lake folder, or over a simulated
Hub of any size (a million repos and more) generated on the fly.

Serves what huggingface_hub 2.4 calls, in the Hub's documented JSON shapes:
- `GET /api/models`: search, author, sort (+ direction, default -1), limit, expand / full /
  cardData / config; `Link: <...>; rel="next"` pagination with an opaque keyset cursor
- `GET /api/models/{repo_id}` and `/api/models/{repo_id}/revision/{rev}`: model info; `blobs=1`
  (files_metadata=True) adds sibling sizes; `expand` narrows the fields
- `HEAD`/`GET /{repo_id}/resolve/{rev}/{filename}`: with HTTP Range (206 + Content-Range) and the
  headers `hf_hub_download` requires (X-Repo-Commit, ETag; Content-Length, Accept-Ranges)
Errors carry `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound) as the Hub does, so
huggingface_hub raises its typed errors.

Two backends:
- `HubServer(lake)`: a lake folder. sha, lastModified, createdAt and file sizes come from
  `LocalSource`'s own computation, so the server and `LocalSource` describe the same lake
  identically. A folder has no history: only its current sha (or "main") resolves.
- `HubServer(repos=1_000_000, new=1_000, seed=0, tree_size=10)`: `SimulatedHub`, every repo a
  pure function of (seed, index): id, sha, times, card (with a `base_model` link, so repos form
  trees of `tree_size`), config.json (id2label) and a small valid model.safetensors. A page costs
  what its repos cost; nothing per repo is kept. `add_new(n)` (or `POST /_sim/new?count=n`) puts
  n repos on top, newer than every other: what a nightly finds.

Rate limit (either backend): `rate_limit={"api": 1000, "resolvers": 5000}` per `window_s` (300,
the Hub's 5-minute fixed window), in the Hub's buckets (listing pages and model info are "api",
`/resolve/` is "resolvers"; `buckets=` remaps), `rate_scope="global"` (one budget shared by every
client: what one deployment sharing a token sees) or `"client"` (per Authorization header, else
per peer address: how the Hub counts users and anonymous IPs). Every answer of a limited bucket
carries `RateLimit: "api";r=<left>;t=<reset s>` and `RateLimit-Policy: "fixed window";"api";
q=<quota>;w=<window s>`; once spent, 429 with `Retry-After` until the window ends. Refused
requests spend no budget.

`counts` (and `GET /_sim/stats`) gives served and refused (429) requests per endpoint class
(list / info / resolve / other), always kept, fixed size. `traffic` records every request and
body bytes per path (on by default for a lake; off for a simulated hub, where it would grow with
every request). `faults` injects 429s (with Retry-After or RateLimit headers), 5xx, per-repo 404s,
stalls (a request read but never answered) and a delay on every answer (a distant Hub).

Standalone, so several processes can share one hub (and one budget):
`python tests/hubserver.py --repos 1000000 --new 1000 --port 8765 --rate-limit api=1000,resolvers=5000`
prints one JSON line (`{"url": ..., ...}`) on stdout when it is ready; `python tests/hubserver.py
LAKE [PORT]` serves a lake folder.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import formatdate
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import numpy as np

from storage.sources import parse
from storage.sources.local import LocalSource, RepoSnapshot, read_card

LISTING_DEFAULT = ["id", "likes", "downloads", "tags", "pipeline_tag", "library_name", "createdAt", "private"]
FULL_EXTRA = ["sha", "lastModified", "siblings", "author", "gated", "disabled"]
INFO_DEFAULT = LISTING_DEFAULT + FULL_EXTRA + ["cardData", "config", "spaces", "usedStorage"]

ROUTES = ("list", "info", "resolve", "other")
# The Hub's rate-limit buckets (huggingface.co/docs/hub/rate-limits): API calls (listing pages and
# model info alike) and resolvers (every /resolve/ URL, ranged reads included). Its third bucket,
# "pages", is the website's HTML pages, which no client of ours requests.
HUB_BUCKETS = {"list": "api", "info": "api", "resolve": "resolvers"}
# Published quotas per 5-minute window (2025), for `rate_limit=`.
ANONYMOUS = {"api": 500, "resolvers": 3000}
FREE_TOKEN = {"api": 1000, "resolvers": 5000}
PRO = {"api": 2500, "resolvers": 12000}
HUB_WINDOW_S = 300


def iso(moment: datetime) -> str:
    """The Hub's timestamp format: UTC, milliseconds, 'Z'."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def iso_ms(ms: int) -> str:
    """`iso` of a Unix time in integer milliseconds (exact: no float rounding)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


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
    delay_s: float = 0.0  # every request of `route` is answered this late: a distant Hub


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


# --- rate limit -----------------------------------------------------------------------------------


class RateLimiter:
    """Fixed windows of `window_s` counted from the limiter's creation, a quota per bucket.

    scope "global": one budget per bucket for every client together. scope "client": one per
    bucket and client (the caller passes the client's key). Only allowed requests spend budget.
    `clock` is injectable so a test can move time instead of sleeping.
    """

    def __init__(self, limits: Mapping[str, int], window_s: float = HUB_WINDOW_S, scope: str = "global",
                 clock: Callable[[], float] = time.monotonic):
        if scope not in ("global", "client"):
            raise ValueError(f"rate_scope must be 'global' or 'client', not {scope!r}")
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, not {window_s!r}")
        bad = {k: v for k, v in limits.items() if not isinstance(v, int) or v < 0}
        if bad:
            raise ValueError(f"rate limits must be non-negative integers: {bad!r}")
        self.limits = dict(limits)
        self.window_s = window_s
        self.scope = scope
        self.clock = clock
        self._origin = clock()
        self._lock = threading.Lock()
        self._used: dict[tuple[str, str | None], list[int]] = {}  # (bucket, client) -> [window, used]

    def take(self, bucket: str, client: str) -> tuple[bool, int, int, int] | None:
        """Spend one request of `bucket`: (allowed, remaining, seconds to the window's end,
        quota); None when the bucket has no limit."""
        quota = self.limits.get(bucket)
        if quota is None:
            return None
        now = self.clock() - self._origin
        window = int(now // self.window_s)
        reset = max(1, math.ceil((window + 1) * self.window_s - now))
        key = (bucket, client if self.scope == "client" else None)
        with self._lock:
            slot = self._used.get(key)
            if slot is None or slot[0] != window:
                slot = self._used[key] = [window, 0]
            if slot[1] >= quota:
                return False, 0, reset, quota
            slot[1] += 1
            return True, quota - slot[1], reset, quota


def parse_limits(text: str) -> dict[str, int]:
    """`api=1000,resolvers=5000` (or a preset: anonymous, free, pro) -> {bucket: quota}."""
    presets = {"anonymous": ANONYMOUS, "free": FREE_TOKEN, "pro": PRO}
    if text.lower() in presets:
        return dict(presets[text.lower()])
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"rate limit {part!r}: write BUCKET=N, e.g. api=1000,resolvers=5000")
        out[name.strip()] = int(value)
    return out


# --- what a route needs of one repo, from either backend ------------------------------------------


@dataclass(frozen=True)
class FileView:
    path: str
    size: int
    blob_id: str
    mtime: float  # seconds since the epoch: the Last-Modified header


class RepoView:
    """One repo as the routes see it. Subclasses fill the fields; card/config/read are lazy."""

    repo_id: str
    sha: str
    last_modified: str  # the Hub's ISO format
    created_at: str
    files: list[FileView]

    def card(self) -> dict | None:
        """cardData as the API serves it (None: no card, or front matter the Hub cannot parse)."""
        raise NotImplementedError

    def config(self) -> dict | None:
        raise NotImplementedError

    def file(self, path: str) -> FileView | None:
        return next((f for f in self.files if f.path == path), None)

    def paths(self) -> list[str]:
        """The files' paths alone: what a listing's siblings carry (no sizes to compute)."""
        return [f.path for f in self.files]

    def read(self, path: str, start: int, length: int) -> bytes:
        raise NotImplementedError


class _LakeRepo(RepoView):
    def __init__(self, snap: RepoSnapshot):
        self.snap = snap
        self.repo_id, self.sha = snap.repo_id, snap.sha
        self.last_modified, self.created_at = iso(snap.last_modified), iso(snap.created_at)

    @cached_property
    def files(self) -> list[FileView]:  # type: ignore[override]
        return [FileView(f.path, f.size, _blob_id(self.snap, f.path), f.mtime_ns / 1e9) for f in self.snap.files]

    def card(self) -> dict | None:
        data, problem = read_card(self.snap)
        # The Hub drops front matter it cannot parse; clients then see no cardData.
        return None if problem else data.to_dict()

    def config(self) -> dict | None:
        f = self.snap.file(parse.CONFIG_FILE)
        if f is None or f.size > parse.MAX_CONFIG_BYTES:
            return None
        try:
            config = json.loads((self.snap.folder / f.path).read_bytes())
        except ValueError:
            return None
        return config if isinstance(config, dict) else None

    def read(self, path: str, start: int, length: int) -> bytes:
        if self.snap.file(path) is None:  # only listed files: no path is built from a request
            raise KeyError(path)
        with open(self.snap.folder / path, "rb") as fh:
            fh.seek(start)
            return fh.read(length)


def _blob_id(snap: RepoSnapshot, path: str) -> str:
    # A stable stand-in for the git blob id: changes whenever the file does.
    f = snap.file(path)
    return hashlib.sha1(f"{snap.repo_id}\0{path}\0{f.size}\0{f.mtime_ns}".encode()).hexdigest()


def _cursor(key) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode()


def _uncursor(token: str) -> tuple:
    try:
        key = json.loads(base64.urlsafe_b64decode(token.encode()))
    except ValueError as err:
        raise BadRequest(f"bad cursor {token[:40]!r}") from err
    if not isinstance(key, list):
        raise BadRequest(f"bad cursor {token[:40]!r}")
    return tuple(key)


class BadRequest(ValueError):
    """A query this server answers with 400 and the message."""


def _sort_key(sort: str | None):
    if sort in ("lastModified", "last_modified"):
        return lambda s: (s.last_modified.timestamp(), s.repo_id)
    if sort in ("createdAt", "created_at"):
        return lambda s: (s.created_at.timestamp(), s.repo_id)
    return lambda s: (0, s.repo_id)  # downloads, likes, trending: all 0 here; id breaks ties


def _one(query: dict[str, list[str]], key: str) -> str | None:
    return (query.get(key) or [None])[0]


class LakeBackend:
    """The repos of a lake folder, re-read on every request (tests change lakes under it)."""

    def __init__(self, lake: str | Path):
        self.source = LocalSource(lake)

    def page(self, query: dict[str, list[str]], size: int) -> tuple[list[RepoView], str | None]:
        snaps = self.source.snapshots()
        if search := _one(query, "search"):
            snaps = [s for s in snaps if search.lower() in s.repo_id.lower()]
        if author := _one(query, "author"):
            snaps = [s for s in snaps if s.repo_id.split("/")[0] == author]
        key = _sort_key(_one(query, "sort"))
        descending = _one(query, "sort") is not None and _one(query, "direction") != "1"
        snaps.sort(key=key, reverse=descending)
        if cursor := _one(query, "cursor"):
            after = _uncursor(cursor)
            snaps = [s for s in snaps if (tuple(key(s)) < after if descending else tuple(key(s)) > after)]
        page, more = snaps[:size], len(snaps) > size
        return [_LakeRepo(s) for s in page], (_cursor(key(page[-1])) if more else None)

    def repo(self, repo_id: str) -> RepoView | None:
        snap = self.source.snapshot(repo_id)
        return None if snap is None else _LakeRepo(snap)


# --- the simulated Hub ----------------------------------------------------------------------------

T0_MS = 1_646_092_800_000  # 2022-03-01T00:00:00Z: repo 0, the oldest
STEP_MS = 30_000  # one repo per 30 s: 1,000,000 repos span 347 days
_ORGS = ["acme", "blue", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "iris", "juniper",
         "kite", "lumen", "maple", "nimbus", "onyx", "pine", "quartz", "raven", "sable", "tidal"]
_ARCHS = ["bert", "vit", "roberta", "deit", "distilbert", "convnext", "electra", "swin"]
_ADJS = ["tiny", "small", "base", "large", "fast", "tuned", "distilled", "robust", "clean", "sharp"]
_LABELS = ["cat", "dog", "bird", "horse", "ship", "truck", "frog", "deer", "car", "plane", "apple",
           "bean", "rose", "tulip", "daisy", "oak", "pine", "maple", "shark", "whale", "trout",
           "tiger", "lion", "bear", "wolf", "fox", "owl", "hawk", "crab", "snail", "bee", "ant",
           "positive", "negative", "neutral", "spam", "ham", "sports", "politics", "science"]
_LICENSES = ["apache-2.0", "mit", "cc-by-4.0", "openrail", "llama3"]
_DATASETS = ["cifar10", "imdb", "food101", "beans", "oxford_flowers102", "ag_news", "sst2", "mnist"]
_PIPELINES = ["image-classification", "text-classification"]


def _h(seed: int, salt: str, i: int) -> int:
    """A deterministic 64-bit hash of (seed, salt, i): the same in every process and run."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{salt}:{i}".encode(), digest_size=8).digest(), "little")


_ST_DTYPES = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16"}


def safetensors_header(specs: Mapping[str, tuple[str, tuple[int, ...], int]]) -> bytes:
    """The length-prefixed header of a safetensors file: u64 length, then the JSON (padded with
    spaces to 8 bytes, as the reference writer does). specs: name -> (dtype, shape, nbytes), in
    file order. Known without the tensors' values, so a file's size costs no weights."""
    header, offset = {}, 0
    for name, (dtype, shape, nbytes) in specs.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def safetensors_bytes(tensors: Mapping[str, np.ndarray]) -> bytes:
    """A safetensors file: the header, then the tensors' bytes in order."""
    arrays = {name: np.ascontiguousarray(arr) for name, arr in tensors.items()}
    header = safetensors_header({n: (_ST_DTYPES[a.dtype], a.shape, a.nbytes) for n, a in arrays.items()})
    return header + b"".join(a.tobytes() for a in arrays.values())


def front_matter(card: Mapping[str, str | list[str]]) -> str:
    """YAML of a flat card (string and list-of-string values), written directly: a JSON string is
    a YAML scalar, so it parses to `card`, at a tenth of yaml.safe_dump's cost (a model info
    sizes the README of every repo it describes)."""
    lines = []
    for key, value in card.items():
        if isinstance(value, str):
            lines.append(f"{key}: {json.dumps(value)}")
        else:
            lines += [f"{key}:"] + [f"- {json.dumps(item)}" for item in value]
    return "\n".join(lines) + "\n"


class SimulatedHub:
    """`repos` generated repos plus `new` newer ones; repo i (0 the oldest) is a pure function of
    (seed, i), computed when asked for. Nothing per repo is stored, so memory does not depend on
    the size, and any page, any repo costs the same.

    - lastModified: T0 + i * 30 s + 15..30 s, createdAt: T0 + i * 30 s + 0..15 s (ms resolution,
      strictly increasing in i), so "newest first" is descending i.
    - trees: `n_trees = ceil(repos / tree_size)`; repo i is in tree `i % n_trees` at rank
      `i // n_trees`; rank 0 is the root (no base_model), rank r > 0 declares as `base_model`
      (relation finetune) a uniformly drawn older member of its tree (rank < r), unless drawn
      into the `no_lineage` fraction (the Hub's undeclared majority). New repos join existing
      trees the same way. Trees are interleaved: the roots are the `n_trees` oldest repos.
    - files: README.md (YAML front matter: license, datasets, tags, pipeline_tag, library_name,
      base_model), config.json (model_type, id2label with 2-4 labels, label2id) and
      model.safetensors: four F32 encoder tensors of the tree's shape (hidden x hidden, hidden)
      = the tree's base + small per-repo noise, and a classifier (labels x hidden) whose rows
      are the labels' own vectors + noise, so weights carry the labels.
    """

    def __init__(self, repos: int, *, new: int = 0, seed: int = 0, tree_size: int = 10,
                 no_lineage: float = 0.0, hidden: int = 8):
        if repos < 1 or new < 0:
            raise ValueError(f"repos must be >= 1 and new >= 0 (got repos={repos}, new={new})")
        if tree_size < 1 or hidden < 1 or not 0.0 <= no_lineage <= 1.0:
            raise ValueError("tree_size and hidden must be >= 1, no_lineage in [0, 1]")
        self.repos, self.seed, self.tree_size = repos, seed, tree_size
        self.no_lineage, self.hidden = no_lineage, hidden
        self.n_trees = -(-repos // tree_size)
        self._new = new
        self._lock = threading.Lock()

    @property
    def new(self) -> int:
        return self._new

    @property
    def total(self) -> int:
        return self.repos + self._new

    def add_new(self, count: int) -> range:
        """Put `count` repos on top of the listing, newer than all others; their indices."""
        if count < 0:
            raise ValueError(f"count must be >= 0, not {count}")
        with self._lock:
            first = self.total
            self._new += count
        return range(first, first + count)

    # -- identity ----------------------------------------------------------------------------------
    def tree(self, i: int) -> int:
        return i % self.n_trees

    def repo_id(self, i: int) -> str:
        t = self.tree(i)
        org = _ORGS[_h(self.seed, "org", t) % len(_ORGS)] + f"{_h(self.seed, 'orgn', t) % 500:03d}"
        arch = _ARCHS[_h(self.seed, "arch", t) % len(_ARCHS)]
        return f"{org}/{arch}-{_ADJS[_h(self.seed, 'adj', i) % len(_ADJS)]}-{i}"

    def index(self, repo_id: str) -> int | None:
        """The index of a repo id this hub lists, else None."""
        tail = repo_id.rpartition("-")[2]
        if not tail.isdigit() or len(tail) > 12:
            return None
        i = int(tail)
        return i if i < self.total and self.repo_id(i) == repo_id else None

    def parent(self, i: int) -> int | None:
        """The index of the repo i declares as base_model (None: a root or undeclared)."""
        rank = i // self.n_trees
        if rank == 0 or _h(self.seed, "nolin", i) % 1_000_000 < self.no_lineage * 1_000_000:
            return None
        return self.tree(i) + self.n_trees * (_h(self.seed, "parent", i) % rank)

    def sha(self, i: int) -> str:
        return hashlib.sha1(f"sim:{self.seed}:{i}".encode()).hexdigest()

    def last_modified_ms(self, i: int) -> int:
        return T0_MS + i * STEP_MS + STEP_MS // 2 + _h(self.seed, "lm", i) % (STEP_MS // 2)

    def created_at_ms(self, i: int) -> int:
        return T0_MS + i * STEP_MS + _h(self.seed, "ct", i) % (STEP_MS // 2)

    # -- content -----------------------------------------------------------------------------------
    def labels(self, i: int) -> list[str]:
        draw = _h(self.seed, "labels", i)
        return random.Random(draw).sample(_LABELS, 2 + draw % 3)  # int seeds: the same in every run

    def card(self, i: int) -> dict:
        t = self.tree(i)
        pipeline = _PIPELINES[_h(self.seed, "pipe", t) % len(_PIPELINES)]
        card = {
            "license": _LICENSES[_h(self.seed, "lic", i) % len(_LICENSES)],
            "library_name": "transformers",
            "pipeline_tag": pipeline,
            "tags": ["simulated", _ARCHS[_h(self.seed, "arch", t) % len(_ARCHS)]],
            "datasets": [_DATASETS[_h(self.seed, "ds", i) % len(_DATASETS)]],
        }
        if (p := self.parent(i)) is not None:
            card["base_model"] = self.repo_id(p)
            card["base_model_relation"] = "finetune"
        return card

    def readme(self, i: int) -> bytes:
        front = front_matter(self.card(i))
        return f"---\n{front}---\n# {self.repo_id(i)}\n\nA simulated model (tree {self.tree(i)}).\n".encode()

    def config(self, i: int) -> dict:
        labels = self.labels(i)
        return {"model_type": _ARCHS[_h(self.seed, "arch", self.tree(i)) % len(_ARCHS)],
                "hidden_size": self.hidden,
                "id2label": {str(k): v for k, v in enumerate(labels)},
                "label2id": {v: k for k, v in enumerate(labels)}}

    ENCODER = ("encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.self.query.bias",
               "encoder.layer.1.attention.self.value.weight", "encoder.layer.1.output.dense.weight")

    def tensor_shapes(self, i: int) -> dict[str, tuple[int, ...]]:
        """name -> shape of repo i's tensors, in file order (all F32)."""
        h, n = self.hidden, len(self.labels(i))
        return {self.ENCODER[0]: (h, h), self.ENCODER[1]: (h,), self.ENCODER[2]: (h, h), self.ENCODER[3]: (h, h),
                "classifier.weight": (n, h), "classifier.bias": (n,)}

    def tensors(self, i: int) -> dict[str, np.ndarray]:
        shapes = self.tensor_shapes(i)
        base = np.random.default_rng([self.seed, self.tree(i), 1])
        noise = np.random.default_rng([self.seed, i, 2])
        out = {}
        for name in self.ENCODER:
            shape = shapes[name]
            out[name] = (base.standard_normal(shape) + 0.05 * noise.standard_normal(shape)).astype(np.float32)
        h = self.hidden
        rows = [np.random.default_rng([self.seed, _LABELS.index(lab), 3]).standard_normal(h) for lab in self.labels(i)]
        out["classifier.weight"] = (np.stack(rows) + 0.05 * noise.standard_normal((len(rows), h))).astype(np.float32)
        out["classifier.bias"] = np.zeros(len(rows), np.float32)
        return out

    FILES = (parse.CARD_FILE, parse.CONFIG_FILE, "model.safetensors")

    def file_bytes(self, i: int, path: str) -> bytes | None:
        """One file of repo i, generated alone (a card GET does not build the weights)."""
        if path == parse.CARD_FILE:
            return self.readme(i)
        if path == parse.CONFIG_FILE:
            return json.dumps(self.config(i), indent=2).encode()
        if path == "model.safetensors":
            return safetensors_bytes(self.tensors(i))
        return None

    def files(self, i: int) -> dict[str, bytes]:
        return {path: self.file_bytes(i, path) for path in self.FILES}

    def weights_size(self, i: int) -> int:
        """model.safetensors' size from its shapes alone (a listing or model info sizes every
        repo's weights; generating them would be most of a page's cost)."""
        specs = {n: ("F32", s, 4 * math.prod(s)) for n, s in self.tensor_shapes(i).items()}
        return len(safetensors_header(specs)) + sum(nbytes for _, _, nbytes in specs.values())

    # -- the server's interface --------------------------------------------------------------------
    def view(self, i: int) -> RepoView:
        return _SimRepo(self, i)

    def repo(self, repo_id: str) -> RepoView | None:
        i = self.index(repo_id)
        return None if i is None else self.view(i)

    @staticmethod
    def cursor(after: int) -> str:
        """The `cursor=` of the page that continues after index `after` (below it, newest first;
        above it with direction=1): lets a test or benchmark jump anywhere in the listing."""
        return _cursor(("i", after))

    def page(self, query: dict[str, list[str]], size: int) -> tuple[list[RepoView], str | None]:
        """One page, newest first unless `direction=1`: every sort gives index order (times grow
        with the index; downloads, likes, trending are all 0 here). The cursor holds the last
        index, so repos added on top mid-listing do not shift later pages."""
        if _one(query, "search") or _one(query, "author"):
            raise BadRequest("the simulated hub lists everything: search= and author= filters are not supported")
        descending = _one(query, "direction") != "1"
        total = self.total
        start = (total - 1) if descending else 0
        if cursor := _one(query, "cursor"):
            key = _uncursor(cursor)
            if len(key) != 2 or key[0] != "i" or not isinstance(key[1], int):
                raise BadRequest(f"bad cursor {cursor[:40]!r}")
            start = min(key[1] - 1, total - 1) if descending else max(key[1] + 1, 0)
        if descending:
            indices = range(start, max(-1, start - size), -1)
            more = start - size >= 0
        else:
            indices = range(start, min(total, start + size))
            more = start + size < total
        views = [self.view(i) for i in indices]
        return views, (self.cursor(indices[-1]) if more and views else None)


class _SimRepo(RepoView):
    def __init__(self, hub: SimulatedHub, i: int):
        self.hub, self.i = hub, i
        self.repo_id = hub.repo_id(i)
        self.sha = hub.sha(i)
        self.last_modified = iso_ms(hub.last_modified_ms(i))
        self.created_at = iso_ms(hub.created_at_ms(i))
        self._contents: dict[str, bytes | None] = {}  # this request's files, generated once

    def _content(self, path: str) -> bytes | None:
        if path not in self._contents:
            self._contents[path] = self.hub.file_bytes(self.i, path)
        return self._contents[path]

    def file(self, path: str) -> FileView | None:
        if path not in self.hub.FILES:
            return None
        size = self.hub.weights_size(self.i) if path == "model.safetensors" else len(self._content(path))
        # A stand-in for the git blob id (as a lake's): changes whenever the file does, costs no weights
        blob = hashlib.sha1(f"sim:{self.hub.seed}:{self.i}:{path}:{size}".encode()).hexdigest()
        return FileView(path, size, blob, self.hub.last_modified_ms(self.i) / 1000)

    @cached_property
    def files(self) -> list[FileView]:  # type: ignore[override]
        return [self.file(path) for path in self.hub.FILES]

    def paths(self) -> list[str]:
        return list(self.hub.FILES)

    def card(self) -> dict | None:
        return self.hub.card(self.i)

    def config(self) -> dict | None:
        return self.hub.config(self.i)

    def read(self, path: str, start: int, length: int) -> bytes:
        return self._content(path)[start : start + length]


# --- the server -----------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    """Threads per connection, each tracked, so `stop()` closes idle keep-alive connections and
    joins their threads instead of leaving them blocked in a read."""

    daemon_threads = True
    request_queue_size = 128  # several client processes and workers connect at once

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._open: dict[socket.socket, threading.Thread] = {}
        self._open_lock = threading.Lock()

    def process_request_thread(self, request, client_address):
        with self._open_lock:
            self._open[request] = threading.current_thread()
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open.pop(request, None)

    def close_connections(self, timeout: float) -> None:
        with self._open_lock:
            open_now = list(self._open.items())
        for sock, _ in open_now:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # a handler blocked reading the next request wakes
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for _, thread in open_now:
            thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def open_connections(self) -> int:
        with self._open_lock:
            return len(self._open)


class HubServer:
    """`with HubServer(lake) as hub: HubSource(endpoint=hub.url)`; port 0 picks a free port.

    `HubServer(repos=1_000_000, new=1000, seed=0, tree_size=10, rate_limit=FREE_TOKEN)`: a
    simulated hub (see `SimulatedHub`; `hub.sim` is it). Options for both backends:
    page_size: the most repos a listing page holds (a smaller `limit=` is honoured);
    rate_limit / window_s / rate_scope / buckets / clock: see the module docstring;
    traffic: record every request in `traffic` (default: on for a lake, off when simulated);
    idle_timeout_s: a keep-alive connection silent this long is closed.
    """

    def __init__(self, lake: str | Path | None = None, *, repos: int | None = None, new: int = 0, seed: int = 0,
                 tree_size: int = 10, no_lineage: float = 0.0, page_size: int | None = None,
                 rate_limit: Mapping[str, int] | None = None, window_s: float = HUB_WINDOW_S,
                 rate_scope: str = "global", buckets: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic, traffic: bool | None = None,
                 idle_timeout_s: float = 30.0, host: str = "127.0.0.1", port: int = 0):
        if (lake is None) == (repos is None):
            raise ValueError("give a lake folder or repos=N (a simulated hub), not both or neither")
        if lake is not None:
            self.backend: LakeBackend | SimulatedHub = LakeBackend(lake)
            self.source: LocalSource | None = self.backend.source
            self.sim: SimulatedHub | None = None
        else:
            self.sim = self.backend = SimulatedHub(repos, new=new, seed=seed, tree_size=tree_size,
                                                   no_lineage=no_lineage)
            self.source = None
        self.page_size = page_size if page_size is not None else (100 if lake is not None else 1000)
        self.buckets = dict(HUB_BUCKETS if buckets is None else buckets)
        if unused := sorted(set(rate_limit or {}) - set(self.buckets.values())):
            raise ValueError(f"rate limit for {unused}, a bucket no route draws from (routes -> buckets: "
                             f"{self.buckets}); limit one of those, or map a route to it with buckets=")
        self.limiter = RateLimiter(rate_limit, window_s, rate_scope, clock) if rate_limit else None
        self.faults = Faults()
        self.traffic = Traffic()
        self.record_traffic = lake is not None if traffic is None else traffic
        self._counts = {route: [0, 0] for route in ROUTES}  # route -> [served, refused]
        self._lock = threading.Lock()
        self.stopping = threading.Event()  # releases stalled handlers at stop
        handler = type("_BoundHandler", (_Handler,), {"timeout": idle_timeout_s})
        self._httpd = _HTTPServer((host, port), handler)
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

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, release stalled handlers, close every open connection, join threads."""
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.close_connections(timeout)
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    @property
    def open_connections(self) -> int:
        """Connections whose handler thread is still running."""
        return self._httpd.open_connections

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the simulated hub -----------------------------------------------------------------
    def add_new(self, count: int) -> range:
        """`count` new repos on top of a simulated hub's listing (their indices)."""
        if self.sim is None:
            raise ValueError("add_new needs a simulated hub (HubServer(repos=N)); add folders to a lake instead")
        return self.sim.add_new(count)

    # -- bookkeeping used by the handler ---------------------------------------------------
    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """Requests per endpoint class: served (any answer but 429) and refused (429)."""
        with self._lock:
            return {route: {"served": s, "refused": r} for route, (s, r) in self._counts.items()}

    def reset_counts(self) -> None:
        with self._lock:
            for pair in self._counts.values():
                pair[0] = pair[1] = 0

    def stats(self) -> dict:
        out: dict = {"url": self.url, "counts": self.counts, "page_size": self.page_size}
        if self.sim is not None:
            out.update(repos=self.sim.repos, new=self.sim.new, total=self.sim.total, seed=self.sim.seed,
                       tree_size=self.sim.tree_size, trees=self.sim.n_trees)
        if self.limiter is not None:
            out.update(rate_limit=self.limiter.limits, window_s=self.limiter.window_s,
                       rate_scope=self.limiter.scope, buckets=self.buckets)
        return out

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

    def take_budget(self, route: str, client: str) -> tuple[bool, dict[str, str]]:
        """(allowed, RateLimit headers for the answer) for one request of `route`."""
        bucket = self.buckets.get(route)
        taken = self.limiter.take(bucket, client) if self.limiter is not None and bucket else None
        if taken is None:
            return True, {}
        allowed, remaining, reset, quota = taken
        window = math.ceil(self.limiter.window_s)
        headers = {"RateLimit": f'"{bucket}";r={remaining};t={reset}',
                   "RateLimit-Policy": f'"fixed window";"{bucket}";q={quota};w={window}'}
        if not allowed:
            headers["Retry-After"] = str(reset)
        return allowed, headers

    def record(self, hit: Hit, body_bytes: int) -> None:
        with self._lock:
            if hit.route in self._counts:
                self._counts[hit.route][1 if hit.status == 429 else 0] += 1
            if self.record_traffic:
                self.traffic.hits.append(hit)
                self.traffic.body_bytes[hit.path] += body_bytes

    # -- JSON shapes -----------------------------------------------------------------------
    def model_json(self, repo: RepoView, fields: list[str], blobs: bool) -> dict:
        out: dict = {"_id": repo.sha[:24], "id": repo.repo_id}
        card = repo.card() if {"cardData", "tags", "pipeline_tag", "library_name"} & set(fields) else None
        for key in fields:
            if key == "sha":
                out["sha"] = repo.sha
            elif key == "lastModified":
                out["lastModified"] = repo.last_modified
            elif key == "createdAt":
                out["createdAt"] = repo.created_at
            elif key == "author":
                out["author"] = repo.repo_id.split("/")[0]
            elif key in ("likes", "downloads"):
                out[key] = 0
            elif key in ("private", "gated", "disabled"):
                out[key] = False
            elif key == "spaces":
                out["spaces"] = []
            elif key == "usedStorage":
                out["usedStorage"] = sum(f.size for f in repo.files)
            elif key == "tags":  # the Hub adds derived tags; the card's own are enough here
                out["tags"] = parse.str_list((card or {}).get("tags"))
            elif key in ("pipeline_tag", "library_name"):
                value = (card or {}).get(key)
                if isinstance(value, str):
                    out[key] = value
            elif key == "cardData" and card:
                out["cardData"] = card
            elif key == "config":
                config = repo.config()
                if config is not None:
                    out["config"] = config
            elif key == "siblings" and blobs:
                out["siblings"] = [{"rfilename": f.path, "size": f.size, "blobId": f.blob_id} for f in repo.files]
            elif key == "siblings":
                out["siblings"] = [{"rfilename": path} for path in repo.paths()]
        return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's pooled client expects
    server_version = "probex-hubserver/1"
    # Headers and body in one segment, no Nagle: otherwise each keep-alive request waits ~40 ms
    # for a delayed ACK. handle_one_request() flushes the buffer after every response.
    disable_nagle_algorithm = True
    wbufsize = 1 << 16
    timeout = 30.0  # socket timeout: an idle keep-alive connection is closed (HubServer sets it)
    _extra: dict[str, str] = {}  # headers every answer to this request carries (RateLimit)

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, *args) -> None:  # quiet: tests read `traffic` / `counts` instead
        pass

    # -- plumbing --------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              route: str = "other", content_type: str = "application/json") -> None:
        """Send a response; a HEAD passes the GET's Content-Length in `headers` and no body."""
        headers = {"Content-Type": content_type, "Content-Length": str(len(body)), **self._extra, **(headers or {})}
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

    def _refused(self, route: str) -> bool:
        """Answer an injected fault or a spent budget; True when the request is answered."""
        if (delay := self.hub.faults.delay_s) and self.hub.faults.route in ("any", route):
            self.hub.stopping.wait(delay)
        fault = self.hub.take_fault(route)
        if fault is not None:
            status, headers = fault
            self._error(status, None, "injected fault", route, headers)
            return True
        client = self.headers.get("Authorization") or f"ip:{self.client_address[0]}"
        allowed, headers = self.hub.take_budget(route, client)
        if not allowed:
            self._error(429, None, "rate limit reached for this window; retry after the reset", route,
                        headers)
            return True
        self._extra = headers
        return False

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self._extra = {}
        url = urlsplit(self.path)
        if (suffix := self.hub.faults.stall_suffix) and url.path.endswith(suffix):
            self.hub.record(Hit(self.command, url.path, 0, time.monotonic(), "stalled"), 0)
            self.hub.stopping.wait()  # read, never answered: what a hung server or proxy does
            self.close_connection = True
            return
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = parse_qs(url.query)
        if parts[:2] == ["_sim", "stats"]:
            self._send(200, json.dumps(self.hub.stats()).encode(), route="control")
        elif parts[:2] == ["api", "models"] and len(parts) == 2:
            self._list(query)
        elif parts[:2] == ["api", "models"] and len(parts) > 2:
            self._info(parts[2:], query)
        elif "resolve" in parts[1:3]:
            i = parts.index("resolve", 1)
            self._resolve("/".join(parts[:i]), parts[i + 1] if len(parts) > i + 1 else "", "/".join(parts[i + 2 :]))
        else:
            self._error(404, None, f"no route for {url.path}", "other")

    def do_POST(self) -> None:
        """Control: `POST /_sim/new?count=N` adds N new repos; `POST /_sim/reset` zeroes counts."""
        self._extra = {}
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(min(length, 1 << 16))
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path == "/_sim/new":
            try:
                added = self.hub.add_new(int(_one(query, "count") or "0"))
            except ValueError as err:
                return self._error(400, None, str(err), "control")
            self._json(200, {"added": [added.start, added.stop], **self.hub.stats()}, route="control")
        elif url.path == "/_sim/reset":
            self.hub.reset_counts()
            self._json(200, self.hub.stats(), route="control")
        else:
            self._error(404, None, f"no route for POST {url.path}", "control")

    # -- routes ----------------------------------------------------------------------------
    def _list(self, query: dict[str, list[str]]) -> None:
        if self._refused("list"):
            return
        try:
            size = min(int(_one(query, "limit") or self.hub.page_size), self.hub.page_size)
            if size < 1:
                raise BadRequest("limit must be >= 1")
            page, cursor = self.hub.backend.page(query, size)
        except ValueError as err:  # BadRequest, or a limit that is not a number
            return self._error(400, None, str(err), "list")
        fields = self._fields(query, LISTING_DEFAULT)
        body = [self.hub.model_json(r, fields, blobs=False) for r in page]
        headers = {}
        if cursor is not None:
            rest = {k: v for k, v in query.items() if k != "cursor"}
            rest["cursor"] = [cursor]
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

    def _repo(self, repo_id: str, route: str) -> RepoView | None:
        repo = None if repo_id in self.hub.faults.not_found else self.hub.backend.repo(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", route)
        return repo

    def _info(self, rest: list[str], query: dict[str, list[str]]) -> None:
        if self._refused("info"):
            return
        if len(rest) >= 4 and rest[2] == "revision":
            repo_id, rev = "/".join(rest[:2]), "/".join(rest[3:])
        else:
            repo_id, rev = "/".join(rest), None
        repo = self._repo(repo_id, "info")
        if repo is None:
            return
        if rev not in (None, "main", repo.sha):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", "info")
        blobs = (query.get("blobs") or [""])[0].lower() in ("1", "true")
        self._json(200, self.hub.model_json(repo, self._fields(query, INFO_DEFAULT), blobs), route="info")

    def _resolve(self, repo_id: str, rev: str, filename: str) -> None:
        if self._refused("resolve"):
            return
        repo = self._repo(repo_id, "resolve")
        if repo is None:
            return
        if rev not in ("main", repo.sha):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", "resolve")
        f = repo.file(filename)  # only listed files: no path is built from the request
        if f is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist", "resolve",
                               {"X-Repo-Commit": repo.sha})
        headers = {
            "X-Repo-Commit": repo.sha,
            "ETag": f'"{f.blob_id}"',
            "Accept-Ranges": "bytes",
            "Last-Modified": formatdate(f.mtime, usegmt=True),
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
        self._send(status, repo.read(f.path, start, length), headers, "resolve", "application/octet-stream")


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


# --- standalone -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - manual / benchmark use
    """Serve until SIGINT/SIGTERM; print one JSON line with the URL once listening."""
    import signal
    import sys

    p = argparse.ArgumentParser(prog="python tests/hubserver.py", description=__doc__.split("\n\n")[0])
    p.add_argument("lake", nargs="?", help="a lake folder to serve (instead of --repos)")
    p.add_argument("legacy_port", nargs="?", type=int, help=argparse.SUPPRESS)  # `LAKE PORT`, as before
    p.add_argument("--repos", type=int, help="serve a simulated hub of this many generated repos")
    p.add_argument("--new", type=int, default=0, help="repos on top, newer than all generated ones")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tree-size", type=int, default=10)
    p.add_argument("--no-lineage", type=float, default=0.0, help="fraction of non-roots without base_model")
    p.add_argument("--page-size", type=int, help="default: 1000 simulated, 100 for a lake")
    p.add_argument("--rate-limit", help="BUCKET=N,... (buckets api, resolvers) or anonymous / free / pro")
    p.add_argument("--window", type=float, default=HUB_WINDOW_S, help="rate-limit window in seconds")
    p.add_argument("--buckets", help="ROUTE=BUCKET,... (routes list, info, resolve); default the Hub's: "
                   "list=api,info=api,resolve=resolvers")
    p.add_argument("--scope", choices=["global", "client"], default="global")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args(argv)
    if (a.lake is None) == (a.repos is None):
        p.error("give a LAKE folder or --repos N")
    try:
        limits = parse_limits(a.rate_limit) if a.rate_limit else None
        buckets = None
        if a.buckets:
            pairs = [part.strip().partition("=") for part in a.buckets.split(",") if part.strip()]
            if any(not sep or k.strip() not in ROUTES for k, sep, _ in pairs):
                raise ValueError(f"--buckets {a.buckets!r}: write ROUTE=BUCKET,... with routes list, info, resolve")
            buckets = {k.strip(): v.strip() for k, _, v in pairs}
        hub = HubServer(a.lake, repos=a.repos, new=a.new, seed=a.seed, tree_size=a.tree_size,
                        no_lineage=a.no_lineage, page_size=a.page_size, rate_limit=limits, window_s=a.window,
                        rate_scope=a.scope, buckets=buckets, host=a.host, port=a.legacy_port or a.port)
    except (ValueError, OSError) as err:
        print(f"hubserver: {err}", file=sys.stderr)
        return 2
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with hub:
        print(json.dumps({"url": hub.url, "HF_ENDPOINT": hub.url, **hub.stats()}), flush=True)
        try:
            while not done.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
