"""Metrics, as the paper reports them. Inputs are numpy arrays or tensors.

multi-label: accuracy over every (model, class) entry at probability threshold 0.5 (chance 0.5 for
             balanced 50-of-100 labels), and mean average precision (per-class AP, averaged over
             classes that have at least one positive and one negative).
text head:   top-k accuracy of the true class among the scored class texts. For zero-shot, score
             each model only against the held-out classes' texts (as the paper's zero-shot split
             does): pass logits over held-out texts and indices into that list.
retrieval:   text -> models, mean average precision of ranking models by similarity to a class text.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import average_precision_score


def _np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().float().cpu().numpy()
    return np.asarray(a)


def multilabel_accuracy(probs, targets, threshold: float = 0.5) -> float:
    """Fraction of (model, class) entries where (prob >= threshold) equals the target."""
    p, t = _np(probs), _np(targets)
    return float(((p >= threshold) == (t >= 0.5)).mean())


def mean_average_precision(scores, targets) -> float:
    """Mean over classes of average precision; classes with only one label value are skipped
    (AP is undefined there). NaN when no class qualifies."""
    s, t = _np(scores), _np(targets) >= 0.5
    aps = [average_precision_score(t[:, j], s[:, j]) for j in range(t.shape[1])
           if 0 < t[:, j].sum() < t.shape[0]]
    return float(np.mean(aps)) if aps else float("nan")


def topk_accuracy(logits, y, k: int = 1) -> float:
    """Fraction of rows whose true index is among the k highest logits (k capped at #classes)."""
    L, y = _np(logits), _np(y).astype(int)
    k = min(k, L.shape[1])
    topk = np.argsort(-L, axis=1, kind="stable")[:, :k]
    return float((topk == y[:, None]).any(axis=1).mean())


def multilabel_report(logits, targets) -> dict:
    """{"accuracy", "map"} from raw logits (sigmoid applied here)."""
    L = _np(logits)
    probs = 1 / (1 + np.exp(-L))
    return {"accuracy": multilabel_accuracy(probs, targets), "map": mean_average_precision(L, targets)}


def text_report(logits, y, prefix: str = "") -> dict:
    """{"top1", "top5"} (with an optional prefix, e.g. "zeroshot_") for text-head logits."""
    return {f"{prefix}top1": topk_accuracy(logits, y, 1), f"{prefix}top5": topk_accuracy(logits, y, 5)}


def zeroshot_report(logits_heldout, y_heldout) -> dict:
    """Zero-shot top-1/top-5 where logits are over the held-out class texts only."""
    L = _np(logits_heldout)
    out = text_report(L, y_heldout, prefix="zeroshot_")
    out["n_zeroshot_classes"] = int(L.shape[1])
    return out


def retrieval_map(logits, y) -> float:
    """Text -> models: for each class (column) rank all models by its score; AP of finding the
    models of that class; averaged over classes with at least one model."""
    L, y = _np(logits), _np(y).astype(int)
    onehot = np.zeros_like(L, dtype=bool)
    onehot[np.arange(len(y)), y] = True
    return mean_average_precision(L, onehot)
