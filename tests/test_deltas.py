"""Rows read as changes from the tree's root (issue 17, item 6): the delta representation, mixed
trees of full fine-tunes and adapters, LoRA kept factored throughout, and the representation
recorded in the checkpoint and applied the same way at embed time."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from probex_core.data import ExpertError, LayerDataset, WeightRow, concat_datasets
from probex_core.probex import ProbeX, ProbeXConfig
from probex_core.train import (TrainConfig, build_probex, config_for, embed, evaluate,
                               representations, train_expert)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

L3_ROOT = "sentence-transformers/paraphrase-MiniLM-L3-v2"
# Children of the tiny lake's L3 tree rewritten as full fine-tunes (train, val and test splits).
MERGED = ("cortex-labs/minilm-l3-quanta-86", "cortex-labs/minilm-nova-827", "hkim/minilm-l3-run-54")
CLASSES = [f"class{i}" for i in range(6)]
SMALL = dict(r_U=8, r_V=8, r_T=16)


# -- a synthetic tree with a root ------------------------------------------------------------------


def tree_rows(n: int, d_H: int = 11, d_W: int = 13, *, kinds: str = "mixed", seed: int = 0,
              root_seed: int = 5, r: int = 5, per_child: int = len(CLASSES) // 2):
    """(rows, labels, root row) of a tree whose children change a shared root along class
    directions: child i's change is s B_i A_i with B_i a function of its `per_child` classes
    (plus noise). kinds "lora": every child an adapter; "dense": every child a full fine-tune
    W_root + s B A (plus a small full-rank change, as full fine-tuning makes); "mixed": alternating."""
    root = np.random.default_rng(root_seed).standard_normal((d_H, d_W)).astype(np.float32)
    tree = np.random.default_rng(1234)
    A0 = tree.standard_normal((r, d_W)) / np.sqrt(d_W)
    W = tree.standard_normal((len(CLASSES), d_H, r))
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for i in range(n):
        cls = sorted(rng.choice(len(CLASSES), per_child, replace=False).tolist())
        B = W[cls].sum(0) + 0.3 * rng.standard_normal((d_H, r))
        A = A0 + 0.03 * rng.standard_normal((r, d_W))
        s = float(rng.uniform(0.05, 0.2))
        dense = kinds == "dense" or (kinds == "mixed" and i % 2 == 0)
        rid = f"t/child-{seed}-{i}"
        if dense:
            X = root + s * B @ A + 0.01 * rng.standard_normal((d_H, d_W))
            rows.append(WeightRow(rid, X=X.astype(np.float32)))
        else:
            rows.append(WeightRow(rid, A=A.astype(np.float32), B=B.astype(np.float32), scale=s))
        labels.append([CLASSES[c] for c in cls] if per_child > 1 else CLASSES[cls[0]])
    return rows, labels, WeightRow("t/root", X=root)


def tree_split(n: int, seed: int, kinds: str = "mixed", root: bool = True, task: str = "multilabel",
               **kw) -> LayerDataset:
    rows, labels, root_row = tree_rows(n, kinds=kinds, seed=seed, per_child=1 if task == "text" else 3, **kw)
    return LayerDataset.from_rows(rows, tree="t/root", layer="q", labels=labels, task=task,
                                  classes=CLASSES, root=root_row if root else None)


def fast(**kw) -> TrainConfig:
    base = dict(max_epochs=60, patience=None, threads=1, refit=False)
    base.update(kw)
    return TrainConfig(**base)


def reference_rows(ds: LayerDataset) -> torch.Tensor:
    """Every row as the delta expert reads it, formed densely here only to check against:
    (n, d_H, d_W)."""
    out = ds.batch().dense().clone()
    if ds.is_mixed or not ds.is_lora:
        dense = ~ds.lora if ds.lora is not None else torch.ones(len(ds), dtype=torch.bool)
        out[dense] -= ds.root
    return out


# -- the delta path: shapes and values -----------------------------------------------------------


def test_mixed_rows_stay_as_they_are_and_batches_keep_their_order():
    ds = tree_split(9, 1)
    assert ds.is_mixed and not ds.is_lora
    assert ds.X.shape == (5, 11, 13) and ds.A.shape == (4, 5, 13) and ds.B.shape == (4, 11, 5)
    assert ds.lora.tolist() == [i % 2 == 1 for i in range(9)] and ds.root.shape == (11, 13)
    rows, _, _ = tree_rows(9, seed=1)
    want = torch.stack([torch.as_tensor(r.X) if r.X is not None else r.scale * torch.as_tensor(r.B @ r.A)
                        for r in rows])
    idx = torch.tensor([7, 0, 3, 4, 8])
    b = ds.batch(idx)
    assert b.is_mixed and len(b) == 5 and b.lora.tolist() == [True, False, True, False, False]
    assert torch.allclose(b.dense(), want[idx], atol=1e-5)
    assert ds.batch(torch.tensor([1, 3])).is_lora and ds.batch(torch.tensor([0, 2])).lora is None
    sub = ds.subset(idx)
    assert sub.is_mixed and sub.repo_ids == [ds.repo_ids[i] for i in idx] and sub.root is ds.root
    both = concat_datasets([ds.subset([0, 2]), ds.subset([1, 3]), ds.subset([4, 5])], tree="t/root")
    assert both.lora.tolist() == [False, False, True, True, False, True]
    assert torch.allclose(both.batch().dense(), want[[0, 2, 1, 3, 4, 5]], atol=1e-5)
    assert torch.equal(both.root, ds.root)
    d = ds.deltas()
    assert d.root is None and d.is_mixed and torch.allclose(d.batch().dense(), reference_rows(ds), atol=1e-5)
    with pytest.raises(ExpertError, match="root"):
        tree_split(4, 1, root=False).deltas()


def test_factored_statistics_equal_the_dense_ones():
    """Mean, norms and second moments of a mix, centred or not, from the factors: the same as the
    dense rows' (formed here only to compare)."""
    ds = tree_split(9, 2).deltas()
    X = ds.batch().dense().double()
    M = ds.mean_matrix()
    assert torch.allclose(M.double(), X.mean(0), atol=1e-5)
    for center in (None, M):
        Xc = X if center is None else X - center.double()
        assert torch.allclose(ds.frobenius_norms(center).double(), Xc.flatten(1).norm(dim=1), rtol=1e-4)
        for unit in (False, True):
            w = 1 / Xc.flatten(1).norm(dim=1).pow(2) if unit else torch.ones(len(ds), dtype=torch.float64)
            left, right = ds.second_moments(center, unit_rows=unit)
            assert torch.allclose(left.double(), torch.einsum("n,nhw,nkw->hk", w, Xc, Xc), rtol=1e-3, atol=1e-4)
            assert torch.allclose(right.double(), torch.einsum("n,nhw,nhv->wv", w, Xc, Xc), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("centered,row_norm", [(False, False), (True, False), (True, True), (False, True)])
def test_delta_expert_reads_each_row_as_its_change(centered, row_norm):
    """The first layer of a delta expert on a mixed batch equals ProbeX on the dense deltas: dense
    rows minus W_root, LoRA rows s B A, minus the mean when centred."""
    ds = tree_split(9, 3)
    torch.manual_seed(0)
    cfg = ProbeXConfig(d_H=11, d_W=13, n_outputs=6, r_U=4, r_V=3, r_T=5, input_scale=0.7,
                       centered=centered, row_norm=row_norm, representation="delta")
    m = ProbeX(cfg)
    m.input_root.copy_(ds.root)
    if centered:
        m.input_mean.copy_(torch.randn(11, 13))
    ref = reference_rows(ds) - (m.input_mean if centered else 0)
    want = ref @ m.U
    want = m.V.T @ want / 0.7
    if row_norm:
        want = want / ref.flatten(1).norm(dim=1)[:, None, None]
    with torch.no_grad():
        assert torch.allclose(m.probe_responses(ds.batch()), torch.relu(want), atol=1e-4)
        assert m.encode(ds.batch()).shape == (9, 5) and m(ds.batch()).shape == (9, 6)
    # the text probe's factor: the top singular directions of each row as read
    t = ProbeX(ProbeXConfig(d_H=11, d_W=13, head="text", text_dim=13, r_U=4, r_V=3, r_T=5,
                            centered=centered, representation="delta", text_probe=True, probe_rank=3))
    t.input_root.copy_(ds.root)
    if centered:
        t.input_mean.copy_(m.input_mean)
    with torch.no_grad():
        F_ = t.probe_factor(ds.batch())  # (n, m, d_W)
    unit = ref / ref.flatten(1).norm(dim=1)[:, None, None]
    _, S, Vh = torch.linalg.svd(unit.double(), full_matrices=False)
    top = S[:, :3, None] * Vh[:, :3]
    assert F_.shape == (9, 3, 13)
    assert torch.allclose(F_.double().transpose(1, 2) @ F_.double(), top.transpose(1, 2) @ top, atol=1e-4)


def test_raw_and_delta_are_one_expert_for_centred_dense_rows():
    """X - mean(X) == (X - W_root) - mean(X - W_root): centred, raw and delta dense rows are the
    same input, so the same seed gives the same expert up to float rounding."""
    tr, va, te = tree_split(40, 1, kinds="dense"), tree_split(12, 2, kinds="dense"), tree_split(20, 3, kinds="dense")
    assert representations(tr, TrainConfig()) == ["delta"]  # "auto": one run, the two are one
    raw = train_expert(tr, va, config_for(tr, **SMALL), fast(representation="raw"))
    delta = train_expert(tr, va, config_for(tr, **SMALL), fast(representation="delta"))
    assert raw.config.representation == "raw" and delta.config.representation == "delta"
    assert raw.config.centered and delta.config.centered
    assert delta.config.input_scale == pytest.approx(raw.config.input_scale, rel=1e-5)
    # the raw expert's mean is the delta expert's root + mean: what each subtracts from a dense row
    assert torch.allclose(raw.model.input_mean, delta.model.input_root + delta.model.input_mean, atol=1e-5)
    with torch.no_grad():
        a, b = raw.model(te.batch()), delta.model(te.batch())
    assert torch.allclose(a, b, atol=1e-3 * float(a.abs().max())), (a - b).abs().max()
    assert evaluate(raw.model, te, "multilabel")["accuracy"] == pytest.approx(
        evaluate(delta.model, te, "multilabel")["accuracy"], abs=0.02)
    # uncentred, the two differ (the raw rows carry W_root): "auto" trains both, validation picks
    both = train_expert(tr, va, config_for(tr, **SMALL), fast(center=False))
    assert set(both.representation_scores) == {"delta", "raw"}
    assert both.config.representation == max(both.representation_scores, key=both.representation_scores.get)


def test_lora_rows_are_the_same_either_way():
    """A LoRA row already is a change: raw and delta experts of a LoRA tree are bit for bit equal."""
    tr, va = tree_split(20, 1, kinds="lora"), tree_split(8, 2, kinds="lora")
    raw = train_expert(tr, va, config_for(tr, **SMALL), fast(representation="raw", max_epochs=10))
    delta = train_expert(tr, va, config_for(tr, **SMALL), fast(max_epochs=10))
    assert delta.config.representation == "delta" and raw.history == delta.history
    with torch.no_grad():
        assert torch.equal(raw.model(va.batch()), delta.model(va.batch()))


def test_a_mixed_tree_trains_one_expert_on_changes():
    tr, va, te = tree_split(60, 1), tree_split(16, 2), tree_split(30, 3)
    assert representations(tr, TrainConfig()) == ["delta"]
    res = train_expert(tr, va, config_for(tr, **SMALL), fast(max_epochs=150))
    assert res.config.representation == "delta" and torch.equal(res.model.input_root, tr.root)
    ev = evaluate(res.model, te, "multilabel")
    assert ev["accuracy"] > 0.8, ev
    # both kinds are read as the same kind of thing: each half of the test rows on its own
    for keep in (~te.lora, te.lora):
        part = te.subset(torch.nonzero(keep).flatten())
        assert evaluate(res.model, part, "multilabel")["accuracy"] > 0.75
    no_root = tree_split(8, 1, root=False)
    assert representations(no_root, TrainConfig()) == ["raw"]  # rows as extracted: tasks/train.py refuses the tree
    with pytest.raises(ExpertError, match="root"):
        build_probex(no_root, config_for(no_root, **SMALL), fast(representation="delta"))
    with pytest.raises(ValueError, match="mixup"):
        train_expert(tr, va, config_for(tr, **SMALL), fast(mixup=1.0, max_epochs=1))



def test_checkpoint_keeps_the_representation_and_the_root(tmp_path):
    from storage.experts import load_expert, save_expert

    tr, va = tree_split(20, 1), tree_split(8, 2)
    res = train_expert(tr, va, config_for(tr, **SMALL), fast(max_epochs=5))
    path = save_expert(tmp_path, "t/root", res.model, layer="q", labels=CLASSES)
    config = json.loads((Path(path.uri) / "config.json").read_text())
    assert config["representation"] == "delta" == config["probex"]["representation"]
    loaded = load_expert(path.parent)
    assert loaded.probex_config == res.model.cfg and torch.equal(loaded.model.input_root, tr.root)
    with torch.no_grad():
        assert torch.equal(loaded.model(va.batch()), res.model(va.batch()))
    # an expert saved before representations existed read raw rows, and loads as such
    raw = ProbeX(ProbeXConfig(d_H=11, d_W=13, n_outputs=6, **SMALL))
    path = save_expert(tmp_path, "t/old", raw, layer="q", labels=CLASSES)
    cfg_file = Path(path.uri) / "config.json"
    old = json.loads(cfg_file.read_text())
    del old["representation"], old["probex"]["representation"]
    cfg_file.write_text(json.dumps(old))
    old_loaded = load_expert(path.parent)
    assert old_loaded.probex_config.representation == "raw" and old_loaded.model.input_root is None
    with pytest.raises(ValueError, match="representation"):
        ProbeXConfig(d_H=2, d_W=2, n_outputs=2, representation="diff")

class FactorProducts(TorchDispatchMode):
    """Records every matrix product whose result has a row's (d_H, d_W) shape and whose inner
    dimension is a LoRA rank: the product B @ A of some row, had anything formed it."""

    def __init__(self, shape, ranks):
        super().__init__()
        self.shape, self.ranks, self.seen = tuple(shape), set(ranks), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("mm", "bmm", "addmm", "baddbmm", "matmul") and isinstance(out, torch.Tensor):
            a = args[-2] if name in ("addmm", "baddbmm") else args[0]
            if tuple(out.shape[-2:]) == self.shape and a.shape[-1] in self.ranks:
                self.seen.append((name, tuple(a.shape), tuple(out.shape)))
        return out


@pytest.mark.parametrize("head", ["multilabel", "text"])
def test_lora_rows_are_never_multiplied_out(head):
    """Training, the text probe and embedding of a mixed, centred, row-normed delta expert: no
    product forms a LoRA row's d_H x d_W matrix (its statistics come from the factors)."""
    kw = dict(head=head, text_dim=13) if head == "text" else {}
    tr, va = tree_split(12, 1, task=head), tree_split(6, 2, task=head)
    text = torch.randn(len(CLASSES), 13) if head == "text" else None
    watch = FactorProducts((11, 13), ranks={5})
    with watch:
        res = train_expert(tr, va, config_for(tr, **SMALL, **kw),
                           fast(max_epochs=3, center=True, row_norm=True, init="data"), text_emb=text)
        embed(res.model, va)
        if head == "text":
            res.model.probe_factor(va.batch())
    assert res.config.representation == "delta" and res.config.centered and res.config.row_norm
    assert head != "text" or res.config.text_probe
    assert watch.seen == []
    # the check sees a product that does form one
    with watch:
        tr.batch().dense()
    assert watch.seen



# -- a mixed tree from real parts, end to end ------------------------------------------------------


def build_mixed_lake(tiny_lake: Path, out: Path, merged=MERGED) -> Path:
    """The tiny lake's L3 tree (its root and LoRA children, the lake's ground truth) where the
    `merged` children are full fine-tunes: each one's LoRA merged into the root's weights
    (W + scale * B A, PEFT's merge) and written as a dense model.safetensors beside the classifier
    it trained, its card a finetune of the root. What changed is exactly what the adapter changed."""
    from safetensors.torch import load_file, save_file

    import pyarrow.parquet as pq

    gt = {r["repo_id"]: r for r in pq.read_table(tiny_lake / "_ground_truth.parquet").to_pylist()}
    out.mkdir(parents=True)
    shutil.copy2(tiny_lake / "_ground_truth.parquet", out / "_ground_truth.parquet")
    for repo_id, row in gt.items():
        if row["root"] == L3_ROOT:
            shutil.copytree(tiny_lake / repo_id, out / repo_id)
    root = load_file(out / L3_ROOT / "model.safetensors")
    for repo_id in merged:
        folder = out / repo_id
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert not cfg["use_rslora"] and not cfg["rank_pattern"] and not cfg["alpha_pattern"]
        scale = cfg["lora_alpha"] / cfg["r"]
        factors = load_file(folder / "adapter_model.safetensors")
        weights = dict(root)
        prefix = "base_model.model."
        for key, A in factors.items():
            if key.endswith(".lora_A.weight"):
                module = key[len(prefix):-len(".lora_A.weight")]
                B = factors[key.replace("lora_A", "lora_B")]
                weights[f"{module}.weight"] = root[f"{module}.weight"] + scale * B @ A
            elif ".lora_" not in key:
                weights[key[len(prefix):]] = A  # the classifier PEFT kept whole (modules_to_save)
        (folder / "adapter_config.json").unlink()
        (folder / "adapter_model.safetensors").unlink()
        save_file({k: v.contiguous() for k, v in weights.items()}, folder / "model.safetensors",
                  metadata={"format": "pt"})
        card = (folder / "README.md").read_text()
        card = (card.replace("base_model_relation: adapter", "base_model_relation: finetune")
                .replace("library_name: peft", "library_name: transformers")
                .replace("- peft\n", "").replace("- lora\n", "").replace("A LoRA adapter", "A fine-tune"))
        (folder / "README.md").write_text(card)
    return out


def train_without_root(settings, out) -> dict:
    """The mixed tree trained from a copy of its shards without the root's own rows (which the
    extract step planned because the tree is mixed)."""
    from probex_core.names import slug
    from tasks.pipeline import catalog_for, text_encoder
    from tasks.train import train_tree, tree_root

    catalog = catalog_for(settings)
    root = tree_root(catalog, L3_ROOT)
    shards = out / "shards"
    shutil.copytree(settings.shards, shards)
    removed = list(shards.rglob(f"{slug(L3_ROOT)}@{root['sha'][:12]}.parquet"))
    assert removed  # the extract step read the root's layers because the tree mixes kinds
    for path in removed:
        path.unlink()
    return train_tree(catalog, str(shards), str(out / "experts"), L3_ROOT,
                      encoder=text_encoder(settings)).to_dict()


@pytest.fixture(scope="module")
def mixed_home(tiny_lake, tmp_path_factory):
    """crawl -> extract (the children and, the tree being mixed, the root) -> train -> embed, on
    the mixed L3 tree; and one training from the shards without the root's rows."""
    from probex_core.settings import Settings, apply_runtime_env
    from tasks.pipeline import crawl_step, embed_step, extract_step, train_step

    home = tmp_path_factory.mktemp("mixed")
    build_mixed_lake(tiny_lake, home / "lake")
    s = Settings.load(home)
    apply_runtime_env(s)
    steps = {"crawl": crawl_step(s, str(s.lake)), "extract": extract_step(s, mode="candidates")}
    steps["train_without_root"] = train_without_root(s, tmp_path_factory.mktemp("no-root"))
    steps["train"] = train_step(s)
    steps["embed"] = embed_step(s)
    return s, steps


def test_mixed_tree_end_to_end(mixed_home, tiny_lake):
    from storage.experts import load_current
    from tasks.pipeline import catalog_for
    from tasks.train import load_layer, tree_root

    s, steps = mixed_home
    catalog = catalog_for(s)
    children = catalog.tree_children(L3_ROOT)
    kinds = {r["repo_id"]: r["relation"] for r in children}
    assert {kinds[m] for m in MERGED} == {"finetune"} and "adapter" in kinds.values()
    # without the root's row a mixed layer cannot be read as changes: no expert, and it says why
    skipped = steps["train_without_root"]
    assert skipped["version"] is None and "root's own row" in skipped["skipped"]
    report = steps["train"]["trees"][L3_ROOT]
    assert report["representation"] == "delta" and report["version"] and report["promoted"]
    expert = load_current(s.experts, L3_ROOT)
    root = tree_root(catalog, L3_ROOT)
    assert expert.config["representation"] == "delta" == expert.probex_config.representation
    assert expert.config["info"]["root"] == root
    layer = expert.config["layer"]
    rows, root_row = load_layer(s.shards, L3_ROOT, layer, children, root)
    assert torch.equal(expert.model.input_root, torch.as_tensor(root_row.X))
    assert {r.is_lora for r in rows.values()} == {True, False}
    # a merged child's row, read as its change, is the adapter it was made from
    from safetensors.torch import load_file

    module = f"base_model.model.{layer.removesuffix('.weight')}"
    factors = load_file(tiny_lake / MERGED[0] / "adapter_model.safetensors")
    cfg = json.loads((tiny_lake / MERGED[0] / "adapter_config.json").read_text())
    change = cfg["lora_alpha"] / cfg["r"] * factors[f"{module}.lora_B.weight"] @ factors[f"{module}.lora_A.weight"]
    got = torch.as_tensor(rows[MERGED[0]].X) - torch.as_tensor(root_row.X)
    assert torch.allclose(got, change, atol=1e-6) and change.norm() > 0
    # every child has its vector, dense and LoRA alike, and it is the expert applied to the
    # child's change: a raw twin of the expert (same weights, no root) given the deltas
    emb = {r["repo_id"]: r for r in catalog.read("embeddings", where=f"tree_id = '{L3_ROOT}'").to_pylist()}
    assert set(emb) == set(rows) and {r["expert_version"] for r in emb.values()} == {expert.version}
    twin = ProbeX(dataclasses.replace(expert.probex_config, representation="raw"))
    twin.load_state_dict({k: v for k, v in expert.model.state_dict().items() if k != "input_root"})
    ids = sorted(rows)
    changes = [WeightRow(r, X=rows[r].X - root_row.X) if not rows[r].is_lora else rows[r] for r in ids]
    want = torch.nn.functional.normalize(torch.as_tensor(embed(twin, LayerDataset.from_rows(
        changes, tree=L3_ROOT, layer=layer))), dim=-1)
    got = torch.tensor(np.stack([emb[r]["vector"] for r in ids]), dtype=torch.float32)
    assert torch.allclose(got, want, atol=1e-4)
    # and not the expert applied to the raw rows
    raw = torch.nn.functional.normalize(torch.as_tensor(embed(twin, LayerDataset.from_rows(
        [rows[r] for r in ids], tree=L3_ROOT, layer=layer))), dim=-1)
    dense = [i for i, r in enumerate(ids) if not rows[r].is_lora]
    assert not torch.allclose(got[dense], raw[dense], atol=1e-2)


def _dense_rows(ds: LayerDataset) -> dict[str, torch.Tensor]:
    """repo id -> its dense matrix in `ds` (LoRA rows left out)."""
    lora = ds.lora.tolist() if ds.lora is not None else [ds.is_lora] * len(ds)
    ids = [r for r, is_lora in zip(ds.repo_ids, lora) if not is_lora]
    return dict(zip(ids, ds.X)) if ids else {}


def test_the_baselines_read_a_mixed_trees_rows_as_changes_from_the_experts_root(mixed_home, monkeypatch):
    """Dense and StatNN train and are scored on the rows the delta expert reads (dense X - W_root
    against the root it was trained on; LoRA rows as they are), not raw matrices beside LoRA deltas;
    the expert itself is still given the rows as extracted (it subtracts its own root)."""
    import tasks.evaluate as ev
    from tasks.pipeline import catalog_for, text_encoder
    from tasks.train import load_layer, tree_root

    s, _ = mixed_home
    catalog = catalog_for(s)
    gt = ev.load_ground_truth(s.lake)
    splits = ev.tree_splits(catalog, s.shards, str(s.experts), L3_ROOT, gt)
    layer = splits.expert.config["layer"]
    rows, root_row = load_layer(s.shards, L3_ROOT, layer, catalog.tree_children(L3_ROOT), tree_root(catalog, L3_ROOT))
    root = torch.as_tensor(root_row.X)
    assert torch.equal(splits.expert.model.input_root, root)
    raw = {r: torch.as_tensor(row.X) for r, row in rows.items() if not row.is_lora}
    assert _dense_rows(splits.train) and all(torch.equal(x, raw[r]) for r, x in _dense_rows(splits.train).items())

    seen = []

    def spy(trainer):
        def run(tr, va, tcfg, **kw):
            seen.append((trainer.__name__, tr, va))
            return trainer(tr, va, tcfg, **kw)
        return run

    scored = []
    real_scores = ev._scores
    monkeypatch.setattr(ev, "_scores", lambda model, head, test, *a: scored.append((model, test)) or real_scores(model, head, test, *a))
    monkeypatch.setattr(ev, "train_dense", spy(ev.train_dense))
    monkeypatch.setattr(ev, "train_statnn", spy(ev.train_statnn))
    report = ev.evaluate_tree(splits, text_encoder(s), tcfg=fast(max_epochs=3), device="cpu")
    assert report["representation"] == "delta" and report["synthetic"] is False
    assert "accuracy" in report["dense"] and "accuracy" in report["statnn"]
    assert {name for name, _, _ in seen} == {"train_dense", "train_statnn"}
    tests = [t for m, t in scored if m is not splits.expert.model and t is not None]
    assert tests and splits.test is not None
    checked = 0
    for ds in [d for _, tr, va in seen for d in (tr, va) if d is not None] + tests:
        assert ds.root is None
        for r, x in _dense_rows(ds).items():
            assert torch.allclose(x, raw[r] - root, atol=1e-6) and not torch.allclose(x, raw[r])
            checked += 1
    assert checked
    # the expert's own scores are on the rows as extracted
    assert [t for m, t in scored if m is splits.expert.model] == [splits.test]


def test_a_trees_report_says_whether_its_ground_truth_is_synthetic(mixed_home):
    import tasks.evaluate as ev
    from tasks.pipeline import catalog_for, text_encoder

    s, _ = mixed_home
    catalog = catalog_for(s)
    gt = ev.load_ground_truth(s.lake)
    split = lambda truth: ev.tree_splits(catalog, s.shards, str(s.experts), L3_ROOT, truth)  # noqa: E731
    assert split(gt).synthetic is False
    assert split({k: {**v, "synthetic": k != L3_ROOT} for k, v in gt.items()}).synthetic is True
    older = {k: {c: x for c, x in v.items() if c != "synthetic"} for k, v in gt.items()}  # before the column
    assert split(older).synthetic is False
    assert ev.evaluate_tree(split({k: {**v, "synthetic": True} for k, v in gt.items()}), text_encoder(s),
                            baselines=False)["synthetic"] is True


def test_a_raw_expert_s_baselines_read_the_rows_as_they_are():
    from types import SimpleNamespace

    from tasks.evaluate import expert_view

    tr, va = tree_split(12, 1), tree_split(6, 2)
    raw = train_expert(tr, va, config_for(tr, **SMALL), fast(representation="raw", max_epochs=2))
    assert expert_view(tr, SimpleNamespace(probex_config=raw.config, model=raw.model)) is tr
    delta = train_expert(tr, va, config_for(tr, **SMALL), fast(representation="delta", max_epochs=2))
    seen = expert_view(dataclasses.replace(tr, root=None), SimpleNamespace(probex_config=delta.config, model=delta.model))
    assert seen.root is None and torch.allclose(seen.batch().dense(), reference_rows(tr), atol=1e-5)
