"""The in-memory dataset of one tree's layer: one row per model, dense or LoRA-factored.

A layer row is either
  dense:  X (d_H x d_W) float32                     (conv kernels flattened to out x in*k*k)
  LoRA:   A (r x d_W), B (d_H x r), scale           X = scale * B @ A, never formed for ProbeX

Rows of one layer may mix LoRA ranks (8 and 16): factors are zero-padded to the largest rank,
which is exact for B @ A (the padded rank-components contribute 0). A layer may also mix dense
and LoRA rows (a tree with both full fine-tunes and adapters): each kind is kept as it is, and a
`lora` mask says which row is which. The tree root's own row of the layer (`root`) lets an expert
read every row as its change from the root (dense X - W_root; a LoRA row s B A already is one).

Labels are optional (an unlabelled dataset is what inference embeds):
  task "multilabel": y (n x C) float multi-hot over `classes`
  task "text":       y (n,) long, index into `classes` (one concept per model)

Bad input raises a typed `ExpertError` naming the tree / layer / model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from probex_core.errors import ProbexError
from probex_core.heads import MULTILABEL, UnknownHeadError, get_head


# ---------------------------------------------------------------------------------------------
# Errors


class ExpertError(ProbexError):
    """Anything that stops an expert from being built or applied; names the tree/layer/model."""

    def __init__(self, message: str, *, tree: str | None = None, layer: str | None = None,
                 model: str | None = None):
        self.tree, self.layer, self.model = tree, layer, model
        where = ", ".join(f"{k}={v}" for k, v in (("tree", tree), ("layer", layer), ("model", model))
                          if v is not None)
        super().__init__(f"{message} [{where}]" if where else message)


class ShapeMismatchError(ExpertError):
    """A row whose shape differs from the tree's layer (or malformed LoRA factors)."""


class EmptyDatasetError(ExpertError):
    """No rows (or too few labelled models) to train / evaluate on."""


class VocabularyError(ExpertError):
    """A class vocabulary of fewer than two classes, or a label outside the vocabulary."""


class NonFiniteError(ExpertError):
    """NaN or inf in a weight row."""


# ---------------------------------------------------------------------------------------------
# Rows and batches


@dataclass
class WeightRow:
    """One model's layer as the extraction step hands it over (numpy or torch arrays)."""

    repo_id: str
    X: object = None  # (d_H, d_W) or a conv kernel (out, in, k, k); None for LoRA
    A: object = None  # (r, d_W)
    B: object = None  # (d_H, r)
    scale: float = 1.0  # LoRA: alpha / r (alpha / sqrt(r) for rsLoRA); ignored for dense

    @property
    def is_lora(self) -> bool:
        return self.X is None


def blend_rows(t: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, perm: torch.Tensor
               ) -> torch.Tensor | None:
    """a_i t_i + b_i t_perm(i) along the first axis (mixup); a, b (n,). None stays None."""
    if t is None:
        return None
    shape = (-1,) + (1,) * (t.dim() - 1)
    return a.view(shape) * t + b.view(shape) * t[perm]


@dataclass
class WeightBatch:
    """A batch of rows on one device: dense rows (X), LoRA rows (A, B, scale), or both kinds (a
    tree of full fine-tunes and adapters), `lora` then saying which row of the batch is which:
    the batch's i-th row is the next unused row of X where lora[i] is False, else of (A, B, scale)."""

    X: torch.Tensor | None = None  # (n_X, d_H, d_W)  the dense rows, in batch order
    A: torch.Tensor | None = None  # (n_L, r, d_W)  zero-padded to the batch's max rank
    B: torch.Tensor | None = None  # (n_L, d_H, r)
    scale: torch.Tensor | None = None  # (n_L,)
    y: torch.Tensor | None = None  # (n, C) float or (n,) long
    index: torch.Tensor | None = None  # (n,) row ids in the dataset
    lora: torch.Tensor | None = None  # (n,) bool, set only when both kinds are present

    @property
    def is_lora(self) -> bool:
        return self.X is None

    @property
    def is_mixed(self) -> bool:
        return self.lora is not None

    def __len__(self) -> int:
        if self.lora is not None:
            return int(self.lora.shape[0])
        return int((self.X if self.X is not None else self.A).shape[0])

    def to(self, device) -> "WeightBatch":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return WeightBatch(mv(self.X), mv(self.A), mv(self.B), mv(self.scale), mv(self.y),
                           mv(self.index), mv(self.lora))

    # -- a mixed batch, one kind at a time ------------------------------------------------------
    def split(self) -> tuple["WeightBatch", "WeightBatch"]:
        """A mixed batch's (dense rows, LoRA rows), each a batch of one kind."""
        m = self.lora
        pick = lambda t, keep: None if t is None else t[keep]  # noqa: E731
        return (WeightBatch(X=self.X, y=pick(self.y, ~m), index=pick(self.index, ~m)),
                WeightBatch(A=self.A, B=self.B, scale=self.scale, y=pick(self.y, m),
                            index=pick(self.index, m)))

    def join(self, dense: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
        """Per-row results of split()'s two parts, (n_X, ...) and (n_L, ...), back in batch order
        (n, ...)."""
        order = torch.cat([torch.nonzero(~self.lora).flatten(), torch.nonzero(self.lora).flatten()])
        return torch.cat([dense, lora])[torch.argsort(order)]

    # -- per-row quantities, LoRA rows kept factored ---------------------------------------------
    def frobenius_norms(self, center: torch.Tensor | None = None) -> torch.Tensor:
        """||X_i - center||_F per row (n,); center (d_H, d_W) or None. LoRA rows never form X:
        ||s B A||^2 = s^2 sum((B^T B) * (A A^T)) (r x r), and with a center M
        ||s B A - M||^2 = s^2 ||B A||^2 - 2 s <B^T M, A> + ||M||^2 (r x d_W), in float64: the
        terms nearly cancel for a row close to the center."""
        if self.is_mixed:
            return self.join(*(p.frobenius_norms(center) for p in self.split()))
        if self.X is not None:
            return (self.X if center is None else self.X - center).flatten(1).norm(dim=1)
        if center is None:
            g = (self.B.transpose(1, 2) @ self.B) * (self.A @ self.A.transpose(1, 2))  # (n, r, r)
            return self.scale.abs() * g.sum(dim=(1, 2)).clamp_min(0).sqrt()
        A, B, s, M = self.A.double(), self.B.double(), self.scale.double(), center.double()
        sq = (s ** 2 * ((B.transpose(1, 2) @ B) * (A @ A.transpose(1, 2))).sum(dim=(1, 2))
              - 2 * s * ((B.transpose(1, 2) @ M) * A).sum(dim=(1, 2)) + M.pow(2).sum())
        return sq.clamp_min(0).sqrt().to(self.A.dtype)

    def sum_matrix(self) -> torch.Tensor:
        """sum_i X_i (d_H, d_W). LoRA rows in one contraction over (row, rank): sum_i s_i B_i A_i
        = [s_1 B_1 ... s_n B_n] [A_1; ...; A_n], no row's B A is formed."""
        total = 0
        if self.X is not None:
            total = self.X.sum(0)
        if self.A is not None:
            sB = self.scale[:, None, None] * self.B  # (n, d_H, r)
            total = total + sB.transpose(0, 1).flatten(1) @ self.A.flatten(0, 1)  # (d_H, n*r) @ (n*r, d_W)
        return total

    def moments(self, center: torch.Tensor | None = None, unit_rows: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """sum_i w_i Xc_i Xc_i^T (d_H, d_H) and sum_i w_i Xc_i^T Xc_i (d_W, d_W) over the batch,
        Xc = X - center, w_i = 1 / ||Xc_i||_F^2 when `unit_rows` (else 1). LoRA rows never form X:
            Xc Xc^T = s^2 B (A A^T) B^T - s (B (A M^T) + (M A^T) B^T) + M M^T
            Xc^T Xc = s^2 A^T (B^T B) A - s (A^T (B^T M) + (M^T B) A) + M^T M."""
        if self.is_mixed:
            (l1, r1), (l2, r2) = (p.moments(center, unit_rows) for p in self.split())
            return l1 + l2, r1 + r2
        ref = self.X if self.X is not None else self.A
        w = torch.ones(len(self), device=ref.device)
        if unit_rows:
            w = 1.0 / self.frobenius_norms(center).pow(2).clamp_min(1e-24)
        if self.X is not None:
            X = self.X if center is None else self.X - center
            return torch.einsum("n,nhw,nkw->hk", w, X, X), torch.einsum("n,nhw,nhv->wv", w, X, X)
        A, B, s = self.A, self.B, self.scale
        ws2 = w * s ** 2
        left = torch.einsum("n,nhr,nrq,nkq->hk", ws2, B, A @ A.transpose(1, 2), B)
        right = torch.einsum("n,nrw,nrq,nqv->wv", ws2, A, B.transpose(1, 2) @ B, A)
        if center is not None:
            M, ws = center, w * s
            P = torch.einsum("n,nhr,nrk->hk", ws, B, A @ M.T)  # sum w s B A M^T    (d_H, d_H)
            Q = torch.einsum("n,nrw,nrv->wv", ws, A, B.transpose(1, 2) @ M)  # sum w s A^T B^T M
            left = left - P - P.T + w.sum() * (M @ M.T)
            right = right - Q - Q.T + w.sum() * (M.T @ M)
        return left, right

    def mixed(self, lam: torch.Tensor, perm: torch.Tensor, unit: bool = False) -> "WeightBatch":
        """Weight-space mixup: row i becomes lam_i X_i + (1 - lam_i) X_perm(i), its targets the same
        mix of both rows' targets (multi-label). `unit`: each row at unit Frobenius norm first (for
        models that divide rows by their own norm, so lam weighs directions, not sizes). LoRA rows
        stay factored: [lam s B_i, (1-lam) s' B_j] @ [A_i; A_j], rank r_i + r_j.
        lam (n,), perm (n,) LongTensor. Not for a mixed batch: a dense row and a LoRA row are read
        relative to different references (the root, for a delta expert), so their blend is neither."""
        if self.is_mixed:
            raise ValueError("mixup does not blend dense and LoRA rows (a tree of full fine-tunes "
                             "and adapters): set TrainConfig.mixup to 0 or 'auto'")
        w = torch.ones(len(self), device=lam.device)
        if unit:
            w = 1 / self.frobenius_norms().clamp_min(1e-24)
        a, b = lam * w, (1 - lam) * w[perm]  # (n,) each
        y = blend_rows(self.y, lam, 1 - lam, perm)
        if self.X is not None:
            return WeightBatch(X=blend_rows(self.X, a, b, perm), y=y, index=self.index)
        s = self.scale
        B = torch.cat([(a * s)[:, None, None] * self.B, (b * s[perm])[:, None, None] * self.B[perm]], 2)
        A = torch.cat([self.A, self.A[perm]], 1)  # (n, 2r, d_W)
        return WeightBatch(A=A, B=B, scale=torch.ones_like(s), y=y, index=self.index)

    def dense(self) -> torch.Tensor:
        """X (n, d_H, d_W) as extracted, formed from the factors when needed (baselines only)."""
        if self.is_mixed:
            return self.join(*(p.dense() for p in self.split()))
        if self.X is not None:
            return self.X
        return self.scale[:, None, None] * (self.B @ self.A)  # (n,d_H,r)@(n,r,d_W)


def _as_tensor(a) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float32)
    return torch.as_tensor(np.asarray(a), dtype=torch.float32)


@dataclass
class LayerDataset:
    """All rows of one (tree, layer), kept compact: LoRA rows stay factored, also beside dense rows
    (`lora` then marks them, as in WeightBatch). `root`: the tree root's own matrix of the layer
    (d_H, d_W), when known: what an expert reading changes ("delta") subtracts from dense rows."""

    tree: str
    layer: str
    d_H: int
    d_W: int
    repo_ids: list[str]
    X: torch.Tensor | None = None  # (n_X, d_H, d_W)  dense rows, in row order
    A: torch.Tensor | None = None  # (n_L, r_max, d_W)
    B: torch.Tensor | None = None  # (n_L, d_H, r_max)
    scale: torch.Tensor | None = None  # (n_L,)
    task: str | None = None  # a probex_core.heads name, or None (unlabelled)
    classes: list[str] = field(default_factory=list)
    y: torch.Tensor | None = None
    lora: torch.Tensor | None = None  # (n,) bool, set only when both kinds are present
    root: torch.Tensor | None = None  # (d_H, d_W)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_rows(cls, rows: Sequence[WeightRow], *, tree: str, layer: str,
                  labels: Sequence | None = None, task: str | None = None,
                  classes: Sequence[str] | None = None,
                  shape: tuple[int, int] | None = None, root: WeightRow | None = None) -> "LayerDataset":
        """Validate and stack rows.

        labels: per row, a list of class names (task "multilabel") or one class name ("text").
        classes: the vocabulary (order = output order); default the sorted union of `labels`.
                 Pass the training vocabulary when building val/test sets.
        shape: the tree's expected (d_H, d_W); default the first row's.
        root: the tree root's own row of this layer (dense), kept as `root`.
        """
        if len(rows) == 0:
            raise EmptyDatasetError("no rows for this layer", tree=tree, layer=layer)
        if labels is not None and len(labels) != len(rows):
            raise ExpertError(f"{len(labels)} labels for {len(rows)} rows", tree=tree, layer=layer)

        mats: list[tuple[str, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, float]] = []
        for row in rows:
            X, A, B, got = _checked(row, tree, layer)
            if shape is None:
                shape = got
            if got != tuple(shape):
                raise ShapeMismatchError(f"layer shape {got} differs from the tree's {tuple(shape)}",
                                         tree=tree, layer=layer, model=row.repo_id)
            mats.append((row.repo_id, X, A, B, float(row.scale)))

        d_H, d_W = shape
        ds = cls(tree=tree, layer=layer, d_H=d_H, d_W=d_W, repo_ids=[m[0] for m in mats])
        dense = [m[1] for m in mats if m[1] is not None]
        loras = [m for m in mats if m[1] is None]
        if dense:
            ds.X = torch.stack(dense)
        if loras:  # pad to max rank
            r_max = max(m[2].shape[0] for m in loras)
            ds.A = torch.zeros(len(loras), r_max, d_W)
            ds.B = torch.zeros(len(loras), d_H, r_max)
            for i, (_, _, A, B, _) in enumerate(loras):
                ds.A[i, : A.shape[0]] = A
                ds.B[i, :, : B.shape[1]] = B
            ds.scale = torch.tensor([m[4] for m in loras], dtype=torch.float32)
        if dense and loras:
            ds.lora = torch.tensor([m[1] is None for m in mats])
        if root is not None:
            X, _, _, got = _checked(root, tree, layer)
            if X is None or got != (d_H, d_W):
                raise ShapeMismatchError(f"the root's row must be a dense {(d_H, d_W)} matrix, got "
                                         f"{'LoRA factors' if X is None else tuple(got)}",
                                         tree=tree, layer=layer, model=root.repo_id)
            ds.root = X

        if labels is not None:
            ds._set_labels(labels, task, classes)
        return ds

    def _set_labels(self, labels, task, classes) -> None:
        try:
            head = get_head(task)
        except UnknownHeadError as e:
            raise ExpertError(f"task: {e}", tree=self.tree, layer=self.layer) from None
        sets = [[lab] if isinstance(lab, str) else list(lab) for lab in labels]
        if head.one_label:
            for rid, s in zip(self.repo_ids, sets):
                if len(s) != 1:
                    raise VocabularyError(f"{head.name} task needs exactly one class per model, got {s}",
                                          tree=self.tree, layer=self.layer, model=rid)
        vocab = list(classes) if classes is not None else sorted({c for s in sets for c in s})
        if len(vocab) < 2:
            raise VocabularyError(f"class vocabulary {vocab} has fewer than two classes",
                                  tree=self.tree, layer=self.layer)
        pos = {c: i for i, c in enumerate(vocab)}
        for rid, s in zip(self.repo_ids, sets):
            for c in s:
                if c not in pos:
                    raise VocabularyError(f"label {c!r} is not in the vocabulary", tree=self.tree,
                                          layer=self.layer, model=rid)
        self.task, self.classes = head.name, vocab
        if head.one_label:
            y = torch.tensor([pos[s[0]] for s in sets], dtype=torch.long)
        else:
            y = torch.zeros(len(sets), len(vocab))
            for i, s in enumerate(sets):
                y[i, [pos[c] for c in s]] = 1.0
        self.y = y

    # -- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.repo_ids)

    @property
    def is_lora(self) -> bool:
        """Every row is LoRA factors."""
        return self.X is None

    @property
    def is_mixed(self) -> bool:
        """Dense rows and LoRA rows (a tree of full fine-tunes and adapters)."""
        return self.lora is not None

    @property
    def rank(self) -> int | None:
        return None if self.A is None else int(self.A.shape[1])

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def _rows(self, idx: torch.Tensor) -> dict:
        """The tensors of rows `idx` (a LongTensor), each kind's rows found by their place among
        that kind's rows; `lora` only when both kinds remain."""
        pick = lambda t, i: None if t is None else t[i]  # noqa: E731
        if self.lora is None:
            return dict(X=pick(self.X, idx), A=pick(self.A, idx), B=pick(self.B, idx),
                        scale=pick(self.scale, idx), y=pick(self.y, idx), lora=None)
        m = self.lora[idx]
        place = torch.where(self.lora, torch.cumsum(self.lora, 0), torch.cumsum(~self.lora, 0)) - 1
        d, l = place[idx[~m]], place[idx[m]]
        has_d, has_l = bool(len(d)), bool(len(l))
        return dict(X=self.X[d] if has_d else None, A=self.A[l] if has_l else None,
                    B=self.B[l] if has_l else None, scale=self.scale[l] if has_l else None,
                    y=pick(self.y, idx), lora=m if has_d and has_l else None)

    def batch(self, idx=None) -> WeightBatch:
        """Rows `idx` (a LongTensor / list; all rows when None) as a WeightBatch on the CPU."""
        if idx is None:
            idx = torch.arange(len(self))
        idx = torch.as_tensor(idx, dtype=torch.long)
        return WeightBatch(**self._rows(idx), index=idx)

    def batches(self, size: int = 256) -> Iterator[WeightBatch]:
        """Every row in order, `size` rows a batch: memory bounded by one batch's dense rows."""
        for s in range(0, len(self), size):
            yield self.batch(torch.arange(s, min(s + size, len(self))))

    def subset(self, idx) -> "LayerDataset":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return LayerDataset(tree=self.tree, layer=self.layer, d_H=self.d_H, d_W=self.d_W,
                            repo_ids=[self.repo_ids[i] for i in idx.tolist()], task=self.task,
                            classes=list(self.classes), root=self.root, **self._rows(idx))

    def to(self, device) -> "LayerDataset":
        """A copy whose tensors live on `device` (move once, then batch without copies)."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return LayerDataset(tree=self.tree, layer=self.layer, d_H=self.d_H, d_W=self.d_W,
                            repo_ids=list(self.repo_ids), X=mv(self.X), A=mv(self.A), B=mv(self.B),
                            scale=mv(self.scale), task=self.task, classes=list(self.classes),
                            y=mv(self.y), lora=mv(self.lora), root=mv(self.root))

    def with_classes(self, vocab: Sequence[str]) -> "LayerDataset":
        """Re-express multi-label targets over another vocabulary (e.g. a union over trees)."""
        if self.task != MULTILABEL.name:
            raise VocabularyError("with_classes needs a multi-label dataset", tree=self.tree,
                                  layer=self.layer)
        labels = [[self.classes[j] for j in torch.nonzero(r).flatten().tolist()] for r in self.y]
        out = self.subset(torch.arange(len(self)))
        out._set_labels(labels, MULTILABEL, vocab)
        return out

    def deltas(self, root: torch.Tensor | None = None) -> "LayerDataset":
        """The rows as changes from the tree's root (`root`, else the dataset's own), as an expert
        of representation "delta" reads them: dense rows X - W_root, LoRA rows as they are (s B A
        already is the change). The copy has no root of its own (its rows already are relative to it)."""
        root = self.root if root is None else root
        if root is None:
            raise ExpertError("the root's layer is needed to read rows as changes from it",
                              tree=self.tree, layer=self.layer)
        out = self.subset(torch.arange(len(self)))
        out.root = None
        if out.X is not None:
            out.X = out.X - root  # (n_X, d_H, d_W) - (d_H, d_W)
        return out

    # -- statistics used for input normalisation ----------------------------------------------
    def mean_matrix(self, chunk: int = 64) -> torch.Tensor:
        """Mean of X over rows (d_H, d_W); LoRA rows summed from their factors (WeightBatch.sum_matrix)."""
        total = torch.zeros(self.d_H, self.d_W, device=(self.X if self.X is not None else self.A).device)
        for b in self.batches(chunk):
            total += b.sum_matrix()
        return total / len(self)

    def frobenius_norms(self, center: torch.Tensor | None = None, chunk: int = 64) -> torch.Tensor:
        """||X_i - center||_F per row (n,); LoRA rows stay factored (WeightBatch.frobenius_norms)."""
        return torch.cat([b.frobenius_norms(center) for b in self.batches(chunk)])

    def second_moments(self, center: torch.Tensor | None = None, unit_rows: bool = False,
                       chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """sum_i Xc_i Xc_i^T (d_H, d_H) and sum_i Xc_i^T Xc_i (d_W, d_W), Xc = X - center, each row
        at unit Frobenius norm when `unit_rows`; LoRA rows never form X (WeightBatch.moments)."""
        left = torch.zeros(self.d_H, self.d_H)
        right = torch.zeros(self.d_W, self.d_W)
        for b in self.batches(chunk):
            l, r = b.moments(center, unit_rows)
            left += l
            right += r
        return left, right


def _checked(row: WeightRow, tree: str, layer: str
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, tuple[int, int]]:
    """(X, A, B, (d_H, d_W)) of one row as float32 matrices, or a typed error naming the model."""
    where = dict(tree=tree, layer=layer, model=row.repo_id)
    if row.X is not None:
        X = _as_tensor(row.X)
        if X.dim() == 4:  # conv kernel out x in x k x k -> out x (in*k*k)
            X = X.reshape(X.shape[0], -1)
        if X.dim() != 2:
            raise ShapeMismatchError(f"weight has shape {tuple(X.shape)}, expected 2-D", **where)
        A = B = None
        got = tuple(X.shape)
    else:
        if row.A is None or row.B is None:
            raise ShapeMismatchError("row has neither X nor both LoRA factors", **where)
        A, B = _as_tensor(row.A), _as_tensor(row.B)
        if A.dim() == 4:  # PEFT conv LoRA: A (r, in, k, k), B (out, r, 1, 1)
            A = A.reshape(A.shape[0], -1)
        if B.dim() == 4:
            B = B.reshape(B.shape[0], -1)
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ShapeMismatchError(f"LoRA factors A{tuple(A.shape)} B{tuple(B.shape)} "
                                     "do not compose (need A: r x d_W, B: d_H x r)", **where)
        X = None
        got = (B.shape[0], A.shape[1])
        if not np.isfinite(row.scale):
            raise NonFiniteError(f"LoRA scale is {row.scale}", **where)
    for name, t in (("X", X), ("A", A), ("B", B)):
        if t is not None and not torch.isfinite(t).all():
            raise NonFiniteError(f"{name} contains NaN or inf", **where)
    return X, A, B, got


def concat_datasets(parts: Sequence[LayerDataset], *, tree: str = "*", layer: str | None = None
                    ) -> LayerDataset:
    """Stack datasets of equal layer shape, task and vocabulary (e.g. several trees' rows for a
    single cross-tree model, or one tree's training and validation rows). LoRA factors are
    zero-padded to the largest rank; dense and LoRA parts make a mixed dataset, still factored.
    The root is kept when every part has the same one."""
    if not parts:
        raise EmptyDatasetError("nothing to concatenate", tree=tree, layer=layer)
    p0 = parts[0]
    for p in parts[1:]:
        if (p.d_H, p.d_W) != (p0.d_H, p0.d_W):
            raise ShapeMismatchError(f"layer shape {(p.d_H, p.d_W)} differs from {(p0.d_H, p0.d_W)}",
                                     tree=p.tree, layer=p.layer)
        if p.task != p0.task or p.classes != p0.classes:
            raise VocabularyError("parts differ in task or class vocabulary (use with_classes)",
                                  tree=p.tree, layer=p.layer)
    same_root = p0.root is not None and all(p.root is not None and torch.equal(p.root, p0.root)
                                            for p in parts)
    out = LayerDataset(tree=tree, layer=layer or p0.layer, d_H=p0.d_H, d_W=p0.d_W,
                       repo_ids=[r for p in parts for r in p.repo_ids], task=p0.task,
                       classes=list(p0.classes), root=p0.root if same_root else None)
    dense = [p.X for p in parts if p.X is not None]
    loras = [p for p in parts if p.A is not None]
    if dense:
        out.X = torch.cat(dense)
    if loras:
        r_max = max(p.rank for p in loras)
        out.A = torch.cat([torch.nn.functional.pad(p.A, (0, 0, 0, r_max - p.rank)) for p in loras])
        out.B = torch.cat([torch.nn.functional.pad(p.B, (0, r_max - p.rank)) for p in loras])
        out.scale = torch.cat([p.scale for p in loras])
    if dense and loras:
        out.lora = torch.cat([p.lora if p.lora is not None else torch.full((len(p),), p.is_lora)
                              for p in parts])
    if p0.y is not None:
        out.y = torch.cat([p.y for p in parts])
    return out


# ---------------------------------------------------------------------------------------------
# Synthetic trees (tests, benchmarks, smoke runs): a known signal in LoRA-shaped rows


def synthetic_rows(n_models: int, d_H: int, d_W: int, *, classes: Sequence[str],
                   class_codes: np.ndarray, labels_of: Sequence[Sequence[int]], ranks=(8, 16),
                   signal: float = 1.0, noise: float = 0.3, scale: float = 1e-3,
                   dense: bool = False, seed: int = 0, mixing_seed: int = 1234,
                   ) -> tuple[list[WeightRow], list[list[str]]]:
    """Rows built as a tree's children would be: a shared LoRA init A0 (one seed per tree), and
    B's columns a fixed linear function of the sum of the model's class codes, plus noise.

    class_codes: (n_classes, c) vectors that determine each class's update direction (for the
    text head, the classes' text embeddings, which makes zero-shot learnable). `mixing_seed`
    fixes the tree (A0 and the code -> B map); `seed` draws the models. Dense rows when `dense`.
    """
    tree_rng = np.random.default_rng(mixing_seed)
    r_max = max(ranks)
    A0 = tree_rng.standard_normal((r_max, d_W)) / np.sqrt(d_W)
    W = tree_rng.standard_normal((r_max, d_H, class_codes.shape[1])) / np.sqrt(class_codes.shape[1])
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for i in range(n_models):
        r = ranks[i % len(ranks)]
        code = class_codes[list(labels_of[i])].sum(0)  # (c,)
        B = signal * np.einsum("rhc,c->hr", W[:r], code) + noise * rng.standard_normal((d_H, r))
        A = A0[:r] + 0.1 * noise * rng.standard_normal((r, d_W))
        rid = f"synthetic/model-{seed}-{i}"
        if dense:
            rows.append(WeightRow(rid, X=(scale * B @ A).astype(np.float32)))
        else:
            rows.append(WeightRow(rid, A=A.astype(np.float32), B=B.astype(np.float32), scale=scale))
        labels.append([classes[j] for j in labels_of[i]])
    return rows, labels
