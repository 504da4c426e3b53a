"""Fashion-MNIST from the Debian package `dataset-fashion-mnist`: IDX gz files read with numpy.

Also home of the zoo's error types: this is the lowest zoo module, so every other one can import
them without an import cycle.
"""

from __future__ import annotations

import functools
import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoo.types import ZooDataError, ZooError  # noqa: F401  (re-exported for callers)

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DATASET_ID = "fashion_mnist"  # the Hub's dataset id, for model cards


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, (n, 28, 28)
    labels: np.ndarray  # int64, (n,), indices into CLASSES


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file: a big-endian header (magic, dims) followed by raw uint8 data."""
    if not path.exists():
        raise ZooDataError(f"Fashion-MNIST not found at {path}: install it with "
                           "`apt-get install dataset-fashion-mnist`")
    with gzip.open(path, "rb") as f:
        raw = f.read()
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise ZooDataError(f"{path} is not an IDX file (magic {got:#x}): reinstall it with "
                           "`apt-get install --reinstall dataset-fashion-mnist`")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@functools.cache
def load_split(split: str, data_dir: Path | None = None) -> Split:
    """split: "train" (60k) or "t10k" (10k); read once per process."""
    data_dir = data_dir or DATA_DIR
    images = _read_idx(data_dir / f"{split}-images-idx3-ubyte.gz", 0x803)
    labels = _read_idx(data_dir / f"{split}-labels-idx1-ubyte.gz", 0x801)
    return Split(images, labels.astype(np.int64))
