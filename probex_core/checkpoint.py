"""Expert checkpoints as bytes: safetensors + JSON, never unpickled. Pure: no file or network I/O.

A checkpoint is two objects, written and read by `storage/experts.py` at any store URI:

    model.safetensors   the ProbeX state dict (+ "extra.*" tensors, e.g. extra.class_text_emb);
                        a delta expert's `input_root` is the root's matrix it reads rows against
    config.json         tree, layer, ProbeXConfig (with the input normalisation), representation
                        ("raw" rows or "delta", changes from the root), views (what the encoder
                        reads; an expert saved before views existed reads "first"), text encoder, prompt,
                        label vocabulary, metrics, version, created, and the sha256 of
                        model.safetensors

`encode_expert` turns a model into those bytes, `decode_expert` checks and loads them back
(see expert_paths.py for where they live).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone

import torch
from safetensors.torch import load, save

from .data import ExpertError
from .expert_paths import CONFIG, CURRENT, WEIGHTS, tree_dir, tree_slug  # noqa: F401 - re-exported
from .probex import ProbeX, ProbeXConfig

FORMAT = "probex-expert/1"
EXTRA_PREFIX = "extra."


class CheckpointError(ExpertError):
    """A checkpoint that is missing, incomplete or corrupt."""


def new_version(now: datetime | None = None) -> str:
    """Sortable and unique: 20261115T101112Z-3fa2c1."""
    import uuid

    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def encode_expert(tree_id: str, model: ProbeX, *, version: str, layer: str, labels: list[str],
                  text_encoder: str | None = None, prompt: str | None = None, metrics: dict | None = None,
                  extra_tensors: dict[str, torch.Tensor] | None = None,
                  info: dict | None = None) -> tuple[bytes, bytes]:
    """(model.safetensors bytes, config.json bytes) of one expert version.

    labels: the label vocabulary in output order (multilabel) or the training classes (text).
    extra_tensors: e.g. {"class_text_emb": (k, text_dim)} so the expert can score its classes
    without re-running the text encoder. info: any other JSON-able facts (n_train, seconds, ...)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for k, v in (extra_tensors or {}).items():
        tensors[EXTRA_PREFIX + k] = torch.as_tensor(v).detach().cpu().float().contiguous()
    weights = save(tensors, metadata={"format": FORMAT, "tree": tree_id, "layer": layer, "version": version})
    config = {
        "format": FORMAT,
        "model_kind": "probex",
        "tree": tree_id,
        "layer": layer,
        "version": version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "probex": model.cfg.to_dict(),
        "normalisation": {"input_scale": model.cfg.input_scale, "centered": model.cfg.centered},
        "representation": model.cfg.representation,
        "views": list(model.cfg.views),
        "text_encoder": text_encoder,
        "prompt": prompt,
        "labels": list(labels),
        "metrics": metrics or {},
        "info": info or {},
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }
    return weights, json.dumps(config, indent=2, sort_keys=True, default=_json_default).encode()


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


@dataclass
class LoadedExpert:
    model: ProbeX  # eval mode, CPU
    config: dict  # the whole config.json
    probex_config: ProbeXConfig
    extra: dict[str, torch.Tensor]
    path: str  # the version folder's path or URI

    @property
    def labels(self) -> list[str]:
        return self.config["labels"]

    @property
    def version(self) -> str:
        return self.config["version"]


def decode_config(data: bytes, where: str) -> dict:
    """config.json's content, checked for our format. `where` names it in errors."""
    try:
        config = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt {where}/{CONFIG}: {e}") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        fmt = config.get("format") if isinstance(config, dict) else None
        raise CheckpointError(f"unknown checkpoint format {fmt!r} at {where}",
                              tree=(config or {}).get("tree") if isinstance(config, dict) else None)
    return config


def decode_expert(config_bytes: bytes, weights: bytes, where: str, verify: bool = True) -> LoadedExpert:
    """The expert in these bytes (config.json, model.safetensors), in eval mode on CPU.
    verify: check the weights against the sha256 config.json recorded."""
    config = decode_config(config_bytes, where)
    at = dict(tree=config.get("tree"), layer=config.get("layer"))
    if verify and config.get("weights_sha256") and hashlib.sha256(weights).hexdigest() != config["weights_sha256"]:
        raise CheckpointError(f"{where}/{WEIGHTS} does not match its recorded sha256", **at)
    try:
        tensors = load(weights)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for bad bytes
        raise CheckpointError(f"corrupt {where}/{WEIGHTS}: {e}", **at) from e
    extra = {k[len(EXTRA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)}
    state = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIX)}
    pcfg = ProbeXConfig.from_dict(config["probex"])
    model = ProbeX(pcfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"weights do not fit the recorded config: {e}", **at) from e
    model.eval()
    return LoadedExpert(model=model, config=config, probex_config=pcfg, extra=extra, path=where)
