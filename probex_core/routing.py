"""Route a model with no declared lineage to its Model Tree by its weights.

Two kinds of evidence, each cheap to read (a few tensors by name, or only a header):

* Full fine-tunes: the relative distance of a few of the model's tensors to the same tensors of
  each tree's root, `mean_t ||W_t - R_t||_F / ||R_t||_F`. Fine-tuning moves weights by a few
  percent, an unrelated initialisation by ~sqrt(2); a tensor the model lacks (or of another shape)
  makes the tree infinitely far.
* LoRA adapters: which modules they adapt and with which shapes. Distance = 1 - the share of the
  adapter's (module, in, out) triples that the tree's known adapters also have (containment, so an
  adapter on a subset of the tree's usual modules is still in-tree).

A model is assigned only when it is clearly nearest: the nearest distance is at most
`max_distance` and the runner-up is at least `margin` further away. Anything else stays
unassigned with its distances recorded, never forced into a tree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# Defaults measured on the bundled lake (see docs/benchmarks.md, "routing"): in-tree distances
# of full fine-tunes stay far below 0.5; a random initialisation sits near 1.4.
MAX_DISTANCE = 0.5
MARGIN = 0.25

ModuleShape = tuple[str, int, int]  # (module name, in features, out features)


@dataclass
class TreeSignature:
    tree_id: str
    root_tensors: dict[str, np.ndarray] = field(default_factory=dict)  # full fine-tune evidence
    adapter_modules: set[ModuleShape] = field(default_factory=set)  # LoRA evidence


@dataclass
class Fingerprint:
    repo_id: str
    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # full model: a few tensors
    adapter_modules: set[ModuleShape] = field(default_factory=set)  # adapter: its modules

    @property
    def is_adapter(self) -> bool:
        return bool(self.adapter_modules)


@dataclass
class RouteDecision:
    tree_id: str | None  # None: unassigned
    distances: dict[str, float]
    reason: str


# Classifier heads change shape with the label count (and are trivially readable): never used to
# compare weights, nor probed.
HEAD_NAMES = ("_fc.", "classifier.", "lm_head.", "score.", "head.", "pooler.")


def is_head(name: str) -> bool:
    return any(name.startswith(h) or f".{h}" in name for h in HEAD_NAMES)


def fingerprint_names(root_shapes: dict[str, tuple[int, ...]], k: int = 3,
                      max_numel: int = 1 << 20) -> list[str]:
    """Which root tensors to compare: k matrices (ndim >= 2, heads excluded) spread from first to
    last by name, small enough to read cheaply."""
    names = sorted(n for n, s in root_shapes.items()
                   if len(s) >= 2 and math.prod(s) <= max_numel and not is_head(n))
    if len(names) <= k:
        return names
    picks = np.linspace(0, len(names) - 1, k).round().astype(int)
    return [names[i] for i in sorted(set(picks))]


def tensor_distance(model: dict[str, np.ndarray], root: dict[str, np.ndarray]) -> float:
    if not root:
        return math.inf
    dists = []
    for name, ref in root.items():
        w = model.get(name)
        if w is None or w.shape != ref.shape:
            return math.inf
        denom = float(np.linalg.norm(ref)) or 1.0
        dists.append(float(np.linalg.norm(w.astype(np.float64) - ref)) / denom)
    return float(np.mean(dists))


def module_distance(model: set[ModuleShape], tree: set[ModuleShape]) -> float:
    if not model or not tree:
        return math.inf
    inter = len(model & tree)
    if inter == 0:
        return 1.0
    return 1.0 - inter / len(model)


def route(fp: Fingerprint, trees: list[TreeSignature], max_distance: float = MAX_DISTANCE,
          margin: float = MARGIN) -> RouteDecision:
    distances = {}
    for t in trees:
        if fp.is_adapter:
            distances[t.tree_id] = module_distance(fp.adapter_modules, t.adapter_modules)
        else:
            distances[t.tree_id] = tensor_distance(fp.tensors, t.root_tensors)
    ranked = sorted(distances.items(), key=lambda kv: kv[1])
    if not ranked or not math.isfinite(ranked[0][1]):
        return RouteDecision(None, distances, "no tree shares this model's layers")
    best, d1 = ranked[0]
    d2 = ranked[1][1] if len(ranked) > 1 else math.inf
    if d1 > max_distance:
        return RouteDecision(None, distances, f"nearest tree {best} is {d1:.3f} away (> {max_distance})")
    if d2 - d1 < margin:
        return RouteDecision(None, distances, f"ambiguous: {best} {d1:.3f} vs {ranked[1][0]} {d2:.3f}")
    return RouteDecision(best, distances, f"nearest tree at {d1:.3f}")
