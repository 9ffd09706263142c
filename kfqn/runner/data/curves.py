"""CURVES: synthetic 28x28 images of curves through three random points.

A generator of the recipe of Hinton & Salakhutdinov (Science 2006), used by P2 as an
autoencoder benchmark. Exact rules of this generator (version 1):

- Three points are drawn uniformly in ``[margin, size - 1 - margin]^2`` (pixel-centre
  coordinates, x = column, y = row), redrawn until every two are ``min_separation`` apart, and
  ordered so that the two farthest apart are the ends p0, p2 (a smooth curve, no cusp).
- The curve is the quadratic ``c(t)`` with ``c(0) = p0``, ``c(t1) = p1``, ``c(1) = p2`` where
  ``t1 = |p1 - p0| / (|p1 - p0| + |p2 - p1|)`` (chord-length parameter), for t in [0, 1].
- Pixel intensity is ``exp(-d^2 / (2 sigma^2))`` with d the distance from the pixel centre to the
  curve (to points sampled along it at most 0.25 px apart), 0 where d > 3 sigma; values lie in
  [0, 1] and are stored quantised to uint8.

Deterministic by ``seed`` (NumPy PCG64); cached as ``.npz`` under ``<root>/curves``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from kfqn.core.components import Option
from kfqn.runner.data.base import DatasetComponent, DataSplits

GENERATOR_VERSION = 1
_SPACING = 0.25
_BLOCK = 1000


def sample_points(rng: np.random.Generator, n: int, size: int, margin: float,
                  min_separation: float) -> np.ndarray:
    """``n`` triples of points (n, 3, 2), pairwise ``min_separation`` apart, ends farthest apart."""
    lo, hi = margin, size - 1 - margin
    if hi - lo < min_separation:
        raise ValueError(f"image size {size} with margin {margin} leaves no room for points "
                         f"{min_separation} apart")
    out = np.empty((n, 3, 2))
    filled = 0
    while filled < n:
        cand = rng.uniform(lo, hi, size=(max(2 * (n - filled), 16), 3, 2))
        d = np.linalg.norm(cand[:, [0, 1, 2]] - cand[:, [1, 2, 0]], axis=-1)
        ok = cand[(d >= min_separation).all(axis=1)][: n - filled]
        out[filled:filled + len(ok)] = ok
        filled += len(ok)
    # the two points farthest apart are the ends: side i joins points i and i+1 (mod 3)
    d = np.linalg.norm(out[:, [0, 1, 2]] - out[:, [1, 2, 0]], axis=-1)
    order = np.array([[0, 2, 1], [1, 0, 2], [2, 1, 0]])[d.argmax(axis=1)]
    return np.take_along_axis(out, order[:, :, None], axis=1)


def curve_points(points: np.ndarray, samples: int | np.ndarray) -> np.ndarray:
    """Points on the quadratic through each triple, shape (n, K, 2).

    ``samples``: K evenly spaced t in [0, 1], or an array of t values, (K,) or (n, K).
    """
    p0, p1, p2 = points[:, 0], points[:, 1], points[:, 2]
    d01 = np.linalg.norm(p1 - p0, axis=-1)
    d12 = np.linalg.norm(p2 - p1, axis=-1)
    t1 = (d01 / (d01 + d12))[:, None, None]
    t = np.linspace(0.0, 1.0, samples) if np.isscalar(samples) else np.asarray(samples)
    t = np.broadcast_to(t, (len(points), t.shape[-1]))[:, :, None]
    l0 = (t - t1) * (t - 1.0) / t1
    l1 = t * (t - 1.0) / (t1 * (t1 - 1.0))
    l2 = t * (t - t1) / (1.0 - t1)
    return l0 * p0[:, None] + l1 * p1[:, None] + l2 * p2[:, None]


def _sample_params(points: np.ndarray) -> np.ndarray:
    """Per-image t values (n, K): ``ceil(length / _SPACING)`` even steps, padded with t = 1.

    Each image's samples depend on that image only, so an image renders the same in any batch.
    """
    coarse = curve_points(points, 65)
    length = np.linalg.norm(np.diff(coarse, axis=1), axis=-1).sum(1)
    k = np.clip(np.ceil(1.05 * length / _SPACING).astype(int), 16, 4096)
    j = np.arange(k.max())[None, :]
    return np.minimum(j / (k[:, None] - 1), 1.0)


def render(points: np.ndarray, size: int, sigma: float, chunk: int = 256) -> np.ndarray:
    """Images (n, size, size) in [0, 1] of the curves through ``points`` (n, 3, 2).

    Each pixel gets ``exp(-d^2 / (2 sigma^2))`` with d its distance to the nearest of a dense
    set of curve points (spacing at most ``_SPACING`` pixels), and 0 where d > 3 sigma.
    """
    cutoff2 = (3.0 * sigma) ** 2
    r = math.ceil(3.0 * sigma + 0.5)
    rng = torch.arange(-r, r + 1, dtype=torch.float32)
    off = torch.stack(torch.meshgrid(rng, rng, indexing="xy"), -1).reshape(-1, 2)  # (W, 2)
    out = torch.zeros(len(points) * size * size)
    for start in range(0, len(points), chunk):
        pts = points[start:start + chunk]
        c = torch.from_numpy(curve_points(pts, _sample_params(pts))).to(torch.float32)  # (B,K,2)
        cand = c.round()[:, :, None, :] + off  # (B, K, W, 2) pixel candidates near the curve
        d2 = ((cand - c[:, :, None, :]) ** 2).sum(-1)
        val = torch.exp(d2 / (-2.0 * sigma * sigma))
        inside = ((cand >= 0) & (cand <= size - 1)).all(-1) & (d2 <= cutoff2)
        img = torch.arange(start, start + len(c), dtype=torch.float32)[:, None, None]
        idx = (img * size + cand[..., 1]) * size + cand[..., 0]
        out.scatter_reduce_(0, idx[inside].long(), val[inside], reduce="amax")
    return out.view(-1, size, size).numpy()


def generate_curves(n: int, seed: int, size: int = 28, sigma: float = 0.8, margin: float = 1.0,
                    min_separation: float = 6.0, stream: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` CURVES images (n, size, size) float32 in [0, 1] and their points (n, 3, 2).

    Images come in blocks of 1000 drawn from ``PCG64([seed, stream, block])``, so the first k
    images do not depend on ``n`` (a smaller data set is a prefix of a larger one). The
    training split uses stream 0, the test split stream 1.
    """
    blocks = []
    for block, start in enumerate(range(0, n, _BLOCK)):
        rng = np.random.Generator(np.random.PCG64([seed, stream, block]))
        blocks.append(sample_points(rng, min(_BLOCK, n - start), size, margin, min_separation))
    points = np.concatenate(blocks) if blocks else np.empty((0, 3, 2))
    return render(points, size, sigma), points


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def _load_cached(path: Path, split: str) -> np.ndarray | None:
    """The cached ``split`` array, or None when absent or damaged (it is then regenerated)."""
    if not path.exists():
        return None
    try:
        with np.load(path) as f:
            return f[split]
    except (OSError, ValueError, KeyError):
        return None


class CurvesDataset(DatasetComponent):
    """The CURVES autoencoder benchmark, generated locally (no download)."""

    name = "curves"
    description = "CURVES: 28x28 curves through 3 random points (Hinton & Salakhutdinov), generated"
    options = {
        "n_train": Option(20000, "training images (the original has 20000)", int, low=1),
        "n_test": Option(10000, "test images (the original has 10000)", int, low=1),
        "size": Option(28, "image side in pixels", int, low=8),
        "sigma": Option(0.8, "ink width: std of the Gaussian intensity profile, pixels",
                        float, low=0.0, open_low=True),
        "min_separation": Option(6.0, "minimal distance between the three points, pixels",
                                 float, low=0.0),
        "cache": Option(True, "cache the generated arrays under <root>/curves", bool),
    }

    def load(self, root: Path, seed: int, download: bool = False, **options: Any) -> DataSplits:
        n_train, n_test, cache = options["n_train"], options["n_test"], options["cache"]
        gen = {k: options[k] for k in ("size", "sigma", "min_separation")}
        key = json.dumps({"v": GENERATOR_VERSION, "seed": seed, **gen}, sort_keys=True)
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        path = (Path(root).expanduser() / "curves"
                / f"curves-{n_train}-{n_test}-s{seed}-{digest}.npz")
        splits, generated = {}, False
        for split, n, stream in (("train", n_train, 0), ("test", n_test, 1)):
            images = _load_cached(path, split) if cache else None
            if images is None:
                x, _ = generate_curves(n, seed, stream=stream, **gen)
                images, generated = np.round(x * 255.0).astype(np.uint8), True
            splits[split] = images
        if cache and generated:
            _atomic_savez(path, **splits)
        tensors = {}
        for split, images in splits.items():
            x = torch.from_numpy(images[:, None])  # (N, 1, size, size) uint8
            tensors[split] = TensorDataset(x, torch.zeros(len(x), dtype=torch.int64))
        return DataSplits(
            train=tensors["train"],
            test=tensors["test"],
            input_shape=(1, gen["size"], gen["size"]),
            num_classes=None,
            scale=1.0 / 255.0,
        )
