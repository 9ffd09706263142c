"""What a data set component returns, and the base class data set components derive from."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

import torch
from torch.utils.data import TensorDataset

from kfqn.core.components import Component


@dataclass
class DataSplits:
    """A data set in memory: train and test splits plus how to turn a batch into model input.

    Tensors may be stored compactly (``uint8`` images); :meth:`prepare` converts a batch to
    float, multiplies by ``scale`` and, when ``mean``/``std`` are given (one value per channel),
    standardises it. Augmentation, when used, runs between scaling and standardisation, so
    padding is black as in the usual torchvision pipeline.

    ``num_classes`` is ``None`` for data without labels of interest (autoencoder data; the
    label tensor then holds zeros).
    """

    train: TensorDataset
    test: TensorDataset
    input_shape: tuple[int, ...]
    num_classes: Optional[int]
    scale: float = 1.0
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None

    def to(self, device: torch.device | str) -> "DataSplits":
        """A copy with all tensors on ``device``."""
        mv = lambda ds: TensorDataset(*(t.to(device) for t in ds.tensors))  # noqa: E731
        return DataSplits(mv(self.train), mv(self.test), self.input_shape, self.num_classes,
                          self.scale, self.mean, self.std)

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as float32 times ``scale`` (values in [0, 1] for image data)."""
        x = x.to(torch.float32)
        return x * self.scale if self.scale != 1.0 else x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel standardisation of an already scaled batch (identity without mean/std)."""
        if self.mean is None:
            return x
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return (x - mean) / std

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled and standardised model input (no augmentation)."""
        return self.normalize(self.scaled(x))


class DatasetComponent(Component):
    """Base class of data set components (registry kind ``dataset``).

    Subclasses set ``name``, ``description``, ``options`` (a table of
    :class:`~kfqn.core.components.Option`) and implement :meth:`load`.
    ``augmentation`` names the augmentation used when the config says ``data.augment: null``
    (``"crop_flip"`` or ``None``).
    """

    augmentation: ClassVar[Optional[str]] = None

    def load(self, root: Path, seed: int, download: bool = False, **options: Any) -> DataSplits:
        """Load (or generate) the data under ``root``; ``seed`` fixes any randomness of it."""
        raise NotImplementedError
