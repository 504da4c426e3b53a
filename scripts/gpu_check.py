"""The training path on CUDA vs CPU, in one run on one machine (the device check).

    python scripts/export_gpu_data.py HOME   # here: a small-lake home -> .gpu/l6.npz (text tree)
    python scripts/gpu_check.py [OUT.json]   # there: trains the same experts on cuda and cpu

Trains (a) the zero-shot text head on the real L6 tree's chosen layer (LoRA rows, factored path),
with the text probe fused (the default) and without, and (b) a multi-label expert on dense 320x1152 rows (the image tree's layer shape, synthetic
class-dependent updates), each on CUDA and on the CPU, and reports seconds and metrics.
"""

from __future__ import annotations

import json
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


def main() -> None:
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
