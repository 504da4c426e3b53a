"""Second-order views (ProbeXConfig.views): shapes, the factored path against the dense one, no
LoRA row multiplied out, the checkpoint round trip, and the default expert unchanged."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
# the synthetic tree with a root, and the dispatch-mode check of products, from the delta tests
from test_deltas import CLASSES, SMALL, FactorProducts, fast, tree_split

from probex_core.checkpoint import decode_expert, encode_expert
from probex_core.data import WeightBatch
from probex_core.probex import VIEWS, ProbeX, ProbeXConfig, probex_param_count
from probex_core.train import config_for, embed, train_expert

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMBOS = [("first",), ("first", "gram_w"), ("first", "gram_h"), VIEWS, ("gram_w", "gram_h")]
D_H, D_W, RANK = 11, 13, 5  # tree_split's layer and LoRA rank


def model_for(views, head="multilabel", *, centered=False, row_norm=False, representation="raw",
              seed=0) -> ProbeX:
    kw = dict(text_dim=7) if head == "text" else dict(n_outputs=len(CLASSES))
    torch.manual_seed(seed)
    m = ProbeX(ProbeXConfig(d_H=D_H, d_W=D_W, head=head, **SMALL, **kw, views=views, input_scale=0.7,
                            centered=centered, row_norm=row_norm, representation=representation))
    with torch.no_grad():
        if centered:
            m.input_mean.copy_(0.1 * torch.randn(D_H, D_W))
        if representation == "delta":
            m.input_root.copy_(torch.randn(D_H, D_W))
    return m.eval()


def lora_batch(n: int = 6, seed: int = 3) -> WeightBatch:
    g = torch.Generator().manual_seed(seed)
    return WeightBatch(A=torch.randn(n, RANK, D_W, generator=g), B=torch.randn(n, D_H, RANK, generator=g),
                       scale=torch.rand(n, generator=g) + 0.1)


@pytest.mark.parametrize("head", ["multilabel", "text"])
@pytest.mark.parametrize("views", COMBOS)
def test_shapes_of_every_view_combination(views, head):
    m = model_for(views, head, centered=True, row_norm=True)
    k = SMALL["r_U"]  # == r_V
    sizes = {"first": k * k, "gram_w": k * (k + 1) // 2, "gram_h": k * (k + 1) // 2}
    assert m.cfg.n_features == sum(sizes[v] for v in views) == m.encoder.in_features
    assert probex_param_count(m.cfg) == m.n_params()
    mixed = tree_split(7, 1, task=head).batch()  # dense and LoRA rows side by side
    assert mixed.is_mixed
    text = torch.randn(len(CLASSES), 7) if head == "text" else None
    with torch.no_grad():
        e, logits = m.encode(mixed), m(mixed, text)
    assert e.shape == (7, SMALL["r_T"]) and logits.shape == (7, len(CLASSES))
    assert torch.isfinite(logits).all()
    if "gram_w" in views or "gram_h" in views:
        assert m.gram_views(mixed).shape == (7, m.cfg.n_features - sizes["first"] * ("first" in views))


def test_views_have_one_spelling_and_bad_ones_fail():
    cfg = ProbeXConfig(d_H=2, d_W=3, n_outputs=2, views=["gram_h", "first"])  # as JSON loads it
    assert cfg.views == ("first", "gram_h")
    for bad in [(), ("second",), ("first", "first")]:
        with pytest.raises(ValueError, match="views"):
            ProbeXConfig(d_H=2, d_W=3, n_outputs=2, views=bad)


@pytest.mark.parametrize("representation", ["raw", "delta"])
@pytest.mark.parametrize("centered,row_norm", [(False, False), (True, False), (True, True)])
def test_factored_path_equals_the_dense_path(representation, centered, row_norm):
    """LoRA rows against their densified copies (a delta expert's dense row is the root plus the
    change): every view and the representation are equal within float tolerance."""
    m = model_for(VIEWS, centered=centered, row_norm=row_norm, representation=representation)
    lora = lora_batch()
    X = lora.scale[:, None, None] * (lora.B @ lora.A)  # formed here only to check against
    if representation == "delta":
        X = X + m.input_root
    dense = WeightBatch(X=X)
    with torch.no_grad():
        for side, probes in (("w", m.U), ("h", m.V)):
            torch.testing.assert_close(m.probed(lora, probes, side), m.probed(dense, probes, side),
                                       rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m.gram_views(lora), m.gram_views(dense), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m.encode(lora), m.encode(dense), rtol=1e-4, atol=1e-5)
        # a mixed batch of both copies reads each row as its own kind does
        both = WeightBatch(X=X[:3], A=lora.A[3:], B=lora.B[3:], scale=lora.scale[3:],
                           lora=torch.tensor([False] * 3 + [True] * 3))
        torch.testing.assert_close(m.encode(both), m.encode(dense), rtol=1e-4, atol=1e-5)


def test_gram_w_reads_the_rows_gram():
    """G_W is U^T X^T X U of the row as P reads it, under the signed square root."""
    m = model_for(("gram_w",), centered=True)
    b = WeightBatch(X=torch.randn(4, D_H, D_W))
    with torch.no_grad():
        Xn = (b.X - m.input_mean) / m.cfg.input_scale
        G = m.U.T @ Xn.transpose(1, 2) @ Xn @ m.U  # (n, r_U, r_U)
        i, j = torch.triu_indices(G.shape[1], G.shape[1])
        # the signed square root undone: sign(f) ((|f| + sqrt(eps))^2 - eps)
        f = m.gram_views(b)
        eps = 1e-4
        torch.testing.assert_close(torch.sign(f) * ((f.abs() + eps ** 0.5) ** 2 - eps), G[:, i, j],
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kinds", ["mixed", "lora"])
@pytest.mark.parametrize("head", ["multilabel", "text"])
def test_lora_rows_are_never_multiplied_out_by_the_views(head, kinds):
    """Training, the text probe and embedding of a centred, row-normed delta expert with every
    view, on a mixed tree and on a LoRA tree (there with mixup, for the multi-label head): no
    product forms a LoRA row's d_H x d_W matrix."""
    kw = dict(head=head, text_dim=D_W) if head == "text" else {}
    tr, va = tree_split(12, 1, kinds, task=head), tree_split(6, 2, kinds, task=head)
    text = torch.randn(len(CLASSES), D_W) if head == "text" else None
    watch = FactorProducts((D_H, D_W), ranks={RANK, 2 * RANK})  # 2r: a mixed-up pair of rows
    with watch:
        res = train_expert(tr, va, config_for(tr, **SMALL, **kw),
                           fast(max_epochs=3, center=True, row_norm=True, init="data", views=VIEWS),
                           text_emb=text)
        embed(res.model, va)
    assert res.config.views == VIEWS and res.config.representation == "delta"
    assert res.config.centered and res.config.row_norm
    assert watch.seen == []


@pytest.mark.parametrize("head", ["multilabel", "text"])
def test_checkpoint_keeps_the_views(head):
    m = model_for(("first", "gram_h"), head, centered=True)
    weights, config = encode_expert("t/root", m, version="v1", layer="q", labels=CLASSES)
    cfg = json.loads(config)
    assert cfg["views"] == ["first", "gram_h"] and cfg["probex"]["views"] == ["first", "gram_h"]
    loaded = decode_expert(config, weights, "mem")
    assert loaded.probex_config == m.cfg and loaded.model.cfg.views == ("first", "gram_h")
    b = tree_split(5, 1, task=head).batch()
    text = torch.randn(len(CLASSES), 7) if head == "text" else None
    with torch.no_grad():
        assert torch.equal(loaded.model(b, text), m(b, text))
    # an expert saved before views existed loads as the first-order ProbeX it was
    old_model = model_for(("first",), head, centered=True)
    weights, config = encode_expert("t/root", old_model, version="v0", layer="q", labels=CLASSES)
    old = json.loads(config)
    del old["views"], old["probex"]["views"]
    old_loaded = decode_expert(json.dumps(old).encode(), weights, "mem")
    assert old_loaded.probex_config.views == ("first",)
    with torch.no_grad():
        assert torch.equal(old_loaded.model(b, text), old_model(b, text))


@pytest.mark.parametrize("head", ["multilabel", "text"])
def test_default_trains_as_before(head):
    """Views off is the paper's ProbeX: e = encoder(vec(P)), and TrainConfig's default, an
    explicit first-order view and the model config's own default train bit for bit alike."""
    kw = dict(head=head, text_dim=D_W) if head == "text" else {}
    tr, va = tree_split(12, 1, task=head), tree_split(6, 2, task=head)
    text = torch.randn(len(CLASSES), D_W) if head == "text" else None
    cfg = config_for(tr, **SMALL, **kw)
    runs = [train_expert(tr, va, cfg, fast(max_epochs=4), text_emb=text),
            train_expert(tr, va, cfg, fast(max_epochs=4, views=("first",)), text_emb=text),
            train_expert(tr, va, dataclasses.replace(cfg, views=["first"]), fast(max_epochs=4),
                         text_emb=text)]
    b = va.batch()
    with torch.no_grad():
        outs = [r.model(b, text) for r in runs]
        m = runs[0].model
        paper = m.out.represent(m.encoder(m.probe_responses(b).flatten(1)))
        assert torch.equal(m.encode(b), paper)
    assert runs[0].config.views == ("first",)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert all(r.history == runs[0].history for r in runs[1:])
    # and the views are an option that changes the expert
    on = train_expert(tr, va, cfg, fast(max_epochs=4, views=VIEWS), text_emb=text)
    with torch.no_grad():
        assert on.config.views == VIEWS and not torch.equal(on.model(b, text), outs[0])
