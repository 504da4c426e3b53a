"""One rule for turning a repo or tree id into one path component (shard and expert folders)."""

from __future__ import annotations

import re


def slug(repo_id: str) -> str:
    """'org/name' -> 'org--name' (as the Hub cache does); other unsafe characters -> '_'.

    Hub ids only hold letters, digits, '.', '_', '-' and one '/', so for them this is reversible."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", repo_id.replace("/", "--")).strip(".")
    return s or "_"
