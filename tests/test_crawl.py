"""Crawl into the catalog: placement, bad records kept with reasons, idempotency, watermark."""

import os
import shutil

import pytest
from minilake import T0, build_lake

from storage.catalog import MODELS, Catalog
from storage.sources import HubSource, LocalSource
from tasks.crawl import crawl_source


@pytest.fixture
def lake(tmp_path):
    return build_lake(tmp_path / "lake")


def rows(cat):
    return {r["repo_id"]: r for r in cat.read(MODELS).to_pylist()}


def test_crawl_places_by_lineage_and_keeps_bad_records(lake, tmp_path):
    cat = Catalog(str(tmp_path / "cat"))
    s = crawl_source(LocalSource(lake), cat)
    assert s.seen == s.new == 15
    got = rows(cat)
    assert got["org/grandchild"]["tree_id"] == "base/root-model"
    assert got["org/merge"]["tree_id"] == "base/root-model" and "merge" in got["org/merge"]["flags"]
    assert got["org/orphan"]["tree_id"] == "gone/missing-root" and "missing_parent" in got["org/orphan"]["flags"]
    # the parent no source holds was looked up once and recorded, in no tree and counted in none
    gone = got["gone/missing-root"]
    assert (gone["status"], gone["tree_id"], gone["files"]) == ("not_found", None, [])
    assert "named as a parent by org/orphan" in gone["reason"] and str(lake) not in gone["reason"]
    assert got["org/bad-yaml"]["status"] == "bad_card" and got["org/bad-yaml"]["reason"]
    # A model with weights unlike any tree's root is not forced into one.
    assert got["org/undeclared"]["status"] == "unassigned"
    assert got["org/undeclared"]["route_distances"]
    assert {e["repo_id"] for e in s.errors} >= {"org/bad-yaml", "org/alias", "org/huge-card"}
    trees = {t["tree_id"]: t for t in cat.read("trees").to_pylist()}
    assert trees["base/root-model"]["n_models"] == 6


def test_second_crawl_adds_nothing_and_new_repos_are_picked_up_exactly(lake, tmp_path):
    cat = Catalog(str(tmp_path / "cat"))
    src = LocalSource(lake)
    first = crawl_source(src, cat)
    version = cat.versions(MODELS)
    again = crawl_source(src, cat, incremental=False)
    assert (again.new, again.changed, again.replaced) == (0, 0, 0)
    assert cat.versions(MODELS) == version  # no write at all

    for i in range(10):
        dst = lake / "new" / f"copy-{i}"
        shutil.copytree(lake / "org" / "child-ft", dst)
        for f in dst.iterdir():
            os.utime(f, (T0 + 10_000 + i, T0 + 10_000 + i))
    third = crawl_source(src, cat)  # incremental: from the watermark
    assert third.new == 10 and third.changed == 0
    assert {r for r in rows(cat) if r.startswith("new/")} == {f"new/copy-{i}" for i in range(10)}
    # the two parents no repo of the lake holds were looked up once and recorded as not_found
    assert first.looked_up == 2 and again.looked_up == 0
    assert len(rows(cat)) == first.seen + first.looked_up + 10


def test_changed_file_supersedes_the_old_revision(lake, tmp_path):
    cat = Catalog(str(tmp_path / "cat"))
    src = LocalSource(lake)
    crawl_source(src, cat)
    old_sha = rows(cat)["org/child-ft"]["sha"]
    cfg = lake / "org" / "child-ft" / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    s = crawl_source(src, cat)
    assert s.changed == 1 and s.new == 0
    all_rows = cat.read(MODELS).to_pylist()
    statuses = {r["sha"]: r["status"] for r in all_rows if r["repo_id"] == "org/child-ft"}
    assert statuses[old_sha] == "superseded" and len(statuses) == 2


def test_limit_does_not_advance_the_watermark(lake, tmp_path):
    cat = Catalog(str(tmp_path / "cat"))
    src = LocalSource(lake)
    crawl_source(src, cat, limit=3)
    assert cat.watermark(src.name) is None
    crawl_source(src, cat)
    assert cat.watermark(src.name) is not None


@pytest.mark.parametrize("file_sizes", [False, True])
def test_hub_and_local_crawls_agree(lake, tmp_path, file_sizes):
    from hubserver import HubServer

    local = Catalog(str(tmp_path / "local"))
    crawl_source(LocalSource(lake), local)
    with HubServer(lake, page_size=4) as hub:
        remote = Catalog(str(tmp_path / "remote"))
        summary = crawl_source(HubSource(endpoint=hub.url, token=None, file_sizes=file_sizes), remote)
        counts = hub.counts
    keep = ["repo_id", "sha", "tree_id", "status", "flags", "labels", "files", "last_modified"]

    def rows_of(cat, sized):
        out = []
        for r in cat.read(MODELS).to_pylist():
            r["files"] = r["files"] if sized else [f["path"] for f in r["files"]]  # the listing has no sizes
            out.append(tuple(str(r[k]) for k in keep))
        return sorted(out)

    assert rows_of(local, file_sizes) == rows_of(remote, file_sizes)
    # the summary's counts are the server's: every request, by the Hub's buckets
    hub_counts = summary.to_dict()["hub"]
    sent = {route: c["served"] + c["refused"] for route, c in counts.items()}
    assert hub_counts["requests"] == sum(sent.values()) > 0
    assert (hub_counts["api"], hub_counts["resolvers"]) == (sent["list"] + sent["info"], sent["resolve"])
    assert (sent["info"] > summary.looked_up) == file_sizes  # else model info only for parents looked up
    assert hub_counts["rate_limited"] == hub_counts["retries"] == 0
    assert crawl_source(LocalSource(lake), local).hub.requests == 0


@pytest.mark.parametrize("order", ["oldest_first", "newest_first", "shuffled"])
def test_crawling_one_repo_at_a_time_places_like_one_crawl(lake, tmp_path, order):
    """A crawl reads only the rows it can change (the listed repos, their ancestors, descendants
    of repos whose lineage moved): placed one repo per crawl, in any arrival order (children
    before their parents, a root after its tree), every model with declared lineage lands where
    one crawl of everything puts it, and the trees' counts match their models."""
    import random
    from datetime import timedelta

    ref = Catalog(str(tmp_path / "ref"))
    crawl_source(LocalSource(lake), ref)
    want = rows(ref)
    times = sorted({r["last_modified"] for r in want.values() if r["last_modified"]})  # not_found parents: none
    if order == "newest_first":
        times.reverse()
    elif order == "shuffled":
        random.Random(3).shuffle(times)
    cat = Catalog(str(tmp_path / "cat"))
    for t in times:
        crawl_source(LocalSource(lake), cat, since=t, until=t + timedelta(milliseconds=1))
    got = rows(cat)
    assert set(got) == set(want)
    declared = [r for r, w in want.items() if w["lineage_source"] == "card"]
    assert len(declared) >= 7  # a root, a chain of three, a merge, an adapter, an orphan
    for r in declared:
        keep = ("tree_id", "parent", "flags", "status")
        assert {k: got[r][k] for k in keep} == {k: want[r][k] for k in keep}, (order, r)
    current = [r for r in cat.read(MODELS).to_pylist() if r["status"] != "superseded" and r["tree_id"]]
    for t in cat.read("trees").to_pylist():
        assert t["n_models"] == sum(r["tree_id"] == t["tree_id"] for r in current), (order, t["tree_id"])

    # a new revision of the root: its tree (outside this crawl's reach) keeps it as the root
    cfg = lake / "base" / "root-model" / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    os.utime(cfg, (T0 + 100_000, T0 + 100_000))
    s = crawl_source(LocalSource(lake), cat, since=max(times) + timedelta(seconds=1))
    assert s.seen == s.changed == 1
    after = rows(cat)
    root = after["base/root-model"]
    assert (root["tree_id"], root["status"], root["lineage_source"]) == ("base/root-model", "ok", "card")
    assert after["org/grandchild"]["tree_id"] == "base/root-model"


# --- lineage as the Hub writes it ---------------------------------------------------------------

from minilake import card, write_repo  # noqa: E402

ADAPTER = {"r": 8, "lora_alpha": 16, "target_modules": ["query"], "peft_type": "LORA"}


def lineage_lake(root):
    """A tree whose children declare their lineage every way the Hub sees it."""
    files = lambda front, **more: {"README.md": card(front), "config.json": {}, "model.safetensors": "<safetensors>",
                                   **more}
    write_repo(root, "Base/Root", files("license: mit"), t=T0)
    write_repo(root, "org/url-child", files("base_model: https://huggingface.co/BASE/root/tree/main"), t=T0 + 60)
    write_repo(root, "org/quant", files("base_model: Base/Root\nbase_model_relation: quantized"), t=T0 + 120)
    write_repo(root, "org/merge", files("base_model: [base/root, elsewhere/other-root]"), t=T0 + 180)
    write_repo(root, "org/gguf", {"README.md": card("base_model: Base/Root"), "model-Q4_K_M.gguf": b"GGUF\3"},
               t=T0 + 240)
    # PEFT adapters without a card lineage: the Hub reads adapter_config.json's base
    write_repo(root, "org/peft", {"README.md": "# an adapter\n", "adapter_model.safetensors": "<safetensors>",
                                  "adapter_config.json": {**ADAPTER, "base_model_name_or_path": "base/ROOT"}},
               t=T0 + 300)
    write_repo(root, "org/peft-path", {"README.md": "# an adapter\n", "adapter_model.safetensors": "<safetensors>",
                                       "adapter_config.json": {**ADAPTER, "base_model_name_or_path": "/content/base"}},
               t=T0 + 360)
    return root


def test_lineage_as_the_hub_writes_it(tmp_path):
    cat = Catalog(str(tmp_path / "cat"))
    s = crawl_source(LocalSource(lineage_lake(tmp_path / "lake")), cat)
    got = rows(cat)
    want = {  # tree, parent, relation, lineage_source
        "org/url-child": ("Base/Root", "Base/Root", "finetune", "card"),
        "org/quant": ("Base/Root", "Base/Root", "quantized", "card"),
        "org/merge": ("Base/Root", "Base/Root", "merge", "card"),
        "org/gguf": ("Base/Root", "Base/Root", "quantized", "card"),
        "org/peft": ("Base/Root", "Base/Root", "adapter", "adapter_config"),
    }
    for repo_id, w in want.items():
        r = got[repo_id]
        assert (r["tree_id"], r["parent"], r["relation"], r["lineage_source"]) == w, repo_id
    # declared relations are kept; undeclared ones are inferred and say so
    assert "relation_inferred" not in got["org/quant"]["flags"]
    assert {"relation_inferred", "merge"} <= set(got["org/merge"]["flags"])
    assert "relation_inferred" in got["org/peft"]["flags"] and "relation_inferred" in got["org/url-child"]["flags"]
    assert got["org/merge"]["parents"] == ["Base/Root", "elsewhere/other-root"]  # the root's own spelling
    assert got["org/url-child"]["parents"] == ["Base/Root"]
    assert got["org/gguf"]["status"] == "no_safetensors"
    # a local path in adapter_config.json is no lineage: routed by weights or left unassigned
    assert got["org/peft-path"]["parents"] == [] and got["org/peft-path"]["lineage_source"] != "adapter_config"
    tree = cat.tree("Base/Root")
    assert (tree["n_models"], tree["n_finetune"], tree["n_adapter"], tree["n_other"]) == (6, 1, 1, 3)
    assert s.looked_up == 1 and got["elsewhere/other-root"]["status"] == "not_found"

    # later, a child spelling the root in yet another case finds the stored root; nothing is looked up
    write_repo(tmp_path / "lake", "org/late", {"README.md": card("base_model: BASE/ROOT\nbase_model_relation: finetune"),
                                               "config.json": {}, "model.safetensors": "<safetensors>"}, t=T0 + 999)
    s = crawl_source(LocalSource(tmp_path / "lake"), cat)
    assert (s.new, s.looked_up) == (1, 0)
    late = rows(cat)["org/late"]
    assert (late["tree_id"], late["parent"], late["parents"]) == ("Base/Root", "Base/Root", ["Base/Root"])
    assert cat.tree("Base/Root")["n_finetune"] == 2


def test_hub_and_local_crawls_agree_on_lineage(tmp_path):
    from hubserver import HubServer

    lake = lineage_lake(tmp_path / "lake")
    local = Catalog(str(tmp_path / "local"))
    crawl_source(LocalSource(lake), local)
    with HubServer(lake, page_size=3) as hub:
        remote = Catalog(str(tmp_path / "remote"))
        crawl_source(HubSource(endpoint=hub.url, token=None), remote)
    keep = ["repo_id", "sha", "tree_id", "parent", "parents", "relation", "lineage_source", "status", "flags"]
    a = sorted(tuple(str(r[k]) for k in keep) for r in local.read(MODELS).to_pylist())
    b = sorted(tuple(str(r[k]) for k in keep) for r in remote.read(MODELS).to_pylist())
    assert a == b


def chain_lake(root):
    """root <- middle <- leaf, one minute apart."""
    files = lambda front: {"README.md": card(front), "config.json": {}, "model.safetensors": "<safetensors>"}
    write_repo(root, "base/root", files("license: mit"), t=T0)
    write_repo(root, "org/middle", files("base_model: base/root\nbase_model_relation: finetune"), t=T0 + 60)
    write_repo(root, "org/leaf", files("base_model: org/middle\nbase_model_relation: finetune"), t=T0 + 120)
    return root


@pytest.mark.parametrize("via", ["local", "hub"])
def test_parents_outside_the_crawl_are_looked_up_once_and_recorded(tmp_path, via):
    """A crawl that lists only the leaf (a window, a --since) still places it in its root's tree:
    its parent and grandparent are read from the source and stored, so the chain crosses them."""
    from contextlib import nullcontext

    from hubserver import HubServer

    lake = chain_lake(tmp_path / "lake")
    cat = Catalog(str(tmp_path / "cat"))
    leaf_time = LocalSource(lake).snapshot("org/leaf").last_modified
    with HubServer(lake) if via == "hub" else nullcontext() as hub:
        src = HubSource(endpoint=hub.url, token=None) if hub else LocalSource(lake)
        s = crawl_source(src, cat, since=leaf_time)
        assert (s.seen, s.new, s.looked_up, s.lookup_failures) == (1, 1, 2, [])
        got = rows(cat)
        assert (got["org/leaf"]["tree_id"], got["org/leaf"]["flags"]) == ("base/root", [])
        assert (got["org/middle"]["tree_id"], got["org/middle"]["parent"], got["org/middle"]["status"]) == (
            "base/root", "base/root", "ok")
        assert got["base/root"]["tree_id"] == "base/root" and got["org/middle"]["sha"] == src.model_info("org/middle").sha
        assert cat.tree("base/root")["n_models"] == 3
        # the middle is the repo's own record: a crawl that lists it later has nothing to add
        s = crawl_source(src, cat, incremental=False)
        assert (s.seen, s.new, s.changed, s.replaced, s.looked_up) == (3, 0, 0, 0, 0)


def test_a_failed_lookup_leaves_the_crawl_whole_and_is_retried(tmp_path):
    from hubserver import HubServer

    from storage.http import HttpClient, RetryPolicy

    lake = chain_lake(tmp_path / "lake")
    cat = Catalog(str(tmp_path / "cat"))
    leaf_time = LocalSource(lake).snapshot("org/leaf").last_modified
    quick = HttpClient(connect_timeout_s=0.5, read_timeout_s=0.5, retry=RetryPolicy(max_retries=0))
    with HubServer(lake) as hub:
        src = HubSource(endpoint=hub.url, token=None, http=quick)
        hub.faults.stall_suffix = "/api/models/org/middle"  # the lookup, not the listed repos' infos
        s = crawl_source(src, cat, since=leaf_time)
        assert s.new == 1 and s.looked_up == 1 and [f["repo_id"] for f in s.lookup_failures] == ["org/middle"]
        assert "did not answer within 0.5 s" in s.lookup_failures[0]["reason"]
        leaf = rows(cat)["org/leaf"]
        assert (leaf["tree_id"], leaf["status"], leaf["flags"]) == ("org/middle", "ok", ["missing_parent"])
        assert "org/middle" not in rows(cat)  # a failure is not recorded as an answer
        assert cat.watermark(src.name) is not None  # the crawl committed

        hub.faults.stall_suffix = None
        s = crawl_source(src, cat, since=leaf_time)
        assert (s.new, s.looked_up, s.replaced) == (0, 2, 1)
        assert rows(cat)["org/leaf"]["tree_id"] == "base/root"


def test_probex_crawl_shows_the_hub_requests_it_made_in_80_columns(tmp_path):
    """An operator sees rate-limit pressure in the crawl's summary: its Hub requests, 429s retried
    and seconds waited, as the Hub counted them, in a table that fits an 80-column log."""
    import json

    from hubserver import HubServer
    from typer.testing import CliRunner

    import tasks.pipeline  # noqa: F401  Prefect sets its log handlers up on import: to the real stderr,
    from probex.cli import app  # not to the runner's, which is closed after invoke (later tests log to it)

    lake = build_lake(tmp_path / "lake")
    with HubServer(lake, page_size=4) as hub:
        hub.faults.route, hub.faults.rate_limited, hub.faults.retry_after = "resolve", 2, "0"
        source = f"hub:{hub.url}"
        first = CliRunner().invoke(app, ["crawl", "--source", source, "--home", str(tmp_path / "a"), "--json"])
        sent = {route: c["served"] + c["refused"] for route, c in hub.counts.items()}
        text = CliRunner().invoke(app, ["crawl", "--source", source, "--home", str(tmp_path / "b")])
    assert first.exit_code == 0, first.output
    doc = json.loads(first.stdout)["hub"]
    assert doc["requests"] == sum(sent.values()) and doc["resolvers"] == sent["resolve"]
    assert doc["api"] == sent["list"] + sent["info"] and doc["rate_limited"] == doc["retries"] == 2
    assert doc["retry_wait_s"] > 0 and doc["limiter_wait_s"] == 0  # no shared limiter without Prefect
    assert text.exit_code == 0 and "crawl: Hub requests" in text.stdout and "limiter wait s" in text.stdout
    assert max(len(line) for line in text.stdout.splitlines()) <= 80


# --- one safetensors file of no telling name: a LoRA or a whole checkpoint, by its header ----------

KOHYA_KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def kohya_file(path):
    """A kohya LoRA as sd-scripts saves it: `lora_unet_<module with _ for .>` down/up factors and alpha."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    save_file({f"{KOHYA_KEY}.lora_down.weight": rng.standard_normal((4, 3)).astype(np.float16),
               f"{KOHYA_KEY}.lora_up.weight": rng.standard_normal((5, 4)).astype(np.float16),
               f"{KOHYA_KEY}.alpha": np.array(2.0, np.float16),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.ones((4, 3), np.float16),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": np.ones((3, 4), np.float16)},
              str(path), metadata={"ss_network_module": "networks.lora"})
    return path.read_bytes()


def single_file_lake(root, tmp_path):
    """A root; a kohya LoRA whose card names no relation; a whole checkpoint in one file of another
    name whose card says `adapter` (cards are often wrong: the header decides)."""
    write_repo(root, "base/root", {"README.md": card("license: mit"), "config.json": {},
                                   "model.safetensors": "<safetensors>"}, t=T0)
    write_repo(root, "org/kohya-style", {"README.md": card("base_model: base/root"),
                                         "pixel_style_v2.safetensors": kohya_file(tmp_path / "k.safetensors")},
               t=T0 + 60)
    write_repo(root, "org/checkpoint", {"README.md": card("base_model: base/root\nbase_model_relation: adapter"),
                                        "config.json": {}, "merged-fp16.safetensors": "<safetensors>"}, t=T0 + 120)
    return root


def test_a_single_kohya_file_is_an_adapter_and_a_single_checkpoint_a_full_model(tmp_path):
    from storage.records import is_adapter, weight_files

    lake = single_file_lake(tmp_path / "lake", tmp_path)
    cat = Catalog(str(tmp_path / "cat"))
    crawl_source(LocalSource(lake), cat)
    got = rows(cat)
    kohya, full = got["org/kohya-style"], got["org/checkpoint"]
    # by file names alone both are "single": the header the crawl read tells them apart
    assert weight_files(["pixel_style_v2.safetensors"]).kind == weight_files(["merged-fp16.safetensors"]).kind == "single"
    assert (kohya["weights_kind"], is_adapter(kohya), kohya["status"], kohya["reason"]) == ("lora", True, "ok", None)
    assert kohya["relation"] == "adapter" and "relation_inferred" in kohya["flags"]  # inferred from the header
    assert kohya["adapter_modules"] and any(KOHYA_KEY in m for m in kohya["adapter_modules"])
    assert (full["weights_kind"], is_adapter(full), full["adapter_modules"]) == ("full", False, None)
    assert got["base/root"]["weights_kind"] == "full" and not is_adapter(got["base/root"])
    tree = cat.tree("base/root")
    assert (tree["n_models"], tree["n_adapter"]) == (3, 2)  # the lying card still counts by its relation
    # a row read back without the column (an older catalog) is told by its file names, as before
    assert not is_adapter({k: v for k, v in kohya.items() if k != "weights_kind"})


def test_a_single_files_unreadable_header_is_said_and_read_as_before(tmp_path):
    from storage.records import is_adapter

    write_repo(tmp_path / "lake", "org/broken", {"README.md": card("base_model: base/elsewhere"),
                                                 "style.safetensors": b"\xff" * 12}, t=T0)
    cat = Catalog(str(tmp_path / "cat"))
    crawl_source(LocalSource(tmp_path / "lake"), cat)
    row = rows(cat)["org/broken"]
    assert row["weights_kind"] == "single" and not is_adapter(row)
    assert row["reason"].startswith("unreadable weights header")


def test_a_catalog_from_before_weights_kind_opens_and_gains_the_column(tmp_path):
    """An older catalog has no `weights_kind`: projected reads give nulls (its rows are told by
    their file names), the next crawl adds the column, and recounting a tree reads it."""
    from storage.records import is_adapter
    from tasks.crawl import refresh_trees

    lake = single_file_lake(tmp_path / "lake", tmp_path)
    kohya = lake / "org" / "kohya-style"
    moved = shutil.move(str(kohya), str(tmp_path / "later"))
    cat = Catalog(str(tmp_path / "cat"))
    crawl_source(LocalSource(lake), cat)
    cat.table(MODELS).drop_columns(["weights_kind"])
    old = Catalog(str(tmp_path / "cat"), create=False)
    assert "weights_kind" not in old.table(MODELS).schema.names
    got = old.read(MODELS, where="repo_id = 'base/root'", columns=["repo_id", "weights_kind"]).to_pylist()
    assert got == [{"repo_id": "base/root", "weights_kind": None}]
    assert refresh_trees(old, {"base/root"}) == {"base/root": 2}

    shutil.move(moved, str(kohya))
    s = crawl_source(LocalSource(lake), old, incremental=False)
    assert s.new == 1
    got = rows(old)
    assert got["org/kohya-style"]["weights_kind"] == "lora" and is_adapter(got["org/kohya-style"])
    assert got["org/checkpoint"]["weights_kind"] is None  # written before the column: not read again
    assert refresh_trees(old, {"base/root"}) == {"base/root": 3}
    assert old.tree("base/root")["n_adapter"] == 2
