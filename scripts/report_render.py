"""Render docs/benchmarks.md from the stored measurements in docs/bench/*.json."""

from __future__ import annotations

import json
from pathlib import Path

from probex_core.heads import MULTILABEL, get_head


def _load(store: Path, name: str) -> dict | None:
    p = store / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _f(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _machine(doc: dict) -> str:
    m = doc.get("machine", {})
    return f"_Measured {m.get('date')} on {m.get('cores')} cores ({m.get('cpu')}), GPU: {m.get('gpu')}._"


def _table(cols: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_f(v) for v in r) + " |" for r in rows]
    return out


def lake(doc: dict) -> list[str]:
    lines = ["## Lake builds (issue 2)", _machine(doc), "",
             "Target: `tiny` < 60 s, `small` >= 300 fine-tuned models < 10 min, `full` >= 1,500.", ""]
    rows = []
    for size in ("tiny", "small", "full"):
        if size in doc:
            d = doc[size]
            rows.append([size, d["n_models"], d.get("n_finetuned"), d["seconds"], d["bytes_on_disk"] / 2**20,
                         d.get("measured")])
    lines += _table(["size", "repos", "fine-tuned", "build s", "disk MiB", "measured"], rows)
    lines += ["", "Child task accuracy on held-out data, per tree:", ""]
    rows = []
    for size in ("tiny", "small", "full"):
        for t in doc.get(size, {}).get("trees", []):
            rows.append([size, t["root"], t["kind"], get_head(t["task"]).title, t["n_models"], t["mean_accuracy"], t["min_accuracy"],
                         t.get("n_classes"), t.get("n_holdout_classes")])
    lines += _table(["size", "tree", "fine-tune", "task", "children", "mean acc", "min acc", "classes",
                     "held-out classes"], rows)
    fam = doc.get("families")
    if fam:
        lines += ["", f"The two synthetic trees at real Hub layouts (issue 17; in tiny, small and full, after the trained "
                  f"trees; no accuracy: their children are generated, not trained), built alone into an empty folder "
                  f"({fam['measured']}): {fam['seconds']} s, {fam['bytes_on_disk'] / 2**20:.1f} MiB. A size's row above "
                  f"measured before they were added (2026-12-03) was built without them.", ""]
        lines += _table(["tree", "repos", "child formats"],
                        [[t["root"], t["repos"], ", ".join(t["formats"])] for t in fam["trees"]])
    return lines


def crawl(doc: dict) -> list[str]:
    lo, hub, r, lin = doc["local"], doc["hub"], doc["routing"], doc["lineage"]
    lines = ["## Crawl and routing (issue 3, `small` lake)", _machine(doc), ""]
    lines += _table(["source", "models", "seconds", "models/s"],
                    [["LocalSource", lo["models"], lo["seconds"], lo["models_per_s"]],
                     ["HubSource via the loopback test server", hub["models"], hub["seconds"], hub["models_per_s"]]])
    lines += ["", f"Second crawl of the same folder: {_f(lo['second_run_seconds'])} s "
                  f"({_f(lo['second_over_first'])} of the first run; target < 0.2), "
                  f"{lo['second_run_new_changed']} rows new or changed (target 0).", "",
              f"Declared lineage in its true tree: {lin['declared_in_true_tree']}/{lin['declared']} (target 100%).", "",
              f"Routing by weights: {r['routed_correctly']}/{r['undeclared']} undeclared models in their true tree "
              f"(accuracy {_f(r['accuracy'])}; target >= 0.99); {r['outsiders_forced_into_a_tree']} of "
              f"{r['outsiders']} models from outside every tree forced into one (target 0).", "",
              f"Margin: the largest distance of a model to its own tree was {_f(r['max_in_tree_distance'])}, the "
              f"smallest to another tree {_f(r['min_other_tree_distance'])} (the router assigns at <= 0.5 with a "
              "0.25 gap to the runner-up)."]
    return lines


def extract(doc: dict) -> list[str]:
    one, two, http, mem = doc["one_worker"], doc["two_workers"], doc["http"], doc["peak_memory"]
    lines = ["## Extraction (issue 4, `small` lake, every candidate layer)", _machine(doc), ""]
    rows = [[name, d["models"], d["tensors"], d["seconds"], d["models_per_s"], d["mb_per_s"],
             d["bytes_read"] / d["bytes_needed"], d["bytes_ratio"]] for name, d in (("1 worker", one), ("2 workers", two))]
    lines += _table(["local, Dask", "models", "tensors", "seconds", "models/s", "MB/s", "read / needed",
                     "read / in files"], rows)
    cold = doc.get("speedup_2_over_1_with_cluster_start")
    pairs = doc.get("speedup_pairs")
    lines += ["", f"Speed-up 2 workers over 1, same run, on a standing cluster reached by address (workers "
              f"started and warm): **{_f(doc['speedup_2_over_1'], 2)}x** (target >= 1.6)"
              + (f", the median of {len(pairs)} back-to-back pairs ({', '.join(_f(p, 2) for p in pairs)}); "
                 "the table shows the median pair." if pairs else ".")
              + (f" Counting the start of the worker processes ({_f(one.get('cluster_start_s'), 1)} s and "
                 f"{_f(two.get('cluster_start_s'), 1)} s): {_f(cold, 2)}x." if cold else ""), "",
              f"Bound `bytes_read <= 1.1 * bytes_needed + 64 KiB per file`: local {_f(doc['bound_holds'])}, "
              f"HTTP {_f(http['bound_holds'])}.", "",
              f"Through the HTTP test server: read {http['bytes_read']} bytes, the server counted "
              f"{http['server_bytes_served']} bytes served (read / needed {_f(http['read_over_needed'], 5)}, "
              f"{http['models']} models in {_f(http['seconds'], 1)} s).", "",
              f"Peak memory: extracting one {mem['tensor_bytes'] / 2**20:.0f} MiB tensor from a "
              f"{mem['file_bytes'] / 2**30:.1f} GiB sparse file: peak RSS {_f(mem['peak_rss_mb'], 1)} MB "
              f"(growth during the read {_f(mem['growth_mb'], 1)} MB; limit tensor x 4 + 300 = "
              f"{_f(mem['limit_mb'], 0)} MB), bytes read {mem['bytes_read']}."]
    return lines


def _err(row: dict) -> str:
    """The error column: the largest difference from the reference, or the refusal."""
    if row["max_abs_error"] is None:
        return f"refused: {row['reason']}" if row.get("reason") else "not read"
    err = row["max_abs_error"]
    return ("0 (exact)" if err == 0 else f"{err:.2e}") + f" (values up to {row['ref_max_abs']:.3g})"


def formats(doc: dict) -> list[str]:
    table, http, mem = doc["table"], doc["http"], doc["peak_memory"]
    sh, one = http["sharded"], http["single_file"]
    lines = ["## Checkpoint and adapter formats (issue 17)", _machine(doc), "",
             "Each format is built at run time by the library that writes it (torch + safetensors, peft, "
             "transformers' FP8 quantizers; diffusers LoRA files by their documented key names, peft's "
             "state dict under `unet.`, as diffusers is not installed) and read as the product reads a "
             "child (`extract_model`: header, byte ranges, factors or dequantization, the shard row read "
             "back; a LoRA row's value is `scale * B @ A`). Target: values equal the reference within float "
             f"tolerance (max abs error <= {doc['rel_tol']:g} x max(1, max abs value)); a refusal names the "
             "format and why. Rerun: `scripts/benchmark.py formats` (`scripts/bench_formats.py`).", ""]
    lines += _table(["format", "reference", "max abs error", "status", "met"],
                    [[r["format"], r["reference"], _err(r).replace("|", "\\|"), r["status"], r["met"]] for r in table])
    lines += ["", f"{sum(r['met'] for r in table)} of {len(table)} formats met their target.", ""]
    lines += [f"Bytes over HTTP (loopback Hub server, `HubSource` opener + `extract_model`) for one "
              f"{sh['layer']} ({sh['layer_bytes'] / 2**20:.0f} MiB of BF16) from a {len(sh['shards'])}-shard checkpoint "
              f"of {sh['checkpoint_bytes'] / 1e9:.2f} GB (sparse: {sh['disk_bytes'] / 2**20:.0f} MiB on disk): "
              f"the reader counted {sh['bytes_read']:,} bytes, the server served {sh['server_bytes_served']:,}; "
              f"shards touched {', '.join(sh['shards_touched'])} (header {sh['header_bytes_touched']:,} bytes; the "
              f"index, {sh['index_bytes']:,} bytes, is read too). Target `1.1 x layer bytes + header bytes of each "
              f"shard touched` = {sh['bound_bytes']:,.0f} bytes: **{'met' if sh['bound_holds'] else 'not met'}** "
              f"({sh['server_bytes_served'] / sh['layer_bytes']:.4f}x the layer). Requests for that model: "
              f"{sh['requests_server']} (server count; the client counted {sh['requests_client']}); values equal "
              f"what was written: {_f(sh['values_equal'])}.", "",
              f"Requests per model for a single-file model ({one['file_bytes']:,} bytes; one "
              f"{'x'.join(map(str, one['layer_shape']))} {one['layer_dtype']} layer): "
              f"{one['requests_server']} served (client {one['requests_client']}), {one['server_bytes_served']:,} "
              f"bytes; target <= {one['target_requests']}: **{'met' if one['met'] else 'not met'}**.", "",
              f"Peak memory: a fresh process extracting one {mem['shape'][0]}x{mem['shape'][1]} {mem['dtype']} layer "
              f"({mem['tensor_bytes'] / 2**20:.0f} MiB stored, {mem['float32_bytes'] / 2**20:.0f} MiB as float32) from a "
              f"{mem['file_bytes'] / 2**30:.1f} GiB sparse checkpoint: peak RSS {_f(mem['peak_rss_mb'], 1)} MB, growth "
              f"during the read {_f(mem['growth_mb'], 1)} MB; target <= 4 x float32 size + 300 = "
              f"{_f(mem['limit_mb'], 0)} MB: **{'met' if mem['growth_within_limit'] else 'not met'}** "
              f"(status {mem['status']}, bytes read {mem['bytes_read']:,})."]
    return lines


def expert_targets(ev: dict, size: str) -> list[list]:
    """Issue 5's targets, each checked against this run's `probex eval --json`: [tree, target,
    measured, met]. Only what was run is checked (the full lake may lack the baselines)."""
    rows: list[list] = []

    def check(tree, target, measured, met):
        rows.append([tree, target, measured, met])

    def above(tree, metric, name, ours, theirs):
        met = "tie" if ours == theirs else ours > theirs  # e.g. both 1.000: nothing left to beat
        check(tree, f"{metric} above {name}", f"{_f(ours)} vs {_f(theirs)}", met)

    for t, r in ev["trees"].items():
        if "skipped" in r:
            continue
        p, d, st = r["probex"], r.get("dense"), r.get("statnn")
        if get_head(r["task"]) is MULTILABEL:
            check(t, "accuracy >= 0.85", p["accuracy"], p["accuracy"] >= 0.85)
            for name, b in (("Dense", d), ("StatNN", st)):
                if b:
                    above(t, "accuracy", name, p["accuracy"], b["accuracy"])
        else:
            n_cls, need_cls = r.get("n_classes"), 150 if size == "full" else 40
            check(t, f"top-1 >= 0.50 over >= {need_cls} training classes", f"{_f(p['top1'])} over {_f(n_cls)}",
                  "class count not recorded (older run)" if n_cls is None else p["top1"] >= 0.5 and n_cls >= need_cls)
            zs_need = 0.50 if size == "full" else 0.30
            check(t, f"zero-shot top-1 >= {zs_need:.2f} over >= 20 held-out classes",
                  f"{_f(p['zeroshot_top1'])} over {p['n_zeroshot_classes']}",
                  p["zeroshot_top1"] >= zs_need and p["n_zeroshot_classes"] >= 20)
            check(t, "zero-shot top-5 >= 0.60", p["zeroshot_top5"], p["zeroshot_top5"] >= 0.6)
            if d:
                above(t, "top-1", "Dense", p["top1"], d["top1"])
                above(t, "zero-shot top-1", "Dense", p["zeroshot_top1"], d["zeroshot_top1"])
        if d:
            check(t, "params <= 1/10 of Dense's", f"{p['params']} vs {d['params']}", p["params"] * 10 <= d["params"])
        check(t, "one expert trains in < 60 s (2 cores)", p["train_seconds"], p["train_seconds"] < 60)
    for t, c in (ev.get("cross_tree") or {}).get("trees", {}).items():
        above(t, "per-tree expert's accuracy", "the single cross-tree model's",
              c["expert"]["accuracy"], c["single"]["accuracy"])
    return rows


def train(doc: dict) -> list[str]:
    ev, tr = doc["eval"], doc["train"]
    size = doc.get("size", "small")
    lines = [f"## Experts (issue 5, `{size}` lake)", _machine(doc), ""]
    if doc.get("baselines") is False:
        lines += ["ProbeX only: Dense, StatNN, the cross-tree model and the paper's sweep were not run on this "
                  "lake (`scripts/benchmark.py train_full_baselines` runs them; Dense alone takes tens of minutes).", ""]
    if "stages" in doc:
        lines += [f"{doc['models']} models; stage seconds: " + ", ".join(
            f"{k.replace('_', ' + ')} {_f(v)}" for k, v in doc["stages"].items()) + ".", ""]
    lines += [
             "Test split = the tree's undocumented test models; zero-shot = models of held-out classes, "
             "scored only against the held-out class names. Multi-label accuracy is over every "
             "(model, class) entry at 0.5. probex_head_only: the same expert with its text probe "
             "off (the text head alone), to show what each part contributes.", ""]
    refit = [t for t, r in tr["trees"].items() if r.get("refit")]
    if not any("refit" in r for r in tr["trees"].values()):
        lines += ["Measured before the refit existed: every expert, Dense and StatNN here was trained on the "
                  "training rows alone, validation only choosing the epoch.", ""]
    if refit:
        lines += ["Multi-label trees (" + ", ".join(refit) + "): validation picks the epoch count, then the "
                  "expert is trained again from scratch on training + validation rows for that many epochs; "
                  "Dense and StatNN follow the same protocol. The text head keeps its validation rows "
                  "held out (they weigh its head against the text probe). `train s` counts both runs. "
                  "On multi-label trees with LoRA rows ProbeX also trains with weight-space mixup "
                  "(README, How an expert reads a model).", ""]
    rows = []
    for t, r in ev["trees"].items():
        if "skipped" in r:
            continue
        for m in ("probex", "probex_head_only", "dense", "statnn"):
            if m == "probex_head_only" and m not in r:
                continue
            d = r.get(m) or {}
            rows.append([t, get_head(r["task"]).title, r["layer"], m, r["n_train"], r["n_val"], r["n_test"], d.get("accuracy"),
                         d.get("map"), d.get("top1"), d.get("zeroshot_top1"), d.get("zeroshot_top5"),
                         d.get("n_zeroshot_classes"), d.get("params"), d.get("train_seconds")])
    lines += _table(["tree", "task", "layer", "method", "train", "val", "test", "accuracy", "mAP", "top1",
                     "zs top1", "zs top5", "zs classes", "params", "train s"], rows)
    lines += ["", f"### Issue 5's targets on this run (`{size}` lake, seed 0)", ""]
    if size != "small":
        lines += ["The targets are the `small` lake's unless the issue says otherwise (the text tree's "
                  ">= 150 classes, zero-shot top-1 >= 0.50 and above Dense); here the others are for comparison.", ""]
    lines += _table(["tree", "target", "measured", "met"], expert_targets(ev, size))
    ct = ev.get("cross_tree")
    if ct:
        lines += ["", f"### One model across trees vs one expert per tree ({ct['model']}, "
                      f"{ct['n_union_classes']} classes in the union)", ""]
        lines += _table(["tree", "single model acc", "single mAP", "per-tree expert acc", "expert mAP"],
                        [[t, v["single"]["accuracy"], v["single"]["map"], v["expert"]["accuracy"],
                          v["expert"]["map"]] for t, v in ct["trees"].items()])
    lines += ["", "### Layer choice: the paper's sweep vs short runs + full runs on the top 2", ""]
    rows = []
    for t, r in tr["trees"].items():
        lc = r.get("layer_choice") or {}
        sw, fa = lc.get("sweep", {}), lc.get("fast", {})
        rows.append([t, sw.get("layer"), sw.get("seconds"), fa.get("layer"), fa.get("seconds"),
                     r.get("train_seconds")])
    lines += _table(["tree", "sweep's layer", "sweep s", "fast layer", "fast s", "all runs s"], rows)
    return lines


def query(doc: dict) -> list[str]:
    h, t, lat = doc["holdout"], doc["training"], doc["latency"]
    lines = ["## Search (issue 6, `small` lake)", _machine(doc), "",
             "Each class name is the query, over all trees; a hit is a model trained on that class.", ""]
    lines += _table(["classes", "n", "hit rate@5", "precision@5", "mAP", "target hit rate@5"],
                    [["held-out (zero-shot)", h["n_classes"], h["hit_rate@5"], h["precision@5"], h["map"], ">= 0.60"],
                     ["training", t["n_classes"], t["hit_rate@5"], t["precision@5"], t["map"], ">= 0.90"]])
    lines += ["", f"Latency at {lat['rows']} rows (synthetic rows in one tree beside the real ones), IVF_PQ index "
                  f"built in {_f(lat['index_build_s'], 1)} s:", ""]
    lines += _table(["measure", "p50 ms", "p95 ms", "target p50"],
                    [["search() (encode + per-tree search + merge)", lat["search_p50_ms"], lat["search_p95_ms"], "< 50"],
                     [f"vector search alone ({lat.get('vector_candidates', 10)} candidates with their vectors, "
                      "as search() asks per tree)", lat["vector_p50_ms"], lat["vector_p95_ms"], "< 10"]]
                    + ([["vector search, the 10 nearest ids only", lat["ids_top10_p50_ms"], "", "< 10"]]
                       if "ids_top10_p50_ms" in lat else []))
    return lines


def demo(doc: dict) -> list[str]:
    lines = ["## Demo (issue 7)", _machine(doc), ""]
    lines += _table(["stage", "seconds"], [[k, v] for k, v in doc["stages"].items()])
    for k in ("wall_seconds", "second_ingest_seconds", "fresh_clone_seconds"):
        if k in doc:
            lines.append(f"\n{k.replace('_', ' ')}: {_f(doc[k], 1)}")
    return lines


def gpu(doc: dict) -> list[str]:
    out = ["## Training on CUDA", _machine(doc), ""]
    if "runs" not in doc:  # older record: the script's raw output
        return out + ["```", doc.get("log", "").strip(), "```"]
    out += [f"{doc['how']}; torch {doc['torch']}. The L6 tree has LoRA rows; dense 320x1152 is a synthetic multi-label tree of the image layer's shape, "
            "100 epochs. The first CUDA run includes CUDA's lazy loading of each kernel.", "",
            "| run | job | seconds | epochs | test top1 | zs top1 | zs top5 | val acc |", "|---|---|---|---|---|---|---|---|"]
    for run, jobs in doc["runs"].items():
        for job, r in jobs.items():
            out.append(f"| {run} | {job} | {r['seconds']:.2f} | {r['epochs']} | {_f(r.get('test_top1'))} | "
                       f"{_f(r.get('zeroshot_top1'))} | {_f(r.get('zeroshot_top5'))} | {_f(r.get('val_accuracy'))} |")
    return out


def fresh_clone(doc: dict) -> list[str]:
    return ["## Demo from a fresh clone (issue 7)", _machine(doc), "",
            f"{doc['how']} at commit {doc['commit']}: **{_f(doc['seconds'] / 60, 1)} min** "
            f"(exit code {doc['returncode']}; target < 15 min on 2 cores, venv and lake not yet made)."]


def seeds(doc: dict) -> list[str]:
    lines = [f"## Seed spread of the multi-label comparison (issue 5, `small` lake, {doc['seeds']} seeds)",
             _machine(doc), "",
             "Each method trained once per seed on the same splits, layer and protocol as the experts "
             "above (validation picks the epochs, then the refit on training + validation rows). "
             "One (model, class) entry moves test accuracy by 1 / (10 x test models).", ""]
    rows = []
    for t, r in doc["trees"].items():
        for m, runs in r["runs"].items():
            acc = [x["accuracy"] for x in runs]
            maps = [x["map"] for x in runs]
            rows.append([t, r["layer"], r["n_test"], m, sum(acc) / len(acc), min(acc), max(acc),
                         " ".join(f"{a:.3f}" for a in acc), sum(maps) / len(maps)])
    return lines + _table(["tree", "layer", "test models", "method", "mean acc", "min", "max",
                           "per seed (0, 1, ...)", "mean mAP"], rows)


def scale(doc: dict) -> list[str]:
    lines = ["## Scale (issue 18)", _machine(doc), "",
             f"A nightly that finds {doc['new']} new repos on the simulated Hub (`tests/hubserver.py`, "
             f"{doc['trees']} trees at every size) and crawls them over loopback HTTP, plans, extracts one "
             "8x8 layer of each on 2 Dask workers and embeds them, in a fresh process, into catalogs "
             "seeded with the rows, plans, experts (untrained) and embeddings a crawl of that many repos "
             "leaves (`scripts/bench_scale.py` says how). Targets: time and peak memory at 1M <= 1.5x "
             "those at 10k. Rerun: `scripts/benchmark.py scale` (about 20 minutes here; not in the "
             "default run).", ""]
    rows = []
    for size, d in doc["sizes"].items():
        st = d["stages"]
        rows.append([size, d["seconds"], st["crawl"], st["plan"], st["extract"], st["embed"], d["rss"]["peak_mb"],
                     d["new"], d["extracted"], d["embedded"], d["requests"]["info"]["served"] +
                     d["requests"]["list"]["served"] + d["requests"]["resolve"]["served"]])
    lines += _table(["catalog rows", "nightly s", "crawl s", "plan s", "extract s", "embed s", "peak MB",
                     "new", "extracted", "embedded", "requests"], rows)
    lines += ["", f"1M vs 10k: time {_f(doc['time_ratio'], 2)}x, peak memory {_f(doc['memory_ratio'], 2)}x "
                  "(targets <= 1.5x each).", ""]
    if "disk" in doc:
        dk = doc["disk"]
        lines += [f"Catalog disk over {dk['runs']} nightlies of {dk['new_per_run']} repos into the {dk['size']:,}-row "
                  f"catalog, `maintain` after each: {dk['bytes'][0] / 2**20:.1f} MiB after the first, "
                  f"{dk['bytes'][-1] / 2**20:.1f} MiB after the last ({_f(dk['ratio_last_to_first'], 2)}x; "
                  "target <= 1.2x)" + (f"; measured {dk['measured']}." if dk.get("measured") else "."), ""]
    if "latency_1m" in doc:
        lat = doc["latency_1m"]
        lines += [f"Search at {lat['rows']:,} embedding rows (IVF_PQ built in {_f(lat['index_build_s'], 1)} s):", ""]
        lines += _table(["measure", "p50 ms", "p95 ms", "target p50"],
                        [["search()", lat["search_p50_ms"], lat["search_p95_ms"], "< 50"],
                         ["vector search alone", lat["vector_p50_ms"], lat["vector_p95_ms"], "< 10"]])
    return lines


def cluster(doc: dict) -> list[str]:
    lines = ["## Object storage and a cluster (issue 19, `small` lake)", _machine(doc), "",
             "Ingest (crawl, extract on 2 Dask workers, embed) with shards, catalog and experts on a loopback "
             "S3 server (moto) against local disk; then every tree's expert trained from the same shards as "
             "parallel tasks on a 2-worker cluster against one after another in one process. Targets: S3 "
             "<= 2x local; parallel >= 1.5x faster. Rerun: `scripts/benchmark.py cluster`.", ""]
    st = doc["object_store"]
    lines += _table(["store", "ingest s", "crawl s", "extract s", "embed s", "models", "extracted"],
                    [[k, st[k]["seconds"], st[k]["crawl_s"], st[k]["extract_s"], st[k]["embed_s"], st[k]["models"],
                      st[k]["extracted"]] for k in ("local", "s3")])
    lines += ["", f"S3 / local: {_f(st['ratio'], 2)}x.", ""]
    if "training" in doc:
        tr = doc["training"]
        rows = []
        for t in tr["sequential"]["trees"]:
            a, b = tr["sequential"]["trees"][t], tr["cluster"]["trees"].get(t, {})
            va, vb = a.get("val") or {}, b.get("val") or {}
            metric = "accuracy" if "accuracy" in va else "top1"
            rows.append([t, a.get("layer"), b.get("layer"), va.get(metric), vb.get(metric), a.get("seconds"), b.get("seconds")])
        lines += _table(["tree", "layer (one process)", "layer (cluster)", "val (one process)", "val (cluster)",
                         "train s (one process)", "train s (cluster)"], rows)
        lines += ["", f"Wall seconds: one process {_f(tr['sequential']['seconds'], 1)}, cluster "
                      f"{_f(tr['cluster']['seconds'], 1)}: {_f(tr['speedup'], 2)}x.", ""]
    return lines


def compact(doc: dict) -> list[str]:
    side, n, new = doc["side"], doc["models"], doc["new"]
    b, a, an = doc["before"], doc["after"], doc["after_nightly"]
    c, nc = doc["compaction"], doc["nightly_compaction"]
    lines = ["## Shard compaction (issue 18)", _machine(doc), "",
             f"One tree's layer of {n:,} models ({side}x{side} float32 each) written as the small files "
             "extraction leaves, then compacted (`storage/compaction.py`); then a nightly's "
             f"{new:,} new models' files folded into it. The scan is DuckDB's `count(*), sum(len(X))` over "
             f"`read_parquet` of the layer folder, no project code, best of {doc['repeats']}. Targets: after "
             "compaction <= 1 file per run's worth of new rows plus one per compaction; the scan >= 5x faster "
             "at 100k models. Rerun: `scripts/benchmark.py compact` (not in the default run).", ""]
    lines += _table(["layer", "files", "MiB on disk", "DuckDB scan s", "rows"],
                    [["small files", b["files"], b["bytes"] / 2**20, b["scan_s"], b["rows"]],
                     ["compacted", a["files"], a["bytes"] / 2**20, a["scan_s"], a["rows"]],
                     [f"+ {new:,} new, compacted", an["files"], an["bytes"] / 2**20, an["scan_s"], an["rows"]]])
    lines += ["", f"Scan {_f(doc['scan_speedup'], 1)}x faster after compaction (target >= 5x). Compaction of "
                  f"{c['folded']:,} small files: {_f(c['seconds'], 1)} s ({c['parts_written']} part); of the "
                  f"nightly's {nc['folded']:,}: {_f(nc['seconds'], 2)} s. Writing the {n:,} small files took "
                  f"{_f(doc['write_s'], 0)} s ({_f(doc['write_ms_per_file'], 2)} ms a file).", ""]
    return lines


def micro(doc: dict) -> list[str]:
    lines = ["## Small costs (issue 16: moved here from timed tests)", _machine(doc), "",
             "ProbeX forward on 64 LoRA rows of 384x384 at rank 8, factored (never forming X) vs the "
             "same rows formed densely; the card parser on hostile cards (refused, not parsed).", ""]
    lines += _table(["what", "value"], [["factored forward ms", doc["factored_ms"]], ["dense forward ms", doc["dense_ms"]],
                                        ["factored speed-up", doc["factored_speedup"]]])
    lines += [""] + _table(["hostile card", "seconds", "status"],
                           [[k, v["seconds"], v["status"]] for k, v in doc["card_parse"].items()])
    return lines


def design_notes(doc: dict) -> list[str]:
    out = ["## Measurements behind design choices", "", doc["note"], ""]
    out += _table(["where", "measured", "benchmark section", "what"],
                  [[i["where"], i["date"], i["section"], i["what"]] for i in doc["items"]])
    return out


SECTIONS = [("lake", lake), ("crawl", crawl), ("extract", extract), ("formats", formats), ("train", train), ("seeds", seeds),
            ("train_full", train), ("query", query),
            ("demo", demo), ("fresh_clone", fresh_clone), ("gpu", gpu), ("scale", scale), ("cluster", cluster), ("compact", compact), ("micro", micro), ("design_notes", design_notes)]


def render(store: Path) -> str:
    lines = ["# Benchmarks", "",
             "Generated by `scripts/benchmark.py` (rerun: `make bench`, or "
             "`.venv/bin/python scripts/benchmark.py SECTION...`; lake builds: "
             "`scripts/benchmark.py lake --sizes tiny small`; the full lake, about an hour alone: `lake --sizes full`, "
             "or `lake --sizes full --reuse` to record one already built in the bench folder; experts on it: "
             "`train_full`). Numbers are what was measured on the date "
             "shown; the machines are shared and noisy, so compare ratios measured in one run.", ""]
    for name, fn in SECTIONS:
        doc = _load(store, name)
        if doc is None:
            lines += [f"## {name}", "", "_Not measured yet._", ""]
            continue
        lines += fn(doc) + [""]
    return "\n".join(lines)
