"""Extract chosen layers of one model into Parquet shards, reading only the bytes they need.

`extract_model(job)` is what a Dask worker runs: the job carries only the repo's opener (a small
picklable `storage.sources.RepoOpener`: a folder, an endpoint) and names, never tensors; the worker reads the safetensors header, then only the
wanted tensors' byte ranges, and writes the shard files itself. A file that is corrupt (truncated,
lying header, NaN/Inf) or whose layer does not fit its tree is reported as quarantined with its
reason, never raised: one bad model must not stop a run.

A layer is named by the root's tensor name (`model.layers.3.self_attn.q_proj.weight`) whatever the
child's format: a full fine-tune's tensor of that name, the LoRA module of any adapter format that
changes it (`storage.adapters.match_layers`), or a quantized copy's weight dequantized. The shard
row's `kind` says which (dense / lora / dequantized) and `read_from` names the child's tensors.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from probex_core.routing import is_head
from storage.adapters import (
    PEFT,
    WEIGHT,
    AdapterError,
    LoraAdapterConfig,
    adapter_format,
    looks_like_adapter,
    lora_modules,
    match_layers,
    module_layers,
    parse_adapter_config,
    read_adapter_factors,
)
from storage.hubcounts import HubRequests, counting
from storage.quantized import CONFIG_FILE, QuantConfig, has_companions, materialize, parse_quant_config, plan_layer
from storage.records import weight_files
from storage.safetensors_reader import (
    ByteSource,
    RepoLayout,
    SafetensorsHeader,
    TensorReadError,
    as_matrix,
    check_finite,
    read_header,
    read_repo_tensors,
    repo_layout,
)
from storage.shards import LayerRow, has_shard, write_rows

if TYPE_CHECKING:
    from storage.sources.base import RepoOpener

ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class ExtractJob:
    opener: RepoOpener  # opens the repo's files at its sha, on the worker
    tree_id: str
    files: tuple[str, ...]  # the repo's file names
    layers: tuple[str, ...]  # layer names to extract: the root's tensor names (module paths: older plans)
    shards_root: str
    expected_shapes: tuple[tuple[str, tuple[int, int]], ...] = ()  # (layer, (d_H, d_W)) of the tree
    # The planner listed the layers and found this model missing: the worker does not ask again
    # (two requests a model on an object store). A re-run job rewrites its own shard names.
    planned_missing: bool = False


@dataclass
class ExtractResult:
    repo_id: str
    sha: str
    tree_id: str
    status: str  # "ok" | "skipped" (shards already there) | "quarantined"
    reason: str | None = None
    layers: list[str] = field(default_factory=list)
    tensors: int = 0
    bytes_read: int = 0
    bytes_needed: int = 0
    bytes_in_files: int = 0
    seconds: float = 0.0
    hub: HubRequests = field(default_factory=HubRequests)  # this model's requests to a Hub (none for a folder)

    def to_dict(self) -> dict:
        return asdict(self)


def _read_small(loc: RepoOpener, filename: str, limit: int = 1 << 20) -> tuple[bytes, int]:
    src = loc.open(filename)
    try:
        size = src.size()
        if size > limit:
            raise TensorReadError("bad_adapter_config", f"{filename} is {size} bytes (limit {limit})")
        return src.read(0, size), src.bytes_read
    finally:
        src.close()


def _check_shape(job: ExtractJob, layer: str, shape: tuple[int, int]) -> None:
    expected = dict(job.expected_shapes).get(layer)
    if expected is not None and tuple(expected) != tuple(shape):
        raise TensorReadError(
            "shape_mismatch",
            f"layer {layer} is {shape[0]}x{shape[1]} but tree {job.tree_id} expects {expected[0]}x{expected[1]}",
        )


def _adapter_config(job: ExtractJob, res: ExtractResult, fmt: str) -> LoraAdapterConfig | None:
    """PEFT's adapter_config.json; diffusers and kohya files carry their scale themselves."""
    if fmt != PEFT:
        return None
    raw, n = _read_small(job.opener, ADAPTER_CONFIG)
    res.bytes_read += n
    res.bytes_needed += n
    return parse_adapter_config(raw)


def _extract_adapter(job: ExtractJob, res: ExtractResult, filename: str, src: ByteSource | None = None,
                     header: SafetensorsHeader | None = None) -> list[LayerRow]:
    loc = job.opener
    src = src or loc.open(filename)
    try:
        header = header or read_header(src)
        config = _adapter_config(job, res, adapter_format(header.tensors))
        # the wanted layers are the root's tensor names: kohya keys are matched to their modules
        root_modules = [l.removesuffix(WEIGHT) for l in job.layers]
        pairs = lora_modules(header.tensors, root_modules)
        module_of = match_layers(job.layers, pairs)
        if missing := [l for l in job.layers if l not in module_of]:
            raise AdapterError("missing_factor", f"{src.name} has no LoRA factors for layer {missing[0]!r} "
                               f"(none of its {len(pairs)} modules changes it)")
        modules = list(dict.fromkeys(module_of.values()))
        factors = read_adapter_factors(src, modules, header, config, root_modules=root_modules)
        res.bytes_needed += header.bytes_needed(
            [n for m in modules for n in (pairs[m].a_name, pairs[m].b_name, pairs[m].alpha_name) if n])
        res.bytes_in_files += header.file_size or 0
    finally:
        res.bytes_read += src.bytes_read
        src.close()
    rows = []
    for layer, module in module_of.items():
        f, pair = factors[module], pairs[module]
        check_finite(layer + ".lora_A", f.A)
        check_finite(layer + ".lora_B", f.B)
        # A transposed adapter (fan_in_fan_out) stores delta^T; keep rows as out x in.
        A, B = (f.B.T, f.A.T) if f.transposed else (f.A, f.B)
        shape = (B.shape[0], A.shape[1])
        _check_shape(job, layer, shape)
        rows.append(LayerRow(job.tree_id, layer, loc.repo_id, loc.sha, "lora", shape, shape, "F32",
                             0, A=A, B=B, rank=int(A.shape[0]), scale=float(f.scale),
                             read_from=[n for n in (pair.a_name, pair.b_name, pair.alpha_name) if n]))
    return rows


def _extract_single(job: ExtractJob, res: ExtractResult, filename: str) -> list[LayerRow]:
    """One safetensors file of no telling name: a LoRA (kohya, civitai) or a whole checkpoint,
    told apart by its header, which is read once for either."""
    src = job.opener.open(filename)
    try:
        header = read_header(src)
    except TensorReadError as e:
        e.bytes_read = src.bytes_read
        src.close()
        raise
    if looks_like_adapter(header.tensors):
        return _extract_adapter(job, res, filename, src, header)
    bytes_read = src.bytes_read
    src.close()
    layout = RepoLayout(dict.fromkeys(header.tensors, filename), {filename: header}, bytes_read)
    return _extract_full(job, res, layout=layout)


def _quant_config(job: ExtractJob, layout: RepoLayout, res: ExtractResult) -> QuantConfig:
    """config.json's quantization_config, read only when a wanted layer has quantization companions."""
    if CONFIG_FILE not in job.files or not has_companions(job.layers, layout.names):
        return QuantConfig()
    raw, n = _read_small(job.opener, CONFIG_FILE, limit=16 << 20)
    res.bytes_read += n
    res.bytes_needed += n
    return parse_quant_config(raw)


def _extract_full(job: ExtractJob, res: ExtractResult, layout: RepoLayout | None = None) -> list[LayerRow]:
    loc = job.opener
    layout = layout or repo_layout(loc.open, job.files, weight_files(job.files).filename)
    res.bytes_read += layout.bytes_read
    config = _quant_config(job, layout, res)
    plans = {layer: plan_layer(layer, layout.names, config) for layer in job.layers}
    read = read_repo_tensors(loc.open, [n for p in plans.values() for n in p.tensors], job.files,
                             layout=layout, check=True)
    res.bytes_read += read.bytes_read
    res.bytes_needed += read.bytes_needed
    res.bytes_in_files += read.bytes_in_files
    rows = []
    for layer, plan in plans.items():
        arr = materialize(plan, read.tensors, {n: read.dtype(n) for n in plan.tensors})
        X = as_matrix(arr)
        _check_shape(job, layer, X.shape)
        rows.append(LayerRow(job.tree_id, layer, loc.repo_id, loc.sha, "dequantized" if plan.dequantized else "dense",
                             X.shape, tuple(arr.shape), read.dtype(plan.weight) or "F32", 0, X=X,
                             read_from=list(plan.tensors)))
    return rows


def skipped(job: ExtractJob) -> ExtractResult:
    """The result for a model whose layers are all stored already."""
    return ExtractResult(job.opener.repo_id, job.opener.sha, job.tree_id, "skipped", layers=list(job.layers))


def extract_model(job: ExtractJob) -> ExtractResult:
    """Read the job's layers and write one shard per layer. Never raises for bad data. The
    result carries the Hub requests its reads made (counted in the worker, returned with it)."""
    with counting() as hub:
        res = _extract_model(job)
    res.hub = hub
    return res


def _extract_model(job: ExtractJob) -> ExtractResult:
    t0 = time.perf_counter()
    loc = job.opener
    res = ExtractResult(loc.repo_id, loc.sha, job.tree_id, "ok")
    if not job.planned_missing and all(has_shard(job.shards_root, job.tree_id, l, loc.repo_id, loc.sha)
                                       for l in job.layers):
        return skipped(job)
    files = weight_files(job.files)
    try:
        if files.kind == "single":
            rows = _extract_single(job, res, files.filename)
        elif files.is_adapter:
            rows = _extract_adapter(job, res, files.filename)
        else:
            rows = _extract_full(job, res)
    except TensorReadError as e:
        res.status, res.reason = "quarantined", f"{e.reason}: {e.message}"
        res.bytes_read += e.bytes_read
        res.seconds = time.perf_counter() - t0
        return res
    except (OSError, ValueError, KeyError) as e:  # unreadable file, missing tensor name, ...
        res.status, res.reason = "quarantined", f"unreadable: {e}"
        res.seconds = time.perf_counter() - t0
        return res
    share = res.bytes_read // max(len(rows), 1)
    for r in rows:
        r.bytes_read = share
    write_rows(job.shards_root, rows)
    res.layers = [r.layer for r in rows]
    res.tensors = sum(2 if r.kind == "lora" else 1 for r in rows)
    res.seconds = time.perf_counter() - t0
    return res


# --- which layers a tree offers ------------------------------------------------------------

def header_shapes(loc: RepoOpener, files: tuple[str, ...]) -> tuple[dict[str, tuple[int, ...]], int]:
    """name -> shape of every tensor in the repo's weights (every shard of a sharded one, the
    denoiser of a diffusers pipeline), reading only the index and headers."""
    layout = repo_layout(loc.open, files, weight_files(files).filename)
    shapes = {}
    for shard in dict.fromkeys(layout.weight_map.values()):
        shapes.update({n: tuple(i.shape) for n, i in layout.header(loc.open, shard).tensors.items()})
    return shapes, layout.bytes_read


def model_layer_shapes(loc: RepoOpener, files: tuple[str, ...],
                       root_shapes: dict[str, tuple[int, ...]] | None = None
                       ) -> tuple[dict[str, tuple[int, int]], bool]:
    """The layers one model offers, as (d_H, d_W), named by the root's tensors, and whether it is
    an adapter. An adapter offers the root tensors its LoRA modules change (`root_shapes`: the
    root's header, when readable; else `<module>.weight`), in the root's orientation (a
    fan_in_fan_out or embedding LoRA changes an `in x out` weight). A single safetensors file of no
    telling name is told apart by its header."""
    shapes, _ = header_shapes(loc, files)
    kind = weight_files(files).kind
    if kind in ("peft", "lora") or (kind == "single" and looks_like_adapter(shapes)):
        roots = root_shapes or {}
        root_modules = [n.removesuffix(WEIGHT) for n in roots if n.endswith(WEIGHT)] if root_shapes else None
        modules = adapter_layer_shapes(shapes, root_modules)
        out = {}
        for module, layer in module_layers(modules, roots if root_shapes else None).items():
            d_h, d_w = modules[module]
            root = matrix_shape(tuple(roots.get(layer, ())))
            out[layer] = (d_w, d_h) if root == (d_w, d_h) and d_w != d_h else (d_h, d_w)
        return out, True
    return {n: m for n, s in shapes.items() if (m := matrix_shape(s)) is not None}, False


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int] | None:
    if len(shape) < 2:
        return None
    return (shape[0], int(np.prod(shape[1:])))


def adapter_layer_shapes(shapes: dict[str, tuple[int, ...]],
                         root_modules: Iterable[str] | None = None) -> dict[str, tuple[int, int]]:
    """LoRA module -> (d_H, d_W) of its update, from an adapter header (any LoRA format; kohya's
    modules named after `root_modules` when given)."""
    out = {}
    for module, pair in lora_modules(shapes, root_modules).items():
        a, b = shapes[pair.a_name], shapes[pair.b_name]
        out[module] = (b[0], int(np.prod(a[1:])))
    return out


def depth_order(name: str) -> str:
    """A sort key that reads a name's numbers as numbers (`model.layers.9` before
    `model.layers.23`), and orders names without multi-digit numbers as plain text does."""
    return re.sub(r"\d+", lambda m: m.group().zfill(12), name)


def candidate_layers(samples: list[dict[str, tuple[int, int]]], changed: set[str] | None = None,
                     limit: int = 8) -> dict[str, tuple[int, int]]:
    """Layers every sampled child has with one shape, minus heads, optionally only those that
    fine-tuning changed; the last `limit` in depth order (later layers read best, PROBEX.md)."""
    if not samples:
        return {}
    common = set(samples[0])
    for s in samples[1:]:
        common &= {n for n in s if s[n] == samples[0].get(n)}
    # by depth, not text: as text, a 24-layer model's last layers would be 6-9 ("9" > "23")
    names = sorted((n for n in common if not is_head(n) and (changed is None or n in changed)), key=depth_order)
    names = names[-limit:]
    return {n: samples[0][n] for n in names}


def changed_layers(root: RepoOpener, child: RepoOpener, root_files: tuple[str, ...],
                   child_files: tuple[str, ...], names: list[str]) -> set[str]:
    """Names whose values differ between a root and one full fine-tuned child."""
    a = read_repo_tensors(root.open, names, root_files, filename=weight_files(root_files).filename, check=False).tensors
    b = read_repo_tensors(child.open, names, child_files, filename=weight_files(child_files).filename,
                          check=False).tensors
    return {n for n in names if a[n].shape != b[n].shape or not np.array_equal(a[n], b[n])}
