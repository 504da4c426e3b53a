"""Head kinds: everything that differs between an expert's outputs, one object per kind.

    head = get_head("multilabel")        # or "text"; old names ("zeroshot", ...) load too
    head.loss(logits, y)                 # training loss
    head.metrics(logits, y)              # the report's metrics; head.selection_key(m) ranks them
    head.probabilities(logits)           # (n, k) what the catalog stores per model
    head.search_scores(model, rows, q, class_text)   # P(model is about the query), (n,)

multilabel  one sigmoid per class of the tree's vocabulary (BCE). Metrics: accuracy over every
            (model, class) entry at p >= 0.5, and mAP. Selected on validation accuracy.
text        one concept per model, scored against class texts (softmax CE over k texts), so it
            scores classes it never saw (zero-shot). Metrics: top-1/top-5; zero-shot on held-out
            classes' texts. Selected on validation top-1.

`name` is the one spelling used in code, checkpoints, catalog rows, JSON and reports. Adding a
head = one more HeadKind subclass listed in HEADS (and its output layer in probex.Head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics
from .errors import ProbexError

MATCH_MIN = 0.6  # a multi-label class "says" the query when their texts are this similar
SAME_AS_QUERY = 0.9  # a training class this close to the query is the query, not a competitor


class UnknownHeadError(ProbexError, ValueError):
    pass


@dataclass
class QueryRows:
    """What the catalog holds for some models of one tree, as the scoring needs it."""

    vectors: np.ndarray | None = None  # (n, r_T) stored representations
    factors: torch.Tensor | None = None  # (n, m, d_W) text-probe factors, or None
    label_scores: np.ndarray | None = None  # (n, C) stored probabilities over the vocabulary


class HeadKind:
    name: ClassVar[str]
    title: ClassVar[str]  # how a report's table says it
    main_metric: ClassVar[str]  # what validation selects on (higher is better)
    lr: ClassVar[float]  # Adam defaults, the paper's per head
    max_epochs: ClassVar[int]
    one_label: ClassVar[bool]  # each model names one class (y: index) or several (y: multi-hot)
    uses_texts: ClassVar[bool]  # scored against class text embeddings
    refit_default: ClassVar[bool]  # TrainConfig.refit "auto"
    mixes_targets: ClassVar[bool]  # targets are probabilities, so weight-space mixup applies

    def __repr__(self) -> str:
        return f"<head {self.name}>"

    def n_outputs(self, n_classes: int) -> int:
        """Outputs of the model's own head layer (0: outputs come from the texts given at call)."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def quick_metrics(self, logits: torch.Tensor, y: torch.Tensor) -> dict:
        """Loss and the selection metric: what one validation pass per epoch needs."""
        raise NotImplementedError

    def metrics(self, logits: torch.Tensor, y: torch.Tensor) -> dict:
        """Every in-distribution metric, with the loss."""
        raise NotImplementedError

    def selection_key(self, m: Mapping) -> tuple:
        """Higher is better: the main metric, then the lower loss."""
        return (round(float(m.get(self.main_metric, 0.0)), 6), -float(m.get("loss", 0.0)))

    def main_score(self, m: Mapping) -> float:
        return float(m.get(self.main_metric, float("nan")))

    # -- query scoring (the catalog's rows of one tree against a query text) -------------------
    def query_columns(self, probe: bool) -> list[str]:
        """The embeddings columns search_scores reads."""
        raise NotImplementedError

    def query_vector(self, model, q: torch.Tensor) -> np.ndarray | None:
        """Where to look for candidates in the vector index; None: the stored scores rank every
        row of the tree, so there is nothing to look up."""
        raise NotImplementedError

    def matches(self, q: torch.Tensor, class_text: torch.Tensor) -> bool:
        """Whether the tree can say anything about the query at all."""
        return True

    def search_scores(self, model, rows: QueryRows, q: torch.Tensor, class_text: torch.Tensor) -> np.ndarray:
        """Per row, the probability that the model is about the query (1, text_dim): comparable
        across trees, so rankings from different trees merge."""
        raise NotImplementedError

    def label_scores(self, model, row: QueryRows, labels: torch.Tensor, class_text: torch.Tensor
                     ) -> tuple[np.ndarray, list[int | None]]:
        """One model's score per candidate label (L, text_dim), and the vocabulary class each
        label was matched to (None when the head scores the label's text itself)."""
        raise NotImplementedError


class MultiLabelHead(HeadKind):
    name, title, main_metric = "multilabel", "multi-label", "accuracy"
    lr, max_epochs = 1e-3, 500
    one_label, uses_texts, refit_default, mixes_targets = False, False, True, True

    def n_outputs(self, n_classes):
        return n_classes

    def loss(self, logits, y):
        return F.binary_cross_entropy_with_logits(logits, y)

    def probabilities(self, logits):
        return torch.sigmoid(logits)

    def quick_metrics(self, logits, y):
        return {"loss": float(self.loss(logits, y)),
                "accuracy": metrics.multilabel_accuracy(self.probabilities(logits), y)}

    def metrics(self, logits, y):
        return {"loss": float(self.loss(logits, y)), **metrics.multilabel_report(logits, y)}

    def query_columns(self, probe):
        return ["label_scores"]

    def query_vector(self, model, q):
        return None

    def matches(self, q, class_text):
        return float((class_text @ q[0]).max()) >= MATCH_MIN

    def search_scores(self, model, rows, q, class_text):
        # the stored probability of the vocabulary class whose text best matches the query
        best = int((class_text @ q[0]).argmax())
        return np.asarray(rows.label_scores, np.float32)[:, best]

    def label_scores(self, model, row, labels, class_text):
        sims = labels @ class_text.T  # (L, C)
        best = sims.argmax(dim=1).tolist()
        said = [bool(sims[i, j] >= MATCH_MIN) for i, j in enumerate(best)]
        stored = np.asarray(row.label_scores, np.float32)[0]
        scores = np.array([stored[j] if ok else 0.0 for j, ok in zip(best, said)], np.float32)
        return scores, [j if ok else None for j, ok in zip(best, said)]


class TextHead(HeadKind):
    name, title, main_metric = "text", "text", "top1"
    lr, max_epochs = 2e-3, 200
    # the fused text probe weighs itself on held-out validation rows, so no refit; one class per
    # model has nothing to mix
    one_label, uses_texts, refit_default, mixes_targets = True, True, False, False

    def n_outputs(self, n_classes):
        return 0

    def loss(self, logits, y):
        return F.cross_entropy(logits, y)

    def probabilities(self, logits):
        return torch.softmax(logits, dim=-1)

    def quick_metrics(self, logits, y):
        return {"loss": float(self.loss(logits, y)), "top1": metrics.topk_accuracy(logits, y, 1)}

    def metrics(self, logits, y):
        return {"loss": float(self.loss(logits, y)), **metrics.text_report(logits, y)}

    def query_columns(self, probe):
        return ["vector", "probe_factor"] if probe else ["vector"]

    def query_vector(self, model, q):
        with torch.no_grad():
            return model.embed_text(q)[0].numpy()  # (r_T,)

    def search_scores(self, model, rows, q, class_text):
        # a softmax over [query, training classes]: the query competes with what the expert knows;
        # a training class that says the same as the query is not a competitor
        texts = torch.cat([q, class_text[(class_text @ q[0]) < SAME_AS_QUERY]])  # (1 + k', text_dim)
        E = torch.as_tensor(rows.vectors, dtype=torch.float32)  # (n, r_T)
        with torch.no_grad():
            logits = model.logits_from(E, rows.factors, texts)  # (n, 1 + k')
        return self.probabilities(logits)[:, 0].numpy()

    def label_scores(self, model, row, labels, class_text):
        e = torch.as_tensor(row.vectors, dtype=torch.float32)  # (1, r_T)
        with torch.no_grad():
            scores = self.probabilities(model.logits_from(e, row.factors, labels))[0].numpy()
        return scores, [None] * len(labels)


HEADS: dict[str, HeadKind] = {h.name: h for h in (MultiLabelHead(), TextHead())}
# Names earlier reports, catalogs and lake manifests used for the same heads.
ALIASES = {"zeroshot": "text", "single-concept": "text", "multi-label": "multilabel"}
MULTILABEL, TEXT = HEADS["multilabel"], HEADS["text"]


def get_head(name: str | HeadKind) -> HeadKind:
    """The head kind called `name` (or an old alias of it)."""
    if isinstance(name, HeadKind):
        return name
    head = HEADS.get(ALIASES.get(name, name)) if isinstance(name, str) else None
    if head is None:
        raise UnknownHeadError(f"unknown head {name!r}: use one of {', '.join(HEADS)}")
    return head
