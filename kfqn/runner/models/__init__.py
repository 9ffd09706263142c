"""Model components of the experiment runner."""
from __future__ import annotations

from kfqn.runner.models.autoencoders import AUTOENCODERS, MLPAutoencoder
from kfqn.runner.models.base import ModelComponent, half_squared_error, sigmoid_cross_entropy
from kfqn.runner.models.cnns import CNNS

#: the built-in models, registered by :mod:`kfqn.runner.builtins`
MODELS: list[type[ModelComponent]] = [*AUTOENCODERS, *CNNS]

__all__ = ["MODELS", "MLPAutoencoder", "ModelComponent", "half_squared_error",
           "sigmoid_cross_entropy"]
