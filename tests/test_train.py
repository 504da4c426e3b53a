"""Training both heads on synthetic trees with a known signal; determinism; layer choice;
bad input raises typed errors."""

import numpy as np
import pytest
import torch

from probex_core.data import (EmptyDatasetError, ExpertError, LayerDataset, NonFiniteError,
                              ShapeMismatchError, VocabularyError, WeightRow, synthetic_rows)
from probex_core.train import (TrainConfig, choose_layer, config_for, embed, evaluate,
                               evaluate_zeroshot, probex_trainer, refit, train_expert)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


C = 8  # classes in the multi-label tree; each model is trained on 4 of them (chance 0.5)
CLASSES = [f"class{i}" for i in range(C)]
SMALL = dict(r_U=16, r_V=16, r_T=32)


def fast(**kw):
    # Data-started probes (unit columns) begin with small responses: on the synthetic LoRA tree
    # below, 60 epochs gave 0.85 test accuracy and 150 gave 0.997.
    base = dict(max_epochs=150, patience=15, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def multilabel_split(n, seed, d=24, dense=False, signal=1.0, mixing_seed=1234, classes=CLASSES,
                     layer="l"):
    rng = np.random.default_rng(seed)
    codes = np.random.default_rng(7).standard_normal((len(classes), 12))
    labs = [sorted(rng.choice(len(classes), len(classes) // 2, replace=False).tolist())
            for _ in range(n)]
    rows, labels = synthetic_rows(n, d, d, classes=classes, class_codes=codes, labels_of=labs,
                                  seed=seed, dense=dense, signal=signal, mixing_seed=mixing_seed)
    return LayerDataset.from_rows(rows, tree="synthetic/tree", layer=layer, labels=labels,
                                  task="multilabel", classes=classes)


@pytest.fixture(scope="module")
def ml():
    return multilabel_split(160, 1), multilabel_split(40, 2), multilabel_split(80, 3)


def test_multilabel_learns(ml):
    tr, va, te = ml
    res = train_expert(tr, va, config_for(tr, **SMALL), fast())
    ev = evaluate(res.model, te, "multilabel")
    assert ev["accuracy"] > 0.85 and ev["map"] > 0.85, ev
    assert res.best_epoch >= 1 and res.seconds > 0 and len(res.history) == res.epochs_run
    # normalisation is computed on the training rows and stored in the config
    if res.config.row_norm:  # LoRA rows: each divided by its own norm, no dataset-wide scale
        assert tr.is_lora and res.config.input_scale == 1.0
    else:
        assert res.config.input_scale == pytest.approx(float(tr.frobenius_norms().mean()), rel=1e-5)
    assert res.config.centered is False  # LoRA rows: no centring by default
    assert embed(res.model, te).shape == (80, 32)


def test_multilabel_refit_learns_from_validation_models_too(ml):
    """The final multi-label expert is trained again on training + validation rows for the epochs
    validation chose, and keeps the validation figures of the run that chose them."""
    tr, va, te = ml
    calls = []

    def spy(train, val, tcfg):
        calls.append((len(train), val, tcfg.max_epochs, tcfg.patience))
        return probex_trainer(SMALL)(train, val, tcfg)

    tcfg = fast()
    first = spy(tr, va, tcfg)
    final = refit(spy, first, tr, va, tcfg, "multilabel")
    assert calls[1] == (len(tr) + len(va), None, first.best_epoch, None)
    assert final.refit and not first.refit
    assert final.best_val == first.best_val and final.best_epoch == first.best_epoch
    assert final.seconds > first.seconds
    assert evaluate(final.model, te, "multilabel")["accuracy"] > 0.85
    # the text head keeps its held-out validation rows (its fused expert is weighed on them);
    # refit=False turns it off for either head
    assert refit(spy, first, tr, va, tcfg, "text") is first
    assert refit(spy, first, tr, va, fast(refit=False), "multilabel") is first
    assert len(calls) == 2
    with pytest.raises(ValueError, match="refit must be"):
        refit(spy, first, tr, va, fast(refit="yes"), "multilabel")


def test_dense_rows_are_centred_and_learn():
    tr, va, te = (multilabel_split(160, 1, dense=True), multilabel_split(40, 2, dense=True),
                  multilabel_split(80, 3, dense=True))
    res = train_expert(tr, va, config_for(tr, **SMALL), fast())
    assert res.config.centered is True
    assert evaluate(res.model, te, "multilabel")["accuracy"] > 0.85


def test_dense_probes_start_on_the_trees_main_directions():
    """init "auto" on dense rows: U's columns are the top eigenvectors of sum Xc^T Xc (unit,
    orthogonal), so the first probe already responds to the direction the updates use most."""
    from probex_core.train import build_probex

    tr = multilabel_split(60, 1, dense=True)
    m = build_probex(tr, config_for(tr, **SMALL), fast())
    U = m.U.detach()
    assert torch.allclose(U.T @ U, torch.eye(U.shape[1]), atol=1e-4)
    Xc = tr.X - tr.X.mean(0)
    energy = torch.einsum("nhw,wk->nhk", Xc, U).pow(2).sum(dim=(0, 1))  # per probe, descending
    assert (energy[:-1] >= energy[1:] - 1e-3).all() and energy[0] > 5 * energy[-1]
    rnd = build_probex(tr, config_for(tr, **SMALL), fast(init="random"))
    assert not torch.allclose(rnd.U.T @ rnd.U, torch.eye(U.shape[1]), atol=1e-1)
    with pytest.raises(ValueError, match="init"):
        build_probex(tr, config_for(tr, **SMALL), fast(init="pca"))


def test_deterministic_for_a_seed(ml):
    tr, va, _ = ml
    runs = [train_expert(tr, va, config_for(tr, **SMALL), fast(max_epochs=4, patience=None, seed=3))
            for _ in range(2)]
    assert runs[0].history == runs[1].history
    for (k, a), (_, b) in zip(runs[0].model.state_dict().items(), runs[1].model.state_dict().items()):
        assert torch.equal(a, b), k
    other = train_expert(tr, va, config_for(tr, **SMALL), fast(max_epochs=4, patience=None, seed=4))
    assert other.history != runs[0].history


def text_tree(n_train_classes=24, n_heldout=8, per_class=6, text_dim=16, seed=0):
    """Single-concept tree: the class's 'text embedding' determines its update direction, so the
    text head can name classes it never saw."""
    rng = np.random.default_rng(seed)
    n_cls = n_train_classes + n_heldout
    names = [f"concept{i}" for i in range(n_cls)]
    text = rng.standard_normal((n_cls, text_dim)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)

    def split(class_ids, per, s):
        labs = [[c] for c in class_ids for _ in range(per)]
        rows, labels = synthetic_rows(len(labs), 24, 24, classes=names, class_codes=text,
                                      labels_of=labs, seed=s, noise=0.2)
        return rows, [lab[0] for lab in labels]

    train_ids, held_ids = list(range(n_train_classes)), list(range(n_train_classes, n_cls))
    train_names = [names[i] for i in train_ids]
    held_names = [names[i] for i in held_ids]
    mk = lambda rl, cl: LayerDataset.from_rows(rl[0], tree="synthetic/text", layer="q",  # noqa
                                               labels=rl[1], task="text", classes=cl)
    tr = mk(split(train_ids, per_class, 10), train_names)
    va = mk(split(train_ids, 2, 11), train_names)
    te = mk(split(train_ids, 2, 12), train_names)
    zs = mk(split(held_ids, 4, 13), held_names)
    return tr, va, te, zs, torch.from_numpy(text[train_ids]), torch.from_numpy(text[held_ids])


def test_text_head_in_distribution_and_zero_shot():
    tr, va, te, zs, t_train, t_held = text_tree()
    cfg = config_for(tr, "text", text_dim=16, **SMALL)
    res = train_expert(tr, va, cfg, fast(max_epochs=80, patience=20), text_emb=t_train)
    ind = evaluate(res.model, te, "text", t_train)
    z = evaluate_zeroshot(res.model, zs, t_held)
    # chance: 1/24 in distribution, 1/8 top-1 and 5/8 top-5 zero-shot
    assert ind["top1"] > 0.5, ind
    assert z["zeroshot_top1"] > 0.4 and z["n_zeroshot_classes"] == 8, z
    # the representation lives in the joint space: unit norm
    e = embed(res.model, zs)
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)


def input_side_tree(n_train_classes=6, n_heldout=8, per_class=5, d=16, seed=0):
    """Single-concept LoRA tree whose update reads its class's text direction (A's rows near the
    class text, as in a tree fine-tuned from the text encoder), with too few training classes for
    the head alone to generalise to classes it never saw."""
    rng = np.random.default_rng(seed)
    n_cls = n_train_classes + n_heldout
    names = [f"concept{i}" for i in range(n_cls)]
    text = rng.standard_normal((n_cls, d)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)

    def split(class_ids, per):
        rows, labels = [], []
        for c in class_ids:
            for _ in range(per):
                r = int(rng.choice([2, 4]))
                A = text[c] + 0.3 * rng.standard_normal((r, d)).astype(np.float32)
                B = rng.standard_normal((d, r)).astype(np.float32) * rng.uniform(0.1, 2)
                rows.append(WeightRow(f"m/{len(rows)}-{c}", A=A, B=B, scale=float(rng.uniform(0.5, 2))))
                labels.append(names[c])
        return rows, labels

    tr_ids, held_ids = list(range(n_train_classes)), list(range(n_train_classes, n_cls))
    mk = lambda rl, cl: LayerDataset.from_rows(rl[0], tree="synthetic/text", layer="q", labels=rl[1],  # noqa
                                               task="text", classes=cl)
    tr_names, held_names = [names[i] for i in tr_ids], [names[i] for i in held_ids]
    return (mk(split(tr_ids, per_class), tr_names), mk(split(tr_ids, 2), tr_names),
            mk(split(held_ids, 3), held_names), torch.from_numpy(text[tr_ids]), torch.from_numpy(text[held_ids]))


def test_text_probe_names_classes_never_trained_on(tmp_path):
    tr, va, zs, t_train, t_held = input_side_tree()
    cfg = config_for(tr, "text", text_dim=16, **SMALL)
    fused = train_expert(tr, va, cfg, fast(), text_emb=t_train)  # "auto": d_W == text_dim
    head_only = train_expert(tr, va, cfg, fast(text_probe=False), text_emb=t_train)
    assert fused.config.text_probe and fused.config.probe_weight > 0
    assert not head_only.config.text_probe
    z_fused = evaluate_zeroshot(fused.model, zs, t_held)["zeroshot_top1"]
    z_head = evaluate_zeroshot(head_only.model, zs, t_held)["zeroshot_top1"]
    # chance 1/8: the class text read through the layer's input side names unseen classes
    assert z_fused >= 0.75 and z_fused > z_head, (z_fused, z_head)
    # the fused expert survives a checkpoint: same logits after loading (M is a buffer)
    from storage.experts import load_expert, save_expert
    path = save_expert(tmp_path, "synthetic/text", fused.model, layer="q", labels=tr.classes,
                       text_encoder="x", prompt="{}", extra_tensors={"class_text_emb": t_train})
    loaded = load_expert(path.parent)
    b = zs.batch(torch.arange(len(zs)))
    with torch.no_grad():
        assert torch.equal(loaded.model(b, t_held), fused.model(b, t_held))


def test_layer_choice_sweep_and_fast():
    good = (multilabel_split(120, 1), multilabel_split(40, 2))
    bad = (multilabel_split(120, 1, signal=0.0, layer="noise"),
           multilabel_split(40, 2, signal=0.0, layer="noise"))
    worse = (multilabel_split(120, 1, signal=0.05, layer="weak"),
             multilabel_split(40, 2, signal=0.05, layer="weak"))
    choice = choose_layer({"l": good, "noise": bad, "weak": worse}, SMALL,
                          fast(max_epochs=30, patience=10), short_epochs=5, top_k=1)
    assert choice.sweep_layer == "l" and choice.fast_layer == "l"
    assert choice.layer == "l" and choice.best is choice.results["l"]
    s = choice.summary()
    assert set(s["sweep"]["scores"]) == {"l", "noise", "weak"}
    assert s["fast"]["finalists"] == ["l"]  # its cost against the sweep's: the benchmark's train section


# -- bad input ----------------------------------------------------------------------------------


def test_shape_mismatch_names_the_model():
    rows = [WeightRow("a/ok", X=np.zeros((4, 5))), WeightRow("a/bad", X=np.zeros((4, 6)))]
    with pytest.raises(ShapeMismatchError, match="a/bad") as e:
        LayerDataset.from_rows(rows, tree="T", layer="L")
    assert e.value.tree == "T" and e.value.layer == "L" and e.value.model == "a/bad"
    with pytest.raises(ShapeMismatchError, match="a/x"):
        LayerDataset.from_rows([WeightRow("a/x", X=np.zeros((4, 5)))], tree="T", layer="L",
                               shape=(4, 6))
    with pytest.raises(ShapeMismatchError, match="a/lora"):
        LayerDataset.from_rows([WeightRow("a/lora", A=np.zeros((8, 5)), B=np.zeros((4, 16)))],
                               tree="T", layer="L")


def test_empty_and_too_few():
    with pytest.raises(EmptyDatasetError, match="tree=T"):
        LayerDataset.from_rows([], tree="T", layer="L")
    tr = multilabel_split(3, 1)
    with pytest.raises(EmptyDatasetError, match="too few"):
        train_expert(tr, None, config_for(tr, **SMALL), fast())


def test_vocabulary_of_one_and_unknown_labels():
    rows = [WeightRow(f"a/{i}", X=np.zeros((2, 2))) for i in range(3)]
    with pytest.raises(VocabularyError):
        LayerDataset.from_rows(rows, tree="T", layer="L", labels=[["dog"]] * 3, task="multilabel")
    with pytest.raises(VocabularyError, match="a/2"):
        LayerDataset.from_rows(rows, tree="T", layer="L", labels=["dog", "cat", "emu"], task="text",
                               classes=["dog", "cat"])
    tr, va, _ = multilabel_split(20, 1), multilabel_split(8, 2), None
    va_other = va.with_classes(list(reversed(CLASSES)))
    with pytest.raises(VocabularyError):
        train_expert(tr, va_other, config_for(tr, **SMALL), fast())


def test_nan_rows_name_the_model():
    X = np.zeros((3, 3), dtype=np.float32)
    X[1, 1] = np.nan
    with pytest.raises(NonFiniteError, match="m/nan"):
        LayerDataset.from_rows([WeightRow("m/ok", X=np.zeros((3, 3))), WeightRow("m/nan", X=X)],
                               tree="T", layer="L")
    A = np.ones((2, 3))
    A[0, 0] = np.inf
    with pytest.raises(NonFiniteError, match="m/inf"):
        LayerDataset.from_rows([WeightRow("m/inf", A=A, B=np.ones((3, 2)))], tree="T", layer="L")
    assert issubclass(NonFiniteError, ExpertError)


def test_text_head_needs_text_embeddings():
    tr, va, _, _, t_train, _ = text_tree(n_train_classes=4, n_heldout=2, per_class=2)
    with pytest.raises(ExpertError, match="text embedding"):
        train_expert(tr, va, config_for(tr, "text", text_dim=16, **SMALL), fast(), text_emb=None)


def test_mixup_is_probex_lora_multilabel_only_unless_asked():
    auto = TrainConfig()
    assert auto.mixup_alpha("multilabel", "probex", lora=True) == 1.0
    assert auto.mixup_alpha("multilabel", "probex", lora=False) == 0.0  # dense rows: ~5x slower
    assert auto.mixup_alpha("multilabel", "dense", lora=True) == 0.0  # the paper's baselines, as published
    assert auto.mixup_alpha("text", "probex", lora=True) == 0.0  # one class per model: nothing to mix
    assert TrainConfig(mixup=0.4).mixup_alpha("multilabel", "statnn", lora=False) == 0.4
    assert TrainConfig(mixup=0).mixup_alpha("multilabel", "probex", lora=True) == 0.0
    for bad in ("yes", -1.0, float("nan")):
        with pytest.raises(ValueError, match="mixup must be"):
            TrainConfig(mixup=bad).mixup_alpha("multilabel", "probex", lora=True)
