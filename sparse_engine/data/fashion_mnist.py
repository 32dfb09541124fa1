"""Fashion-MNIST from IDX files (Debian's ``dataset-fashion-mnist`` or a directory of your own).

Nothing is downloaded: ``make demo`` installs the Debian package where apt is available, or you
point ``data_dir`` (``--data-dir`` on the command line, or ``SPARSE_ENGINE_DATA``) at a directory
holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte``, each optionally gzipped.
"""
import gzip
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

DEFAULT_DIRS = ("/usr/share/datasets/fashion-mnist",)
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# Pixel statistics of the Fashion-MNIST training set.
MEAN, STD = 0.2860, 0.3530


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a numpy array of its stored shape."""
    path = Path(path)
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)  # one call: faster than reading a GzipFile in chunks
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"{path}: expected unsigned-byte IDX data (type 0x08), got type {data[2]:#x}")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says shape {dims} but the file holds {body.size} values")
    return body.reshape(dims)


def _find(directory: Path, name: str) -> Optional[Path]:
    for candidate in (directory / name, directory / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def resolve_data_dir(data_dir: Optional[Union[str, Path]] = None) -> Path:
    """The directory to read: ``data_dir``, else ``$SPARSE_ENGINE_DATA``, else Debian's location."""
    candidates = [data_dir] if data_dir is not None else (
        [os.environ["SPARSE_ENGINE_DATA"]] if os.environ.get("SPARSE_ENGINE_DATA") else list(DEFAULT_DIRS))
    for directory in candidates:
        directory = Path(directory)
        if all(_find(directory, n) for names in _FILES.values() for n in names):
            return directory
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files not found in {', '.join(map(str, candidates))}. Install Debian's package "
        "(`apt-get install dataset-fashion-mnist`, which `make demo` does where apt is available), or pass "
        "--data-dir DIR (or set SPARSE_ENGINE_DATA) to a directory with train-images-idx3-ubyte[.gz], "
        "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz].")


def load_fashion_mnist(split: str = "train", data_dir: Optional[Union[str, Path]] = None,
                       normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``float32 (n, 1, 28, 28)`` (standardised if ``normalize``) and labels ``int64 (n,)``."""
    if split not in _FILES:
        raise ValueError(f"split: expected one of {tuple(_FILES)}, got {split!r}")
    directory = resolve_data_dir(data_dir)
    images = read_idx(_find(directory, _FILES[split][0]))
    labels = read_idx(_find(directory, _FILES[split][1]))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{directory}: images {images.shape} and labels {labels.shape} do not match")
    return torch.from_numpy(_pixel_values(normalize)[images]).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _pixel_values(normalize: bool) -> np.ndarray:
    """The float32 value of each of the 256 pixel bytes: ``byte / 255``, standardised if ``normalize``.
    A lookup table: one pass over the images instead of three (the same float32 operations, so the
    same bits as converting the images themselves)."""
    values = torch.from_numpy(np.arange(256, dtype=np.uint8).astype(np.float32) / 255.0)
    if normalize:
        values = (values - MEAN) / STD
    return values.numpy()
