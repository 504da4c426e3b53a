"""The Hugging Face Hub (or any Hub-compatible endpoint: a mirror, the test server).

Requests per crawled model: one model info at the listed sha with file sizes (the listing has
none), one GET of config.json (the API's `config` field is a trimmed copy without id2label), and a
GET of README.md only when the API returned no cardData for a repo that has one (the Hub drops
unparseable front matter; reading it ourselves gives the same `bad_card` record as a folder).

Every request, listing pages included, goes through `storage.http.HttpClient`: timeouts, retries
and rate-limit waits are the same for the crawler and for the workers' ranged reads. The listing
is paged here (`Link: rel="next"`) because `HfApi.list_models` takes no timeout and retries on its
own terms; the JSON is decoded into huggingface_hub's own `ModelInfo`, as `HfApi` does.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import quote

from huggingface_hub import ModelCardData, ModelInfo, constants, get_token, hf_hub_url
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from storage.http import HttpClient, RetryPolicy
from storage.records import ModelRecord, RepoFile
from storage.safetensors_reader import HttpFile
from storage.sources import parse
from storage.sources.base import RepoOpener, Source, SourceError, as_utc, in_window
from storage.sources.parse import CARD_FILE, CONFIG_FILE, Problems, Status

__all__ = ["HubOpener", "HubSource", "RetryPolicy"]

# sha, lastModified and createdAt are all the listing must give: the window check and the watermark
# need the time, and model info is pinned to the sha. Everything else comes from model info.
LISTING_EXPAND = ["sha", "lastModified", "createdAt"]


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
    """

    scheme = "hub"

    def __init__(self, endpoint: str | None = None, token: str | None = None, *, http: HttpClient | None = None):
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        self.auth_token = token if token is not None else get_token()
        self.http = http if http is not None else HttpClient.from_settings()
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
        params: dict | None = {"sort": "lastModified", "direction": "-1", "expand": LISTING_EXPAND}
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
                item.setdefault("siblings", None)
                yield ModelInfo(**item)
            url, params = resp.links.get("next", {}).get("url"), None  # the next link carries the query

    def list_models(self, since=None, until=None, limit=None) -> Iterator[ModelRecord]:
        since, until = as_utc(since), as_utc(until)
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
                yield self.record(info.id, info.sha or "", info.created_at, info.last_modified)

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

    def _read(self, repo_id, sha, created_at, last_modified, *, from_info: bool) -> ModelRecord:
        if problem := parse.repo_id_problem(repo_id):
            return parse.bare_record(repo_id, sha, created_at, last_modified, Status.BAD_REPO_ID, problem)
        try:
            try:
                info = self._info(repo_id, sha)
            except GatedRepoError:
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
            if from_info:
                sha, created_at, last_modified = info.sha or sha, info.created_at, info.last_modified
                if info.id and not parse.repo_id_problem(info.id):
                    repo_id = info.id
            return self._assemble(repo_id, sha, created_at, last_modified, info)
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
            raw = self._get_listed_file(repo_id, sha, CONFIG_FILE, problems, Status.BAD_CONFIG)
            if raw is not None:
                id2label = parse.config_labels(raw, problems)
        return parse.assemble(
            repo_id=repo_id,
            sha=sha,
            created_at=created_at,
            last_modified=last_modified,
            # -1: the endpoint did not report a size (the Hub always does with blobs=true)
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
        raw = self._get_listed_file(repo_id, sha, CARD_FILE, problems, Status.BAD_CARD)
        if raw is None:
            return ModelCardData(), problems.reason
        return parse.card_from_bytes(raw)

    def _get_listed_file(self, repo_id, sha, filename, problems: Problems, status: str) -> bytes | None:
        """A file the repo lists; a 404 for it is that repo's problem, not the run's."""
        try:
            return self._get(self.opener(repo_id, sha).url(filename)).content
        except GatedRepoError:
            # Model info (lineage, files) is public for a gated repo; only its files need access.
            problems.add(Status.GATED, f"{filename} is gated: accept the repo's licence on the Hub and crawl "
                         "with a token (HF_TOKEN) that has access")
            return None
        except HfHubHTTPError as err:
            if not _gone(err):
                raise
            problems.add(status, f"{filename} is listed but returned HTTP {_status(err)}; the next crawl retries it")
            return None


def _status(err: HfHubHTTPError) -> int | None:
    return err.response.status_code if err.response is not None else None


def _gone(err: HfHubHTTPError) -> bool:
    """404-like: this repo (or revision, or file) is not there for us; other repos may be fine."""
    return isinstance(err, (RepositoryNotFoundError, RevisionNotFoundError)) or _status(err) in (404, 410)
