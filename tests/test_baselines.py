"""Dense and StatNN baselines, trained with the same protocol; the cross-tree experiment."""

import numpy as np
import pytest

from probex_core.baselines import (STAT_NAMES, DenseConfig, DenseExpert, cross_tree_experiment,
                                   dense_param_count, train_dense, train_statnn, weight_statistics)
from probex_core.data import LayerDataset, WeightRow
from probex_core.probex import ProbeXConfig, probex_param_count
from probex_core.train import evaluate, evaluate_zeroshot

from test_train import fast, multilabel_split, text_tree


pytestmark = pytest.mark.usefixtures("one_torch_thread")



def test_param_counts_384_10():
    # the numbers the report quotes: a 384x384 layer, 10 outputs
    assert dense_param_count(384, 384, 10) == 384 * 384 * 10 + 10 == 1_474_570
    assert probex_param_count(ProbeXConfig(d_H=384, d_W=384, n_outputs=10)) == 2_196_874
    small = ProbeXConfig(d_H=384, d_W=384, n_outputs=10, r_U=32, r_V=32, r_T=64)
    assert probex_param_count(small) * 10 <= dense_param_count(384, 384, 10)
    m = DenseExpert(DenseConfig(d_H=384, d_W=384, n_outputs=10))
    assert sum(p.numel() for p in m.parameters()) == 1_474_570


def test_weight_statistics_match_numpy():
    rng = np.random.default_rng(0)
    rows = [WeightRow(f"m/{i}", X=rng.standard_normal((6, 9)).astype(np.float32)) for i in range(3)]
    rows.append(WeightRow("m/lora", A=rng.standard_normal((2, 9)), B=rng.standard_normal((6, 2)),
                          scale=0.5))
    ds = LayerDataset.from_rows(rows[:3], tree="t", layer="l")
    f = weight_statistics(ds).numpy()
    assert f.shape == (3, len(STAT_NAMES))
    for i, r in enumerate(rows[:3]):
        X = r.X.astype(np.float64)
        want = [X.mean(), X.var(ddof=1), *np.quantile(X, [0, .25, .5, .75, 1]),
                np.linalg.norm(X), np.linalg.norm(X, 2)]
        assert np.allclose(f[i], want, rtol=1e-4, atol=1e-6)
    lds = LayerDataset.from_rows(rows[3:], tree="t", layer="l")
    X = 0.5 * rows[3].B @ rows[3].A
    assert np.isclose(weight_statistics(lds)[0, -1].item(), np.linalg.norm(X, 2), rtol=1e-4)


@pytest.fixture(scope="module")
def ml():
    return multilabel_split(160, 1), multilabel_split(40, 2), multilabel_split(80, 3)


def test_dense_and_statnn_multilabel(ml):
    tr, va, te = ml
    d = train_dense(tr, va, fast())
    assert d.kind == "dense" and d.n_params == dense_param_count(24, 24, 8)
    assert evaluate(d.model, te, "multilabel")["accuracy"] > 0.7
    s = train_statnn(tr, va, fast())
    acc = evaluate(s.model, te, "multilabel")["accuracy"]
    assert s.kind == "statnn" and 0.0 <= acc <= 1.0 and s.seconds > 0


def test_baselines_text_head():
    tr, va, te, zs, t_train, t_held = text_tree(n_train_classes=12, n_heldout=4, per_class=4)
    d = train_dense(tr, va, fast(), text_emb=t_train, r_T=32)
    z = evaluate_zeroshot(d.model, zs, t_held)
    assert set(z) >= {"zeroshot_top1", "zeroshot_top5", "n_zeroshot_classes"}
    s = train_statnn(tr, va, fast(), text_emb=t_train, r_T=32)
    assert "top1" in evaluate(s.model, te, "text", t_train)


def test_cross_tree_experiment():
    # two trees with the same layer shape but different roots (different LoRA inits and maps)
    trees = {
        "root/a": tuple(multilabel_split(n, s, mixing_seed=1) for n, s in ((100, 1), (30, 2), (40, 3))),
        "root/b": tuple(multilabel_split(n, s, mixing_seed=2, classes=[f"b{i}" for i in range(8)])
                        for n, s in ((100, 4), (30, 5), (40, 6))),
    }
    out = cross_tree_experiment(trees, fast(), probex_kwargs=dict(r_U=16, r_V=16, r_T=32))
    assert out["model"] == "probex" and out["n_union_classes"] == 16
    for tid in trees:
        assert set(out["trees"][tid]) == {"single", "expert"}
        assert 0 <= out["trees"][tid]["single"]["accuracy"] <= 1
        assert out["trees"][tid]["expert"]["accuracy"] > 0.8
    # different shapes: StatNN across trees (shape-agnostic features)
    trees["root/c"] = tuple(multilabel_split(n, s, d=16, mixing_seed=3) for n, s in
                            ((60, 7), (20, 8), (20, 9)))
    out = cross_tree_experiment(trees, fast(max_epochs=10))
    assert out["model"] == "statnn" and set(out["trees"]) == set(trees)
