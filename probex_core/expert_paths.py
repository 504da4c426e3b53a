"""Where a tree's experts live in an experts store, as names only (no I/O, no torch).

    experts/<tree_slug>/<version>/model.safetensors   one checkpoint per version (checkpoint.py)
    experts/<tree_slug>/<version>/config.json         written last: a version without it is
                                                      incomplete and never listed or loaded
    experts/<tree_slug>/current                       one line: the version in use

`experts` is a folder or an object-store URI; storage/experts.py reads and writes these names.
"""

from __future__ import annotations

import os

from .names import slug as tree_slug

CURRENT = "current"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def tree_dir(experts_dir: str | os.PathLike, tree_id: str) -> str:
    """The tree's folder (a path or URI: joined with "/", which keeps an s3:// prefix intact)."""
    return os.fspath(experts_dir).rstrip("/") + "/" + tree_slug(tree_id)


def parse_current(text: str) -> str | None:
    """The version a `current` object names (None when it is empty)."""
    return text.strip() or None
