"""scikit-learn's bundled 8x8 handwritten digits (1797 real images, no download)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from kfqn.core.components import Option
from kfqn.runner.data.base import DatasetComponent, DataSplits


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Images (1797, 8, 8) float32 in 0..16 and labels (1797,) int64 of scikit-learn's digits.

    Read straight from the file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``),
    which avoids importing scikit-learn (seconds); falls back to ``load_digits``.
    """
    spec = importlib.util.find_spec("sklearn")
    for base in (spec.submodule_search_locations or []) if spec else []:
        path = Path(base) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            data = np.loadtxt(path, delimiter=",", dtype=np.float32)
            return (np.ascontiguousarray(data[:, :-1].reshape(-1, 8, 8)),
                    data[:, -1].astype(np.int64))
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.asarray(bunch.images, np.float32), np.asarray(bunch.target, np.int64)


class DigitsDataset(DatasetComponent):
    """UCI optical digits as shipped with scikit-learn: 8x8 images, values 0..16, 10 classes.

    The train/test split is a random split fixed by ``data.seed``; pixels are scaled to [0, 1].
    ``standardize`` then subtracts the training mean and divides by the training standard
    deviation (one scalar each, as for a one-channel image).
    """

    name = "digits"
    description = "scikit-learn's 8x8 handwritten digits (1797 real images, embedded, no download)"
    options = {
        "test_fraction": Option(0.2, "fraction of the 1797 images held out for testing",
                                float, low=0.0, high=1.0, open_low=True, open_high=True),
        "standardize": Option(False, "standardise inputs with the training mean/std", bool),
    }

    def load(self, root: Path, seed: int, download: bool = False, **options: Any) -> DataSplits:
        images, target = load_digits_arrays()
        x = torch.from_numpy(images)[:, None] / 16.0
        y = torch.from_numpy(target)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        n_test = max(1, int(round(options["test_fraction"] * len(x))))
        test_idx, train_idx = perm[:n_test], perm[n_test:]
        mean = std = None
        if options["standardize"]:
            mean = [float(x[train_idx].mean())]
            std = [float(x[train_idx].std())]
        return DataSplits(
            train=TensorDataset(x[train_idx], y[train_idx]),
            test=TensorDataset(x[test_idx], y[test_idx]),
            input_shape=(1, 8, 8),
            num_classes=10,
            mean=mean,
            std=std,
        )
