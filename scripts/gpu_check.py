"""The training path on CUDA vs CPU, in one run on one machine (the device check).

    python scripts/export_gpu_data.py HOME   # here: a small-lake home -> .gpu/l6.npz (text tree)
    python scripts/gpu_check.py [OUT.json]   # there: trains the same experts on cuda and cpu

    python scripts/gpu_check.py --cluster HOME [OUT.json]   # the lake's experts as cluster tasks

Trains (a) the zero-shot text head on the real L6 tree's chosen layer (LoRA rows, factored path),
with the text probe fused (the default) and without, and (b) a multi-label expert on dense 320x1152 rows (the image tree's layer shape, synthetic
class-dependent updates), each on CUDA and on the CPU, and reports seconds and metrics.

--cluster HOME: HOME is a PROBEX_HOME whose lake is crawled and extracted (`probex crawl`, `probex
extract --mode candidates`). Its trees' experts train as Dask tasks on a LocalCluster whose one
worker advertises GPU=1 (the tasks ask for it), once with PROBEX_DEVICE=auto (CUDA, chosen on the
worker) and once on the CPU, each into its own experts folder under HOME; reports per-tree seconds,
the device each expert's config records, and whether layers and metrics agree within seed noise.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probex_core.data import LayerDataset, WeightRow, synthetic_rows  # noqa: E402
from probex_core.probex import COMPACT  # noqa: E402
from probex_core.train import TrainConfig, config_for, evaluate, evaluate_zeroshot, train_expert  # noqa: E402


def text_tree(data: Path):
    z = np.load(data, allow_pickle=False)
    meta = json.loads(str(z["meta"]))
    def ds(split, classes=None):
        n = len(meta[split]["labels"])
        rows = [WeightRow(f"m{i}", A=z[f"{split}_A"][i, : z[f"{split}_r"][i]], B=z[f"{split}_B"][i, :, : z[f"{split}_r"][i]],
                          scale=float(z[f"{split}_s"][i])) for i in range(n)]
        return LayerDataset.from_rows(rows, tree="L6", layer=meta["layer"], labels=meta[split]["labels"],
                                      task="text", classes=classes)
    train = ds("train")
    return train, ds("val", train.classes), ds("test", train.classes), ds("holdout"), z


def run(device: str, threads: int) -> dict:
    out = {}
    data = Path(__file__).resolve().parents[1] / ".gpu" / "l6.npz"
    if data.exists():
        train, val, test, hold, z = text_tree(data)
        emb = torch.as_tensor(z["train_text"]); hemb = torch.as_tensor(z["holdout_text"])
        cfg = config_for(train, head="text", text_dim=emb.shape[1], **COMPACT)
        for name, probe in (("text_tree", "auto"), ("text_tree_head_only", False)):
            tcfg = TrainConfig(device=device, threads=threads, seed=0, text_probe=probe)
            t0 = time.perf_counter()
            res = train_expert(train, val, cfg, tcfg, emb)
            secs = time.perf_counter() - t0
            m = evaluate(res.model, test, "text", emb)
            zs = evaluate_zeroshot(res.model, hold, hemb)
            out[name] = {"seconds": secs, "epochs": res.epochs_run, "test_top1": m["top1"],
                         "zeroshot_top1": zs["zeroshot_top1"], "zeroshot_top5": zs["zeroshot_top5"],
                         "n_train": len(train), "text_probe": res.config.text_probe,
                         "fused_weights": [res.config.head_weight, res.config.probe_weight]}
    classes = [f"c{i}" for i in range(10)]
    rng = np.random.default_rng(0)
    labels_of = [sorted(rng.choice(10, 5, replace=False).tolist()) for _ in range(300)]
    rows, labels = synthetic_rows(300, 320, 1152, classes=classes, class_codes=rng.standard_normal((10, 16)),
                                  labels_of=labels_of, dense=True, seed=0)
    ds = LayerDataset.from_rows(rows, tree="img", layer="L", labels=labels, task="multilabel")
    tr, va = ds.subset(list(range(240))), ds.subset(list(range(240, 300)))
    cfg = config_for(tr, **COMPACT)
    tcfg = TrainConfig(device=device, threads=threads, seed=0, max_epochs=100, patience=None)
    t0 = time.perf_counter()
    res = train_expert(tr, va, cfg, tcfg)
    out["dense_320x1152"] = {"seconds": time.perf_counter() - t0, "epochs": res.epochs_run,
                             "val_accuracy": res.best_val.get("accuracy")}
    return out


SEED_NOISE = 0.05  # metric gap between devices that still counts as the same result


def cluster_run(home: Path, device: str, experts: Path) -> dict:
    """The lake's trees trained as tasks on a one-worker cluster that advertises a GPU."""
    from dataclasses import replace

    from distributed import LocalCluster

    from probex_core.settings import Settings, apply_runtime_env
    from storage.experts import load_current
    from tasks.pipeline import train_step

    s = Settings.load(home, experts=experts)
    apply_runtime_env(s)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, resources={"GPU": 1},
                      dashboard_address="127.0.0.1:0") as cluster:
        s = replace(s, device=device, dask_address=cluster.scheduler_address)
        t0 = time.perf_counter()
        trees = train_step(s)["trees"]
        wall = time.perf_counter() - t0
    out = {"wall_seconds": wall, "trees": {}}
    for tree, r in trees.items():
        info = load_current(str(experts), tree).config["info"] if r.get("version") else {}
        out["trees"][tree] = {"seconds": r["train_seconds"], "layer": r["layer"], "val": r["val"],
                              "device": info.get("device"), "skipped": r["skipped"]}
    return out


def cluster_main(home: Path, out: Path | None) -> None:
    # The CPU run's worker trains with every core (a worker's default is its one thread).
    os.environ.setdefault("PROBEX_TORCH_THREADS", str(os.cpu_count() or 1))
    doc = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "home": str(home)}
    if torch.cuda.is_available():
        doc["cuda"] = cluster_run(home, "auto", home / "experts-gpu-check-cuda")
    doc["cpu"] = cluster_run(home, "cpu", home / "experts-gpu-check-cpu")
    if "cuda" in doc:
        doc["same_within_noise"] = {
            t: r["layer"] == doc["cpu"]["trees"][t]["layer"] and all(
                abs(v - doc["cpu"]["trees"][t]["val"].get(k, float("inf"))) <= SEED_NOISE for k, v in r["val"].items())
            for t, r in doc["cuda"]["trees"].items() if not r["skipped"]}
    text = json.dumps(doc, indent=2)
    print(text)
    if out:
        out.write_text(text)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--cluster":
        cluster_main(Path(sys.argv[2]).resolve(), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
        return
    doc = {"torch": torch.__version__, "python": platform.python_version(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if torch.cuda.is_available():
        # The first run pays CUDA's lazy loading of each kernel (cuBLAS, QR, SVD...): report both.
        doc["cuda_first_run"] = run("cuda", None)
        doc["cuda"] = run("cuda", None)
    doc["cpu_2_threads"] = run("cpu", 2)
    text = json.dumps(doc, indent=2)
    print(text)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(text)


if __name__ == "__main__":
    main()
