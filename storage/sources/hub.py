"""The Hugging Face Hub (or any Hub-compatible endpoint: a mirror, the test server).

Requests per crawled model: one GET of config.json (the API's `config` is a trimmed copy without
id2label), and one of README.md only when the API gave no cardData for a repo that has one (the
Hub drops unparseable front matter; reading it ourselves gives the same `bad_card` record as a
folder). Everything else comes with the listing page (`expand=`: sha, times, siblings, cardData,
pipeline_tag, library_name), so the crawl spends about one API call per page, not per repo: the
API bucket is the Hub's scarcest (1,000 calls per 5 minutes on a free token). The listing's
siblings carry no sizes, so records list files with size -1 (unknown), and config.json and
README.md are read with a ranged GET that stops at their size limit. `file_sizes=True` reads
each repo's model info instead (`blobs=true`: sizes; one more API call per repo), as
`model_info()` always does.

The listed repos are read `workers` at a time (`in_order`) and yielded in listing order: what a
consumer sees, and where an error surfaces, is what a serial read gives. Every request, listing
pages included, goes through `storage.http.HttpClient`: timeouts, retries, rate-limit waits and
the shared limiter are the same for the reader threads and for the workers' ranged reads. The
listing is paged here (`Link: rel="next"`) because `HfApi.list_models` takes no timeout and
retries on its own terms; the JSON is decoded into huggingface_hub's own `ModelInfo`, as `HfApi`
does.
"""

from __future__ import annotations

import contextvars
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar
from urllib.parse import quote

from huggingface_hub import ModelCardData, ModelInfo, constants, get_token, hf_hub_url
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from probex_core.settings import ENV_HUB_FILE_SIZES, env_flag
from storage.http import HttpClient, RetryPolicy
from storage.records import ModelRecord, RepoFile
from storage.safetensors_reader import HttpFile, TensorReadError
from storage.sources import parse
from storage.sources.base import RepoOpener, Source, SourceError, as_utc, in_window
from storage.sources.parse import CARD_FILE, CONFIG_FILE, MAX_CARD_BYTES, MAX_CONFIG_BYTES, Problems, Status

__all__ = ["HubOpener", "HubSource", "RetryPolicy", "in_order"]

T, R = TypeVar("T"), TypeVar("R")

# What a record needs of the listing: the window check and the watermark need the time, files are
# pinned to the sha, and the rest is the record itself. With file_sizes, model info gives the rest.
LISTING_EXPAND = ["sha", "lastModified", "createdAt", "siblings", "cardData", "pipeline_tag", "library_name"]
LISTING_TIMES = ["sha", "lastModified", "createdAt"]
# Repos read at once while listing: a read (config.json; model info too with file_sizes) mostly
# waits on the network, so threads overlap the waits; every request still takes its slot from the
# shared limiter and keeps its timeouts, so more threads never mean more than the budget.
READ_WORKERS = 8


def in_order(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """`fn(item)` for each item, `workers` at a time, yielded in the items' order.

    At most 2 x workers items are taken ahead of the consumer (items is lazy: a listing page is
    asked for only when needed). An exception, from `fn` or from `items`, is raised where a
    serial loop would raise it, after every earlier result. Closing the iterator cancels what
    has not started and waits for what has (each request is bounded by its timeouts). Threads
    run in a copy of the caller's context, so `storage.http.counting()` sees their requests."""
    if workers <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="hub-read")
    pending: deque[Future[R]] = deque()
    failure: BaseException | None = None
    try:
        source = iter(items)
        while True:
            try:
                item = next(source)
            except StopIteration:
                break
            except Exception as err:  # a listing page failed: first the results before it
                failure = err
                break
            pending.append(pool.submit(contextvars.copy_context().run, fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
        if failure is not None:
            raise failure
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True)


@dataclass(frozen=True)
class HubOpener(RepoOpener):
    """A repo's files at `sha` on a Hub endpoint, read by HTTP Range through the one HTTP layer."""

    endpoint: str
    token: str | None = field(default=None, repr=False)
    http: HttpClient = field(default_factory=HttpClient.from_settings)

    def url(self, filename: str) -> str:
        """The `resolve` URL pinned to the sha."""
        return hf_hub_url(self.repo_id, filename, revision=self.sha or None, endpoint=self.endpoint)

    def open(self, filename: str) -> HttpFile:
        return HttpFile(self.url(filename), token=self.token or False, http=self.http)


class HubSource(Source):
    """Models of a Hub endpoint, newest first.

    endpoint: explicit, else `HF_ENDPOINT` read now (huggingface_hub reads it only at import).
    token: explicit, else `HF_TOKEN` / the saved login (`huggingface_hub.get_token`).
    http: timeouts and retries; default from the PROBEX_HTTP_* settings.
    workers: listed repos read at once (1: one after another).
    file_sizes: read each listed repo's model info for its files' sizes (one API call per repo);
        default PROBEX_HUB_FILE_SIZES. Without it a listed repo's files carry size -1 (unknown).
    """

    scheme = "hub"

    def __init__(self, endpoint: str | None = None, token: str | None = None, *, http: HttpClient | None = None,
                 workers: int = READ_WORKERS, file_sizes: bool | None = None):
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        self.auth_token = token if token is not None else get_token()
        self.http = http if http is not None else HttpClient.from_settings()
        self.workers = workers
        self.file_sizes = env_flag(ENV_HUB_FILE_SIZES) if file_sizes is None else file_sizes
        self.name = f"{self.scheme}:{self.endpoint}"

    @classmethod
    def from_spec(cls, where: str) -> HubSource:
        return cls(endpoint=where or None)

    def opener(self, repo_id: str, sha: str) -> HubOpener:
        return HubOpener(repo_id, sha, self.endpoint, self.auth_token, self.http)

    def _get(self, url: str, **kw):
        return self.http.request("GET", url, token=self.auth_token or False, **kw)

    # -- listing --------------------------------------------------------------------------
    def _listing(self) -> Iterator[ModelInfo]:
        """Every model, newest first; a page is asked for only when the previous one is used up."""
        url: str | None = f"{self.endpoint}/api/models"
        expand = LISTING_TIMES if self.file_sizes else LISTING_EXPAND
        params: dict | None = {"sort": "lastModified", "direction": "-1", "expand": expand}
        while url is not None:
            try:
                resp = self._get(url, params=params)
            except HfHubHTTPError as err:  # not retryable: a bad token, a wrong endpoint
                raise SourceError(
                    f"listing models at {self.endpoint} answered HTTP {_status(err)}: "
                    f"{' '.join(str(err).split())[:300]}; check HF_TOKEN and HF_ENDPOINT"
                ) from err
            try:
                page = resp.json()
            except ValueError:
                page = None
            if not isinstance(page, list):
                raise SourceError(f"listing models at {self.endpoint} did not answer a JSON list; "
                                  "is it a Hub-compatible endpoint (check HF_ENDPOINT)?")
            for item in page:
                if not self.file_sizes and isinstance(item, dict) and "siblings" not in item:
                    raise SourceError(f"{self.endpoint} listed {item.get('id')!r} without its files; it is not a "
                                      "Hub-compatible endpoint (expand=siblings unsupported)")
                item.setdefault("siblings", None)
                yield ModelInfo(**item)
            url, params = resp.links.get("next", {}).get("url"), None  # the next link carries the query

    def list_models(self, since=None, until=None, limit=None) -> Iterator[ModelRecord]:
        listed = self._window(as_utc(since), as_utc(until), limit)
        yield from in_order(self._listed_record, listed, self.workers)

    def _window(self, since, until, limit) -> Iterator[ModelInfo]:
        """The listed models inside the window, at most `limit`, newest first."""
        count = 0
        # No `limit` to the API: ours counts records inside the window, not listed models.
        listing = self._listing()
        while limit is None or count < limit:
            info = next(listing, None)
            if info is None:
                return
            if info.last_modified is None:
                raise SourceError(
                    f"{self.endpoint} listed {info.id!r} without lastModified; it is not a "
                    "Hub-compatible endpoint (expand=lastModified unsupported)"
                )
            inside, past = in_window(info.last_modified, since, until)
            if past:  # sorted newest first: nothing older can be inside; stop paging
                return
            if inside:
                count += 1
                yield info

    def _listed_record(self, info: ModelInfo) -> ModelRecord:
        listed = None if self.file_sizes else info  # else the listing is the model info
        return self._read(info.id, info.sha or "", info.created_at, info.last_modified, from_info=False,
                          listed=listed)

    # -- one repo ---------------------------------------------------------------------------
    def model_info(self, repo_id: str, sha: str | None = None) -> ModelRecord:
        """One repo read afresh; its sha (when not given) and times come from its model info.

        The record carries the repo's own id as the Hub answers it: the Hub resolves ids in any
        case (and a renamed repo's old name), so a parent that a card names `org/name` is recorded
        as the `Org/Name` it is."""
        return self._read(repo_id, sha or "", None, None, from_info=True)

    def record(
        self, repo_id: str, sha: str, created_at: datetime | None, last_modified: datetime | None
    ) -> ModelRecord:
        """The record of one listed repo at `sha`; per-repo failures become statuses."""
        return self._read(repo_id, sha, created_at, last_modified, from_info=False)

    def _read(self, repo_id, sha, created_at, last_modified, *, from_info: bool,
              listed: ModelInfo | None = None) -> ModelRecord:
        """The record from `listed` (a listing item with its files and card), else from the
        repo's model info; a repo gone since it was listed (its info or its files answer 404) is
        a `not_found` record."""
        if problem := parse.repo_id_problem(repo_id):
            return parse.bare_record(repo_id, sha, created_at, last_modified, Status.BAD_REPO_ID, problem)
        try:
            try:
                info = listed if listed is not None else self._info(repo_id, sha)
                if from_info:
                    sha, created_at, last_modified = info.sha or sha, info.created_at, info.last_modified
                    if info.id and not parse.repo_id_problem(info.id):
                        repo_id = info.id
                return self._assemble(repo_id, sha, created_at, last_modified, info)
            except GatedRepoError:  # only model info raises it: a file GET records its own
                return parse.bare_record(
                    repo_id, sha, created_at, last_modified, Status.GATED,
                    "gated repo: accept its licence on the Hub and crawl with a token (HF_TOKEN) that has access",
                )
            except HfHubHTTPError as err:
                if not _gone(err):
                    raise
                return parse.bare_record(
                    repo_id, sha, created_at, last_modified, Status.NOT_FOUND,
                    f"listed, but its details returned HTTP {_status(err)}: deleted, made private or rewritten "
                    "since the listing; the next crawl retries it",
                )
        except HfHubHTTPError as err:  # not retryable, not one repo's 404: e.g. a bad token
            raise SourceError(
                f"{self.endpoint} answered HTTP {_status(err)} for {repo_id!r}: "
                f"{' '.join(str(err).split())[:300]}; check HF_TOKEN and HF_ENDPOINT"
            ) from err

    def _info(self, repo_id: str, sha: str) -> ModelInfo:
        """GET /api/models/{repo}[/revision/{sha}]?blobs=true: what `HfApi.model_info(...,
        files_metadata=True)` asks, through the one HTTP layer."""
        url = f"{self.endpoint}/api/models/{repo_id}"
        if sha:
            url += f"/revision/{quote(sha, safe='')}"
        data = self.http.get_json(url, token=self.auth_token or False, params={"blobs": "true"})
        if not isinstance(data, dict):
            raise SourceError(f"{url} did not answer a JSON object; is {self.endpoint} a Hub-compatible endpoint?")
        return ModelInfo(**data)

    def _assemble(self, repo_id, sha, created_at, last_modified, info: ModelInfo) -> ModelRecord:
        sizes = {s.rfilename: s.size for s in info.siblings or []}
        problems = Problems()
        card_data, card_problem = self._card(repo_id, sha, info.card_data, sizes)
        if card_problem:
            problems.add(Status.BAD_CARD, card_problem)
        card = parse.card_fields(card_data, problems)
        # The Hub infers these when a card omits them; a folder has no such inference.
        card.pipeline_tag = card.pipeline_tag or info.pipeline_tag
        card.library_name = card.library_name or info.library_name
        id2label = None
        if CONFIG_FILE not in sizes:
            parse.no_config(problems)
        elif not parse.config_too_large(sizes[CONFIG_FILE] or 0, problems):
            raw = self._get_listed_file(repo_id, sha, CONFIG_FILE, problems, Status.BAD_CONFIG, MAX_CONFIG_BYTES,
                                        lambda size: parse.config_too_large(size, problems))
            if raw is not None:
                id2label = parse.config_labels(raw, problems)
        return parse.assemble(
            repo_id=repo_id,
            sha=sha,
            created_at=created_at,
            last_modified=last_modified,
            # -1: not known (the listing gives no sizes; model info with blobs=true does)
            files=[RepoFile(name, -1 if size is None else size) for name, size in sizes.items()],
            card=card,
            id2label=id2label,
            problems=problems,
        )

    def _card(self, repo_id, sha, card_data, sizes) -> tuple[ModelCardData, str | None]:
        if isinstance(card_data, ModelCardData):
            return card_data, None
        if CARD_FILE not in sizes:
            return ModelCardData(), None
        if problem := parse.card_too_large(sizes[CARD_FILE] or 0):
            return ModelCardData(), problem
        problems = Problems()
        raw = self._get_listed_file(repo_id, sha, CARD_FILE, problems, Status.BAD_CARD, MAX_CARD_BYTES,
                                    lambda size: problems.add(Status.BAD_CARD, parse.card_too_large(size)))
        if raw is None:
            return ModelCardData(), problems.reason
        return parse.card_from_bytes(raw)

    def _get_listed_file(self, repo_id, sha, filename, problems: Problems, status: str, limit: int,
                         too_large: Callable[[int], object]) -> bytes | None:
        """A file the repo lists, read by one ranged GET of at most `limit` + 1 bytes: a larger
        file is refused (`too_large(its size)`) having sent no more than that. A 404 for the file
        is that repo's problem, not the run's; the repo itself gone raises (a `not_found` record)."""
        src = self.opener(repo_id, sha).open(filename)
        try:
            raw = src.read(0, limit + 1)
            if len(raw) > limit:
                too_large(src.size())  # known from the answer's Content-Range: no second request
                return None
            return raw
        except GatedRepoError:
            # Model info (lineage, files) is public for a gated repo; only its files need access.
            problems.add(Status.GATED, f"{filename} is gated: accept the repo's licence on the Hub and crawl "
                         "with a token (HF_TOKEN) that has access")
            return None
        except (RepositoryNotFoundError, RevisionNotFoundError):
            raise
        except HfHubHTTPError as err:
            if not _gone(err):
                raise
            problems.add(status, f"{filename} is listed but returned HTTP {_status(err)}; the next crawl retries it")
            return None
        except TensorReadError as err:  # the endpoint answered the range wrongly
            problems.add(status, f"{filename} unreadable: {err}")
            return None


def _status(err: HfHubHTTPError) -> int | None:
    return err.response.status_code if err.response is not None else None


def _gone(err: HfHubHTTPError) -> bool:
    """404-like: this repo (or revision, or file) is not there for us; other repos may be fine."""
    return isinstance(err, (RepositoryNotFoundError, RevisionNotFoundError)) or _status(err) in (404, 410)
