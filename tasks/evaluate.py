"""Evaluate each tree's current expert against ground truth, beside Dense and StatNN baselines on
the same splits and layer, plus the paper's one-model-across-trees experiment.

Ground truth (`_ground_truth.parquet` of a bundled lake) is read here only: training never sees it.
Test = the tree's `test` models (undocumented in the lake); zero-shot = its `holdout` models, scored
only against the held-out classes' texts. A tree whose ground truth marks its models `synthetic`
(zoo/families.py: weights at real layouts, never trained on data) is reported as such: its numbers
claim no accuracy.

The baselines read the rows as the expert does: for an expert of representation "delta" (a mixed
tree of full fine-tunes and adapters), each row's change from the root matrix the expert was
trained against (dense X - W_root; a LoRA row s B A already is a change), so no baseline sees raw
dense matrices beside LoRA deltas.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow.parquet as pq
import torch

from probex_core.baselines import cross_tree_experiment, train_dense, train_statnn
from storage.experts import load_current
from probex_core.data import LayerDataset
from probex_core.errors import ProbexError
from probex_core.heads import MULTILABEL, HeadKind, get_head
from probex_core.train import TrainConfig, evaluate, evaluate_zeroshot, train_final
from storage.catalog import Catalog
from tasks.train import default_train_config, load_rows, model_kwargs, split_datasets, tree_labels

GROUND_TRUTH = "_ground_truth.parquet"


class GroundTruthMissingError(ProbexError):
    pass


def load_ground_truth(lake: str | Path) -> dict[str, dict]:
    path = Path(lake) / GROUND_TRUTH
    if not path.exists():
        raise GroundTruthMissingError(
            f"no {GROUND_TRUTH} in {lake}: evaluation needs a bundled lake's ground truth "
            "(build one with `probex zoo build`, or pass --lake)")
    return {r["repo_id"]: r for r in pq.read_table(path).to_pylist()}


def _eval_set(rows, gt, models, split, head: HeadKind, tree_id, layer, classes=None):
    """Models of `split` that have rows, labelled from ground truth."""
    ids = sorted(r["repo_id"] for r in models
                 if r["repo_id"] in rows and gt.get(r["repo_id"], {}).get("split") == split
                 and not gt[r["repo_id"]]["corrupt"])
    if head.one_label:
        labels = {i: gt[i]["classes"][0] for i in ids}
        if classes is not None:
            ids = [i for i in ids if labels[i] in classes]
    else:
        labels = {i: [c for c in gt[i]["classes"] if classes is None or c in classes] for i in ids}
    if not ids:
        return None
    return LayerDataset.from_rows([rows[i] for i in ids], tree=tree_id, layer=layer,
                                  labels=[labels[i] for i in ids], task=head.name, classes=classes)


def _scores(model, head: HeadKind, test, text_emb, heldout, heldout_emb) -> dict:
    out = {}
    if test is not None:
        out.update({k: v for k, v in evaluate(model, test, head, text_emb).items() if k != "loss"})
    if heldout is not None and head.uses_texts:
        z = evaluate_zeroshot(model, heldout, heldout_emb)
        out.update(zeroshot_top1=z["zeroshot_top1"], zeroshot_top5=z["zeroshot_top5"],
                   n_zeroshot_classes=z["n_zeroshot_classes"])
    return out


@dataclass
class TreeSplits:
    """One tree's current expert and its datasets on the expert's layer, read once and shared by
    the per-tree evaluation and the cross-tree experiment."""

    expert: object  # LoadedExpert
    head: HeadKind
    train: LayerDataset
    val: LayerDataset
    test: LayerDataset | None
    heldout: LayerDataset | None
    synthetic: bool = False  # the ground truth marks the tree's models synthetic: no accuracy claimed

    def as_expert_reads(self) -> "TreeSplits":
        """The splits with rows as the expert reads them (`expert_view`): what a baseline trains on."""
        view = lambda ds: expert_view(ds, self.expert)  # noqa: E731
        return replace(self, train=view(self.train), val=view(self.val), test=view(self.test),
                       heldout=view(self.heldout))


def expert_view(ds: LayerDataset | None, expert) -> LayerDataset | None:
    """`ds` as `expert` reads it: for a delta expert, every row's change from the root matrix the
    expert was trained against (its `input_root`, the root's row it was fitted on); otherwise the
    rows as they are."""
    if ds is None or expert.probex_config.representation != "delta":
        return ds
    root = expert.model.input_root
    if root is None:
        raise ProbexError(f"the delta expert of tree {ds.tree} carries no root matrix to read rows against")
    ref = ds.X if ds.X is not None else ds.A
    return ds.deltas(root.detach().to(device=ref.device, dtype=ref.dtype))


def is_synthetic(gt: dict, repo_ids) -> bool:
    """Whether the ground truth marks any of these models synthetic (False in a lake whose ground
    truth predates the column)."""
    return any(bool(gt.get(r, {}).get("synthetic")) for r in repo_ids)


def tree_splits(catalog: Catalog, shards: str, experts: str, tree_id: str, gt: dict) -> TreeSplits | None:
    expert = load_current(experts, tree_id)
    if expert is None:
        return None
    layer = expert.config["layer"]
    models = catalog.tree_children(tree_id)
    labels = tree_labels(models)
    rows = load_rows(shards, tree_id, layer, models)
    train, val = split_datasets(rows, labels, tree_id, layer)
    head = labels.head
    test = _eval_set(rows, gt, models, "test", head, tree_id, layer, classes=train.classes)
    heldout = _eval_set(rows, gt, models, "holdout", head, tree_id, layer) if head.uses_texts else None
    synthetic = is_synthetic(gt, [tree_id, *(r["repo_id"] for r in models)])
    return TreeSplits(expert, head, train, val, test, heldout, synthetic)


def evaluate_tree(splits: TreeSplits | None, encoder, tcfg: TrainConfig | None = None,
                  baselines: bool = True, device: str = "auto") -> dict:
    if splits is None:
        return {"skipped": "no expert; run `probex train`"}
    expert, train, val, test, heldout = splits.expert, splits.train, splits.val, splits.test, splits.heldout
    layer, head = expert.config["layer"], get_head(expert.probex_config.head)
    text_emb = heldout_emb = None
    if head.uses_texts:
        text_emb = torch.as_tensor(encoder.encode_classes(train.classes))
        if heldout is not None:
            heldout_emb = torch.as_tensor(encoder.encode_classes(heldout.classes))
    info = expert.config.get("info", {})
    report = {
        "task": head.name, "layer": layer, "synthetic": splits.synthetic,
        "representation": expert.probex_config.representation,
        "n_train": len(train), "n_val": len(val), "n_test": 0 if test is None else len(test),
        "n_holdout": 0 if heldout is None else len(heldout),
        "n_classes": len(train.classes),  # the expert's label vocabulary (training classes)
        "layer_choice": info.get("layer_choice"),
        "probex": {**_scores(expert.model, head, test, text_emb, heldout, heldout_emb),
                   "params": expert.model.n_params(), "train_seconds": expert.config.get("metrics", {}).get("train_seconds")},
    }
    if expert.probex_config.text_probe:  # what the text head alone gives, for the report
        head_only = copy.deepcopy(expert.model)
        head_only.cfg = replace(head_only.cfg, text_probe=False)
        report["probex_head_only"] = _scores(head_only, head, test, text_emb, heldout, heldout_emb)
    if not baselines:
        return report
    # The experts' device and threads; no time limit: Dense is not cut short to flatter ProbeX.
    tcfg = tcfg or replace(default_train_config(train.is_lora, device), time_limit_s=None)
    r_T = expert.probex_config.r_T
    # the rows as the expert reads them (changes from its root, for a delta expert): a fair comparison
    seen = splits.as_expert_reads()
    train, val, test, heldout = seen.train, seen.val, seen.test, seen.heldout
    for name, trainer in (("dense", train_dense), ("statnn", train_statnn)):
        def train_one(tr, va, tc, trainer=trainer):
            return trainer(tr, va, tc, head=head, text_emb=text_emb, r_T=r_T)
        # the same protocol as the expert: validation picks the epochs, then a refit on train + val
        res = train_final(train_one, train, val, tcfg, head)
        report[name] = {**_scores(res.model, head, test, text_emb, heldout, heldout_emb),
                        "params": res.n_params, "train_seconds": round(res.seconds, 2)}
    return report


def cross_tree(splits: dict[str, TreeSplits | None], tcfg: TrainConfig | None = None) -> dict | None:
    """One model over every multi-label tree vs. one expert per tree (the paper's key claim)."""
    trees = {t: (sp.train, sp.val, sp.test) for t, sp in splits.items()
             if sp is not None and sp.head is MULTILABEL and sp.test is not None}
    if len(trees) < 2:
        return None
    return cross_tree_experiment(trees, tcfg or TrainConfig(threads=1),
                                 probex_kwargs=model_kwargs(MULTILABEL, None))


def retrieval(query, gt: dict, classes: list[str], k: int = 5, depth: int = 50) -> dict:
    """Text -> models with each class name as the query, across all trees (what a user runs).

    hit_rate@k: share of classes with a model trained on that class in the top k;
    precision@k: mean share of such models in the top k; map: mean average precision over the
    top `depth` (relevant = catalogued models whose ground truth names the class).
    """
    embedded = set(query.table.search().select(["repo_id"]).limit(None).to_pandas()["repo_id"])
    hits, precisions, aps = [], [], []
    for c in classes:
        relevant = {r for r, g in gt.items() if r in embedded and c in (g["classes"] or [])}
        if not relevant:
            continue
        ranked = query.search(c, k=depth)["repo_id"].tolist()
        rel = [r in relevant for r in ranked]
        hits.append(any(rel[:k]))
        precisions.append(sum(rel[:k]) / k)
        found, ap = 0, 0.0
        for i, is_rel in enumerate(rel, 1):
            if is_rel:
                found += 1
                ap += found / i
        aps.append(ap / min(len(relevant), depth))
    n = len(hits)
    return {"n_classes": n, f"hit_rate@{k}": sum(hits) / n if n else None,
            f"precision@{k}": sum(precisions) / n if n else None, "map": sum(aps) / n if n else None}
