"""Export a small-lake home's text tree (chosen layer, splits, class text embeddings) to
.gpu/l6.npz so scripts/gpu_check.py can train the same expert on a machine without the catalog."""

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probex_core.settings import Settings  # noqa: E402
from storage.experts import load_current  # noqa: E402
from probex_core.text_encoder import TextEncoder  # noqa: E402
from storage.catalog import Catalog  # noqa: E402
from tasks.train import load_rows, split_datasets, tree_labels  # noqa: E402

TREE = "sentence-transformers/all-MiniLM-L6-v2"


def main(home: str) -> None:
    s = Settings.load(home)
    cat = Catalog(s.catalog)
    layer = load_current(s.experts, TREE).config["layer"]
    models = cat.tree_children(TREE)
    rows = load_rows(s.shards, TREE, layer, models)
    labels = tree_labels(models)
    train, val = split_datasets(rows, labels, TREE, layer)
    gt = {r["repo_id"]: r for r in pq.read_table(s.lake / "_ground_truth.parquet").to_pylist()}
    split_ids = {"train": train.repo_ids, "val": val.repo_ids,
                 "test": [r for r in rows if gt.get(r, {}).get("split") == "test" and gt[r]["classes"][0] in train.classes],
                 "holdout": [r for r in rows if gt.get(r, {}).get("split") == "holdout"]}
    lab = {"train": [labels.labels[r] for r in train.repo_ids], "val": [labels.labels[r] for r in val.repo_ids],
           "test": [gt[r]["classes"][0] for r in split_ids["test"]],
           "holdout": [gt[r]["classes"][0] for r in split_ids["holdout"]]}
    arrays = {}
    for split, ids in split_ids.items():
        rmax = max(rows[r].A.shape[0] for r in ids)
        A = np.zeros((len(ids), rmax, rows[ids[0]].A.shape[1]), np.float32)
        B = np.zeros((len(ids), rows[ids[0]].B.shape[0], rmax), np.float32)
        for i, r in enumerate(ids):
            k = rows[r].A.shape[0]
            A[i, :k], B[i, :, :k] = rows[r].A, rows[r].B
        arrays |= {f"{split}_A": A, f"{split}_B": B, f"{split}_s": np.array([rows[r].scale for r in ids], np.float32),
                   f"{split}_r": np.array([rows[r].A.shape[0] for r in ids])}
    enc = TextEncoder(s.text_encoder)
    arrays["train_text"] = enc.encode_classes(train.classes)
    arrays["holdout_text"] = enc.encode_classes(sorted(set(lab["holdout"])))
    meta = {"layer": layer, **{k: {"labels": v} for k, v in lab.items()}}
    out = Path(__file__).resolve().parents[1] / ".gpu"
    out.mkdir(exist_ok=True)
    np.savez_compressed(out / "l6.npz", meta=json.dumps(meta), **arrays)
    print(out / "l6.npz", {k: len(v) for k, v in split_ids.items()})


if __name__ == "__main__":
    main(sys.argv[1])
