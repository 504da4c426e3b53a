"""Expert checkpoints at any store URI (a folder, file://, s3://, gs://, az://): the byte I/O of
`probex_core/checkpoint.py`'s (de)serialisation, with the layout of `probex_core/expert_paths.py`.

A save never touches what a reader uses until the new version is whole:
- local folder: both files go into a hidden temp folder, are fsynced, and the folder is renamed
  to its (new, unique) version; then `current` is replaced atomically (os.replace);
- object store: the version's objects are published one by one (storage/fs.py `publish`: temp key,
  then the final key), config.json last, since a version without it is never listed or loaded;
  only then is `current` published.
A failed save removes what it wrote and leaves `current` (and the version it names) untouched.
Versions are never overwritten.

torch is imported only when a checkpoint is encoded or decoded: reading `current` stays cheap.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from probex_core.expert_paths import CONFIG, CURRENT, WEIGHTS, parse_current, tree_dir, tree_slug  # noqa: F401
from probex_core.settings import ENV_EXPERTS
from storage.fs import exists, is_file, is_local, join, listdir, publish, read_bytes, resolve, translate

if TYPE_CHECKING:
    import torch

    from probex_core.checkpoint import LoadedExpert
    from probex_core.probex import ProbeX


@dataclass(frozen=True)
class ExpertVersion:
    """A saved version: `name` is the version and `parent` the tree's folder, as with the version
    folder's Path that a save used to return (here paths or URIs, as strings)."""

    uri: str

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[0]

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:  # so it opens wherever the old Path did (and any store function)
        return self.uri


def _checkpoint_error(message: str, **where):
    from probex_core.checkpoint import CheckpointError

    return CheckpointError(message, **where)


def current_version(tree_folder: str | os.PathLike) -> str | None:
    """The version `current` names in a tree's folder, or None when it has none yet."""
    fs, base = resolve(tree_folder, ENV_EXPERTS)
    with translate(tree_folder, ENV_EXPERTS):
        return _read_current(fs, base)


def _read_current(fs, base: str) -> str | None:
    try:
        return parse_current(read_bytes(fs, join(base, CURRENT)).decode())
    except FileNotFoundError:
        return None


def list_versions(tree_folder: str | os.PathLike) -> list[str]:
    """Complete versions (config.json present), oldest first; a save's temp folder or a version
    missing its config.json is skipped. One listing, also on an object store."""
    fs, base = resolve(tree_folder, ENV_EXPERTS)
    with translate(tree_folder, ENV_EXPERTS):
        infos = listdir(fs, base, recursive=True)
    out = set()
    for info in infos:
        parts = info.path[len(base):].strip("/").split("/")
        if len(parts) == 2 and parts[1] == CONFIG and not parts[0].startswith("."):
            out.add(parts[0])
    return sorted(out)


def save_expert(experts_dir: str | os.PathLike, tree_id: str, model: "ProbeX", *, layer: str,
                labels: list[str], text_encoder: str | None = None, prompt: str | None = None,
                metrics: dict | None = None, extra_tensors: "dict[str, torch.Tensor] | None" = None,
                info: dict | None = None, version: str | None = None,
                make_current: bool = True) -> ExpertVersion:
    """Write a new version of `tree_id`'s expert and (by default) point `current` at it.

    labels: the label vocabulary in output order (multilabel) or the training classes (text).
    extra_tensors: e.g. {"class_text_emb": (k, text_dim)} so the expert can score its classes
    without re-running the text encoder. info: any other JSON-able facts (n_train, seconds, ...)."""
    from probex_core import checkpoint as ck

    folder = tree_dir(experts_dir, tree_id)
    fs, base = resolve(folder, ENV_EXPERTS)
    version = version or ck.new_version()
    final = join(base, version)
    with translate(folder, ENV_EXPERTS):
        if exists(fs, final):
            raise ck.CheckpointError(f"version {version} already exists; versions are never overwritten",
                                     tree=tree_id, layer=layer)
    weights, config = ck.encode_expert(tree_id, model, version=version, layer=layer, labels=labels,
                                       text_encoder=text_encoder, prompt=prompt, metrics=metrics,
                                       extra_tensors=extra_tensors, info=info)
    with translate(folder, ENV_EXPERTS):
        if is_local(folder):
            _save_local(base, version, weights, config)
        else:
            _save_objects(fs, final, weights, config)
    if make_current:
        set_current(folder, version)
    return ExpertVersion(join(folder, version))


def _save_local(base: str, version: str, weights: bytes, config: bytes) -> None:
    os.makedirs(base, exist_ok=True)
    tmp = os.path.join(base, f".tmp-{version}-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)
    try:
        for name, data in ((WEIGHTS, weights), (CONFIG, config)):
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, os.path.join(base, version))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_objects(fs, final: str, weights: bytes, config: bytes) -> None:
    """An object store has no folder rename: the weights first, config.json last (what makes the
    version complete); on failure the objects already written are removed."""
    written = []
    try:
        for name, data in ((WEIGHTS, weights), (CONFIG, config)):
            path = join(final, name)
            publish(fs, path, data)
            written.append(path)
    except BaseException:
        for path in written:
            try:
                fs.delete_file(path)
            except OSError:  # unreachable store: without config.json the version stays invisible
                pass
        raise


def set_current(tree_folder: str | os.PathLike, version: str) -> None:
    """Atomically point `current` at an existing, complete version."""
    fs, base = resolve(tree_folder, ENV_EXPERTS)
    with translate(tree_folder, ENV_EXPERTS):
        if not is_file(fs, join(base, version, CONFIG)):
            raise _checkpoint_error(f"no complete checkpoint {version} under {os.fspath(tree_folder)}")
        publish(fs, join(base, CURRENT), (version + "\n").encode(), durable=True)


def load_expert(location: str | os.PathLike, version: str | None = None, verify: bool = True) -> "LoadedExpert":
    """Load a version folder, a tree folder's `version`, or a tree folder's current version.
    safetensors + JSON only; verify: check the weights' recorded sha256."""
    from probex_core.checkpoint import decode_expert

    where = os.fspath(location)
    fs, base = resolve(where, ENV_EXPERTS)
    with translate(where, ENV_EXPERTS):
        if version is None and not is_file(fs, join(base, CONFIG)):
            version = _read_current(fs, base)
        if version is not None:
            base, where = join(base, version), join(where, version)
        try:
            config = read_bytes(fs, join(base, CONFIG))
            weights = read_bytes(fs, join(base, WEIGHTS))
        except FileNotFoundError:
            raise _checkpoint_error(f"no expert checkpoint at {where}") from None
    return decode_expert(config, weights, where, verify=verify)


def load_current(experts_dir: str | os.PathLike, tree_id: str) -> "LoadedExpert | None":
    """The tree's current expert, or None when it has none yet."""
    folder = tree_dir(experts_dir, tree_id)
    version = current_version(folder)
    if version is None:
        return None
    return load_expert(folder, version)
