"""Expert checkpoints: safetensors + JSON, written new then switched, never unpickled.

Layout under an experts folder:

    experts/<tree_slug>/<version>/model.safetensors   the ProbeX state dict (+ "extra.*" tensors,
                                                      e.g. extra.class_text_emb)
    experts/<tree_slug>/<version>/config.json         tree, layer, ProbeXConfig (with the input
                                                      normalisation), text encoder, prompt,
                                                      label vocabulary, metrics, version, created,
                                                      sha256 of model.safetensors
    experts/<tree_slug>/current                       one line: the version in use

A save writes into a hidden temp folder, fsyncs, renames it to its (new, unique) version
folder, then replaces `current` atomically (os.replace). A failed run never calls save, and a
save that fails midway leaves `current` (and the good checkpoint it names) untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .data import ExpertError
from .expert_paths import CURRENT, current_version, tree_dir, tree_slug  # noqa: F401 - re-exported
from .probex import ProbeX, ProbeXConfig

FORMAT = "probex-expert/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
EXTRA_PREFIX = "extra."


class CheckpointError(ExpertError):
    """A checkpoint folder that is missing, incomplete or corrupt."""


def new_version(now: datetime | None = None) -> str:
    """Sortable and unique: 20261115T101112Z-3fa2c1."""
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_expert(experts_dir: str | os.PathLike, tree_id: str, model: ProbeX, *, layer: str,
                labels: list[str], text_encoder: str | None = None, prompt: str | None = None,
                metrics: dict | None = None, extra_tensors: dict[str, torch.Tensor] | None = None,
                info: dict | None = None, version: str | None = None,
                make_current: bool = True) -> Path:
    """Write a new version folder for `tree_id` and (by default) point `current` at it.

    labels: the label vocabulary in output order (multilabel) or the training classes (text).
    extra_tensors: e.g. {"class_text_emb": (k, text_dim)} so the expert can score its classes
    without re-running the text encoder. info: any other JSON-able facts (n_train, seconds, ...).
    Returns the version folder."""
    folder = tree_dir(experts_dir, tree_id)
    folder.mkdir(parents=True, exist_ok=True)
    version = version or new_version()
    final = folder / version
    if final.exists():
        raise CheckpointError(f"version {version} already exists; versions are never overwritten",
                              tree=tree_id, layer=layer)
    tmp = folder / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        for k, v in (extra_tensors or {}).items():
            tensors[EXTRA_PREFIX + k] = torch.as_tensor(v).detach().cpu().float().contiguous()
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT, "tree": tree_id,
                                                         "layer": layer, "version": version})
        config = {
            "format": FORMAT,
            "model_kind": "probex",
            "tree": tree_id,
            "layer": layer,
            "version": version,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "probex": model.cfg.to_dict(),
            "normalisation": {"input_scale": model.cfg.input_scale, "centered": model.cfg.centered},
            "text_encoder": text_encoder,
            "prompt": prompt,
            "labels": list(labels),
            "metrics": metrics or {},
            "info": info or {},
            "weights_sha256": _sha256(tmp / WEIGHTS),
        }
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, default=_json_default))
        for p in (tmp / WEIGHTS, tmp / CONFIG):
            _fsync(p)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if make_current:
        set_current(folder, version)
    return final


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def set_current(folder: str | os.PathLike, version: str) -> None:
    """Atomically point `current` at an existing, complete version folder."""
    folder = Path(folder)
    if not (folder / version / CONFIG).is_file():
        raise CheckpointError(f"no complete checkpoint {version} under {folder}")
    tmp = folder / f".{CURRENT}-{uuid.uuid4().hex[:8]}"
    tmp.write_text(version + "\n")
    _fsync(tmp)
    os.replace(tmp, folder / CURRENT)


def list_versions(folder: str | os.PathLike) -> list[str]:
    """Complete versions, oldest first (temp folders of interrupted saves are skipped)."""
    d = Path(folder)
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / CONFIG).is_file())


@dataclass
class LoadedExpert:
    model: ProbeX  # eval mode, CPU
    config: dict  # the whole config.json
    probex_config: ProbeXConfig
    extra: dict[str, torch.Tensor]
    path: Path

    @property
    def labels(self) -> list[str]:
        return self.config["labels"]

    @property
    def version(self) -> str:
        return self.config["version"]


def load_expert(path: str | os.PathLike, verify: bool = True) -> LoadedExpert:
    """Load a version folder, or a tree folder (follows `current`). safetensors + JSON only."""
    path = Path(path)
    if not (path / CONFIG).is_file() and (path / CURRENT).is_file():
        path = path / current_version(path)
    cfg_path, w_path = path / CONFIG, path / WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise CheckpointError(f"no expert checkpoint at {path}")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"corrupt {cfg_path}: {e}") from e
    where = dict(tree=config.get("tree"), layer=config.get("layer"))
    if config.get("format") != FORMAT:
        raise CheckpointError(f"unknown checkpoint format {config.get('format')!r}", **where)
    if verify and config.get("weights_sha256") and _sha256(w_path) != config["weights_sha256"]:
        raise CheckpointError(f"{w_path} does not match its recorded sha256", **where)
    tensors = load_file(str(w_path))
    extra = {k[len(EXTRA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)}
    state = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIX)}
    pcfg = ProbeXConfig.from_dict(config["probex"])
    model = ProbeX(pcfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"weights do not fit the recorded config: {e}", **where) from e
    model.eval()
    return LoadedExpert(model=model, config=config, probex_config=pcfg, extra=extra, path=path)


def load_current(experts_dir: str | os.PathLike, tree_id: str) -> LoadedExpert | None:
    """The tree's current expert, or None when it has none yet."""
    folder = tree_dir(experts_dir, tree_id)
    if current_version(folder) is None:
        return None
    return load_expert(folder)
