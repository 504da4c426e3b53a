"""The `hard` lake (issue 20): its specification, its bad-input rules, and a scaled-down build.

The full hard lake is built by the benchmark only; here `build_lake(..., limit=1)` builds the roots
and one in-distribution and one held-out child of each tree of the very same plan.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from zoo.build import (GROUND_TRUTH, L3_ROOT, L3D_ROOT, L6_ROOT, MANIFEST, SIZES, SizeSpec, build_lake,
                       check_tree_classes, lake_is_complete, make_plan)
from zoo.types import ZooError


@pytest.fixture(scope="module")
def plan():
    return make_plan("hard", 0)


def test_hard_trees_are_as_the_issue_specifies(plan):
    by_kind = Counter(m.kind for m in plan.models)
    # a 50-of-100 multi-label tree of >= 600 children
    assert len(plan.l3_pool) == 100 and by_kind["l3"] >= 600
    assert {len(m.classes) for m in plan.models if m.kind == "l3"} == {50}
    # the many-class single-concept tree: >= 500 classes, >= 4 children each, a fifth held out
    # (L6) and a second one, >= 200 classes, a fifth held out, on a base that is not the text encoder
    for kind, training, holdout, least in (("l6", plan.l6_classes, plan.l6_holdout, 500),
                                           ("l3d", plan.l3d_classes, plan.l3d_holdout, 200)):
        per_class = Counter(m.classes[0] for m in plan.models if m.kind == kind)
        assert len(training) + len(holdout) >= least and len(holdout) == (len(training) + len(holdout)) // 5
        assert set(per_class) == {*training, *holdout} and min(per_class.values()) >= 4
        assert {m.split == "holdout" for m in plan.models if m.kind == kind and m.classes[0] in holdout} == {True}
        assert not {m.split for m in plan.models if m.kind == kind and m.classes[0] in training} & {"holdout"}
    assert {m.root for m in plan.models if m.kind == "l3d"} == {L3D_ROOT} != {L6_ROOT}
    assert not any(m.kind == "image" for m in plan.models)
    # L3D draws its classes from L6's, keeping each side: no L6 held-out class is an L3D training one
    assert set(plan.l3d_classes) <= set(plan.l6_classes) and set(plan.l3d_holdout) <= set(plan.l6_holdout)
    assert len(set(plan.l3_pool) | set(plan.l6_classes) | set(plan.l6_holdout)) == 600


def test_class_names_that_would_give_a_wrong_metric_are_refused():
    check_tree_classes("T", ["dog", "cat"], ["fish"])
    with pytest.raises(ZooError, match="must not be empty"):
        check_tree_classes("T", ["dog", " "], ["fish"])
    with pytest.raises(ZooError, match="training class names must be distinct; given twice: dog"):
        check_tree_classes("T", ["dog", "Dog "], ["fish"])
    with pytest.raises(ZooError, match="held-out class names must be distinct"):
        check_tree_classes("T", ["dog"], ["fish", "fish"])
    with pytest.raises(ZooError, match="held-out classes must not be training classes; both: cat"):
        check_tree_classes("T", ["dog", "cat"], ["CAT"])


def test_a_size_that_cannot_be_built_is_refused():
    hard = SIZES["hard"]
    for bad, match in ((dict(l3d_classes=hard.l6_classes + 1), "drawn from the L6 classes"),
                       (dict(l3d_classes=0), "l3d children need at least one l3d class"),
                       (dict(min_lemmas=10), "min_lemmas >= n_train"),
                       (dict(l6=-1), "non-negative"),
                       (dict(l3_pool=2), "too small")):
        with pytest.raises(ZooError, match=match):
            dataclasses.replace(hard, **bad)
    with pytest.raises(ZooError, match="limit must be a positive"):
        build_lake(Path("/nonexistent/never-written"), "hard", limit=0)
    assert isinstance(hard, SizeSpec)


def _canonical_safetensors(data: bytes) -> bytes:
    """The safetensors writer orders the header's metadata as a hash map does, differently from one
    process to the next (HEAD's tiny lake too): compare the header as sorted JSON, then the data."""
    n = struct.unpack("<Q", data[:8])[0]
    try:
        header = json.loads(data[8:8 + n])
    except ValueError:  # a corrupted file whose header does not parse: its bytes as they are
        return data
    return json.dumps(header, sort_keys=True).encode() + data[8 + n:]


def _digest(lake: Path) -> str:
    """Every file's bytes (safetensors headers as sorted JSON); the manifest without its timings."""
    digest = hashlib.sha1()
    for path in sorted(p for p in lake.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == MANIFEST:
            doc = {k: v for k, v in json.loads(data).items() if k not in ("seconds", "resumed", "built_now")}
            data = json.dumps(doc, sort_keys=True).encode()
        elif path.suffix == ".safetensors":
            data = _canonical_safetensors(data)
        digest.update(str(path.relative_to(lake)).encode() + b"\0" + data)
    return digest.hexdigest()


@pytest.mark.slow
def test_a_scaled_down_hard_lake_is_laid_out_deterministic_and_truthful(tmp_path, plan):
    a = build_lake(tmp_path / "a", "hard", seed=0, progress=False, limit=1)
    build_lake(tmp_path / "b", "hard", seed=0, progress=False, limit=1)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")

    lake = tmp_path / "a"
    truth = {r["repo_id"]: r for r in pq.read_table(lake / GROUND_TRUTH).to_pylist()}
    planned = {m.repo_id: m for m in plan.models}
    roots = {L3_ROOT, L6_ROOT, L3D_ROOT}
    assert {r for r, g in truth.items() if g["parent"] is None} == roots
    children = [g for g in truth.values() if g["parent"] is not None]
    # one in-distribution child per tree, and one held-out child per single-concept tree
    assert Counter((g["root"], g["split"] == "holdout") for g in children) == {
        (L3_ROOT, False): 1, (L6_ROOT, False): 1, (L6_ROOT, True): 1, (L3D_ROOT, False): 1, (L3D_ROOT, True): 1}
    for g in children:
        m = planned[g["repo_id"]]
        assert (g["root"], tuple(g["classes"]), g["split"], g["documented"]) == (m.root, m.classes, m.split, m.documented)
        assert g["accuracy"] is not None and g["accuracy"] >= 0.5  # learned its task (chance 0.5 or 0.02)
        held_out = plan.l6_holdout if m.kind == "l6" else plan.l3d_holdout
        assert (g["split"] == "holdout") == (m.kind != "l3" and m.classes[0] in held_out)
        card = (lake / g["repo_id"] / "README.md").read_text()
        assert ("base_model: " + g["root"] in card) == g["lineage_declared"]
        assert (lake / g["repo_id"] / "adapter_model.safetensors").exists()
    manifest = json.loads((lake / MANIFEST).read_text())
    assert manifest["limit"] == 1 and not manifest["finished"] and not lake_is_complete(lake)
    assert {t["root"]: t["n_holdout_classes"] for t in manifest["trees"]} == {L3_ROOT: 0, L6_ROOT: 100, L3D_ROOT: 40}
    assert a.n_finetuned == 5
