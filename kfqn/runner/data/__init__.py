"""Data set components of the experiment runner and the helpers they share."""
from __future__ import annotations

from kfqn.runner.data.base import DatasetComponent, DataSplits
from kfqn.runner.data.curves import CurvesDataset, generate_curves
from kfqn.runner.data.digits import DigitsDataset
from kfqn.runner.data.vision import VISION_DATASETS

#: the built-in data sets, registered by :mod:`kfqn.runner.builtins`
DATASETS: list[type[DatasetComponent]] = [CurvesDataset, DigitsDataset, *VISION_DATASETS]

__all__ = ["DATASETS", "DataSplits", "DatasetComponent", "generate_curves"]
