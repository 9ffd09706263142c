"""On-disk formats (IDX, CIFAR pickles, SVHN .mat) and the data sets that read them."""
from __future__ import annotations

import gzip
import sys

import numpy as np
import pytest
import torch

from kfqn.runner.data import formats
from kfqn.runner.data.vision import (
    Cifar10Dataset,
    Cifar100Dataset,
    FashionMnistDataset,
    MnistDataset,
    SvhnDataset,
)
from kfqn.runner.components import resolve_options
from kfqn.runner.errors import DataUnavailableError


def _load(component, root, **options):
    return component.load(root, seed=0, **resolve_options(component, options, "data.options"))


@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, name, dtype):
    arr = (np.arange(2 * 3 * 4) - 7).reshape(2, 3, 4).astype(dtype)
    if dtype == np.uint8:
        arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = formats.write_idx(tmp_path / name, arr)
    back = formats.read_idx(path)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


def test_idx_header_is_the_real_format(tmp_path):
    """Magic 0x00000803 + big-endian dims, as in MNIST's train-images-idx3-ubyte."""
    path = formats.write_idx(tmp_path / "x.gz", np.zeros((5, 28, 28), np.uint8))
    raw = gzip.open(path).read()
    assert raw[:4] == bytes([0, 0, 8, 3])
    assert raw[4:16] == (5).to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big")
    assert len(raw) == 16 + 5 * 28 * 28


def test_idx_rejects_other_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"PK\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        formats.read_idx(bad)


def _mnist_files(directory, n_train=6, n_test=4, gz=True):
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    x_tr = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    x_te = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    y_tr = rng.integers(0, 10, n_train).astype(np.uint8)
    y_te = rng.integers(0, 10, n_test).astype(np.uint8)
    formats.write_idx(directory / f"train-images-idx3-ubyte{ext}", x_tr)
    formats.write_idx(directory / f"train-labels-idx1-ubyte{ext}", y_tr)
    formats.write_idx(directory / f"t10k-images-idx3-ubyte{ext}", x_te)
    formats.write_idx(directory / f"t10k-labels-idx1-ubyte{ext}", y_te)
    return x_tr, y_tr, x_te, y_te


def test_mnist_reads_plain_layout_with_gz(tmp_path):
    x_tr, y_tr, x_te, y_te = _mnist_files(tmp_path / "mnist")
    d = _load(MnistDataset(), tmp_path)
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10
    xs, ys = d.train.tensors
    assert xs.dtype == torch.uint8 and torch.equal(xs[:, 0], torch.from_numpy(x_tr))
    assert torch.equal(ys, torch.from_numpy(y_tr.astype(np.int64)))
    assert torch.equal(d.test.tensors[1], torch.from_numpy(y_te.astype(np.int64)))
    prepared = d.prepare(xs)
    assert prepared.dtype == torch.float32 and 0.0 <= prepared.min() and prepared.max() <= 1.0


def test_fashion_mnist_reads_torchvision_layout_and_subsets(tmp_path):
    _mnist_files(tmp_path / "FashionMNIST" / "raw", gz=False)
    d = _load(FashionMnistDataset(), tmp_path, n_train=3, n_test=2)
    assert len(d.train) == 3 and len(d.test) == 2


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(DataUnavailableError) as e:
        _load(MnistDataset(), tmp_path)
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and str(tmp_path / "mnist") in msg
    assert "kfqn[vision]" in msg and "data.download=true" in msg


def test_download_without_torchvision_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails
    comp = Cifar10Dataset()
    with pytest.raises(DataUnavailableError, match=r"pip install 'kfqn\[vision\]'"):
        comp.load(tmp_path, 0, download=True, **resolve_options(comp, {}, "data.options"))


def _cifar_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar_batch_round_trip(tmp_path, bytes_keys):
    x = _cifar_images(3, 0)
    path = formats.write_cifar_batch(tmp_path / "b", x, {"labels": np.array([1, 2, 3])},
                                     bytes_keys=bytes_keys)
    back, labels = formats.read_cifar_batch(path)
    np.testing.assert_array_equal(back, x)
    assert labels.tolist() == [1, 2, 3]


def test_cifar_rows_are_channel_planes(tmp_path):
    """CIFAR stores each image as 1024 red, then 1024 green, then 1024 blue bytes."""
    x = np.zeros((1, 3, 32, 32), np.uint8)
    x[0, 1] = 7  # the green plane
    formats.write_cifar_batch(tmp_path / "b", x, {"labels": [0]})
    import pickle

    raw = pickle.load(open(tmp_path / "b", "rb"))["data"][0]
    assert (raw[:1024] == 0).all() and (raw[1024:2048] == 7).all() and (raw[2048:] == 0).all()


def test_cifar10_dataset(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    for i in range(1, 6):
        formats.write_cifar_batch(root / f"data_batch_{i}", _cifar_images(2, i),
                                  {"labels": [i % 10, (i + 1) % 10]}, bytes_keys=True)
    formats.write_cifar_batch(root / "test_batch", _cifar_images(3, 9), {"labels": [0, 1, 2]},
                              bytes_keys=True)
    d = _load(Cifar10Dataset(), tmp_path)
    assert len(d.train) == 10 and len(d.test) == 3 and d.input_shape == (3, 32, 32)
    assert d.train.tensors[1][:2].tolist() == [1, 2]
    # standardised per channel with the training statistics
    x = d.prepare(d.train.tensors[0])
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert Cifar10Dataset.augmentation == "crop_flip"


@pytest.mark.parametrize("labels,classes", [("fine", 100), ("coarse", 20)])
def test_cifar100_dataset_label_sets(tmp_path, labels, classes):
    root = tmp_path / "cifar-100-python"
    for split, n in (("train", 4), ("test", 2)):
        formats.write_cifar_batch(root / split, _cifar_images(n, n),
                                  {"fine_labels": [99] * n, "coarse_labels": [19] * n})
    d = _load(Cifar100Dataset(), tmp_path, labels=labels)
    assert d.num_classes == classes
    assert d.train.tensors[1].tolist() == [classes - 1] * 4


def test_svhn_mat_round_trip_and_dataset(tmp_path):
    pytest.importorskip("scipy.io")
    x = _cifar_images(5, 1)
    y = np.array([0, 1, 9, 0, 5])
    path = formats.write_svhn_mat(tmp_path / "svhn" / "train_32x32.mat", x, y)
    back_x, back_y = formats.read_svhn_mat(path)
    np.testing.assert_array_equal(back_x, x)
    assert back_y.tolist() == y.tolist()  # 0 is stored as 10 and mapped back
    from scipy.io import loadmat

    raw = loadmat(str(path))
    assert raw["X"].shape == (32, 32, 3, 5) and raw["y"].ravel().tolist() == [10, 1, 9, 10, 5]
    formats.write_svhn_mat(tmp_path / "svhn" / "test_32x32.mat", x[:2], y[:2])
    d = _load(SvhnDataset(), tmp_path)
    assert len(d.train) == 5 and len(d.test) == 2 and d.num_classes == 10
