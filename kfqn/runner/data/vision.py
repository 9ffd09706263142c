"""Standard image data sets read from a local root: MNIST, Fashion-MNIST, CIFAR-10/100, SVHN.

The files are read by the small readers of :mod:`kfqn.runner.data.formats`, so torchvision is
not needed once the files are on disk. Both a plain layout and torchvision's layout are found:

=============  ======================================================================
data set       files looked for under ``data.root``
=============  ======================================================================
mnist          ``mnist/`` or ``MNIST/raw/``: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``
fashion_mnist  ``fashion_mnist/`` or ``FashionMNIST/raw/``: the same four IDX files
cifar10        ``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5``, ``test_batch``
cifar100       ``cifar-100-python/``: ``train``, ``test``
svhn           ``svhn/`` or the root itself: ``train_32x32.mat``, ``test_32x32.mat``
=============  ======================================================================

With ``data.download: true`` a missing data set is fetched through torchvision (the optional
extra ``pip install 'kfqn[vision]'``) where the network allows.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

from kfqn.core.components import Option
from kfqn.runner.data import formats
from kfqn.runner.data.base import DatasetComponent, DataSplits
from kfqn.runner.errors import DataUnavailableError

_SUBSET_OPTIONS = {
    "n_train": Option(None, "use only the first n training images (null: all)", int,
                      low=1, nullable=True),
    "n_test": Option(None, "use only the first n test images (null: all)", int,
                     low=1, nullable=True),
}


def import_torchvision(purpose: str):
    """torchvision, imported lazily; a :class:`DataUnavailableError` saying how to install it."""
    try:
        return importlib.import_module("torchvision")
    except ImportError as exc:
        raise DataUnavailableError(
            f"{purpose} needs torchvision, which is not installed ({exc}). Install the optional "
            "extra with: pip install 'kfqn[vision]'  (or place the files by hand, see "
            "kfqn.runner.data.vision)"
        ) from None


def _find(root: Path, dirs: Sequence[str], names: Sequence[str]) -> Optional[dict[str, Path]]:
    """The first directory under ``root`` holding every file of ``names`` (``.gz`` allowed)."""
    for d in dirs:
        base = root / d
        found = {}
        for n in names:
            for cand in (base / n, base / f"{n}.gz"):
                if cand.is_file():
                    found[n] = cand
                    break
        if len(found) == len(names):
            return found
    return None


def _subset(x: torch.Tensor, y: torch.Tensor, n: Optional[int]) -> TensorDataset:
    return TensorDataset(x[:n], y[:n]) if n else TensorDataset(x, y)


def _channel_stats(x: torch.Tensor, scale: float) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, C, H, W) after scaling."""
    xf = x.to(torch.float64) * scale
    dims = [0] + list(range(2, x.dim()))
    return xf.mean(dims).tolist(), xf.std(dims).tolist()


class _LocalImageDataset(DatasetComponent):
    """Common behaviour: look for files, optionally download, build :class:`DataSplits`."""

    #: subdirectories of the root searched in order, and the files that must be there
    dirs: ClassVar[Sequence[str]] = ()
    files: ClassVar[Sequence[str]] = ()
    source_hint: ClassVar[str] = ""
    num_classes: ClassVar[int] = 10

    def _download(self, root: Path) -> None:
        raise NotImplementedError

    def _locate(self, root: Path, download: bool) -> dict[str, Path]:
        found = _find(root, self.dirs, self.files)
        if found is None and download:
            self._download(root)
            found = _find(root, self.dirs, self.files)
        if found is None:
            where = " or ".join(str(root / d) for d in self.dirs)
            raise DataUnavailableError(
                f"data set {self.name!r} not found: looked for {', '.join(self.files)} in "
                f"{where}. Either place the files there ({self.source_hint}), set data.root to "
                "where they are, or set data.download=true with torchvision installed "
                "(pip install 'kfqn[vision]') and network access."
            )
        return found

    def _splits(self, x_tr, y_tr, x_te, y_te, options: dict, standardize: bool) -> DataSplits:
        x_tr, y_tr = torch.from_numpy(x_tr), torch.from_numpy(y_tr.astype(np.int64))
        x_te, y_te = torch.from_numpy(x_te), torch.from_numpy(y_te.astype(np.int64))
        train = _subset(x_tr, y_tr, options.get("n_train"))
        test = _subset(x_te, y_te, options.get("n_test"))
        mean = std = None
        if standardize:
            mean, std = _channel_stats(train.tensors[0], 1.0 / 255.0)
        return DataSplits(train, test, tuple(x_tr.shape[1:]), self.num_classes,
                          scale=1.0 / 255.0, mean=mean, std=std)


class _IdxDataset(_LocalImageDataset):
    files = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    options = {
        **_SUBSET_OPTIONS,
        "standardize": Option(False, "standardise with the training mean/std (else [0, 1])", bool),
    }
    tv_class: ClassVar[str] = ""

    def _download(self, root: Path) -> None:
        tv = import_torchvision(f"downloading {self.name!r}")
        cls = getattr(tv.datasets, self.tv_class)
        for train in (True, False):
            cls(str(root), train=train, download=True)

    def load(self, root: Path, seed: int, download: bool = False, **options: Any) -> DataSplits:
        f = self._locate(Path(root).expanduser(), download)
        read = lambda k: formats.read_idx(f[k])  # noqa: E731
        x_tr, x_te = read(self.files[0])[:, None], read(self.files[2])[:, None]
        return self._splits(x_tr, read(self.files[1]), x_te, read(self.files[3]), options,
                            options["standardize"])


class MnistDataset(_IdxDataset):
    """MNIST handwritten digits (28x28, 60000/10000), from local IDX files."""

    name = "mnist"
    description = "MNIST 28x28 digits from local IDX files (download via torchvision optional)"
    dirs = ("mnist", "MNIST/raw")
    tv_class = "MNIST"
    source_hint = "from https://ossci-datasets.s3.amazonaws.com/mnist/ or yann.lecun.com/exdb/mnist"


class FashionMnistDataset(_IdxDataset):
    """Fashion-MNIST (28x28, 60000/10000), from local IDX files."""

    name = "fashion_mnist"
    description = "Fashion-MNIST 28x28 from local IDX files (download via torchvision optional)"
    dirs = ("fashion_mnist", "FashionMNIST/raw")
    tv_class = "FashionMNIST"
    source_hint = "from https://github.com/zalandoresearch/fashion-mnist (data/fashion)"


_CIFAR_OPTIONS = {
    **_SUBSET_OPTIONS,
    "standardize": Option(True, "standardise each channel with the training mean/std", bool),
}


class Cifar10Dataset(_LocalImageDataset):
    """CIFAR-10 (32x32 RGB, 50000/10000, 10 classes) from the python pickle batches."""

    name = "cifar10"
    description = "CIFAR-10 from the local python batches (download via torchvision optional)"
    augmentation = "crop_flip"
    dirs = ("cifar-10-batches-py",)
    files = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
    options = _CIFAR_OPTIONS
    source_hint = "extract cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html"

    def _download(self, root: Path) -> None:
        tv = import_torchvision(f"downloading {self.name!r}")
        tv.datasets.CIFAR10(str(root), train=True, download=True)

    def load(self, root: Path, seed: int, download: bool = False, **options: Any) -> DataSplits:
        f = self._locate(Path(root).expanduser(), download)
        parts = [formats.read_cifar_batch(f[n]) for n in self.files[:-1]]
        x_tr = np.concatenate([p[0] for p in parts])
        y_tr = np.concatenate([p[1] for p in parts])
        x_te, y_te = formats.read_cifar_batch(f["test_batch"])
        return self._splits(x_tr, y_tr, x_te, y_te, options, options["standardize"])


class Cifar100Dataset(_LocalImageDataset):
    """CIFAR-100 (32x32 RGB, 50000/10000; 100 fine or 20 coarse classes)."""

    name = "cifar100"
    description = "CIFAR-100 from the local python pickles (download via torchvision optional)"
    augmentation = "crop_flip"
    dirs = ("cifar-100-python",)
    files = ("train", "test")
    options = {
        **_CIFAR_OPTIONS,
        "labels": Option("fine", "label set", choices=("fine", "coarse")),
    }
    source_hint = "extract cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html"

    def _download(self, root: Path) -> None:
        tv = import_torchvision(f"downloading {self.name!r}")
        tv.datasets.CIFAR100(str(root), train=True, download=True)

    def load(self, root: Path, seed: int, download: bool = False, **options: Any) -> DataSplits:
        f = self._locate(Path(root).expanduser(), download)
        key = f"{options['labels']}_labels"
        x_tr, y_tr = formats.read_cifar_batch(f["train"], key)
        x_te, y_te = formats.read_cifar_batch(f["test"], key)
        splits = self._splits(x_tr, y_tr, x_te, y_te, options, options["standardize"])
        splits.num_classes = 100 if options["labels"] == "fine" else 20
        return splits


class SvhnDataset(_LocalImageDataset):
    """SVHN cropped digits (32x32 RGB, 73257/26032) from the ``.mat`` files (needs scipy)."""

    name = "svhn"
    description = "SVHN cropped digits from local .mat files (download via torchvision optional)"
    dirs = ("svhn", ".")
    files = ("train_32x32.mat", "test_32x32.mat")
    options = _CIFAR_OPTIONS
    source_hint = "from http://ufldl.stanford.edu/housenumbers/ (format 2, cropped digits)"

    def _download(self, root: Path) -> None:
        tv = import_torchvision(f"downloading {self.name!r}")
        for split in ("train", "test"):
            tv.datasets.SVHN(str(root), split=split, download=True)

    def load(self, root: Path, seed: int, download: bool = False, **options: Any) -> DataSplits:
        f = self._locate(Path(root).expanduser(), download)
        try:
            x_tr, y_tr = formats.read_svhn_mat(f["train_32x32.mat"])
            x_te, y_te = formats.read_svhn_mat(f["test_32x32.mat"])
        except ImportError:
            raise DataUnavailableError("reading SVHN needs scipy: pip install scipy") from None
        return self._splits(x_tr, y_tr, x_te, y_te, options, options["standardize"])


VISION_DATASETS: list[type[DatasetComponent]] = [
    MnistDataset, FashionMnistDataset, Cifar10Dataset, Cifar100Dataset, SvhnDataset,
]
