"""Typed records shared by every model source (Hub, local lake folder), and small facts about
the catalog rows made from them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class RepoFile:
    path: str  # relative to the repo root, e.g. "model.safetensors"
    size: int  # bytes


@dataclass
class ModelRecord:
    """One model repository at one revision, as any source reports it.

    `sha` is the Hub commit sha, or for a local folder a content hash of its files.
    `status`/`reason` say whether the record itself could be read (`ok`, `bad_card`, ...);
    a source never raises for one bad repo, it returns a record that says what was wrong.
    """

    repo_id: str
    sha: str
    created_at: datetime | None = None
    last_modified: datetime | None = None
    base_model: list[str] = field(default_factory=list)  # [] when undeclared; >1 for merges
    base_model_relation: str | None = None  # "finetune" | "adapter" | "quantized" | "merge" | None
    license: str | None = None
    datasets: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    pipeline_tag: str | None = None
    library_name: str | None = None
    id2label: dict[str, str] | None = None
    files: list[RepoFile] = field(default_factory=list)
    status: str = "ok"
    reason: str | None = None


# --- facts about a repo's files that several steps need -----------------------------------------

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT
DIFFUSERS_LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers `save_lora_weights`
MODEL_INDEX = "model_index.json"  # a diffusers pipeline: components in subfolders
# The component whose tensors a diffusers tree's layers are named after (what LoRAs adapt).
DENOISERS = ("unet", "transformer")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
OTHER_WEIGHT_SUFFIXES = {".gguf": "GGUF", ".onnx": "ONNX", ".h5": "Keras HDF5", ".msgpack": "Flax msgpack",
                         ".tflite": "TFLite", ".mlmodel": "Core ML"}


@dataclass(frozen=True)
class WeightFiles:
    """Which file of a repo holds the weights a layer is read from.

    kind: "full" (one safetensors file), "sharded" (`filename` is the shard index), "peft" (PEFT
    adapter), "lora" (a diffusers or kohya LoRA file), "single" (one safetensors file of another
    name: a LoRA or a whole checkpoint, told apart by its header, which the crawl reads), or "none"
    (nothing readable).
    """

    kind: str
    filename: str | None = None

    @property
    def is_adapter(self) -> bool:
        return self.kind in ADAPTER_KINDS


ADAPTER_KINDS = ("peft", "lora")


def weight_files(files: Iterable[str]) -> WeightFiles:
    files = set(files)
    if ADAPTER_WEIGHTS in files and "model.safetensors" not in files:
        return WeightFiles("peft", ADAPTER_WEIGHTS)
    if DIFFUSERS_LORA_WEIGHTS in files:
        return WeightFiles("lora", DIFFUSERS_LORA_WEIGHTS)
    for folder in ("", *(f"{c}/" for c in DENOISERS if MODEL_INDEX in files)):
        for stem in ("model", "diffusion_pytorch_model"):
            if f"{folder}{stem}.safetensors.index.json" in files:
                return WeightFiles("sharded", f"{folder}{stem}.safetensors.index.json")
            if f"{folder}{stem}.safetensors" in files:
                return WeightFiles("full", f"{folder}{stem}.safetensors")
    top = sorted(f for f in files if f.endswith(".safetensors") and "/" not in f)
    if len(top) == 1:
        return WeightFiles("single", top[0])
    return WeightFiles("none")


def no_safetensors_reason(files: Iterable[str]) -> str | None:
    """Why a repo has weights but none this reader may open: only pickles (never unpickled: loading
    one runs arbitrary code) or only other formats. None when it has safetensors, or no weights."""
    files = sorted(files)
    if any(f.endswith(".safetensors") for f in files):
        return None
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    others = sorted({fmt for f in files for suffix, fmt in OTHER_WEIGHT_SUFFIXES.items() if f.endswith(suffix)})
    if not pickles and not others:
        return None
    kinds = ([f"{', '.join(pickles[:3])}{' ...' if len(pickles) > 3 else ''} (pickle)"] if pickles else []) + others
    return f"only {' and '.join(kinds)}: no safetensors to read, never opened"


# --- facts about a `models` catalog row that several steps need ---------------------------------


def repo_files(row: dict) -> tuple[str, ...]:
    """File names of a `models` catalog row."""
    return tuple(f["path"] for f in row.get("files") or [])


def weights_kind(row: dict) -> str:
    """A `models` row's weights kind (WeightFiles.kind): the crawl's `weights_kind`, where a single
    safetensors file of no telling name is resolved by its header to "lora" or "full"; from the
    file names alone for a row written before that column (or whose header was unreadable: then
    "single", read as a full model, as before)."""
    return row.get("weights_kind") or weight_files(repo_files(row)).kind


def is_adapter(row: dict) -> bool:
    """An adapter repo (PEFT, diffusers or kohya LoRA weights, no full weights): by its file names,
    or, for one safetensors file of another name, by the header the crawl read (`weights_kind`).
    A card's `base_model_relation: adapter` alone is not enough: cards are often wrong."""
    return weights_kind(row) in ADAPTER_KINDS
