"""Head kinds: one object per kind, one name, old names accepted on load."""

import numpy as np
import pytest
import torch

from probex_core.data import ExpertError, LayerDataset, WeightRow
from probex_core.heads import HEADS, MULTILABEL, TEXT, QueryRows, UnknownHeadError, get_head
from probex_core.probex import ProbeX, ProbeXConfig, probex_param_count


def test_names_and_aliases():
    assert set(HEADS) == {"multilabel", "text"}
    for name, head in HEADS.items():
        assert get_head(name) is head and get_head(head) is head and head.name == name
    # what earlier reports, eval JSON and lake manifests wrote
    assert get_head("zeroshot") is TEXT and get_head("single-concept") is TEXT
    assert get_head("multi-label") is MULTILABEL
    with pytest.raises(UnknownHeadError, match="unknown head 'regression': use one of multilabel, text"):
        get_head("regression")


def test_a_checkpoint_config_with_an_old_name_loads_as_the_one_name():
    cfg = ProbeXConfig.from_dict({"d_H": 6, "d_W": 5, "head": "zeroshot", "text_dim": 4})
    assert cfg.head == "text"
    assert ProbeX(cfg).n_params() == probex_param_count(cfg)
    with pytest.raises(ValueError, match="needs n_outputs >= 1"):
        ProbeXConfig(d_H=6, d_W=5, head="multilabel")


def test_losses_metrics_and_selection():
    y_ml = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    good, bad = torch.tensor([[5.0, -5.0], [-5.0, 5.0]]), torch.tensor([[-5.0, 5.0], [5.0, -5.0]])
    m_good, m_bad = MULTILABEL.metrics(good, y_ml), MULTILABEL.metrics(bad, y_ml)
    assert m_good["accuracy"] == 1.0 and m_bad["accuracy"] == 0.0 and m_good["map"] == 1.0
    assert MULTILABEL.selection_key(m_good) > MULTILABEL.selection_key(m_bad)
    assert torch.allclose(MULTILABEL.probabilities(good).sum(1), torch.ones(2))  # sigmoids, not a softmax
    assert set(MULTILABEL.quick_metrics(good, y_ml)) == {"loss", "accuracy"}

    y_t = torch.tensor([0, 1])
    m = TEXT.metrics(good, y_t)
    assert m["top1"] == 1.0 and m["top5"] == 1.0 and m["loss"] < TEXT.metrics(bad, y_t)["loss"]
    assert torch.allclose(TEXT.probabilities(bad).sum(1), torch.ones(2))
    # equal main metric: the lower loss wins
    assert TEXT.selection_key({"top1": 0.5, "loss": 0.1}) > TEXT.selection_key({"top1": 0.5, "loss": 0.2})


def test_datasets_take_the_head_name_and_refuse_unknown_tasks():
    rows = [WeightRow(f"m{i}", X=torch.randn(3, 2)) for i in range(4)]
    ds = LayerDataset.from_rows(rows, tree="T", layer="L", labels=["a", "b", "a", "b"], task="zeroshot")
    assert ds.task == "text" and ds.y.dtype == torch.long
    with pytest.raises(ExpertError, match="unknown head 'ranking'"):
        LayerDataset.from_rows(rows, tree="T", layer="L", labels=["a", "b", "a", "b"], task="ranking")


def test_query_scoring_per_head():
    torch.manual_seed(0)
    class_text = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)  # (C, text_dim)
    # multi-label: the stored probability of the class whose text matches the query
    stored = np.array([[0.9, 0.1, 0.2], [0.2, 0.8, 0.3]], np.float32)
    q = class_text[1:2]
    assert MULTILABEL.matches(q, class_text) and MULTILABEL.query_vector(None, q) is None
    assert MULTILABEL.search_scores(None, QueryRows(label_scores=stored), q, class_text).tolist() == \
        pytest.approx([0.1, 0.8])
    unrelated = torch.linalg.svd(class_text).Vh[-1:]  # orthogonal to every class text
    assert not MULTILABEL.matches(unrelated, class_text)
    scores, matched = MULTILABEL.label_scores(None, QueryRows(label_scores=stored[:1]), class_text[[2, 0]], class_text)
    assert scores.tolist() == pytest.approx([0.2, 0.9]) and matched == [2, 0]

    # text: P(query) against the expert's own classes, from the stored vectors
    model = ProbeX(ProbeXConfig(d_H=5, d_W=4, head="text", text_dim=4, r_U=3, r_V=3, r_T=6))
    with torch.no_grad():
        vec = model.embed_text(class_text).numpy()  # rows that sit on the class texts
    p = TEXT.search_scores(model, QueryRows(vectors=vec), class_text[:1], class_text)
    assert p.shape == (3,) and p.argmax() == 0 and ((0 < p) & (p < 1)).all()
    scores, matched = TEXT.label_scores(model, QueryRows(vectors=vec[1:2]), class_text, class_text)
    assert scores.argmax() == 1 and scores.sum() == pytest.approx(1.0) and matched == [None] * 3
