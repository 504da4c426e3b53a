"""ProbeX module: shapes, parameter counts, the factored LoRA path equals the dense path."""


import numpy as np
import pytest
import torch

from probex_core.baselines import dense_param_count
from probex_core.data import LayerDataset, WeightBatch, WeightRow
from probex_core.probex import ProbeX, ProbeXConfig, probex_param_count


pytestmark = pytest.mark.usefixtures("one_torch_thread")



def lora_rows(n, d_H, d_W, ranks=(8, 16), seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        r = ranks[i % len(ranks)]
        rows.append(WeightRow(f"m/{i}", A=torch.randn(r, d_W, generator=g) / d_W ** 0.5,
                              B=torch.randn(d_H, r, generator=g) / r ** 0.5, scale=scale))
    return rows


def test_shapes_multilabel_and_text():
    torch.manual_seed(0)
    b = WeightBatch(X=torch.randn(5, 12, 20))
    m = ProbeX(ProbeXConfig(d_H=12, d_W=20, n_outputs=7, r_U=4, r_V=3, r_T=6))
    assert m.probe_responses(b).shape == (5, 3, 4)
    assert m.encode(b).shape == (5, 6)
    assert m(b).shape == (5, 7)
    t = ProbeX(ProbeXConfig(d_H=12, d_W=20, head="text", text_dim=9, r_U=4, r_V=3, r_T=6))
    e = t.encode(b)
    assert torch.allclose(e.norm(dim=1), torch.ones(5), atol=1e-5)
    logits = t(b, torch.randn(11, 9))
    assert logits.shape == (5, 11)
    assert logits.abs().max() <= t.out.logit_scale + 1e-4  # cosine * scale
    with pytest.raises(ValueError):
        t(b)  # the text head needs class texts


@pytest.mark.parametrize("head", ["multilabel", "text"])
def test_param_count_formula(head):
    cfg = ProbeXConfig(d_H=12, d_W=20, n_outputs=7, head=head, r_U=4, r_V=3, r_T=6, text_dim=9)
    assert ProbeX(cfg).n_params() == probex_param_count(cfg)


def test_paper_sizes():
    # the paper: about 2.3M parameters for a 768x768 layer and 100 outputs, 59M for Dense
    assert abs(probex_param_count(ProbeXConfig(d_H=768, d_W=768, n_outputs=100)) - 2.3e6) < 0.05e6
    assert abs(dense_param_count(768, 768, 100) - 59e6) < 0.1e6


def test_lora_padding_is_exact():
    rows = lora_rows(6, 10, 14)
    ds = LayerDataset.from_rows(rows, tree="t", layer="l")
    assert ds.is_lora and ds.rank == 16
    X = ds.batch().dense()
    for i, r in enumerate(rows):
        assert torch.allclose(X[i], r.scale * r.B @ r.A, atol=1e-6)
    # Frobenius norms through the r x r Gram route equal the dense ones
    assert torch.allclose(ds.frobenius_norms(), X.flatten(1).norm(dim=1), rtol=1e-4)


def test_second_moments_from_factors_equal_dense():
    """sum X X^T and sum X^T X through the LoRA factors (never forming X) equal the dense sums,
    with and without each row scaled to unit norm."""
    ds = LayerDataset.from_rows(lora_rows(7, 10, 14, ranks=(3, 5)), tree="t", layer="l")
    X = ds.batch().dense()
    for unit in (False, True):
        Xu = X / X.flatten(1).norm(dim=1)[:, None, None] if unit else X
        left, right = ds.second_moments(unit_rows=unit)
        assert torch.allclose(left, torch.einsum("nhw,nkw->hk", Xu, Xu), atol=1e-5)
        assert torch.allclose(right, torch.einsum("nhw,nhv->wv", Xu, Xu), atol=1e-5)
    center = X.mean(0)
    left, _ = ds.second_moments(center)
    Xc = X - center
    assert torch.allclose(left, torch.einsum("nhw,nkw->hk", Xc, Xc), atol=1e-5)


def test_conv_kernel_is_flattened():
    w = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32)
    ds = LayerDataset.from_rows([WeightRow("m/0", X=w)], tree="t", layer="conv")
    assert (ds.d_H, ds.d_W) == (8, 27)
    assert torch.equal(ds.X[0], torch.from_numpy(w.reshape(8, 27)))


@pytest.mark.parametrize("head,centered", [("multilabel", False), ("multilabel", True), ("text", False)])
def test_factored_equals_dense(head, centered):
    torch.manual_seed(0)
    d = 384
    ds = LayerDataset.from_rows(lora_rows(8, d, d), tree="t", layer="l")
    lora, dense = ds.batch(), WeightBatch(X=ds.batch().dense())
    cfg = ProbeXConfig(d_H=d, d_W=d, n_outputs=10, head=head, text_dim=16,
                       input_scale=float(ds.frobenius_norms().mean()), centered=centered)
    m = ProbeX(cfg).eval()
    if centered:
        m.input_mean.copy_(ds.mean_matrix())
    t = torch.randn(5, 16)
    with torch.no_grad():
        a, b = m(lora, t), m(dense, t)
        pa, pb = m.probe_responses(lora), m.probe_responses(dense)
    assert torch.allclose(pa, pb, atol=1e-5, rtol=1e-5)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_row_norm_uses_factors_and_ignores_update_size():
    torch.manual_seed(0)
    n, d_H, d_W, r = 4, 12, 10, 3
    A, B = torch.randn(n, r, d_W), torch.randn(n, d_H, r)
    scale = torch.tensor([0.5, 1.0, 2.0, 4.0])
    lora = WeightBatch(A=A, B=B, scale=scale)
    dense = WeightBatch(X=scale[:, None, None] * (B @ A))
    model = ProbeX(ProbeXConfig(d_H=d_H, d_W=d_W, r_U=5, r_V=6, r_T=7, n_outputs=3, row_norm=True))
    assert torch.allclose(model.row_norms(lora), model.row_norms(dense), rtol=1e-4)
    bigger = WeightBatch(A=A, B=B, scale=scale * 10)  # the same directions, 10x the update
    assert torch.allclose(model(lora), model(bigger), atol=1e-5)


def test_text_probe_factor_reproduces_the_rows_response():
    """||F t||^2 = ||X^ t||^2 for X^ the row at unit Frobenius norm: exact for LoRA factors (never
    forming X), and for dense rows of rank <= probe_rank."""
    g = torch.Generator().manual_seed(3)
    cfg = ProbeXConfig(d_H=12, d_W=10, head="text", text_dim=10, r_U=4, r_V=4, r_T=5, text_probe=True,
                       probe_rank=5)
    m = ProbeX(cfg).eval()
    t = torch.nn.functional.normalize(torch.randn(6, 10, generator=g), dim=-1)
    lora = LayerDataset.from_rows(lora_rows(5, 12, 10, ranks=(3, 5), seed=4), tree="t", layer="l")
    dense_rows = [WeightRow(f"d/{i}", X=torch.randn(12, 4, generator=g) @ torch.randn(4, 10, generator=g))
                  for i in range(5)]
    dense = LayerDataset.from_rows(dense_rows, tree="t", layer="l")
    for ds in (lora, dense):
        b = ds.batch(torch.arange(len(ds)))
        X = b.dense()
        X = X / X.flatten(1).norm(dim=1)[:, None, None]
        want = (X @ t.T).pow(2).sum(dim=1)  # (n, k)
        with torch.no_grad():
            got = (m.probe_factor(b) @ t.T).pow(2).sum(dim=1)
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # a smaller probe_rank keeps the strongest directions only: never more than the whole response
    m2 = ProbeX(ProbeXConfig(**{**cfg.to_dict(), "probe_rank": 2})).eval()
    b = lora.batch(torch.arange(len(lora)))
    with torch.no_grad():
        F2 = m2.probe_factor(b)
        assert F2.shape == (5, 2, 10)
        X = b.dense()
        full = ((X / X.flatten(1).norm(dim=1)[:, None, None]) @ t.T).pow(2).sum(dim=1)
        assert ((F2 @ t.T).pow(2).sum(dim=1) <= full + 1e-6).all()


def test_text_probe_needs_a_text_sized_layer():
    with pytest.raises(ValueError, match="text_dim"):
        ProbeXConfig(d_H=12, d_W=10, head="text", text_dim=16, text_probe=True)
    with pytest.raises(ValueError, match="text head"):
        ProbeXConfig(d_H=12, d_W=10, head="multilabel", n_outputs=3, text_dim=10, text_probe=True)


@pytest.mark.parametrize("unit", [False, True])
def test_mixup_mixes_rows_and_targets_and_keeps_lora_factored(unit):
    """Weight-space mixup: row i becomes lam_i X_i + (1 - lam_i) X_perm(i) (each at unit norm
    first when `unit`), targets alike; LoRA rows come back as factors of rank r_i + r_j."""
    ds = LayerDataset.from_rows(lora_rows(6, 10, 14, scale=0.7), tree="t", layer="l")
    b = ds.batch()
    b.y = torch.rand(6, 3)
    lam, perm = torch.rand(6), torch.randperm(6, generator=torch.Generator().manual_seed(1))
    X = b.dense()
    assert torch.allclose(b.frobenius_norms(), X.flatten(1).norm(dim=1), atol=1e-5)
    if unit:
        X = X / X.flatten(1).norm(dim=1)[:, None, None]
    want = lam[:, None, None] * X + (1 - lam[:, None, None]) * X[perm]
    m = b.mixed(lam, perm, unit=unit)
    assert m.is_lora and m.A.shape == (6, 2 * ds.rank, 14)
    assert torch.allclose(m.dense(), want, atol=1e-5)
    assert torch.allclose(m.y, lam[:, None] * b.y + (1 - lam[:, None]) * b.y[perm])
    d = WeightBatch(X=b.dense(), y=b.y).mixed(lam, perm, unit=unit)
    assert d.X is not None and torch.allclose(d.X, want, atol=1e-5)
