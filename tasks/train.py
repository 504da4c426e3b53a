"""Train one ProbeX expert per tree from its Parquet shards, with labels only a user would have.

Labels come from documented models' `id2label` (the catalog's `labels` column): a tree whose
documented children are one-vs-rest detectors ("other" + one class) gets the text-aligned head
(zero-shot); any other labelled tree gets the multi-label head over the union of its classes.
Undocumented models (generic LABEL_i) are never trained on. Validation = `is_val(repo_id)` among
the documented. A new expert is promoted (made `current`) only if it validates at least as well as
the current one.

Rows are read as changes from the tree's root (representation "delta", probex_core/train.py
`representations`) wherever the root's own row of the layer is in the shards; a tree whose layer
mixes full fine-tunes and adapters has no expert without it.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import asdict, dataclass, field

from storage.experts import current_version, load_expert, save_expert, tree_dir
from probex_core.data import EmptyDatasetError, ExpertError, LayerDataset, WeightRow
from probex_core.heads import MULTILABEL, TEXT, HeadKind, get_head
from probex_core.probex import COMPACT
from probex_core.splits import is_val
from probex_core.train import LayerChoice, TrainConfig, TrainResult, choose_layer, probex_trainer, refit
from storage.catalog import Catalog
from storage.shards import layers_of, read_layer

GENERIC_LABEL = re.compile(r"^LABEL_\d+$")
NEGATIVE_LABELS = {"other", "others", "rest", "negative", "none", "background"}
MIN_LABELLED = 4  # fewer documented training models: the tree gets no expert, and says so
# what training reads of a tree's catalog rows
TRAIN_COLUMNS = ["repo_id", "sha", "labels"]


class NoExpertError(ExpertError):
    """A tree that cannot have an expert (too few labelled models, no shards)."""


@dataclass
class TreeLabels:
    head: HeadKind  # what the labels imply
    labels: dict[str, list[str] | str]  # documented repo id -> classes, or its one class (one_label)

    @property
    def task(self) -> str:
        return self.head.name


def positive_labels(labels: list[str] | None) -> list[str] | None:
    """The classes a documented model names; None when it names none (undocumented)."""
    if not labels or all(GENERIC_LABEL.match(l) for l in labels):
        return None
    return [l for l in labels if l.lower() not in NEGATIVE_LABELS and not l.lower().startswith("not ")]


def tree_labels(models: list[dict]) -> TreeLabels:
    """Documented children's classes and the task they imply."""
    found = {}
    binary = True
    for r in models:
        pos = positive_labels(r.get("labels"))
        if pos is None or not pos:
            continue
        found[r["repo_id"]] = pos
        binary &= len(r["labels"]) == 2 and len(pos) == 1
    if binary and found:
        return TreeLabels(TEXT, {k: v[0] for k, v in found.items()})
    return TreeLabels(MULTILABEL, found)


def load_rows(shards: str, tree_id: str, layer: str, models: list[dict]) -> dict[str, WeightRow]:
    """repo id -> WeightRow for the models' current shas."""
    return load_layer(shards, tree_id, layer, models)[0]


def load_layer(shards: str, tree_id: str, layer: str, models: list[dict], root: dict | None = None
               ) -> tuple[dict[str, WeightRow], WeightRow | None]:
    """(repo id -> WeightRow for the models' current shas, the root's own row of the layer at
    `root`'s sha, or None when it is not extracted), from one read of the layer's shards."""
    want = {(r["repo_id"], r["sha"]) for r in models}
    root_key = None if root is None else (root["repo_id"], root["sha"])
    ids = {r for r, _ in want} | ({root_key[0]} if root_key else set())
    out, root_row = {}, None
    for row in read_layer(shards, tree_id, layer, ids):
        key = (row.repo_id, row.sha)
        if key == root_key and row.kind != "lora":
            root_row = WeightRow(row.repo_id, X=row.X)
        elif key not in want:
            continue
        elif row.kind == "lora":
            out[row.repo_id] = WeightRow(row.repo_id, A=row.A, B=row.B, scale=row.scale)
        else:
            out[row.repo_id] = WeightRow(row.repo_id, X=row.X)
    return out, root_row


def tree_root(catalog: Catalog, tree_id: str) -> dict | None:
    """The tree root's current catalog row (repo_id, sha), or None when the catalog has none."""
    return catalog.model(tree_id, columns=["repo_id", "sha"])


def validation_ids(ids: list[str], labels: TreeLabels) -> list[str]:
    """`is_val` picks validation models; a text-head model whose class no training model shares
    cannot be validated and stays in training. A small tree the hash split badly (no validation,
    or too little left to train on) holds out exactly one model, chosen stably."""
    val = [r for r in ids if is_val(r)]
    if labels.head.one_label:
        in_train = Counter(labels.labels[r] for r in ids if r not in set(val))
        val = [r for r in val if in_train[labels.labels[r]] > 0]
    if (not val or len(ids) - len(val) < MIN_LABELLED) and len(ids) > MIN_LABELLED:
        per_class = Counter(labels.labels[r] for r in ids) if labels.head.one_label else None
        pool = [r for r in ids if per_class is None or per_class[labels.labels[r]] > 1]
        val = [min(pool, key=lambda r: hashlib.sha256(r.encode()).digest())] if pool else []
    return val


def split_datasets(rows: dict[str, WeightRow], labels: TreeLabels, tree_id: str, layer: str,
                   root: WeightRow | None = None) -> tuple[LayerDataset, LayerDataset]:
    ids = sorted(r for r in labels.labels if r in rows)
    val_ids = validation_ids(ids, labels)
    train_ids = [r for r in ids if r not in set(val_ids)]
    if len(train_ids) < MIN_LABELLED or not val_ids:
        raise NoExpertError(f"{len(train_ids)} labelled training and {len(val_ids)} validation models "
                            f"with extracted layers; an expert needs >= {MIN_LABELLED} and >= 1",
                            tree=tree_id, layer=layer)
    task = labels.task
    train = LayerDataset.from_rows([rows[r] for r in train_ids], tree=tree_id, layer=layer,
                                   labels=[labels.labels[r] for r in train_ids], task=task, root=root)
    # Validation speaks the training vocabulary: unseen classes are dropped (multilabel) or their
    # models left out (one label each), since the expert has no output for them.
    known = set(train.classes)
    if labels.head.one_label:
        val_ids = [r for r in val_ids if labels.labels[r] in known]
        val_labels = [labels.labels[r] for r in val_ids]
    else:
        val_labels = [[c for c in labels.labels[r] if c in known] for r in val_ids]
    if not val_ids:
        raise NoExpertError("no validation model has a class seen in training", tree=tree_id, layer=layer)
    val = LayerDataset.from_rows([rows[r] for r in val_ids], tree=tree_id, layer=layer,
                                 labels=val_labels, task=task, classes=train.classes, root=root)
    return train, val


@dataclass
class TreeTrainReport:
    tree_id: str
    task: str | None = None  # the head kind's name
    layer: str | None = None
    version: str | None = None
    promoted: bool = False
    n_train: int = 0
    n_val: int = 0
    val: dict = field(default_factory=dict)
    previous_val: dict | None = None
    layer_choice: dict = field(default_factory=dict)
    params: int = 0
    train_seconds: float = 0.0
    refit: bool = False  # trained again on training + validation rows once validation chose the epochs
    representation: str | None = None  # "raw" rows or "delta", changes from the root
    skipped: str | None = None  # why the tree got no expert

    def to_dict(self) -> dict:
        return asdict(self)


# Per-run cap (the 60 s per expert target on 2 cores); training keeps the best state reached.
TIME_LIMIT_S = 50.0


def model_kwargs(head: str | HeadKind, text_dim: int | None) -> dict:
    """COMPACT sizes keep an expert under 1/10 of Dense; dropout 0.3 helped the multi-label trees
    (design notes), not the text head."""
    head = get_head(head)
    kw = {"r_U": COMPACT["r_U"], "r_V": COMPACT["r_V"], "r_T": COMPACT["r_T"], "head": head.name}
    if head.uses_texts:
        kw.update(text_dim=text_dim)
    else:
        kw.update(dropout=0.3)
    return kw


def default_train_config(is_lora: bool, device: str = "auto") -> TrainConfig:
    """CUDA when there is one (device "auto"); on the CPU, one thread for LoRA factors (small
    matmuls: a second thread costs more than it saves) and every core for a dense layer. Either
    way a run stops at TIME_LIMIT_S, keeping its best state."""
    return TrainConfig(device=device, threads=1 if is_lora else None, time_limit_s=TIME_LIMIT_S)


@dataclass
class FittedExpert:
    """A tree's trained expert before it is saved: the layer choice and the final model."""

    head: HeadKind
    choice: LayerChoice
    best: TrainResult  # the final model (refit on training + validation rows where the head does)
    train: LayerDataset
    val: LayerDataset
    text_emb: object | None  # the training classes' text embeddings (a head that uses texts)
    root: dict | None = None  # the root's catalog row (repo_id, sha) whose layer the rows were read against

    @property
    def train_seconds(self) -> float:
        """Every full run of the layer choice, plus the refit."""
        return sum(r.seconds for r in self.choice.results.values()) + self.best.seconds - self.choice.best.seconds


def tree_datasets(shards: str, tree_id: str, models: list[dict], labels: TreeLabels,
                  layers: list[str] | None, report: TreeTrainReport, root: dict | None = None
                  ) -> dict[str, tuple[LayerDataset, LayerDataset]]:
    """layer -> (train, val) for every candidate layer with labelled rows, carrying the root's row
    of the layer when it is extracted (`root`: its catalog row); empty, with report.skipped saying
    why, when the tree cannot have an expert."""
    candidates = layers or layers_of(shards, tree_id)
    if not candidates:
        report.skipped = "no extracted layers; run `probex extract` first"
        return {}
    if len(labels.labels) < MIN_LABELLED:
        report.skipped = f"only {len(labels.labels)} documented models (need {MIN_LABELLED})"
        return {}
    data, why = {}, None
    for layer in candidates:
        try:
            rows, root_row = load_layer(shards, tree_id, layer, models, root)
            if root_row is None and len({r.is_lora for r in rows.values()}) > 1:
                raise NoExpertError("the layer mixes full fine-tunes and adapters, which an expert "
                                    "reads as changes from the root, and the root's own row of it "
                                    "is not extracted", tree=tree_id, layer=layer)
            data[layer] = split_datasets(rows, labels, tree_id, layer, root_row)
        except EmptyDatasetError:
            continue
        except NoExpertError as e:
            why = str(e)
    if not data:
        report.skipped = why or "no layer has labelled rows"
    return data


def fit_tree(data: dict[str, tuple[LayerDataset, LayerDataset]], labels: TreeLabels, encoder,
             tcfg: TrainConfig | None, strategies, device: str, root: dict | None = None) -> FittedExpert:
    """Choose the layer (and the representation, TrainConfig.representation) on validation, then
    train the final expert on it."""
    any_train = next(iter(data.values()))[0]
    tcfg = tcfg or default_train_config(any_train.is_lora, device)
    text_emb = None
    if labels.head.uses_texts:
        import torch

        text_emb = torch.as_tensor(encoder.encode_classes(any_train.classes))
    kw = model_kwargs(labels.head, None if text_emb is None else text_emb.shape[1])
    choice = choose_layer(data, kw, tcfg, text_emb=text_emb, strategies=strategies)
    train, val = data[choice.layer]
    best = refit(probex_trainer(kw, text_emb), choice.best, train, val, tcfg, labels.head)
    return FittedExpert(labels.head, choice, best, train, val, text_emb, root if train.root is not None else None)


def publish_expert(catalog: Catalog, experts: str, tree_id: str, fitted: FittedExpert, encoder,
                   report: TreeTrainReport, device: str = "auto") -> None:
    """Save a new expert version; make it current (and the tree's row point at it) only when it
    validates at least as well as the current one. Its config's info says where it trained
    (`device`, as fit_tree resolved it in this process, and the host: a cluster's worker)."""
    import socket

    from probex_core.device import device_name

    best, head = fitted.best, fitted.head
    folder = tree_dir(experts, tree_id)
    prev = current_version(folder)
    if prev is not None:
        report.previous_val = load_expert(folder, prev).config.get("metrics", {}).get("val")
    promote = report.previous_val is None or head.selection_key(best.best_val) >= head.selection_key(report.previous_val)
    extra = {"class_text_emb": fitted.text_emb} if fitted.text_emb is not None else None
    representation = best.model.cfg.representation
    path = save_expert(experts, tree_id, best.model, layer=fitted.choice.layer, labels=list(fitted.train.classes),
                       text_encoder=getattr(encoder, "name", None), prompt=getattr(encoder, "prompt", None),
                       metrics={"val": best.best_val, "train_seconds": round(best.seconds, 2)}, extra_tensors=extra,
                       info={"task": head.name, "n_train": len(fitted.train), "n_val": len(fitted.val),
                             "refit": best.refit, "layer_choice": fitted.choice.summary(),
                             "representation": representation,
                             "representation_scores": best.representation_scores,
                             "root": fitted.root if representation == "delta" else None,
                             "device": device_name(device), "host": socket.gethostname()}, make_current=promote)
    report.version, report.promoted = path.name, promote
    if promote:
        row = catalog.tree(tree_id) or {"tree_id": tree_id, "root": tree_id}
        row.update(layer=fitted.choice.layer, expert_version=path.name, task=head.name)
        catalog.upsert_trees([row])


def train_tree(catalog: Catalog, shards: str, experts: str, tree_id: str, *, encoder=None,
               layers: list[str] | None = None, tcfg: TrainConfig | None = None,
               strategies=("fast",), device: str = "auto") -> TreeTrainReport:
    """Choose the layer, train, save a new expert version, promote it if not worse."""
    report = TreeTrainReport(tree_id)
    models = catalog.tree_children(tree_id, columns=TRAIN_COLUMNS)
    labels = tree_labels(models)
    report.task = labels.head.name
    root = tree_root(catalog, tree_id)
    data = tree_datasets(shards, tree_id, models, labels, layers, report, root)
    if not data:
        return report
    fitted = fit_tree(data, labels, encoder, tcfg, strategies, device, root)
    report.layer, report.layer_choice = fitted.choice.layer, fitted.choice.summary()
    report.n_train, report.n_val = len(fitted.train), len(fitted.val)
    report.val, report.params, report.refit = fitted.best.best_val, fitted.best.n_params, fitted.best.refit
    report.representation = fitted.best.model.cfg.representation
    report.train_seconds = fitted.train_seconds
    publish_expert(catalog, experts, tree_id, fitted, encoder, report, tcfg.device if tcfg else device)
    return report
