"""Declared lineage (`base_model` links) -> Model Trees. Pure: ids in, placements out.

A tree is named by its root's repo id. Each model is placed by following its FIRST declared parent
up to a root; the walk is iterative (no recursion limit) and memoised, so any depth costs O(n).

Flags on a `Placement`:
- `merge`: several parents declared; all are kept in `parents`, the first one places the model.
- `cycle`: the model is on a cycle of first-parent links. The cycle is cut at its smallest repo id,
  which becomes the tree's root (deterministic, so re-runs agree); a self-reference is a cycle of one.
- `missing_parent`: the first parent is not in the crawl. The chain ends there and that parent's id
  names the tree: the declared root still names the tree even when we have not seen it.
- `no_lineage`: nothing declared. Such a model is a root when any model names it as a parent (in any
  position), else it is unassigned (`tree_id` None) and left to routing by weights.

Repo ids are compared as the Hub compares them: case-insensitively (`repo_key`); the Hub resolves
`Org/Name` and `org/name` to one repo. A declared parent that names a model of the input is
replaced by that model's own spelling, so `parent`, `parents` and `tree_id` always use the repo's
own spelling; an unknown parent keeps one spelling (the smallest declared) for every child.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

MERGE = "merge"
CYCLE = "cycle"
MISSING_PARENT = "missing_parent"
NO_LINEAGE = "no_lineage"
RELATION_INFERRED = "relation_inferred"  # no (usable) base_model_relation: inferred as the Hub does

# The values the Hub gives `base_model_relation`.
FINETUNE, ADAPTER, QUANTIZED = "finetune", "adapter", "quantized"
RELATIONS = (FINETUNE, ADAPTER, QUANTIZED, MERGE)


def repo_key(repo_id: str) -> str:
    """What two repo ids must share to name one repo on the Hub (owner and name, any case)."""
    return repo_id.lower()


def infer_relation(declared: str | None, n_parents: int, *, adapter: bool = False,
                   quantized: bool = False) -> tuple[str | None, bool]:
    """(relation, inferred) of a model with `n_parents` declared parents. A declared value of the
    Hub's four is kept; otherwise, as the Hub infers it: adapter weights -> adapter, several
    parents -> merge, quantized weights -> quantized, else finetune. A root has no relation."""
    if not n_parents:
        return (declared if declared in RELATIONS else None), False
    if declared in RELATIONS:
        return declared, False
    if adapter:
        return ADAPTER, True
    if n_parents > 1:
        return MERGE, True
    return (QUANTIZED if quantized else FINETUNE), True


@dataclass(frozen=True)
class Placement:
    repo_id: str
    tree_id: str | None  # the root's repo id; None: unassigned (no lineage, nobody's parent)
    # The first declared parent other than itself; kept on a cycle's cut root too (depth 0 and the
    # `cycle` flag say the link was ignored). None when nothing is declared.
    parent: str | None
    parents: tuple[str, ...]  # every declared parent, in declared order, de-duplicated, own spelling
    relation: str | None  # as given (finetune | adapter | quantized | merge | None)
    depth: int | None  # links from the root: 0 for a root, None when unassigned
    flags: frozenset[str] = frozenset()

    @property
    def is_root(self) -> bool:
        return self.tree_id == self.repo_id


def place(models: Mapping[str, tuple[Sequence[str], str | None]],
          known_roots: frozenset[str] | set[str] = frozenset()) -> dict[str, Placement]:
    """Place every model of `models` = {repo_id: (declared parents, declared relation)}.

    `known_roots`: models named as a parent by models outside `models` (a crawl places only the
    part of the catalog it can change): without lineage they are roots, not unassigned."""
    own = {}  # repo_key -> the spelling the models use (the smallest, if two differ only in case)
    for m in sorted(models):
        own.setdefault(repo_key(m), m)
    # an unknown parent: one spelling (the smallest) for every child that names it
    for p in sorted({p for ps, _ in models.values() for p in ps if p}):
        own.setdefault(repo_key(p), p)

    def spelled(ps) -> tuple[str, ...]:
        return tuple(dict.fromkeys(own[repo_key(p)] for p in ps if p))

    parents = {m: spelled(ps) for m, (ps, _) in models.items()}
    known_roots = {own.get(repo_key(r), r) for r in known_roots}
    relation = {m: rel for m, (_, rel) in models.items()}
    flags: dict[str, set[str]] = {m: set() for m in models}
    # The link that places each model: its first parent other than itself. Naming itself is a
    # cycle of one, cut here; naming only itself declares nothing.
    up: dict[str, str | None] = {}
    for m, ps in parents.items():
        others = [p for p in ps if repo_key(p) != repo_key(m)]
        up[m] = others[0] if others else None
        if len(others) < len(ps):
            flags[m].add(CYCLE)
        if len(others) > 1:
            flags[m].add(MERGE)
        if not others:
            flags[m].add(NO_LINEAGE)
    declared_parent = dict(up)  # before cycle cuts, for `Placement.parent`
    referenced = {p for m, ps in parents.items() for p in ps if repo_key(p) != repo_key(m)} | known_roots

    resolved: dict[str, tuple[str | None, int | None]] = {}  # model -> (tree, depth)
    for start in sorted(models):
        while start not in resolved:  # loops again only after cutting a cycle
            path: list[str] = []
            on_path: set[str] = set()
            node: str | None = start
            while node in models and node not in resolved and up[node] is not None and node not in on_path:
                path.append(node)
                on_path.add(node)
                node = up[node]
            if node in on_path:  # a cycle: cut it at its smallest id, then walk again
                cycle = path[path.index(node) :]
                for member in cycle:
                    flags[member].add(CYCLE)
                up[min(cycle)] = None
                continue
            if node not in models:  # the first unknown parent names the tree
                flags[path[-1]].add(MISSING_PARENT)
                base = (node, 0)
            elif node in resolved:
                base = resolved[node]
            else:  # a model with no (remaining) parent link: root, or unassigned
                base = (node, 0) if node in referenced else (None, None)
                resolved[node] = base
            tree, depth = base
            for offset, member in enumerate(reversed(path), start=1):
                resolved[member] = (tree, None if depth is None else depth + offset)

    return {
        m: Placement(
            repo_id=m,
            tree_id=resolved[m][0],
            parent=declared_parent[m],
            parents=parents[m],
            relation=relation[m],
            depth=resolved[m][1],
            flags=frozenset(flags[m]),
        )
        for m in models
    }


def trees(placements: Mapping[str, Placement]) -> dict[str, list[str]]:
    """tree_id -> member repo ids (the root first when it was crawled), for assigned models."""
    members: dict[str, list[str]] = {}
    for p in sorted(placements.values(), key=lambda p: (p.depth or 0, p.repo_id)):
        if p.tree_id is not None:
            members.setdefault(p.tree_id, []).append(p.repo_id)
    return members
