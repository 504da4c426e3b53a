"""A new kind of source is one class in one file: it registers itself, `open_source` names it, the
crawler lists it and the extractor reads its weights through its picklable opener."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from safetensors.numpy import save

import storage.sources
from storage.catalog import MODELS, Catalog
from storage.extract import ExtractJob, extract_model, header_shapes
from storage.records import ModelRecord, RepoFile
from storage.safetensors_reader import ByteSource
from storage.shards import has_shard
from storage.sources import RepoOpener, Source, SourceError, Status, open_source, registered
from tasks.crawl import crawl_source

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
SHA = "0" * 40


def weights(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return save({"layer.weight": rng.standard_normal((8, 6)).astype(np.float32),
                 "layer.bias": np.zeros(8, np.float32)})


# Stores by name: what "memory:<name>" serves. Each repo: (base_model, {filename: bytes}).
STORES: dict[str, dict[str, tuple[list[str], dict[str, bytes]]]] = {
    "zoo": {
        "base/root": ([], {"model.safetensors": weights(0)}),
        "org/child": (["base/root"], {"model.safetensors": weights(1)}),
    },
}


class BytesFile(ByteSource):
    def __init__(self, name: str, data: bytes):
        self.name, self._data, self.bytes_read = name, data, 0

    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, length: int) -> bytes:
        out = self._data[offset:offset + length]
        self.bytes_read += len(out)
        return out


@dataclass(frozen=True)
class MemoryOpener(RepoOpener):
    files: tuple[tuple[str, bytes], ...]  # carried along: a worker has no access to the store

    def open(self, filename: str) -> BytesFile:
        files = dict(self.files)
        if filename not in files:
            raise FileNotFoundError(f"{self.repo_id} has no {filename}")
        return BytesFile(f"memory:{self.repo_id}/{filename}", files[filename])


class MemorySource(Source):
    """Repos served from a dict: the whole of what a new source must write."""

    scheme = "memory"

    def __init__(self, store: str):
        if store not in STORES:
            raise SourceError(f"no memory store {store!r}")
        self.repos = STORES[store]
        self.name = f"{self.scheme}:{store}"

    @classmethod
    def from_spec(cls, where: str) -> MemorySource:
        return cls(where)

    def _record(self, i: int, repo_id: str) -> ModelRecord:
        parents, files = self.repos[repo_id]
        moment = T0 + timedelta(days=i)
        return ModelRecord(repo_id, SHA, moment, moment, base_model=list(parents),
                           base_model_relation="finetune" if parents else None,
                           files=[RepoFile(f, len(b)) for f, b in files.items()])

    def list_models(self, since=None, until=None, limit=None):
        records = [self._record(i, r) for i, r in enumerate(self.repos)]
        records.sort(key=lambda r: r.last_modified, reverse=True)
        inside = [r for r in records if (since is None or r.last_modified >= since)
                  and (until is None or r.last_modified < until)]
        return iter(inside[:limit])

    def model_info(self, repo_id, sha=None):
        if repo_id not in self.repos:
            return ModelRecord(repo_id, sha or "", status=Status.NOT_FOUND, reason="not in the store")
        return self._record(list(self.repos).index(repo_id), repo_id)

    def opener(self, repo_id, sha):
        return MemoryOpener(repo_id, sha, tuple(self.repos[repo_id][1].items()))


def test_a_source_class_registers_its_scheme():
    assert registered()["memory"] is MemorySource
    src = open_source("memory:zoo")
    assert isinstance(src, MemorySource) and src.spec == src.name == "memory:zoo"
    assert open_source(src.spec).spec == src.spec
    with pytest.raises(TypeError, match="taken by"):
        type("Other", (MemorySource,), {"scheme": "memory", "__module__": "elsewhere"})


def test_it_is_crawled_and_its_opener_reads_on_a_worker(tmp_path):
    src = open_source("memory:zoo")
    cat = Catalog(str(tmp_path / "cat"))
    summary = crawl_source(src, cat)
    rows = {r["repo_id"]: r for r in cat.read(MODELS).to_pylist()}
    assert summary.new == 2 and rows["org/child"]["tree_id"] == "base/root"
    assert rows["org/child"]["source"] == "memory:zoo"
    assert cat.watermark("memory:zoo") == T0 + timedelta(days=1)

    opener = pickle.loads(pickle.dumps(open_source(rows["org/child"]["source"]).opener("org/child", SHA)))
    shapes, _ = header_shapes(opener, ("model.safetensors",))
    assert shapes["layer.weight"] == (8, 6)
    job = ExtractJob(opener, "base/root", ("model.safetensors",), ("layer.weight",), str(tmp_path / "shards"))
    res = extract_model(pickle.loads(pickle.dumps(job)))  # what Dask does with a job
    assert res.status == "ok" and res.tensors == 1
    assert has_shard(tmp_path / "shards", "base/root", "layer.weight", "org/child", SHA)
    assert src.model_info("org/child") == next(r for r in src.list_models() if r.repo_id == "org/child")


PLUGIN = '''
from storage.sources.base import Source


class EchoSource(Source):
    scheme = "echo"

    def __init__(self, where):
        self.name = f"echo:{where}"

    @classmethod
    def from_spec(cls, where):
        return cls(where)

    def list_models(self, since=None, until=None, limit=None):
        return iter(())

    def model_info(self, repo_id, sha=None):
        raise NotImplementedError

    def opener(self, repo_id, sha):
        raise NotImplementedError
'''


def test_a_module_dropped_into_the_package_is_loaded(tmp_path, monkeypatch):
    (tmp_path / "echo_source.py").write_text(PLUGIN)
    monkeypatch.setattr(storage.sources, "__path__", [*storage.sources.__path__, str(tmp_path)])
    with pytest.raises(SourceError, match="no source is registered for 'echo'"):
        open_source("echo:hello")
    storage.sources.load_modules()  # what importing the package does with its own folder
    assert open_source("echo:hello").spec == "echo:hello"
