"""Training loops for ProbeX experts (both heads), evaluation, and the layer sweep.

    result = train_expert(train_ds, val_ds, config_for(train_ds, "multilabel"), TrainConfig())
    result.model, result.config, result.history, result.best_val, result.seconds

The loop is explicit (no framework): shuffle with a seeded generator, Adam, one validation pass
per epoch, keep the best validation state, stop after `patience` epochs without improvement.
Selection key, loss and metrics: the head kind's (probex_core.heads).
`fit` is model-agnostic: the baselines (Dense, StatNN) train through it with the same protocol.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import metrics
from .data import (EmptyDatasetError, ExpertError, LayerDataset, ShapeMismatchError, VocabularyError,
                   concat_datasets)
from .device import pick_device, seed_everything
from .heads import MULTILABEL, TEXT, HeadKind, get_head
from .probex import REPRESENTATIONS, ProbeX, ProbeXConfig


@dataclass
class TrainConfig:
    lr: float | None = None  # None: the head's (1e-3 multilabel, 2e-3 text)
    # the paper gives 1e-5 for the multi-label head and nothing for the text head: the same for both
    weight_decay: float = 1e-5
    batch_size: int = 128
    max_epochs: int | None = None  # None: the head's (500 multilabel, 200 text)
    patience: int | None = 50  # epochs without val improvement before stopping; None: never
    seed: int = 0
    device: str = "cpu"  # "auto" | "cpu" | "cuda"
    threads: int | None = None  # torch CPU threads; None: all this process may use
    # How rows are read (ProbeXConfig.representation): "raw", "delta" (changes from the tree's
    # root, which the training rows must carry), or "auto" (see `representations`).
    representation: str = "auto"
    center: str | bool = "auto"  # subtract the mean training matrix; "auto": see normalisation_stats
    normalise: bool = True  # divide by the mean Frobenius norm of the training rows
    row_norm: str | bool = "auto"  # divide each row by its own norm; "auto": see resolved_row_norm
    min_train: int = 4  # fewer labelled training models: EmptyDatasetError (no expert)
    time_limit_s: float | None = None  # stop early when one run exceeds this (keeps best state)
    text_probe: str | bool = "auto"  # text head: fuse the text probe; "auto": when d_W == text_dim
    # Probes U and projection V: "data" (the tree's main update directions, see init_from_data),
    # "random", or "auto": data, except LoRA rows under the text head (no gain measured there).
    init: str = "auto"
    # After validation has chosen the epoch count, train once more from scratch on training plus
    # validation rows for that many epochs; "auto": where the head says so (refit_default).
    refit: str | bool = "auto"
    # Weight-space mixup for the multi-label head (see `mixup_alpha`): each training row becomes
    # lam X_i + (1 - lam) X_j with targets mixed alike, lam ~ Beta(a, a). A number a (0: off)
    # applies to every model; "auto": a = 1 (lam uniform) for ProbeX on LoRA rows, else off.
    mixup: float | str = "auto"
    # What ProbeX's encoder reads (ProbeXConfig.views: "first", "gram_w", "gram_h"); None: the
    # model config's, the paper's first-order view alone unless it says otherwise.
    views: tuple[str, ...] | None = None
    verbose: bool = False

    def refits(self, head: str | HeadKind) -> bool:
        if self.refit not in ("auto", True, False):
            raise ValueError(f"refit must be 'auto', True or False, got {self.refit!r}")
        return get_head(head).refit_default if self.refit == "auto" else self.refit

    def mixup_alpha(self, head: str | HeadKind, kind: str, lora: bool) -> float:
        """Beta parameter of the mixup a `kind` of model gets on `head` (rows `lora` or dense); 0
        when off, and always for a head whose targets are not probabilities. "auto" mixes ProbeX
        on LoRA rows only: on dense rows it gained less and trained several times longer
        (docs/benchmarks.md, design notes)."""
        if not get_head(head).mixes_targets:
            return 0.0
        if self.mixup == "auto":
            return 1.0 if kind == "probex" and lora else 0.0
        if isinstance(self.mixup, str) or not self.mixup >= 0:
            raise ValueError(f"mixup must be 'auto' or a number >= 0, got {self.mixup!r}")
        return float(self.mixup)

    def resolved(self, head: str | HeadKind) -> "TrainConfig":
        h = get_head(head)
        return dataclasses.replace(self, lr=self.lr if self.lr is not None else h.lr,
                                   max_epochs=self.max_epochs if self.max_epochs is not None
                                   else h.max_epochs)


@dataclass
class TrainResult:
    model: nn.Module  # best-validation state, on the CPU, in eval mode
    config: object  # the model's config (ProbeXConfig with normalisation filled in)
    history: list[dict]  # per epoch: epoch, train_loss, val_loss, val metric(s)
    best_epoch: int
    best_val: dict  # validation metrics at best_epoch
    seconds: float
    epochs_run: int
    n_params: int
    kind: str = "probex"  # "probex" | "dense" | "statnn"
    stopped: str = ""  # "patience" | "max_epochs" | "time_limit"
    refit: bool = False  # the model was trained again on training + validation rows (see refit)
    head: str = MULTILABEL.name  # the head kind it was trained with
    # representation -> best validation main score, when train_expert tried more than one
    representation_scores: dict = field(default_factory=dict)

    @property
    def score(self) -> tuple:
        return get_head(self.head).selection_key(self.best_val)

    @property
    def main_score(self) -> float:
        return get_head(self.head).main_score(self.best_val)


# ---------------------------------------------------------------------------------------------
# Configuration helpers


def config_for(ds: LayerDataset, head: str | HeadKind | None = None, **kw) -> ProbeXConfig:
    """A ProbeXConfig sized for a dataset's layer (and its class count, for a head that has one
    output per class); the head defaults to the dataset's task."""
    h = get_head(head or ds.task or MULTILABEL)
    return ProbeXConfig(d_H=ds.d_H, d_W=ds.d_W, head=h.name,
                        n_outputs=kw.pop("n_outputs", h.n_outputs(ds.n_classes)), **kw)


def normalisation_stats(train: LayerDataset, center: str | bool = "auto", normalise: bool = True
                        ) -> tuple[torch.Tensor | None, float]:
    """(mean matrix or None, input_scale) from the training rows only, as the expert reads them
    (pass `train.deltas()` for a delta expert). "auto" centres a layer of dense rows only: there
    the rows share most of their values (the root's, in raw rows); LoRA rows and a mix of both
    kinds are changes already. A mean over a mix is the mean of every row, LoRA rows summed from
    their factors, and it is subtracted from both kinds (ProbeX.offset)."""
    do_center = (not train.is_lora and not train.is_mixed) if center == "auto" else bool(center)
    mean = train.mean_matrix() if do_center else None
    scale = 1.0
    if normalise:
        scale = float(train.frobenius_norms(mean).mean())
        if not np.isfinite(scale) or scale <= 0:
            scale = 1.0  # all-zero rows (e.g. untrained LoRA B = 0): nothing to rescale
    return mean, scale


def check_datasets(train: LayerDataset, val: LayerDataset | None, head: str | HeadKind, d_H: int,
                   d_W: int, text_emb: torch.Tensor | None, min_train: int) -> None:
    head = get_head(head)
    where = dict(tree=train.tree, layer=train.layer)
    if train.y is None:
        raise ExpertError("training rows have no labels", **where)
    if len(train) < min_train:
        raise EmptyDatasetError(f"too few labelled models to train an expert ({len(train)} < "
                                f"{min_train})", **where)
    for ds in (train, val):
        if ds is None:
            continue
        if ds.task != head.name:
            raise ExpertError(f"dataset task {ds.task!r} does not fit the {head.name!r} head",
                              tree=ds.tree, layer=ds.layer)
        if (ds.d_H, ds.d_W) != (d_H, d_W):
            raise ShapeMismatchError(f"layer shape {(ds.d_H, ds.d_W)} differs from the expert's "
                                     f"{(d_H, d_W)}", tree=ds.tree, layer=ds.layer)
        if ds.classes != train.classes:
            raise VocabularyError("validation classes differ from training classes (build val "
                                  "with classes=train.classes)", tree=ds.tree, layer=ds.layer)
    if head.uses_texts:
        if text_emb is None or text_emb.shape[0] != train.n_classes:
            raise ExpertError(f"the {head.name} head needs one text embedding per training class "
                              f"({train.n_classes}), got "
                              f"{None if text_emb is None else tuple(text_emb.shape)}", **where)


# ---------------------------------------------------------------------------------------------
# The loop


def _inputs(model: nn.Module, ds: LayerDataset, device):
    """What the model consumes: the dataset itself (ProbeX, Dense) or prepared features (StatNN)."""
    prep = getattr(model, "prepare", None)
    return (prep(ds) if prep is not None else ds).to(device)


@torch.no_grad()
def predict_logits(model: nn.Module, inputs, text_emb=None, batch_size: int = 256,
                   device=None) -> torch.Tensor:
    """Logits for every row of `inputs` (a LayerDataset, or prepared features), on the CPU."""
    model.eval()
    device = device or next(model.parameters()).device
    if isinstance(inputs, LayerDataset) and hasattr(model, "prepare"):
        inputs = model.prepare(inputs)
    inputs = inputs.to(device)
    t = None if text_emb is None else torch.as_tensor(text_emb, dtype=torch.float32).to(device)
    out = []
    for s in range(0, len(inputs), batch_size):
        b = inputs.batch(torch.arange(s, min(s + batch_size, len(inputs)), device=device))
        out.append(model(b, t).float().cpu())
    return torch.cat(out)


def evaluate(model: nn.Module, ds: LayerDataset, head: str | HeadKind, text_emb=None, device=None) -> dict:
    """In-distribution metrics with loss: multilabel -> accuracy, map; text -> top1, top5."""
    return get_head(head).metrics(predict_logits(model, ds, text_emb, device=device), ds.y.cpu())


def evaluate_zeroshot(model: nn.Module, heldout: LayerDataset, heldout_text_emb, device=None) -> dict:
    """Zero-shot top-1/top-5: held-out models scored only against the held-out classes' texts
    (heldout.classes, with heldout_text_emb in that order)."""
    logits = predict_logits(model, heldout, heldout_text_emb, device=device)
    out = metrics.zeroshot_report(logits, heldout.y.cpu())
    out["zeroshot_retrieval_map"] = metrics.retrieval_map(logits, heldout.y.cpu())
    return out


@torch.no_grad()
def embed(model: nn.Module, ds: LayerDataset, batch_size: int = 256, device=None) -> np.ndarray:
    """Each row's representation e (n, r_T) as float32 numpy: what the catalog stores."""
    model.eval()
    device = device or next(model.parameters()).device
    inputs = (model.prepare(ds) if hasattr(model, "prepare") else ds).to(device)
    out = [model.encode(inputs.batch(torch.arange(s, min(s + batch_size, len(inputs)), device=device)))
           .float().cpu() for s in range(0, len(inputs), batch_size)]
    return torch.cat(out).numpy()


def fit(model: nn.Module, train: LayerDataset, val: LayerDataset | None, head: str | HeadKind,
        tcfg: TrainConfig, text_emb: torch.Tensor | None = None, config=None,
        kind: str = "probex") -> TrainResult:
    """Train `model` (already built and seeded) with Adam; keep the best validation state."""
    head = get_head(head)
    tcfg = tcfg.resolved(head)
    prev_threads = torch.get_num_threads()
    device = pick_device(tcfg.device, tcfg.threads)
    try:
        return _fit(model, train, val, head, tcfg, text_emb, config, kind, device)
    finally:
        torch.set_num_threads(prev_threads)  # training's thread count does not leak out


def _fit(model, train, val, head, tcfg, text_emb, config, kind, device) -> TrainResult:
    model.to(device)
    tr, va = _inputs(model, train, device), (None if val is None or len(val) == 0
                                             else _inputs(model, val, device))
    t_emb = None if text_emb is None else torch.as_tensor(text_emb, dtype=torch.float32).to(device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=tcfg.lr,
                           weight_decay=tcfg.weight_decay)
    gen = torch.Generator().manual_seed(tcfg.seed)  # CPU generator: same order on any device
    alpha = tcfg.mixup_alpha(head, kind, lora=train.is_lora)
    mix_rng = np.random.default_rng(tcfg.seed) if alpha > 0 else None
    unit_rows = getattr(model.cfg, "row_norm", False)  # ProbeX's; the baselines have no row norm

    history: list[dict] = []
    best_key, best_state, best_epoch, best_val = None, None, 0, {}
    since_best, stopped = 0, "max_epochs"
    t0 = time.perf_counter()
    for epoch in range(1, tcfg.max_epochs + 1):
        model.train()
        perm = torch.randperm(len(tr), generator=gen).to(device)
        total, seen = 0.0, 0
        for s in range(0, len(tr), tcfg.batch_size):
            b = tr.batch(perm[s: s + tcfg.batch_size])
            if mix_rng is not None:
                lam = torch.as_tensor(mix_rng.beta(alpha, alpha, len(b)), dtype=torch.float32)
                b = b.mixed(lam.to(device), torch.as_tensor(mix_rng.permutation(len(b))).to(device),
                            unit=unit_rows)
            loss = head.loss(model(b, t_emb), b.y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
            seen += len(b)
        row = {"epoch": epoch, "train_loss": total / seen}
        if va is not None:
            m = _eval_inputs(model, va, head, t_emb)
            row.update({f"val_{k}": v for k, v in m.items()})
        else:
            m = {"loss": row["train_loss"]}  # no validation rows: select on training loss
        history.append(row)
        key = head.selection_key(m)
        if best_key is None or key > best_key:
            best_key, best_epoch, best_val, since_best = key, epoch, m, 0
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        else:
            since_best += 1
        if tcfg.verbose:
            print(f"[{kind}] epoch {epoch}: {row}", flush=True)
        if tcfg.patience is not None and since_best >= tcfg.patience:
            stopped = "patience"
            break
        if tcfg.time_limit_s is not None and time.perf_counter() - t0 > tcfg.time_limit_s:
            stopped = "time_limit"
            break
    seconds = time.perf_counter() - t0
    model.load_state_dict(best_state)
    model.to("cpu").eval()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return TrainResult(model=model, config=config, history=history, best_epoch=best_epoch,
                       best_val=best_val, seconds=seconds, epochs_run=len(history),
                       n_params=n_params, kind=kind, stopped=stopped, head=head.name)


@torch.no_grad()
def _eval_inputs(model, inputs, head, t_emb, batch_size: int = 256) -> dict:
    model.eval()
    dev = next(model.parameters()).device
    logits = torch.cat([model(inputs.batch(torch.arange(s, min(s + batch_size, len(inputs)),
                                                        device=dev)), t_emb)
                        for s in range(0, len(inputs), batch_size)])
    return head.quick_metrics(logits, inputs.y)


# ---------------------------------------------------------------------------------------------
# ProbeX experts


def representations(train: LayerDataset, tcfg: TrainConfig) -> list[str]:
    """The representations train_expert tries on `train`, the first winning a tie on validation.

    "auto": a layer that mixes dense and LoRA rows is read as changes from the root (raw, a full
    fine-tune's own matrix and an adapter's change are different things); so is any other layer
    whose root is known, because raw and delta then give the same expert (LoRA rows are changes
    either way; centred dense rows are equal after centring, see probex.py), and delta also
    reads a later child of the other kind consistently. Only uncentred dense rows make the two
    differ: both are trained there, and validation keeps the better. Without the root: raw."""
    if tcfg.representation in REPRESENTATIONS:
        return [tcfg.representation]
    if tcfg.representation != "auto":
        raise ValueError(f"representation must be 'auto' or one of {REPRESENTATIONS}, "
                         f"got {tcfg.representation!r}")
    if train.root is None:
        return ["raw"]
    dense_only = not train.is_lora and not train.is_mixed
    centred = tcfg.center == "auto" or bool(tcfg.center)
    return ["delta", "raw"] if dense_only and not centred else ["delta"]


def resolved_row_norm(train: LayerDataset, row_norm: str | bool) -> bool:
    """"auto" divides each row by its own norm wherever a layer has LoRA rows: one tree's updates
    differ several times in size (rank, alpha, lr; an adapter against a full fine-tune), and the
    class lives in the update's direction."""
    return (train.is_lora or train.is_mixed) if row_norm == "auto" else bool(row_norm)


def build_probex(train: LayerDataset, cfg: ProbeXConfig, tcfg: TrainConfig) -> ProbeX:
    """Seeded ProbeX with the input normalisation computed on the training rows, as its
    representation reads them (tcfg.representation; "auto": the first of `representations`)."""
    rep = representations(train, tcfg)[0]
    if rep == "delta" and train.root is None:
        raise ExpertError("representation 'delta' needs the root's layer (LayerDataset.root)",
                          tree=train.tree, layer=train.layer)
    seen = train.deltas() if rep == "delta" else train  # the rows as the expert reads them
    row_norm = resolved_row_norm(train, tcfg.row_norm)
    # Rows divided by their own norm are already unit size: no dataset-wide scale on top.
    mean, scale = normalisation_stats(seen, tcfg.center, tcfg.normalise and not row_norm)
    cfg = dataclasses.replace(cfg, input_scale=scale, centered=mean is not None, row_norm=row_norm,
                              representation=rep, views=cfg.views if tcfg.views is None else tcfg.views)
    seed_everything(tcfg.seed)
    model = ProbeX(cfg)
    if mean is not None:
        model.input_mean.copy_(mean)
    if rep == "delta":
        model.input_root.copy_(train.root)
    if tcfg.init not in ("auto", "data", "random"):
        raise ValueError(f"init must be 'auto', 'data' or 'random', got {tcfg.init!r}")
    if tcfg.init == "data" or (tcfg.init == "auto" and not (train.is_lora and get_head(cfg.head) is TEXT)):
        init_from_data(model, seen, mean, row_norm)
    return model


@torch.no_grad()
def init_from_data(model: ProbeX, train: LayerDataset, mean: torch.Tensor | None, row_norm: bool) -> None:
    """Start the probes U on the directions the tree's (centred) updates use most on the input side,
    and V on the output side: the top eigenvectors of sum X^T X and sum X X^T over the training
    rows, unit columns. Random N(0, 1) probes spend most of a small tree's few hundred epochs
    finding those directions (the gain per tree is in docs/benchmarks.md, design notes)."""
    left, right = train.second_moments(mean, unit_rows=row_norm)
    for param, moment in ((model.U, right), (model.V, left)):
        k = param.shape[1]
        _, vecs = torch.linalg.eigh(moment)  # ascending eigenvalues
        top = vecs.flip(1)[:, :k]  # (d, min(d, k))
        param[:, :top.shape[1]] = top  # a layer narrower than k keeps random columns beyond it


def train_expert(train: LayerDataset, val: LayerDataset | None, cfg: ProbeXConfig,
                 tcfg: TrainConfig | None = None, text_emb=None) -> TrainResult:
    """Train one ProbeX expert on a tree's layer; returns the best-validation model, of the best
    representation where several are tried (`representations`; seconds add up).

    text_emb: for the text head, the frozen text embeddings of train.classes (k, text_dim).
    """
    tcfg = tcfg or TrainConfig()
    check_datasets(train, val, cfg.head, cfg.d_H, cfg.d_W, text_emb, tcfg.min_train)
    runs = {rep: _train_probex(train, val, cfg, dataclasses.replace(tcfg, representation=rep), text_emb)
            for rep in representations(train, tcfg)}
    best = max(runs.values(), key=lambda r: r.score)  # max keeps the first of equals
    if len(runs) == 1:
        return best
    return dataclasses.replace(best, seconds=sum(r.seconds for r in runs.values()),
                               epochs_run=sum(r.epochs_run for r in runs.values()),
                               representation_scores={k: r.main_score for k, r in runs.items()})


def _train_probex(train, val, cfg, tcfg, text_emb) -> TrainResult:
    model = build_probex(train, cfg, tcfg)
    result = fit(model, train, val, cfg.head, tcfg, text_emb, config=model.cfg, kind="probex")
    wants_probe = cfg.d_W == cfg.text_dim if tcfg.text_probe == "auto" else bool(tcfg.text_probe)
    if get_head(cfg.head).uses_texts and wants_probe:
        attach_text_probe(result, train, val, text_emb)
    return result


@torch.no_grad()
def _probe_parts(model: ProbeX, ds: LayerDataset, text_emb: torch.Tensor, chunk: int = 256):
    """Head logits and text-probe responses of every row against the class texts: (n, k) each."""
    heads, resps = [], []
    for b in ds.batches(chunk):
        heads.append(model.out(model.encode(b), text_emb))
        resps.append(model.text_response(model.probe_factor(b), text_emb))
    return torch.cat(heads), torch.cat(resps)


def attach_text_probe(result: TrainResult, train: LayerDataset, val: LayerDataset | None,
                      text_emb) -> None:
    """Fuse the text probe into a trained text-head expert (in place): M from the training rows,
    then the weights (a, b) of `a * head + b * response` by cross-entropy on the validation rows
    (the training rows when there are none: the head fits those, so b then stays small).
    The head itself is not retrained; result.best_val becomes the fused model's validation (two
    numbers fitted on those same rows: a small optimism, shared by every layer it compares)."""
    model: ProbeX = result.model
    t = torch.as_tensor(text_emb, dtype=torch.float32)
    with torch.no_grad():
        moment = torch.zeros(train.d_W, train.d_W)
        for b in train.batches():
            F_ = model.probe_factor(b)
            moment += torch.einsum("nmi,nmj->ij", F_, F_)  # sum of X^T X^ over the rows
        moment /= len(train)
    model.enable_text_probe(moment, 1.0, 0.0)
    fit_on = val if val is not None and len(val) else train
    head, resp = _probe_parts(model, fit_on, t)
    sigma = float(resp.std()) or 1.0
    log_w = torch.tensor([0.0, -np.log(sigma)], requires_grad=True)  # log a, log b
    opt = torch.optim.LBFGS([log_w], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(log_w[0].exp() * head + log_w[1].exp() * resp, fit_on.y)
        loss.backward()
        return loss

    opt.step(closure)
    a, b = (float(v) for v in log_w.detach().exp())
    model.enable_text_probe(moment, a, b)
    result.config = model.cfg
    if val is not None and len(val):
        result.best_val = evaluate(model, val, TEXT, t)


def refit(trainer: Callable[[LayerDataset, LayerDataset | None, TrainConfig], TrainResult],
          first: TrainResult, train: LayerDataset, val: LayerDataset | None, tcfg: TrainConfig,
          head: str) -> TrainResult:
    """The final model of a run `first` that validation has selected: when `tcfg` refits for
    `head`, `trainer` trains a new model from scratch on the training and validation rows together
    for `first.best_epoch` epochs (no early stopping: no rows are left to stop on), so the few
    labelled models a tree has all teach it. Validation metrics, best epoch and history stay those
    of `first` (the refit model has seen the validation rows); seconds add up.
    What it gains per tree: docs/benchmarks.md, design notes."""
    if not tcfg.refits(head) or val is None or not len(val) or first.best_epoch < 1:
        return first
    both = concat_datasets([train, val], tree=train.tree, layer=train.layer)
    # the representation validation chose (a ProbeX config's; the baselines have none)
    rep = getattr(first.config, "representation", tcfg.representation)
    final = trainer(both, None, dataclasses.replace(tcfg, max_epochs=first.best_epoch, patience=None,
                                                    representation=rep))
    return dataclasses.replace(final, best_epoch=first.best_epoch, best_val=first.best_val,
                               history=first.history, seconds=first.seconds + final.seconds,
                               epochs_run=first.epochs_run + final.epochs_run, stopped=first.stopped,
                               refit=True, representation_scores=first.representation_scores)


def train_final(trainer: Callable[[LayerDataset, LayerDataset | None, TrainConfig], TrainResult],
                train: LayerDataset, val: LayerDataset | None, tcfg: TrainConfig, head: str) -> TrainResult:
    """The protocol every compared method follows: `trainer` on (train, val), then `refit`."""
    return refit(trainer, trainer(train, val, tcfg), train, val, tcfg, head)


# ---------------------------------------------------------------------------------------------
# Layer choice


@dataclass
class LayerChoice:
    sweep_layer: str | None = None  # the paper: full run on every layer, best validation
    sweep_scores: dict = field(default_factory=dict)  # layer -> best val metric (full runs)
    sweep_seconds: float = 0.0
    fast_layer: str | None = None  # short runs everywhere, full runs on the top_k
    fast_short_scores: dict = field(default_factory=dict)  # layer -> best val metric (short runs)
    fast_finalists: list = field(default_factory=list)
    fast_scores: dict = field(default_factory=dict)  # finalist -> best val metric (full runs)
    fast_seconds: float = 0.0
    results: dict = field(default_factory=dict)  # layer -> full TrainResult (every full run done)

    @property
    def layer(self) -> str | None:
        """The choice to use: the cheap strategy's when it ran, else the sweep's."""
        return self.fast_layer or self.sweep_layer

    @property
    def best(self) -> TrainResult | None:
        return self.results.get(self.layer)

    def summary(self) -> dict:
        return {"sweep": {"layer": self.sweep_layer, "seconds": round(self.sweep_seconds, 2),
                          "scores": self.sweep_scores},
                "fast": {"layer": self.fast_layer, "seconds": round(self.fast_seconds, 2),
                         "short_scores": self.fast_short_scores, "finalists": self.fast_finalists,
                         "scores": self.fast_scores}}


def probex_trainer(model_kwargs: dict | None = None, text_emb=None
                   ) -> Callable[[LayerDataset, LayerDataset | None, TrainConfig], TrainResult]:
    """train_expert as a function of (train, val, tcfg), with the config sized for each layer."""
    kw = dict(model_kwargs or {})
    return lambda tr, va, tc: train_expert(tr, va, config_for(tr, **kw), tc, text_emb)


def choose_layer(datasets_by_layer: Mapping[str, tuple[LayerDataset, LayerDataset]],
                 model_kwargs: dict | None = None, tcfg: TrainConfig | None = None, *,
                 text_emb=None, strategies=("sweep", "fast"), short_epochs: int = 15,
                 top_k: int = 2, trainer: Callable | None = None) -> LayerChoice:
    """Pick the layer whose expert validates best.

    "sweep": the paper's exhaustive sweep: a full training run on every layer.
    "fast":  a short run (`short_epochs`, no early stopping) on every layer, then full runs on
             the `top_k` best; the best full run wins. Cost = all short runs + top_k full runs.
    When both run, full runs are deterministic for a seed, so the fast strategy reuses the sweep's
    full runs of its finalists and is charged their measured seconds (as if it had run them).
    model_kwargs: ProbeXConfig fields other than d_H/d_W/n_outputs (e.g. head, r_U, text_dim).
    """
    tcfg = tcfg or TrainConfig()
    model_kwargs = dict(model_kwargs or {})
    trainer = trainer or probex_trainer(model_kwargs, text_emb)
    if not datasets_by_layer:
        raise EmptyDatasetError("no candidate layers")
    out = LayerChoice()
    if "sweep" in strategies:
        for layer, (tr, va) in datasets_by_layer.items():
            r = trainer(tr, va, tcfg)
            out.results[layer] = r
            out.sweep_scores[layer] = r.main_score
            out.sweep_seconds += r.seconds
        out.sweep_layer = max(out.results, key=lambda k: out.results[k].score)
    if "fast" in strategies:
        short_cfg = dataclasses.replace(tcfg, max_epochs=short_epochs, patience=None)
        short = {}
        for layer, (tr, va) in datasets_by_layer.items():
            r = trainer(tr, va, short_cfg)
            short[layer] = r
            out.fast_short_scores[layer] = r.main_score
            out.fast_seconds += r.seconds
        out.fast_finalists = sorted(short, key=lambda k: short[k].score, reverse=True)[:top_k]
        for layer in out.fast_finalists:
            if layer not in out.results:
                tr, va = datasets_by_layer[layer]
                out.results[layer] = trainer(tr, va, tcfg)
            out.fast_scores[layer] = out.results[layer].main_score
            out.fast_seconds += out.results[layer].seconds
        out.fast_layer = max(out.fast_finalists, key=lambda k: out.results[k].score)
    return out
