"""Shards, catalog and experts on an object store: a real S3 server (moto, `s3_server` in conftest)
on loopback. Round trips, the whole ingest -> train -> embed -> search path with every store on
S3, and the faults a user meets (a missing bucket, wrong keys, an endpoint that does not answer):
one line naming the setting, nothing half-written visible."""

import json
import shutil
import socket

import lancedb
import numpy as np
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest
import torch
from typer.testing import CliRunner

import storage.compaction as compaction
import storage.experts as experts_store
from probex.cli import app
from probex_core.checkpoint import CheckpointError
from probex_core.data import WeightBatch
from probex_core.probex import ProbeX, ProbeXConfig
from probex_core.settings import Settings, SettingsError
from storage.catalog import MODELS, Catalog, CatalogError, CatalogMissingError
from storage.experts import current_version, list_versions, load_current, load_expert, save_expert, tree_dir
from storage.fs import StorageError, lance_storage_options
from storage.shards import LayerRow, has_shard, layers_of, read_layer, write_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHA = "0123456789abcdef" * 2 + "01234567"


def rows(tree="org/root", layer="blocks.1.q"):
    rng = np.random.default_rng(0)
    return [
        LayerRow(tree, layer, "org/dense", SHA, "dense", (4, 3), (4, 3), "F32", 48,
                 X=rng.standard_normal((4, 3)).astype(np.float32)),
        LayerRow(tree, layer, "org/lora", SHA, "lora", (4, 3), (4, 3), "F16", 40,
                 A=rng.standard_normal((2, 3)).astype(np.float32), B=rng.standard_normal((4, 2)).astype(np.float32),
                 rank=2, scale=0.5),
    ]


def model(seed=0):
    torch.manual_seed(seed)
    m = ProbeX(ProbeXConfig(d_H=6, d_W=10, n_outputs=3, head="multilabel", r_U=4, r_V=4, r_T=5,
                            text_dim=7, input_scale=0.123, centered=True))
    m.input_mean.copy_(torch.randn(6, 10))
    return m.eval()


# -- settings -------------------------------------------------------------------------------------

def test_settings_take_store_uris_and_refuse_what_would_become_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PROBEX_SHARDS", "s3://bucket/shards")
    monkeypatch.setenv("PROBEX_CATALOG", "gs://bucket/catalog")
    monkeypatch.setenv("PROBEX_EXPERTS", f"file://{tmp_path}/experts")
    s = Settings.load(tmp_path)
    assert (s.shards, s.catalog, s.experts) == ("s3://bucket/shards", "gs://bucket/catalog", str(tmp_path / "experts"))
    for var in ("PROBEX_SHARDS", "PROBEX_CATALOG", "PROBEX_EXPERTS"):
        monkeypatch.delenv(var)
    s = Settings.load(tmp_path)  # local defaults as before: folders under the home
    assert (s.shards, s.catalog, s.experts) == tuple(str(tmp_path / n) for n in ("shards", "catalog", "experts"))
    for bad, words in [("s3:/bucket/x", "without '//'"), ("ftp://host/x", "unknown scheme"), ("s3:///x", "no bucket")]:
        monkeypatch.setenv("PROBEX_SHARDS", bad)
        with pytest.raises(SettingsError, match="PROBEX_SHARDS") as e:
            Settings.load(tmp_path)
        assert words in str(e.value)


# -- shards ---------------------------------------------------------------------------------------

def _same(a: LayerRow, b: LayerRow):
    assert (a.repo_id, a.kind, a.shape, a.dtype, a.rank, a.scale) == (b.repo_id, b.kind, b.shape, b.dtype, b.rank, b.scale)
    for t in ("X", "A", "B"):
        x, y = getattr(a, t), getattr(b, t)
        assert (x is None and y is None) or np.array_equal(x, y)


def test_shards_round_trip_on_s3_and_read_with_plain_pyarrow(s3_server):
    root = s3_server.uri("shards")
    written = write_rows(root, rows())
    assert all(p.startswith(root + "/tree=org--root/layer=blocks.1.q/") for p in written)
    assert has_shard(root, "org/root", "blocks.1.q", "org/lora", SHA)
    assert not has_shard(root, "org/root", "blocks.1.q", "org/other", SHA)
    assert layers_of(root, "org/root") == ["blocks.1.q"] and layers_of(root, "org/none") == []
    back = sorted(read_layer(root, "org/root", "blocks.1.q"), key=lambda r: r.repo_id)
    for a, b in zip(back, rows()):
        _same(a, b)
    assert [r.repo_id for r in read_layer(root, "org/root", "blocks.1.q", {"org/lora"})] == ["org/lora"]
    write_rows(root, rows())  # re-extraction overwrites its own objects: never a duplicate
    assert s3_server.keys(root) == ["tree=org--root/layer=blocks.1.q/org--dense@0123456789ab.parquet",
                                    "tree=org--root/layer=blocks.1.q/org--lora@0123456789ab.parquet"]
    # what a notebook does: plain pyarrow on the bucket, hive partitions, no project code
    table = ds.dataset(root.split("://", 1)[1], filesystem=s3_server.filesystem(), format="parquet",
                       partitioning="hive").to_table(columns=["repo_id", "kind"])
    assert sorted(table.column("repo_id").to_pylist()) == ["org/dense", "org/lora"]


def test_a_killed_writers_temporary_object_is_never_read_and_is_cleared(s3_server, monkeypatch):
    root = s3_server.uri("shards")
    write_rows(root, rows()[:1])
    folder = root.split("://", 1)[1] + "/tree=org--root/layer=blocks.1.q"
    left = f"{folder}/.org--lora@0123456789ab.parquet.dead0000.tmp"
    with s3_server.filesystem().open_output_stream(left) as f:
        f.write(b"PAR1 half a shard")  # what a worker killed mid-upload could leave
    assert [r.repo_id for r in read_layer(root, "org/root", "blocks.1.q")] == ["org/dense"]
    assert not has_shard(root, "org/root", "blocks.1.q", "org/lora", SHA)
    write_rows(root, rows()[1:])
    assert len(read_layer(root, "org/root", "blocks.1.q")) == 2
    # the next compaction clears a temporary object once it is older than any live writer's
    monkeypatch.setattr(compaction, "STALE_TMP_S", 0)
    assert compaction.compact_layer(root, "org/root", "blocks.1.q").stale_tmp_removed == 1
    assert not any(k.endswith(".tmp") for k in s3_server.keys(root))
    assert len(read_layer(root, "org/root", "blocks.1.q")) == 2


def test_publish_on_s3_is_one_put_when_small_and_a_whole_copy_when_large(s3_server):
    """A shard is one PutObject under its final key (all or nothing on the server); a multipart-sized
    object goes through a temporary key and lands whole. Neither leaves a temporary object."""
    from storage.fs import SINGLE_PUT_MAX, publish, read_bytes, resolve

    root = s3_server.uri("publish")
    fs, base = resolve(root)
    small, large = b"s" * 1000, bytes(range(256)) * (SINGLE_PUT_MAX // 256 + 1)
    publish(fs, f"{base}/small.bin", small)
    publish(fs, f"{base}/large.bin", large)
    assert read_bytes(fs, f"{base}/small.bin") == small and read_bytes(fs, f"{base}/large.bin") == large
    assert s3_server.keys(root) == ["large.bin", "small.bin"]
    key = base.split("/", 1)[1]
    requests = [line for line in s3_server.log.read_text(errors="replace").splitlines()
                if f"/{key}/" in line and '" 20' in line]
    writes = [line for line in requests if '"GET ' not in line and '"HEAD ' not in line]
    small_writes = [line for line in writes if "small.bin" in line]
    assert len(small_writes) == 1 and '"PUT ' in small_writes[0], small_writes
    assert any(".large.bin." in line for line in writes)  # the large one went via a temporary key


def test_local_shards_keep_their_layout_and_a_file_uri_reads_them(tmp_path):
    paths = write_rows(tmp_path / "shards", rows())
    assert sorted(p.replace(str(tmp_path), "") for p in paths) == [
        "/shards/tree=org--root/layer=blocks.1.q/org--dense@0123456789ab.parquet",
        "/shards/tree=org--root/layer=blocks.1.q/org--lora@0123456789ab.parquet"]
    assert not list((tmp_path / "shards").rglob("*.tmp"))
    back = read_layer(f"file://{tmp_path}/shards", "org/root", "blocks.1.q")
    assert sorted(r.repo_id for r in back) == ["org/dense", "org/lora"]
    assert layers_of(tmp_path / "shards", "org/root") == ["blocks.1.q"]


# -- experts --------------------------------------------------------------------------------------

def test_experts_round_trip_on_s3_new_version_then_current(s3_server):
    root = s3_server.uri("experts")
    v1 = save_expert(root, "org/tree", model(1), layer="l", labels=["a", "b", "c"], version="v1",
                     extra_tensors={"class_text_emb": torch.ones(3, 7)}, metrics={"val": 0.5})
    assert v1.uri == f"{root}/org--tree/v1" and v1.name == "v1"
    save_expert(root, "org/tree", model(2), layer="l", labels=["a", "b", "c"], version="v2")
    save_expert(root, "org/tree", model(3), layer="l", labels=["a", "b", "c"], version="v3", make_current=False)
    folder = tree_dir(root, "org/tree")
    assert current_version(folder) == "v2" and list_versions(folder) == ["v1", "v2", "v3"]
    assert s3_server.keys(root) == ["org--tree/current"] + [f"org--tree/{v}/{f}" for v in ("v1", "v2", "v3")
                                                           for f in ("config.json", "model.safetensors")]
    with pytest.raises(CheckpointError, match="never overwritten"):
        save_expert(root, "org/tree", model(), layer="l", labels=["a"], version="v1")
    cur = load_current(root, "org/tree")
    b = WeightBatch(X=torch.randn(5, 6, 10))
    with torch.no_grad():
        assert cur.version == "v2" and torch.equal(cur.model(b), model(2)(b))
        old = load_expert(folder, "v1")
        assert torch.equal(old.model(b), model(1)(b)) and torch.equal(old.extra["class_text_emb"], torch.ones(3, 7))
    assert old.config["metrics"] == {"val": 0.5} and old.path == f"{folder}/v1"
    assert load_current(root, "org/none") is None


def test_a_failed_expert_upload_leaves_current_and_no_partial_version(s3_server, monkeypatch):
    root = s3_server.uri("experts")
    save_expert(root, "t", model(), layer="l", labels=["a", "b", "c"], version="good")
    before = s3_server.keys(root)
    real = experts_store.publish

    def dies_on_config(fs, path, data, **kw):
        if path.endswith("config.json"):
            raise OSError("connection reset while uploading")
        return real(fs, path, data, **kw)

    monkeypatch.setattr(experts_store, "publish", dies_on_config)
    with pytest.raises(StorageError, match="connection reset"):
        save_expert(root, "t", model(5), layer="l", labels=["a", "b", "c"], version="bad")
    monkeypatch.undo()
    assert s3_server.keys(root) == before  # the weights it had uploaded were removed
    assert current_version(tree_dir(root, "t")) == "good" and list_versions(tree_dir(root, "t")) == ["good"]
    assert load_current(root, "t").version == "good"


# -- catalog --------------------------------------------------------------------------------------

def test_catalog_on_s3_and_read_by_plain_lancedb(s3_server):
    uri = s3_server.uri("catalog")
    with pytest.raises(CatalogMissingError, match="no catalog"):
        Catalog(uri, create=False)
    cat = Catalog(uri)
    rows_ = [{"repo_id": f"org/m{i}", "sha": SHA, "tree_id": "org/root", "status": "ok"} for i in range(3)]
    assert cat.upsert_models(rows_).new == 3
    assert cat.upsert_models(rows_).unchanged == 3  # an unchanged re-run writes nothing
    assert sorted(r["repo_id"] for r in Catalog(uri, create=False).read(MODELS).to_pylist()) == ["org/m0", "org/m1", "org/m2"]
    # a notebook cell: LanceDB alone, the endpoint from AWS_ENDPOINT_URL, allow_http for loopback
    db = lancedb.connect(uri, storage_options={"allow_http": "true", "aws_endpoint": s3_server.url})
    assert db.open_table(MODELS).count_rows() == 3
    assert lance_storage_options(uri)["allow_http"] == "true"


# -- the whole path -------------------------------------------------------------------------------

@pytest.mark.slow  # crawls, extracts on Dask, trains and embeds the tiny lake: the full suite runs it
def test_ingest_train_embed_search_with_every_store_on_s3(tiny_lake, s3_server, tmp_path, monkeypatch):
    from storage.query import CatalogQuery
    from tasks.pipeline import crawl_step, embed_step, extract_step, train_step

    shutil.copytree(tiny_lake, tmp_path / "lake")
    uris = {name: s3_server.uri(name) for name in ("shards", "catalog", "experts")}
    for name, uri in uris.items():
        monkeypatch.setenv(f"PROBEX_{name.upper()}", uri)
    s = Settings.load(tmp_path)
    assert (s.shards, s.catalog, s.experts) == (uris["shards"], uris["catalog"], uris["experts"])
    crawled = crawl_step(s, str(s.lake))
    extracted = extract_step(s, mode="candidates")  # Dask workers write the shards to S3
    trained = train_step(s)
    embedded = embed_step(s)
    assert crawled["new"] > 0 and extracted["extracted"] > 0 and embedded["new"] > 0
    experts = {t: r["version"] for t, r in trained["trees"].items() if r.get("version")}
    assert experts
    cat = Catalog(s.catalog, create=False)
    for tree, version in experts.items():
        assert current_version(tree_dir(s.experts, tree)) == version
        keys = {(r["repo_id"], r["sha"]) for r in cat.tree_children(tree)}
        emb = cat.read("embeddings", where=f"tree_id = '{tree}'").to_pylist()
        assert {(r["repo_id"], r["sha"]) for r in emb} == keys and {r["expert_version"] for r in emb} == {version}
    shard_keys = s3_server.keys(s.shards)
    assert shard_keys and all(k.endswith(".parquet") and "/." not in k for k in shard_keys)
    # nothing went to the local home but the lake (and Prefect's state)
    assert not any((tmp_path / n).exists() for n in ("shards", "catalog", "experts"))

    hits = CatalogQuery(s.catalog, s.experts, s.text_encoder).search("a domestic animal", k=3)
    assert len(hits) == 3 and set(hits["tree_id"]) <= set(experts)
    out = CliRunner().invoke(app, ["search", "a domestic animal", "-k", "3", "--json", "--home", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert len(json.loads(out.stdout)["results"]) == 3


# -- faults ---------------------------------------------------------------------------------------

def one_line(error: Exception, *words):
    text = str(error)
    assert "\n" not in text, text
    for w in words:
        assert w in text, text


def test_a_bucket_that_does_not_exist_is_one_line_naming_the_setting(s3_server, tmp_path, monkeypatch):
    missing = "s3://no-such-bucket/x"
    with pytest.raises(StorageError) as e:
        write_rows(missing, rows())
    one_line(e.value, "PROBEX_SHARDS", "'no-such-bucket'", "does not exist")
    with pytest.raises(StorageError) as e:
        save_expert(missing, "t", model(), layer="l", labels=["a", "b", "c"])
    one_line(e.value, "PROBEX_EXPERTS", "does not exist")
    with pytest.raises(CatalogError) as e:
        Catalog(missing)
    one_line(e.value, "PROBEX_CATALOG", "does not exist")
    assert s3_server.filesystem().get_file_info("no-such-bucket").type == pafs.FileType.NotFound  # nothing made
    # and as the CLI prints it: one line, exit 1, no trace
    monkeypatch.setenv("PROBEX_CATALOG", missing + "/catalog")
    out = CliRunner().invoke(app, ["trees", "--json", "--home", str(tmp_path)])
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert out.output.startswith("error:") and "PROBEX_CATALOG" in out.output and "does not exist" in out.output


def test_wrong_credentials_are_one_line_and_write_nothing(s3_server, monkeypatch):
    root, cat_uri, exp_uri = (s3_server.uri(n) for n in ("shards", "catalog", "experts"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with s3_server.checking_credentials():
        with pytest.raises(StorageError) as e:
            write_rows(root, rows())
        one_line(e.value, "PROBEX_SHARDS", "refused the credentials", "AWS_ACCESS_KEY_ID")
        with pytest.raises(StorageError) as e:
            save_expert(exp_uri, "t", model(), layer="l", labels=["a", "b", "c"])
        one_line(e.value, "PROBEX_EXPERTS", "refused the credentials")
        with pytest.raises(CatalogError) as e:
            Catalog(cat_uri)
        one_line(e.value, "PROBEX_CATALOG", "refused the credentials")
    for uri in (root, cat_uri, exp_uri):
        assert s3_server.keys(uri) == []


@pytest.fixture
def short_timeouts(monkeypatch):
    """One try of 1 s each: an endpoint that does not answer fails in seconds."""
    for var, value in {"PROBEX_HTTP_CONNECT_TIMEOUT": "1", "PROBEX_HTTP_READ_TIMEOUT": "1",
                       "PROBEX_HTTP_MAX_RETRIES": "0"}.items():
        monkeypatch.setenv(var, value)


@pytest.mark.parametrize("endpoint", ["refused", "silent"])
def test_an_endpoint_that_does_not_answer_is_one_line_naming_the_variable(s3_server, short_timeouts,
                                                                            monkeypatch, endpoint):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        if endpoint == "silent":
            sock.listen(8)  # accepts connections, never answers a request
        port = sock.getsockname()[1]
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        with pytest.raises(StorageError) as e:
            has_shard(f"s3://{s3_server.bucket}/x", "t", "l", "r", SHA)
        one_line(e.value, "PROBEX_SHARDS", "cannot reach", "AWS_ENDPOINT_URL", f"127.0.0.1:{port}")
        with pytest.raises(CatalogError) as e:
            Catalog(f"s3://{s3_server.bucket}/catalog")
        one_line(e.value, "PROBEX_CATALOG", "cannot reach")
        with pytest.raises(StorageError) as e:
            load_current(f"s3://{s3_server.bucket}/experts", "t")
        one_line(e.value, "PROBEX_EXPERTS", "cannot reach")
