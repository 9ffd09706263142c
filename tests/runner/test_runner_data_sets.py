"""CURVES generator, digits, augmentation, batch loader."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from kfqn.runner.components import resolve_options
from kfqn.runner.data import curves as curves_mod
from kfqn.runner.data.augment import CropFlip, make_augmentation
from kfqn.runner.data.curves import CurvesDataset, curve_points, generate_curves
from kfqn.runner.data.digits import DigitsDataset
from kfqn.runner.loader import BatchLoader


def test_curves_deterministic_by_seed_and_in_unit_range():
    a, pa = generate_curves(20, seed=3)
    b, pb = generate_curves(20, seed=3)
    c, _ = generate_curves(20, seed=4)
    assert a.shape == (20, 28, 28)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(pa, pb)
    assert not np.allclose(a, c)
    assert a.min() >= 0.0 and a.max() <= 1.0


def test_curves_smaller_set_is_a_prefix():
    small, _ = generate_curves(5, seed=1)
    large, _ = generate_curves(1200, seed=1)
    np.testing.assert_array_equal(small, large[:5])


def test_curves_pass_through_their_three_points():
    images, points = generate_curves(30, seed=0, sigma=0.8)
    for img, pts in zip(images, points):
        for x, y in pts:  # the pixel nearest each point is inked
            assert img[int(round(y)), int(round(x))] > 0.6
        # the ends are the two points farthest apart
        d = lambda i, j: np.linalg.norm(pts[i] - pts[j])  # noqa: E731
        assert d(0, 2) >= max(d(0, 1), d(1, 2))


def test_curves_ink_lies_on_the_quadratic_through_the_points():
    """Bright pixels are within ~1 px of the curve, computed here independently by polyfit."""
    images, points = generate_curves(10, seed=5, sigma=0.8)
    for img, pts in zip(images, points):
        d01 = np.linalg.norm(pts[1] - pts[0])
        t1 = d01 / (d01 + np.linalg.norm(pts[2] - pts[1]))
        ts = np.array([0.0, t1, 1.0])
        cx, cy = np.polyfit(ts, pts[:, 0], 2), np.polyfit(ts, pts[:, 1], 2)
        t = np.linspace(0, 1, 2000)
        curve = np.stack([np.polyval(cx, t), np.polyval(cy, t)], -1)
        ys, xs = np.nonzero(img > 0.5)
        dist = np.linalg.norm(np.stack([xs, ys], -1)[:, None] - curve[None], axis=-1).min(1)
        assert len(xs) >= 5 and dist.max() < 1.0
        # and pixels far from the curve are blank
        yy, xx = np.mgrid[0:28, 0:28]
        far = np.linalg.norm(np.stack([xx.ravel(), yy.ravel()], -1)[:, None] - curve[None],
                             axis=-1).min(1) > 3.0
        assert img.ravel()[far].max() == 0.0


def test_curves_dataset_is_cached(tmp_path, monkeypatch):
    comp = CurvesDataset()
    opts = resolve_options(comp, {"n_train": 40, "n_test": 10}, "data.options")
    first = comp.load(tmp_path, seed=2, **opts)
    assert len(list((tmp_path / "curves").glob("*.npz"))) == 1
    monkeypatch.setattr(curves_mod, "generate_curves",
                        lambda *a, **k: pytest.fail("regenerated despite the cache"))
    second = comp.load(tmp_path, seed=2, **opts)
    assert torch.equal(first.train.tensors[0], second.train.tensors[0])
    assert first.input_shape == (1, 28, 28) and first.num_classes is None
    assert len(first.train) == 40 and len(first.test) == 10
    x = first.prepare(first.train.tensors[0])
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


def test_curve_points_interpolate_the_three_points():
    pts = np.array([[[2.0, 3.0], [10.0, 20.0], [25.0, 5.0]]])
    c = curve_points(pts, 5001)
    for p in pts[0]:
        assert np.linalg.norm(c[0] - p, axis=1).min() < 0.02


def test_digits_split_is_deterministic_and_disjoint():
    comp = DigitsDataset()
    opts = resolve_options(comp, {"test_fraction": 0.25}, "data.options")
    a = comp.load(None, seed=0, **opts)
    b = comp.load(None, seed=0, **opts)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert len(a.train) + len(a.test) == 1797 and len(a.test) == 449
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert float(a.train.tensors[0].max()) == 1.0
    rows = {tuple(r.tolist()) for r in a.train.tensors[0].flatten(1)}
    overlap = sum(tuple(r.tolist()) in rows for r in a.test.tensors[0].flatten(1))
    assert overlap < 10  # only the few duplicate images of the data set itself


def test_digits_file_reader_matches_scikit_learn():
    from sklearn.datasets import load_digits

    from kfqn.runner.data.digits import load_digits_arrays

    images, target = load_digits_arrays()
    ref = load_digits()
    np.testing.assert_array_equal(images, ref.images.astype(np.float32))
    np.testing.assert_array_equal(target, ref.target)


def test_crop_flip_outputs_are_padded_crops_or_their_mirror():
    x = torch.rand(6, 3, 8, 8)
    out = CropFlip(seed=0, pad=2)(x)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        found = any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1))
                    for dy in range(5) for dx in range(5)
                    for c in [padded[i, :, dy:dy + 8, dx:dx + 8]])
        assert found


def test_crop_flip_is_seeded_and_resumable():
    x = torch.rand(16, 3, 8, 8)
    a = CropFlip(seed=1)
    first = a(x)
    state = a.state_dict()
    second = a(x)
    b = CropFlip(seed=1)
    assert torch.equal(first, b(x))
    c = CropFlip(seed=99)
    c.load_state_dict(state)
    assert torch.equal(second, c(x))
    assert not torch.equal(first, second)


def test_make_augmentation_settings():
    assert make_augmentation(None, None, 0) is None
    assert isinstance(make_augmentation(None, "crop_flip", 0), CropFlip)
    assert make_augmentation(False, "crop_flip", 0) is None
    assert isinstance(make_augmentation(True, None, 0), CropFlip)
    with pytest.raises(ValueError, match="data.augment"):
        make_augmentation("rotate", None, 0)


def test_batch_loader_resumes_mid_epoch():
    ds = TensorDataset(torch.arange(10), torch.arange(10))
    ref = BatchLoader(ds, 3, seed=7)
    ref_batches = [b[0].tolist() for _ in range(3) for b in ref]
    assert len(ref) == 3 and len(ref_batches) == 9  # drop_last: 3 batches of 3 per epoch

    loader = BatchLoader(ds, 3, seed=7)
    got = []
    it = iter(loader)
    for _ in range(4):  # one epoch and one batch
        try:
            got.append(next(it)[0].tolist())
        except StopIteration:
            it = iter(loader)
            got.append(next(it)[0].tolist())
    state = loader.state_dict()
    fresh = BatchLoader(ds, 3, seed=0)
    fresh.load_state_dict(state)
    got += [b[0].tolist() for b in fresh]
    got += [b[0].tolist() for b in fresh]
    assert got == ref_batches[:len(got)]
    assert all(len(set(sum(ref_batches[i:i + 3], []))) == 9 for i in (0, 3, 6))
