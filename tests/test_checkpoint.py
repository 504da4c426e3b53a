"""Checkpoints: exact round trip, new-then-switch versions, no unpickling, failed saves."""

import json
import os

import pytest
import torch

import storage.experts as store
from probex_core.checkpoint import CheckpointError, tree_slug
from storage.experts import current_version, list_versions, load_expert, save_expert
from probex_core.probex import ProbeX, ProbeXConfig
from probex_core.data import WeightBatch


pytestmark = pytest.mark.usefixtures("one_torch_thread")



def model(head="multilabel", centered=True, seed=0):
    torch.manual_seed(seed)
    m = ProbeX(ProbeXConfig(d_H=6, d_W=10, n_outputs=3, head=head, r_U=4, r_V=4, r_T=5,
                            text_dim=7, input_scale=0.123, centered=centered))
    if centered:
        m.input_mean.copy_(torch.randn(6, 10))
    return m.eval()


@pytest.mark.parametrize("head", ["multilabel", "text"])
def test_round_trip_exact(tmp_path, head):
    m = model(head)
    t = torch.randn(4, 7)
    path = save_expert(tmp_path, "org/tree-1", m, layer="blocks.3.q", labels=["a", "b", "c"],
                       text_encoder="sentence-transformers/all-MiniLM-L6-v2", prompt="{}",
                       metrics={"accuracy": 0.9}, extra_tensors={"class_text_emb": t},
                       info={"n_train": 10})
    assert os.path.basename(path.parent) == "org--tree-1"
    assert sorted(os.listdir(path.uri)) == ["config.json", "model.safetensors"]
    with open(os.path.join(path.uri, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["tree"] == "org/tree-1" and cfg["layer"] == "blocks.3.q"
    assert cfg["normalisation"] == {"input_scale": 0.123, "centered": True}
    assert cfg["labels"] == ["a", "b", "c"] and cfg["metrics"]["accuracy"] == 0.9
    assert cfg["version"] == path.name and cfg["created"]
    loaded = load_expert(path.parent)  # tree folder: follows `current`
    assert loaded.version == path.name and loaded.probex_config == m.cfg
    assert torch.equal(loaded.extra["class_text_emb"], t)
    b = WeightBatch(X=torch.randn(5, 6, 10))
    with torch.no_grad():
        assert torch.equal(loaded.model(b, t), m(b, t))
        assert torch.equal(loaded.model.encode(b), m.encode(b))


def test_new_version_then_switch(tmp_path):
    p1 = save_expert(tmp_path, "t", model(seed=1), layer="l", labels=["a", "b", "c"], version="v1")
    p2 = save_expert(tmp_path, "t", model(seed=2), layer="l", labels=["a", "b", "c"], version="v2")
    tree_dir = p1.parent
    assert current_version(tree_dir) == "v2" and list_versions(tree_dir) == ["v1", "v2"]
    with pytest.raises(CheckpointError):  # a version is never overwritten
        save_expert(tmp_path, "t", model(), layer="l", labels=["a", "b", "c"], version="v1")
    p3 = save_expert(tmp_path, "t", model(seed=3), layer="l", labels=["a"], version="v3",
                     make_current=False)
    assert current_version(tree_dir) == "v2" and os.path.isdir(p3.uri)
    assert os.path.isdir(p2.uri)


def test_failed_save_keeps_current(tmp_path, monkeypatch):
    good = save_expert(tmp_path, "t", model(), layer="l", labels=["a", "b", "c"], version="good")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(store.os, "fsync", boom)  # the disk fails while the new version is written
    with pytest.raises(OSError):
        save_expert(tmp_path, "t", model(seed=5), layer="l", labels=["a", "b", "c"], version="bad")
    tree_dir = good.parent
    assert current_version(tree_dir) == "good"
    assert sorted(os.listdir(tree_dir)) == ["current", "good"]  # no temp folder left behind
    assert load_expert(tree_dir).version == "good"


def test_load_rejects_tampering_and_missing(tmp_path):
    p = save_expert(tmp_path, "t", model(), layer="l", labels=["a", "b", "c"])
    w = os.path.join(p.uri, "model.safetensors")
    with open(w, "rb") as f:
        data = bytearray(f.read())
    data[-1] ^= 0xFF
    with open(w, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_expert(p)
    with pytest.raises(CheckpointError):
        load_expert(tmp_path / "nowhere")


def test_tree_slug():
    assert tree_slug("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers--all-MiniLM-L6-v2"
    assert "/" not in tree_slug("a/b c/../d") and not tree_slug("../x").startswith(".")
