"""Write one model repo exactly as the Hugging Face Hub lays it out (docs/lake.md).

README.md (model card with YAML front matter rendered by huggingface_hub, so the Hub's own parser
reads it back), config.json, and model.safetensors or the PEFT pair adapter_config.json +
adapter_model.safetensors. The safetensors metadata carries the training recipe.

A repo is written into a hidden temp folder beside its final place and renamed at the end, so a
repo folder that exists is complete and an interrupted build leaves only `.name.partial-*` folders,
which `clean_partials` removes.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from safetensors.torch import save_file

CORRUPTIONS = ("truncated", "bad_header", "nan")


@dataclass
class RepoSpec:
    """Everything about a repo except its weights and config."""

    repo_id: str
    summary: str  # one line of prose for the card; never names classes
    base_model: str | None = None  # None: the card does not declare a lineage
    relation: str | None = None  # "finetune" | "adapter"; None for base models
    library_name: str = "pytorch"
    pipeline_tag: str | None = None
    license: str = "apache-2.0"
    tags: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    labels: list[str] | None = None  # class names in head order (None: no classification head)
    documented: bool = True  # False: LABEL_i everywhere, nothing in the repo names the classes
    accuracy: float | None = None  # held-out task accuracy -> model-index
    eval_dataset: str | None = None  # the model-index dataset name, e.g. "Fashion-MNIST (held-out)"


def repo_dir(lake: Path, repo_id: str) -> Path:
    return lake / repo_id


def id2label(spec: RepoSpec) -> dict[str, str]:
    names = spec.labels if spec.documented else [f"LABEL_{i}" for i in range(len(spec.labels))]
    return {str(i): name for i, name in enumerate(names)}


def render_card(spec: RepoSpec) -> str:
    data = ModelCardData(
        base_model=spec.base_model, library_name=spec.library_name, license=spec.license,
        pipeline_tag=spec.pipeline_tag, tags=spec.tags or None, datasets=spec.datasets or None,
        model_name=spec.repo_id,
        eval_results=None if spec.accuracy is None else [EvalResult(
            task_type=spec.pipeline_tag or "text-classification", dataset_type=spec.datasets[0],
            dataset_name=spec.eval_dataset or spec.datasets[0], dataset_split="test",
            metric_type="accuracy", metric_value=round(spec.accuracy, 4))],
    )
    if spec.relation and spec.base_model:  # the Hub infers nothing from a relation without a base
        data.base_model_relation = spec.relation
    body = [f"# {spec.repo_id.split('/')[1]}", "", spec.summary, ""]
    if spec.labels and spec.documented:
        body += ["## Labels", "", *[f"- `{i}`: {name}" for i, name in enumerate(spec.labels)], ""]
    if spec.accuracy is not None:
        body += ["## Evaluation", "", f"Accuracy on held-out data: {spec.accuracy:.4f}", ""]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)


def write_repo(lake: Path, spec: RepoSpec, *, tensors: dict[str, torch.Tensor], config: dict,
               recipe: dict[str, str], adapter_config: dict | None = None,
               corruption: str | None = None) -> Path:
    """Write the repo atomically; `corruption` (one of CORRUPTIONS) damages its weights file on
    purpose, as broken uploads on the Hub are."""
    final = repo_dir(lake, spec.repo_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    config = dict(config)
    if spec.labels:
        config["id2label"] = id2label(spec)
        config["label2id"] = {name: int(i) for i, name in config["id2label"].items()}
    if corruption == "nan":  # a run that diverged: every float weight is NaN, the header is fine
        tensors = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in tensors.items()}

    (tmp / "README.md").write_text(render_card(spec), encoding="utf-8")
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if adapter_config is None:
        weights = tmp / "model.safetensors"
    else:
        adapter_config = dict(adapter_config, base_model_name_or_path=spec.base_model)
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
        weights = tmp / "adapter_model.safetensors"
    save_file(tensors, str(weights), metadata={"format": "pt", **recipe})
    if corruption in ("truncated", "bad_header"):
        _damage(weights, corruption)

    os.rename(tmp, final)
    return final


def _damage(path: Path, kind: str) -> None:
    raw = path.read_bytes()
    if kind == "truncated":  # an upload cut short: the header is intact, the data is not
        path.write_bytes(raw[: len(raw) // 2])
        return
    # a lying header: it parses, but the last tensor's bytes end far past the end of the file
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin, end + 2 * len(raw)]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as safetensors does
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def clean_partials(lake: Path) -> None:
    """Remove temp folders an interrupted build left behind."""
    for tmp in lake.glob("*/.*.partial-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def read_accuracy(path: Path) -> float | None:
    """The held-out accuracy a repo's card declares (how a resumed build recovers it)."""
    results = ModelCard.load(path / "README.md").data.eval_results or []
    return float(results[0].metric_value) if results else None
