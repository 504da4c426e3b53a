"""Ask the catalog questions: models by text, what a model was trained on, models like a model.

Importable from a notebook with no Prefect:

    from storage.query import CatalogQuery
    q = CatalogQuery.open()                 # PROBEX_HOME, or CatalogQuery.open(home="...")
    q.search("birds", k=10)                 # pandas DataFrame, best first
    q.classify("org/model", ["dog", "cat", "bird"])
    q.similar("org/model", k=5)

Here: which rows to read and how (LanceDB filters, vector search, projections). The scores
themselves are the head kind's (probex_core.heads), calibrated so that rankings from different
trees merge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from probex_core.errors import ProbexError
from probex_core.heads import HeadKind, QueryRows, get_head
from storage.catalog import EMBEDDINGS, MODELS, Catalog, sql_in, sql_literal

CANDIDATES_PER_TREE = 50  # vector-search depth per tree before calibrated re-ranking
# A tree whose expert fuses the text probe is re-ranked whole up to this many rows: the probe's
# score is not a distance in the vector index, so candidates by vector alone would miss models of
# classes the expert never saw (its strength). Larger trees re-rank their vector candidates only.
SCAN_ROWS = 5000
POSTFILTER_SHARE = 0.5  # a tree with this share of the rows is filtered after the vector search
CARD_FIELDS = ["license", "pipeline_tag", "library_name", "tags", "labels"]


class QueryError(ProbexError):
    pass


class EmptyQueryError(QueryError):
    pass


class UnknownModelError(QueryError):
    pass


class TooFewLabelsError(QueryError):
    pass


class NoExpertError(QueryError):
    pass


@dataclass
class _Tree:
    tree_id: str
    version: str
    head: HeadKind
    labels: list[str]
    expert: object  # LoadedExpert

    @property
    def probe(self) -> bool:
        return bool(self.expert.probex_config.text_probe)


class CatalogQuery:
    def __init__(self, catalog_uri: str, experts_dir: str, text_encoder: str | None = None):
        self.catalog = Catalog(catalog_uri, create=False)
        self.experts_dir = str(experts_dir)
        self.text_encoder_name = text_encoder
        self._encoder = None
        self._trees: dict[str, _Tree] | None = None
        self._table = None
        self._class_texts: dict[tuple[str, str], np.ndarray] = {}  # (tree, version) -> (C, text_dim)
        self._lance = None  # the embeddings table's Lance dataset (vector search)
        self._models = None  # the models table's Lance dataset (card fields)
        self._counts: dict[tuple[str, str], int] | None = None  # (tree, version) -> rows

    def refresh(self) -> None:
        """Forget what was loaded (experts, card fields, the table handle): see new catalog writes.
        A CatalogQuery is otherwise a snapshot taken at its first question, so repeated questions
        do not re-read experts and cards (tens of ms each)."""
        self._trees, self._table, self._lance, self._models, self._counts = None, None, None, None, None
        self._class_texts.clear()

    @classmethod
    def open(cls, home: str | Path | None = None, **overrides) -> "CatalogQuery":
        from probex_core.settings import Settings

        s = Settings.load(home, **overrides)
        return cls(s.catalog, str(s.experts), s.text_encoder)

    # -- shared pieces --------------------------------------------------------------------------
    @property
    def encoder(self):
        if self._encoder is None:
            from probex_core.text_encoder import TextEncoder

            self._encoder = TextEncoder(self.text_encoder_name)
        return self._encoder

    @property
    def table(self):
        if self._table is None:
            self._table = self.catalog.table(EMBEDDINGS)
        return self._table

    def trees(self) -> dict[str, _Tree]:
        """Trees with a current expert, loaded once."""
        if self._trees is None:
            from storage.experts import load_current

            self._trees = {}
            for row in self.catalog.read("trees").to_pylist():
                expert = load_current(self.experts_dir, row["tree_id"])
                if expert is None:
                    continue
                self._trees[row["tree_id"]] = _Tree(row["tree_id"], expert.version,
                                                    get_head(expert.probex_config.head), list(expert.labels), expert)
        return self._trees

    def _encode(self, texts: list[str], prompt: str | None) -> torch.Tensor:
        return torch.as_tensor(self.encoder.encode(texts, prompt=prompt or "{}"), dtype=torch.float32)

    def _cards(self, repo_ids: list[str]) -> pd.DataFrame:
        """Card fields of the answer's models only (a filtered, projected read)."""
        parts = [self.models.to_table(columns=["repo_id", *CARD_FIELDS], filter=f"status != 'superseded' AND {ids}")
                 for ids in sql_in("repo_id", sorted(set(repo_ids)))]
        if not parts:
            return pd.DataFrame(columns=["repo_id", *CARD_FIELDS])
        return pa.concat_tables(parts).to_pandas()

    def _model_row(self, repo_id: str) -> dict:
        if not repo_id or not isinstance(repo_id, str):
            raise UnknownModelError("give a repo id such as org/name")
        hits = [r for r in self.table.search().where(f"repo_id = {sql_literal(repo_id)}").limit(None).to_list()]
        trees = self.trees()
        hits = [h for h in hits if h["tree_id"] in trees and h["expert_version"] == trees[h["tree_id"]].version]
        if not hits:
            known = self.catalog.read(MODELS, where=f"repo_id = {sql_literal(repo_id)}").num_rows
            if known:
                raise NoExpertError(f"{repo_id} is in the catalog but has no embedding from a current "
                                    "expert (its tree may have no expert); run `probex train` and `probex ingest`")
            raise UnknownModelError(f"{repo_id} is not in the catalog; check the id or run `probex crawl`")
        return hits[0]

    # -- the three questions --------------------------------------------------------------------
    def search(self, text: str, k: int = 10, tree: str | None = None, where: str | None = None) -> pd.DataFrame:
        if not isinstance(text, str) or not text.strip():
            raise EmptyQueryError("the query is empty; say what the models should be about, e.g. \"birds\"")
        if k < 1:
            raise QueryError("k must be at least 1")
        trees = self.trees()
        if tree is not None and tree not in trees:
            raise NoExpertError(f"tree {tree} has no expert; run `probex train --tree {tree}`"
                                if self.catalog.tree(tree) is not None
                                else f"no tree {tree} in the catalog; see `probex trees`")
        q = self._encode([text.strip()], None)  # (1, text_dim)
        plans = []  # (tree, its class texts (C, text_dim), where to look in the vector index)
        for t in trees.values():
            if tree is not None and t.tree_id != tree:
                continue
            class_text = torch.as_tensor(self._class_text(t), dtype=torch.float32)
            if not t.head.matches(q, class_text):
                continue
            qv = t.head.query_vector(t.expert.model, q)
            if t.probe and self._count(t.tree_id, t.version) <= SCAN_ROWS:
                qv = None
            plans.append((t, class_text, qv))
        whole = self._scan_trees([t for t, _, qv in plans if qv is None], where)
        parts = []
        for t, class_text, qv in plans:
            found = whole[t.tree_id] if qv is None else \
                self.nearest(qv, t.tree_id, t.version, CANDIDATES_PER_TREE, self._columns(t), where)
            parts.append(self._scored(t, found, q, class_text))
        hits = pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) else \
            pd.DataFrame(columns=["repo_id", "sha", "tree_id", "score", "top_labels"])
        hits = hits.sort_values("score", ascending=False).head(k).reset_index(drop=True)
        return hits.merge(self._cards(hits["repo_id"].tolist()), on="repo_id", how="left")

    _SHOWN = ["repo_id", "sha", "top_labels"]

    def _columns(self, t: _Tree) -> list[str]:
        """What search reads of a tree's rows: the answer's columns and what its head scores."""
        return self._SHOWN + t.head.query_columns(t.probe)

    def _scan_trees(self, trees: list[_Tree], where: str | None) -> dict[str, pa.Table]:
        """Every row of these trees' current experts, in one filtered read (a query per tree
        would pay LanceDB's fixed cost per call), split by tree."""
        if not trees:
            return {}
        columns = list(dict.fromkeys(c for t in trees for c in self._columns(t)))
        filt = " OR ".join(f"({_tree_filter(t.tree_id, t.version)})" for t in trees)
        found = self.lance.to_table(columns=[*columns, "tree_id"], filter=f"({filt}) AND ({where})" if where else filt)
        return {t.tree_id: found.filter(pc.equal(found["tree_id"], t.tree_id)).select(self._columns(t)) for t in trees}

    def _scored(self, t: _Tree, found: pa.Table, q: torch.Tensor, class_text: torch.Tensor) -> pd.DataFrame:
        """One tree's found rows, scored for the query (1, text_dim) by its head."""
        if not found.num_rows:
            return pd.DataFrame(columns=self._SHOWN + ["tree_id", "score"])
        score = t.head.search_scores(t.expert.model, self._rows(t, found), q, class_text)
        df = found.select(self._SHOWN).to_pandas()
        df["tree_id"], df["score"] = t.tree_id, score
        return df

    def nearest(self, vector: np.ndarray, tree_id: str, version: str, limit: int, columns: list[str],
                where: str | None = None) -> pa.Table:
        """The pure vector search: the `limit` rows of one tree's current expert nearest to `vector`
        (cosine, through the IVF_PQ index when built), with `columns` and `_distance`.

        Run on the table's Lance dataset (what LanceDB stores and indexes; its query builder adds
        a fixed cost a call). The tree filter is planned: a tree holding at least POSTFILTER_SHARE
        of the rows is filtered after the search, over-fetching by its share, since a pre-filter
        over most of the table costs more than the search itself (design notes); a smaller tree,
        or any extra `where`, is pre-filtered through the bitmap indexes."""
        query = {"column": "vector", "q": np.asarray(vector, np.float32), "metric": "cosine"}
        share = self._share(tree_id, version)
        if where is None and share >= POSTFILTER_SHARE:
            fetch = math.ceil(limit / share * 1.2) + 2
            found = self.lance.to_table(columns=[*columns, "tree_id", "expert_version", "_distance"],
                                        nearest={**query, "k": fetch})
            keep = pc.and_(pc.equal(found["tree_id"], tree_id), pc.equal(found["expert_version"], version))
            found = found.filter(keep)
            if found.num_rows >= limit or fetch >= self.lance.count_rows():
                return found.select([*columns, "_distance"]).slice(0, limit)
        return self.lance.to_table(columns=[*columns, "_distance"], nearest={**query, "k": limit},
                                   filter=_tree_filter(tree_id, version, where), prefilter=True)

    @property
    def lance(self):
        if self._lance is None:
            self._lance = self.table.to_lance()
        return self._lance

    @property
    def models(self):
        if self._models is None:
            self._models = self.catalog.table(MODELS).to_lance()
        return self._models

    @property
    def _row_counts(self) -> dict[tuple[str, str], int]:
        """(tree, expert version) -> rows, counted once per snapshot."""
        if self._counts is None:
            counts = (self.lance.to_table(columns=["tree_id", "expert_version"])
                      .group_by(["tree_id", "expert_version"]).aggregate([([], "count_all")]))
            self._counts = {(t, v): n for t, v, n in zip(counts["tree_id"].to_pylist(),
                                                         counts["expert_version"].to_pylist(),
                                                         counts["count_all"].to_pylist())}
        return self._counts

    def _count(self, tree_id: str, version: str) -> int:
        """Rows of one tree's current version."""
        return self._row_counts.get((tree_id, version), 0)

    def _share(self, tree_id: str, version: str) -> float:
        """Share of the table's rows in one tree's current version."""
        return self._count(tree_id, version) / max(1, sum(self._row_counts.values()))

    @staticmethod
    def _rows(t: _Tree, found: pa.Table) -> QueryRows:
        """What the head's scoring reads of found rows, as arrays."""
        def matrix(name):
            if name not in found.column_names:
                return None
            col = found[name].combine_chunks()
            if col.null_count:
                return None  # a row embedded without it (e.g. no text probe then): the head alone
            return np.array(col.flatten(), np.float32).reshape(len(col), -1)  # a writable copy

        factors = matrix("probe_factor") if t.probe else None
        return QueryRows(vectors=matrix("vector"), label_scores=matrix("label_scores"),
                         factors=None if factors is None else
                         torch.from_numpy(factors.reshape(len(factors), -1, t.expert.probex_config.d_W)))

    def _class_text(self, t: _Tree) -> np.ndarray:
        """The frozen text embeddings of a tree's label vocabulary (cached per tree)."""
        key = (t.tree_id, t.version)
        if key not in self._class_texts:
            if "class_text_emb" in t.expert.extra:
                self._class_texts[key] = t.expert.extra["class_text_emb"].numpy()
            else:
                self._class_texts[key] = self.encoder.encode(t.labels, prompt="{}")
        return self._class_texts[key]

    def classify(self, repo_id: str, labels: list[str]) -> pd.DataFrame:
        labels = [l.strip() for l in (labels or []) if l and l.strip()]
        if len(set(labels)) < 2:
            raise TooFewLabelsError("give at least two different labels to choose between, e.g. --labels \"dog,cat\"")
        row = self._model_row(repo_id)
        t = self.trees()[row["tree_id"]]
        q = self._encode(labels, None)  # (L, text_dim)
        class_text = torch.as_tensor(self._class_text(t), dtype=torch.float32)
        scores, matched = t.head.label_scores(t.expert.model, self._rows(t, pa.Table.from_pylist([row])), q, class_text)
        df = pd.DataFrame({"label": labels, "score": scores,
                           "matched_class": [None if j is None else t.labels[j] for j in matched]})
        df["repo_id"], df["tree_id"] = repo_id, row["tree_id"]
        return df.sort_values("score", ascending=False).reset_index(drop=True)

    def similar(self, repo_id: str, k: int = 10) -> pd.DataFrame:
        row = self._model_row(repo_id)
        t = self.trees()[row["tree_id"]]
        found = self.nearest(np.asarray(row["vector"], np.float32), t.tree_id, t.version, k + 1,
                             ["repo_id", "top_labels"]).to_pandas()
        found = found[found["repo_id"] != repo_id].head(k)  # the model itself is nearest
        df = pd.DataFrame({"repo_id": found["repo_id"], "tree_id": t.tree_id, "score": 1.0 - found["_distance"],
                           "top_labels": found["top_labels"]}, columns=["repo_id", "tree_id", "score", "top_labels"])
        return df.reset_index(drop=True).merge(self._cards(df["repo_id"].tolist()), on="repo_id", how="left")


def _tree_filter(tree_id: str, version: str, where: str | None = None) -> str:
    """SQL for one tree's rows from its current expert, narrowed by a user's `where`."""
    filt = f"tree_id = {sql_literal(tree_id)} AND expert_version = {sql_literal(version)}"
    return f"{filt} AND ({where})" if where else filt
