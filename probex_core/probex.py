"""ProbeX: one tree expert that reads one layer's weights (Horwitz et al., CVPR 2025).

Shapes (n = models in a batch):
    X  (n, d_H, d_W)   one layer per model; or LoRA factors A (n, r, d_W), B (n, d_H, r), scale (n,)
    U  (d_W, r_U)      probes, no bias
    V  (d_H, r_V)      shared projection, no bias
    Z = X U            (n, d_H, r_U)   each probe passed through the layer
    P = ReLU(V^T Z)    (n, r_V, r_U)   the only non-linearity
    e = M vec(P) + b   (n, r_T)        per-probe encoders M_l (r_T x r_V) as one Linear(r_U*r_V, r_T)
    head:
      "multilabel": logits = T e + b_T                        (n, C), per-class sigmoid / BCE
      "text":       logits = s * norm(e) . norm(W t + b_w)^T  (n, k), softmax CE over k class texts

LoRA rows never form X:  V^T X U = scale * (V^T B) (A U), all small (r_V x r) @ (r x r_U) products.

Views (ProbeXConfig.views, in this order; "first" alone is the paper's ProbeX): what the encoder reads.
    "first":  vec(P)                                 r_U * r_V features
    "gram_w": the input-side Gram X^T X (d_W x d_W) probed by U:
              G_W = U^T X^T X U = Z^T Z              (r_U, r_U), free once Z = X U is formed
    "gram_h": the output-side Gram X X^T (d_H x d_H) probed by V:
              G_H = V^T X X^T V = Y^T Y,  Y = X^T V  (r_V, r_V)
A Gram is symmetric, so only its upper triangle is read (k (k + 1) / 2 features). The second-order
views read the same row as P does (after the same offset, divided by the same scale) and add no
probe parameters: they reuse U and V (the encoder alone grows). LoRA rows stay factored:
X U = scale * B (A U) and X^T V = scale * A^T (B^T V), an (n, d, r) @ (n, r, k) product each, never
B A; centring subtracts M U or M^T V (the offset, as for P).
A batch of both kinds (a tree of full fine-tunes and adapters) runs each kind through its own path.

Representation (stored in the config and, for "delta", the root's matrix as a buffer `input_root`):
    "raw":   rows as extracted: a dense row is the child's own matrix W_child
    "delta": every row is its change from the tree's root: a dense row is read as W_child - W_root,
             a LoRA row as it is (scale * B A already is the change), so both kinds of one tree
             are the same kind of thing. The subtraction happens here, in the first layer, so
             training, evaluation and embedding read a row the same way.
Input normalisation (stored in the config, so inference reproduces training):
    X <- (X - M) / input_scale
where M (d_H, d_W) is the mean training matrix (only when `centered`, a buffer `input_mean`) and
input_scale is the mean Frobenius norm of the (centred) training rows, both of the rows as the
representation reads them. All of it is linear, so it folds into the factored path:
    dense: V^T (X - W_root - M) U / s       LoRA: (scale (V^T B)(A U) - (V^T M) U) / s
With centring, raw and delta are the same expert for dense rows: the mean of the deltas is the
mean of the rows minus W_root, so X - M_raw = (X - W_root) - M_delta (equal up to float rounding).

Logit scale (text head): fixed at 1/0.07 (CLIP's initial temperature) by default. Both vectors are
unit-norm, so logits live in [-s, s]; a fixed s keeps the loss equally sharp for trees with 20 or
2,000 classes, and avoids the learnable temperature's drift towards over-confident fits of the
few training classes (which hurts the zero-shot classes). Rankings (retrieval, top-k) do not
depend on s at all. `learn_logit_scale=True` makes it a parameter (log-space, clamped at 100).

Text probe (text head, switched on after training by `train.attach_text_probe`): the class text
itself probes the layer's input side. A LoRA detector for a class writes its update along the
directions its class's texts take through the layer; in a tree fine-tuned from the text encoder
itself the layer reads (nearly) the encoder's own space, so the response is large for the model's
own class, seen in training or not. With X^ the normalised row at unit Frobenius norm:
    F (n, m, d_W)    X^'s top m singular directions: F^T F ~ X^T X^ (exact for rank <= m)
    R(X, t) = ||F t||^2 - t^T M t               M = mean over training rows of X^T X^ (buffer)
    logits  = a * (head logits) + b * R           a, b fitted on validation by cross-entropy
docs/benchmarks.md has the fused expert and its head alone on the layer it chose.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import WeightBatch
from .heads import get_head

# Paper sizes are the ProbeXConfig defaults (r_U = r_V = r_T = 128: ~2.2M parameters whatever the
# layer). COMPACT keeps ProbeX under 1/10 of Dense's parameters (the report's params column).
COMPACT = dict(r_U=32, r_V=32, r_T=64)
REPRESENTATIONS = ("raw", "delta")
VIEWS = ("first", "gram_w", "gram_h")  # see module docstring
# Signed square root of a Gram's entries: sign(g) (sqrt(|g| + eps) - sqrt(eps)), zero at 0 with a
# slope bounded by 1 / (2 sqrt(eps)) there (the plain root's is infinite).
GRAM_EPS = 1e-4


@dataclass
class ProbeXConfig:
    d_H: int  # rows of the layer (output units)
    d_W: int  # columns of the layer (input units; in*k*k for convs)
    n_outputs: int = 0  # multilabel: number of classes; text head: unused (texts given at call)
    head: str = "multilabel"  # a probex_core.heads name
    r_U: int = 128  # number of probes
    r_V: int = 128  # shared projection size
    r_T: int = 128  # representation size (the catalog vector)
    text_dim: int = 384  # text encoder output size (text head)
    dropout: float = 0.0  # on vec(P), before the encoders
    input_scale: float = 1.0  # divide rows by this (mean Frobenius norm of training rows)
    centered: bool = False  # subtract the mean training matrix first (buffer `input_mean`)
    # Divide each row by its own Frobenius norm: LoRA updates of one tree differ ~20x in size
    # (rank, alpha, lr), and the class lives in the update's direction, not its size.
    row_norm: bool = False
    logit_scale: float = 1 / 0.07  # text head temperature (see module docstring)
    learn_logit_scale: bool = False
    text_probe: bool = False  # fuse the text probe's response (needs head "text", d_W == text_dim)
    head_weight: float = 1.0  # a: weight of the head's logits when fused
    probe_weight: float = 0.0  # b: weight of the text probe's response
    # Singular directions of a row kept in F (what the catalog stores per model: probe_rank x d_W);
    # 4 kept the L6 trees' zero-shot figures where all 16 put them (design notes).
    probe_rank: int = 4
    representation: str = "raw"  # "raw" | "delta" (see module docstring); older experts are raw
    views: tuple[str, ...] = ("first",)  # what the encoder reads (VIEWS); older experts: first only

    def __post_init__(self):
        head = get_head(self.head)
        self.head = head.name  # an old alias loads as the head's one name
        views = (self.views,) if isinstance(self.views, str) else tuple(self.views)
        if not views or any(v not in VIEWS for v in views) or len(set(views)) != len(views):
            raise ValueError(f"views must be distinct names from {VIEWS}, got {self.views!r}")
        self.views = tuple(v for v in VIEWS if v in views)  # one spelling (a JSON list loads as it)
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {self.representation!r}")
        if head.n_outputs(1) and self.n_outputs < 1:
            raise ValueError(f"the {head.name} head needs n_outputs >= 1")
        if not (self.input_scale > 0 and math.isfinite(self.input_scale)):
            raise ValueError(f"input_scale must be positive and finite, got {self.input_scale}")
        if self.text_probe and (not head.uses_texts or self.d_W != self.text_dim):
            raise ValueError("the text probe needs the text head and a layer whose inputs are the "
                             f"text encoder's size (d_W {self.d_W} vs text_dim {self.text_dim})")

    @property
    def n_features(self) -> int:
        """What the encoder reads per model: the views' feature counts added up."""
        sizes = {"first": self.r_U * self.r_V, "gram_w": self.r_U * (self.r_U + 1) // 2,
                 "gram_h": self.r_V * (self.r_V + 1) // 2}
        return sum(sizes[v] for v in self.views)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ProbeXConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class Head(nn.Module):
    """The output side shared by ProbeX and the baselines, from a representation e (n, r_T).

    "multilabel": logits = T e + b_T (n, C).
    "text":       e is L2-normalised; logits = s * e . norm(W t + b_w) against k class texts (n, k).
    """

    def __init__(self, head: str, r_T: int, n_outputs: int = 0, text_dim: int = 384,
                 logit_scale: float = 1 / 0.07, learn_logit_scale: bool = False):
        super().__init__()
        self.kind = get_head(head)
        if not self.kind.uses_texts:
            self.classifier = nn.Linear(r_T, n_outputs)  # T, b_T
        else:
            self.text_proj = nn.Linear(text_dim, r_T)  # frozen text emb -> r_T, with bias
            log_s = torch.tensor(math.log(logit_scale))
            if learn_logit_scale:
                self.log_logit_scale = nn.Parameter(log_s)
            else:
                self.register_buffer("log_logit_scale", log_s)

    def represent(self, e: torch.Tensor) -> torch.Tensor:
        return F.normalize(e, dim=-1) if self.kind.uses_texts else e

    def embed_text(self, text_emb: torch.Tensor) -> torch.Tensor:
        """Frozen text embeddings (k, text_dim) -> normalised points in the joint space (k, r_T)."""
        return F.normalize(self.text_proj(text_emb), dim=-1)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.clamp(max=math.log(100.0)).exp()

    def forward(self, e: torch.Tensor, text_emb: torch.Tensor | None = None) -> torch.Tensor:
        if not self.kind.uses_texts:
            return self.classifier(e)  # (n, C)
        if text_emb is None:
            raise ValueError("the text head needs class text embeddings (k, text_dim)")
        return self.logit_scale * e @ self.embed_text(text_emb).T  # (n, r_T) @ (r_T, k) -> (n, k)


class ProbeX(nn.Module):
    def __init__(self, cfg: ProbeXConfig):
        super().__init__()
        self.cfg = cfg
        # Probes and projection: N(0, 1) entries, so for a row with ||X||_F = 1 (what the input
        # normalisation gives) E||X u||^2 = 1 and P's entries start at O(1).
        self.U = nn.Parameter(torch.randn(cfg.d_W, cfg.r_U))  # (d_W, r_U)
        self.V = nn.Parameter(torch.randn(cfg.d_H, cfg.r_V))  # (d_H, r_V)
        if cfg.centered:
            self.register_buffer("input_mean", torch.zeros(cfg.d_H, cfg.d_W))  # (d_H, d_W)
        else:
            self.input_mean = None
        if cfg.representation == "delta":
            self.register_buffer("input_root", torch.zeros(cfg.d_H, cfg.d_W))  # W_root (d_H, d_W)
        else:
            self.input_root = None
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.Linear(cfg.n_features, cfg.r_T)  # all M_l (and the views') at once, with bias
        self.out = Head(cfg.head, cfg.r_T, cfg.n_outputs, cfg.text_dim, cfg.logit_scale,
                        cfg.learn_logit_scale)
        if cfg.text_probe:
            self.register_buffer("probe_moment", torch.zeros(cfg.d_W, cfg.d_W))  # M (d_W, d_W)

    # -- the representation ------------------------------------------------------------------
    def offset(self, lora: bool) -> torch.Tensor | None:
        """What a row's matrix is read relative to (d_H, d_W), or None: the training mean M when
        centred, plus W_root for a dense row of a delta expert (its X - W_root - M)."""
        parts = [t for t in (None if lora else self.input_root, self.input_mean) if t is not None]
        return parts[0] if len(parts) == 1 else (parts[0] + parts[1] if parts else None)

    def probe_responses(self, batch: WeightBatch, Z: torch.Tensor | None = None) -> torch.Tensor:
        """P = ReLU(V^T (X - offset) U / s): (n, r_V, r_U). Z: (X - offset) U (n, d_H, r_U) in
        batch order, when the gram_w view has formed it already (`probed`)."""
        Vt = self.V.T  # (r_V, d_H)
        if Z is not None:
            pre = Vt @ Z  # (n, r_V, r_U), the offset already subtracted
        elif batch.is_mixed:  # each kind through its own path, back in batch order
            return batch.join(*(self.probe_responses(p) for p in batch.split()))
        else:
            if batch.is_lora:
                AU = batch.A @ self.U  # (n, r, d_W) @ (d_W, r_U) -> (n, r, r_U)
                VB = Vt @ batch.B  # (r_V, d_H) @ (n, d_H, r) -> (n, r_V, r)
                pre = batch.scale[:, None, None] * (VB @ AU)  # (n, r_V, r_U)
            else:
                pre = Vt @ (batch.X @ self.U)  # (r_V, d_H) @ (n, d_H, r_U) -> (n, r_V, r_U)
            offset = self.offset(batch.is_lora)
            if offset is not None:
                pre = pre - (Vt @ offset) @ self.U  # (r_V, r_U), broadcast over n
        if self.cfg.row_norm:
            pre = pre / self.row_norms(batch)[:, None, None]
        return F.relu(pre / self.cfg.input_scale)

    def probed(self, batch: WeightBatch, probes: torch.Tensor, side: str) -> torch.Tensor:
        """(X - offset) probes for side "w" (probes (d_W, k) -> (n, d_H, k)), or (X - offset)^T
        probes for side "h" (probes (d_H, k) -> (n, d_W, k)), in batch order, not yet divided by
        the row's scale. LoRA rows through their factors: s B (A probes) or s A^T (B^T probes)."""
        if batch.is_mixed:
            return batch.join(*(self.probed(p, probes, side) for p in batch.split()))
        offset = self.offset(batch.is_lora)
        if offset is not None and side == "h":
            offset = offset.T  # (d_W, d_H)
        if batch.is_lora:
            A, B = batch.A, batch.B
            outer, inner = (B, A) if side == "w" else (A.transpose(1, 2), B.transpose(1, 2))
            out = batch.scale[:, None, None] * (outer @ (inner @ probes))  # (n, d, r) @ (n, r, k)
        else:
            out = (batch.X if side == "w" else batch.X.transpose(1, 2)) @ probes  # (n, d, k)
        return out if offset is None else out - offset @ probes

    def gram_views(self, batch: WeightBatch, Z: torch.Tensor | None = None) -> torch.Tensor:
        """The second-order views' features (n, sum of k (k + 1) / 2): the upper triangle of
        G_W = R^T R with R = (X - offset) U / s ("gram_w"), then of G_H = R^T R with
        R = (X - offset)^T V / s ("gram_h"); s is P's divisor (input_scale, times the row's norm
        with row_norm), so each Gram is that of the row exactly as P reads it.
        Z: probed(batch, U, "w") when formed already."""
        s = torch.full((len(batch),), self.cfg.input_scale, device=self.U.device)
        if self.cfg.row_norm:
            s = s * self.row_norms(batch)
        feats = []
        for view, probes, side in (("gram_w", self.U, "w"), ("gram_h", self.V, "h")):
            if view not in self.cfg.views:
                continue
            R = Z if side == "w" and Z is not None else self.probed(batch, probes, side)
            R = R / s[:, None, None]  # (n, d, k)
            G = R.transpose(1, 2) @ R  # (n, k, k)
            i, j = torch.triu_indices(G.shape[1], G.shape[1], device=G.device)
            g = G[:, i, j]  # (n, k (k + 1) / 2)
            # Gram entries are quadratic in the weights: a row twice as large (or a probe response
            # twice as strong) moves them four times as much as it moves P. The signed square root
            # (how bilinear pooling normalises its second-order features) makes them degree one,
            # on P's scale: the diagonal becomes ||R_l||, each probe response's norm.
            feats.append(torch.sign(g) * ((g.abs() + GRAM_EPS).sqrt() - GRAM_EPS ** 0.5))
        return torch.cat(feats, dim=1)

    def row_norms(self, batch: WeightBatch) -> torch.Tensor:
        """||X - offset||_F per row (n,); LoRA rows stay factored (WeightBatch.frobenius_norms)."""
        if batch.is_mixed:
            return batch.join(*(self.row_norms(p) for p in batch.split()))
        return batch.frobenius_norms(self.offset(batch.is_lora)).clamp_min(1e-12)

    def encode(self, batch: WeightBatch) -> torch.Tensor:
        """The model's representation e (n, r_T); L2-normalised for the text head."""
        views = self.cfg.views
        # Z = (X - offset) U (n, d_H, r_U): formed once where G_W reads it, and P then read from it
        Z = self.probed(batch, self.U, "w") if "gram_w" in views else None
        feats = []
        if "first" in views:
            feats.append(self.probe_responses(batch, Z).flatten(1))  # P (n, r_V, r_U) -> (n, r_V*r_U)
        if len(feats) < len(views):
            feats.append(self.gram_views(batch, Z))  # (n, gram features)
        x = feats[0] if len(feats) == 1 else torch.cat(feats, dim=1)  # (n, n_features)
        e = self.encoder(self.drop(x))  # (n, n_features) -> (n, r_T)
        return self.out.represent(e)

    def embed_text(self, text_emb: torch.Tensor) -> torch.Tensor:
        return self.out.embed_text(text_emb)

    def forward(self, batch: WeightBatch, text_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Logits: (n, C) for multilabel; (n, k) against the k given class texts for the text head."""
        F_ = self.probe_factor(batch) if self.cfg.text_probe else None
        return self.logits_from(self.encode(batch), F_, text_emb)

    def logits_from(self, e: torch.Tensor, F_: torch.Tensor | None = None,
                    text_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from what the catalog stores per model: e (n, r_T) and, with the text probe, its
        factor F (n, m, d_W). Without F the head's logits alone (a model embedded without one)."""
        logits = self.out(e, text_emb)
        if self.cfg.text_probe and F_ is not None:
            logits = self.cfg.head_weight * logits + self.cfg.probe_weight * self.text_response(F_, text_emb)
        return logits

    # -- the text probe (see module docstring) -------------------------------------------------
    def probe_factor(self, batch: WeightBatch) -> torch.Tensor:
        """F (n, probe_rank, d_W): the top singular directions of X^ (the row minus its offset, at
        unit Frobenius norm), so ||F t||^2 = ||X^ t||^2 when the row's rank is <= probe_rank (zero
        rows pad lower ranks). LoRA rows go through their factors, never forming X."""
        if batch.is_mixed:
            return batch.join(*(self.probe_factor(p) for p in batch.split()))
        offset = self.offset(batch.is_lora)
        if batch.is_lora and offset is not None:
            return self._centred_lora_factor(batch, offset)
        if batch.is_lora:
            _, R = torch.linalg.qr(batch.B)  # B = Q R, Q orthonormal: (n, d_H, r) -> R (n, r, r)
            G = batch.scale[:, None, None] * (R @ batch.A)  # X = Q G, same singular values: (n, r, d_W)
        else:
            G = batch.X if offset is None else batch.X - offset
        _, S, Vh = torch.linalg.svd(G, full_matrices=False)  # S (n, q), Vh (n, q, d_W)
        m = min(self.cfg.probe_rank, S.shape[1])
        F_ = S[:, :m, None] * Vh[:, :m]  # (n, m, d_W)
        F_ = F_ / G.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]
        return F.pad(F_, (0, 0, 0, self.cfg.probe_rank - m))  # (n, probe_rank, d_W)

    def _centred_lora_factor(self, batch: WeightBatch, M: torch.Tensor) -> torch.Tensor:
        """probe_factor of LoRA rows read as s B A - M, which is full rank: its top right singular
        directions from the Gram matrix G^T G (n, d_W, d_W), formed from the factors
        (WeightBatch.moments' identity, row by row), in float64 for the eigensolver."""
        A, B, s, M = batch.A.double(), batch.B.double(), batch.scale.double()[:, None, None], M.double()
        At = A.transpose(1, 2)  # (n, d_W, r)
        cross = At @ (B.transpose(1, 2) @ M)  # A^T B^T M: (n, d_W, r) @ (n, r, d_W)
        gram = s ** 2 * (At @ (B.transpose(1, 2) @ B) @ A) - s * (cross + cross.transpose(1, 2)) + M.T @ M
        evals, evecs = torch.linalg.eigh(gram)  # ascending: (n, d_W), (n, d_W, d_W)
        m = min(self.cfg.probe_rank, self.cfg.d_W)
        S = evals.flip(-1)[:, :m].clamp_min(0).sqrt()  # top singular values (n, m)
        F_ = S[:, :, None] * evecs.flip(-1)[:, :, :m].transpose(1, 2)  # (n, m, d_W)
        F_ = F_ / evals.clamp_min(0).sum(-1).sqrt().clamp_min(1e-12)[:, None, None]  # ||G||_F^2 = tr(G^T G)
        return F.pad(F_.to(batch.A.dtype), (0, 0, 0, self.cfg.probe_rank - m))

    def text_response(self, F_: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """R = ||F t||^2 - t^T M t for each row and class text: (n, m, d_W), (k, d_W) -> (n, k)."""
        t = F.normalize(text_emb, dim=-1)
        own = (F_ @ t.T).pow(2).sum(dim=1)  # (n, m, k) -> (n, k)
        usual = ((t @ self.probe_moment) * t).sum(dim=-1)  # (k,): a typical training row's response
        return own - usual

    def enable_text_probe(self, moment: torch.Tensor, head_weight: float, probe_weight: float) -> None:
        """Switch the text probe on with M (d_W, d_W) and the fused weights (see attach_text_probe)."""
        self.cfg = replace(self.cfg, text_probe=True, head_weight=float(head_weight),
                           probe_weight=float(probe_weight))
        if hasattr(self, "probe_moment"):
            self.probe_moment.copy_(moment)
        else:
            self.register_buffer("probe_moment", moment.detach().clone())

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def probex_param_count(cfg: ProbeXConfig) -> int:
    """Trainable parameters, from the formula (matches ProbeX(cfg).n_params())."""
    n = cfg.d_W * cfg.r_U + cfg.d_H * cfg.r_V + cfg.n_features * cfg.r_T + cfg.r_T
    if not get_head(cfg.head).uses_texts:
        n += cfg.r_T * cfg.n_outputs + cfg.n_outputs
    else:
        n += cfg.text_dim * cfg.r_T + cfg.r_T + int(cfg.learn_logit_scale)
    return n
