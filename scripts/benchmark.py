"""The benchmark report: measures every target the issues name and writes docs/benchmarks.md.

    .venv/bin/python scripts/benchmark.py                 # all sections on the small lake
    .venv/bin/python scripts/benchmark.py crawl extract   # only some sections
    .venv/bin/python scripts/benchmark.py lake --sizes tiny small full

Each section stores its measurements in docs/bench/<section>.json (with date and machine), and the
report is re-rendered from every stored section, so sections can be re-measured one at a time.
Work folders live under $PROBEX_BENCH_DIR (default /tmp/probex-bench); lakes there are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "scripts")]
BENCH = Path(os.environ.get("PROBEX_BENCH_DIR", "/tmp/probex-bench"))
STORE = ROOT / "docs" / "bench"
REPORT = ROOT / "docs" / "benchmarks.md"


def machine() -> dict:
    gpu = None
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        pass
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cores": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "gpu": gpu or "none",
            "python": platform.python_version()}


def save(section: str, doc: dict) -> None:
    STORE.mkdir(parents=True, exist_ok=True)
    doc = {"machine": machine(), **doc}
    (STORE / f"{section}.json").write_text(json.dumps(doc, indent=2, default=str))
    print(f"[bench] {section}: saved", file=sys.stderr)


def lake_path(size: str) -> Path:
    return BENCH / f"lake_{size}"


def ensure_lake(size: str) -> Path:
    from zoo.build import build_lake, lake_is_complete

    out = lake_path(size)
    if not lake_is_complete(out):
        build_lake(out, size, seed=0, progress=True)
    return out


def fresh_home(name: str, size: str = "small"):
    from probex_core.settings import Settings, apply_runtime_env

    home = BENCH / name
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    os.symlink(ensure_lake(size), home / "lake")
    s = Settings.load(home)
    apply_runtime_env(s)
    return s


# --- sections ---------------------------------------------------------------------------------

def bench_lake(sizes: list[str], reuse: bool = False) -> None:
    """Build each size from scratch and record it; with `reuse`, record a finished lake already in
    the bench folder as its manifest describes it (the full lake builds for about an hour)."""
    from zoo.build import build_lake, folder_bytes

    doc = json.loads((STORE / "lake.json").read_text()) if (STORE / "lake.json").exists() else {}
    doc.pop("machine", None)
    for size in sizes:
        out = lake_path(size)
        manifest = json.loads((out / "_lake.json").read_text()) if (out / "_lake.json").exists() else {}
        if reuse and manifest.get("finished") and "seconds" in manifest:
            trees = manifest["trees"]
            summary = {"seconds": manifest["seconds"], "bytes_on_disk": folder_bytes(out), "n_models": manifest["n_models"],
                       "n_finetuned": sum(t["n_models"] for t in trees), "trees": trees,
                       "resumed": manifest.get("resumed", False)}
            measured = datetime.fromtimestamp((out / "_lake.json").stat().st_mtime, timezone.utc)
            note = manifest.get("seconds_note") or "finished lake recorded"
            doc[size] = {**summary, "measured": measured.strftime("%Y-%m-%d %H:%M UTC") + f" ({note})"}
            continue
        shutil.rmtree(out, ignore_errors=True)
        summary = build_lake(out, size, seed=0, progress=True).to_dict()
        doc[size] = {"seconds": summary["seconds"], "bytes_on_disk": summary["bytes_on_disk"],
                     "n_models": summary["n_models"], "n_finetuned": summary.get("n_finetuned"),
                     "trees": summary["trees"], "measured": machine()["date"]}
    doc["families"] = _families_build()
    save("lake", doc)


def _families_build() -> dict:
    """The two synthetic trees at real Hub layouts (zoo/families.py) that tiny, small and full add
    after their trained trees: their own build cost, into an empty folder."""
    from zoo.build import folder_bytes
    from zoo.families import build_families

    out = BENCH / "families"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    plans = build_families(out, seed=0)
    seconds = time.perf_counter() - t0
    doc = {"seconds": round(seconds, 2), "bytes_on_disk": folder_bytes(out), "measured": machine()["date"],
           "trees": [{"root": p.root, "repos": 1 + len(p.children),
                      "formats": sorted({c.format for c in p.children})} for p in plans]}
    shutil.rmtree(out, ignore_errors=True)
    return doc


def bench_crawl() -> None:
    import pyarrow.parquet as pq

    from hubserver import HubServer
    from storage.catalog import MODELS, Catalog
    from storage.sources import HubSource, LocalSource
    from tasks.crawl import crawl_source

    lake = ensure_lake("small")
    out = {}
    cat = Catalog(str(BENCH / "crawl" / "local"))
    shutil.rmtree(cat.uri, ignore_errors=True)
    cat = Catalog(str(BENCH / "crawl" / "local"))
    first = crawl_source(LocalSource(lake), cat)
    second = crawl_source(LocalSource(lake), cat)  # as a user re-runs it: from the watermark
    out["local"] = {"models": first.seen, "seconds": first.seconds, "models_per_s": first.seen / first.seconds,
                    "second_run_seconds": second.seconds, "second_run_new_changed": second.new + second.changed,
                    "second_over_first": second.seconds / first.seconds}
    with HubServer(lake, page_size=100) as hub:
        rcat_dir = BENCH / "crawl" / "hub"
        shutil.rmtree(rcat_dir, ignore_errors=True)
        rcat = Catalog(str(rcat_dir))
        t0 = time.perf_counter()
        r = crawl_source(HubSource(endpoint=hub.url, token=None), rcat)
        out["hub"] = {"models": r.seen, "seconds": time.perf_counter() - t0,
                      "models_per_s": r.seen / (time.perf_counter() - t0),
                      "requests": len(hub.traffic.hits) if hasattr(hub.traffic, "hits") else None}
    # Routing, against the ground truth.
    gt = {g["repo_id"]: g for g in pq.read_table(lake / "_ground_truth.parquet").to_pylist()}
    rows = {m["repo_id"]: m for m in cat.read(MODELS).to_pylist()}
    undeclared = [r for r, g in gt.items() if not g["lineage_declared"] and g["root"]]
    outsiders = [r for r, g in gt.items() if g["root"] is None]
    right = sum(rows[r]["tree_id"] == gt[r]["root"] for r in undeclared)
    forced = sum(rows[r]["tree_id"] is not None for r in outsiders)
    own, other = [], []
    for r in undeclared + outsiders:
        d = json.loads(rows[r]["route_distances"] or "{}")
        for tree, dist in d.items():
            if dist is None:
                continue
            (own if gt[r]["root"] == tree else other).append(dist)
    declared = [r for r, g in gt.items() if g["lineage_declared"] and g["root"]]
    out["lineage"] = {"declared": len(declared),
                      "declared_in_true_tree": sum(rows[r]["tree_id"] == gt[r]["root"] for r in declared)}
    out["routing"] = {"undeclared": len(undeclared), "routed_correctly": right,
                      "accuracy": right / len(undeclared) if undeclared else None,
                      "outsiders": len(outsiders), "outsiders_forced_into_a_tree": forced,
                      "max_in_tree_distance": max(own) if own else None,
                      "min_other_tree_distance": min(other) if other else None}
    save("crawl", out)


def _extract_once(workers: int) -> dict:
    """Extraction of every candidate layer from a fresh catalog and empty shards (same jobs), on a
    standing LocalCluster of `workers` processes reached by address, as with PROBEX_DASK_ADDRESS.
    Its workers have imported the extraction code first: the ratio measures extraction, not the
    ~1-2 s a worker process takes to start (reported apart as `cluster_start_s`)."""
    from dataclasses import replace

    from distributed import Client

    from tasks.dask_cluster import local_cluster
    from tasks.pipeline import crawl_step, extract_step

    s = fresh_home(f"extract-{workers}")
    crawl_step(s, str(s.lake))
    t0 = time.perf_counter()
    with local_cluster(workers) as cluster, Client(cluster) as client:
        client.run(lambda: __import__("storage.extract"))
        started = time.perf_counter() - t0
        doc = extract_step(replace(s, dask_workers=workers, dask_address=cluster.scheduler_address),
                           mode="candidates")
    doc["cluster_start_s"] = started
    return doc


def bench_extract(pairs: int = 3) -> None:
    """1 then 2 workers, `pairs` times in a row: the machine is shared, so single ratios swing
    (1.50x and 1.83x were seen an hour apart); the report gives each pair and the median."""
    import statistics

    runs = [(_extract_once(1), _extract_once(2)) for _ in range(pairs)]
    ratios = [one["seconds"] / two["seconds"] for one, two in runs]
    cold = [(one["seconds"] + one["cluster_start_s"]) / (two["seconds"] + two["cluster_start_s"]) for one, two in runs]
    one, two = runs[ratios.index(statistics.median(ratios))]  # the median pair's details
    s = fresh_home("extract")
    out = {"one_worker": _strip(one), "two_workers": _strip(two),
           "speedup_2_over_1": statistics.median(ratios), "speedup_pairs": ratios,
           "speedup_2_over_1_with_cluster_start": statistics.median(cold),
           "read_over_needed": two["bytes_read"] / two["bytes_needed"],
           "bound_holds": two["bytes_read"] <= 1.1 * two["bytes_needed"] + 64 * 1024 * two["models"]}
    out["http"] = _extract_http(s)
    out["peak_memory"] = _peak_memory()
    save("extract", out)


def _strip(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k not in ("layers",)} | {"quarantined": [q["repo_id"] for q in doc["quarantined"]]}


def _extract_http(s) -> dict:
    """The same extraction through the Hub test server: bytes_read vs the server's own counter."""
    from hubserver import HubServer
    from storage.catalog import MODELS, Catalog
    from storage.sources import HubSource
    from tasks.extract import jobs_for_tree, run_extraction
    from tasks.pipeline import candidate_shapes

    with HubServer(s.lake, page_size=100) as hub:
        src = HubSource(endpoint=hub.url, token=None)
        home = BENCH / "extract-http"
        shutil.rmtree(home, ignore_errors=True)
        cat = Catalog(str(home / "catalog"))
        from tasks.crawl import crawl_source

        crawl_source(src, cat)
        models = [m for m in cat.read(MODELS).to_pylist() if m["status"] != "superseded"]
        jobs = []
        for t in cat.read("trees").to_pylist():
            shapes = candidate_shapes(cat, src, models, t)
            jobs += jobs_for_tree(src, models, t["tree_id"], shapes, str(home / "shards"))
        served_before = hub.traffic.total_bytes
        summary = run_extraction(jobs, n_workers=2).to_dict()
        served = hub.traffic.total_bytes - served_before
    return {"models": summary["models"], "bytes_read": summary["bytes_read"], "bytes_needed": summary["bytes_needed"],
            "bytes_in_files": summary["bytes_in_files"], "server_bytes_served": served,
            "read_over_needed": summary["bytes_read"] / summary["bytes_needed"],
            "bound_holds": summary["bytes_read"] <= 1.1 * summary["bytes_needed"] + 64 * 1024 * summary["models"],
            "seconds": summary["seconds"]}


def _sparse_checkpoint(folder: Path, shape: tuple[int, int], dtype: str, file_gib: float) -> dict:
    """A safetensors file of `file_gib` GiB that is a hole except one real `shape` tensor of
    `dtype` (F32 or BF16) at its end: `layer.weight`, after a filler tensor that is never read."""
    import ml_dtypes
    import numpy as np
    from bench_formats import DTYPE_BYTES, sparse_safetensors

    np_dtype = {"F32": np.float32, "BF16": ml_dtypes.bfloat16}[dtype]
    values = np.random.default_rng(0).standard_normal(shape).astype(np.float32).astype(np_dtype)
    filler = int(file_gib * 2**30) // DTYPE_BYTES[dtype]
    folder.mkdir(parents=True, exist_ok=True)
    sparse_safetensors(folder / "model.safetensors", {"filler": [filler], "layer.weight": list(shape)},
                       {"layer.weight": values.tobytes()}, dtype)
    return {"file_bytes": (folder / "model.safetensors").stat().st_size, "tensor_bytes": values.nbytes,
            "float32_bytes": values.size * 4, "shape": list(shape), "dtype": dtype}


def _peak_memory(shape: tuple[int, int] = (1024, 1024), dtype: str = "F32", file_gib: float = 4) -> dict:
    """Peak RSS of a fresh process extracting one `shape` tensor of `dtype` from a `file_gib` GiB
    sparse safetensors file (written here, so the child's peak is the extraction's alone), against
    the limit of 4x the tensor's float32 size + 300 MB."""
    import tempfile

    code = r"""
import json, os, sys
def vm(key):  # kB from /proc/self/status; VmHWM (peak RSS) starts afresh at exec, unlike ru_maxrss
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
from storage.extract import ExtractJob, extract_model
from storage.sources import LocalOpener
d = sys.argv[1]
before = vm("VmRSS")
job = ExtractJob(LocalOpener("x/y", "0" * 40, d), "x/root", ("model.safetensors",),
                 ("layer.weight",), os.path.join(d, "shards"))
r = extract_model(job)
after = vm("VmHWM")
print(json.dumps({"status": r.status, "bytes_read": r.bytes_read, "rss_before_mb": before / 1024,
                  "peak_rss_mb": after / 1024}))
"""
    BENCH.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="peak-", dir=BENCH) as d:
        doc = _sparse_checkpoint(Path(d), shape, dtype, file_gib)
        res = subprocess.run([sys.executable, "-c", code, d], capture_output=True, text=True, cwd=ROOT, check=True)
    doc.update(json.loads(res.stdout.strip().splitlines()[-1]))
    doc["limit_mb"] = doc["float32_bytes"] * 4 / 2**20 + 300
    doc["growth_mb"] = doc["peak_rss_mb"] - doc["rss_before_mb"]
    doc["growth_within_limit"] = doc["growth_mb"] <= doc["limit_mb"]
    return doc


def bench_train(size: str = "small", sweep: bool = True, baselines: bool = True) -> None:
    """crawl -> extract every candidate layer -> train (ours, and the paper's sweep to compare) ->
    embed -> evaluate (with the Dense/StatNN baselines and the cross-tree model), on a fresh home
    over the `size` lake. The full lake runs without the sweep and baselines by default: Dense alone
    would take tens of minutes on 600 text children (`train_full_baselines` runs them)."""
    from tasks.pipeline import crawl_step, embed_step, eval_step, extract_step, train_step

    name = "train" if size == "small" else f"train_{size}"
    s = fresh_home(name, size)
    stages: dict[str, float] = {}

    def timed(stage: str, fn):
        t0 = time.perf_counter()
        out = fn()
        stages[stage] = time.perf_counter() - t0
        return out

    def crawl_and_extract():
        crawl_step(s, str(s.lake))
        return extract_step(s, mode="candidates")

    extract = timed("crawl_extract", crawl_and_extract)
    trained = timed("train", lambda: train_step(s, strategies=("sweep", "fast") if sweep else ("fast",)))
    timed("embed", lambda: embed_step(s))
    evaluated = timed("eval", lambda: eval_step(s, baselines=baselines, cross=baselines))
    save(name, {"size": size, "models": extract["models"], "stages": stages, "baselines": baselines,
                "sweep": sweep, "train": trained, "eval": evaluated})


def bench_seeds(seeds: int = 5) -> None:
    """How much of the ProbeX / Dense / StatNN gap on each multi-label tree is the seed: each method
    trained `seeds` times (seeds 0..n-1, same splits, layer and protocol as `probex train`/`eval`,
    refit included) on the `train` section's home; test accuracy and mAP per seed. The test splits
    are small (tens of models x 10 classes), so one (model, class) entry moves accuracy by about 0.005."""
    import dataclasses

    from probex_core.baselines import train_dense, train_statnn
    from probex_core.heads import MULTILABEL
    from probex_core.train import evaluate, probex_trainer, train_final
    from probex_core.settings import Settings
    from tasks.evaluate import load_ground_truth, tree_splits
    from tasks.pipeline import catalog_for, tree_ids
    from tasks.train import default_train_config, model_kwargs

    s = Settings.load(BENCH / "train")
    catalog = catalog_for(s, create=False)
    gt = load_ground_truth(s.lake)
    out = {"seeds": seeds, "trees": {}}
    for tree in tree_ids(catalog):
        sp = tree_splits(catalog, s.shards, str(s.experts), tree, gt)
        if sp is None or sp.head is not MULTILABEL:
            continue
        base = default_train_config(sp.train.is_lora, "cpu")
        trainers = {"probex": (probex_trainer(model_kwargs(MULTILABEL, None)), base),
                    "dense": (lambda a, b, c: train_dense(a, b, c, head=MULTILABEL), dataclasses.replace(base, time_limit_s=None)),
                    "statnn": (lambda a, b, c: train_statnn(a, b, c, head=MULTILABEL), dataclasses.replace(base, time_limit_s=None))}
        per = {}
        for name, (trainer, tcfg) in trainers.items():
            runs = []
            for seed in range(seeds):
                tc = dataclasses.replace(tcfg, seed=seed)
                res = train_final(trainer, sp.train, sp.val, tc, MULTILABEL)
                m = evaluate(res.model, sp.test, MULTILABEL)
                runs.append({"seed": seed, "accuracy": m["accuracy"], "map": m["map"], "seconds": res.seconds})
                print(f"[bench] seeds {tree} {name} {runs[-1]}", file=sys.stderr)
            per[name] = runs
        out["trees"][tree] = {"layer": sp.train.layer, "n_train": len(sp.train), "n_val": len(sp.val),
                              "n_test": len(sp.test), "runs": per}
    save("seeds", out)


def bench_query() -> None:
    import pyarrow.parquet as pq

    from storage.query import CatalogQuery
    from tasks.evaluate import retrieval

    home = BENCH / "train"  # the catalog bench_train built
    q = CatalogQuery(str(home / "catalog"), str(home / "experts"))
    gt = {g["repo_id"]: g for g in pq.read_table(home / "lake" / "_ground_truth.parquet").to_pylist()}
    holdout = sorted({c for g in gt.values() if g["split"] == "holdout" for c in g["classes"]})
    trained = sorted({c for g in gt.values() if g["split"] in ("train", "val", "test") and g["root"]
                      for c in g["classes"]})
    out = {"holdout": retrieval(q, gt, holdout), "training": retrieval(q, gt, trained)}
    out["latency"] = _latency()
    save("query", out)


def _latency(n: int = 100_000, dim: int = 64, runs: int = 50) -> dict:
    """search() at scale: synthetic rows in one tree beside the real experts' trees."""
    import numpy as np

    from probex_core.heads import TEXT
    from storage.catalog import KEY_SEPARATOR
    from storage.query import CANDIDATES_PER_TREE, CatalogQuery
    from tasks.embed import ensure_indexes

    src = BENCH / "train"
    home = BENCH / "latency"
    shutil.rmtree(home, ignore_errors=True)
    shutil.copytree(src / "catalog", home / "catalog")
    q = CatalogQuery(str(home / "catalog"), str(src / "experts"))
    tree = next(t for t in q.trees().values() if t.head is TEXT)
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    import pyarrow as pa

    table = q.catalog.table("embeddings")
    k = len(tree.labels)
    factors = None  # the text probe's factor per row, when the expert fuses one (read per candidate)
    if tree.probe:
        cfg = tree.expert.probex_config
        size = cfg.probe_rank * cfg.d_W
        factors = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * size),
                                           pa.array(rng.standard_normal(n * size).astype(np.float32) / size ** 0.5))
    batch = pa.table({
        "repo_id": [f"synthetic/m{i}" for i in range(n)], "sha": ["0" * 40] * n,
        "expert_version": [tree.version] * n, "tree_id": [tree.tree_id] * n,
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), dim),
        "top_labels": [[tree.labels[0]]] * n, "top_scores": [[0.5]] * n,
        "label_scores": [[1.0 / k] * k] * n, "task": [TEXT.name] * n,
        "probe_factor": factors if factors is not None else pa.nulls(n, pa.list_(pa.float32())),
        "row_hash": pa.nulls(n, pa.string()),  # a merge treats a missing hash as changed
        "row_key": [KEY_SEPARATOR.join((f"synthetic/m{i}", "0" * 40, tree.version)) for i in range(n)],
    }, schema=table.schema)
    table.add(batch)
    t0 = time.perf_counter()
    ensure_indexes(table)
    index_s = time.perf_counter() - t0
    q._table = None
    q.search("warm up", k=10)
    total, vector, ids = [], [], []
    words = ["bird", "dog", "vehicle", "fruit", "tool", "fish", "tree", "music", "disease", "building"]
    for i in range(runs):
        t0 = time.perf_counter()
        q.search(words[i % len(words)], k=10)
        total.append(time.perf_counter() - t0)
        t0 = time.perf_counter()  # the call search() makes per text-head tree
        q.nearest(vecs[i], tree.tree_id, tree.version, CANDIDATES_PER_TREE,
                  ["repo_id", "sha", "top_labels", "vector"] + (["probe_factor"] if tree.probe else []))
        vector.append(time.perf_counter() - t0)
        t0 = time.perf_counter()  # the ten nearest ids alone
        q.nearest(vecs[i], tree.tree_id, tree.version, 10, ["repo_id"])
        ids.append(time.perf_counter() - t0)
    return {"rows": q.table.count_rows(), "index_build_s": index_s,
            "search_p50_ms": 1000 * float(np.median(total)), "search_p95_ms": 1000 * float(np.percentile(total, 95)),
            "vector_p50_ms": 1000 * float(np.median(vector)), "vector_p95_ms": 1000 * float(np.percentile(vector, 95)),
            "vector_candidates": CANDIDATES_PER_TREE, "ids_top10_p50_ms": 1000 * float(np.median(ids))}


def bench_demo() -> None:
    """`probex demo` with the venv and the small lake present (the 5-minute target), then a second
    `probex ingest` with nothing new (the 15-second target)."""
    s = fresh_home("demo")
    env = {**os.environ, "PROBEX_HOME": str(s.home)}
    env.pop("PREFECT_API_URL", None)
    probex = str(Path(sys.executable).parent / "probex")
    t0 = time.perf_counter()
    res = subprocess.run([probex, "demo", "--json"], env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    doc = json.loads(res.stdout)
    t0 = time.perf_counter()
    again = subprocess.run([probex, "ingest", "--json"], env=env, capture_output=True, text=True, check=True)
    second = time.perf_counter() - t0
    ing = json.loads(again.stdout)
    save("demo", {"stages": doc["stages"], "wall_seconds": wall, "second_ingest_seconds": second,
                  "second_ingest_new_work": ing["crawl"]["new"] + ing["crawl"]["changed"] + ing["extract"]["extracted"],
                  "searches": [{k: v for k, v in x.items() if k != "hits"} for x in doc["searches"]],
                  "eval": doc["eval"]})


def bench_fresh_clone() -> None:
    """`make demo` in a fresh clone of this repository (no venv, no lake: set-up, the `small` lake
    build, then the demo) against the 15-minute target. About 15 minutes; run it alone."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="probex-fresh-") as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PROBEX_", "PREFECT_", "VIRTUAL_ENV"))}
        t0 = time.perf_counter()
        res = subprocess.run(["make", "demo"], cwd=clone, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    save("fresh_clone", {"seconds": wall, "returncode": res.returncode, "commit": commit,
                         "how": "git clone + make demo (scripts/benchmark.py fresh_clone)"})


def _best_of(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_micro() -> None:
    """Costs the tests used to time: ProbeX's factored LoRA path against the same rows formed
    densely (64 rows of 384x384 at rank 8), and the card parser on hostile cards (a billion-laughs
    YAML, 5,000 tags), which must be refused in well under a crawl's per-model budget."""
    import tempfile

    import torch

    from probex_core.data import LayerDataset, WeightBatch, WeightRow
    from probex_core.probex import ProbeX, ProbeXConfig
    from storage.sources import LocalSource

    torch.manual_seed(0)
    rows = [WeightRow(f"m{i}", A=torch.randn(8, 384), B=torch.randn(384, 8), scale=1.0) for i in range(64)]
    ds = LayerDataset.from_rows(rows, tree="t", layer="l")
    lora, dense = ds.batch(), WeightBatch(X=ds.batch().dense())
    m = ProbeX(ProbeXConfig(d_H=384, d_W=384, n_outputs=10))
    with torch.no_grad():
        t_lora, t_dense = _best_of(lambda: m(lora)), _best_of(lambda: m(dense))

    laughs = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    laughs += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 12)]
    cards = {"billion_laughs": "\n".join(laughs), "tags_5000": "tags:\n" + "".join(f"- t{i}\n" for i in range(5000))}
    parse = {}
    for name, front in cards.items():
        with tempfile.TemporaryDirectory() as tmp:
            repo = Path(tmp) / "a" / "b"
            repo.mkdir(parents=True)
            (repo / "README.md").write_text(f"---\n{front}\n---\n")
            (repo / "config.json").write_text("{}")
            recs = []
            seconds = _best_of(lambda: recs.append(list(LocalSource(tmp).list_models())), repeats=3)
            parse[name] = {"seconds": seconds, "status": str(recs[-1][0].status)}
    save("micro", {"factored_ms": t_lora * 1e3, "dense_ms": t_dense * 1e3, "factored_speedup": t_dense / t_lora,
                   "card_parse": parse})


def bench_scale() -> None:
    """Issue 18: a nightly of 1,000 new repos into catalogs of 10k, 100k and 1M rows (time and
    peak memory, each in a fresh process), the catalog's disk over 30 maintained nightlies, and
    search latency at 1M embedding rows (needs the `train` section's catalog)."""
    import bench_scale

    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    doc = bench_scale.bench(BENCH, log=log)
    save("scale", doc)
    doc["disk"] = bench_scale.disk_over_runs(BENCH, log=log)
    save("scale", doc)
    if (BENCH / "train").exists():
        doc["latency_1m"] = _latency(1_000_000)
        save("scale", doc)
    else:
        log("[bench] scale: no search latency (run the `train` section first)")


def bench_cluster() -> None:
    """Issue 19 on the `small` lake: ingest on a loopback S3 server vs local disk, and training as
    parallel tasks on 2 Dask workers vs one tree after another in one process."""
    import bench_cluster

    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    lake = ensure_lake("small")
    doc = {"object_store": bench_cluster.object_store(BENCH, lake, log=log)}
    save("cluster", doc)
    doc["training"] = bench_cluster.parallel_training(BENCH, log=log)
    save("cluster", doc)


def bench_compact() -> None:
    """Issue 18, item 4: one tree's layer of 100k models as small files, then compacted: files,
    DuckDB scan time and the compaction's seconds (`scripts/bench_compact.py`)."""
    import bench_compact

    doc = bench_compact.bench(BENCH, log=lambda m: print(m, file=sys.stderr))
    save("compact", doc)


def bench_formats() -> None:
    """Issue 17: every checkpoint, adapter and quantized format read against its reference, the
    bytes and requests of one layer over HTTP (`scripts/bench_formats.py`), and the peak memory of
    a 4096x4096 BF16 layer from a 16 GiB sparse checkpoint."""
    import bench_formats

    doc = bench_formats.bench(BENCH, log=lambda m: print(m, file=sys.stderr))
    doc["peak_memory"] = _peak_memory((4096, 4096), "BF16", 16)
    save("formats", doc)


SECTIONS = {"lake": None, "micro": bench_micro, "scale": bench_scale, "cluster": bench_cluster, "compact": bench_compact, "formats": bench_formats, "crawl": bench_crawl, "extract": bench_extract, "train": bench_train,
            "train_full": lambda: bench_train("full", sweep=False, baselines=False),
            "train_full_baselines": lambda: bench_train("full"), "seeds": bench_seeds, "query": bench_query, "demo": bench_demo, "fresh_clone": bench_fresh_clone}


# --- the report -------------------------------------------------------------------------------

def render() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    import report_render

    REPORT.write_text(report_render.render(STORE))
    print(f"[bench] wrote {REPORT}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sections", nargs="*", help=f"any of {', '.join(SECTIONS)} (default: all but lake)")
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"], help="lake sizes for the lake section")
    ap.add_argument("--reuse", action="store_true",
                    help="lake section: record finished lakes in the bench folder instead of rebuilding them")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    if not args.render_only:
        for name in args.sections or [s for s in SECTIONS if s not in ("lake", "fresh_clone", "train_full", "train_full_baselines", "scale", "cluster", "compact")]:
            if name == "lake":
                bench_lake(args.sizes, args.reuse)
            else:
                SECTIONS[name]()
    render()


if __name__ == "__main__":
    main()
