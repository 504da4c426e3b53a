"""A tiny Hub-shaped lake (docs/lake.md layout) with good and bad repos, built in milliseconds.

Every repo gets distinct file mtimes (one minute apart, in declaration order) so "newest first"
is deterministic: the last repo written is the newest.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

T0 = 1_700_000_000  # 2023-11-14T22:13:20Z


def card(front_matter: str, body: str = "# A model\n") -> str:
    return f"---\n{front_matter.strip()}\n---\n{body}"


def write_repo(root: Path, repo_id: str, files: dict[str, str | bytes | dict], *, t: int) -> Path:
    """Write one repo; dict values are JSON, `"<safetensors>"` writes a tiny weights file."""
    folder = root / repo_id
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == "<safetensors>":
            rng = np.random.default_rng(zlib.crc32(repo_id.encode()))
            save_file({"layer.weight": rng.standard_normal((4, 3)).astype(np.float32),
                       "layer.bias": np.zeros(4, np.float32)}, str(path))
        elif isinstance(content, dict):
            path.write_text(json.dumps(content))
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        os.utime(path, ns=(t * 10**9, t * 10**9 + 123_456_789))  # sub-ms part tests truncation
    return folder


LABELS = {"id2label": {"0": "cat", "1": "dog"}, "label2id": {"cat": 0, "dog": 1}}

# (repo id, files) in age order: oldest first.
REPOS: list[tuple[str, dict]] = [
    ("base/root-model", {
        "README.md": card("license: mit\nlibrary_name: transformers\ntags: [vision]\n"
                          "pipeline_tag: image-classification"),
        "config.json": {"model_type": "bert", **LABELS},
        "model.safetensors": "<safetensors>",
    }),
    ("org/child-ft", {
        "README.md": card("base_model: base/root-model\nbase_model_relation: finetune\nlicense: apache-2.0\n"
                          "datasets: [fashion_mnist]\ntags: [a, b]\ndate: 2024-01-01"),
        "config.json": {"model_type": "bert", **LABELS},
        "model.safetensors": "<safetensors>",
    }),
    ("org/child-lora", {
        "README.md": card("base_model:\n- base/root-model\nbase_model_relation: adapter\nlibrary_name: peft"),
        "config.json": {"model_type": "bert", "id2label": {"0": "LABEL_0", "1": "LABEL_1"}},
        "adapter_config.json": {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]},
        "adapter_model.safetensors": "<safetensors>",
    }),
    ("org/grandchild", {
        "README.md": card("base_model: org/child-ft\nbase_model_relation: finetune"),
        "config.json": {"model_type": "bert"},
        "model.safetensors": "<safetensors>",
    }),
    ("org/merge", {
        "README.md": card("base_model: [org/child-ft, elsewhere/not-crawled]\nbase_model_relation: merge"),
        "config.json": {"model_type": "bert"},
        "model.safetensors": "<safetensors>",
    }),
    ("org/orphan", {
        "README.md": card("base_model: gone/missing-root\nbase_model_relation: finetune"),
        "config.json": {"model_type": "bert"},
    }),
    ("org/undeclared", {"README.md": "# no front matter at all\n", "config.json": {"model_type": "bert"},
                        "model.safetensors": "<safetensors>"}),
    ("org/bad-yaml", {"README.md": card("base_model: [unclosed\nlicense: mit"), "config.json": {}}),
    ("org/alias", {"README.md": card('a: &a ["x", "x"]\nb: &b [*a, *a]\nbase_model: base/root-model'),
                   "config.json": {}}),
    ("org/bad-base", {"README.md": card("base_model: {name: base/root-model}"), "config.json": {}}),
    ("org/no-config", {"README.md": card("base_model: base/root-model"), "model.safetensors": "<safetensors>"}),
    ("org/bad-config", {"README.md": card("license: mit"), "config.json": "{not json"}),
    ("org/huge-card", {"README.md": card("license: mit", body="x" * (2 << 20)), "config.json": {}}),
    ("org/nested", {"README.md": card("tags: t"), "config.json": {}, "onnx/model.onnx": b"\0" * 10}),
    ("org/we..ird", {"README.md": card("license: mit"), "config.json": {}}),
]


def build_lake(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, (repo_id, files) in enumerate(REPOS):
        write_repo(root, repo_id, files, t=T0 + 60 * i)
    # Not repos: build metadata and hidden folders are skipped.
    (root / "_lake.json").write_text("{}")
    (root / "_private").mkdir(exist_ok=True)
    (root / "_private" / "x").mkdir(exist_ok=True)
    (root / ".git").mkdir(exist_ok=True)
    (root / "org" / ".cache").mkdir(exist_ok=True)
    return root
