"""LocalSource: the record of every kind of repo, ordering, windows, sha, and bounded card parsing."""

from __future__ import annotations

import os
import pickle
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from minilake import T0, build_lake, card, write_repo

from storage.records import RepoFile
from storage.sources import LocalSource, SourceError, Status, open_source
from storage.sources.local import ms_time


@pytest.fixture
def lake(tmp_path) -> Path:
    return build_lake(tmp_path / "lake")


def by_id(source) -> dict:
    return {r.repo_id: r for r in source.list_models()}


def test_good_repos_carry_card_config_and_files(lake):
    recs = by_id(LocalSource(lake))
    root = recs["base/root-model"]
    assert root.status == Status.OK and root.reason is None
    assert (root.license, root.library_name, root.pipeline_tag) == ("mit", "transformers", "image-classification")
    assert root.tags == ["vision"] and root.base_model == []
    assert root.id2label == {"0": "cat", "1": "dog"}
    assert [f.path for f in root.files] == ["README.md", "config.json", "model.safetensors"]
    assert root.files[2].size == (lake / "base/root-model/model.safetensors").stat().st_size

    ft = recs["org/child-ft"]
    assert (ft.base_model, ft.base_model_relation) == (["base/root-model"], "finetune")
    assert ft.datasets == ["fashion_mnist"] and ft.tags == ["a", "b"] and ft.license == "apache-2.0"
    lora = recs["org/child-lora"]
    assert (lora.base_model, lora.base_model_relation, lora.library_name) == (["base/root-model"], "adapter", "peft")
    assert "adapter_config.json" in [f.path for f in lora.files]
    assert recs["org/merge"].base_model == ["org/child-ft", "elsewhere/not-crawled"]
    assert recs["org/nested"].tags == ["t"]  # a single tag string becomes a list
    assert RepoFile("onnx/model.onnx", 10) in recs["org/nested"].files
    assert recs["org/undeclared"].status == Status.OK and recs["org/undeclared"].base_model == []


@pytest.mark.parametrize(
    "repo_id, status, words",
    [
        ("org/bad-yaml", Status.BAD_CARD, "front matter unreadable"),
        ("org/alias", Status.BAD_CARD, "anchors/aliases"),
        ("org/bad-base", Status.BAD_CARD, "base_model must be a repo id or a list"),
        ("org/huge-card", Status.BAD_CARD, "over the 1048576 byte limit"),
        ("org/no-config", Status.NO_CONFIG, "no config.json"),
        ("org/bad-config", Status.BAD_CONFIG, "config.json is not valid JSON"),
        ("org/we..ird", Status.BAD_REPO_ID, "invalid repo id"),
    ],
)
def test_bad_repos_are_recorded_with_status_and_reason(lake, repo_id, status, words):
    rec = by_id(LocalSource(lake))[repo_id]
    assert rec.status == status
    assert words in rec.reason
    assert str(lake) not in rec.reason  # reasons do not depend on where the lake lives


def test_bad_card_keeps_what_is_readable(lake):
    no_config = by_id(LocalSource(lake))["org/no-config"]
    assert no_config.base_model == ["base/root-model"]  # lineage still usable without labels
    bad_base = by_id(LocalSource(lake))["org/bad-base"]
    assert bad_base.base_model == [] and bad_base.id2label is None


def test_bad_repo_id_is_not_read(lake):
    rec = by_id(LocalSource(lake))["org/we..ird"]
    assert rec.files == [] and rec.license is None and rec.sha  # listed, nothing read


def test_skips_underscore_and_dot_names(lake):
    ids = set(by_id(LocalSource(lake)))
    assert len(ids) == 15
    assert not any(part.startswith(("_", ".")) for i in ids for part in i.split("/"))


def test_newest_first_with_millisecond_utc_times(lake):
    recs = list(LocalSource(lake).list_models())
    times = [r.last_modified for r in recs]
    assert times == sorted(times, reverse=True)
    assert recs[0].repo_id == "org/we..ird" and recs[-1].repo_id == "base/root-model"
    assert recs[-1].last_modified == datetime.fromtimestamp(T0, timezone.utc) + timedelta(milliseconds=123)
    assert recs[-1].created_at == recs[-1].last_modified


def test_created_is_oldest_file_modified_is_newest(tmp_path):
    folder = write_repo(tmp_path, "a/b", {"config.json": {}, "README.md": "x"}, t=T0)
    os.utime(folder / "README.md", ns=(0, (T0 + 5) * 10**9))
    (rec,) = LocalSource(tmp_path).list_models()
    assert rec.created_at == ms_time(T0 * 10**9 + 123_456_789)
    assert rec.last_modified == ms_time((T0 + 5) * 10**9)


def test_window_is_half_open_and_limit_counts_yielded(lake):
    src = LocalSource(lake)
    all_recs = list(src.list_models())
    pivot = all_recs[5].last_modified
    newer = list(src.list_models(since=pivot))
    older = list(src.list_models(until=pivot))
    assert [r.repo_id for r in newer] == [r.repo_id for r in all_recs[:6]]  # since is inclusive
    assert [r.repo_id for r in older] == [r.repo_id for r in all_recs[6:]]  # until is exclusive
    assert [r.repo_id for r in src.list_models(until=pivot, limit=2)] == [r.repo_id for r in all_recs[6:8]]
    naive = pivot.replace(tzinfo=None)  # naive datetimes are UTC
    assert len(list(src.list_models(since=naive))) == 6
    assert list(src.list_models(limit=0)) == []


def test_sha_changes_when_a_file_changes_and_only_then(tmp_path):
    folder = write_repo(tmp_path, "a/b", {"config.json": {"x": 1}, "README.md": card("license: mit")}, t=T0)
    src = LocalSource(tmp_path)
    sha0 = next(src.list_models()).sha
    assert len(sha0) == 40 and next(src.list_models()).sha == sha0  # stable
    (folder / "config.json").write_text('{"x": 2}')  # same size, new content, new mtime
    sha1 = next(src.list_models()).sha
    assert sha1 != sha0
    (folder / "weights.bin").write_bytes(b"1")
    sha2 = next(src.list_models()).sha
    assert sha2 not in (sha0, sha1)
    (folder / "weights.bin").unlink()
    assert next(src.list_models()).sha != sha2


def test_empty_repo_is_listed_without_config(tmp_path):
    (tmp_path / "a" / "empty").mkdir(parents=True)
    (rec,) = LocalSource(tmp_path).list_models()
    assert rec.status == Status.NO_CONFIG and rec.files == [] and rec.last_modified is not None


@pytest.mark.parametrize(
    "front, words",
    [
        ("base_model: [ok/one, 3]", "base_model must be"),
        ("base_model: ../../etc/passwd", "invalid repo ids"),
        ("base_model: /abs/path", "invalid repo ids"),
        ("base_model: a//b", "invalid repo ids"),
        ("- just\n- a list", "must be a YAML mapping"),
        ("base_model: " + "[" * 5000 + "]" * 5000, "front matter unreadable"),  # libyaml caps at 1000
        ("base_model: " + "[" * 100 + "]" * 100, "nests deeper than 64"),
        ("a:\n" + "".join(" " * i + "- b:\n" for i in range(0, 400, 2)), "nests deeper than 64"),
    ],
)
def test_hostile_cards_become_bad_card(tmp_path, front, words):
    write_repo(tmp_path, "a/b", {"README.md": card(front), "config.json": {}}, t=T0)
    (rec,) = LocalSource(tmp_path).list_models()
    assert rec.status == Status.BAD_CARD and words in rec.reason and rec.base_model == []


def test_billion_laughs_is_refused(tmp_path):
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 12)]
    write_repo(tmp_path, "a/b", {"README.md": card("\n".join(lines)), "config.json": {}}, t=T0)
    (rec,) = LocalSource(tmp_path).list_models()  # its parse cost: the benchmark's `micro` section
    assert rec.status == Status.BAD_CARD and "anchors/aliases" in rec.reason


def test_non_utf8_card_and_duplicate_parents(tmp_path):
    write_repo(tmp_path, "a/bin", {"README.md": b"---\nlicense: \xff\n---\n", "config.json": {}}, t=T0)
    write_repo(tmp_path, "a/dup", {"README.md": card("base_model: [x/p, x/p, x/q]"), "config.json": {}}, t=T0 + 1)
    recs = by_id(LocalSource(tmp_path))
    assert recs["a/bin"].status == Status.BAD_CARD and "UTF-8" in recs["a/bin"].reason
    assert recs["a/dup"].base_model == ["x/p", "x/q"]


def test_several_problems_all_named_first_decides_status(tmp_path):
    write_repo(tmp_path, "a/b", {"README.md": card("base_model: 7")}, t=T0)
    (rec,) = LocalSource(tmp_path).list_models()
    assert rec.status == Status.BAD_CARD
    assert "base_model must be" in rec.reason and "no config.json" in rec.reason


def test_opener_paths_and_errors(lake):
    src = LocalSource(lake)
    rec = by_id(src)["org/child-ft"]
    opener = src.opener(rec.repo_id, rec.sha)
    path = opener.open("model.safetensors").path
    assert Path(path).is_file() and Path(path).is_relative_to(lake)
    with pytest.raises(FileNotFoundError, match="not a file inside repo"):
        opener.open("../../etc/passwd")
    with pytest.raises(FileNotFoundError, match="not a file inside repo"):
        opener.open("/etc/passwd")
    assert src.name == src.spec == f"local:{lake.resolve()}"
    assert pickle.loads(pickle.dumps(opener)) == opener


def test_model_info_reads_one_repo(lake):
    src = LocalSource(lake)
    rec = by_id(src)["org/child-ft"]
    assert src.model_info("org/child-ft", rec.sha) == rec
    gone = src.model_info("org/nope")
    assert gone.status == Status.NOT_FOUND and "org/nope" in gone.reason


def test_missing_folder_says_what_to_do(tmp_path):
    with pytest.raises(SourceError, match="probex zoo build"):
        LocalSource(tmp_path / "nope")


def test_open_source_picks_by_spec(lake, monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert isinstance(open_source(str(lake)), LocalSource)
    assert open_source(f"local:{lake}").name == open_source(str(lake)).name == f"local:{lake.resolve()}"
    assert open_source("hub").name == "hub:https://huggingface.co"
    assert open_source("hub:http://127.0.0.1:9/").name == "hub:http://127.0.0.1:9"
    for src in (open_source(str(lake)), open_source("hub:http://127.0.0.1:9")):
        assert open_source(src.spec).spec == src.spec  # a stored name reopens the same source
    with pytest.raises(SourceError, match="no source is registered for 's3'.*hub, local"):
        open_source("s3://bucket/lake")
    with pytest.raises(SourceError, match="needs a folder"):
        open_source("local:")


def test_oversized_and_unusable_cards_are_refused(tmp_path):
    many_tags = "tags:\n" + "".join(f"- t{i}\n" for i in range(5000))  # de-dup is quadratic upstream
    write_repo(tmp_path, "a/tags", {"README.md": card(many_tags), "config.json": {}}, t=T0)
    write_repo(tmp_path, "a/keys", {"README.md": card("1: int key\nlicense: mit"), "config.json": {}}, t=T0 + 1)
    recs = by_id(LocalSource(tmp_path))
    assert recs["a/tags"].status == Status.BAD_CARD and "over the 1000 limit" in recs["a/tags"].reason
    assert recs["a/keys"].status == Status.BAD_CARD and "unusable" in recs["a/keys"].reason


# --- lineage as the Hub writes it ---------------------------------------------------------------


@pytest.mark.parametrize("front, parents", [
    ("base_model: org/base", ["org/base"]),
    ("base_model: [org/a, org/b]", ["org/a", "org/b"]),  # a merge
    ("base_model: https://huggingface.co/Org/Base/tree/main", ["Org/Base"]),  # the model page URL
    ("base_model: hf.co/org/base", ["org/base"]),
    ("base_model: ' org/base@0123abc '", ["org/base"]),  # a revision is not part of the id
    ("base_model: [Org/Base, org/base, ORG/BASE/]", ["Org/Base"]),  # one repo on the Hub: the first spelling
    ("base_model: gpt2", ["gpt2"]),  # a canonical model without an owner
])
def test_base_model_is_read_as_the_hub_reads_ids(tmp_path, front, parents):
    write_repo(tmp_path, "a/b", {"README.md": card(front), "config.json": {}}, t=T0)
    (rec,) = LocalSource(tmp_path).list_models()
    assert rec.status == Status.OK and rec.base_model == parents, rec.reason


@pytest.mark.parametrize("front", ["base_model: https://huggingface.co/datasets/org/data",
                                   "base_model: https://example.com/org/base"])
def test_a_link_that_is_not_a_model_id_is_bad_lineage(tmp_path, front):
    write_repo(tmp_path, "a/b", {"README.md": card(front), "config.json": {}}, t=T0)
    (rec,) = LocalSource(tmp_path).list_models()
    assert rec.status == Status.BAD_CARD and "invalid repo ids" in rec.reason and rec.base_model == []


@pytest.mark.parametrize("doc, want", [
    ({"base_model_name_or_path": "meta-llama/Llama-2-7b-hf", "r": 8}, "meta-llama/Llama-2-7b-hf"),
    ({"base_model_name_or_path": "https://huggingface.co/Org/Base"}, "Org/Base"),
    ({"base_model_name_or_path": "/content/drive/llama-7b"}, None),  # a local path, not a repo
    ({"base_model_name_or_path": "../checkpoints/base"}, None),
    ({"base_model_name_or_path": None}, None),
    ({"r": 8}, None),
    (["not", "an", "object"], None),
])
def test_adapter_config_names_the_base_as_the_hub_infers_it(doc, want):
    import json

    from storage.sources.parse import adapter_config_base

    assert adapter_config_base(json.dumps(doc).encode()) == want
    assert adapter_config_base(b"{not json") is None


def test_hub_file_sizes_is_a_setting_and_a_bad_value_says_what_to_set(monkeypatch):
    from probex_core.settings import SettingsError
    from storage.sources.hub import HubSource

    monkeypatch.delenv("PROBEX_HUB_FILE_SIZES", raising=False)
    assert HubSource("http://127.0.0.1:9").file_sizes is False  # the listing's records: sizes unknown
    monkeypatch.setenv("PROBEX_HUB_FILE_SIZES", "yes")
    assert HubSource("http://127.0.0.1:9").file_sizes is True
    assert HubSource("http://127.0.0.1:9", file_sizes=False).file_sizes is False  # an argument wins
    monkeypatch.setenv("PROBEX_HUB_FILE_SIZES", "sometimes")
    with pytest.raises(SettingsError, match="PROBEX_HUB_FILE_SIZES='sometimes' is not a yes/no value"):
        HubSource("http://127.0.0.1:9")
