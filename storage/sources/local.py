"""A folder laid out like the Hub (`<org>/<name>/` repos): the bundled lake or a company mirror."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from huggingface_hub import ModelCardData

from storage.records import ModelRecord, RepoFile
from storage.safetensors_reader import LocalFile
from storage.sources import parse
from storage.sources.base import RepoOpener, Source, SourceError, as_utc, in_window
from storage.sources.parse import CARD_FILE, CONFIG_FILE, Problems, Status

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _hidden(name: str) -> bool:
    # "_ground_truth.parquet", "_lake.json", ".git", ".cache" (hf local_dir metadata) are not repos/files
    return name.startswith(("_", "."))


def ms_time(mtime_ns: int) -> datetime:
    """UTC time truncated to milliseconds: the Hub's precision, so both sources agree exactly."""
    return _EPOCH + timedelta(milliseconds=mtime_ns // 1_000_000)


@dataclass(frozen=True)
class FileStat:
    path: str  # relative, "/"-separated
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class RepoSnapshot:
    """What a stat walk of one repo folder tells, without reading any file."""

    repo_id: str
    folder: Path
    files: tuple[FileStat, ...]
    sha: str
    created_at: datetime
    last_modified: datetime

    def file(self, path: str) -> FileStat | None:
        return next((f for f in self.files if f.path == path), None)


def _content_sha(files: tuple[FileStat, ...]) -> str:
    """A 40-hex id that changes whenever any file is added, removed, resized or rewritten.

    Hashes (path, size, mtime_ns), not contents: a crawl of a lake with gigabytes of weights then
    costs one stat per file instead of reading every byte, which is what makes a re-crawl cheap.
    Writing a file always moves its mtime, so a change is never missed; a `touch` without a change
    gives a new sha, which only costs a re-read. sha1 keeps the Hub's commit-sha shape.
    """
    digest = hashlib.sha1()
    for f in files:
        digest.update(f"{f.path}\0{f.size}\0{f.mtime_ns}\n".encode())
    return digest.hexdigest()


def snapshot_folder(repo_id: str, folder: Path) -> RepoSnapshot:
    stats: list[FileStat] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        rel_dir = Path(dirpath).relative_to(folder)
        for name in filenames:
            if _hidden(name):
                continue
            try:
                st = (Path(dirpath) / name).stat()  # follows symlinks: hf cache-style mirrors work
            except OSError:
                continue  # a dangling symlink or a file removed mid-walk is not part of the repo
            stats.append(FileStat((rel_dir / name).as_posix(), st.st_size, st.st_mtime_ns))
    files = tuple(sorted(stats, key=lambda f: f.path))
    if files:
        first, last = min(f.mtime_ns for f in files), max(f.mtime_ns for f in files)
    else:  # an empty repo still has a time: its folder's
        first = last = folder.stat().st_mtime_ns
    return RepoSnapshot(repo_id, folder, files, _content_sha(files), ms_time(first), ms_time(last))


@dataclass(frozen=True)
class LocalOpener(RepoOpener):
    """A repo folder's files, read with seek/read. A folder keeps no history: if the repo changed
    since it was listed (its sha differs), the files are the current bytes; compare shas to notice."""

    folder: str

    def open(self, filename: str) -> LocalFile:
        path = os.path.normpath(os.path.join(self.folder, filename))
        if os.path.isabs(filename) or not path.startswith(os.path.join(self.folder, "")):
            # FileNotFoundError, as for any missing file: the caller quarantines the model
            raise FileNotFoundError(f"{filename!r} is not a file inside repo {self.repo_id!r}")
        return LocalFile(path)


class LocalSource(Source):
    """Repos under `root/<org>/<name>/`; names starting with `_` or `.` are skipped.

    sha: `_content_sha`. created_at / last_modified: oldest / newest file mtime (ms precision).
    """

    scheme = "local"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise SourceError(
                f"lake folder {self.root} does not exist or is not a folder; "
                "build one with `probex zoo build --out DIR` or pass the right path"
            )
        self.name = f"{self.scheme}:{self.root}"

    @classmethod
    def from_spec(cls, where: str) -> LocalSource:
        if not where:
            raise SourceError("`local` needs a folder: give `local:/path/to/lake` or just the path")
        return cls(where)

    def opener(self, repo_id: str, sha: str) -> LocalOpener:
        return LocalOpener(repo_id, sha, str(self.root / repo_id))

    # -- discovery ------------------------------------------------------------------------
    def _repo_folders(self) -> Iterator[tuple[str, Path]]:
        for org in sorted(self.root.iterdir()):
            if _hidden(org.name) or not org.is_dir():
                continue
            for repo in sorted(org.iterdir()):
                if not _hidden(repo.name) and repo.is_dir():
                    yield f"{org.name}/{repo.name}", repo

    def snapshots(self) -> list[RepoSnapshot]:
        """Every repo, newest first (ties: repo id descending, the order the test server uses)."""
        snaps = [snapshot_folder(repo_id, folder) for repo_id, folder in self._repo_folders()]
        snaps.sort(key=lambda s: (s.last_modified, s.repo_id), reverse=True)
        return snaps

    def snapshot(self, repo_id: str) -> RepoSnapshot | None:
        """One repo by id, or None. Only ids that name an existing `org/name` folder resolve."""
        parts = repo_id.split("/")
        if len(parts) != 2 or any(not p or _hidden(p) or p in (".", "..") for p in parts):
            return None
        folder = self.root / parts[0] / parts[1]
        if not folder.is_dir():  # parts hold no "/" or "..": the path stays under root
            return None
        return snapshot_folder(repo_id, folder)

    # -- records --------------------------------------------------------------------------
    def list_models(self, since=None, until=None, limit=None) -> Iterator[ModelRecord]:
        since, until = as_utc(since), as_utc(until)
        count = 0
        # Stat everything first (cheap), parse cards only for what is yielded.
        for snap in self.snapshots():
            inside, past = in_window(snap.last_modified, since, until)
            if past:
                return
            if not inside:
                continue
            if limit is not None and count >= limit:
                return
            count += 1
            yield self.record(snap)

    def record(self, snap: RepoSnapshot) -> ModelRecord:
        if problem := parse.repo_id_problem(snap.repo_id):
            return parse.bare_record(
                snap.repo_id, snap.sha, snap.created_at, snap.last_modified, Status.BAD_REPO_ID, problem
            )
        problems = Problems()
        card_data, card_problem = read_card(snap)
        if card_problem:
            problems.add(Status.BAD_CARD, card_problem)
        card = parse.card_fields(card_data, problems)
        id2label = None
        config = snap.file(CONFIG_FILE)
        if config is None:
            parse.no_config(problems)
        elif not parse.config_too_large(config.size, problems):
            id2label = parse.config_labels((snap.folder / CONFIG_FILE).read_bytes(), problems)
        return parse.assemble(
            repo_id=snap.repo_id,
            sha=snap.sha,
            created_at=snap.created_at,
            last_modified=snap.last_modified,
            files=[RepoFile(f.path, f.size) for f in snap.files],
            card=card,
            id2label=id2label,
            problems=problems,
        )

    def model_info(self, repo_id: str, sha: str | None = None) -> ModelRecord:
        """The repo as it is now (a folder has one revision: `sha` is not looked up)."""
        snap = self.snapshot(repo_id)
        if snap is None:
            return parse.bare_record(repo_id, sha or "", None, None, Status.NOT_FOUND,
                                     f"no repo folder {repo_id!r} under {self.root}: removed since the crawl?")
        return self.record(snap)


def read_card(snap: RepoSnapshot) -> tuple[ModelCardData, str | None]:
    """(ModelCardData, problem) for a repo's README.md; an absent card is an empty one."""
    card = snap.file(CARD_FILE)
    if card is None:
        return ModelCardData(), None
    if problem := parse.card_too_large(card.size):
        return ModelCardData(), problem  # refused without reading it
    return parse.card_from_bytes((snap.folder / CARD_FILE).read_bytes())
