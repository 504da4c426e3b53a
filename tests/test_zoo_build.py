"""The lake builder: layout, cards, ground truth, safetensors, undocumented repos, resume, bad input."""

from __future__ import annotations

import json
import re
import struct

import pyarrow.parquet as pq
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from probex_core.splits import is_val
from zoo import hub_repo
from zoo.build import GROUND_TRUTH, IMAGE_ROOT, L3_ROOT, L6_ROOT, MANIFEST, SIZES, Mess, build_lake, make_plan
from zoo.fashion_mnist import ZooError
from zoo.hub_repo import RepoSpec

pytestmark = pytest.mark.slow
ROOTS = {IMAGE_ROOT, L3_ROOT, L6_ROOT}


@pytest.fixture(scope="module")
def all_truth(tiny_lake):
    return {row["repo_id"]: row for row in pq.read_table(tiny_lake / GROUND_TRUTH).to_pylist()}


@pytest.fixture(scope="module")
def truth(all_truth):
    """The trained trees' repos (the family trees', synthetic, are checked on their own)."""
    return {k: r for k, r in all_truth.items() if not r["synthetic"]}


def weights_file(folder):
    return folder / ("adapter_model.safetensors" if (folder / "adapter_config.json").exists() else "model.safetensors")


def header_ok(path) -> bool:
    """The header parses and every tensor's bytes lie inside the file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return all(v["data_offsets"][1] <= len(raw) - 8 - n for k, v in header.items() if k != "__metadata__")


def test_layout_and_manifest(tiny_lake, all_truth, truth):
    manifest = json.loads((tiny_lake / MANIFEST).read_text())
    assert manifest["finished"] and manifest["size"] == "tiny" and manifest["n_models"] == len(all_truth)
    repos = {f"{p.parent.name}/{p.name}" for p in tiny_lake.glob("*/*") if p.is_dir()}
    assert repos == set(all_truth)  # nothing half-written, nothing missing
    for repo_id in truth:
        files = {p.name for p in (tiny_lake / repo_id).iterdir()}
        assert files in ({"README.md", "config.json", "model.safetensors"},
                         {"README.md", "config.json", "adapter_config.json", "adapter_model.safetensors"})
    assert ROOTS <= set(truth)


def test_ground_truth(truth):
    rows = list(truth.values())
    assert {"repo_id", "root", "parent", "classes", "split", "documented", "lineage_declared", "corrupt",
            "accuracy", "synthetic", "format"} <= set(rows[0])
    assert {r["format"] for r in rows} == {"safetensors", "peft_lora"}
    children = [r for r in rows if r["root"] and r["repo_id"] not in ROOTS]
    assert len(children) >= 20
    for r in children:
        assert r["split"] in ("train", "val", "test", "holdout")
        assert r["documented"] == (r["split"] in ("train", "val"))
        if r["documented"]:
            assert (r["split"] == "val") == is_val(r["repo_id"])
        assert r["accuracy"] >= (0.75 if r["root"] == L6_ROOT else 0.6)  # children learned
    image = [r for r in children if r["root"] == IMAGE_ROOT]
    assert all(len(r["classes"]) == 5 for r in image)
    l6 = [r for r in children if r["root"] == L6_ROOT]
    held = {c for r in l6 if r["split"] == "holdout" for c in r["classes"]}
    seen = {c for r in l6 if r["split"] != "holdout" for c in r["classes"]}
    assert held and not held & seen and len(held) * 3 >= len(held | seen)
    # the mess: undeclared lineage, a chain, three kinds of corruption, outsiders
    assert any(not r["lineage_declared"] for r in children)
    chain = [r for r in image if r["parent"] != IMAGE_ROOT]
    assert chain and all(truth[r["parent"]]["root"] == IMAGE_ROOT for r in chain)
    assert sorted(r["corruption"] for r in rows if r["corrupt"]) == ["bad_header", "nan", "truncated"]
    outsiders = [r for r in rows if r["root"] is None]
    assert outsiders and not any(r["lineage_declared"] for r in outsiders)


def test_the_family_trees_are_in_the_lake_marked_synthetic(tiny_lake, all_truth):
    """The two trees at real Hub layouts (zoo/families.py) are part of every lake the demo and the
    tests use, each repo written whole and named in the ground truth with its format."""
    from zoo.families import LLAMA_ROOT, SD_ROOT, ground_truth

    plan = make_plan("tiny")
    synthetic = {k: r for k, r in all_truth.items() if r["synthetic"]}
    assert synthetic == {r["repo_id"]: r for r in ground_truth(plan.families).to_pylist()}
    assert {r["root"] for r in synthetic.values()} == {LLAMA_ROOT, SD_ROOT}
    assert {"sharded_bf16", "fp8_channel", "peft_lora_bare", "pickle_only", "diffusers_lora", "kohya_lora"} <= {
        r["format"] for r in synthetic.values()}
    assert all(r["accuracy"] is None for r in synthetic.values())
    assert (tiny_lake / LLAMA_ROOT / "model.safetensors.index.json").exists()
    assert (tiny_lake / SD_ROOT / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert not make_plan("hard").families  # the benchmark's lake is about accuracy only


def test_cards_parse_with_the_hub_parser(tiny_lake, truth):
    for repo_id, r in truth.items():
        data = ModelCard.load(tiny_lake / repo_id / "README.md").data
        assert data.license and data.library_name and data.tags
        if repo_id in ROOTS or r["root"] is None:
            assert data.base_model is None
            continue
        assert data.datasets
        if r["lineage_declared"]:
            assert data.base_model == r["parent"]
            assert data.base_model_relation == ("finetune" if r["root"] == IMAGE_ROOT else "adapter")
        else:
            assert data.base_model is None and "base_model_relation" not in data.to_dict()
        assert data.eval_results[0].metric_type == "accuracy"
        assert data.eval_results[0].metric_value == pytest.approx(r["accuracy"])


def test_every_safetensors_header_parses_but_the_broken_ones(tiny_lake, truth):
    for repo_id, r in truth.items():
        path = weights_file(tiny_lake / repo_id)
        if r["corruption"] in ("truncated", "bad_header"):
            assert not header_ok(path)
            continue
        assert header_ok(path)
        tensors = load_file(path)
        finite = all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
        assert finite == (r["corruption"] != "nan")


def test_documented_and_undocumented_repos(tiny_lake, truth):
    for repo_id, r in truth.items():
        if not r["classes"]:
            continue
        folder = tiny_lake / repo_id
        labels = list(json.loads((folder / "config.json").read_text())["id2label"].values())
        if r["documented"]:
            assert set(labels) - {"other"} == set(r["classes"])
            card = (folder / "README.md").read_text()
            assert all(c in card for c in r["classes"])
            continue
        assert labels == [f"LABEL_{i}" for i in range(len(labels))]
        raw = b"".join(p.read_bytes() for p in folder.iterdir() if not p.name.endswith(".safetensors"))
        path = weights_file(folder)
        (n,) = struct.unpack("<Q", path.read_bytes()[:8])
        raw += path.read_bytes()[8:8 + n]  # the header and its metadata (the recipe)
        text = (repo_id + raw.decode("utf-8", "replace")).lower()
        for name in r["classes"]:
            assert not re.search(rf"\b{re.escape(name.lower())}\b", text), (repo_id, name)


def test_resume_is_a_fast_no_op(tiny_lake):
    before = {p: p.stat().st_mtime_ns for p in tiny_lake.rglob("*.safetensors")}
    table = pq.read_table(tiny_lake / GROUND_TRUTH)
    summary = build_lake(tiny_lake, "tiny", seed=0, progress=False)
    assert {p: p.stat().st_mtime_ns for p in tiny_lake.rglob("*.safetensors")} == before
    assert pq.read_table(tiny_lake / GROUND_TRUTH).equals(table)
    assert summary.n_models == table.num_rows and summary.bytes_on_disk > 0
    trees = {t.root: t for t in summary.trees}
    assert {t.kind for t in summary.trees} == {"full", "LoRA", "mixed"}  # the family trees' too
    assert trees[L6_ROOT].n_holdout_classes == SIZES["tiny"].l6_holdout_classes and trees[IMAGE_ROOT].kind == "full"
    assert summary.to_dict()["trees"][0]["mean_accuracy"] is not None


def test_plan_is_deterministic():
    a, b = make_plan("tiny", 0), make_plan("tiny", 0)
    assert a.models == b.models
    assert [m.repo_id for m in make_plan("tiny", 1).models] != [m.repo_id for m in a.models]
    assert not any(m.corruption or not m.lineage_declared for m in make_plan("tiny", 0, Mess.none()).models
                   if m.root)
    small = make_plan("small", 0)
    children = [m for m in small.models if m.kind in ("image", "l3", "l6")]
    assert len(children) >= 300 and len(small.l6_classes) >= 40 and len(small.l6_holdout) >= 20


def test_extra_children_leave_the_rest_of_the_plan_as_it_was(monkeypatch):
    """Spare L6 and extra L3 children come from their own random streams: a lake built from the
    plan without them resumes into the plan with them by adding only them."""
    import dataclasses

    import zoo.build as build

    full, spec = make_plan("small", 0), SIZES["small"]
    monkeypatch.setitem(build.SIZES, "small", dataclasses.replace(SIZES["small"], l3_extra=0, l6_spare=0))
    without = make_plan("small", 0)
    in_full = {m.repo_id: m for m in full.models}
    assert all(in_full.get(m.repo_id) == m for m in without.models)
    added = [m for m in full.models if m.repo_id not in {w.repo_id for w in without.models}]
    assert len(added) == spec.l3_extra + spec.l6_spare and spec.l3_extra > 0
    assert all(m.kind == "l3" and len(m.classes) == len(full.l3_pool) // 2 and m.parent == m.root for m in added
               if m.root == build.L3_ROOT)
    assert len({m.repo_id for m in full.models}) == len(full.models)


def test_every_l6_training_class_has_a_documented_child():
    """Labels come only from documented models: a training class whose children were all drawn
    undocumented could never be learned, so the plan adds one documented child for it."""
    for size in SIZES:
        plan = make_plan(size, 0)
        documented = {m.classes[0] for m in plan.models if m.kind == "l6" and m.documented}
        assert set(plan.l6_classes) <= documented, size
    small = make_plan("small", 0)
    # seed 0's small lake drew two such classes; each gets exactly one extra, documented child
    extra = [m for m in small.models[-2:] if m.kind == "l6"]
    assert len(extra) == 2 and all(m.documented and m.split in ("train", "val") for m in extra)


def test_a_lake_finished_before_its_plan_grew_reads_as_incomplete(tiny_lake, tmp_path):
    import json
    import shutil

    from zoo.build import lake_is_complete

    assert lake_is_complete(tiny_lake)
    copy = tmp_path / "lake"
    shutil.copytree(tiny_lake, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    (copy / MANIFEST).write_text(json.dumps({k: v for k, v in manifest.items() if k != "n_planned"}))
    assert not lake_is_complete(copy)  # an older manifest: resume it (only new models get built)
    (copy / MANIFEST).write_text(json.dumps({**manifest, "finished": False}))
    assert not lake_is_complete(copy)
    assert not lake_is_complete(tmp_path / "nowhere")


def test_bad_input(tmp_path, tiny_lake, monkeypatch):
    with pytest.raises(ZooError, match="unknown lake size"):
        build_lake(tmp_path / "a", "huge")
    with pytest.raises(ZooError, match="unknown mess flag"):
        build_lake(tmp_path / "a", "tiny", chaos=3)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ZooError, match="choose another --out"):
        build_lake(blocker, "tiny")
    with pytest.raises(ZooError, match="writable --out"):
        build_lake(blocker / "lake", "tiny")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ZooError, match="holds no lake"):
        build_lake(tmp_path / "busy", "tiny")
    with pytest.raises(ZooError, match="size=tiny"):
        build_lake(tiny_lake, "small")

    from zoo import fashion_mnist
    monkeypatch.setattr(fashion_mnist, "DATA_DIR", tmp_path / "nowhere")
    fashion_mnist.load_split.cache_clear()
    try:
        with pytest.raises(ZooError, match="apt-get install dataset-fashion-mnist"):
            build_lake(tmp_path / "b", "tiny")
        assert not (tmp_path / "b").exists()
    finally:
        fashion_mnist.load_split.cache_clear()


def test_write_repo_is_atomic_and_corrupts_on_purpose(tmp_path):
    tensors = {"w": torch.randn(8, 4), "b": torch.zeros(8)}
    spec = RepoSpec("org/m", "A model.", base_model="org/base", relation="finetune", datasets=["d"],
                    labels=["cat", "dog"], documented=False, accuracy=0.9)
    for kind in (None, *hub_repo.CORRUPTIONS):
        spec.repo_id = f"org/m-{kind}"
        folder = hub_repo.write_repo(tmp_path, spec, tensors=tensors, config={}, recipe={"lr": "0.1"},
                                     corruption=kind)
        assert header_ok(folder / "model.safetensors") == (kind not in ("truncated", "bad_header"))
        assert json.loads((folder / "config.json").read_text())["id2label"] == {"0": "LABEL_0", "1": "LABEL_1"}
        assert hub_repo.read_accuracy(folder) == 0.9
    assert not list(tmp_path.glob("org/.*"))
    (tmp_path / "org" / ".m.partial-1").mkdir()
    hub_repo.clean_partials(tmp_path)
    assert not list(tmp_path.glob("org/.*"))


def test_a_process_with_lancedb_loaded_builds_without_forking_it(tiny_lake, tmp_path):
    """The demo flow has LanceDB loaded when it builds the lake: forking that process risks a
    deadlock (LanceDB warns on each fork), so the build runs from a fresh process instead."""
    import shutil
    import subprocess
    import sys

    lake = tmp_path / "lake"
    shutil.copytree(tiny_lake, lake)
    rows = pq.read_table(lake / GROUND_TRUTH).to_pylist()
    child = next(r["repo_id"] for r in sorted(rows, key=lambda r: r["repo_id"]) if r["root"] == L3_ROOT
                 and r["repo_id"] != L3_ROOT)
    shutil.rmtree(hub_repo.repo_dir(lake, child))
    script = (f"import lancedb; lancedb.connect({str(tmp_path / 'db')!r}).create_table('t', [{{'a': 1}}]); "
              f"from zoo.build import build_lake; build_lake({str(lake)!r}, 'tiny', seed=0, progress=False)")
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", script],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fork" not in done.stderr, done.stderr[-2000:]
    assert weights_file(hub_repo.repo_dir(lake, child)).exists()
