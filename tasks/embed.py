"""Apply each tree's current expert to every model of the tree and write the `embeddings` table.

One row per (repo_id, sha, expert_version): the L2-normalised representation (cosine search), the
tree, and the expert's top predicted labels with scores. Upserted by diff, so re-embedding with an
unchanged expert writes nothing. Each run that writes tags the table version with the date and
expert versions, so a notebook can open yesterday's catalog.

Rows go to the expert as the shards hold them (dense, LoRA factors, or both in one tree): the
expert itself reads them in its representation (a delta expert subtracts the root's matrix it
trained with in its first layer, probex_core/probex.py), so embedding cannot read a row otherwise
than training did.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from storage.experts import current_version, tree_dir
from storage.catalog import EMBEDDINGS, EMBEDDING_KEY, ROW_KEY, TIER, Catalog, key_string, optimize_table, sql_in, sql_literal

if TYPE_CHECKING:
    import torch

    from probex_core.checkpoint import LoadedExpert

# torch, sklearn and the experts are imported only when a tree has rows to (re)embed: an ingest
# with nothing new must not spend seconds importing them.

TOP_K = 5
INDEX_MIN_ROWS = 256  # IVF_PQ trains only from 256 rows; below that exact search is as fast


def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("repo_id", pa.string()),
        ("sha", pa.string()),
        ("expert_version", pa.string()),
        ("tree_id", pa.string()),
        ("vector", pa.list_(pa.float32(), dim)),
        ("top_labels", pa.list_(pa.string())),
        ("top_scores", pa.list_(pa.float32())),
        ("label_scores", pa.list_(pa.float32())),  # every label of the expert's vocabulary, in order
        ("task", pa.string()),
        # The text probe's factor F (m x d_W, row-major) for experts that fuse it; null otherwise.
        ("probe_factor", pa.list_(pa.float32())),
    ])


@dataclass
class EmbedReport:
    trees: dict[str, dict] = field(default_factory=dict)  # tree -> {version, models, new, changed}
    skipped: dict[str, str] = field(default_factory=dict)  # tree -> why
    new: int = 0  # rows written for the first time
    changed: int = 0  # rows whose vector or labels changed
    tag: str | None = None
    indexed: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def label_scores(expert: LoadedExpert, e: torch.Tensor, factors: torch.Tensor | None = None) -> np.ndarray:
    """Per-model probabilities over the expert's label vocabulary (n, C)."""
    import torch

    from probex_core.heads import get_head

    head = get_head(expert.probex_config.head)
    with torch.no_grad():
        texts = expert.extra["class_text_emb"] if head.uses_texts else None
        return head.probabilities(expert.model.logits_from(e, factors, texts)).numpy()


def probe_factors(expert: LoadedExpert, ds, chunk: int = 256):
    """The text probe's factors F (n, m, d_W) of every row, or None for experts without one."""
    import torch

    if not expert.probex_config.text_probe:
        return None
    with torch.no_grad():
        return torch.cat([expert.model.probe_factor(b) for b in ds.batches(chunk)])


def embed_tree_rows(catalog: Catalog, shards: str, expert: LoadedExpert, tree_id: str,
                    models: list[dict] | None = None) -> list[dict]:
    """One embeddings row per current model of the tree; `models` reuses catalog rows already read."""
    import torch

    from probex_core.data import LayerDataset
    from probex_core.train import embed
    from tasks.train import load_rows

    layer = expert.config["layer"]
    models = catalog.tree_children(tree_id, models)
    rows = load_rows(shards, tree_id, layer, models)
    if not rows:
        return []
    ids = sorted(rows)
    ds = LayerDataset.from_rows([rows[r] for r in ids], tree=tree_id, layer=layer)
    e = torch.as_tensor(embed(expert.model, ds))
    factors = probe_factors(expert, ds)
    probs = label_scores(expert, e, factors)
    vectors = torch.nn.functional.normalize(e, dim=-1).numpy()
    sha = {r["repo_id"]: r["sha"] for r in models}
    labels = expert.labels
    out = []
    for i, repo_id in enumerate(ids):
        top = np.argsort(-probs[i])[:TOP_K]
        out.append({
            "repo_id": repo_id, "sha": sha[repo_id], "expert_version": expert.version,
            "tree_id": tree_id, "vector": vectors[i].astype(np.float32),
            "top_labels": [labels[j] for j in top],
            "top_scores": [round(float(probs[i, j]), 6) for j in top],
            "label_scores": np.round(probs[i], 6).astype(np.float32),
            "task": expert.probex_config.head,
            "probe_factor": None if factors is None else factors[i].flatten().numpy().astype(np.float32),
        })
    return out


def embed_trees(catalog: Catalog, shards: str, experts: str, trees: list[str] | None = None,
                since: datetime | None = None) -> EmbedReport:
    """Apply each tree's current expert to its models that have no row from it yet. `since`: only
    the trees and models a crawl from then on listed (a nightly's). Each tree's rows and its
    embedded keys are read on their own, projected: never a whole table."""
    from tasks.window import changed_rows

    report = EmbedReport()
    touched = changed_rows(catalog, since, ["repo_id", "sha", "tree_id", "status"]) if since is not None else None
    tree_ids = trees or (list(touched) if touched is not None else
                         [t["tree_id"] for t in catalog.read("trees", columns=["tree_id"]).to_pylist()])
    all_rows, versions = [], []
    for tree_id in sorted(tree_ids):
        if touched is not None and tree_id not in touched:
            continue
        version = current_version(tree_dir(experts, tree_id))
        if version is None:
            report.skipped[tree_id] = "no expert yet; run `probex train`"
            continue
        versions.append(f"{tree_id}={version}")
        if touched is None:
            models = catalog.tree_children(tree_id, columns=MEMBER_COLUMNS)
        else:
            models = catalog.tree_children(tree_id, touched[tree_id])
        embedded = embedded_keys(catalog, tree_id, version, None if touched is None else models)
        if all((r["repo_id"], r["sha"]) in embedded for r in models):
            report.trees[tree_id] = {"version": version, "models": len(models)}
            continue  # every model already has its row for this expert: nothing to compute
        from storage.experts import load_current

        expert = load_current(experts, tree_id)
        rows = embed_tree_rows(catalog, shards, expert, tree_id,
                               [{**r, "tree_id": tree_id, "status": "ok"} for r in models])
        report.trees[tree_id] = {"version": expert.version, "models": len(rows)}
        all_rows.extend(rows)
    if not all_rows:
        return report
    dim = len(all_rows[0]["vector"])
    before = catalog.versions(EMBEDDINGS) if catalog.has(EMBEDDINGS) else None
    res = catalog.upsert(EMBEDDINGS, all_rows, EMBEDDING_KEY, embeddings_schema(dim))
    report.new, report.changed = res.new, res.changed
    table = catalog.table(EMBEDDINGS)
    report.indexed = ensure_indexes(table)
    if table.version != before:
        report.tag = tag_version(table, versions)
    return report


MEMBER_COLUMNS = ["repo_id", "sha"]  # what embedding reads of a tree's catalog rows


def embedded_keys(catalog: Catalog, tree_id: str, version: str, models: list[dict] | None = None
                  ) -> set[tuple[str, str]]:
    """(repo_id, sha) of the tree's rows already embedded by `version`: of `models` only when
    given (looked up by their joined key, one indexed column), else of the whole tree (filtered on
    the tree and version in LanceDB). Projected either way."""
    if not catalog.has(EMBEDDINGS) or models == []:
        return set()
    where = f"tree_id = {sql_literal(tree_id)} AND expert_version = {sql_literal(version)}"
    if models is None:
        filters = [where]
    elif ROW_KEY in catalog.table(EMBEDDINGS).schema.names:
        keys = sorted({key_string((r["repo_id"], r["sha"], version)) for r in models})
        filters = [f"{ids} AND tree_id = {sql_literal(tree_id)}" for ids in sql_in(ROW_KEY, keys)]
    else:  # a table from before the joined key: its first write adds it
        filters = [f"{where} AND {ids}" for ids in sql_in("repo_id", sorted({r["repo_id"] for r in models}))]
    out = set()
    for f in filters:
        t = catalog.read(EMBEDDINGS, where=f, columns=["repo_id", "sha"])
        out |= set(zip(t.column("repo_id").to_pylist(), t.column("sha").to_pylist())) if t.num_rows else set()
    return out


FILTER_COLUMNS = ("tree_id", "expert_version")  # every search filters on both: few distinct values


# Rows written after the vector index was built are searched exactly until folded into it; a
# nightly folds them (storage.catalog.optimize_table) only past this share of the index, else the
# maintenance flow does.
UNINDEXED_SHARE = 0.1


def vector_partitions(n: int) -> int:
    """IVF lists for n rows: k-means needs thousands of rows per list."""
    return max(1, min(256, n // 4096))


def ensure_indexes(table) -> bool:
    """Bitmap indexes on the filter columns always; the cosine IVF_PQ index once there are enough
    rows, trained again once the table has outgrown its lists TIER times (an index trained on a
    young catalog's few hundred rows has one list: every search would scan every row); rows added
    since it was built folded in once they are UNINDEXED_SHARE of it."""
    from lancedb.index import Bitmap, IvfPq

    indices = table.list_indices()
    for col in FILTER_COLUMNS:
        on_col = [i for i in indices if i.columns == [col]]
        if any(i.index_type == "Bitmap" for i in on_col):
            continue
        for old in on_col:  # catalogs from before had a BTree on tree_id
            table.drop_index(old.name)
        table.create_index(col, config=Bitmap(), name=f"{col}_idx")
    n = table.count_rows()
    if n < INDEX_MIN_ROWS:
        return False
    vector = next((i for i in indices if i.columns == ["vector"]), None)
    trained = vector_lists(table, vector.name) if vector is not None else 0
    if vector is None or vector_partitions(n) >= TIER * trained:
        dim = table.schema.field("vector").type.list_size
        table.create_index("vector", config=IvfPq(  # replaces the old one in one commit
            distance_type="cosine", num_partitions=vector_partitions(n),
            num_sub_vectors=dim // 4 if dim % 4 == 0 else None,  # 4 dims per PQ code
        ), name=vector.name if vector is not None else None)
    else:
        stats = table.index_stats(vector.name)
        if stats is None or stats.num_unindexed_rows > UNINDEXED_SHARE * max(1, stats.num_indexed_rows):
            optimize_table(table)
    return True


def vector_lists(table, name: str) -> int:
    """The IVF lists the vector index was trained with (its first, oldest delta's)."""
    stats = table.to_lance().stats.index_stats(name)
    return int(stats["indices"][0]["num_partitions"]) if stats.get("indices") else 0


def tag_version(table, versions: list[str]) -> str:
    """Tag the current table version: embed-<UTC date>-<hash of the expert versions>."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    digest = hashlib.sha1(";".join(sorted(versions)).encode()).hexdigest()[:8]
    tag = f"embed-{stamp}-{digest}"
    table.tags.create(tag, table.version)
    return tag
