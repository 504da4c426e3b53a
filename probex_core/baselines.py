"""Baselines on the same splits and layer, trained through the same loop as ProbeX (`train.fit`).

Dense:  a linear map of the flattened layer (the paper's "Dense expert").
          multilabel: logits = W vec(X) + b        d_H*d_W*C + C parameters
          text:       e = W vec(X) + b (r_T), then the same text alignment as ProbeX (`Head`)
StatNN: per-layer weight statistics (Unterthiner et al. 2020, plus norms), standardised with
        training statistics, then a small MLP (hidden=0: logistic regression / a linear map).
          features: mean, variance, quantiles (0, .25, .5, .75, 1), Frobenius norm, spectral norm

Both normalise inputs as ProbeX does (statistics of the training rows only).

Cross-tree experiment (the paper's motivation for tree experts, `cross_tree_experiment`):
one model trained on the union of several trees' training models vs one expert per tree, the
same model family on both sides, each scored per tree on that tree's test models and own classes.
Family: ProbeX when every tree's layer has the same shape (the paper's framing: the same
architecture, different roots, one shared layer position), else StatNN, whose features do not
depend on the layer's shape. Multi-label trees only; labels are expressed over the union of the
trees' class vocabularies (the single model's logits are sliced to each tree's classes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
import torch.nn as nn

from . import metrics
from .data import ExpertError, LayerDataset, blend_rows, concat_datasets
from .device import seed_everything
from .heads import MULTILABEL, HeadKind, get_head
from .probex import Head
from .train import (TrainConfig, TrainResult, check_datasets, config_for, evaluate, fit,
                    normalisation_stats, predict_logits, train_expert)

# ---------------------------------------------------------------------------------------------
# Dense


@dataclass
class DenseConfig:
    d_H: int
    d_W: int
    head: str = MULTILABEL.name
    n_outputs: int = 0
    r_T: int = 128  # text head only
    text_dim: int = 384
    input_scale: float = 1.0
    centered: bool = False
    logit_scale: float = 1 / 0.07
    learn_logit_scale: bool = False


class DenseExpert(nn.Module):
    def __init__(self, cfg: DenseConfig):
        super().__init__()
        self.cfg = cfg
        texts = get_head(cfg.head).uses_texts
        out = cfg.r_T if texts else cfg.n_outputs
        self.linear = nn.Linear(cfg.d_H * cfg.d_W, out)  # vec(X) -> logits | e
        if cfg.centered:
            self.register_buffer("input_mean", torch.zeros(cfg.d_H, cfg.d_W))
        else:
            self.input_mean = None
        self.out = Head(cfg.head, cfg.r_T, 0, cfg.text_dim, cfg.logit_scale,
                        cfg.learn_logit_scale) if texts else None

    def encode(self, batch) -> torch.Tensor:
        X = batch.dense()  # (n, d_H, d_W); LoRA rows are formed here
        if self.input_mean is not None:
            X = X - self.input_mean
        e = self.linear((X / self.cfg.input_scale).flatten(1))  # (n, C) | (n, r_T)
        return self.out.represent(e) if self.out is not None else e

    def forward(self, batch, text_emb=None) -> torch.Tensor:
        e = self.encode(batch)
        return e if self.out is None else self.out(e, text_emb)


def dense_param_count(d_H: int, d_W: int, n_outputs: int = 0, head: str | HeadKind = MULTILABEL,
                      r_T: int = 128, text_dim: int = 384) -> int:
    if not get_head(head).uses_texts:
        return d_H * d_W * n_outputs + n_outputs
    return d_H * d_W * r_T + r_T + text_dim * r_T + r_T


def train_dense(train: LayerDataset, val: LayerDataset | None, tcfg: TrainConfig | None = None,
                head: str | HeadKind | None = None, text_emb=None, r_T: int = 128) -> TrainResult:
    tcfg = tcfg or TrainConfig()
    head = get_head(head or train.task or MULTILABEL)
    check_datasets(train, val, head, train.d_H, train.d_W, text_emb, tcfg.min_train)
    mean, scale = normalisation_stats(train, tcfg.center, tcfg.normalise)
    cfg = DenseConfig(d_H=train.d_H, d_W=train.d_W, head=head.name,
                      n_outputs=head.n_outputs(train.n_classes), r_T=r_T,
                      text_dim=0 if text_emb is None else int(torch.as_tensor(text_emb).shape[1]),
                      input_scale=scale, centered=mean is not None)
    seed_everything(tcfg.seed)
    model = DenseExpert(cfg)
    if mean is not None:
        model.input_mean.copy_(mean)
    return fit(model, train, val, head, tcfg, text_emb, config=cfg, kind="dense")


# ---------------------------------------------------------------------------------------------
# StatNN

STAT_NAMES = ("mean", "var", "q0", "q25", "q50", "q75", "q100", "fro", "spec")
_QS = (0.0, 0.25, 0.5, 0.75, 1.0)


@torch.no_grad()
def weight_statistics(ds: LayerDataset, chunk: int = 32, power_iters: int = 30) -> torch.Tensor:
    """(n, 9) float32 features of each row's X, in STAT_NAMES order (computed on the CPU)."""
    ds = ds.to("cpu")
    out = []
    for b in ds.batches(chunk):
        X = b.dense().double()  # (c, d_H, d_W)
        flat = X.flatten(1)
        srt = flat.sort(dim=1).values
        N = srt.shape[1]
        qs = []
        for q in _QS:  # linear interpolation, as numpy's default quantile
            pos = q * (N - 1)
            lo, hi = int(pos), min(int(pos) + 1, N - 1)
            qs.append(srt[:, lo] + (pos - lo) * (srt[:, hi] - srt[:, lo]))
        # spectral norm by power iteration on X^T X (deterministic start vector)
        v = torch.ones(X.shape[0], X.shape[2], 1, dtype=X.dtype)
        for _ in range(power_iters):
            v = X.transpose(1, 2) @ (X @ v)
            v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
        spec = (X @ v).norm(dim=(1, 2))
        feats = [flat.mean(1), flat.var(1), *qs, flat.norm(dim=1), spec]
        out.append(torch.stack(feats, dim=1).float())
    return torch.cat(out)


@dataclass
class FeatureBatch:
    feats: torch.Tensor  # (n, F)
    y: torch.Tensor | None

    def __len__(self) -> int:
        return self.feats.shape[0]

    def mixed(self, lam: torch.Tensor, perm: torch.Tensor, unit: bool = False) -> "FeatureBatch":
        """Mixup in feature space (WeightBatch.mixed's counterpart; `unit` does not apply)."""
        return FeatureBatch(blend_rows(self.feats, lam, 1 - lam, perm), blend_rows(self.y, lam, 1 - lam, perm))


@dataclass
class FeatureSet:
    feats: torch.Tensor  # (n, F)
    y: torch.Tensor | None
    is_lora: ClassVar[bool] = False  # statistics, never factored rows

    def __len__(self) -> int:
        return self.feats.shape[0]

    def to(self, device) -> "FeatureSet":
        return FeatureSet(self.feats.to(device), None if self.y is None else self.y.to(device))

    def batch(self, idx) -> FeatureBatch:
        return FeatureBatch(self.feats[idx], None if self.y is None else self.y[idx])


@dataclass
class StatNNConfig:
    n_features: int = len(STAT_NAMES)
    head: str = MULTILABEL.name
    n_outputs: int = 0
    hidden: int = 64  # 0: a linear map (logistic regression for multilabel)
    r_T: int = 128
    text_dim: int = 384
    logit_scale: float = 1 / 0.07
    learn_logit_scale: bool = False


class StatNN(nn.Module):
    def __init__(self, cfg: StatNNConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("feat_mean", torch.zeros(cfg.n_features))
        self.register_buffer("feat_std", torch.ones(cfg.n_features))
        texts = get_head(cfg.head).uses_texts
        out = cfg.r_T if texts else cfg.n_outputs
        if cfg.hidden > 0:
            self.mlp = nn.Sequential(nn.Linear(cfg.n_features, cfg.hidden), nn.ReLU(),
                                     nn.Linear(cfg.hidden, out))
        else:
            self.mlp = nn.Linear(cfg.n_features, out)
        self.out = Head(cfg.head, cfg.r_T, 0, cfg.text_dim, cfg.logit_scale,
                        cfg.learn_logit_scale) if texts else None

    def prepare(self, ds: LayerDataset) -> FeatureSet:
        return FeatureSet(weight_statistics(ds), ds.y.cpu() if ds.y is not None else None)

    def set_normaliser(self, train_feats: torch.Tensor) -> None:
        self.feat_mean.copy_(train_feats.mean(0))
        self.feat_std.copy_(train_feats.std(0).clamp_min(1e-12) if len(train_feats) > 1
                            else torch.ones_like(self.feat_std))

    def encode(self, fb: FeatureBatch) -> torch.Tensor:
        e = self.mlp((fb.feats - self.feat_mean) / self.feat_std)
        return self.out.represent(e) if self.out is not None else e

    def forward(self, fb: FeatureBatch, text_emb=None) -> torch.Tensor:
        e = self.encode(fb)
        return e if self.out is None else self.out(e, text_emb)


def train_statnn(train: LayerDataset, val: LayerDataset | None, tcfg: TrainConfig | None = None,
                 head: str | HeadKind | None = None, text_emb=None, hidden: int = 64, r_T: int = 128
                 ) -> TrainResult:
    tcfg = tcfg or TrainConfig()
    head = get_head(head or train.task or MULTILABEL)
    check_datasets(train, val, head, train.d_H, train.d_W, text_emb, tcfg.min_train)
    cfg = StatNNConfig(head=head.name, n_outputs=head.n_outputs(train.n_classes),
                       hidden=hidden, r_T=r_T,
                       text_dim=0 if text_emb is None else int(torch.as_tensor(text_emb).shape[1]))
    seed_everything(tcfg.seed)
    model = StatNN(cfg)
    t0 = time.perf_counter()
    model.set_normaliser(weight_statistics(train))
    res = fit(model, train, val, head, tcfg, text_emb, config=cfg, kind="statnn")
    res.seconds = time.perf_counter() - t0  # feature extraction counts as training time
    return res


# ---------------------------------------------------------------------------------------------
# One model across trees vs one expert per tree


def cross_tree_experiment(trees: Mapping[str, tuple[LayerDataset, LayerDataset, LayerDataset]],
                          tcfg: TrainConfig | None = None, *, model: str = "auto",
                          probex_kwargs: dict | None = None, statnn_hidden: int = 64) -> dict:
    """trees: tree_id -> (train, val, test), all multi-label. Returns
    {"model": "probex"|"statnn", "n_union_classes", "single": {"params", "train_seconds"},
     "experts_train_seconds", "trees": {tree_id: {"single": {accuracy, map}, "expert": {...}}}}."""
    tcfg = tcfg or TrainConfig()
    probex_kwargs = dict(probex_kwargs or {})
    if len(trees) < 2:
        raise ExpertError("the cross-tree experiment needs at least two trees")
    for tid, (tr, va, te) in trees.items():
        if tr.task != MULTILABEL.name:
            raise ExpertError("cross-tree experiment supports multi-label trees only", tree=tid)
    shapes = {(tr.d_H, tr.d_W) for tr, _, _ in trees.values()}
    kind = model if model != "auto" else ("probex" if len(shapes) == 1 else "statnn")
    if kind == "probex" and len(shapes) != 1:
        raise ExpertError(f"one ProbeX across trees needs one layer shape, got {sorted(shapes)}")
    union = sorted({c for tr, _, _ in trees.values() for c in tr.classes})

    def train_one(tr, va):
        if kind == "probex":
            return train_expert(tr, va, config_for(tr, **probex_kwargs), tcfg)
        if kind == "statnn":
            return train_statnn(tr, va, tcfg, hidden=statnn_hidden)
        raise ExpertError(f"unknown model family {kind!r}")

    def as_union(ds):  # StatNN features do not need a common shape: stack per-tree features
        return ds.with_classes(union)

    if kind == "probex":
        single_tr = concat_datasets([as_union(tr) for tr, _, _ in trees.values()])
        single_va = concat_datasets([as_union(va) for _, va, _ in trees.values()])
        single = train_one(single_tr, single_va)
    else:
        single = _train_statnn_union(trees, union, tcfg, statnn_hidden)

    out = {"model": kind, "n_union_classes": len(union),
           "single": {"params": single.n_params, "train_seconds": single.seconds},
           "experts_train_seconds": 0.0, "trees": {}}
    for tid, (tr, va, te) in trees.items():
        cols = [union.index(c) for c in tr.classes]
        logits = predict_logits(single.model, te)[:, cols]
        expert = train_one(tr, va)
        out["experts_train_seconds"] += expert.seconds
        ev = evaluate(expert.model, te, MULTILABEL)
        out["trees"][tid] = {
            "single": metrics.multilabel_report(logits, te.y),
            "expert": {"accuracy": ev["accuracy"], "map": ev["map"], "params": expert.n_params},
        }
    return out


def _train_statnn_union(trees, union, tcfg, hidden) -> TrainResult:
    """StatNN over several trees whose layers differ in shape: features are stacked directly."""
    tr_sets = [as_features(tr.with_classes(union)) for tr, _, _ in trees.values()]
    va_sets = [as_features(va.with_classes(union)) for _, va, _ in trees.values()]
    tr_all = FeatureSet(torch.cat([f.feats for f in tr_sets]), torch.cat([f.y for f in tr_sets]))
    va_all = FeatureSet(torch.cat([f.feats for f in va_sets]), torch.cat([f.y for f in va_sets]))
    cfg = StatNNConfig(head=MULTILABEL.name, n_outputs=len(union), hidden=hidden)
    seed_everything(tcfg.seed)
    model = _PreparedStatNN(cfg)
    model.set_normaliser(tr_all.feats)
    return fit(model, tr_all, va_all, MULTILABEL, tcfg, config=cfg, kind="statnn")


def as_features(ds: LayerDataset) -> FeatureSet:
    return FeatureSet(weight_statistics(ds), ds.y)


class _PreparedStatNN(StatNN):
    """StatNN that also accepts already-computed FeatureSets (cross-tree training)."""

    def prepare(self, ds):
        return ds if isinstance(ds, FeatureSet) else super().prepare(ds)
