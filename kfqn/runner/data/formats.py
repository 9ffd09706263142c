"""Small readers (and writers, for tests and tools) of the on-disk formats of common data sets.

- IDX (MNIST, Fashion-MNIST): ``*-idx3-ubyte`` / ``*-idx1-ubyte``, optionally gzip-compressed.
- CIFAR-10 / CIFAR-100 "python version": pickled batches with ``data`` (N x 3072 uint8, rows
  of R, G, B planes) and ``labels`` / ``fine_labels`` / ``coarse_labels``.
- SVHN cropped digits: MATLAB ``.mat`` files with ``X`` (32 x 32 x 3 x N) and ``y`` (N x 1,
  digit 0 stored as 10); read with :mod:`scipy.io` (installed with scikit-learn).

None of these needs torchvision.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {np.dtype(v).newbyteorder("=").kind + str(np.dtype(v).itemsize): k
              for k, v in _IDX_DTYPES.items()}


def _open(path: Path, mode: str = "rb"):
    return gzip.open(path, mode) if str(path).endswith(".gz") else open(path, mode)


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file (``.gz`` is decompressed on the fly)."""
    path = Path(path)
    with _open(path) as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4]!r})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    count = int(np.prod(dims)) if dims else 1
    offset = 4 + 4 * ndim
    if len(raw) - offset < count * dtype.itemsize:
        raise ValueError(f"{path} is truncated: header says {dims}, file has "
                         f"{len(raw) - offset} data bytes")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
    return data.reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file (gzip-compressed when ``path`` ends in ``.gz``)."""
    path = Path(path)
    array = np.asarray(array)
    key = array.dtype.kind + str(array.dtype.itemsize)
    if key not in _IDX_CODES:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    code = _IDX_CODES[key]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _open(path, "wb") as f:
        f.write(header + body)
    return path


def _key(batch: dict, name: str) -> Any:
    """``batch[name]`` for pickles written with str keys or (Python 2 originals) bytes keys."""
    if name in batch:
        return batch[name]
    if name.encode() in batch:
        return batch[name.encode()]
    raise KeyError(name)


def read_cifar_batch(path: str | Path, label_key: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of one CIFAR pickle batch."""
    path = Path(path)
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    try:
        data = np.asarray(_key(batch, "data"), dtype=np.uint8)
        labels = np.asarray(_key(batch, label_key), dtype=np.int64)
    except KeyError as exc:
        raise ValueError(f"{path} is not a CIFAR batch: no {exc.args[0]!r} entry") from None
    return data.reshape(-1, 3, 32, 32), labels


def write_cifar_batch(path: str | Path, images: np.ndarray, labels: dict[str, np.ndarray],
                      bytes_keys: bool = False) -> Path:
    """Write a CIFAR-format pickle batch (``images`` N x 3 x 32 x 32 uint8).

    ``labels`` maps label keys (``labels``; ``fine_labels``/``coarse_labels`` for CIFAR-100) to
    label arrays. ``bytes_keys`` writes keys as bytes, as the original Python 2 files do.
    """
    path = Path(path)
    images = np.asarray(images, dtype=np.uint8)
    batch = {"data": images.reshape(len(images), -1)}
    batch.update({k: [int(v) for v in vals] for k, vals in labels.items()})
    if bytes_keys:
        batch = {k.encode(): v for k, v in batch.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return path


def read_svhn_mat(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) in 0..9 from an SVHN ``*_32x32.mat`` file."""
    from scipy.io import loadmat

    mat = loadmat(str(path))
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"{path} is not an SVHN .mat file (needs variables X and y)")
    x = np.transpose(mat["X"], (3, 2, 0, 1)).astype(np.uint8)
    y = mat["y"].astype(np.int64).reshape(-1) % 10  # the digit 0 is stored as 10
    return np.ascontiguousarray(x), y


def write_svhn_mat(path: str | Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write images (N, 3, 32, 32) and labels (0..9) in the SVHN ``.mat`` layout."""
    from scipy.io import savemat

    path = Path(path)
    x = np.transpose(np.asarray(images, dtype=np.uint8), (2, 3, 1, 0))
    y = np.asarray(labels, dtype=np.uint8).reshape(-1, 1).copy()
    y[y == 0] = 10
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), {"X": x, "y": y})
    return path
