"""Where a tree's experts live on disk, without loading one (no torch: cheap to import).

    experts/<tree_slug>/<version>/...   one checkpoint per version (see checkpoint.py)
    experts/<tree_slug>/current         one line: the version in use
"""

from __future__ import annotations

import os
from pathlib import Path

from .names import slug as tree_slug

CURRENT = "current"


def tree_dir(experts_dir: str | os.PathLike, tree_id: str) -> Path:
    return Path(experts_dir) / tree_slug(tree_id)


def current_version(tree_dir: str | os.PathLike) -> str | None:
    p = Path(tree_dir) / CURRENT
    return p.read_text().strip() or None if p.is_file() else None
