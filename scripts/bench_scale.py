"""The scale benchmark (issue 18): a nightly of new repos into catalogs of growing size.

For each size, a simulated Hub (tests/hubserver.py) lists `size` repos in TREES trees; the catalog
is seeded with the rows a crawl of them writes (placed by the same lineage code, written in bulk:
crawling a million repos over loopback HTTP would take hours here), each tree gets the extraction
plan a past nightly left (its layer and shape) and an expert (untrained: embedding costs the same
whatever the expert learned). Then NEW repos appear on the Hub and a nightly runs in a fresh
process, as a scheduled one does: crawl over HTTP from the watermark, plan, extract one small
layer of the new models on Dask, embed them. Its seconds per stage and peak RSS are what the
issue compares across sizes.

Each nightly also records what it asked of the Hub per stage (the server's counts between
stages, by endpoint class) and its per-model work (worker seconds, bytes read): the per-model
costs `scripts/hub_projection.py` projects to the real Hub. `listing_throughput` measures
HubSource.list_models against a simulated Hub in its own process, not rate-limited.

    .venv/bin/python scripts/benchmark.py scale          # all sizes (writes docs/bench/scale.json)
    .venv/bin/python scripts/bench_scale.py nightly HOME ENDPOINT   # one nightly (what the above runs)
    .venv/bin/python scripts/bench_scale.py costs        # the smallest size's nightly + the listing:
                                                         # $PROBEX_BENCH_DIR/hub_costs.json (~1 min)
    .venv/bin/python scripts/bench_scale.py listing      # listing throughput alone (printed)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

TREES = 100  # the same trees at every size, so a nightly's new repos touch as many trees
NEW = 1000
LAYER = "encoder.layer.0.attention.self.query.weight"  # the simulated repos' 8x8 query projection
BATCH = 50_000
BENCH = Path(os.environ.get("PROBEX_BENCH_DIR", "/tmp/probex-bench"))
ROUTES = ("list", "info", "resolve")


def _vm(key: str) -> int:
    """kB from /proc/self/status (VmHWM: peak RSS since exec)."""
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))


def hub_for(size: int):
    from hubserver import HubServer

    return HubServer(repos=size, tree_size=-(-size // TREES), page_size=1000)


def _record(sim, i: int):
    """The record the Hub source makes of simulated repo i (its card and config, parsed as the
    listing's model info would be); file sizes are not generated (no step of a nightly reads an
    old model's file sizes)."""
    from storage.records import ModelRecord, RepoFile

    card = sim.card(i)
    labels = sim.labels(i)
    return ModelRecord(
        repo_id=sim.repo_id(i), sha=sim.sha(i),
        created_at=datetime.fromtimestamp(sim.created_at_ms(i) / 1000, timezone.utc),
        last_modified=datetime.fromtimestamp(sim.last_modified_ms(i) / 1000, timezone.utc),
        base_model=[card["base_model"]] if "base_model" in card else [],
        base_model_relation=card.get("base_model_relation"), license=card["license"],
        datasets=card["datasets"], tags=card["tags"], pipeline_tag=card["pipeline_tag"],
        library_name=card["library_name"], id2label={str(k): v for k, v in enumerate(labels)},
        files=[RepoFile(p, 0) for p in sim.FILES])


def seed(home: Path, hub, size: int) -> dict:
    """A catalog of `size` placed rows, the trees' plans and experts, and the watermark."""
    import pyarrow as pa

    from probex_core.heads import MULTILABEL
    from probex_core.lineage import place
    from probex_core.probex import COMPACT, ProbeX, ProbeXConfig
    from storage.catalog import MODEL_KEY, MODELS, MODELS_SCHEMA, ROW_KEY, Catalog, joined_key, row_hash, with_hash
    from storage.experts import save_expert
    from storage.sources import open_source
    from tasks.crawl import model_row, refresh_trees

    t0 = time.perf_counter()
    shutil.rmtree(home, ignore_errors=True)
    source = open_source(f"hub:{hub.url}")
    sim = hub.sim
    cat = Catalog(str(home / "catalog"))
    placements = place({sim.repo_id(i): ([sim.repo_id(p)] if (p := sim.parent(i)) is not None else [], "finetune")
                        for i in range(size)})
    schema = with_hash(MODELS_SCHEMA)
    table = None
    for start in range(0, size, BATCH):
        rows = []
        for i in range(start, min(size, start + BATCH)):
            row = model_row(_record(sim, i), source)
            p = placements[row["repo_id"]]
            row.update(tree_id=p.tree_id, parent=p.parent, flags=sorted(p.flags), lineage_source="card")
            rows.append(row)
        batch = pa.Table.from_pylist(rows, schema=MODELS_SCHEMA)
        hashes = [row_hash(r) for r in batch.to_pylist()]
        batch = batch.append_column("row_hash", pa.array(hashes, pa.string())).cast(schema)
        batch = batch.append_column(ROW_KEY, joined_key(batch, MODEL_KEY))  # as upserts write them
        if table is None:
            table = cat.db.create_table(MODELS, batch)
        else:
            table.add(batch)
    cat.ensure_scalar_indexes(MODELS)
    roots = sorted({p.tree_id for p in placements.values() if p.tree_id})
    refresh_trees(cat, set(roots))
    experts = str(home / "experts")
    trees = []
    for t, root in enumerate(roots):
        labels = sorted({lab for i in range(t, min(size, t + TREES * 50), len(roots)) for lab in sim.labels(i)})
        cfg = ProbeXConfig(d_H=8, d_W=8, head=MULTILABEL.name, n_outputs=len(labels), **COMPACT)
        version = save_expert(experts, root, ProbeX(cfg), layer=LAYER, labels=labels,
                              info={"task": MULTILABEL.name, "note": "scale benchmark: untrained"})
        trees.append({**cat.tree(root), "layer": LAYER, "candidate_layers": [LAYER],
                      "layer_shapes": json.dumps({LAYER: [8, 8]}), "expert_version": version.name,
                      "task": MULTILABEL.name})
    cat.upsert_trees(trees)
    seed_embeddings(cat, sim, size, {t["tree_id"]: t["expert_version"] for t in trees},
                    {t["tree_id"]: _labels(experts, t["tree_id"]) for t in trees})
    newest = datetime.fromtimestamp(sim.last_modified_ms(size - 1) / 1000, timezone.utc)
    cat.set_watermark(source.name, newest)
    cat.maintain(keep_days=0, keep_tags=0)  # a long-lived catalog is compacted and indexed nightly
    return {"rows": cat.table(MODELS).count_rows(), "trees": len(roots), "seconds": time.perf_counter() - t0,
            "bytes": folder_bytes(home / "catalog")}


def _labels(experts: str, tree_id: str) -> list[str]:
    from storage.experts import load_current

    return list(load_current(experts, tree_id).labels)


def seed_embeddings(cat, sim, size: int, versions: dict, labels: dict, dim: int = 64) -> None:
    """An embeddings row per seeded model from its tree's expert (random unit vectors: search
    and merge costs do not depend on the values), then the indexes a nightly keeps."""
    import numpy as np
    import pyarrow as pa

    from storage.catalog import EMBEDDING_KEY, EMBEDDINGS, ROW_KEY, joined_key, with_hash
    from tasks.embed import embeddings_schema, ensure_indexes

    schema = with_hash(embeddings_schema(dim))
    rng = np.random.default_rng(0)
    table = None
    for start in range(0, size, BATCH):
        idx = range(start, min(size, start + BATCH))
        trees = [sim.repo_id(sim.tree(i)) for i in idx]
        vecs = rng.standard_normal((len(idx), dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        scores = [rng.random(len(labels[t])).astype(np.float32) for t in trees]
        top = [np.argsort(-sc)[:3] for sc in scores]
        batch = pa.table({
            "repo_id": [sim.repo_id(i) for i in idx], "sha": [sim.sha(i) for i in idx],
            "expert_version": [versions[t] for t in trees], "tree_id": trees,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), dim),
            "top_labels": [[labels[t][j] for j in tp] for t, tp in zip(trees, top)],
            "top_scores": [sc[tp].tolist() for sc, tp in zip(scores, top)],
            "label_scores": [sc.tolist() for sc in scores], "task": ["multilabel"] * len(idx),
            "probe_factor": pa.nulls(len(idx), pa.list_(pa.float32())),
            "row_hash": pa.nulls(len(idx), pa.string()),  # a merge treats a missing hash as changed
        }, schema=schema)
        batch = batch.append_column(ROW_KEY, joined_key(batch, EMBEDDING_KEY))
        if table is None:
            table = cat.db.create_table(EMBEDDINGS, batch)
        else:
            table.add(batch)
    cat.ensure_scalar_indexes(EMBEDDINGS)
    ensure_indexes(table)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _sent(endpoint: str) -> dict[str, int]:
    """Requests the simulated Hub has answered per endpoint class (429s included): its control
    route, which it does not count."""
    with urllib.request.urlopen(f"{endpoint}/_sim/stats", timeout=10) as resp:
        counts = json.load(resp)["counts"]
    return {route: counts[route]["served"] + counts[route]["refused"] for route in ROUTES}


def nightly(home: Path, endpoint: str) -> dict:
    """One nightly as the ingest flow runs it, timed per stage, in this process."""
    from probex_core.settings import Settings, apply_runtime_env
    from storage.catalog import Catalog
    from storage.http import HubRequests
    from storage.sources import open_source
    from tasks.crawl import crawl_source
    from tasks.embed import embed_trees
    from tasks.extract import run_extraction
    from tasks.pipeline import plan_extraction

    s = Settings.load(home)
    apply_runtime_env(s)
    stages, rss, sent = {}, {"start_mb": _vm("VmRSS") / 1024}, {}
    cat = Catalog(s.catalog, create=False)
    source = open_source(f"hub:{endpoint}")
    since = cat.watermark(source.name)

    def stage(name: str, fn):
        before, t0 = _sent(endpoint), time.perf_counter()
        out = fn()
        stages[name] = time.perf_counter() - t0
        after = _sent(endpoint)
        sent[name] = {route: after[route] - before[route] for route in ROUTES}
        rss[f"after_{name}_mb"] = _vm("VmHWM") / 1024
        return out

    crawl = stage("crawl", lambda: crawl_source(source, cat, since=since, advance_watermark=False))
    jobs, _ = stage("plan", lambda: plan_extraction(s, mode="auto", since=since))
    extract = stage("extract", lambda: run_extraction(jobs, n_workers=2))
    embed = stage("embed", lambda: embed_trees(cat, s.shards, str(s.experts), since=since))
    if crawl.next_watermark:
        cat.set_watermark(source.name, datetime.fromisoformat(crawl.next_watermark))
    rss["peak_mb"] = _vm("VmHWM") / 1024
    extract_hub = HubRequests()
    for r in extract.results:
        extract_hub.add(r.hub)
    return {"stages": stages, "seconds": sum(stages.values()), "rss": rss, "new": crawl.new,
            "extracted": extract.extracted, "planned": extract.models, "embedded": embed.new + embed.changed,
            "trees_touched": len(embed.trees), "sent_by_stage": sent,
            "hub": {"crawl": crawl.hub.to_dict(), "extract": extract_hub.to_dict()},
            "extract_worker_s": sum(r.seconds for r in extract.results), "extract_workers": extract.workers,
            "bytes_read": extract.bytes_read, "bytes_needed": extract.bytes_needed,
            "bytes_in_files": extract.bytes_in_files}


def run_nightly(home: Path, endpoint: str) -> dict:
    """A nightly in a fresh process (its peak memory is its own)."""
    res = subprocess.run([sys.executable, __file__, "nightly", str(home), endpoint], capture_output=True,
                         text=True, cwd=ROOT, timeout=3600)
    if res.returncode:
        raise RuntimeError(f"nightly failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench(bench_dir: Path, sizes=(10_000, 100_000, 1_000_000), new: int = NEW, log=print) -> dict:
    out = {"trees": TREES, "new": new, "sizes": {}}
    for size in sizes:
        home = bench_dir / f"scale-{size}"
        with hub_for(size) as hub:
            seeded = seed(home, hub, size)
            log(f"[bench] scale {size}: seeded {seeded}")
            hub.add_new(new)
            hub.reset_counts()
            night = run_nightly(home, hub.url)
            night["requests"] = hub.counts
        night["seed"] = seeded
        out["sizes"][str(size)] = night
        log(f"[bench] scale {size}: nightly {night['seconds']:.1f} s, peak {night['rss']['peak_mb']:.0f} MB")
        if size != min(sizes):
            shutil.rmtree(home, ignore_errors=True)  # the smallest stays for the disk check
    out["listing"] = listing_throughput(log=log)
    small, large = str(min(sizes)), str(max(sizes))
    out["time_ratio"] = out["sizes"][large]["seconds"] / out["sizes"][small]["seconds"]
    out["memory_ratio"] = out["sizes"][large]["rss"]["peak_mb"] / out["sizes"][small]["rss"]["peak_mb"]
    return out


def disk_over_runs(bench_dir: Path, size: int = 10_000, runs: int = 30, new: int = 10, log=print) -> dict:
    """The catalog's disk use over `runs` nightlies of `new` repos, each followed by maintenance
    (keep 0 days: every run's versions older than the run are removed, as a 14-day rule does to a
    catalog older than 14 days; the newest 7 embed tags stay). Few new repos a run (0.1% of the
    catalog), so growth beyond the data's is what maintenance leaves behind."""
    from probex_core.settings import Settings
    from storage.catalog import Catalog

    home = bench_dir / "scale-disk"
    sizes = []
    with hub_for(size) as hub:
        seed(home, hub, size)
        for run in range(runs):
            hub.add_new(new)
            run_nightly(home, hub.url)
            Catalog(Settings.load(home).catalog).maintain(keep_days=0, keep_tags=7)
            sizes.append(folder_bytes(home / "catalog"))
            log(f"[bench] scale disk run {run + 1}: {sizes[-1] / 2**20:.1f} MiB")
    shutil.rmtree(home, ignore_errors=True)
    return {"size": size, "runs": runs, "new_per_run": new, "bytes": sizes, "ratio_last_to_first": sizes[-1] / sizes[0],
            "measured": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def listing_throughput(repos: int = 100_000, listed: int = 5_000, workers=(1, 8), log=print) -> dict:
    """Repos per second that HubSource.list_models yields, not rate-limited, and the requests it
    sends per repo (the server's counts). The simulated Hub runs in its own process (in this one
    its handlers would share our GIL): what a crawler against a remote Hub sees, minus the network.
    Also the listing pages alone, and the model-info-per-repo pattern (file_sizes=True)."""
    from huggingface_hub import HfApi

    from storage.http import HttpClient
    from storage.sources import HubSource
    from storage.sources.hub import LISTING_EXPAND

    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "hubserver.py"), "--repos", str(repos)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        endpoint = json.loads(proc.stdout.readline())["url"]
        http = HttpClient(limiter=None)  # not rate-limited: what our own code costs

        def measure(name: str, run) -> dict:
            run(50)  # warm: connections, imports
            before, t0 = _sent(endpoint), time.perf_counter()
            n = run(listed)
            seconds = time.perf_counter() - t0
            after = _sent(endpoint)
            per_repo = {route: (after[route] - before[route]) / n for route in ROUTES}
            out = {"repos": n, "seconds": seconds, "repos_per_s": n / seconds, "requests_per_repo": per_repo}
            log(f"[bench] listing {name}: {n / seconds:,.0f} repos/s, requests per repo {per_repo}")
            return out

        def records(**kw):
            return lambda n: len(list(HubSource(endpoint=endpoint, token=False, http=http, **kw).list_models(limit=n)))

        out = {"server_repos": repos, "measured": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "cores": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}
        api = HfApi(endpoint=endpoint, token=False)  # the pages alone, as huggingface_hub reads them
        out["pages_only"] = measure("pages only", lambda n: sum(1 for _ in api.list_models(
            sort="last_modified", expand=LISTING_EXPAND, limit=n)))
        for w in workers:
            out[f"records_workers_{w}"] = measure(f"records, {w} readers", records(workers=w))
        out["records_model_info_workers_1"] = measure("records with model info, 1 reader",
                                                      records(workers=1, file_sizes=True))
        out["records_model_info_workers_8"] = measure("records with model info, 8 readers",
                                                      records(workers=8, file_sizes=True))
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def costs(bench_dir: Path = BENCH, size: int = 10_000, new: int = NEW, log=print) -> dict:
    """The per-model costs the projection needs: one nightly of `new` repos into the smallest
    catalog (costs per new model do not depend on the catalog's size: the scale section shows
    the requests are the same at 10k, 100k and 1M), and the listing throughput."""
    from benchmark import machine

    home = bench_dir / f"scale-{size}"
    with hub_for(size) as hub:
        seed(home, hub, size)
        hub.add_new(new)
        hub.reset_counts()
        night = run_nightly(home, hub.url)
        night["requests"] = hub.counts
    shutil.rmtree(home, ignore_errors=True)
    log(f"[bench] costs: nightly of {new} into {size:,} rows: {night['seconds']:.1f} s, "
        f"sent by stage {night['sent_by_stage']}")
    return {"machine": machine(), "size": size, "trees": TREES, "layer": LAYER, "nightly": night,
            "listing": listing_throughput(log=log)}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "nightly":
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        print(json.dumps(nightly(Path(sys.argv[2]), sys.argv[3])))
    elif sys.argv[1:] == ["costs"]:
        BENCH.mkdir(parents=True, exist_ok=True)
        doc = costs(log=lambda m: print(m, file=sys.stderr))
        (BENCH / "hub_costs.json").write_text(json.dumps(doc, indent=2, default=str))
        print(BENCH / "hub_costs.json")
    elif sys.argv[1:] == ["listing"]:
        print(json.dumps(listing_throughput(log=lambda m: print(m, file=sys.stderr)), indent=2))
    else:
        sys.exit(__doc__)
