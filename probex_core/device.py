"""Device choice and seeding: CUDA when there is one, else the CPU with an explicit thread count."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def cpu_count() -> int:
    """Cores this process may use (respects affinity / container limits)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# A process-wide default thread count, below PROBEX_TORCH_THREADS: a Dask worker sets it to the
# threads it was started with (`--nthreads`), its share of the machine, instead of every core.
_default_threads: int | None = None


def set_default_threads(n: int | None) -> None:
    global _default_threads
    _default_threads = n if n and n > 0 else None


def resolve_device(preference: str = "auto") -> torch.device:
    """"auto" -> cuda when available else cpu; "cpu" / "cuda" / "cuda:N" as given."""
    pref = (preference or "auto").lower()
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {preference!r} requested but CUDA is not available")
    return torch.device(pref)


def device_name(preference: str = "auto") -> str:
    """Where `preference` trains in this process, as a checkpoint records it: "cpu" or the CUDA
    device's name (e.g. "NVIDIA H200")."""
    device = resolve_device(preference)
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device.index if device.index is not None else torch.cuda.current_device())


def pick_device(preference: str = "auto", threads: int | None = None) -> torch.device:
    """The device `resolve_device` names, with torch's CPU thread count set explicitly.

    Always sets torch's CPU thread count explicitly (Dask sets OMP_NUM_THREADS=1 in the parent
    process, which would otherwise silently make torch single-threaded): `threads`, else
    $PROBEX_TORCH_THREADS, else the process default (`set_default_threads`), else every core this
    process may use.
    """
    n = threads or int(os.environ.get("PROBEX_TORCH_THREADS") or 0) or _default_threads or cpu_count()
    torch.set_num_threads(n)
    return resolve_device(preference)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch (CPU and CUDA).

    The CPU kernels used here (matmul, Adam, reductions) are deterministic for a fixed thread
    count, so CPU runs repeat exactly. With `deterministic` and CUDA present, also ask torch for
    deterministic CUDA kernels (best effort). (torch.use_deterministic_algorithms is not called
    on CPU-only machines: it imports torch._inductor, seconds of start-up for nothing there.)"""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic and torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
