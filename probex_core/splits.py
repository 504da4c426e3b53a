"""Deterministic train/val assignment of documented models, shared by the lake builder and the
trainer so that neither needs the other's bookkeeping."""

from __future__ import annotations

import hashlib

VAL_FRACTION = 0.15


def is_val(repo_id: str, val_fraction: float = VAL_FRACTION) -> bool:
    """True for a stable ~val_fraction of repo ids (sha256 of the id, so it never drifts)."""
    h = int.from_bytes(hashlib.sha256(repo_id.encode()).digest()[:8], "big")
    return (h / 2**64) < val_fraction
