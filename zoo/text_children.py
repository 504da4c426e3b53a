"""Real PEFT LoRA fine-tunes of the text bases on WordNet classes: the children of the text trees.

A child is LoRA (query/value projections of the top TOP_LAYERS transformer layers) plus a new
classifier on the mean-pooled output, trained with cross-entropy for a few epochs:
- "subset":   a k-way classifier over the child's own classes;
- "detector": a one-vs-rest binary detector of one class, labels ["other", class].

Speed: the layers below the LoRA never change, so their output for each class's texts is computed
once per process and cached (about 1.5 MB per class and base; `clear_feature_cache` frees it); a
child only runs its top layers, so a child's cost is linear in (training texts x epochs).

Saved tensors are exactly what PEFT's save_pretrained would write for a PeftModel wrapping the
BertModel, with the head registered as a PEFT `modules_to_save` module named "classifier":
    base_model.model.encoder.layer.{i}.attention.self.{query,value}.lora_A.weight  (r, hidden)
    base_model.model.encoder.layer.{i}.attention.self.{query,value}.lora_B.weight  (hidden, r)
    base_model.model.classifier.weight  (n_labels, hidden)
    base_model.model.classifier.bias    (n_labels,)
so `set_peft_model_state_dict` loads them back into such a model (see `load_text_child`).
"""

from __future__ import annotations

import copy
import enum
import functools
import os
import random
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from zoo.text_bases import TextBase
from zoo.types import TrainedChild
from zoo.wordnet import WordClass

TOP_LAYERS = 2  # LoRA goes on the last two transformer layers; everything below stays frozen
TARGET_MODULES = ["query", "value"]
MAX_LENGTH = 32  # tokens; "lemma: definition" texts rarely need more
BATCH_SIZE = 32


@dataclass
class TextTask:
    kind: str  # "subset" (k-way classifier over `classes`) or "detector" (one-vs-rest of classes[0])
    classes: list[WordClass]  # the child's own classes; exactly one for a detector
    # detector only: the classes its "other" texts come from
    negatives: list[WordClass] = field(default_factory=list)
    # Texts per class (detector: per side, so negatives match positives and chance is 0.5).
    # Every class has a fixed train/held-out split (see class_split), so held-out texts are never
    # trained on by any child, whatever its classes.
    n_train: int = 16
    n_heldout: int = 16

    def __post_init__(self):
        if self.kind not in ("subset", "detector"):
            raise ValueError(f"TextTask.kind must be 'subset' or 'detector', not {self.kind!r}")
        if self.kind == "detector" and (len(self.classes) != 1 or not self.negatives):
            raise ValueError("a detector task needs exactly one class and at least one negative class")
        if self.kind == "subset" and len(self.classes) < 2:
            raise ValueError("a subset task needs at least two classes")


def class_split(cls: WordClass, n_train: int, n_heldout: int) -> tuple[list[str], list[str]]:
    """A class's fixed (train, held-out) texts: the same for every child, whatever its seed."""
    if len(cls.texts) < n_train + n_heldout:
        raise ValueError(
            f"class {cls.name!r} has {len(cls.texts)} texts, fewer than {n_train}+{n_heldout}"
        )
    texts = list(cls.texts)
    random.Random(cls.offset).shuffle(texts)  # the pool lists texts by synset offset: mix them
    return texts[:n_train], texts[n_train : n_train + n_heldout]


# ----------------------------------------------------------------------------- frozen lower layers


def _tokenize(base: TextBase, texts: list[str]) -> dict[str, torch.Tensor]:
    return base.tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")


@functools.cache
def _lower_states(base: TextBase, texts: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states entering the first LoRA layer, (n, T, H), and the attention mask, (n, T).
    Computed once per (base, text set): callers pass one class's split, so the cache grows with
    the number of classes used, not with the number of children."""
    batch = _tokenize(base, list(texts))
    bert = base.model
    with torch.no_grad():
        hidden = bert.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
        attn_mask = create_bidirectional_mask(
            config=bert.config, inputs_embeds=hidden, attention_mask=batch["attention_mask"]
        )
        for layer in bert.encoder.layer[:-TOP_LAYERS]:
            hidden = layer(hidden, attn_mask)
    return hidden, batch["attention_mask"]


def clear_feature_cache() -> None:
    """Free the cached lower-layer states (e.g. once a tree's children are all trained)."""
    _lower_states.cache_clear()


def _gather(base: TextBase, parts: list[tuple[WordClass, list[int], str]], n_train: int, n_heldout: int):
    """Stack the cached states of chosen texts: parts = (class, indices into its split, "train" or
    "heldout"). Classes differ in padded length; shorter ones are zero-padded, masked out."""
    hiddens, masks = [], []
    for cls, rows, side in parts:
        train, heldout = class_split(cls, n_train, n_heldout)
        h, m = _lower_states(base, tuple(train + heldout))
        offset = 0 if side == "train" else n_train
        hiddens.append(h[[offset + r for r in rows]])
        masks.append(m[[offset + r for r in rows]])
    T = max(h.shape[1] for h in hiddens)
    hidden = torch.cat([F.pad(h, (0, 0, 0, T - h.shape[1])) for h in hiddens])  # (N, T, H)
    mask = torch.cat([F.pad(m, (0, T - m.shape[1])) for m in masks])  # (N, T)
    return hidden, mask


# ----------------------------------------------------------------------------- the child model


def _peft_model(base: TextBase, n_labels: int, rank: int, alpha: int, lora_init_seed: int) -> PeftModel:
    """A PeftModel around a structural copy of the base BertModel (frozen weights shared, not
    copied) with a zero-initialised classifier as a modules_to_save head."""
    shared = {id(t): t for t in (*base.model.parameters(), *base.model.buffers())}
    bert = copy.deepcopy(base.model, memo=shared)  # PEFT rewires modules in place: never on the base
    # Zero head: the feasibility study found it decisive for reading a child's task from its
    # weights (a random head lets LoRA fit around arbitrary directions).
    bert.classifier = nn.Linear(bert.config.hidden_size, n_labels)
    nn.init.zeros_(bert.classifier.weight)
    nn.init.zeros_(bert.classifier.bias)
    n_layers = bert.config.num_hidden_layers
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=TARGET_MODULES,
        layers_to_transform=list(range(n_layers - TOP_LAYERS, n_layers)),
        layers_pattern="layer",
        bias="none",
        modules_to_save=["classifier"],
    )
    # lora_A is drawn from torch's global RNG: seed it, without disturbing the caller's stream.
    # Many real fine-tunes share PEFT's default seed, hence a tree-wide lora_init_seed.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft asks transformers a deprecated question (is_gradient_checkpointing): not ours to fix
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
        torch.manual_seed(lora_init_seed)
        return get_peft_model(bert, config)


def _top_forward(model: PeftModel, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cached lower states (B, T, H) -> top LoRA layers -> mean pool -> logits (B, n_labels)."""
    bert = model.base_model.model
    attn_mask = create_bidirectional_mask(config=bert.config, inputs_embeds=hidden, attention_mask=mask)
    for layer in bert.encoder.layer[-TOP_LAYERS:]:
        hidden = layer(hidden, attn_mask)
    return bert.classifier(_mean_pool(hidden, mask))


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H), (B, T) -> (B, H), averaging real tokens only, as sentence-transformers pools."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def _accuracy(model: PeftModel, hidden: torch.Tensor, mask: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (_top_forward(model, hidden, mask).argmax(-1) == y).float().mean().item()


# ----------------------------------------------------------------------------- the data of a task


def _task_data(base: TextBase, task: TextTask, rng: random.Random):
    """-> labels in head order, (train hidden, mask, y), (held-out hidden, mask, y)."""
    n_tr, n_ho = task.n_train, task.n_heldout
    if task.kind == "subset":
        order = rng.sample(task.classes, len(task.classes))  # the head order is the child's own
        labels = [c.name for c in order]
        train_parts = [(c, list(range(n_tr)), "train") for c in order]
        heldout_parts = [(c, list(range(n_ho)), "heldout") for c in order]
        y_train = torch.arange(len(order)).repeat_interleave(n_tr)
        y_heldout = torch.arange(len(order)).repeat_interleave(n_ho)
    else:
        positive = task.classes[0]
        labels = ["other", positive.name]
        negatives = rng.sample(task.negatives, min(len(task.negatives), n_tr))
        train_parts = [(positive, list(range(n_tr)), "train"), *_spread(negatives, n_tr, "train", rng)]
        heldout_parts = [
            (positive, list(range(n_ho)), "heldout"),
            *_spread(negatives, n_ho, "heldout", rng),
        ]
        y_train = torch.tensor([1] * n_tr + [0] * n_tr)
        y_heldout = torch.tensor([1] * n_ho + [0] * n_ho)
    train = (*_gather(base, train_parts, n_tr, n_ho), y_train)
    heldout = (*_gather(base, heldout_parts, n_tr, n_ho), y_heldout)
    return labels, train, heldout


def _spread(classes: list[WordClass], n: int, side: str, rng: random.Random):
    """n texts spread round-robin over `classes`, each class offering n texts on its side."""
    picks = {c.offset: rng.sample(range(n), n) for c in classes}
    rows: dict[int, list[int]] = {c.offset: [] for c in classes}
    for i in range(n):
        cls = classes[i % len(classes)]
        rows[cls.offset].append(picks[cls.offset][i // len(classes)])
    return [(c, rows[c.offset], side) for c in classes if rows[c.offset]]


# ----------------------------------------------------------------------------- training


def _set_threads() -> None:
    # Small matmuls gain little past 2 threads, and oversubscribed threads spin when other
    # processes hold the cores (docs/benchmarks.md). Only cap torch's all-cores
    # default: a caller's OMP_NUM_THREADS (Dask sets 1) or smaller thread count stands.
    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > 2:
        torch.set_num_threads(2)


def _length_grouped_batches(lengths: torch.Tensor, epochs: int, seed: int):
    """Batch indices for all epochs: shuffled, then sorted by length within groups of a few
    batches (as HF Trainer's group_by_length), so a batch holds texts of similar length and
    little padding is computed; the batch order is shuffled again."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        batches = []
        for group in torch.randperm(len(lengths), generator=generator).split(4 * BATCH_SIZE):
            batches += group[lengths[group].argsort(descending=True, stable=True)].split(BATCH_SIZE)
        for b in torch.randperm(len(batches), generator=generator):
            yield batches[b]


def train_text_child(
    base: TextBase,
    task: TextTask,
    *,
    seed: int,
    lr: float,
    epochs: int,
    rank: int,
    lora_init_seed: int = 0,
    lora_alpha: int | None = None,
) -> TrainedChild:
    """Fine-tune one LoRA child of `base` on `task`. Deterministic for (seed, lora_init_seed) on
    CPU: `seed` drives head order, negative texts and batch order; `lora_init_seed` the LoRA A init."""
    _set_threads()
    alpha = lora_alpha if lora_alpha is not None else 2 * rank
    rng = random.Random(seed)
    labels, (h_tr, m_tr, y_tr), (h_ho, m_ho, y_ho) = _task_data(base, task, rng)
    model = _peft_model(base, len(labels), rank, alpha, lora_init_seed)
    # eval mode: no dropout; with a few dozen texts a class and under 10 epochs it only slows learning
    model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
    for idx in _length_grouped_batches(m_tr.sum(1), epochs, seed):
        T = int(m_tr[idx].sum(1).max())  # cut the batch's padding: compute is linear in B*T
        loss = F.cross_entropy(_top_forward(model, h_tr[idx, :T], m_tr[idx, :T]), y_tr[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # save_embedding_layers=False: "auto" would look the base up on the Hub (no network here)
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    tensors = {k: v.detach().clone().contiguous() for k, v in state.items()}
    n_layers = base.model.config.num_hidden_layers
    return TrainedChild(
        tensors=tensors,
        config={
            **base.config,
            "architectures": ["BertForSequenceClassification"],
            "num_labels": len(labels),
        },
        labels=labels,
        accuracy=_accuracy(model, h_ho, m_ho, y_ho),
        recipe={
            "method": "lora",
            "task": task.kind,
            "n_labels": str(len(labels)),
            "lr": str(lr),
            "epochs": str(epochs),
            "seed": str(seed),
            "lora_init_seed": str(lora_init_seed),
            "rank": str(rank),
            "alpha": str(alpha),
            "target_modules": ",".join(TARGET_MODULES),
            "layers": ",".join(str(i) for i in range(n_layers - TOP_LAYERS, n_layers)),
            "head_init": "zeros",
            "pooling": "mean",
            "optimizer": "AdamW(weight_decay=0.01)",
            "batch_size": str(BATCH_SIZE),
            "max_length": str(MAX_LENGTH),
            "n_train": str(len(y_tr)),
            "n_heldout": str(len(y_ho)),
        },
        adapter_config=_adapter_config(model, base),
    )


def _adapter_config(model: PeftModel, base: TextBase) -> dict:
    """PEFT's LoraConfig as adapter_config.json content: sets become sorted lists, enums strings."""
    config = model.peft_config["default"]
    config.base_model_name_or_path = base.repo_id

    def jsonable(value):
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, (set, frozenset)):
            return sorted(value)
        if isinstance(value, dict):
            return {k: jsonable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [jsonable(v) for v in value]
        return value

    return jsonable(config.to_dict())


def load_text_child(base: TextBase, child: TrainedChild) -> PeftModel:
    """A trained child rebuilt from its saved tensors, as a reader of the lake would: a fresh
    PeftModel (any LoRA init) with the adapter state dict loaded over it."""
    model = _peft_model(base, len(child.labels), int(child.recipe["rank"]), int(child.recipe["alpha"]), 0)
    set_peft_model_state_dict(model, child.tensors)
    return model.eval()


@torch.no_grad()
def predict_logits(model: PeftModel, base: TextBase, texts: list[str]) -> torch.Tensor:
    """Full forward from tokens (no cache): texts -> (len(texts), n_labels) logits."""
    batch = _tokenize(base, texts)
    bert = model.base_model.model
    hidden = bert(**batch).last_hidden_state  # (B, T, H)
    return bert.classifier(_mean_pool(hidden, batch["attention_mask"]))
