"""The Hugging Face Hub (or any Hub-compatible endpoint: a mirror, the test server).

Requests per crawled model: one `model_info(revision=sha, files_metadata=True)` (the listing has no
file sizes), one GET of config.json (the API's `config` field is a trimmed copy without id2label),
and a GET of README.md only when the API returned no cardData for a repo that has one (the Hub
drops unparseable front matter; reading it ourselves gives the same `bad_card` record as a folder).

Retries, made explicit because huggingface_hub 2.4 is not uniform here:
- listing pages go through huggingface_hub's `http_backoff`: on 408/429/5xx and network errors it
  retries up to 5 times, sleeping `Retry-After` + 1 s (or the `RateLimit` reset + 1 s when
  `r=0`), else 1, 2, 4, 8, 8 s; then it raises, and we raise `SourceError`;
- `model_info` and file GETs are NOT retried by huggingface_hub; `RetryPolicy` does it here with
  the same status codes, honouring Retry-After / RateLimit, and refusing (RateLimited) to sleep
  longer than `max_wait_s` rather than hammering or hanging.
"""

from __future__ import annotations

import email.utils
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

import httpx2
from huggingface_hub import HfApi, ModelCardData, constants, get_token, hf_hub_url
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status, parse_ratelimit_headers

from storage.records import ModelRecord, RepoFile
from storage.sources import parse
from storage.sources.base import RateLimited, Source, SourceError, as_utc, in_window
from storage.sources.parse import CARD_FILE, CONFIG_FILE, Problems, Status

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})  # the same set huggingface_hub retries
# sha, lastModified and createdAt are all the listing must give: the window check and the watermark
# need the time, and model_info is pinned to the sha. Everything else comes from model_info.
LISTING_EXPAND = ["sha", "lastModified", "createdAt"]


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 5
    base_wait_s: float = 1.0  # first back-off without a server hint; doubles each try; also the floor
    max_wait_s: float = 60.0  # a server asking for longer than this makes us stop, not sleep


def advised_wait(response: httpx2.Response | None) -> float | None:
    """Seconds the server asks us to wait: RateLimit reset (when exhausted), else Retry-After."""
    if response is None:
        return None
    info = parse_ratelimit_headers(response.headers)
    if response.status_code == 429 and info is not None and info.remaining == 0:
        return float(info.reset_in_seconds)
    value = (response.headers.get("Retry-After") or "").strip()
    if value.isdigit():
        return float(value)
    if value:  # the HTTP-date form, which huggingface_hub ignores
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())
    return None


class HubSource(Source):
    """Models of a Hub endpoint, newest first.

    endpoint: explicit, else `HF_ENDPOINT` read now (huggingface_hub reads it only at import).
    token: explicit, else `HF_TOKEN` / the saved login (`huggingface_hub.get_token`).
    """

    def __init__(
        self,
        endpoint: str | None = None,
        token: str | None = None,
        *,
        retry: RetryPolicy = RetryPolicy(),
        timeout_s: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        self.auth_token = token if token is not None else get_token()
        self.api = HfApi(endpoint=self.endpoint, token=self.auth_token or False)
        self.name = f"hub:{self.endpoint}"
        self.retry = retry
        self.timeout_s = timeout_s
        self._sleep = sleep

    # -- listing --------------------------------------------------------------------------
    def list_models(self, since=None, until=None, limit=None) -> Iterator[ModelRecord]:
        since, until = as_utc(since), as_utc(until)
        count = 0
        # No `limit` to the API: ours counts records inside the window, not listed models.
        listing = iter(self.api.list_models(sort="last_modified", expand=LISTING_EXPAND))
        while limit is None or count < limit:
            try:
                info = next(listing, None)
            except (HfHubHTTPError, httpx2.TransportError) as err:
                raise SourceError(
                    f"listing models at {self.endpoint} failed after huggingface_hub's retries: "
                    f"{' '.join(str(err).split())[:300]}; rerun later (the watermark has not moved)"
                ) from err
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
                try:
                    record = self.record(info.id, info.sha or "", info.created_at, info.last_modified)
                except HfHubHTTPError as err:  # not retryable, not one repo's 404: e.g. a bad token
                    raise SourceError(
                        f"{self.endpoint} answered HTTP {_status(err)} for {info.id!r}: "
                        f"{' '.join(str(err).split())[:300]}; check HF_TOKEN and HF_ENDPOINT"
                    ) from err
                yield record

    def record(
        self, repo_id: str, sha: str, created_at: datetime | None, last_modified: datetime | None
    ) -> ModelRecord:
        """The record of one listed repo at `sha`; per-repo failures become statuses."""
        if problem := parse.repo_id_problem(repo_id):
            return parse.bare_record(repo_id, sha, created_at, last_modified, Status.BAD_REPO_ID, problem)
        try:
            info = self._retrying(
                lambda: self.api.model_info(repo_id, revision=sha or None, files_metadata=True, timeout=self.timeout_s)
            )
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
            # -1: the endpoint did not report a size (the Hub always does with files_metadata=True)
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
            return self._get_file(repo_id, sha, filename)
        except HfHubHTTPError as err:
            if not _gone(err):
                raise
            problems.add(status, f"{filename} is listed but returned HTTP {_status(err)}; the next crawl retries it")
            return None

    # -- files ----------------------------------------------------------------------------
    def file_url_or_path(self, repo_id: str, sha: str, filename: str) -> str:
        """The `resolve` URL pinned to `sha`; open it with HttpFile(url, token=source.auth_token)."""
        return hf_hub_url(repo_id, filename, revision=sha or None, endpoint=self.endpoint)

    def _get_file(self, repo_id: str, sha: str, filename: str) -> bytes:
        url = self.file_url_or_path(repo_id, sha, filename)
        headers = build_hf_headers(token=self.auth_token or False)

        def fetch() -> bytes:
            # follow_redirects: LFS files redirect to a CDN; httpx drops the token on other hosts.
            r = get_session().get(url, headers=headers, timeout=self.timeout_s, follow_redirects=True)
            hf_raise_for_status(r)
            return r.content

        return self._retrying(fetch)

    # -- retries --------------------------------------------------------------------------
    def _retrying(self, call: Callable[[], T]) -> T:
        policy = self.retry
        backoff = policy.base_wait_s
        for attempt in range(policy.max_retries + 1):
            try:
                return call()
            except HfHubHTTPError as err:
                status = err.response.status_code if err.response is not None else None
                if status not in RETRY_STATUS:
                    raise
                if attempt == policy.max_retries:
                    raise RateLimited(
                        f"{self.endpoint} still answers HTTP {status} after {policy.max_retries} retries; "
                        "rerun later or lower the crawl rate"
                    ) from err
                hinted = advised_wait(err.response)
            except httpx2.TransportError as err:
                if attempt == policy.max_retries:
                    raise SourceError(
                        f"cannot reach {self.endpoint} ({err!r}) after {policy.max_retries} retries; "
                        "check the network or HF_ENDPOINT"
                    ) from err
                hinted = None
            wait = backoff if hinted is None else max(hinted, policy.base_wait_s)
            if wait > policy.max_wait_s:
                raise RateLimited(
                    f"{self.endpoint} asks us to wait {wait:.0f} s, over the {policy.max_wait_s:.0f} s limit; "
                    "rerun after that (the watermark has not moved)"
                )
            log.warning("Hub answered with a retryable error; waiting %.1f s (retry %d)", wait, attempt + 1)
            self._sleep(wait)
            backoff = min(backoff * 2, policy.max_wait_s)
        raise AssertionError("unreachable")


def _status(err: HfHubHTTPError) -> int | None:
    return err.response.status_code if err.response is not None else None


def _gone(err: HfHubHTTPError) -> bool:
    """404-like: this repo (or revision, or file) is not there for us; other repos may be fine."""
    return isinstance(err, (RepositoryNotFoundError, RevisionNotFoundError)) or _status(err) in (404, 410)
