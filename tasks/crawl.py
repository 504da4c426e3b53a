"""Crawl a source into the catalog: list -> place by lineage -> route the rest by weights -> upsert.

Incremental and idempotent: by default the listing starts at the source's watermark; only new
(repo_id, sha) pairs are read further (an adapter's header for its module signature, the header of
a single safetensors file of no telling name to tell a LoRA from a whole checkpoint, a few tensors
for weight routing); rows are upserted by diff, so a re-run changes nothing; the watermark moves
only after the rows are committed, and never past models a `--limit` left unread.

Cost follows the listing, not the catalog: only the rows a crawl can change or needs to decide
are read (the listed repos, their ancestors, and the descendants of repos whose lineage moved),
through filtered, projected LanceDB queries; trees are recounted only where a row came or went.

Lineage as the Hub writes it: `base_model` is one id or a list (a merge); a PEFT adapter whose
card declares none takes `adapter_config.json`'s `base_model_name_or_path` (as the Hub does;
`lineage_source` "adapter_config"); an undeclared relation is inferred as the Hub infers it (flag
`relation_inferred`); ids compare case-insensitively. A parent outside the catalog is looked up
once on the source (`Source.model_info`) and stored as a row: the repo's own record (so a chain
crosses a middle the listing never showed), or a `not_found` row that stops later crawls from
asking again. A lookup that fails (timeout, endpoint down) is left for the next crawl.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime

from probex_core.lineage import RELATION_INFERRED, infer_relation, place, repo_key
from probex_core.routing import Fingerprint, TreeSignature, fingerprint_names, route
from storage.catalog import MODELS, TREES, Catalog, sql_in
from storage.adapters import looks_like_adapter
from storage.extract import adapter_layer_shapes, header_shapes
from storage.http import HubRequests, counting
from storage.records import ModelRecord, is_adapter, no_safetensors_reason, repo_files, weight_files
from storage.safetensors_reader import TensorReadError, read_repo_tensors
from storage.sources import Source, SourceError
from storage.sources.parse import ADAPTER_CONFIG_FILE, MAX_ADAPTER_CONFIG_BYTES, Status, adapter_config_base

log = logging.getLogger(__name__)

# Statuses the crawl owns; others (quarantined by extraction, superseded) are kept on re-placement.
CRAWL_STATUSES = {"ok", "unassigned"}
CARD, ADAPTER_CONFIG, WEIGHTS = "card", "adapter_config", "weights"  # values of `lineage_source`
DECLARED = (CARD, ADAPTER_CONFIG)  # lineage the repo itself states
# Flags a row keeps through re-placement (the others are recomputed by lineage each time).
ROW_FLAGS = {RELATION_INFERRED}
# Parent lookups per crawl are bounded in number and time: each is one or two requests (with the
# HTTP layer's timeouts); what is left over is looked up by the next crawl that reads the child.
MAX_PARENT_LOOKUPS = 200
PARENT_LOOKUP_SECONDS = 120.0


@dataclass
class CrawlSummary:
    source: str
    seen: int = 0
    new: int = 0  # repo ids never seen before
    looked_up: int = 0  # parents outside the catalog read from the source (found or not)
    changed: int = 0  # known repo ids at a new sha
    unchanged: int = 0
    replaced: int = 0  # known rows whose tree placement moved (e.g. a parent arrived)
    unassigned: int = 0
    routed: int = 0  # placed by weights
    errors: list[dict] = field(default_factory=list)  # {repo_id, status, reason}
    lookup_failures: list[dict] = field(default_factory=list)  # {repo_id, reason}: retried next crawl
    per_tree: dict[str, int] = field(default_factory=dict)  # models now in each tree this crawl changed
    watermark: str | None = None  # the stored watermark after this crawl
    next_watermark: str | None = None  # what it may advance to once everything downstream committed
    seconds: float = 0.0
    hub: HubRequests = field(default_factory=HubRequests)  # what the crawl asked of the source's endpoint

    def to_dict(self) -> dict:
        return asdict(self)


def model_row(rec: ModelRecord, source: Source) -> dict:
    return {
        "repo_id": rec.repo_id, "sha": rec.sha, "status": rec.status, "reason": rec.reason,
        "parents": list(rec.base_model), "relation": rec.base_model_relation,
        "license": rec.license, "tags": list(rec.tags), "datasets": list(rec.datasets),
        "pipeline_tag": rec.pipeline_tag, "library_name": rec.library_name,
        "labels": [rec.id2label[k] for k in sorted(rec.id2label, key=_label_order)] if rec.id2label else None,
        "files": [{"path": f.path, "size": f.size} for f in rec.files],
        "created_at": rec.created_at, "last_modified": rec.last_modified, "source": source.name,
        "adapter_modules": None, "weights_kind": weight_files(f.path for f in rec.files).kind,
    }


def make_row(source: Source, rec: ModelRecord) -> dict:
    """A new catalog row from a record, with what the crawl reads beyond it: what a single
    safetensors file of no telling name holds (a LoRA or a whole checkpoint: its header), an
    adapter's module signature, its lineage from adapter_config.json when the card gives none,
    and the relation."""
    row = model_row(rec, source)
    readable = rec.status not in (Status.BAD_REPO_ID, Status.NOT_FOUND, Status.GATED)
    shapes = None
    if readable and row["weights_kind"] == "single":
        shapes = _header(source, row, "weights")
        if shapes is not None:
            row["weights_kind"] = "lora" if looks_like_adapter(shapes) else "full"  # extraction's rule
    if readable and is_adapter(row) and rec.status == "ok":
        row["adapter_modules"] = _adapter_signature(source, row, shapes)
    if readable and not row["parents"] and (base := _adapter_config_base(source, row)):
        row["parents"], row["lineage_source"] = [base], ADAPTER_CONFIG
    quantized = bool(no_safetensors_reason(repo_files(row))) and any(f.endswith(".gguf") for f in repo_files(row))
    row["relation"], inferred = infer_relation(row["relation"], len(row["parents"]), adapter=is_adapter(row),
                                               quantized=quantized)
    row["flags"] = [RELATION_INFERRED] if inferred else []
    return row


def _adapter_config_base(source: Source, row: dict) -> str | None:
    """`base_model_name_or_path` of the repo's adapter_config.json (one small read), or None."""
    size = next((f["size"] for f in row["files"] if f["path"] == ADAPTER_CONFIG_FILE), None)
    if size is None or size > MAX_ADAPTER_CONFIG_BYTES:
        return None
    try:
        with source.opener(row["repo_id"], row["sha"]).open(ADAPTER_CONFIG_FILE) as src:
            raw = src.read(0, size if size >= 0 else src.size())
    except (TensorReadError, OSError, SourceError) as e:  # extraction will say what is wrong with it
        log.info("%s: adapter_config.json unreadable (%s); no lineage taken from it", row["repo_id"], e)
        return None
    return adapter_config_base(raw)


def _label_order(key: str):
    return (0, int(key)) if str(key).isdigit() else (1, str(key))


def _header(source: Source, row: dict, what: str) -> dict[str, tuple[int, ...]] | None:
    """name -> shape of the repo's weights, from the header only; None, with the row's reason
    saying why, when it is unreadable (extraction quarantines the model with the details)."""
    try:
        shapes, _ = header_shapes(source.opener(row["repo_id"], row["sha"]), repo_files(row))
    except (TensorReadError, OSError) as e:
        why = f"unreadable {what} header: {e}"
        row["reason"] = f"{row['reason']}; {why}" if row.get("reason") else why
        return None
    return shapes


def _adapter_signature(source: Source, row: dict, shapes: dict[str, tuple[int, ...]] | None = None
                       ) -> list[str] | None:
    """'module|in|out' for each LoRA module, read from the adapter's header only (`shapes`: the
    header when already read)."""
    shapes = shapes if shapes is not None else _header(source, row, "adapter")
    if shapes is None:
        return None
    return sorted(f"{m}|{s[1]}|{s[0]}" for m, s in adapter_layer_shapes(shapes).items())


def _parse_signature(items) -> set[tuple[str, int, int]]:
    out = set()
    for s in items or []:
        m, i, o = s.rsplit("|", 2)
        out.add((m, int(i), int(o)))
    return out


def _tree_signatures(source: Source, catalog: Catalog, current: dict[str, dict]) -> list[TreeSignature]:
    """A signature per tree: its root's fingerprint tensors (when the root is readable here) and
    the union of its adapters' module signatures, from what lineage placed: the stored rows
    (projected) and this crawl's own, not yet written."""
    sigs: dict[str, TreeSignature] = {}
    stored = catalog.read(MODELS, where="lineage_source IN ('card', 'adapter_config') AND status != 'superseded'",
                          columns=["repo_id", "tree_id", "adapter_modules"]).to_pylist()
    placed = {r["repo_id"]: r for r in stored if r["repo_id"] not in current}
    placed.update({m: r for m, r in current.items() if r.get("lineage_source") in DECLARED})
    for row in placed.values():
        t = row.get("tree_id")
        if not t:
            continue
        sig = sigs.setdefault(t, TreeSignature(t))
        sig.adapter_modules |= _parse_signature(row.get("adapter_modules"))
    roots = {r["repo_id"]: r for r in _models_where(catalog, "repo_id", sorted(set(sigs) - set(current)),
                                                    "status != 'superseded'")}
    roots.update({m: r for m, r in current.items() if m in sigs})
    for t, sig in sigs.items():
        root = roots.get(t)
        if root is None or is_adapter(root) or "model.safetensors" not in repo_files(root):
            continue
        try:
            loc = source.opener(root["repo_id"], root["sha"])
            shapes, _ = header_shapes(loc, repo_files(root))
            names = fingerprint_names(shapes)
            sig.root_tensors = read_repo_tensors(loc.open, names, repo_files(root), check=False).tensors
        except (TensorReadError, OSError):
            continue
    return list(sigs.values())


def _fingerprint(source: Source, row: dict, sigs: list[TreeSignature]) -> Fingerprint:
    """The model's routing evidence. A corrupt weights file (unreadable header, truncated, NaN/Inf)
    raises TensorReadError: the caller quarantines the model instead of routing it."""
    fp = Fingerprint(row["repo_id"])
    if is_adapter(row):
        fp.adapter_modules = _parse_signature(row.get("adapter_modules"))
        return fp
    if "model.safetensors" not in repo_files(row) and "model.safetensors.index.json" not in repo_files(row):
        return fp
    loc = source.opener(row["repo_id"], row["sha"])
    shapes, _ = header_shapes(loc, repo_files(row))
    wanted = {n for s in sigs for n, ref in s.root_tensors.items() if tuple(shapes.get(n, ())) == ref.shape}
    if wanted:
        fp.tensors = read_repo_tensors(loc.open, sorted(wanted), repo_files(row), check=True).tensors
    return fp


def crawl_source(source: Source, catalog: Catalog, *, since: datetime | None = None,
                 until: datetime | None = None, limit: int | None = None,
                 incremental: bool = True, advance_watermark: bool = True, on_record=None) -> CrawlSummary:
    """List -> new rows -> current view -> lineage -> weight routing -> commit -> watermark.

    advance_watermark=False: leave it to the caller (the ingest flow moves it only at the end)."""
    t0 = time.perf_counter()
    summary = CrawlSummary(source.name)
    with counting() as summary.hub:  # listing, parent lookups, adapter headers, routing reads
        if since is None and until is None and incremental:
            since = catalog.watermark(source.name)
        records = list_window(source, since, until, limit, on_record)
        summary.seen = len(records)
        listed = listed_rows(catalog, records)
        fresh = new_rows(source, records, listed, summary)
        existing, known_roots = neighbourhood(catalog, listed, fresh)
        looked = look_up_parents(source, catalog, existing, fresh, summary)
        current, superseded = current_view(existing, {**fresh, **looked})
        to_route, touched = place_by_lineage(current, {**fresh, **looked}, summary, known_roots)
        if to_route:
            route_by_weights(source, catalog, current, to_route, summary)
        if superseded or touched:  # nothing new: no table is read again or written
            catalog.upsert_models(superseded + touched)
            summary.per_tree = update_tree_counts(catalog, count_changes(existing, superseded + touched))
        count_outcomes(current, fresh, summary)
        move_watermark(catalog, source, records, limit, until, advance_watermark, summary)
    summary.seconds = time.perf_counter() - t0
    return summary


def list_window(source: Source, since, until, limit, on_record=None) -> list[ModelRecord]:
    records = []
    for rec in source.list_models(since=since, until=until, limit=limit):
        records.append(rec)
        if on_record:
            on_record(rec)
    return records


def listed_rows(catalog: Catalog, records: list[ModelRecord]) -> list[dict]:
    """Every stored row (each sha) of the listed repo ids."""
    return _models_where(catalog, "repo_id", sorted({r.repo_id for r in records}))


def _models_where(catalog: Catalog, column: str, values, extra: str | None = None,
                  columns: list[str] | None = None) -> list[dict]:
    out = []
    for clause in sql_in(column, values):
        out += catalog.read(MODELS, where=f"{clause} AND ({extra})" if extra else clause, columns=columns).to_pylist()
    return out


def _ancestors_where(catalog: Catalog, ids) -> list[dict]:
    """Stored current rows of these repo ids, compared as the Hub compares ids: exactly first (the
    index answers), then, for the few ids spelled otherwise than stored, case-insensitively."""
    found = _models_where(catalog, "repo_id", sorted(ids), "status != 'superseded'")
    got = {repo_key(r["repo_id"]) for r in found}
    other = sorted({repo_key(i) for i in ids} - got)
    if other:
        found += _models_where(catalog, "lower(repo_id)", other, "status != 'superseded'")
    return found


def neighbourhood(catalog: Catalog, listed: list[dict], fresh: dict[tuple[str, str], dict]
                  ) -> tuple[list[dict], set[str]]:
    """The stored rows whose placement the crawl can change or needs: the listed repos, every
    declared ancestor (up to the roots), and every descendant of a repo whose first parent is new
    or moved (so an orphan follows its parent when the parent arrives). Also the ids already
    stored as roots: a model without lineage that others name stays a root when those others are
    outside the neighbourhood."""
    rows = {(r["repo_id"], r["sha"]): r for r in listed}
    have = {r["repo_id"] for r in listed}
    prior = {r["repo_id"]: r for r in listed if r["status"] != "superseded"}
    moved = [k[0] for k, row in fresh.items()
             if k[0] not in prior or _first_parent(prior[k[0]]) != _first_parent(row)]
    # descendants, by the stored first-parent link
    frontier = moved
    while frontier:
        found = [r for r in _models_where(catalog, "parent", frontier, "status != 'superseded'")
                 if (r["repo_id"], r["sha"]) not in rows]
        for r in found:
            rows[(r["repo_id"], r["sha"])] = r
        frontier = sorted({r["repo_id"] for r in found} - set(frontier))
        have |= set(frontier)
    # ancestors, through every declared parent (one listed in this crawl has its stored rows
    # in `listed` already: looking it up again would miss and fall back to a case-blind scan)
    keys = {repo_key(i) for i in have} | {repo_key(k[0]) for k in fresh}
    wanted = _unknown(_parents_of([*rows.values(), *fresh.values()]), keys)
    while wanted:
        found = _ancestors_where(catalog, wanted)
        keys |= {repo_key(i) for i in wanted} | {repo_key(r["repo_id"]) for r in found}
        for r in found:
            rows[(r["repo_id"], r["sha"])] = r
        wanted = _unknown(_parents_of(found), keys)
    roots = {r["repo_id"] for r in rows.values() if r.get("tree_id") == r["repo_id"] and r["status"] != "superseded"}
    return list(rows.values()), roots


def _first_parent(row: dict) -> str | None:
    own = repo_key(row["repo_id"])
    return next((repo_key(p) for p in row.get("parents") or [] if p and repo_key(p) != own), None)


def _parents_of(rows) -> set[str]:
    return {p for r in rows for p in r.get("parents") or [] if p}


def _unknown(ids: set[str], keys: set[str]) -> set[str]:
    """The ids whose repo key is not among `keys`, one spelling per repo."""
    out: dict[str, str] = {}
    for i in sorted(ids):
        if repo_key(i) not in keys:
            out.setdefault(repo_key(i), i)
    return set(out.values())


def look_up_parents(source: Source, catalog: Catalog, existing: list[dict], fresh: dict[tuple[str, str], dict],
                    summary: CrawlSummary, *, limit: int = MAX_PARENT_LOOKUPS,
                    seconds: float = PARENT_LOOKUP_SECONDS) -> dict[tuple[str, str], dict]:
    """Rows for the declared parents that neither the catalog nor this crawl has, read once from
    the source: the parent's own record (under the id the source answers with, so its own spelling)
    and, through its own `base_model`, its ancestors, until the chain reaches the catalog or a
    root; a parent the source does not have becomes a `not_found` row. The children's `parents`
    are rewritten to the spelling found. Ancestors found in the catalog on the way are appended to
    `existing`. Never raises for one lookup: a failure is in `summary.lookup_failures`."""
    rows = [*(r for r in existing if r["status"] != "superseded"), *fresh.values()]
    keys = {repo_key(r["repo_id"]) for r in rows}
    named_by = {}  # repo key -> a child naming it, for the not_found row's reason
    for r in rows:
        for p in r.get("parents") or []:
            named_by.setdefault(repo_key(p), r["repo_id"])
    looked: dict[tuple[str, str], dict] = {}
    spelling: dict[str, str] = {}  # repo key declared -> the id the source answered with
    deadline = time.monotonic() + seconds
    wanted = _unknown(_parents_of(rows), keys)
    while wanted:
        found = []
        for parent in sorted(wanted):
            keys.add(repo_key(parent))
            if summary.looked_up >= limit or time.monotonic() > deadline:
                summary.lookup_failures.append({"repo_id": parent, "reason": "lookup budget of this crawl spent"})
                continue
            summary.looked_up += 1
            try:
                rec = source.model_info(parent)
            except (SourceError, OSError, NotImplementedError) as e:  # the endpoint, not the repo: next crawl asks again
                summary.lookup_failures.append({"repo_id": parent, "reason": " ".join(str(e).split())[:240]})
                continue
            if rec.status == Status.NOT_FOUND:
                row = model_row(rec, source)
                row.update(repo_id=parent, flags=[], reason=(
                    f"named as a parent by {named_by.get(repo_key(parent), '?')} but not on the source "
                    "(deleted, private or never uploaded): recorded so it is not looked up again; "
                    "a crawl that lists it reads it"))
                looked[(parent, row["sha"])] = row
                continue
            spelling[repo_key(parent)] = rec.repo_id
            if repo_key(rec.repo_id) in keys - {repo_key(parent)}:
                continue  # answered with an id this crawl already has (a renamed repo's new name)
            keys.add(repo_key(rec.repo_id))
            stored = _ancestors_where(catalog, {rec.repo_id}) if rec.repo_id != parent else []
            if stored:  # the catalog has it under its own spelling
                existing.extend(stored)
                found += stored
                continue
            row = make_row(source, rec)
            looked[(row["repo_id"], row["sha"])] = row
            found.append(row)
        for r in found:
            for p in r.get("parents") or []:
                named_by.setdefault(repo_key(p), r["repo_id"])
        wanted = _unknown(_parents_of(found), keys)
        stored = _ancestors_where(catalog, wanted) if wanted else []
        existing.extend(stored)
        keys |= {repo_key(r["repo_id"]) for r in stored}
        wanted = _unknown(wanted | _parents_of(stored), keys)
    if spelling:
        for r in [*existing, *fresh.values(), *looked.values()]:
            if any(repo_key(p) in spelling for p in r.get("parents") or []):
                r["parents"] = [spelling.get(repo_key(p), p) for p in r["parents"]]
    return looked


def new_rows(source: Source, records: list[ModelRecord], existing: list[dict],
             summary: CrawlSummary) -> dict[tuple[str, str], dict]:
    """Rows for the (repo_id, sha) pairs not in the catalog yet; an adapter's module signature is
    read from its header now, since routing and planning need it."""
    known = {(r["repo_id"], r["sha"]) for r in existing}
    latest = {r["repo_id"] for r in existing if r["status"] != "superseded"}
    fresh: dict[tuple[str, str], dict] = {}
    for rec in records:
        key = (rec.repo_id, rec.sha)
        if key in known:
            continue
        fresh[key] = make_row(source, rec)
        if rec.repo_id in latest:
            summary.changed += 1
        else:
            summary.new += 1
    summary.unchanged = summary.seen - len(fresh)
    return fresh


def current_view(existing: list[dict], fresh: dict[tuple[str, str], dict]) -> tuple[dict[str, dict], list[dict]]:
    """One row per repo id (its newest sha), and the older rows it supersedes."""
    current: dict[str, dict] = {r["repo_id"]: dict(r) for r in existing if r["status"] != "superseded"}
    superseded = []
    for (repo_id, sha), row in fresh.items():
        old = current.get(repo_id)
        if old is not None and old["sha"] != sha:
            superseded.append({**old, "status": "superseded", "reason": f"newer revision {sha}"})
        current[repo_id] = row
    return current, superseded


def place_by_lineage(current: dict[str, dict], fresh: dict[tuple[str, str], dict],
                     summary: CrawlSummary, known_roots: set[str] = frozenset()
                     ) -> tuple[list[dict], list[dict]]:
    """Lineage over the neighbourhood. Returns (fresh rows lineage cannot place, rows to write).
    A `not_found` row (a parent the source does not have) places nothing: its children name
    their tree after it (`missing_parent`), as when it was never looked up."""
    present = {m: r for m, r in current.items() if r["status"] != Status.NOT_FOUND}
    placements = place({m: (r["parents"] or [], r["relation"]) for m, r in present.items()}, known_roots)
    to_route, touched = [], []
    for repo_id, row in current.items():
        is_fresh = (repo_id, row["sha"]) in fresh
        if repo_id not in placements:
            if is_fresh:
                touched.append(row)
            continue
        p = placements[repo_id]
        before = (row.get("tree_id"), row.get("parent"), tuple(row.get("flags") or ()), tuple(row.get("parents") or ()))
        if p.tree_id is None and row.get("lineage_source") == WEIGHTS:
            continue  # placed by weights in an earlier run: keep it
        row["tree_id"], row["parent"], row["parents"] = p.tree_id, p.parent, list(p.parents)
        row["flags"] = sorted(set(p.flags) | (set(row.get("flags") or ()) & ROW_FLAGS))
        # what placed it: the card, or adapter_config.json when the card declared nothing
        origin = ADAPTER_CONFIG if row.get("lineage_source") == ADAPTER_CONFIG else CARD
        row["lineage_source"] = origin if p.tree_id is not None else None
        if row["status"] in CRAWL_STATUSES:
            row["status"] = "ok" if p.tree_id is not None else "unassigned"
        if p.tree_id is None and row["status"] in CRAWL_STATUSES and is_fresh:
            to_route.append(row)
        if is_fresh:
            touched.append(row)
        elif before != (row["tree_id"], row["parent"], tuple(row["flags"]), tuple(row["parents"])):
            summary.replaced += 1
            touched.append(row)
    return to_route, touched


def route_by_weights(source: Source, catalog: Catalog, current: dict[str, dict], to_route: list[dict],
                     summary: CrawlSummary) -> None:
    """Place what lineage could not by its weights' distance to each tree; a corrupt file is
    quarantined instead."""
    sigs = _tree_signatures(source, catalog, current)
    for row in to_route:
        try:
            fp = _fingerprint(source, row, sigs)
        except (TensorReadError, OSError) as e:
            row["status"] = "quarantined"
            row["reason"] = f"{getattr(e, 'reason', 'unreadable')}: {getattr(e, 'message', e)}"
            continue
        decision = route(fp, sigs)
        row["route_distances"] = json.dumps(
            {k: (round(v, 6) if math.isfinite(v) else None) for k, v in decision.distances.items()})
        if decision.tree_id is not None:
            row["tree_id"], row["lineage_source"], row["status"] = decision.tree_id, WEIGHTS, "ok"
            row["reason"] = f"routed by weights: {decision.reason}"
            summary.routed += 1
        else:
            row["reason"] = f"unassigned: {decision.reason}"


def count_outcomes(current: dict[str, dict], fresh: dict[tuple[str, str], dict], summary: CrawlSummary) -> None:
    """What happened to this crawl's new rows (the catalog's totals are in `trees`)."""
    for row in current.values():
        if (row["repo_id"], row["sha"]) not in fresh:
            continue
        if row["status"] == "unassigned":
            summary.unassigned += 1
        elif row["status"] not in ("ok", "quarantined"):
            summary.errors.append({"repo_id": row["repo_id"], "status": row["status"], "reason": row["reason"]})


def move_watermark(catalog: Catalog, source: Source, records: list[ModelRecord], limit, until,
                   advance: bool, summary: CrawlSummary) -> None:
    """Only after the commit, and not when a limit may have left older models unread or the run
    was a bounded backfill window."""
    if records and not (limit is not None and len(records) >= limit) and until is None:
        newest = max((r.last_modified for r in records if r.last_modified), default=None)
        old = catalog.watermark(source.name)
        if newest is not None and (old is None or newest > old):
            summary.next_watermark = newest.isoformat()
            if advance:
                catalog.set_watermark(source.name, newest)
    wm = catalog.watermark(source.name)
    summary.watermark = wm.isoformat() if wm else None


def _kind(row: dict) -> str:
    """The trees table's count a (non-root) model adds to."""
    if is_adapter(row) or row["relation"] == "adapter":
        return "n_adapter"
    return "n_finetune" if row["relation"] in (None, "finetune") else "n_other"


def count_changes(existing: list[dict], written: list[dict]) -> Counter:
    """{(tree, count column): change} the written rows make: each counts -1 as it was stored (when
    it counted) and +1 as it is written; rows not written change nothing."""
    before = {(r["repo_id"], r["sha"]): r for r in existing}
    delta: Counter = Counter()
    for row in written:
        for r, sign in ((before.get((row["repo_id"], row["sha"])), -1), (row, 1)):
            if r is not None and r.get("tree_id") and r["status"] != "superseded":
                delta[(r["tree_id"], "n_models")] += sign
                if r["repo_id"] != r["tree_id"]:
                    delta[(r["tree_id"], _kind(r))] += sign
    return delta


def update_tree_counts(catalog: Catalog, delta: Counter) -> dict[str, int]:
    """Add `delta` to the stored counts of the trees it names (a new tree starts at zero), keeping
    their expert columns: a crawl reads and writes only those trees' rows. Returns {tree: models}."""
    tree_ids = sorted({t for (t, _), n in delta.items() if n})
    if not tree_ids:
        return {}
    stored = {}
    for clause in sql_in("tree_id", tree_ids):
        stored.update({r["tree_id"]: r for r in catalog.read(TREES, where=clause).to_pylist()})
    rows = []
    for t in tree_ids:
        row = stored.get(t) or {"tree_id": t, "root": t, **{k: None for k in TREE_KEEP}}
        for col in COUNT_COLUMNS:
            row[col] = max(0, (row.get(col) or 0) + delta[(t, col)])
        rows.append(row)
    catalog.upsert_trees(rows)
    return {r["tree_id"]: r["n_models"] for r in rows if r["n_models"]}


COUNT_COLUMNS = ("n_models", "n_finetune", "n_adapter", "n_other")
TREE_COUNT_COLUMNS = ["repo_id", "tree_id", "relation", "files", "weights_kind"]
TREE_KEEP = ("layer", "expert_version", "task", "candidate_layers", "layer_shapes")


def refresh_trees(catalog: Catalog, tree_ids: set[str | None]) -> dict[str, int]:
    """Recount the given trees from all their current models (projected: the columns counting
    needs), keeping each tree's expert columns; a tree left with no model keeps its row at zero.
    Its cost follows the trees' sizes: a crawl adds its changes instead (update_tree_counts); this
    builds or repairs counts. Returns {tree: models} of the recounted trees."""
    tree_ids = sorted(t for t in tree_ids if t)
    if not tree_ids:
        return {}
    old = {}
    for clause in sql_in("tree_id", tree_ids):
        old.update({r["tree_id"]: r for r in catalog.read(TREES, where=clause).to_pylist()})
    trees = {t: {"tree_id": t, "root": t, "n_models": 0, "n_finetune": 0, "n_adapter": 0, "n_other": 0,
                 **{k: old.get(t, {}).get(k) for k in TREE_KEEP}} for t in tree_ids}
    for r in _models_where(catalog, "tree_id", tree_ids, "status != 'superseded'", TREE_COUNT_COLUMNS):
        t = trees[r["tree_id"]]
        t["n_models"] += 1
        if r["repo_id"] != r["tree_id"]:
            t[_kind(r)] += 1
    catalog.upsert_trees([t for t in trees.values() if t["n_models"] or t["tree_id"] in old])
    return {t: v["n_models"] for t, v in trees.items() if v["n_models"]}
